"""Scenarios: events that use up their deliveries are kept, listed, replayed or discarded."""

from __future__ import annotations

import dataclasses
import json

import trio
from nats.js import api

from pipeline import nats_bridge
from tests.conftest import OpenedJetStream, StartBackend
from tests.harness import HANG, call_event, make_config, running_service, wait_for_api


async def test_given_up_event_is_kept_and_can_be_replayed_or_discarded(nats_server, start_backend: StartBackend):
    backend_up = {"value": False}
    backend = await start_backend(lambda number, body: 200 if backend_up["value"] else 503)
    config = make_config(nats_server.url, {"flaky.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            first = (await service.post_event(call_event("flaky.vn", "lost-1"))).json()["event_id"]
            second = (await service.post_event(call_event("flaky.vn", "lost-2"))).json()["event_id"]
            letters = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 2)).json()[
                "dead_letters"
            ]
            by_event = {letter["event_id"]: letter for letter in letters}
            assert by_event[first]["delivery_attempts"] == 3
            assert by_event[first]["errors"] == {backend.url: "HTTP 503"}
            assert by_event[first]["event"]["call_id"] == "lost-1"
            assert by_event[first]["domain"] == "flaky.vn" and by_event[first]["failed_at"].endswith("Z")
            # Dead-lettered events have left the work queue.
            assert (await service.client.get(f"{service.url}/api/stream/messages")).json()["total"] == 0
            domain_only = (await service.client.get(f"{service.url}/api/dead-letters?domain=flaky.vn")).json()
            assert domain_only["total"] == 2
            other = (await service.client.get(f"{service.url}/api/dead-letters?domain=other.vn")).json()
            assert other == {"dead_letters": [], "total": 0}
            by_id = (await service.client.get(f"{service.url}/api/dead-letters?event_id={first}")).json()
            assert [letter["id"] for letter in by_id["dead_letters"]] == [by_event[first]["id"]]

            backend_up["value"] = True
            replay = await service.client.post(f"{service.url}/api/dead-letters/{by_event[first]['id']}/replay")
            assert replay.status_code == 202 and replay.json()["status"] == "replayed"
            await backend.wait_count(7)  # 3 + 3 failed attempts, then the replay
            delivered = backend.received[-1].body
            assert delivered["event_id"] == first and delivered["delivery_attempt"] == 1

            discard = await service.client.delete(f"{service.url}/api/dead-letters/{by_event[second]['id']}")
            assert discard.status_code == 200
            again = await service.client.delete(f"{service.url}/api/dead-letters/{by_event[second]['id']}")
            assert again.status_code == 404 and "no dead letter" in again.json()["error"]
            missing = await service.client.post(f"{service.url}/api/dead-letters/999/replay")
            assert missing.status_code == 404
            assert (await service.client.get(f"{service.url}/api/dead-letters")).json()["total"] == 0


async def test_a_replayed_event_that_fails_again_is_a_dead_letter_again(nats_server, start_backend: StartBackend):
    # Regression: dead letters were deduplicated by event_id, so a replay that
    # failed again within the duplicate window was acked and silently dropped.
    backend = await start_backend(lambda number, body: 503)
    config = make_config(nats_server.url, {"down.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            event_id = (await service.post_event(call_event("down.vn", "twice"))).json()["event_id"]
            letters = await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)
            [letter] = letters.json()["dead_letters"]
            replay = await service.client.post(f"{service.url}/api/dead-letters/{letter['id']}/replay")
            assert replay.status_code == 202
            await backend.wait_count(6)
            letters = await wait_for_api(
                service,
                "/api/dead-letters",
                lambda r: r.json()["total"] == 1 and r.json()["dead_letters"][0]["id"] != letter["id"],
            )
    assert letters.json()["dead_letters"][0]["event_id"] == event_id
    assert backend.attempts_of("twice") == [1, 2, 3, 1, 2, 3]


async def test_a_last_attempt_cut_short_by_shutdown_ends_as_a_dead_letter_after_restart(
    nats_server, start_backend: StartBackend
):
    # The last attempt hangs; the service stops with its grace period running
    # out mid-POST, so no instance sees that attempt end. Before the dead-letter
    # writer, JetStream never delivered the event again and nothing filed it.
    hanging_last = await start_backend(lambda number, body: HANG if body["delivery_attempt"] == 2 else 503)
    config = make_config(
        nats_server.url,
        {"cut.vn": [hanging_last.url]},
        nats={"max_deliveries": 2, "ack_wait_seconds": 3},
        forwarding={"timeout_seconds": 2},
        server={"shutdown_grace_seconds": 0.2},
    )
    with trio.fail_after(120):
        async with running_service(config) as service:
            event_id = (await service.post_event(call_event("cut.vn", "cut-1"))).json()["event_id"]
            await hanging_last.wait_count(2)  # the last attempt is open when the service stops
        quick = make_config(nats_server.url, {"cut.vn": [hanging_last.url]}, nats={"max_deliveries": 2})
        async with running_service(quick) as service:
            letters = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)).json()
            assert (await service.client.get(f"{service.url}/api/stream/messages")).json()["total"] == 0
    [letter] = letters["dead_letters"]
    assert letter["event_id"] == event_id and letter["delivery_attempts"] == 2
    assert letter["errors"] is None  # the cut-short attempt's outcome was never seen
    assert hanging_last.attempts_of("cut-1") == [1, 2]


async def test_two_tenants_with_the_same_event_id_are_both_delivered(nats_server, start_backend: StartBackend):
    # Regression: Nats-Msg-Id was the client's event_id alone, so tenant B's
    # event was answered "duplicate" and never stored.
    a, b = await start_backend(), await start_backend()
    config = make_config(nats_server.url, {"a.vn": [a.url], "b.vn": [b.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            first = (await service.post_event(call_event("a.vn", "call-a", event_id="1"))).json()
            second = (await service.post_event(call_event("b.vn", "call-b", event_id="1"))).json()
            retry = (await service.post_event(call_event("b.vn", "call-b", event_id="1"))).json()
            await a.wait_count(1)
            await b.wait_count(1)
    assert "duplicate" not in first and "duplicate" not in second
    assert retry["duplicate"] is True and retry["sequence"] == second["sequence"]
    assert a.received[0].headers["idempotency-key"] == "a.vn:1"
    assert b.received[0].headers["idempotency-key"] == "b.vn:1"
    assert b.count.value == 1


async def test_flapping_and_slow_backends_leave_no_event_stuck(nats_server, start_backend: StartBackend):
    # Fails every other request, and every fourth one hangs past the timeout.
    flapping = await start_backend(lambda number, body: HANG if number % 4 == 0 else (503 if number % 2 else 200))
    steady = await start_backend()
    config = make_config(nats_server.url, {"flap.vn": [flapping.url, steady.url]})
    with trio.fail_after(90):
        async with running_service(config) as service:
            for n in range(40):
                assert (await service.post_event(call_event("flap.vn", f"flap-{n}"))).status_code == 202
            # Every event ends delivered to both endpoints or kept as a dead letter,
            # and the work queue is empty.
            stats = await wait_for_api(
                service,
                "/api/stats",
                lambda r: r.json()["total_successful"] + r.json()["given_up"] == 40 and r.json()["in_flight"] == 0,
            )
            letters = (
                await wait_for_api(
                    service,
                    "/api/dead-letters?limit=100",
                    lambda r: r.json()["total"] == stats.json()["given_up"],
                )
            ).json()
            await wait_for_api(service, "/api/stream/messages", lambda r: r.json()["total"] == 0)
    print(f"flapping: 40 sent, {stats.json()['total_successful']} delivered, {letters['total']} dead-lettered")


async def test_the_largest_event_accepted_can_still_be_kept_as_a_dead_letter(nats_server, start_backend: StartBackend):
    # A dead letter wraps its event (with its call_id repeated and each endpoint's
    # error); wrapped, the largest events accepted were over NATS's max_payload, so
    # they were never filed and stayed in the stream for good.
    down = await start_backend(lambda number, body: 503)
    config = make_config(nats_server.url, {"big.vn": [down.url]}, nats={"max_deliveries": 1})
    with trio.fail_after(60):
        async with running_service(config) as service:
            limit = (await service.post_sized("big.vn", "probe", 1_048_500)).json()["limit_bytes"]
            call_id = "c" * 20_000
            largest = await service.post_sized("big.vn", call_id, limit, event_id="largest")
            assert largest.status_code == 202, largest.text
            letters = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)).json()
            await wait_for_api(service, "/api/stream/messages", lambda r: r.json()["total"] == 0)
    [letter] = letters["dead_letters"]
    assert letter["event_id"] == "largest" and letter["event"]["call_id"] == call_id
    # Too long to repeat beside the event: the letter's own call_id is cut, its errors counted.
    assert letter["call_id"] == f"{call_id[:256]}… (see the event)"
    assert letter["errors"] == {"(all endpoints)": "1 failed; their errors are in the log"}
    assert len(json.dumps(letter["event"], separators=(",", ":"))) == limit
    assert down.attempts_of(call_id) == [1]


async def test_a_dead_letter_the_stream_refuses_is_filed_once_it_has_room(
    nats_server, start_backend: StartBackend, jetstreams: list[OpenedJetStream], monkeypatch
):
    # The dead-letter stream drops its oldest letters when full; one set by hand to
    # refuse instead answers "maximum messages exceeded". That answer ended the
    # dead-letter writer, and with it the service.
    monkeypatch.setattr(nats_bridge, "ADVISORY_ACK_WAIT_SECONDS", 2.0)  # the refused advisory comes again sooner
    down = await start_backend(lambda number, body: 503)
    config = make_config(nats_server.url, {"full.vn": [down.url]}, nats={"max_deliveries": 1})
    with trio.fail_after(60):
        async with running_service(config) as service:
            [opened] = jetstreams
            streams, context = opened.jetstream.streams, opened.jetstream._context
            info = await opened.run_asyncio(context.stream_info, streams.dead_letters)
            refusing = dataclasses.replace(info.config, max_msgs=1, discard=api.DiscardPolicy.NEW)
            await opened.run_asyncio(context.update_stream, refusing)
            await service.post_event(call_event("full.vn", "first"))
            await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)
            await service.post_event(call_event("full.vn", "second"))
            while True:  # the writer has had the second advisory and could not file it
                writer = await opened.run_asyncio(context.consumer_info, streams.given_up, "dead-letter-writer")
                if writer.delivered.stream_seq == 2 and writer.ack_floor.stream_seq == 1:
                    break
                await trio.sleep(0.05)
            await opened.run_asyncio(context.update_stream, dataclasses.replace(refusing, max_msgs=-1))
            letters = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 2)).json()
            health = await service.client.get(f"{service.url}/health")
    assert sorted(letter["call_id"] for letter in letters["dead_letters"]) == ["first", "second"]
    assert health.status_code == 200


async def test_an_event_stored_by_something_else_with_a_long_event_id_is_kept_as_a_dead_letter(
    nats_server, start_backend: StartBackend, jetstreams: list[OpenedJetStream]
):
    # Its dead-letter subject carried the event_id escaped: over nats-server's 4 KiB command
    # line, the server ended the connection every publish, pull and ack shares, the letter was
    # never filed, and the event never left the stream (the same again at every advisory).
    refusing = await start_backend(lambda number, body: 400)
    config = make_config(nats_server.url, {"other.vn": [refusing.url]}, nats={"max_deliveries": 1})
    event_id = "A" * 1400  # the ingress takes 128 characters at most
    foreign = json.dumps({"domain": "other.vn", "call_id": "elsewhere", "event_id": event_id}).encode()
    with trio.fail_after(60):
        async with running_service(config) as service:
            await jetstreams[0].publish_elsewhere("other.vn", foreign)
            letters = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)).json()
            await wait_for_api(service, "/api/stream/messages", lambda r: r.json()["total"] == 0)
            by_id = (await service.client.get(f"{service.url}/api/dead-letters", params={"event_id": event_id})).json()
            after = await service.post_event(call_event("other.vn", "after"))
    [letter] = letters["dead_letters"]
    assert letter["event_id"] == event_id and letter["event"]["call_id"] == "elsewhere"
    assert refusing.attempts_of("elsewhere") == [1]
    assert [found["id"] for found in by_id["dead_letters"]] == [letter["id"]]
    assert after.status_code == 202
