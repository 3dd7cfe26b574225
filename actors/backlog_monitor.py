"""The backlog monitor actor: the event stream's state in, the operator's view of what waits out,
and the ingress's limit on what domains without a route may have waiting."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import trio
import trio_util
from trio_util import AsyncValue

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
# Events of domains without a route are refused once the stream is this full:
# nats.max_unrouted_backlog counts events, and a few thousand large ones would
# otherwise fill nats.max_bytes, which routed tenants need.
UNROUTED_MAX_STREAM_SHARE = 0.5


@dataclass(slots=True)
class _Tally:
    events: int = 0
    bytes: int = 0

    def add(self, size: int, sign: int = 1) -> None:
        self.events += sign
        self.bytes += sign * size


class BacklogMonitor:
    """Keeps a recent view of what waits in the event stream, by domain.

    In: the stream's state, read every ``POLL_SECONDS`` (the first time before
    it reports started); the ingress's admissions of events for domains without
    a route (``admit_unrouted``, ``settle_unrouted``). Out: each reading's
    waiting events by domain to the function ``begin_reading`` returned as the
    reading began (the subscriber wakes those domains); ``latest`` (None
    until the first read and while NATS cannot answer), the reports built from
    it for /health, /api/stats and the dashboard, and the answer to whether an
    unrouted event may be stored. Runs until ``stopping`` is set.
    Back-pressure: none needed; one read at a time.
    """

    def __init__(
        self,
        jetstream: JetStream,
        routes: AsyncValue[Routes],
        stopping: trio.Event,
        begin_reading: Callable[[], Callable[[Mapping[str, int]], None]],
    ) -> None:
        self._jetstream = jetstream
        self._begin_reading = begin_reading
        self._routes = routes
        self._stopping = stopping
        self.latest: StreamBacklog | None = None
        # The unrouted limit: the last good reading (unrouted events waiting, and
        # the stream's bytes), plus what this instance admitted since. Admitted
        # events are counted until refused; those stored before the reading began
        # are in the reading, so they are subtracted. Between readings (up to
        # POLL_SECONDS) only other instances' admissions go unseen.
        self._read = _Tally()
        self._admitted = _Tally()
        self._stored = _Tally()
        self._stored_before_read = _Tally()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._read_backlog()  # the unrouted limit starts from what already waits
        task_status.started()
        await trio_util.wait_any(self._poll, self._stopping.wait)

    async def _poll(self) -> None:
        deadline = trio.current_time()
        while True:
            deadline += POLL_SECONDS
            await trio.sleep_until(deadline)
            await self._read_backlog()

    async def _read_backlog(self) -> None:
        stored_before = _Tally(self._stored.events, self._stored.bytes)
        routes = self._routes.value
        on_reading = self._begin_reading()
        try:
            self.latest = backlog = await self._jetstream.backlog(routes.keys())
        except NatsUnavailable as error:
            log.debug("Cannot read the backlog", error=str(error))
            self.latest = None
            return
        on_reading(backlog.by_domain)
        unrouted = sum(count for domain, count in backlog.by_domain.items() if domain not in routes)
        self._read = _Tally(unrouted, backlog.bytes)
        self._stored_before_read = stored_before

    def admit_unrouted(self, size: int) -> str | None:
        """Count an event of ``size`` bytes for a domain without a route, about to be
        stored; or, when one more would pass the unrouted limit, say why not.

        Each admitted event is settled (``settle_unrouted``) once its publish is over.
        """
        waiting = self._read.events + self._admitted.events - self._stored_before_read.events
        stream_bytes = self._read.bytes + self._admitted.bytes - self._stored_before_read.bytes
        limit = self._jetstream.config.max_unrouted_backlog
        if waiting >= limit:
            return f"domains without a route have {waiting} events waiting, the most nats.max_unrouted_backlog allows"
        max_bytes = int(self._jetstream.config.max_bytes)
        if stream_bytes >= UNROUTED_MAX_STREAM_SHARE * max_bytes:
            return (
                f"the event stream is {UNROUTED_MAX_STREAM_SHARE:.0%} full (nats.max_bytes), "
                "the most events of domains without a route may take"
            )
        self._admitted.add(size)
        return None

    def settle_unrouted(self, size: int, *, stored: bool) -> None:
        """An admitted event's publish is over: ``stored`` (or perhaps stored), or refused."""
        if stored:
            self._stored.add(size)
        else:
            self._admitted.add(size, -1)

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
        unrouted_quota = self._jetstream.config.max_unrouted_backlog
        if backlog is None:
            return {"available": False, "quota_per_domain": quota, "unrouted_quota": unrouted_quota}
        routes = self._routes.value
        now = datetime.now(UTC)
        unrouted = {domain: count for domain, count in backlog.by_domain.items() if domain not in routes}
        largest = sorted(unrouted, key=unrouted.__getitem__, reverse=True)[:MAX_UNROUTED_SHOWN]
        return {
            "available": True,
            "quota_per_domain": quota,
            "unrouted_quota": unrouted_quota,
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
