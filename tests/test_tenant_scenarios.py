"""Scenarios: many routed tenants; only those with work hold a consumer."""

from __future__ import annotations

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from actors import backlog_monitor, subscriber
from pipeline.events import consumer_name
from tests.conftest import StartBackend
from tests.harness import call_event, make_config, running_service, wait_for_api

STREAM = "test-signals"


def _nothing_consuming(response: httpx.Response) -> bool:
    return response.json()["consuming_domains"] == 0


async def test_only_domains_whose_events_wait_in_the_stream_hold_a_consumer(nats_server, start_backend: StartBackend):
    # Regression: every routed domain held a consumer and long-polled it every
    # 5 s, so idle tenants cost CPU, and on a cluster a raft group each; then every
    # first event of a quiet domain made one, and nats-server asks every consumer
    # of the stream at each ack whether it still needs the message.
    backend = await start_backend()
    backend.release = first_held = trio.Event()
    routes = {f"tenant-{n}.vn": [backend.url] for n in range(50)}
    config = make_config(
        nats_server.url,
        routes,
        nats={"consumer_idle_seconds": 0.2},
        forwarding={"max_in_flight_per_domain": 1},
    )
    with trio.fail_after(60):
        async with running_service(config) as service:
            idle = await nats_server.consumers(STREAM)
            assert (await service.post_event(call_event("tenant-7.vn", "first"))).status_code == 202
            await backend.wait_count(1)
            # Being forwarded, straight from the ingress: no consumer.
            from_ingress = await nats_server.consumers(STREAM)
            # No room for the next one: it waits in the stream for the domain's consumer.
            assert (await service.post_event(call_event("tenant-7.vn", "second"))).status_code == 202
            backend.release = second_held = trio.Event()
            first_held.set()
            await backend.wait_count(2)
            fetched = await nats_server.consumers(STREAM)
            second_held.set()
            await wait_for_api(service, "/api/stats", _nothing_consuming)
            after = await nats_server.consumers(STREAM)
            left = await nats_server.stream_messages(STREAM)
    assert idle == {}
    assert from_ingress == {}
    assert list(fetched) == [consumer_name("tenant-7.vn")]
    # The waiting event; and the first, if the consumer fetched it before its deletion
    # (acks linger 50 ms to go in batches) landed: left unacked, it is never redelivered.
    assert fetched[consumer_name("tenant-7.vn")]["num_ack_pending"] in (1, 2)
    assert after == {}
    assert left == 0
    assert [body["call_id"] for body in backend.bodies()] == ["first", "second"]


async def test_a_domain_that_keeps_up_is_served_from_the_ingress_while_its_deletions_linger(
    nats_server, start_backend: StartBackend
):
    # Regression: an event counted as in flight until its deletion was answered, and
    # deletions linger 50 ms to go in batches, so a domain with a few events in 50 ms,
    # each forwarded in a moment, looked behind and went to a consumer (a fetch loop,
    # and a consumer for nats-server to keep) for no backlog at all.
    backend = await start_backend()
    config = make_config(nats_server.url, {"tenant-1.vn": [backend.url]})
    with trio.fail_after(30):
        async with running_service(config) as service:
            for n in range(12):
                assert (await service.post_event(call_event("tenant-1.vn", f"call-{n}"))).status_code == 202
                await backend.wait_count(n + 1)
            consumers = await nats_server.consumers(STREAM)
    assert consumers == {}
    assert [body["call_id"] for body in backend.bodies()] == [f"call-{n}" for n in range(12)]


async def test_a_consumer_holding_an_unacknowledged_event_is_kept_so_its_deliveries_still_count(
    nats_server, start_backend: StartBackend
):
    # Between attempts the domain has nothing in flight and its fetches come back
    # empty (ack_wait is longer than an idle fetch), yet the consumer holds the
    # event: deleting it would restart the count, and the event would never be
    # dead-lettered.
    backend = await start_backend(lambda number, body: 503)
    config = make_config(
        nats_server.url,
        {"down.vn": [backend.url]},
        nats={"consumer_idle_seconds": 0.1, "ack_wait_seconds": 5.5, "max_deliveries": 3},
    )
    with trio.fail_after(60):
        async with running_service(config) as service:
            assert (await service.post_event(call_event("down.vn", "refused"))).status_code == 202
            letters = await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)
    assert backend.attempts_of("refused") == [1, 2, 3]
    assert letters.json()["dead_letters"][0]["delivery_attempts"] == 3


async def test_an_event_another_instance_stored_wakes_its_domain_here(nats_server, start_backend: StartBackend):
    # The storing instance wakes its own consumers at once; the others learn of
    # the event from their next reading of the stream's backlog.
    backend = await start_backend()
    storing = make_config(nats_server.url, {})
    serving = make_config(nats_server.url, {"far.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(serving), running_service(storing) as other:
            assert (await other.post_event(call_event("far.vn", "via-other"))).status_code == 202
            await backend.wait_count(1)
    assert [body["call_id"] for body in backend.bodies()] == ["via-other"]


async def test_a_sparse_domains_next_event_comes_with_the_wake(
    nats_server, start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch
):
    # A domain whose events come further apart than a fetch lingers keeps no fetch
    # waiting after its event: its next one must come with the ingress's wake.
    monkeypatch.setattr(subscriber, "IDLE_FETCH_SECONDS", 0.0)  # every domain counts as sparse
    monkeypatch.setattr(subscriber, "INGRESS_MAX_IN_FLIGHT", 0)  # every event goes through the consumer
    monkeypatch.setattr(backlog_monitor, "POLL_SECONDS", 3600.0)  # no reading of the stream after the first
    backend = await start_backend()
    config = make_config(nats_server.url, {"sparse.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            for n in range(1, 4):
                assert (await service.post_event(call_event("sparse.vn", f"call-{n}"))).status_code == 202
                await backend.completed.wait_value(n)
    assert [body["call_id"] for body in backend.bodies()] == ["call-1", "call-2", "call-3"]


async def test_a_forwarder_fed_from_the_ingress_ends_when_idle_and_starts_again(
    nats_server, start_backend: StartBackend
):
    # A quiet tenant's events never need a consumer: its forwarder starts with an
    # event, ends after consumer_idle_seconds without one, and the next starts it again.
    backend = await start_backend()
    config = make_config(nats_server.url, {"quiet.vn": [backend.url]}, nats={"consumer_idle_seconds": 0.2})
    with trio.fail_after(60), capture_logs() as logs:
        async with running_service(config) as service:
            assert (await service.post_event(call_event("quiet.vn", "first"))).status_code == 202
            await backend.completed.wait_value(1)
            await wait_for_api(service, "/api/stats", _nothing_consuming)
            assert (await service.post_event(call_event("quiet.vn", "second"))).status_code == 202
            await backend.completed.wait_value(2)
            await wait_for_api(service, "/api/stats", _nothing_consuming)
            consumers = await nats_server.consumers(STREAM)
            left = await nats_server.stream_messages(STREAM)
    assert consumers == {}
    assert [entry for entry in logs if entry["event"] == "Consuming" and "quiet" in entry["consumer"]] == []
    assert left == 0
    assert [(body["call_id"], body["delivery_attempt"]) for body in backend.bodies()] == [("first", 1), ("second", 1)]
