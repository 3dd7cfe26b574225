"""The stats collector actor: one outcome per forwarding attempt in, a bounded store and counters out."""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import trio
from trio_util import AsyncValue

from pipeline.batching import batches
from pipeline.events import outcome_record

# Outcomes are recorded in batches: one wake of this actor for all that came
# within the linger, not one per event; what the API shows lags by no more.
MAX_BATCH = 1024
LINGER_SECONDS = 0.02
# The events the store keeps, together: events may be up to 1 MiB each, so the record
# limits alone allowed ~200 GiB. Typical events (under 1 KiB) never reach it.
MAX_STORED_BYTES = 256 * 1024**2

EventType = Literal["successful", "failed", "all"]


def rfc3339(moment: datetime) -> str:
    """``2026-01-04T10:00:00.123Z``: RFC 3339 in UTC, as the API shows every time."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ForwardOutcome:
    """What one forwarding attempt of one event came to."""

    domain: str
    fields: dict[str, Any]  # call_id, direction, state, status, event_id: see pipeline.events.describe
    body: bytes  # the event as forwarded (JSON), parsed only when someone asks for it
    delivery_attempt: int
    max_deliveries: int
    at: datetime
    errors: dict[str, str] | None = None  # endpoint → what went wrong; None: every endpoint answered 2xx
    stream_sequence: int = 0  # where the event is stored

    @property
    def succeeded(self) -> bool:
        return self.errors is None

    @property
    def will_retry(self) -> bool:
        return not self.succeeded and self.delivery_attempt < self.max_deliveries

    def as_record(self) -> dict[str, Any]:
        record = outcome_record(
            self.fields | {"domain": self.domain},
            at=rfc3339(self.at),
            delivery_attempt=self.delivery_attempt,
            errors=self.errors,
            max_deliveries=self.max_deliveries,
            will_retry=self.will_retry,
        )
        record["event"] = json.loads(self.body)
        return record


@dataclass(slots=True)
class DomainCounters:
    successful: int = 0
    failed: int = 0
    retries: int = 0
    given_up: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "total_successful": self.successful,
            "total_failed": self.failed,
            "retry_count": self.retries,
            "given_up": self.given_up,
        }


@dataclass(slots=True)
class _DomainStore:
    successful: deque[ForwardOutcome]
    failed: deque[ForwardOutcome]
    counters: DomainCounters = field(default_factory=DomainCounters)


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    total_successful: int
    total_failed: int
    retry_count: int
    given_up: int
    successful_domain_count: int
    failed_domain_count: int
    domains: dict[str, dict[str, int]]
    stored_events: int
    uptime_seconds: float


class StatsCollector:
    """Keeps the recent outcomes of forwarding, by domain, and exact counters.

    In: ``ForwardOutcome`` from every forwarder (each holds a clone of the send
    end), one per attempt. Out: answers to ``events()`` and ``statistics()``,
    which the API calls on the trio thread. Memory is bounded: at most
    ``max_per_domain`` successful and as many failed outcomes per domain, at
    most ``max_domains`` domains (the least recently active is dropped first),
    and events of ``MAX_STORED_BYTES`` together (beyond, the oldest outcomes
    of the least recently active domains go first). The totals count every
    outcome, whatever the store has dropped.
    A failed outcome is replaced by the success of a later attempt of the same
    event. Returns when every forwarder has closed its end.
    Back-pressure: the bounded inbox; recording is a few dictionary operations.
    """

    def __init__(
        self, outcomes: trio.MemoryReceiveChannel[ForwardOutcome], *, max_per_domain: int, max_domains: int
    ) -> None:
        self._outcomes = outcomes
        self._max_per_domain = max_per_domain
        self._max_domains = max_domains
        self._domains: OrderedDict[str, _DomainStore] = OrderedDict()
        self._totals = DomainCounters()
        self._stored_bytes = 0  # of the kept outcomes' bodies
        self._started = time.monotonic()
        # Outcomes recorded so far: the live dashboard waits on it to push changes.
        self.recorded = AsyncValue(0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self._outcomes:
            async for batch in batches(self._outcomes, MAX_BATCH, linger_seconds=LINGER_SECONDS):
                for outcome in batch:
                    self.record(outcome)

    def record(self, outcome: ForwardOutcome) -> None:
        store = self._domains.get(outcome.domain)
        if store is None:
            if len(self._domains) >= self._max_domains:
                _, dropped = self._domains.popitem(last=False)
                self._stored_bytes -= sum(len(kept.body) for kept in (*dropped.successful, *dropped.failed))
            store = self._domains[outcome.domain] = _DomainStore(
                deque(maxlen=self._max_per_domain), deque(maxlen=self._max_per_domain)
            )
        else:
            self._domains.move_to_end(outcome.domain)
        for counters in (self._totals, store.counters):
            if outcome.delivery_attempt > 1:
                counters.retries += 1
            if outcome.succeeded:
                counters.successful += 1
            else:
                counters.failed += 1
                counters.given_up += not outcome.will_retry
        self.recorded.value += 1
        if outcome.succeeded:
            if outcome.delivery_attempt > 1:
                event_id = outcome.fields.get("event_id")
                kept = [failure for failure in store.failed if failure.fields.get("event_id") != event_id]
                if len(kept) != len(store.failed):
                    self._stored_bytes -= sum(len(failure.body) for failure in store.failed) - sum(
                        len(failure.body) for failure in kept
                    )
                    store.failed = deque(kept, maxlen=self._max_per_domain)
            self._keep(store.successful, outcome)
        else:
            self._keep(store.failed, outcome)
        if self._stored_bytes > MAX_STORED_BYTES:
            self._drop_oldest()

    def _keep(self, outcomes: deque[ForwardOutcome], outcome: ForwardOutcome) -> None:
        if len(outcomes) == outcomes.maxlen:
            self._stored_bytes -= len(outcomes[-1].body)  # the oldest, which appendleft drops
        outcomes.appendleft(outcome)
        self._stored_bytes += len(outcome.body)

    def _drop_oldest(self) -> None:
        """Drop outcomes until the kept events fit ``MAX_STORED_BYTES``: the least recently active domains'
        first, each domain's oldest first (its counters stay)."""
        for store in self._domains.values():
            while self._stored_bytes > MAX_STORED_BYTES and (store.successful or store.failed):
                successful, failed = store.successful, store.failed
                older = successful if successful and (not failed or successful[-1].at <= failed[-1].at) else failed
                self._stored_bytes -= len(older.pop().body)
            if self._stored_bytes <= MAX_STORED_BYTES:
                return

    def last_failure(self, domain: str, stream_sequence: int) -> ForwardOutcome | None:
        """The latest failed attempt at the event stored at ``stream_sequence``, if still kept."""
        store = self._domains.get(domain)
        if store is None:
            return None
        return next((failure for failure in store.failed if failure.stream_sequence == stream_sequence), None)

    def events(
        self, kind: EventType = "all", domain: str | None = None, limit: int = 100
    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Stored outcomes as the API shows them: by domain, newest first, ``limit`` per list."""
        stores = self._domains.items() if domain is None else [(domain, self._domains.get(domain))]
        successful: dict[str, list[dict[str, Any]]] = {}
        failed: dict[str, list[dict[str, Any]]] = {}
        for name, store in stores:
            if store is None:
                continue
            if kind in ("successful", "all") and store.successful:
                successful[name] = [outcome.as_record() for outcome in _first(store.successful, limit)]
            if kind in ("failed", "all") and store.failed:
                failed[name] = [outcome.as_record() for outcome in _first(store.failed, limit)]
        return {"events_by_domain": successful, "failed_events_by_domain": failed}

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            total_successful=self._totals.successful,
            total_failed=self._totals.failed,
            retry_count=self._totals.retries,
            given_up=self._totals.given_up,
            # Domains listed by /api/events: a retried event that finally
            # succeeded no longer makes its domain count as failed.
            successful_domain_count=sum(1 for s in self._domains.values() if s.successful),
            failed_domain_count=sum(1 for s in self._domains.values() if s.failed),
            domains={name: store.counters.as_dict() for name, store in self._domains.items()},
            stored_events=sum(len(s.successful) + len(s.failed) for s in self._domains.values()),
            uptime_seconds=round(time.monotonic() - self._started, 3),
        )


def _first(outcomes: deque[ForwardOutcome], limit: int) -> list[ForwardOutcome]:
    return [outcome for _, outcome in zip(range(limit), outcomes, strict=False)]
