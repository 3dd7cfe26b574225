"""Scenarios: the stream is a work queue whose limits refuse, never delete, one tenant at a time."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.api
import pytest
import trio
from structlog.testing import capture_logs

from pipeline.config import load_config
from pipeline.nats_bridge import RECONSUME_MAX_DELAY_SECONDS
from pipeline.streams import StreamSetupError
from tests.conftest import StartBackend
from tests.harness import (
    HANG,
    Backend,
    call_event,
    make_config,
    running_service,
    serve_backend,
    serve_limited_nats,
    wait_for_api,
    write_config,
)


async def test_a_domain_over_its_backlog_quota_is_refused_while_others_are_accepted(
    nats_server, start_backend: StartBackend
):
    # Regression: the stream kept every event under "discard old", so a dead
    # backend's backlog grew until JetStream silently deleted the oldest events.
    healthy = await start_backend()
    dead = await start_backend(lambda number, body: HANG)
    config = make_config(
        nats_server.url, {"ok.vn": [healthy.url], "dead.vn": [dead.url]}, nats={"max_backlog_per_domain": 3}
    )
    with trio.fail_after(60):
        async with running_service(config) as service:
            accepted = [await service.post_event(call_event("dead.vn", f"stuck-{n}")) for n in range(3)]
            refused = await service.post_event(call_event("dead.vn", "stuck-3"))
            other = await service.post_event(call_event("ok.vn", "fine"))
            await healthy.wait_count(1)
            stats = await wait_for_api(
                service, "/api/stats", lambda r: r.json()["backlog"].get("domains", {}).get("dead.vn") == 3
            )
    assert [response.status_code for response in accepted] == [202, 202, 202]
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    body = refused.json()
    assert body["limit"] == "domain_backlog" and "nats.max_backlog_per_domain" in body["error"]
    assert other.status_code == 202
    backlog = stats.json()["backlog"]
    assert backlog["quota_per_domain"] == 3
    assert stats.json()["domains"]["dead.vn"]["backlog"] == 3


async def test_delivered_events_leave_the_stream_and_unrouted_ones_wait_in_view(
    nats_server, start_backend: StartBackend
):
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            for n in range(3):
                assert (await service.post_event(call_event("ok.vn", f"done-{n}"))).status_code == 202
            for n in range(2):
                assert (await service.post_event(call_event("later.vn", f"wait-{n}"))).status_code == 202
            await backend.wait_count(3)
            # What /api/stream/messages shows is what waits: only the unrouted domain's events.
            waiting = await wait_for_api(service, "/api/stream/messages", lambda r: r.json()["total"] == 2)
            stats = await wait_for_api(
                service, "/api/stats", lambda r: "later.vn" in r.json()["backlog"].get("unrouted", {})
            )
    assert {message["domain"] for message in waiting.json()["messages"]} == {"later.vn"}
    backlog = stats.json()["backlog"]
    assert backlog["unrouted"]["later.vn"]["waiting"] == 2
    assert backlog["unrouted"]["later.vn"]["oldest_age_seconds"] >= 0
    assert backlog["unrouted_domain_count"] == 1 and backlog["unrouted_events"] == 2
    assert backlog["stream"]["messages"] == 2


async def test_a_full_stream_refuses_new_events_and_health_says_degraded(nats_server, nursery: trio.Nursery):
    # A routed domain whose backend holds every request: its events stay in the
    # stream (in flight) until the stream is full. (Unrouted events could not
    # fill it: they are refused at half.)
    release = trio.Event()
    held = Backend(release=release)
    await nursery.start(serve_backend, held)
    config = make_config(
        nats_server.url,
        {"full.vn": [held.url]},
        nats={"max_bytes": 20_000, "ack_wait_seconds": 60},
        forwarding={"timeout_seconds": 30},
    )
    padding = "x" * 1000
    with trio.fail_after(60):
        async with running_service(config) as service:
            answers = []
            for n in range(40):
                answers.append(await service.post_event(call_event("full.vn", f"fill-{n}", note=padding)))
                if answers[-1].status_code != 202:
                    break
            health = await wait_for_api(service, "/health", lambda r: r.json()["status"] == "degraded")
            stored = (await service.client.get(f"{service.url}/api/stream/messages?limit=100")).json()
            release.set()  # the held forwards finish, so the shutdown need not wait for them
    assert answers[-1].status_code == 503
    assert answers[-1].json()["limit"] == "stream_full"
    assert "retry-after" in answers[-1].headers
    # Nothing accepted was deleted to make room.
    assert stored["total"] == len(answers) - 1
    assert {m["data"]["call_id"] for m in stored["messages"]} == {f"fill-{n}" for n in range(len(answers) - 1)}
    assert health.status_code == 200 and "nats.max_bytes" in health.json()["reason"]


async def test_lowering_the_backlog_quota_between_restarts_deletes_no_waiting_event(nats_server):
    # JetStream applies a lowered per-subject limit to what already waits, deleting a
    # domain's oldest events: accepted events, gone at the restart without a word.
    with trio.fail_after(60):
        async with running_service(make_config(nats_server.url, {}, nats={"max_backlog_per_domain": 100})) as service:
            for n in range(20):  # no route: they wait
                assert (await service.post_event(call_event("waiting.vn", f"w-{n}"))).status_code == 202
        lowered = make_config(nats_server.url, {}, nats={"max_backlog_per_domain": 5})
        with capture_logs() as logs:
            async with running_service(lowered) as service:
                waiting = (await service.client.get(f"{service.url}/api/stream/messages", params={"limit": 100})).json()
    assert waiting["total"] == 20
    assert sorted(int(message["data"]["call_id"][2:]) for message in waiting["messages"]) == list(range(20))
    [kept] = [entry for entry in logs if entry["event"].startswith("nats.max_backlog_per_domain not lowered")]
    assert kept["largest"] == {"domain": "waiting.vn", "waiting": 20} and kept["kept"] == 100


async def test_a_new_subject_pattern_is_refused_at_start_while_events_wait_under_the_old(nats_server):
    # Regression: the stream took the new pattern, and the events stored under the old one
    # were read, listed and delivered by nothing, until max_age removed them.
    with trio.fail_after(60):
        async with running_service(make_config(nats_server.url, {})) as service:
            assert (await service.post_event(call_event("waiting.vn", "w"))).status_code == 202
        with pytest.raises(BaseExceptionGroup) as refused:
            async with running_service(make_config(nats_server.url, {}, nats={"subject_pattern": "other.*"})):
                pass
        async with running_service(make_config(nats_server.url, {})) as service:
            waiting = (await service.client.get(f"{service.url}/api/stream/messages")).json()
    assert refused.group_contains(StreamSetupError, match="holds 1 events under test.signal.*")
    assert [message["data"]["call_id"] for message in waiting["messages"]] == ["w"]


async def test_domains_without_a_route_share_one_backlog_limit_counted_across_restarts(
    nats_server, start_backend: StartBackend
):
    # Issue 13: unrouted events were bounded only per domain, so invented
    # domains could fill the stream; now they share nats.max_unrouted_backlog.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, nats={"max_unrouted_backlog": 3})
    with trio.fail_after(60):
        async with running_service(config) as service:
            strangers = [await service.post_event(call_event(f"stranger-{n}.vn", f"s-{n}")) for n in range(5)]
            assert [response.status_code for response in strangers] == [202, 202, 202, 503, 503]
            routed = await service.post_event(call_event("ok.vn", "fine"))
            await backend.wait_count(1)
            stats = await wait_for_api(service, "/api/stats", lambda r: r.json()["backlog"].get("unrouted_events") == 3)
        # A restart knows what already waits before it accepts anything.
        async with running_service(config) as service:
            after_restart = await service.post_event(call_event("stranger-9.vn", "s-9"))
            waiting = (await service.client.get(f"{service.url}/api/stream/messages")).json()
    refused = strangers[3]
    assert refused.headers["retry-after"].isdigit()
    assert refused.json()["limit"] == "unrouted_backlog" and refused.json()["event_id"]
    assert "nats.max_unrouted_backlog" in refused.json()["error"]
    assert routed.status_code == 202
    assert stats.json()["backlog"]["unrouted_quota"] == 3
    assert after_restart.status_code == 503 and after_restart.json()["limit"] == "unrouted_backlog"
    assert waiting["total"] == 3
    assert {message["data"]["call_id"] for message in waiting["messages"]} == {"s-0", "s-1", "s-2"}


async def test_events_without_a_route_cannot_fill_the_stream_for_routed_tenants(
    nats_server, start_backend: StartBackend
):
    # Large events reach nats.max_bytes long before any count limit: unrouted
    # ones are refused once the stream is half full, so routed ones still fit.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, nats={"max_bytes": 20_000})
    padding = "x" * 1000
    with trio.fail_after(60):
        async with running_service(config) as service:
            strangers = []
            for n in range(40):
                strangers.append(await service.post_event(call_event(f"stranger-{n}.vn", f"s-{n}", note=padding)))
                if strangers[-1].status_code != 202:
                    break
            refused = strangers[-1]
            assert refused.status_code == 503 and refused.json()["limit"] == "unrouted_backlog"
            assert "nats.max_bytes" in refused.json()["error"]
            assert 5 <= len(strangers) - 1 <= 10  # about half of 20,000 bytes of 1 kB events
            routed = [await service.post_event(call_event("ok.vn", f"ok-{n}", note=padding)) for n in range(5)]
            assert [response.status_code for response in routed] == [202] * 5
            await backend.wait_count(5)


async def test_the_thousand_and_first_tenant_is_delivered(nats_server, start_backend: StartBackend):
    # Regression: nats-server 2.15 allows 1,000 consumers per stream unless told
    # otherwise, and each routed domain has one: tenant #1,001 got 202 and nothing more.
    backend = await start_backend()
    routes = {f"tenant-{n}.vn": [backend.url] for n in range(1001)}
    config = make_config(nats_server.url, routes)
    with trio.fail_after(120):
        async with running_service(config) as service:
            response = await service.post_event(call_event("tenant-1000.vn", "last-tenant"))
            assert response.status_code == 202
            await backend.wait_count(1)
    assert backend.bodies()[0]["call_id"] == "last-tenant"


async def test_routes_the_nats_account_cannot_serve_are_refused_at_start_and_at_reload(
    nursery: trio.Nursery, tmp_path: Path, start_backend: StartBackend
):
    # The account allows 4 consumers: the dead-letter writer's and 3 routed domains'.
    url = await nursery.start(partial(serve_limited_nats, tmp_path, max_consumers=4))
    backend = await start_backend()
    small = {"max_bytes": 10_000_000, "dead_letter_max_bytes": 10_000_000}
    too_many = {f"t{n}.vn": [backend.url] for n in range(4)}
    with trio.fail_after(60):
        with pytest.raises(BaseExceptionGroup) as refused:
            async with running_service(make_config(url, too_many, nats=small)):
                pass
        assert refused.group_contains(StreamSetupError, match="4 routed domains need a consumer each")

        path = tmp_path / "config.yaml"
        write_config(path, url, {"t0.vn": [backend.url], "t1.vn": [backend.url]}, nats=small)
        async with running_service(load_config(path), config_path=path) as service:
            write_config(path, url, too_many, nats=small)
            reload = await service.client.post(f"{service.url}/api/config/reload")
            routes = (await service.client.get(f"{service.url}/api/config/routes")).json()
            assert (await service.post_event(call_event("t1.vn", "still-served"))).status_code == 202
            await backend.wait_count(1)
    assert reload.status_code == 400 and "4 routed domains need a consumer each" in reload.json()["message"]
    assert routes["route_count"] == 2


def _take_consumer_slots(url: str, count: int, *, release: bool = False) -> None:
    """Create (or with ``release``, delete) ``count`` durable consumers of the service's stream that no route uses."""

    async def change() -> None:
        client = await nats.connect(url)
        for n in range(count):
            if release:
                await client.jetstream().delete_consumer("test-signals", f"slot-taker-{n}")
            else:
                await client.jetstream().add_consumer(
                    "test-signals",
                    nats.js.api.ConsumerConfig(
                        durable_name=f"slot-taker-{n}",
                        filter_subject=f"test.signal.other-{n}",
                        ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                    ),
                )
        await client.close()

    asyncio.run(change())


def _unconsumable(response: httpx.Response) -> dict[str, Any]:
    return response.json()["unconsumable"]


async def test_a_domain_whose_consumer_the_account_refuses_backs_off_and_health_counts_it(
    nursery: trio.Nursery, tmp_path: Path, start_backend: StartBackend
):
    # Regression: a refused consumer open was retried every second with a
    # warning each time (472,796 lines in 7 minutes at 5,000 domains), and
    # /health said ok while a routed domain got nothing.
    url = await nursery.start(partial(serve_limited_nats, tmp_path, max_consumers=4))
    backend = await start_backend()
    small = {"max_bytes": 10_000_000, "dead_letter_max_bytes": 10_000_000}
    routes = {"t0.vn": [backend.url], "t1.vn": [backend.url]}
    path = tmp_path / "config.yaml"
    write_config(path, url, routes, nats=small)
    with trio.fail_after(120):
        async with running_service(load_config(path), config_path=path) as service:
            # Events the ingress hands over need no consumer.
            for n, domain in enumerate(["t0.vn", "t1.vn"]):
                assert (await service.post_event(call_event(domain, f"served-{n}"))).status_code == 202
            await backend.wait_count(2)
            # The free consumer slots (the dead-letter writers' holds one of four) go to
            # someone else, and t2.vn has an event waiting from before its route: the
            # next domain whose consumer must fetch cannot have one.
            await trio.to_thread.run_sync(_take_consumer_slots, url, 3)
            assert (await service.post_event(call_event("t2.vn", "waits"))).status_code == 202
            write_config(path, url, routes | {"t2.vn": [backend.url]}, nats=small)
            with capture_logs() as logs:
                reload = await service.client.post(f"{service.url}/api/config/reload")
                assert reload.status_code == 200
                # Three failed opens in a row: at 1 s apart each would have been a warning.
                stats = await wait_for_api(
                    service,
                    "/api/stats",
                    lambda r: (
                        _unconsumable(r)["count"] == 1
                        and _unconsumable(r)["examples"].get("t2.vn", {}).get("failures", 0) >= 3
                    ),
                )
            health = (await service.client.get(f"{service.url}/health")).json()
            # The others are served meanwhile.
            for n, domain in enumerate(["t0.vn", "t1.vn"]):
                assert (await service.post_event(call_event(domain, f"again-{n}"))).status_code == 202
            await backend.wait_count(4)

            await trio.to_thread.run_sync(partial(_take_consumer_slots, url, 3, release=True))
            # The next try, at most RECONSUME_MAX_DELAY_SECONDS away, opens t2.vn's consumer.
            with trio.fail_after(RECONSUME_MAX_DELAY_SECONDS + 10):
                await backend.wait_count(5)
                recovered = await wait_for_api(service, "/health", lambda r: r.json()["status"] == "ok")
            after = await service.client.get(f"{service.url}/api/stats")
    refusals = [entry for entry in logs if "forward-t2~2evn" in entry.get("error", "")]
    assert [entry["log_level"] for entry in refusals[:3]] == ["warning", "debug", "debug"]
    assert len([entry for entry in logs if entry["log_level"] == "warning"]) <= 2
    assert health["status"] == "degraded"
    assert health["reason"].startswith("1 routed domain cannot be consumed")
    assert "t2.vn" not in health["reason"]  # public: no tenant named
    assert "t2.vn" in stats.json()["unconsumable"]["examples"]
    assert sorted(body["call_id"] for body in backend.bodies()) == [
        "again-0",
        "again-1",
        "served-0",
        "served-1",
        "waits",
    ]
    assert recovered.json() == {"status": "ok", "nats": "connected"}
    assert _unconsumable(after) == {"count": 0, "examples": {}}
