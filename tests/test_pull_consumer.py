"""A domain's pull consumer against a real nats-server: what its fetches hand the forwarder."""

from __future__ import annotations

import json

import trio
from trio_asyncio import aio_as_trio

from pipeline.events import parse_event
from pipeline.nats_bridge import open_jetstream
from tests.harness import call_event, make_config

DOMAIN = "pull.example.vn"


async def test_a_fetch_returns_no_more_than_asked_and_late_deliveries_come_with_the_next(nats_server):
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        events = [parse_event(json.dumps(call_event(DOMAIN, f"call-{n}")).encode()) for n in range(5)]
        receipts = await jetstream.publish_batch(events)
        sequences = [receipt.sequence for receipt in receipts]
        consumer = await jetstream.open_consumer(DOMAIN, 16)
        # What a pull that gave up before its messages came (a 5 ms batch window on a
        # loaded machine) leaves behind: the server delivers them to the subscription
        # all the same, and nats-py's next fetch hands over every one waiting there.
        subscription = consumer._subscription
        await aio_as_trio(subscription._nc.publish)(
            subscription._nms, b'{"batch": 5, "no_wait": true}', reply=subscription._deliver
        )
        queue = subscription._sub._pending_queue

        async def wait_delivered() -> None:
            # Take the five as they arrive, and put them back in order.
            arrived = [await queue.get() for _ in range(5)]
            for message in arrived:
                queue.put_nowait(message)

        with trio.fail_after(10):
            await aio_as_trio(wait_delivered)()

        fetched: list[list[int]] = []
        for asked in (2, 2, 16):
            fetched.append([delivery.stream_sequence for delivery in await consumer.fetch(asked)])

        # The forwarder's room bounds every fetch (it fills a channel of that size
        # without waiting); what came beyond it comes with the next, once each.
        assert [len(batch) <= asked for batch, asked in zip(fetched, (2, 2, 16), strict=True)] == [True] * 3
        assert [sequence for batch in fetched for sequence in batch] == sequences
