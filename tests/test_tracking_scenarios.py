"""Scenarios: what the operator's API shows after real forwarding through a real nats-server."""

from __future__ import annotations

from datetime import datetime

import trio

from actors import stats
from tests.conftest import StartBackend
from tests.harness import RunningService, call_event, make_config, running_service, wait_for_api


async def _get(service: RunningService, path: str, **params) -> dict:
    response = await service.client.get(f"{service.url}{path}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_api_shows_successes_retries_and_final_failures(nats_server, start_backend: StartBackend):
    fine = await start_backend()
    flaky = await start_backend(lambda number, body: 500 if body["delivery_attempt"] == 1 else 200)
    dead = await start_backend(lambda number, body: 503)
    config = make_config(nats_server.url, {"ok.vn": [fine.url], "flaky.vn": [flaky.url], "dead.vn": [dead.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            for n in range(3):
                await service.post_event(call_event("ok.vn", f"ok-{n}"))
            await service.post_event(call_event("flaky.vn", "flaky-0"))
            await service.post_event(call_event("dead.vn", "dead-0"))
            for n in range(2):  # no route: these wait in the stream
                await service.post_event(call_event("later.vn", f"later-{n}"))
            stats = (
                await wait_for_api(
                    service, "/api/stats", lambda r: (r.json()["total_successful"], r.json()["total_failed"]) == (4, 4)
                )
            ).json()

            everything = await _get(service, "/api/events")
            failed_only = await _get(service, "/api/events", type="failed")
            successful_only = await _get(service, "/api/events", type="successful")
            flaky_only = await _get(service, "/api/events", domain="FLAKY.vn")
            limited = await _get(service, "/api/events", limit=1)
            # Delivered and dead-lettered events leave the stream; what waits stays.
            stream = (
                await wait_for_api(
                    service,
                    "/api/stream/messages",
                    lambda r: r.json()["total"] == 2 and {m["domain"] for m in r.json()["messages"]} == {"later.vn"},
                )
            ).json()
            stream_later = await _get(service, "/api/stream/messages", domain="later.vn", limit=1)
            stream_ok = await _get(service, "/api/stream/messages", domain="ok.vn")

    assert stats["retry_count"] == 3  # flaky's 2nd attempt, dead's 2nd and 3rd
    assert stats["given_up"] == 1
    assert stats["successful_domain_count"] == 2 and stats["failed_domain_count"] == 1
    assert stats["in_flight"] == 0
    assert stats["uptime_seconds"] > 0
    assert {key: value for key, value in stats["domains"]["flaky.vn"].items() if key != "backlog"} == {
        "total_successful": 1,
        "total_failed": 1,
        "retry_count": 1,
        "given_up": 0,
        "in_flight": 0,
    }
    assert stats["domains"]["dead.vn"]["given_up"] == 1

    successes = everything["events_by_domain"]
    assert sorted(successes) == ["flaky.vn", "ok.vn"]
    # Forwarded concurrently, so in any order; listed newest first.
    assert sorted(r["call_id"] for r in successes["ok.vn"]) == ["ok-0", "ok-1", "ok-2"]
    times = [datetime.fromisoformat(r["forwarded_at"]) for r in successes["ok.vn"]]
    assert times == sorted(times, reverse=True)  # newest first
    [retried] = successes["flaky.vn"]
    assert retried["delivery_attempt"] == 2 and retried["call_id"] == "flaky-0"
    assert retried["event"]["delivery_attempt"] == 2 and retried["event"]["from_number"] == "0914315989"
    assert retried["forwarded_at"].endswith("Z")
    assert set(retried) == {
        "call_id",
        "domain",
        "direction",
        "state",
        "status",
        "event_id",
        "forwarded_at",
        "delivery_attempt",
        "event",
    }

    # A failure later retried successfully shows only as the success.
    assert list(everything["failed_events_by_domain"]) == ["dead.vn"]
    failures = everything["failed_events_by_domain"]["dead.vn"]
    assert [(f["delivery_attempt"], f["will_retry"]) for f in failures] == [(3, False), (2, True), (1, True)]
    assert failures[0]["error"] == f"{dead.url}: HTTP 503"
    assert failures[0]["max_deliveries"] == 3 and failures[0]["failed_at"].endswith("Z")

    assert (
        failed_only["events_by_domain"] == {}
        and failed_only["failed_events_by_domain"] == everything["failed_events_by_domain"]
    )
    assert successful_only["failed_events_by_domain"] == {}
    assert successful_only["events_by_domain"] == successes
    assert list(flaky_only["events_by_domain"]) == ["flaky.vn"] and flaky_only["failed_events_by_domain"] == {}
    assert all(len(records) == 1 for records in limited["events_by_domain"].values())
    assert limited["failed_events_by_domain"]["dead.vn"][0]["delivery_attempt"] == 3

    assert [m["sequence"] for m in stream["messages"]] == [7, 6]
    assert stream["messages"][0]["data"]["call_id"] == "later-1"
    assert stream["messages"][0]["subject"] == "test.signal.later~2evn"
    assert stream_later["total"] == 2
    assert [m["data"]["call_id"] for m in stream_later["messages"]] == ["later-1"]
    assert stream_ok == {"messages": [], "total": 0}


async def test_bad_queries_get_400_with_reason(nats_server):
    with trio.fail_after(30):
        async with running_service(make_config(nats_server.url, {})) as service:
            cases = {
                "/api/events?type=weird": "type must be one of successful, failed, all, got 'weird'",
                "/api/events?limit=0": "limit must be a whole number from 1 to 1000, got '0'",
                "/api/events?limit=1001": "limit must be a whole number from 1 to 1000, got '1001'",
                "/api/events?limit=ten": "limit must be a whole number from 1 to 1000, got 'ten'",
                "/api/stream/messages?limit=-5": "limit must be a whole number from 1 to 1000, got '-5'",
                "/api/events?domain=a%20b": "domain must be 1-253 characters",
            }
            for path, reason in cases.items():
                response = await service.client.get(f"{service.url}{path}")
                assert response.status_code == 400, path
                assert response.json()["error"].startswith(reason), path


async def test_stream_messages_of_an_empty_stream(nats_server):
    with trio.fail_after(30):
        async with running_service(make_config(nats_server.url, {})) as service:
            assert await _get(service, "/api/stream/messages") == {"messages": [], "total": 0}
            assert await _get(service, "/api/stream/messages", domain="none.vn") == {"messages": [], "total": 0}


async def test_large_events_are_kept_for_the_api_within_the_stores_byte_budget(
    nats_server, start_backend: StartBackend, monkeypatch
):
    # Any client may post events of up to ~1 MiB to a routed domain: kept whole in the
    # store behind /api/events, 2,000 records a domain, they grew memory without a bound
    # that mattered (~200 GiB), and one dashboard read of them built answers of 100 MB.
    monkeypatch.setattr(stats, "MAX_STORED_BYTES", 3_500_000)
    backend = await start_backend()
    config = make_config(nats_server.url, {"big.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            for n in range(8):
                assert (await service.post_sized("big.vn", f"big-{n}", 1_000_000)).status_code == 202
            await wait_for_api(service, "/api/stats", lambda r: r.json()["total_successful"] == 8)
            kept = await _get(service, "/api/events", domain="big.vn", limit=100)
            counted = await _get(service, "/api/stats")
    assert sorted(record["call_id"] for record in kept["events_by_domain"]["big.vn"]) == ["big-5", "big-6", "big-7"]
    assert counted["stored_events"] == 3 and counted["domains"]["big.vn"]["total_successful"] == 8
