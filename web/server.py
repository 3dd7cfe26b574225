"""Serving the app with hypercorn's trio worker."""

from __future__ import annotations

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

from pipeline.config import ServerConfig
from web.ingress import EventIngress
from web.ingress_front import serve_front

SLOW_CLIENT_TIMEOUT_SECONDS = 30
# A connection whose next request head has not arrived by then is closed.
IDLE_CONNECTION_SECONDS = 5


async def serve_http(
    app: QuartTrio | EventIngress,
    config: ServerConfig,
    stopping: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``stopping`` is set, then finish in-flight requests.

    Reports the bound addresses (``http://host:port``) once listening. Hypercorn
    installs no signal handlers of its own: ``stopping`` is the trigger. A
    listener that takes POST /events reads its connections through the
    ingress front (web/ingress_front.py), which hands all but those posts to hypercorn.
    """
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = [f"{config.host}:{config.port}"]
    # Above the publish timeout, so requests waiting for JetStream still get their answer.
    hypercorn_config.graceful_timeout = config.shutdown_grace_seconds
    hypercorn_config.accesslog = None
    # Against slow or idle clients holding connections open (slowloris): a
    # connection without a complete request is closed after 5 s, headers are
    # capped at 16 KiB (hypercorn's h11 default), and a body must arrive within
    # SLOW_CLIENT_TIMEOUT_SECONDS (Quart's BODY_TIMEOUT). No read_timeout: it
    # would also cut the dashboard's long-lived event stream.
    hypercorn_config.keep_alive_timeout = IDLE_CONNECTION_SECONDS
    if isinstance(app, EventIngress):
        await serve_front(app, hypercorn_config, stopping, task_status=task_status)
    else:
        await serve(app, hypercorn_config, shutdown_trigger=stopping.wait, task_status=task_status)
