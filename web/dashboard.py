"""The dashboard at GET /, and the server-sent events that keep it live."""

from __future__ import annotations

import json
import operator
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import trio
import trio_util
from quart import Response
from quart_trio import QuartTrio

from actors.stats import StatsCollector

# Changes are pushed at most this often (a busy service changes constantly),
# and a heartbeat goes out at least this often (uptime and in-flight move too).
PUSH_INTERVAL_SECONDS = 0.25
HEARTBEAT_SECONDS = 1.0


def register_dashboard(
    app: QuartTrio,
    *,
    stats: StatsCollector,
    snapshot: Callable[[], dict[str, Any]],
    stopping: trio.Event,
) -> None:
    """``snapshot()`` is what each push carries: the /api/stats body plus the service's state."""

    @app.get("/")
    async def dashboard() -> Response:
        return await app.send_static_file("dashboard.html")

    @app.get("/api/live")
    async def live() -> Response:
        async def pushes() -> AsyncIterator[bytes]:
            last = -1
            while not stopping.is_set():
                current = stats.recorded.value
                body = snapshot() | {"changes": current, "events_changed": current != last}
                last = current
                yield f"event: stats\ndata: {json.dumps(body)}\n\n".encode()
                await trio.sleep(PUSH_INTERVAL_SECONDS)
                with trio.move_on_after(HEARTBEAT_SECONDS - PUSH_INTERVAL_SECONDS):
                    # Ends with the service: an open stream must not hold up shutdown.
                    await trio_util.wait_any(
                        partial(stats.recorded.wait_value, partial(operator.ne, current)), stopping.wait
                    )

        response = Response(pushes(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"  # proxies: pass each push through at once
        response.timeout = None  # a live stream has no end to wait for
        return response
