"""The forwarder actor: one domain's deliveries in, POSTs to all its endpoints, acks out."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

import httpcore
import structlog
import trio
from trio_util import AsyncValue

from actors.stats import ForwardOutcome
from pipeline.config import ForwardingConfig
from pipeline.events import describe, event_key, parse_strict_json
from pipeline.nats_bridge import Delivery
from pipeline.routes import Endpoint, Routes
from pipeline.signing import signature_headers

log = structlog.get_logger(component="forwarder")

USER_AGENT = "telephony-forwarder"
# Idle connections to an endpoint are closed after this long (httpx's default).
KEEPALIVE_EXPIRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class EndpointResult:
    endpoint: str
    error: str | None  # None: answered 2xx


class Forwarder:
    """Forwards one domain's events to every endpoint of its route, at once.

    In: ``Delivery`` of this domain, from the subscriber, which never sends more
    than the ``room`` semaphore allows; each delivery's slot is released when
    its forwarding ends. Out: the deliveries that every endpoint answered 2xx,
    to the acknowledger, and one ``ForwardOutcome`` per attempt to the stats
    collector. Any other outcome is left unacked, so JetStream
    redelivers it after ack_wait, up to max_deliveries: there is no retry loop
    here. After the last attempt JetStream says it gave up, and the dead-letter
    writer files the event (with the errors recorded here). Endpoints are
    read from the routes at each attempt, so a redelivery goes to the
    endpoints configured now. Returns when the inbox is closed and
    in-flight forwards have finished (or the grace period ran out); closes its
    acks and outcomes channels then.
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
        tls: ssl.SSLContext,
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
        self._tls = tls
        self._timeout = dict.fromkeys(("connect", "read", "write", "pool"), config.timeout_seconds)
        self._pools: dict[str, httpcore.AsyncConnectionPool] = {}  # endpoint URL → its connection pool
        self._nursery: trio.Nursery | None = None
        self.in_flight = 0  # events being forwarded now, for the operator's view

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._acks, self._outcomes, self._deliveries:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    async for delivery in self._deliveries:
                        nursery.start_soon(self._forward, delivery)
                    nursery.cancel_scope.deadline = trio.current_time() + self._grace_seconds
        finally:
            with trio.CancelScope(shield=True):
                for pool in self._pools.values():
                    await pool.aclose()

    def _pool_for(self, url: str) -> httpcore.AsyncConnectionPool:
        """The connection pool of one endpoint, opened at its first request.

        Pools belong to one domain's forwarder, so a hanging backend of one
        domain never holds connections another domain needs; one pool per
        endpoint keeps the scan of idle connections that httpcore makes on
        every request short. The room semaphore bounds concurrency; httpcore's
        own timeout bounds each request (cancelling it from outside leaks pool
        slots: httpcore #1093).
        """
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = httpcore.AsyncConnectionPool(
                ssl_context=self._tls,
                max_connections=None,
                max_keepalive_connections=self._config.max_in_flight_per_domain,
                keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
            )
        return pool

    def _retire_pools(self, endpoints: tuple[Endpoint, ...]) -> None:
        """Close the pools of endpoints the route no longer has, once their last requests can have ended."""
        current = {endpoint.url for endpoint in endpoints}
        for url in [url for url in self._pools if url not in current]:
            self._nursery.start_soon(self._close_later, self._pools.pop(url))

    async def _close_later(self, pool: httpcore.AsyncConnectionPool) -> None:
        try:
            await trio.sleep(self._config.timeout_seconds)
        finally:
            with trio.CancelScope(shield=True):
                await pool.aclose()

    async def _forward(self, delivery: Delivery) -> None:
        self.in_flight += 1
        try:
            await self._forward_to_all(delivery)
        finally:
            self.in_flight -= 1
            self._room.release()

    async def _forward_to_all(self, delivery: Delivery) -> None:
        try:
            # Strict: a NaN stored by an older version could not be forwarded as JSON.
            event = parse_strict_json(delivery.data)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            # Not ours (published to the subject by something else): it can
            # never be forwarded, so ack it away instead of retrying it.
            log.error(
                "Dropping unreadable message",
                domain=self.domain,
                error=str(error),
                stream_sequence=delivery.stream_sequence,
            )
            await self._acks.send(delivery)
            return
        fields = describe(event) | {"domain": self.domain, "delivery_attempt": delivery.delivery_attempt}
        event_log = log.bind(**fields)
        endpoints = self._routes.value.get(self.domain)
        if not endpoints:
            event_log.warning("Route removed; leaving event for redelivery")
            return
        event["delivery_attempt"] = delivery.delivery_attempt
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        # Unique across tenants, who may choose the same event_id: what backends deduplicate on.
        key = event_key(self.domain, str(event.get("event_id", "")))
        headers = {"Content-Type": "application/json", "Idempotency-Key": key, "User-Agent": USER_AGENT}
        event_log.info("Forwarding event", endpoints=len(endpoints))
        if len(self._pools) > len(endpoints):
            self._retire_pools(endpoints)

        results: list[EndpointResult] = []

        async def post(endpoint: Endpoint) -> None:
            signed = headers | signature_headers(endpoint.secret, key, body) if endpoint.secret else headers
            results.append(EndpointResult(endpoint.url, await self._post(endpoint.url, body, signed)))

        async with trio.open_nursery() as nursery:
            for endpoint in endpoints:
                nursery.start_soon(post, endpoint)

        errors = {result.endpoint: result.error for result in results if result.error is not None}
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
        await self._outcomes.send(outcome)
        if not errors:
            await self._acks.send(delivery)
            # payload: the full event, for the domain's log file only (never stdout).
            event_log.info("Event forwarded successfully", endpoints=len(endpoints), payload=event)
            return
        event_log.warning(
            "Failed to forward event",
            errors=errors,
            max_deliveries=self._max_deliveries,
            will_retry=outcome.will_retry,
            payload=event,
        )

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str | None:
        """POST ``body``; None when the endpoint answered 2xx, else what went wrong.

        Straight to httpcore, the connection pool under httpx: httpx's client
        layers and models (cookies, auth, redirects, URL and header objects)
        do nothing for a webhook and cost CPU on every request.
        """
        try:
            response = await self._pool_for(url).request(
                "POST", url, headers=list(headers.items()), content=body, extensions={"timeout": self._timeout}
            )
        except httpcore.TimeoutException as error:
            return f"timeout ({type(error).__name__})"
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as error:
            return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if 200 <= response.status < 300:
            return None
        return f"HTTP {response.status}"
