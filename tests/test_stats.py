"""Unit tests: the stats collector's store stays bounded and its counters exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import trio

from actors import stats
from actors.stats import ForwardOutcome, StatsCollector


def outcome(domain: str, number: int, attempt: int = 1, failed: bool = False, padding: str = "") -> ForwardOutcome:
    event = {"domain": domain, "call_id": f"call-{number}", "event_id": f"{domain}-{number}", "padding": padding}
    return ForwardOutcome(
        domain=domain,
        fields={"call_id": event["call_id"], "event_id": event["event_id"]},
        body=json.dumps(event | {"delivery_attempt": attempt}).encode(),
        delivery_attempt=attempt,
        max_deliveries=3,
        at=datetime.now(UTC),
        errors={"http://127.0.0.1:1/": "HTTP 500"} if failed else None,
    )


async def test_store_stays_bounded_over_many_events_and_domains():
    send, receive = trio.open_memory_channel[ForwardOutcome](64)
    collector = StatsCollector(receive, max_per_domain=10, max_domains=50)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        async with send:
            for number in range(20_000):
                domain = f"tenant-{number % 500}.vn"
                await send.send(outcome(domain, number, failed=number % 4 == 0))
    stats = collector.statistics()
    assert stats.total_successful == 15_000 and stats.total_failed == 5_000  # exact, whatever was dropped
    assert len(stats.domains) == 50
    assert stats.stored_events <= 50 * 20
    # The most recently active domains are the ones kept.
    assert set(stats.domains) == {f"tenant-{n}.vn" for n in range(450, 500)}
    events = collector.events()
    assert all(len(records) <= 10 for records in events["events_by_domain"].values())
    assert all(len(records) <= 10 for records in events["failed_events_by_domain"].values())


async def test_a_later_success_replaces_the_events_failures():
    send, receive = trio.open_memory_channel[ForwardOutcome](8)
    collector = StatsCollector(receive, max_per_domain=100, max_domains=10)
    collector.record(outcome("a.vn", 1, attempt=1, failed=True))
    collector.record(outcome("a.vn", 2, attempt=1, failed=True))
    collector.record(outcome("a.vn", 1, attempt=2))
    events = collector.events("all", "a.vn")
    assert [r["event_id"] for r in events["failed_events_by_domain"]["a.vn"]] == ["a.vn-2"]
    assert [(r["event_id"], r["delivery_attempt"]) for r in events["events_by_domain"]["a.vn"]] == [("a.vn-1", 2)]
    stats = collector.statistics()
    assert (stats.total_successful, stats.total_failed, stats.retry_count) == (1, 2, 1)


async def test_the_events_kept_stay_within_the_byte_budget_the_least_recently_active_domains_first(monkeypatch):
    # Events of up to 1 MiB each: the record limits alone let the store hold ~200 GiB.
    monkeypatch.setattr(stats, "MAX_STORED_BYTES", 10_000)
    send, receive = trio.open_memory_channel[ForwardOutcome](8)
    collector = StatsCollector(receive, max_per_domain=100, max_domains=10)
    padding = "x" * 900
    for number in range(30):
        collector.record(outcome(f"tenant-{number % 3}.vn", number, failed=number % 2 == 1, padding=padding))
    kept = collector.events()
    records = [r for lists in kept.values() for records in lists.values() for r in records]
    assert sum(len(json.dumps(r["event"])) for r in records) <= 10_000
    # The newest outcomes are kept; the oldest of the least recently active domain went first.
    assert sorted(int(r["call_id"].removeprefix("call-")) for r in records) == list(range(21, 30))
    assert collector.statistics().total_successful == 15  # exact, whatever was dropped
