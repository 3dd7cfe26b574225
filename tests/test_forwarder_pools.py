"""The forwarder's connection pools: one per endpoint, closed once the route drops it and its last request ends."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import trio

from actors.forwarder import Forwarder
from actors.stats import ForwardOutcome
from pipeline.config import ForwardingConfig
from pipeline.nats_bridge import Delivery
from pipeline.routes import Endpoint, open_routes
from tests.conftest import StartRawBackend
from tests.harness import WireRequests, call_event

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
DOMAIN = "pools.example"


def delivery(sequence: int) -> Delivery:
    data = json.dumps(call_event(DOMAIN, f"call-{sequence}")).encode()
    return Delivery(data, 1, sequence, datetime.now(UTC), handle=None)


async def test_a_removed_endpoints_pool_closes_once_its_last_request_ends(
    start_raw_backend: StartRawBackend, http_transport: str
):
    arrived, release, closed = trio.Event(), trio.Event(), trio.Event()

    async def held_until_released(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while await requests.next() is not None:
            arrived.set()
            await release.wait()
            await stream.send_all(OK)
        closed.set()  # the forwarder closed the kept-alive connection

    async def answering(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while await requests.next() is not None:
            await stream.send_all(OK)

    old_url = await start_raw_backend(held_until_released)
    new_url = await start_raw_backend(answering)
    routes = open_routes({DOMAIN: (Endpoint(old_url),)})
    inbox, deliveries = trio.open_memory_channel[Delivery](8)
    acks, acked = trio.open_memory_channel[Delivery](8)
    outcomes, outcomes_received = trio.open_memory_channel[ForwardOutcome](8)
    room = trio.Semaphore(8)
    forwarder = Forwarder(
        DOMAIN,
        deliveries,
        acks,
        outcomes,
        room,
        routes,
        ForwardingConfig(timeout_seconds=10, http_transport=http_transport),
        max_deliveries=3,
        grace_seconds=5,
        tls=httpx.create_ssl_context(),
    )

    async def forward(sequence: int) -> None:
        await room.acquire()
        await inbox.send(delivery(sequence))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            await forward(1)
            await arrived.wait()  # the old endpoint holds event 1
            # Held here, so only closing it, not the garbage collector, can close its connection.
            old_pool = forwarder._pools[old_url]
            routes.value = {DOMAIN: (Endpoint(new_url),)}
            for sequence in (2, 3):  # the second attempt after the change retires the old pool
                await forward(sequence)
                outcome = await outcomes_received.receive()
                assert (outcome.stream_sequence, outcome.errors) == (sequence, None)
            assert not closed.is_set()  # its request still runs: the pool stays open
            release.set()
            outcome = await outcomes_received.receive()
            assert (outcome.stream_sequence, outcome.errors) == (1, None)
            await closed.wait()  # closed once that request ended, while the forwarder runs on
            inbox.close()
    assert sorted([(await acked.receive()).stream_sequence for _ in range(3)]) == [1, 2, 3]
    assert old_pool.retired and old_pool.active == 0
