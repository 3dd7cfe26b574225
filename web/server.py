"""Serving the app with hypercorn's trio worker, on addresses bound before anything else starts."""

from __future__ import annotations

from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from pipeline.config import ServerConfig
from web.ingress import EventIngress
from web.ingress_front import serve_front

SLOW_CLIENT_TIMEOUT_SECONDS = 30
# A connection whose next request head has not arrived by then is closed.
IDLE_CONNECTION_SECONDS = 5


class ListenError(Exception):
    """An address the HTTP server cannot listen on; ``str()`` says which and why, in one line."""


@dataclass(frozen=True)
class HttpListener:
    """An HTTP server's address, bound and listening, with hypercorn's configuration for it."""

    config: HypercornConfig
    sockets: Sockets

    def close(self) -> None:
        for sock in self.sockets.insecure_sockets:
            sock.close()


def listen_http(config: ServerConfig) -> HttpListener:
    """Bind ``config``'s address and listen. Done first at start: a port another process holds
    ends the start at once (``ListenError``), before this one connects to NATS or consumes
    anything; connections made while the rest starts wait in the backlog."""
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
    try:
        sockets = hypercorn_config.create_sockets()
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise ListenError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    for sock in sockets.insecure_sockets:
        sock.listen(hypercorn_config.backlog)
    return HttpListener(hypercorn_config, sockets)


async def serve_http(
    app: QuartTrio | EventIngress,
    listener: HttpListener,
    stopping: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listener`` until ``stopping`` is set, then finish in-flight requests.

    Reports the bound addresses (``http://host:port``) once serving. Hypercorn
    installs no signal handlers of its own: ``stopping`` is the trigger. A
    listener that takes POST /events reads its connections through the
    ingress front (web/ingress_front.py), which hands all but those posts to hypercorn.
    """
    if isinstance(app, EventIngress):
        await serve_front(app, listener.config, listener.sockets, stopping, task_status=task_status)
        return
    await worker_serve(
        wrap_app(app, listener.config.wsgi_max_body_size, "asgi"),
        listener.config,
        sockets=listener.sockets,
        shutdown_trigger=stopping.wait,
        task_status=task_status,
    )
