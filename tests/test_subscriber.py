"""Unit tests of the subscriber's own logic (in-process, on a mock clock)."""

from __future__ import annotations

from typing import cast

import trio
import trio.testing
from structlog.testing import capture_logs
from trio_util import AsyncValue

from actors.subscriber import UNCONSUMABLE_REPORT_SECONDS, Subscriber
from pipeline.config import Config
from pipeline.events import parse_event
from pipeline.nats_bridge import ConsumeFailure, JetStream, NatsUnavailable
from pipeline.routes import Endpoint, open_routes


async def test_domains_that_cannot_be_consumed_are_reported_together_once_an_interval(
    autojump_clock: trio.testing.MockClock,
):
    acks, _ = trio.open_memory_channel(0)
    outcomes, _ = trio.open_memory_channel(0)
    subscriber = Subscriber(cast(JetStream, None), AsyncValue({}), acks, outcomes, Config(), trio.Event())
    for domain in ("a.vn", "b.vn"):
        subscriber._report_consuming(domain, ConsumeFailure("maximum consumers limit reached", 7))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber._report_unconsumable)
            # Three intervals of failures, however many failed opens happen meanwhile.
            await trio.sleep(2.5 * UNCONSUMABLE_REPORT_SECONDS)
            subscriber._report_consuming("a.vn", None)
            subscriber._report_consuming("b.vn", None)
            # Nothing fails any more: nothing more is said.
            await trio.sleep(3 * UNCONSUMABLE_REPORT_SECONDS)
            nursery.cancel_scope.cancel()
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["2 routed domains cannot be consumed"] * 3
    assert warnings[0]["examples"] == {
        "a.vn": "maximum consumers limit reached",
        "b.vn": "maximum consumers limit reached",
    }


async def test_dormant_domains_end_when_their_route_goes_and_when_the_service_stops():
    # A dormant domain waits on its wake event alone: the route going and the
    # service stopping must set it, or its task outlives the route (or the stop hangs).
    acks, _ = trio.open_memory_channel(0)
    outcomes, _ = trio.open_memory_channel(0)
    endpoint = (Endpoint("http://127.0.0.1:9/"),)
    routes = open_routes({"a.vn": endpoint, "b.vn": endpoint})
    stopping = trio.Event()
    # Dormant domains never touch NATS: no JetStream is needed.
    subscriber = Subscriber(cast(JetStream, None), routes, acks, outcomes, Config(), stopping)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber.run)
            assert set(subscriber._domains) == {"a.vn", "b.vn"}
            routes.value = {"b.vn": endpoint}
            await trio.testing.wait_all_tasks_blocked()
            assert set(subscriber._domains) == {"b.vn"}
            stopping.set()
    assert subscriber._domains == {}


async def test_a_backlog_reading_does_not_wake_a_domain_for_events_it_has_from_the_ingress():
    # Readings of the backlog come over nats-py's connection, publishes and deletions
    # over another: a reading can count an event whose publish answer the ingress
    # has not read yet, or one deleted while the reading was on its way. Taken for
    # events waiting in the stream, they would open a consumer for nothing.
    acks, _ = trio.open_memory_channel(0)
    outcomes, _ = trio.open_memory_channel(0)
    endpoint = (Endpoint("http://127.0.0.1:9/"),)
    subscriber = Subscriber(
        cast(JetStream, None), open_routes({"a.vn": endpoint}), acks, outcomes, Config(), trio.Event()
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber.run)
            state = subscriber._domains["a.vn"]
            subscriber.storing("a.vn")
            subscriber.begin_reading()({"a.vn": 1})
            assert not state.woken.is_set()
            # Not stored after all (a refusal): nothing of it waits.
            subscriber.stored("a.vn", NatsUnavailable("timed out"), parse_event(b'{"domain": "a.vn"}'))
            subscriber.begin_reading()({"a.vn": 0})
            assert not state.woken.is_set()
            # Deleted by the domain's intake while the reading was on its way.
            reading = subscriber.begin_reading()
            state.removed += 1
            reading({"a.vn": 1})
            assert not state.woken.is_set()
            # One the domain does not have waits for its consumer.
            subscriber.begin_reading()({"a.vn": 1})
            assert state.woken.is_set() and state.consumer_wanted
            nursery.cancel_scope.cancel()
