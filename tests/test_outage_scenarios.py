"""Scenario: the NATS server goes away and comes back while the service runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from pipeline.events import consumer_name
from tests.conftest import OpenedJetStream, StartBackend
from tests.harness import NatsServer, call_event, make_config, running_service, wait_for_api

STREAM = "test-signals"


async def test_nats_outage_fails_posts_and_health_then_recovers(
    nats_server: NatsServer, start_backend: StartBackend, nursery: trio.Nursery
):
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            assert (await service.post_event(call_event("ok.vn", "before"))).status_code == 202
            await backend.wait_count(1)

            nats_server.stop()
            health = await wait_for_api(service, "/health", lambda r: r.status_code == 503)
            assert health.json()["nats"] == "disconnected"
            refused = await service.post_event(call_event("ok.vn", "during", event_id="during-1"))
            assert refused.status_code == 500
            assert refused.json()["event_id"] == "during-1"
            assert "not stored" in refused.json()["error"]

            await nursery.start(nats_server.run)
            await wait_for_api(service, "/health", lambda r: r.status_code == 200)
            # The client retries the refused event; it is stored and delivered,
            # and the consumer resumed without a restart of the service.
            assert (await service.post_event(call_event("ok.vn", "during", event_id="during-1"))).status_code == 202
            assert (await service.post_event(call_event("ok.vn", "after"))).status_code == 202
            await backend.wait_count(3)
    assert sorted(b["call_id"] for b in backend.bodies()) == ["after", "before", "during"]


async def test_frozen_broker_times_out_the_publish_and_the_retry_is_stored_once(
    nats_server: NatsServer, start_backend: StartBackend
):
    # A server that keeps its connection open but stops answering (SIGSTOP: a
    # stalled disk or VM): the client hears 500 after the publish timeout, never
    # 202, and its retry of the same event_id is stored once.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, nats={"publish_timeout_seconds": 1})
    with trio.fail_after(60):
        async with running_service(config) as service:
            with nats_server.frozen():
                refused = await service.post_event(call_event("ok.vn", "frozen", event_id="frozen-1"))
            assert refused.status_code == 500
            assert refused.json()["event_id"] == "frozen-1"
            assert "timed out" in refused.json()["error"]

            retried = await service.post_event(call_event("ok.vn", "frozen", event_id="frozen-1"))
            assert retried.status_code == 202
            await backend.wait_count(1)
            # The work queue empties once every stored copy is delivered: had the
            # retry been stored again, the backend would have had it by then.
            await wait_for_api(service, "/api/stream/messages", lambda r: r.json()["total"] == 0)
    assert [b["event_id"] for b in backend.bodies()] == ["frozen-1"]


async def test_broker_outage_mid_load_loses_no_accepted_event(
    nats_server: NatsServer, start_backend: StartBackend, nursery: trio.Nursery
):
    backend = await start_backend()
    config = make_config(nats_server.url, {"load.vn": [backend.url]})
    accepted: list[str] = []
    refused: list[int] = []
    with trio.fail_after(90):
        async with running_service(config) as service:
            numbers = iter(range(1500))
            outage_done = trio.Event()

            async def post_events() -> None:
                for n in numbers:
                    response = await service.post_event(call_event("load.vn", f"c-{n}", event_id=f"load-{n}"))
                    if response.status_code == 202:
                        accepted.append(f"load-{n}")
                    else:
                        refused.append(response.status_code)
                    if n == 500:
                        nats_server.stop()
                        await wait_for_api(service, "/health", lambda r: r.status_code == 503)
                        # Down: a POST is refused, never answered 202.
                        down = await service.post_event(call_event("load.vn", "while-down"))
                        assert down.status_code in (500, 503)
                        await nursery.start(nats_server.run)
                        outage_done.set()

            async with trio.open_nursery() as posters:
                for _ in range(8):
                    posters.start_soon(post_events)
            assert outage_done.is_set()
            await backend.count.wait_value(lambda _: set(accepted) <= {b["event_id"] for b in backend.bodies()})
    delivered = {b["event_id"] for b in backend.bodies()}
    assert not set(accepted) - delivered  # lost = 0
    assert "while-down" not in {b["call_id"] for b in backend.bodies()}
    assert set(refused) <= {500, 503}
    print(
        f"broker outage: sent 1500, accepted {len(accepted)}, refused {len(refused)}, "
        f"delivered {len(set(accepted) & delivered)}, duplicated {len(backend.bodies()) - len(delivered)}"
    )


async def test_a_closed_nats_client_is_rebuilt_and_delivery_resumes(
    nats_server: NatsServer, start_backend: StartBackend, jetstreams: list[OpenedJetStream]
):
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(30):
        async with running_service(config) as service:
            assert (await service.post_event(call_event("ok.vn", "before"))).status_code == 202
            await backend.wait_count(1)

            # Stands for the client closed for any reason (a server's -ERR, a protocol
            # violation): nats-py never reopens a closed client by itself.
            [opened] = jetstreams
            await opened.run_asyncio(opened.jetstream._client.close)
            await wait_for_api(service, "/health", lambda r: r.status_code == 200)
            assert (await service.post_event(call_event("ok.vn", "after-1"))).status_code == 202
            assert (await service.post_event(call_event("ok.vn", "after-2"))).status_code == 202
            # "before" may come again: its ack can have been cut off by the close.
            await backend.count.wait_value(lambda _: {"after-1", "after-2"} <= {b["call_id"] for b in backend.bodies()})
    assert {b["call_id"] for b in backend.bodies()} == {"after-1", "after-2", "before"}


async def test_an_event_waiting_for_its_redelivery_comes_again_once_the_server_is_back(
    nats_server: NatsServer, start_backend: StartBackend, nursery: trio.Nursery
):
    # Its domain's consumer pulls over the service's own NATS connection; when the
    # server goes away that connection breaks, and the consumer must open again on the next.
    flaky = await start_backend(lambda number, body: 500 if number == 1 else 200)
    config = make_config(
        nats_server.url, {"again.vn": [flaky.url]}, nats={"ack_wait_seconds": 3}, forwarding={"timeout_seconds": 2}
    )
    with trio.fail_after(60):
        async with running_service(config) as service:
            assert (await service.post_event(call_event("again.vn", "again-1"))).status_code == 202
            await flaky.wait_count(1)
            # The failed attempt opened the consumer; its first delivery stands for that attempt.
            await _wait_nats(
                nats_server,
                lambda consumers, _: consumers.get(consumer_name("again.vn"), {}).get("num_ack_pending") == 1,
            )

            nats_server.stop()
            await wait_for_api(service, "/health", lambda r: r.status_code == 503)
            await nursery.start(nats_server.run)
            await wait_for_api(service, "/health", lambda r: r.status_code == 200)
            await flaky.wait_count(2)
            await _wait_nats(nats_server, lambda _, messages: messages == 0)
    assert flaky.attempts_of("again-1") == [1, 2]


async def _wait_nats(nats_server: NatsServer, holds: Callable[[dict[str, dict[str, Any]], int], bool]) -> None:
    """Poll the server's monitoring endpoint until ``holds(consumers by name, messages)`` for the event stream."""
    while True:
        if holds(await nats_server.consumers(STREAM), await nats_server.stream_messages(STREAM)):
            return
        await trio.sleep(0.05)


class SilencingProxy:
    """A TCP proxy on 127.0.0.1 in front of the server: the network, which can go silent for some
    connections (a host gone or a partition: no FIN, no RST) while new ones and the others pass."""

    def __init__(self, server_port: int) -> None:
        self._server_port = server_port
        self._connections: list[tuple[bytes, trio.Event]] = []  # each: the client's first bytes, its silence
        self.port = 0

    def silence(self, first_bytes_hold: Callable[[bytes], bool]) -> int:
        """Silence the open connections whose client's first bytes (its CONNECT) ``first_bytes_hold``; how many."""
        chosen = [silenced for first, silenced in self._connections if first_bytes_hold(first)]
        for silenced in chosen:
            silenced.set()
        return len(chosen)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    async def _relay(self, client: trio.SocketStream) -> None:
        silenced = trio.Event()

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            while data := await source.receive_some():
                if silenced.is_set():
                    await trio.sleep_forever()  # read, never passed on, never closed
                await sink.send_all(data)

        async with client, await trio.open_tcp_stream("127.0.0.1", self._server_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, server, client)  # the server's INFO first
                first = await client.receive_some()  # then the client's CONNECT
                self._connections.append((first, silenced))
                await server.send_all(first)
                nursery.start_soon(pump, client, server)


async def test_a_connection_gone_silent_under_the_consumers_is_replaced_and_the_waiting_event_comes_again(
    nats_server: NatsServer, start_backend: StartBackend, nursery: trio.Nursery
):
    # The consumers pull over the service's own NATS connection. When it went silent (no FIN, no
    # RST) while nats-py's stayed up, an unanswered pull re-opened the consumer on the same dead
    # connection, again and again: only a POST's publish timing out replaced it (or the kernel,
    # after ~15 minutes of retransmissions), and the waiting event never came.
    proxy = SilencingProxy(int(nats_server.url.rpartition(":")[2]))
    await nursery.start(proxy.run)
    flaky = await start_backend(lambda number, body: 500 if number == 1 else 200)
    config = make_config(
        f"nats://127.0.0.1:{proxy.port}",
        {"again.vn": [flaky.url]},
        nats={"ack_wait_seconds": 3, "max_deliveries": 10, "publish_timeout_seconds": 1},
        forwarding={"timeout_seconds": 2},
    )
    with trio.fail_after(120):  # before the fix: no redelivery for as long as the connection stayed silent
        async with running_service(config) as service:
            assert (await service.post_event(call_event("again.vn", "again-1"))).status_code == 202
            await flaky.wait_count(1)
            await _wait_nats(  # the consumer has it, waiting for its redelivery
                nats_server,
                lambda consumers, _: consumers.get(consumer_name("again.vn"), {}).get("num_ack_pending") == 1,
            )
            # The hot path's connection (nats-py's says its own version in its CONNECT).
            assert proxy.silence(lambda connect: b'"version": "telephony-forwarder"' in connect) == 1
            await flaky.wait_count(2)
            health = await service.client.get(f"{service.url}/health")
    assert flaky.attempts_of("again-1")[:2] == [1, 2]
    assert health.status_code == 200
