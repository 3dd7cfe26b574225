"""The backlog monitor actor: the event stream's state in, the operator's view of what waits out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
import trio
import trio_util
from trio_util import AsyncValue, periodic

from pipeline.nats_bridge import JetStream, NatsUnavailable, StreamBacklog
from pipeline.routes import Routes

log = structlog.get_logger(component="backlog")

# How often the stream's state is read (one bridge crossing and one request per
# large unrouted backlog): fresh enough for /health and the dashboard.
POLL_SECONDS = 2.0
# /health says degraded from here on: new events will soon be refused.
NEAR_FULL_RATIO = 0.9
# Unrouted domains listed by /api/stats, largest backlog first (strangers can invent many).
MAX_UNROUTED_SHOWN = 50


class BacklogMonitor:
    """Keeps a recent view of what waits in the event stream, by domain.

    In: the stream's state, read every ``POLL_SECONDS``. Out: ``latest`` (None
    until the first read and while NATS cannot answer), and the reports built
    from it for /health, /api/stats and the dashboard. Runs until ``stopping``
    is set. Back-pressure: none needed; one read at a time.
    """

    def __init__(self, jetstream: JetStream, routes: AsyncValue[Routes], stopping: trio.Event) -> None:
        self._jetstream = jetstream
        self._routes = routes
        self._stopping = stopping
        self.latest: StreamBacklog | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio_util.wait_any(self._poll, self._stopping.wait)

    async def _poll(self) -> None:
        async for _ in periodic(POLL_SECONDS):
            try:
                self.latest = await self._jetstream.backlog(self._routes.value.keys())
            except NatsUnavailable as error:
                log.debug("Cannot read the backlog", error=str(error))
                self.latest = None

    def near_full(self) -> str | None:
        """Why /health should say degraded, if the stream is close to refusing events."""
        backlog = self.latest
        if backlog is None or backlog.bytes < NEAR_FULL_RATIO * backlog.max_bytes:
            return None
        return (
            f"event stream {backlog.bytes / backlog.max_bytes:.0%} full (nats.max_bytes): "
            "new events are refused when it is full"
        )

    def report(self) -> dict[str, Any]:
        """The ``backlog`` part of /api/stats."""
        backlog = self.latest
        quota = self._jetstream.config.max_backlog_per_domain
        if backlog is None:
            return {"available": False, "quota_per_domain": quota}
        routes = self._routes.value
        now = datetime.now(UTC)
        unrouted = {domain: count for domain, count in backlog.by_domain.items() if domain not in routes}
        largest = sorted(unrouted, key=unrouted.__getitem__, reverse=True)[:MAX_UNROUTED_SHOWN]
        return {
            "available": True,
            "quota_per_domain": quota,
            "stream": {"messages": backlog.messages, "bytes": backlog.bytes, "max_bytes": backlog.max_bytes},
            "dead_letters": backlog.dead_letters,
            "domains": {domain: count for domain, count in backlog.by_domain.items() if domain in routes},
            "unrouted_domain_count": len(unrouted),
            "unrouted_events": sum(unrouted.values()),
            "unrouted": {
                domain: {
                    "waiting": unrouted[domain],
                    "oldest_age_seconds": round((now - backlog.oldest_unrouted[domain]).total_seconds(), 1)
                    if domain in backlog.oldest_unrouted
                    else None,
                }
                for domain in largest
            },
        }
