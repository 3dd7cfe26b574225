"""A domain's pull consumer against a real nats-server: what its fetches hand the forwarder."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from trio_asyncio import aio_as_trio

from pipeline import nats_bridge
from pipeline.events import consumer_name, parse_event
from pipeline.nats_bridge import JetStream, NatsUnavailable, domain_consumer_config, open_jetstream
from tests.harness import call_event, make_config

DOMAIN = "pull.example.vn"


async def publish(jetstream: JetStream, *call_ids: str) -> list[int]:
    events = [parse_event(json.dumps(call_event(DOMAIN, call_id)).encode()) for call_id in call_ids]
    return [receipt.sequence for receipt in await jetstream.publish_batch(events)]


async def test_a_fetch_returns_no_more_than_asked_and_what_waits_comes_with_the_next(nats_server):
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        sequences = await publish(jetstream, *(f"call-{n}" for n in range(5)))
        consumer = await jetstream.open_consumer(DOMAIN, 16)
        fetched: list[list[int]] = []
        with trio.fail_after(10):
            for asked in (2, 2, 16):
                fetched.append([delivery.stream_sequence for delivery in await consumer.fetch(asked)])

        # The forwarder's room bounds every fetch (it fills a channel of that size
        # without waiting); every event comes once, in order, as its first delivery.
        assert [len(batch) <= asked for batch, asked in zip(fetched, (2, 2, 16), strict=True)] == [True] * 3
        assert [sequence for batch in fetched for sequence in batch] == sequences
        assert not consumer.more_waiting


async def test_an_event_delivered_to_a_fetch_given_up_comes_with_the_next_not_after_ack_wait(nats_server):
    # ack_wait far beyond the test's limit: an event lost to the abandoned fetch would come too late.
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}, nats={"ack_wait_seconds": 600}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        consumer = await jetstream.open_consumer(DOMAIN, 16)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer.fetch, 16)  # long-polls: nothing is stored yet
                await trio.testing.wait_all_tasks_blocked()
                await (await jetstream._requests_link()).flush()  # the server holds the pull
                nursery.cancel_scope.cancel()
            [sequence] = await publish(jetstream, "call-late")
            deliveries = await consumer.fetch(16)

        assert [(delivery.stream_sequence, delivery.delivery_attempt) for delivery in deliveries] == [(sequence, 1)]


async def test_a_long_poll_that_expires_returns_nothing_and_the_next_takes_the_next_event(nats_server, monkeypatch):
    monkeypatch.setattr(nats_bridge, "IDLE_FETCH_SECONDS", 0.2)
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        consumer = await jetstream.open_consumer(DOMAIN, 16)
        with trio.fail_after(10):
            expired = await consumer.fetch(16)
            [sequence] = await publish(jetstream, "call-after")
            deliveries = await consumer.fetch(16)

        assert expired == []
        assert [delivery.stream_sequence for delivery in deliveries] == [sequence]


async def test_a_consumer_deleted_on_the_server_ends_the_waiting_fetch_with_an_error(nats_server):
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        consumer = await jetstream.open_consumer(DOMAIN, 16)

        async def delete_once_pulling() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await (await jetstream._requests_link()).flush()
            await aio_as_trio(jetstream._context.delete_consumer)(config.stream_name, consumer_name(DOMAIN))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delete_once_pulling)
                with pytest.raises(NatsUnavailable, match="409 Consumer Deleted"):
                    await consumer.fetch(16)


async def test_acks_reach_the_server_though_nothing_answers_them(nats_server):
    # Sent just before the connection closes (which flushes it first: over a network,
    # closing a socket with unread data resets it and drops what it had yet to send).
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        await publish(jetstream, *(f"call-{n}" for n in range(3)))
        consumer = await jetstream.open_consumer(DOMAIN, 16)
        with trio.fail_after(10):
            deliveries = await consumer.fetch(1)
            deliveries += await consumer.fetch(16)
        await jetstream.ack_batch(deliveries)

    state = await nats_server.consumer_state(config.stream_name, consumer_name(DOMAIN))
    assert len(deliveries) == 3
    assert (state["num_ack_pending"], state["num_pending"], state["delivered"]["stream_seq"]) == (0, 0, 3)


async def test_a_consumer_at_its_max_ack_pending_fetches_nothing_until_acks_free_room(nats_server):
    # A dead backend's events wait out ack_wait unacknowledged; at max_ack_pending
    # the server delivers no more, and answers a pull that asked for no waiting not
    # at all: such a fetch must come back empty, not fail and re-open the consumer.
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}, nats={"publish_timeout_seconds": 1}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        sequences = await publish(jetstream, *(f"call-{n}" for n in range(4)))
        limited = domain_consumer_config(config, DOMAIN, 16)
        limited.max_ack_pending = 2
        consumer = await jetstream._open(config.stream_name, limited)
        with trio.fail_after(10):
            taken = await consumer.fetch(1)
            taken += await consumer.fetch(16)
            held_back = await consumer.fetch(16)
            await jetstream.ack_batch(taken)
            rest = await consumer.fetch(16)
            rest += await consumer.fetch(16)

        assert [delivery.stream_sequence for delivery in taken] == sequences[:2]
        assert held_back == []
        assert [delivery.stream_sequence for delivery in rest] == sequences[2:]
