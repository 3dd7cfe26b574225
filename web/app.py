"""The quart-trio app: POST /events, GET /health, and JSON errors for everything else."""

from __future__ import annotations

import json
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
from pipeline.access import IngressAccess, admin_allows
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


def _error(status: int, message: str, **extra: Any) -> tuple[dict[str, Any], int]:
    return {"status": "error", "error": message, **extra}, status


def create_app(
    config: Config,
    *,
    jetstream: JetStream,
    publish_requests: trio.MemorySendChannel[PublishRequest],
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
    /openapi.json; ``admin`` those two and the dashboard and /api/*, behind
    the admin credential; ``all`` everything (one listen address).
    """
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.server.max_body_size)
    app.config["BODY_TIMEOUT"] = SLOW_CLIENT_TIMEOUT_SECONDS  # a body trickling in slower than this gets 408
    # Time a publish may take before the client is told it failed: the publish
    # timeout, plus room for the batch it waits behind.
    answer_deadline = config.nats.publish_timeout_seconds + 2.0

    def health_report() -> tuple[dict[str, Any], int]:
        if not jetstream.connected.value:
            return {"status": "unavailable", "nats": "disconnected", "reason": "not connected to NATS"}, 503
        near_full = backlog.near_full()
        if near_full is not None:
            return {"status": "degraded", "nats": "connected", "reason": near_full}, 200
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

    def with_ingress(app: QuartTrio) -> EventIngress:
        return EventIngress(
            _with_common_handlers(app, config),
            access=access,
            routes=routes,
            backlog=backlog,
            publish_requests=publish_requests,
            max_body_size=int(config.server.max_body_size),
            body_timeout=SLOW_CLIENT_TIMEOUT_SECONDS,
            answer_deadline=answer_deadline,
        )

    if surface == "public":
        return with_ingress(app)

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
        snapshot=lambda: service_statistics(stats, subscriber, backlog, log_writer) | {"health": health_report()[0]},
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
