"""The quart-trio app: POST /events, GET /health, and JSON errors for everything else."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import trio
from quart import Response, request
from quart_trio import QuartTrio
from trio_util import AsyncValue
from werkzeug.exceptions import HTTPException

from actors.config_watcher import ConfigWatcher, ReloadRequest
from actors.ingress import PublishRequest
from actors.log_writer import LogWriter
from actors.stats import StatsCollector
from actors.subscriber import Subscriber
from pipeline.access import DomainRateLimiter, IngressAccess, admin_allows
from pipeline.config import Config
from pipeline.events import InvalidEvent, parse_event
from pipeline.nats_bridge import JetStream
from web.api import register_api, service_statistics
from web.dashboard import register_dashboard
from web.openapi import OPENAPI
from web.server import SLOW_CLIENT_TIMEOUT_SECONDS

# Content types a PBX may plausibly send JSON with; curl's -d default
# (x-www-form-urlencoded) included, since that is how people try it out.
_ACCEPTED_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "text/json", "application/x-www-form-urlencoded"}
)


Surface = Literal["all", "public", "admin"]
# Reachable without the admin credential on the admin surface.
_OPEN_PATHS = frozenset({"/health", "/events", "/openapi.json"})


def _error(status: int, message: str, **extra: Any) -> tuple[dict[str, Any], int]:
    return {"status": "error", "error": message, **extra}, status


def create_app(
    config: Config,
    *,
    jetstream: JetStream,
    publish_requests: trio.MemorySendChannel[PublishRequest],
    stats: StatsCollector,
    subscriber: Subscriber,
    log_writer: LogWriter | None,
    config_watcher: ConfigWatcher | None,
    reload_requests: trio.MemorySendChannel[ReloadRequest],
    access: AsyncValue[IngressAccess],
    stopping: trio.Event,
    surface: Surface = "all",
) -> QuartTrio:
    """Build the app around the running pipeline's pieces (no module-level state).

    ``surface``: ``public`` serves only POST /events and /health, ``admin``
    only /health, the dashboard and /api/*, ``all`` both (one listen address).
    """
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.server.max_body_size)
    app.config["BODY_TIMEOUT"] = SLOW_CLIENT_TIMEOUT_SECONDS  # a body trickling in slower than this gets 408
    # Time a publish may take before the client is told it failed: the publish
    # timeout, plus room for the batch it waits behind.
    answer_deadline = config.nats.publish_timeout_seconds + 2.0

    limiter = DomainRateLimiter(access.value.rate_per_second, access.value.burst)

    async def post_event() -> tuple[dict[str, Any], int] | Response:
        nonlocal limiter
        rules = access.value
        key = rules.key_for(request.headers.get("Authorization"))
        if key is None and not rules.open:
            return _unauthorized("missing or invalid API key: send Authorization: Bearer <key>")
        content_type = (request.mimetype or "").lower()
        if content_type not in _ACCEPTED_CONTENT_TYPES and not content_type.endswith("+json"):
            return _error(415, f"unsupported Content-Type {content_type!r}: send application/json")
        body = await request.get_data(cache=False)
        try:
            event = parse_event(body)
        except InvalidEvent as error:
            return _error(400, str(error))
        if key is not None and not key.allows(event.domain):
            return _error(403, f"API key {key.name!r} may not post events for domain {event.domain!r}")
        if rules.rate_per_second:
            if (limiter.rate, limiter.burst) != (rules.rate_per_second, rules.burst):
                limiter = DomainRateLimiter(rules.rate_per_second, rules.burst)
            wait = limiter.take(event.domain)
            if wait:
                answer, status = _error(429, f"too many events for domain {event.domain!r}; retry later")
                return Response(
                    json.dumps(answer), status, {"Retry-After": str(math.ceil(wait))}, content_type="application/json"
                )
        publish = PublishRequest(event)
        # A client that hangs up cancels this handler; the publish it started
        # must still finish (or time out) on its own, never half-done.
        with trio.CancelScope(shield=True), trio.move_on_after(answer_deadline):
            await publish_requests.send(publish)
            await publish.done.wait()
        outcome = publish.outcome
        if outcome is None:
            return _error(503, "timed out storing the event; retry with the same event_id", event_id=event.event_id)
        if isinstance(outcome, Exception):
            return _error(
                500,
                f"event not stored: {outcome or type(outcome).__name__}; retry with the same event_id",
                event_id=event.event_id,
            )
        answer = {"status": "accepted", "event_id": event.event_id, "sequence": outcome.sequence}
        if outcome.duplicate:
            answer["duplicate"] = True
        return answer, 202

    def health_report() -> tuple[dict[str, Any], int]:
        if not jetstream.connected.value:
            return {"status": "unavailable", "nats": "disconnected", "reason": "not connected to NATS"}, 503
        failing = log_writer.health().failing if log_writer is not None else None
        if failing is not None:
            # Forwarding goes on; only the domain log files are not being written.
            return {"status": "degraded", "nats": "connected", "reason": f"domain logs not written: {failing}"}, 200
        return {"status": "ok", "nats": "connected"}, 200

    @app.get("/health")
    async def health() -> tuple[dict[str, Any], int]:
        return health_report()

    @app.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return OPENAPI

    if surface in ("all", "public"):
        app.add_url_rule("/events", view_func=post_event, methods=["POST"])
    if surface == "public":
        return _with_common_handlers(app, config)

    password_sha256 = config.admin.password_sha256

    @app.before_request
    async def admin_only() -> Response | None:
        if password_sha256 is None or request.path in _OPEN_PATHS:
            return None
        if admin_allows(request.headers.get("Authorization"), password_sha256):
            return None
        response = Response(
            json.dumps({"status": "error", "error": "admin credential required"}),
            401,
            content_type="application/json",
        )
        # Basic auth, so a browser asks for it when the dashboard opens.
        response.headers["WWW-Authenticate"] = 'Basic realm="telephony-forwarder", charset="UTF-8"'
        return response

    register_dashboard(
        app,
        stats=stats,
        snapshot=lambda: service_statistics(stats, subscriber, log_writer) | {"health": health_report()[0]},
        stopping=stopping,
    )

    register_api(
        app,
        stats=stats,
        subscriber=subscriber,
        jetstream=jetstream,
        log_writer=log_writer,
        logs_dir=config.logging.dir,
        config_watcher=config_watcher,
        reload_requests=reload_requests,
    )
    return _with_common_handlers(app, config)


def _unauthorized(message: str) -> Response:
    answer, status = _error(401, message)
    return Response(json.dumps(answer), status, {"WWW-Authenticate": "Bearer"}, content_type="application/json")


def _with_common_handlers(app: QuartTrio, config: Config) -> QuartTrio:
    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        code = error.code or 500
        if code == 413:
            return _error(413, f"body larger than {int(config.server.max_body_size)} bytes")
        return _error(code, error.description or error.name)

    @app.after_request
    async def no_cache(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app
