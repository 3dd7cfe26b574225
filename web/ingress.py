"""POST /events as a raw ASGI route in front of the Quart app.

The ingress is the hot path: served here it skips Quart's request and
response machinery (the benchmark's profile showed it as the largest cost
of accepting an event). Everything else goes on to the Quart app.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
import trio
from trio_util import AsyncValue

from actors.backlog_monitor import BacklogMonitor
from actors.ingress import PublishRequest
from pipeline.access import DomainRateLimiter, IngressAccess
from pipeline.events import AcceptedEvent, InvalidEvent, parse_event
from pipeline.nats_bridge import EventTooLarge, PublishReceipt, StreamRefused
from pipeline.routes import Routes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, dict[str, Any], dict[str, str]]

# Content types a PBX may plausibly send JSON with; curl's -d default
# (x-www-form-urlencoded) included, since that is how people try it out.
ACCEPTED_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "text/json", "application/x-www-form-urlencoded"}
)

# What a refused client is told to wait: backlogs drain at the endpoints' pace.
REFUSED_RETRY_AFTER_SECONDS = 30
# The one bucket of the shared limiter of all domains without a route.
_UNROUTED_BUCKET = ""


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class BodyTooSlow(Exception):
    """The request body did not arrive within the ingress's ``body_timeout``."""


def encoded(answer: Answer) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``answer`` as a response: its status, its headers (names lower case) and its JSON body."""
    status, body, headers = answer
    payload = pydantic_core.to_json(body)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(payload)),
        (b"cache-control", b"no-store"),
        *((name.lower().encode(), value.encode()) for name, value in headers.items()),
    ]
    return status, raw_headers, payload


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Answer:
    return status, {"status": "error", "error": message, **extra}, headers or {}


class EventIngress:
    """ASGI app: answers POST /events itself and hands every other request to ``app``.

    A routed domain's events have that domain's rate limit; the events of all
    domains without a route (as ``routes`` are now) share one, and ``backlog``
    bounds how many of them may wait in the stream.
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        access: AsyncValue[IngressAccess],
        routes: AsyncValue[Routes],
        backlog: BacklogMonitor,
        publish_requests: trio.MemorySendChannel[PublishRequest],
        publish_now: Callable[[PublishRequest], Awaitable[bool]],
        max_body_size: int,
        body_timeout: float,
        answer_deadline: float,
    ) -> None:
        self._app = app
        self._access = access
        self._routes = routes
        self._backlog = backlog
        self._publish_requests = publish_requests
        self._publish_now = publish_now
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self._answer_deadline = answer_deadline
        self._limiter = DomainRateLimiter(access.value.rate_per_second, access.value.burst)
        self._unrouted_limiter = DomainRateLimiter(access.value.unrouted_rate_per_second, access.value.unrouted_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/events":
            await self._app(scope, receive, send)
            return
        if scope["method"] != "POST":
            answer = _error(405, "method not allowed: POST events here", {"Allow": "POST"})
        else:
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
            try:
                answer = await self.post_event(headers, lambda: self._read_body(receive))
            except ClientGone:
                return
        status, raw_headers, payload = encoded(answer)
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request body, or None when it is larger than allowed."""
        chunks, size = [], 0
        with trio.move_on_after(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_size:
                    return None
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
        raise BodyTooSlow

    async def post_event(self, headers: dict[str, str], read_body: Callable[[], Awaitable[bytes | None]]) -> Answer:
        """The answer to POST /events with ``headers`` (names lower case).

        ``read_body`` returns the body, or None when it is larger than allowed;
        it raises ``ClientGone`` if the client disconnects first, and
        ``BodyTooSlow`` if the body takes longer than ``body_timeout`` (the
        reader's timer, only while it waits: a body that came with its head
        costs none). It is called only once the request's API key and
        Content-Type pass, so a refused request's body may be left unread.
        """
        rules = self._access.value
        key = rules.key_for(headers.get("authorization"))
        if key is None and not rules.open:
            return _error(
                401, "missing or invalid API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
            )
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type not in ACCEPTED_CONTENT_TYPES and not content_type.endswith("+json"):
            return _error(415, f"unsupported Content-Type {content_type!r}: send application/json")
        try:
            body = await read_body()
        except BodyTooSlow:
            return _error(408, f"the body did not arrive within {self.body_timeout:g} s")
        if body is None:
            return _error(413, f"body larger than {self.max_body_size} bytes")
        try:
            event = parse_event(body)
        except InvalidEvent as error:
            return _error(400, str(error))
        if key is not None and not key.allows(event.domain):
            return _error(403, f"API key {key.name!r} may not post events for domain {event.domain!r}")
        routed = event.domain in self._routes.value
        wait = self._rate_limit_wait(rules, event.domain, routed)
        if wait:
            return _error(
                429,
                f"too many events for domain {event.domain!r}; retry later"
                if routed
                else "too many events for domains without a route (they share one limit); retry later",
                {"Retry-After": str(math.ceil(wait))},
            )
        if routed:
            return self._answer(event, await self._store(event))
        return await self._store_unrouted(event)

    def _rate_limit_wait(self, rules: IngressAccess, domain: str, routed: bool) -> float:
        """0 when the event may pass its rate limit, else the seconds until it would."""
        if routed:
            if not rules.rate_per_second:
                return 0.0
            self._limiter = DomainRateLimiter.following(self._limiter, rules.rate_per_second, rules.burst)
            return self._limiter.take(domain)
        if not rules.unrouted_rate_per_second:
            return 0.0
        self._unrouted_limiter = DomainRateLimiter.following(
            self._unrouted_limiter, rules.unrouted_rate_per_second, rules.unrouted_burst
        )
        return self._unrouted_limiter.take(_UNROUTED_BUCKET)

    async def _store_unrouted(self, event: AcceptedEvent) -> Answer:
        """Store an event of a domain without a route, if what such domains have waiting allows one more."""
        size = len(event.payload)
        refusal = self._backlog.admit_unrouted(size)
        if refusal is not None:
            return _error(
                503,
                f"event not stored: {refusal}; retry later with the same event_id",
                {"Retry-After": str(REFUSED_RETRY_AFTER_SECONDS)},
                event_id=event.event_id,
                limit="unrouted_backlog",
            )
        outcome = await self._store(event)
        # A publish that timed out may have stored it: the limit errs on the safe side.
        stored = outcome is None or (isinstance(outcome, PublishReceipt) and not outcome.duplicate)
        self._backlog.settle_unrouted(size, stored=stored)
        return self._answer(event, outcome)

    async def _store(self, event: AcceptedEvent) -> PublishReceipt | Exception | None:
        """Have ``event`` published (here, or by the ingress actor): its receipt, the error, or None if too slow."""
        publish = PublishRequest(event)
        # A client that hangs up cancels this handler; the publish it started
        # must still finish (or time out) on its own, never half-done.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self._answer_deadline) as waiting:
            if not await self._publish_now(publish):
                await self._publish_requests.send(publish)
                await publish.done.wait()
        return None if waiting.cancelled_caught else publish.outcome

    @staticmethod
    def _answer(event: AcceptedEvent, outcome: PublishReceipt | Exception | None) -> Answer:
        if outcome is None:
            return _error(503, "timed out storing the event; retry with the same event_id", event_id=event.event_id)
        if isinstance(outcome, EventTooLarge):
            return _error(413, str(outcome), limit_bytes=outcome.limit)
        if isinstance(outcome, StreamRefused):
            # Nothing is wrong with the event: a limit holds it back until backlogs drain.
            return _error(
                503,
                f"event not stored: {outcome}; retry later with the same event_id",
                {"Retry-After": str(REFUSED_RETRY_AFTER_SECONDS)},
                event_id=event.event_id,
                limit=outcome.limit,
            )
        if isinstance(outcome, Exception):
            return _error(
                500,
                f"event not stored: {outcome or type(outcome).__name__}; retry with the same event_id",
                event_id=event.event_id,
            )
        answer = {"status": "accepted", "event_id": event.event_id, "sequence": outcome.sequence}
        if outcome.duplicate:
            answer["duplicate"] = True
        return 202, answer, {}
