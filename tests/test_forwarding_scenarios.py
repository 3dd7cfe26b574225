"""Scenarios: events through a real nats-server to real HTTP backends.

Each runs with both webhook transports (``forwarding.http_transport``): the lean
default and httpx's.
"""

from __future__ import annotations

import json
from functools import partial

import trio
from structlog.testing import capture_logs

from pipeline.events import consumer_name
from tests.conftest import OpenedJetStream, StartBackend
from tests.harness import (
    HANG,
    Backend,
    NatsServer,
    call_event,
    free_port,
    make_config,
    running_service,
    serve_backend,
    wait_for_api,
)

SCENARIO_TIMEOUT = 30


async def test_event_fans_out_to_every_endpoint_of_its_domain(
    nats_server, http_transport: str, start_backend: StartBackend
):
    first, second = await start_backend(), await start_backend()
    config = make_config(
        nats_server.url, {"vietanh.cloudgo.vn": [first.url, second.url]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            response = await service.post_event(call_event("vietanh.cloudgo.vn", "call-1"))
            assert response.status_code == 202
            answer = response.json()
            assert answer["status"] == "accepted" and answer["sequence"] == 1
            await first.wait_count(1)
            await second.wait_count(1)
    for backend in (first, second):
        [request] = backend.received
        assert request.body == call_event("vietanh.cloudgo.vn", "call-1") | {
            "event_id": answer["event_id"],
            "delivery_attempt": 1,
        }
        assert request.headers["content-type"] == "application/json"
        assert request.headers["idempotency-key"] == f"vietanh.cloudgo.vn:{answer['event_id']}"
        assert request.headers["user-agent"] == "telephony-forwarder"


async def test_a_delivery_attempt_sent_by_the_client_is_replaced_not_repeated(
    nats_server, http_transport: str, start_backend: StartBackend
):
    # The forwarder adds delivery_attempt to what the ingress stored; a client's own
    # key of that name must give way, not appear twice in the body.
    backend = await start_backend()
    config = make_config(
        nats_server.url, {"vietanh.cloudgo.vn": [backend.url]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            event = call_event("vietanh.cloudgo.vn", "call-1") | {"delivery_attempt": 7}
            assert (await service.post_event(event)).status_code == 202
            await backend.wait_count(1)
    [raw] = backend.raw_bodies
    assert raw.count(b'"delivery_attempt"') == 1
    assert json.loads(raw)["delivery_attempt"] == 1


async def test_domains_with_dots_reach_only_their_own_endpoints(
    nats_server, http_transport: str, start_backend: StartBackend
):
    cloudgo, example = await start_backend(), await start_backend()
    config = make_config(
        nats_server.url,
        {"vietanh.cloudgo.vn": [cloudgo.url], "a.b.example.com": [example.url]},
        forwarding={"http_transport": http_transport},
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            for n in range(3):
                assert (await service.post_event(call_event("vietanh.cloudgo.vn", f"vn-{n}"))).status_code == 202
                assert (await service.post_event(call_event("A.B.Example.com", f"ex-{n}"))).status_code == 202
            await cloudgo.wait_count(3)
            await example.wait_count(3)
    assert sorted(b["call_id"] for b in cloudgo.bodies()) == ["vn-0", "vn-1", "vn-2"]
    assert sorted(b["call_id"] for b in example.bodies()) == ["ex-0", "ex-1", "ex-2"]
    # The domain is forwarded as the client spelled it.
    assert {b["domain"] for b in example.bodies()} == {"A.B.Example.com"}


async def test_unrouted_domain_waits_in_the_stream_until_it_has_a_route(
    nats_server, http_transport: str, start_backend: StartBackend
):
    backend = await start_backend()
    with trio.fail_after(SCENARIO_TIMEOUT):
        with capture_logs() as logs:
            async with running_service(
                make_config(nats_server.url, {}, forwarding={"http_transport": http_transport})
            ) as service:
                for n in range(2):
                    assert (await service.post_event(call_event("late.example.vn", f"late-{n}"))).status_code == 202
        assert backend.count.value == 0
        warnings = [record for record in logs if record["event"].startswith("No route for domain")]
        assert [w["domain"] for w in warnings] == ["late.example.vn"]  # once, not per event
        # Restart with a route for it: the waiting events are delivered.
        async with running_service(
            make_config(
                nats_server.url, {"late.example.vn": [backend.url]}, forwarding={"http_transport": http_transport}
            )
        ):
            await backend.wait_count(2)
    assert sorted(b["call_id"] for b in backend.bodies()) == ["late-0", "late-1"]
    assert {b["delivery_attempt"] for b in backend.bodies()} == {1}


async def test_failing_endpoint_gets_redeliveries_until_all_succeed(
    nats_server, http_transport: str, start_backend: StartBackend
):
    steady = await start_backend()
    flaky = await start_backend(lambda number, body: 500 if number <= 2 else 200)
    config = make_config(
        nats_server.url, {"flaky.example": [steady.url, flaky.url]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            await service.post_event(call_event("flaky.example", "retry-1"))
            await flaky.wait_count(3)
            await steady.wait_count(3)
            await _wait_settled(nats_server, "test-signals")
    # Both endpoints see every attempt; the event is acked once all answered 2xx.
    assert flaky.attempts_of("retry-1") == [1, 2, 3]
    assert steady.attempts_of("retry-1") == [1, 2, 3]
    state = await nats_server.consumer_state("test-signals", consumer_name("flaky.example"))
    assert state["ack_floor"]["stream_seq"] == 1


async def test_always_failing_endpoint_gets_exactly_max_deliveries(
    nats_server, http_transport: str, start_backend: StartBackend
):
    broken = await start_backend(lambda number, body: 503)
    config = make_config(
        nats_server.url, {"broken.example": [broken.url]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("broken.example", "doomed"))
            await broken.wait_count(3)
            # The event left the work queue as a dead letter: no fourth attempt can come.
            await _wait_settled(nats_server, "test-signals")
            await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)
    assert broken.attempts_of("doomed") == [1, 2, 3]
    failures = [record for record in logs if record["event"] == "Failed to forward event"]
    assert [(f["delivery_attempt"], f["will_retry"]) for f in failures] == [(1, True), (2, True), (3, False)]
    assert failures[0]["errors"] == {broken.url: "HTTP 503"}
    [given_up] = [record for record in logs if record["event"].startswith("Event given up after last delivery attempt")]
    assert given_up["call_id"] == "doomed" and given_up["delivery_attempt"] == 3


async def _answer_garbage(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some()
        await stream.send_all(b"this is not HTTP\r\n\r\n")


async def test_refusing_and_non_http_endpoints_count_as_failures(
    nats_server, http_transport: str, start_backend: StartBackend, nursery: trio.Nursery
):
    good = await start_backend()
    [listener] = await nursery.start(partial(trio.serve_tcp, _answer_garbage, 0, host="127.0.0.1"))
    garbage = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/webhook"
    refusing = f"http://127.0.0.1:{free_port()}/webhook"  # nothing listens there
    config = make_config(
        nats_server.url, {"mixed.example": [good.url, garbage, refusing]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("mixed.example", "mixed-1"))
            await good.wait_count(2)  # the failure is redelivered to every endpoint
    assert good.attempts_of("mixed-1")[:2] == [1, 2]
    failure = next(record for record in logs if record["event"] == "Failed to forward event")
    assert set(failure["errors"]) == {garbage, refusing}
    assert failure["errors"][garbage].startswith("RemoteProtocolError")
    assert failure["errors"][refusing].startswith("ConnectError")


async def test_endpoint_timeout_counts_as_failure(nats_server, http_transport: str, start_backend: StartBackend):
    slow = await start_backend(lambda number, body: HANG if number == 1 else 200)
    config = make_config(nats_server.url, {"slow.example": [slow.url]}, forwarding={"http_transport": http_transport})
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("slow.example", "slow-1"))
            await slow.wait_count(2)
    assert slow.attempts_of("slow-1") == [1, 2]
    assert slow.completed.value == 1
    [failure] = [record for record in logs if record["event"] == "Failed to forward event"]
    assert failure["errors"][slow.url].startswith("timeout")


async def test_hanging_domain_does_not_delay_another_domain(
    nats_server, http_transport: str, start_backend: StartBackend, nursery: trio.Nursery
):
    # The hanging backend holds every request open until released, and the
    # timeouts are far away, so the order of what happened is the assertion:
    # all healthy deliveries complete while the hanging requests are still open.
    release = trio.Event()
    hanging = Backend(release=release)
    await nursery.start(serve_backend, hanging)
    healthy = await start_backend()
    config = make_config(
        nats_server.url,
        {"hanging.example": [hanging.url], "healthy.example": [healthy.url]},
        forwarding={"timeout_seconds": 60.0, "max_in_flight_per_domain": 8, "http_transport": http_transport},
        nats={"ack_wait_seconds": 61.0},
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            # Far more than the hanging domain's in-flight limit. The first few are
            # forwarded straight from the ingress; the rest wait in the stream for the
            # domain's consumer, which opens while those still hang and fills the
            # domain's in-flight limit (not once they time out: that holds the
            # domain's next events back, and sends them all at once).
            for n in range(40):
                await service.post_event(call_event("hanging.example", f"stuck-{n}"))
            await hanging.wait_count(8)
            for n in range(40):
                await service.post_event(call_event("healthy.example", f"fine-{n}"))
            await healthy.completed.wait_value(lambda done: done >= 40)
            # Delivered while the hanging domain's first requests were open, and
            # that domain took no more than its limit meanwhile.
            open_hanging, answered_hanging = hanging.count.value, hanging.completed.value
            release.set()
            # The held requests were still open: they complete now, on their first attempt
            # (those taken from the ingress are not sent again by the consumer); then the
            # consumer takes the rest, at most 8 at once.
            await hanging.completed.wait_value(lambda done: done >= 40)
    assert (open_hanging, answered_hanging) == (8, 0)
    assert sorted(healthy.attempts_of(f"fine-{n}")[0] for n in range(40)) == [1] * 40
    assert [body["delivery_attempt"] for body in hanging.bodies()] == [1] * 40
    assert hanging.most_open <= 8


async def _wait_settled(nats_server: NatsServer, stream: str) -> None:
    """Wait until the stream holds no event: each was acknowledged or dropped."""
    while True:
        if await nats_server.stream_messages(stream) == 0:
            return
        await trio.sleep(0.05)


async def test_a_stored_event_with_nan_is_never_forwarded_as_invalid_json(
    nats_server, http_transport: str, start_backend: StartBackend, jetstreams: list[OpenedJetStream]
):
    # The ingress refuses NaN now; an older version stored such events as they came.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, forwarding={"http_transport": http_transport})
    stored_by_an_older_version = b'{"domain":"ok.vn","call_id":"legacy","duration":NaN,"event_id":"legacy-1"}'
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            await jetstreams[0].publish_elsewhere("ok.vn", stored_by_an_older_version)
            assert (await service.post_event(call_event("ok.vn", "after"))).json()["sequence"] == 2
            await backend.wait_count(1)
            await _wait_settled(nats_server, config.nats.stream_name)  # the legacy one too
            health = await service.client.get(f"{service.url}/health")
    assert [b["call_id"] for b in backend.bodies()] == ["after"]
    assert b"NaN" not in b"".join(backend.raw_bodies)
    assert health.status_code == 200


async def test_stored_messages_that_are_not_events_are_dropped_and_the_service_goes_on(
    nats_server, start_backend: StartBackend, jetstreams: list[OpenedJetStream]
):
    # Published to the subject by something else: not JSON, not an object, and "\ud800"
    # (the ingress refuses it: no UTF-8 can carry it), whose writing out raised in the forwarder.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    published_elsewhere = [
        b"not json at all",
        b'["ok.vn"]',
        b'{"domain":"ok.vn","call_id":"\\ud800","event_id":"elsewhere-1"}',
    ]
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            for message in published_elsewhere:
                await jetstreams[0].publish_elsewhere("ok.vn", message)
            assert (await service.post_event(call_event("ok.vn", "after"))).json()["sequence"] == 4
            await backend.wait_count(1)
            await _wait_settled(nats_server, config.nats.stream_name)  # the ones published elsewhere too
            health = await service.client.get(f"{service.url}/health")
    assert [b["call_id"] for b in backend.bodies()] == ["after"]
    assert health.status_code == 200
    dropped = [entry for entry in logs if entry["event"] == "Dropping unreadable message"]
    assert len(dropped) == 3
    assert any("surrogate" in entry["error"] for entry in dropped)
