"""The forwarder actor: one domain's deliveries in, POSTs to all its endpoints, acks out."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import httpx
import structlog
import trio
import trio_util
from trio_util import AsyncValue

from actors.stats import ForwardOutcome
from pipeline.config import ForwardingConfig
from pipeline.events import describe, event_json, event_key, parse_strict_json
from pipeline.nats_bridge import Delivery
from pipeline.routes import Endpoint, Routes
from pipeline.sends import send_now
from pipeline.signing import signature_headers
from pipeline.webhook_transport import BODY_CAP, KEEPALIVE_EXPIRY_SECONDS, WebhookTransport

log = structlog.get_logger(component="forwarder")

USER_AGENT = b"telephony-forwarder"
Headers = list[tuple[bytes, bytes]]
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Closing httpx's pool awaits its connections; a shutdown waits no longer.
CLOSE_SECONDS = 1.0


class EndpointConnections:
    """The connections to every endpoint, shared by all forwarders: one pool of them per origin.

    No pool limits its connections (the forwarders' in-flight limits bound
    them), so no request ever waits for a connection another request holds: a
    domain whose backend hangs holds the connections of its own requests, and
    every other request, of any domain, takes an idle one or opens its own.
    Domains whose endpoints share an origin share its idle connections, so a
    sparse tenant's event seldom needs a new one, and the connections open
    follow the requests in flight, not the domains routed. ``keep_fresh``
    closes the idle ones that expired (``KEEPALIVE_EXPIRY_SECONDS``), so an
    endpoint no longer routed keeps none for long. httpx's own transport
    (``http_transport: httpx``) closes them when it is next used instead.
    """

    def __init__(self, config: ForwardingConfig, tls: ssl.SSLContext) -> None:
        self.transport: httpx.AsyncBaseTransport
        if config.http_transport == "lean":
            self.transport = WebhookTransport(tls)
        else:
            # No request waits for a pool slot: httpcore #1093 leaks slots of requests cancelled while waiting.
            limits = httpx.Limits(
                max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS
            )
            self.transport = httpx.AsyncHTTPTransport(verify=tls, limits=limits)
        self._targets: dict[str, tuple[httpx.URL, Headers]] = {}  # endpoint URL → it parsed, its fixed headers

    def target(self, url: str) -> tuple[httpx.URL, Headers]:
        """``url`` parsed, and the headers every request to it carries (Host included)."""
        target = self._targets.get(url)
        if target is None:
            parsed = httpx.URL(url)
            headers = [(b"Host", parsed.netloc), (b"Content-Type", b"application/json"), (b"User-Agent", USER_AGENT)]
            target = self._targets[url] = (parsed, headers)
        return target

    async def keep_fresh(self) -> None:
        """Close expired idle connections, every ``KEEPALIVE_EXPIRY_SECONDS``, until cancelled."""
        if not isinstance(self.transport, WebhookTransport):
            await trio.sleep_forever()
        async for _ in trio_util.periodic(KEEPALIVE_EXPIRY_SECONDS):
            self.transport.close_expired()

    async def aclose(self) -> None:
        """Close every connection; waits ``CLOSE_SECONDS`` at most, even when cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
            await self.transport.aclose()


class Forwarder:
    """Forwards one domain's events to every endpoint of its route, at once.

    In: ``Delivery`` of this domain, from the subscriber, which never sends more
    than the ``room`` semaphore allows (an event the ingress just stored is
    handed over with ``forward_now``); each delivery's slot is released when
    its forwarding ends. Out: the deliveries that every endpoint answered 2xx,
    to the acknowledger, and one ``ForwardOutcome`` per attempt to the stats
    collector. Any other outcome is left unacked (``Delivery.ended``), so
    JetStream redelivers it after ack_wait, up to max_deliveries: there is no
    retry loop here. After the last attempt JetStream says it gave up, and the dead-letter
    writer files the event (with the errors recorded here). Endpoints are
    read from the routes at each attempt, so a redelivery goes to the
    endpoints configured now, over the connections all forwarders share
    (``EndpointConnections``). Each endpoint request has one deadline,
    ``forwarding.timeout_seconds``, for connect, send and the whole answer
    (with the lean transport; httpx's applies it to each socket operation),
    so an attempt ends before ack_wait redelivers its event. Returns when the
    inbox is closed and in-flight forwards have finished (or the grace period
    ran out); closes its acks and outcomes channels then.
    """

    def __init__(
        self,
        domain: str,
        deliveries: trio.MemoryReceiveChannel[Delivery],
        acks: trio.MemorySendChannel[Delivery],
        outcomes: trio.MemorySendChannel[ForwardOutcome],
        room: trio.Semaphore,
        routes: AsyncValue[Routes],
        config: ForwardingConfig,
        *,
        max_deliveries: int,
        grace_seconds: float,
        connections: EndpointConnections,
    ) -> None:
        self.domain = domain
        self._deliveries = deliveries
        self._acks = acks
        self._outcomes = outcomes
        self._room = room
        self._routes = routes
        self._config = config
        self._max_deliveries = max_deliveries
        self._grace_seconds = grace_seconds
        self._connections = connections
        # httpx's transport applies its timeout to each socket operation (connect, each read, each write).
        self._timeout = dict.fromkeys(("connect", "read", "write", "pool"), config.timeout_seconds)
        self.in_flight = 0  # events being forwarded now, for the operator's view
        self._nursery: trio.Nursery | None = None  # while the inbox is open

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._acks, self._outcomes, self._deliveries:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for delivery in self._deliveries:
                    nursery.start_soon(self._forward, delivery)
                self._nursery = None
                nursery.cancel_scope.deadline = trio.current_time() + self._grace_seconds

    def forward_now(self, delivery: Delivery) -> None:
        """Start forwarding ``delivery`` (its room taken) as if it came through the inbox, which must
        still be open: one step sooner, and one less of this actor's task for each event."""
        assert self._nursery is not None, "the forwarder's inbox is closed"
        self._nursery.start_soon(self._forward, delivery)

    async def _forward(self, delivery: Delivery) -> None:
        self.in_flight += 1
        acked = False
        try:
            acked = await self._forward_to_all(delivery)
        finally:
            self.in_flight -= 1
            self._room.release()
            delivery.ended(acked)

    async def _forward_to_all(self, delivery: Delivery) -> bool:
        """Forward ``delivery`` to every endpoint; whether it went to the acknowledger."""
        accepted = delivery.accepted
        if accepted is not None:  # parsed by the ingress a moment ago
            event, described = accepted.event, accepted.fields
            if "delivery_attempt" in event:
                body = event_json(event | {"delivery_attempt": delivery.delivery_attempt})
            else:
                # The ingress's compact JSON with the new key last: what event_json would give, unparsed.
                body = b'%b,"delivery_attempt":%d}' % (accepted.payload[:-1], delivery.delivery_attempt)
        else:
            try:
                # Strict: a NaN stored by an older version could not be forwarded as JSON.
                event = parse_strict_json(delivery.data)
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
                # An unpaired surrogate ("\ud800": JSON's grammar, no UTF-8 carries it) raises
                # UnicodeEncodeError, a ValueError, as the ingress's 400 says.
                body = event_json(event | {"delivery_attempt": delivery.delivery_attempt})
            except ValueError as error:
                # Not ours (published to the subject by something else): it can
                # never be forwarded, so ack it away instead of retrying it.
                log.error(
                    "Dropping unreadable message",
                    domain=self.domain,
                    error=str(error),
                    stream_sequence=delivery.stream_sequence,
                )
                await send_now(self._acks, delivery)
                return True
            described = describe(event) | {"domain": self.domain}
        fields = described | {"delivery_attempt": delivery.delivery_attempt}
        event_log = log.bind(**fields)
        endpoints = self._routes.value.get(self.domain)
        if not endpoints:
            event_log.warning("Route removed; leaving event for redelivery")
            return False
        # Unique across tenants, who may choose the same event_id: what backends deduplicate on.
        key = event_key(self.domain, str(event.get("event_id", "")))
        headers = [(b"Idempotency-Key", key.encode()), (b"Content-Length", b"%d" % len(body))]
        event_log.info("Forwarding event", endpoints=len(endpoints))

        answered: dict[str, str | None] = {}  # endpoint URL → None (2xx) or what went wrong

        async def post(endpoint: Endpoint) -> None:
            signed = headers
            if endpoint.secret:
                signed = headers + [
                    (k.encode(), v.encode()) for k, v in signature_headers(endpoint.secret, key, body).items()
                ]
            answered[endpoint.url] = await self._exchange(endpoint.url, body, signed)

        # The first endpoint's request runs in this task, each other one in its own: a task fewer per event.
        async with trio.open_nursery() as nursery:
            if self._config.http_transport != "httpx":
                # The requests start together: one deadline for every endpoint's connect, send and whole
                # answer, the nursery's. The lean transport closes the connection of a request it cuts.
                nursery.cancel_scope.deadline = trio.current_time() + self._config.timeout_seconds
            for endpoint in endpoints[1:]:
                nursery.start_soon(post, endpoint)
            await post(endpoints[0])

        timed_out = f"timeout (no complete answer within {self._config.timeout_seconds:g} s)"
        errors = {
            endpoint.url: error
            for endpoint in endpoints
            if (error := answered.get(endpoint.url, timed_out)) is not None
        }
        outcome = ForwardOutcome(
            domain=self.domain,
            fields=fields,
            body=body,
            delivery_attempt=delivery.delivery_attempt,
            max_deliveries=self._max_deliveries,
            at=datetime.now(UTC),
            errors=errors or None,
            stream_sequence=delivery.stream_sequence,
        )
        await send_now(self._outcomes, outcome)
        if not errors:
            await send_now(self._acks, delivery)
            # payload: the full event as forwarded, for the domain's log file only (never stdout).
            event_log.info("Event forwarded successfully", endpoints=len(endpoints), payload=body)
            return True
        event_log.warning(
            "Failed to forward event",
            errors=errors,
            max_deliveries=self._max_deliveries,
            will_retry=outcome.will_retry,
            payload=body,
        )
        return False

    async def _exchange(self, url: str, body: bytes, headers: Headers) -> str | None:
        """POST ``body``; None when the endpoint answered 2xx, else what went wrong, in a few words."""
        target, target_headers = self._connections.target(url)
        # Headers complete (Host, Content-Length) and the body as a stream: httpx's
        # Request then skips its own header preparation, which costs 4× the rest.
        request = httpx.Request(
            "POST",
            target,
            headers=target_headers + headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": self._timeout},
        )
        try:
            response = await self._connections.transport.handle_async_request(request)
            if not isinstance(response.stream, httpx.ByteStream):  # read already (and capped) by the lean transport
                await _read_capped(response)
        except httpx.TimeoutException as error:
            return f"timeout ({type(error).__name__}: {self._config.timeout_seconds:g} s without progress)"
        except httpx.TransportError as error:
            return _describe(error)
        status = response.status_code
        if 200 <= status < 300:
            return None
        if status in REDIRECTS:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"


async def _read_capped(response: httpx.Response) -> None:
    """Read a streamed answer to ``BODY_CAP`` only; closing it unfinished closes its connection."""
    try:
        read = 0
        async for chunk in response.stream:
            read += len(chunk)
            if read > BODY_CAP:
                break
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
            await response.aclose()


def _describe(error: BaseException) -> str:
    """``Name: reason``, the reason taken from the causes when the error has none (httpcore's TLS failures)."""
    reason: BaseException | None = error
    for _ in range(8):  # a chain of causes is short; never follow a cycle far
        if reason is None or str(reason):
            break
        reason = reason.__cause__ or reason.__context__
    return f"{type(error).__name__}: {reason}" if reason is not None and str(reason) else type(error).__name__
