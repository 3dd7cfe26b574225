"""The quart-trio app: POST /events, GET /health, and JSON errors for everything else."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio
from quart import Response, request
from quart_trio import QuartTrio
from trio_util import AsyncValue
from werkzeug.exceptions import HTTPException

from actors.backlog_monitor import BacklogMonitor
from actors.config_watcher import ConfigWatcher, ReloadRequest
from actors.ingress import PublishRequest
from actors.log_writer import LogWriter
from actors.stats import StatsCollector
from actors.subscriber import Subscriber
from pipeline.access import IngressAccess, admin_allows, cross_site_refusal, is_loopback, names_this_machine
from pipeline.config import Config
from pipeline.nats_bridge import JetStream
from pipeline.routes import Routes
from web.api import register_api, service_statistics
from web.dashboard import register_dashboard
from web.ingress import EventIngress
from web.openapi import OPENAPI
from web.server import SLOW_CLIENT_TIMEOUT_SECONDS

Surface = Literal["all", "public", "admin"]
# Reachable without the admin credential (POST /events has its own rules: web/ingress.py).
_OPEN_PATHS = frozenset({"/health", "/openapi.json"})
# Admin requests that change nothing; the others must prove they are not cross-site.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What public /health says of failing domain logs; the error itself (which may
# name a domain's file) goes to stderr and the dashboard.
_LOGS_FAILING = "writes to the log directory fail (the service's stderr and the dashboard say why)"
# What public /health says of domains whose consumer cannot be opened.
_CONSUMERS_FAILING = "their consumers cannot be opened; the service's log and the dashboard say why"

# Without admin.password_sha256 the dashboard and /api/* answer loopback clients only; others are told this.
_LOOPBACK_ONLY = (
    "the dashboard and /api/* answer only this machine (loopback) while admin.password_sha256 is unset: "
    'set it to the SHA-256 of a password (printf %s "$PASSWORD" | sha256sum) and restart, then sign in '
    "with HTTP basic auth (any user name) or Authorization: Bearer <password>"
)


_NOT_THIS_MACHINE = (
    "Host {host!r} does not name this machine: while admin.password_sha256 is unset the dashboard and "
    "/api/* answer requests to localhost, a loopback address or this machine's host name only (a page on "
    "another site could reach them by pointing its own name at 127.0.0.1); set a password to use other names"
)


def _error(status: int, message: str, **extra: Any) -> tuple[dict[str, Any], int]:
    return {"status": "error", "error": message, **extra}, status


def _own_origin() -> str:
    """The origin the client addressed: behind a reverse proxy, the one its X-Forwarded-Proto/-Host name.

    Trusting those is safe here: a page on another site cannot add them to a
    request without a CORS preflight, which this service never grants.
    """
    scheme = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.headers.get("Host", "")
    return f"{scheme}://{host}"


def _json_response(status: int, message: str) -> Response:
    return Response(json.dumps({"status": "error", "error": message}), status, content_type="application/json")


def create_app(
    config: Config,
    *,
    jetstream: JetStream,
    publish_requests: trio.MemorySendChannel[PublishRequest],
    publish_now: Callable[[PublishRequest], Awaitable[bool]],
    stats: StatsCollector,
    subscriber: Subscriber,
    backlog: BacklogMonitor,
    log_writer: LogWriter | None,
    config_watcher: ConfigWatcher | None,
    reload_requests: trio.MemorySendChannel[ReloadRequest],
    access: AsyncValue[IngressAccess],
    routes: AsyncValue[Routes],
    stopping: trio.Event,
    surface: Surface = "all",
) -> QuartTrio | EventIngress:
    """Build the ASGI app around the running pipeline's pieces (no module-level state).

    ``surface``: ``public`` serves only POST /events, /health and
    /openapi.json; ``admin`` those two and the dashboard, its /static/* files
    and /api/*, behind the admin credential (without one: to loopback clients
    only); ``all`` everything (one listen address).
    """
    # The dashboard's files belong to the admin surface: the public listener has none.
    app = QuartTrio(__name__, static_folder=None if surface == "public" else "static")
    app.config["MAX_CONTENT_LENGTH"] = int(config.server.max_body_size)
    app.config["BODY_TIMEOUT"] = SLOW_CLIENT_TIMEOUT_SECONDS  # a body trickling in slower than this gets 408
    # Time a publish may take before the client is told it failed: the publish
    # timeout, plus room for the batch it waits behind.
    answer_deadline = config.nats.publish_timeout_seconds + 2.0

    def health_report(*, detailed: bool = False) -> tuple[dict[str, Any], int]:
        """ok, degraded or unavailable, and why. /health is public: only ``detailed``
        (the dashboard's copy) names the failing log file or the domains that
        cannot be consumed, which name tenants."""
        if not jetstream.connected.value:
            return {"status": "unavailable", "nats": "disconnected", "reason": "not connected to NATS"}, 503
        near_full = backlog.near_full()
        if near_full is not None:
            return {"status": "degraded", "nats": "connected", "reason": near_full}, 200
        flows = subscriber.statistics()
        if flows.unconsumable:
            # Public /health names no tenant: only the dashboard's copy has examples.
            why = (
                "; ".join(f"{domain}: {failure.error}" for domain, failure in flows.unconsumable_examples.items())
                if detailed
                else _CONSUMERS_FAILING
            )
            routed = "routed domain" if flows.unconsumable == 1 else "routed domains"
            reason = f"{flows.unconsumable} {routed} cannot be consumed ({why})"
            return {"status": "degraded", "nats": "connected", "reason": reason}, 200
        failing = log_writer.health().failing if log_writer is not None else None
        if failing is not None:
            # Forwarding goes on; only the domain log files are not being written.
            reason = f"domain logs not written: {failing if detailed else _LOGS_FAILING}"
            return {"status": "degraded", "nats": "connected", "reason": reason}, 200
        return {"status": "ok", "nats": "connected"}, 200

    @app.get("/health")
    async def health() -> tuple[dict[str, Any], int]:
        return health_report()

    @app.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return OPENAPI

    def with_ingress(app: QuartTrio) -> EventIngress:
        return EventIngress(
            _with_common_handlers(app, config),
            access=access,
            routes=routes,
            backlog=backlog,
            publish_requests=publish_requests,
            publish_now=publish_now,
            max_body_size=int(config.server.max_body_size),
            body_timeout=SLOW_CLIENT_TIMEOUT_SECONDS,
            answer_deadline=answer_deadline,
        )

    if surface == "public":
        return with_ingress(app)

    password_sha256 = config.admin.password_sha256

    @app.before_request
    async def admin_only() -> Response | None:
        if request.path in _OPEN_PATHS:
            return None
        if password_sha256 is None:
            client = request.scope.get("client")
            if not is_loopback(client[0] if client else None):
                return _json_response(403, _LOOPBACK_ONLY)
            host = request.headers.get("Host")
            if not names_this_machine(host):
                return _json_response(403, _NOT_THIS_MACHINE.format(host=host))
        elif not admin_allows(request.headers.get("Authorization"), password_sha256):
            response = _json_response(401, "admin credential required")
            # Basic auth, so a browser asks for it when the dashboard opens.
            response.headers["WWW-Authenticate"] = 'Basic realm="telephony-forwarder", charset="UTF-8"'
            return response
        if request.method in _SAFE_METHODS:
            return None
        # Replay, discard, reload: a browser holding the admin's basic auth (or
        # on this machine) must not do them for a page on another site.
        refusal = cross_site_refusal(
            origin=request.headers.get("Origin"),
            content_type=request.headers.get("Content-Type"),
            requested_with=request.headers.get("X-Requested-With"),
            own_origin=_own_origin(),
        )
        return None if refusal is None else _json_response(403, refusal)

    register_dashboard(
        app,
        stats=stats,
        snapshot=lambda: (
            service_statistics(stats, subscriber, backlog, log_writer) | {"health": health_report(detailed=True)[0]}
        ),
        stopping=stopping,
    )

    register_api(
        app,
        stats=stats,
        subscriber=subscriber,
        backlog=backlog,
        jetstream=jetstream,
        log_writer=log_writer,
        logs_dir=config.logging.dir,
        config_watcher=config_watcher,
        reload_requests=reload_requests,
    )
    return with_ingress(app) if surface == "all" else _with_common_handlers(app, config)


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
