"""Scenarios: routes changed in the config file while the real pipeline runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs
from trio_util import AsyncValue

from actors.config_watcher import ConfigWatcher
from pipeline.config import load_config
from pipeline.events import consumer_name
from tests.conftest import StartBackend
from tests.harness import (
    NatsServer,
    RunningService,
    call_event,
    running_service,
    wait_for_api,
    write_config,
)

# The watcher applies a change within two of its 0.25 s polls; this bound only
# keeps a broken watcher from hanging the suite.
RELOAD_BOUND = 5
STREAM = "test-signals"  # tests.harness's config


async def _routes(service: RunningService) -> dict[str, list[str]]:
    body = (await service.client.get(f"{service.url}/api/config/routes")).json()
    return {route["domain"]: route["endpoints"] for route in body["routes"]}


async def _wait_routes(service: RunningService, routes: dict[str, list[str]]) -> None:
    await wait_for_api(
        service,
        "/api/config/routes",
        lambda r: {x["domain"]: x["endpoints"] for x in r.json()["routes"]} == routes,
    )


async def test_adding_a_domain_in_the_file_delivers_its_waiting_events(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    old, new = await start_backend(), await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"old.vn": [old.url]})
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            for n in range(3):
                assert (await service.post_event(call_event("new.vn", f"early-{n}"))).status_code == 202
            write_config(path, nats_server.url, {"old.vn": [old.url], "new.vn": [new.url]})
            with trio.fail_after(RELOAD_BOUND):
                await new.wait_count(3)  # the events that waited in the stream
            assert (await service.post_event(call_event("new.vn", "late"))).status_code == 202
            await new.wait_count(4)
            routes = (await service.client.get(f"{service.url}/api/config/routes")).json()
    assert sorted(b["call_id"] for b in new.bodies()) == ["early-0", "early-1", "early-2", "late"]
    assert routes["route_count"] == 2 and routes["loaded_at"].endswith("Z")
    assert routes["routes"] == [
        {"domain": "new.vn", "endpoints": [new.url], "signed_endpoints": []},
        {"domain": "old.vn", "endpoints": [old.url], "signed_endpoints": []},
    ]
    assert routes["config_file"] == str(path)


async def test_removing_a_domain_keeps_its_events_in_the_stream_until_it_returns(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"gone.vn": [backend.url]})
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            await service.post_event(call_event("gone.vn", "before"))
            await backend.wait_count(1)
            write_config(path, nats_server.url, {})
            await _wait_routes(service, {})
            assert (await service.post_event(call_event("gone.vn", "while-away"))).status_code == 202
            # Stored, and not delivered: it waits in the stream.
            waiting = await service.client.get(f"{service.url}/api/stream/messages", params={"domain": "gone.vn"})
            assert [message["data"]["call_id"] for message in waiting.json()["messages"]] == ["while-away"]
            assert backend.count.value == 1
            write_config(path, nats_server.url, {"gone.vn": [backend.url]})
            await backend.wait_count(2)
    assert [b["call_id"] for b in backend.bodies()] == ["before", "while-away"]


async def test_the_drained_consumer_of_a_removed_domain_is_deleted_as_an_idle_one_is(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    # Regression: a domain's durable consumer stayed on the server for good once its route went
    # (only the idle path deletes one, and a retired domain no longer ran it). Over months of
    # rotating tenants they fill the stream's consumer limit, and new domains go unconsumed.
    flaky = await start_backend(lambda number, body: 500 if number == 1 else 200)
    path = tmp_path / "config.yaml"
    nats = {"consumer_idle_seconds": 3.0}
    write_config(path, nats_server.url, {"leaving.vn": [flaky.url]}, nats=nats)
    consumer = consumer_name("leaving.vn")
    deleted = trio.Event()

    def tell(logger: object, method_name: str, record: dict) -> dict:
        if record["event"] == "Consumer of a removed route deleted":
            deleted.set()
        return record

    # A guard: before, the consumer stayed for as long as the server ran.
    with trio.fail_after(30), capture_logs(processors=[tell]):
        async with running_service(load_config(path), config_path=path) as service:
            await service.post_event(call_event("leaving.vn", "last"))
            await flaky.wait_count(2)  # the redelivery came through the domain's consumer, and was acked
            write_config(path, nats_server.url, {}, nats=nats)
            await _wait_routes(service, {})
            at_removal = set(await nats_server.consumers(STREAM))
            await deleted.wait()
            after = set(await nats_server.consumers(STREAM))
    assert consumer in at_removal  # not yet idle when its route went
    assert consumer not in after
    assert flaky.attempts_of("last") == [1, 2]


async def test_a_redelivery_goes_to_the_endpoint_configured_now(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    broken = await start_backend(lambda number, body: 503)
    replacement = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"moving.vn": [broken.url]}, nats={"ack_wait_seconds": 3.0})
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            await service.post_event(call_event("moving.vn", "moved"))
            await broken.wait_count(1)  # attempt 1 failed; JetStream will redeliver
            write_config(path, nats_server.url, {"moving.vn": [replacement.url]}, nats={"ack_wait_seconds": 3.0})
            await _wait_routes(service, {"moving.vn": [replacement.url]})
            await replacement.wait_count(1)
    assert broken.attempts_of("moved") == [1]
    assert replacement.attempts_of("moved") == [2]


async def test_a_change_saved_while_nats_is_down_is_applied_once_it_is_back(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path, nursery: trio.Nursery
):
    # Regression: a reload needs NATS (the account's consumer limit); when it could not be
    # asked, the watcher still counted the file as applied, and the change never was.
    old, new = await start_backend(), await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [old.url]})
    with trio.fail_after(60), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            nats_server.stop()
            await wait_for_api(service, "/health", lambda r: r.status_code == 503)
            write_config(path, nats_server.url, {"ok.vn": [new.url]})
            await wait_for_api(
                service, "/health", lambda r: any(x["event"].startswith("Config reload rejected") for x in logs)
            )
            await nursery.start(nats_server.run)
            await _wait_routes(service, {"ok.vn": [new.url]})
            await service.post_event(call_event("ok.vn", "after"))
            await new.wait_count(1)
    assert old.bodies() == []


async def test_invalid_file_keeps_the_old_routes(nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path):
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(30), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            path.write_text(path.read_text().replace(backend.url, "ftp://nowhere/"))
            await wait_for_api(  # the watcher saw it and said why
                service, "/health", lambda r: any(x["event"].startswith("Config reload rejected") for x in logs)
            )
            assert await _routes(service) == {"ok.vn": [backend.url]}
            await service.post_event(call_event("ok.vn", "still-routed"))
            await backend.wait_count(1)
            response = await service.client.post(f"{service.url}/api/config/reload")
    assert response.status_code == 400
    assert response.json()["status"] == "error"
    assert "routes[0].endpoints[0].url: URL scheme should be 'http' or 'https'" in response.json()["message"]
    [rejection] = [x for x in logs if x["event"] == "Config reload rejected; keeping the active routes"][:1]
    assert str(path) in rejection["reason"]


@pytest.mark.parametrize(
    "spoiled",
    [
        pytest.param(lambda text: text.encode() + "# ghi chú\n".encode("cp1258"), id="a legacy code page"),
        pytest.param(lambda text: text.encode("utf-16"), id="saved as UTF-16"),
        pytest.param(lambda text: (text + "extra: 2026-13-45\n").encode(), id="an impossible date"),
    ],
)
async def test_a_file_yaml_cannot_read_keeps_the_old_routes_and_the_service_running(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path, spoiled: Callable[[str], bytes]
):
    # Regression: the error decoding the file (or building the date) was not a config
    # error, and it ended the whole service at the next poll.
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(30), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            path.write_bytes(spoiled(path.read_text()))
            await wait_for_api(
                service, "/health", lambda r: any(x["event"].startswith("Config reload rejected") for x in logs)
            )
            await service.post_event(call_event("ok.vn", "still-routed"))
            await backend.wait_count(1)
            response = await service.client.post(f"{service.url}/api/config/reload")
            routes = await _routes(service)
    assert routes == {"ok.vn": [backend.url]}
    assert response.status_code == 400 and str(path) in response.json()["message"]


@pytest.mark.parametrize("emptied", ["", "# routes: moved to the new PBX\n\n  \n"])
async def test_an_emptied_file_keeps_the_old_routes_and_routes_empty_list_retires_them(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path, emptied: str
):
    # Regression: a truncated file (an editor's half-write, a `>` typo) was
    # applied as a valid config with no routes, retiring every forwarder.
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backend.url]})
    verdicts = ("Config reload rejected; keeping the active routes", "Config auto-reloaded successfully")
    with trio.fail_after(30), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            path.write_text(emptied)
            await wait_for_api(service, "/health", lambda r: any(x["event"] in verdicts for x in logs))
            assert [x["event"] for x in logs if x["event"] in verdicts] == [verdicts[0]]
            assert await _routes(service) == {"ok.vn": [backend.url]}
            await service.post_event(call_event("ok.vn", "still-routed"))
            await backend.wait_count(1)
            response = await service.client.post(f"{service.url}/api/config/reload")

            write_config(path, nats_server.url, {})  # "routes: []": no routes, said explicitly
            await _wait_routes(service, {})
    expected = f'{path}: the file has no settings (empty, or only comments); a config without routes says "routes: []"'
    assert response.status_code == 400 and response.json()["message"] == expected
    rejection = next(x for x in logs if x["event"] == verdicts[0])
    assert rejection["reason"] == expected


async def test_a_deleted_file_is_logged_once_per_disappearance_and_keeps_the_routes(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Regression: a deleted config file was silent.
    first, second = await start_backend(), await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [first.url]})
    reads = AsyncValue(0)  # the watcher's reads of the file, to know it looked again without sleeping
    digest = ConfigWatcher._digest

    async def counted_digest(watcher: ConfigWatcher) -> bytes | None:
        try:
            return await digest(watcher)
        finally:
            reads.value += 1

    monkeypatch.setattr(ConfigWatcher, "_digest", counted_digest)

    async def wait_reads_after_deletion() -> None:
        path.unlink()
        since = reads.value
        await reads.wait_value(lambda count: count >= since + 6)

    def missing() -> list[dict]:
        return [x for x in logs if x["event"] == "Config file missing; keeping the current routes"]

    with trio.fail_after(30), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            await wait_reads_after_deletion()
            assert len(missing()) == 1 and missing()[0]["config_file"] == str(path)
            assert await _routes(service) == {"ok.vn": [first.url]}
            await service.post_event(call_event("ok.vn", "while-missing"))
            await first.wait_count(1)

            write_config(path, nats_server.url, {"ok.vn": [second.url]})
            await _wait_routes(service, {"ok.vn": [second.url]})
            await wait_reads_after_deletion()  # a second disappearance is said again, once
            assert len(missing()) == 2
            assert await _routes(service) == {"ok.vn": [second.url]}


async def test_editor_style_rename_over_and_delete_recreate_are_noticed(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    first, second, third = await start_backend(), await start_backend(), await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [first.url]})
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            swap = tmp_path / ".config.yaml.swp"
            write_config(swap, nats_server.url, {"ok.vn": [second.url]})
            os.replace(swap, path)
            await _wait_routes(service, {"ok.vn": [second.url]})

            path.unlink()
            write_config(path, nats_server.url, {"ok.vn": [third.url]})
            await _wait_routes(service, {"ok.vn": [third.url]})
            await service.post_event(call_event("ok.vn", "where"))
            await third.wait_count(1)
    assert first.count.value == second.count.value == 0


async def test_rapid_successive_writes_end_on_the_last_version(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    backends = [await start_backend() for _ in range(3)]
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backends[0].url]})
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            for n in range(50):
                write_config(path, nats_server.url, {"ok.vn": [backends[n % 2].url], f"d{n}.vn": [backends[0].url]})
            write_config(path, nats_server.url, {"ok.vn": [backends[2].url]})
            await _wait_routes(service, {"ok.vn": [backends[2].url]})
            await service.post_event(call_event("ok.vn", "final"))
            await backends[2].wait_count(1)
            assert await _routes(service) == {"ok.vn": [backends[2].url]}


async def test_reload_api_answers_and_serialises_concurrent_reloads(
    nats_server: NatsServer, start_backend: StartBackend, tmp_path: Path
):
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(30), capture_logs() as logs:
        async with running_service(load_config(path), config_path=path) as service:
            write_config(
                path,
                nats_server.url,
                {"ok.vn": [backend.url], "two.vn": [backend.url]},
                server={"shutdown_grace_seconds": 7},
            )
            answers = []

            async def reload() -> None:
                answers.append(await service.client.post(f"{service.url}/api/config/reload"))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(reload)
            path.unlink()
            missing = await service.client.post(f"{service.url}/api/config/reload")
            routes_after_missing = await _routes(service)
    assert [a.status_code for a in answers] == [200] * 5
    assert answers[0].json() == {"status": "success", "message": "Configuration reloaded successfully", "routes": 2}
    assert missing.status_code == 500 and "file not found" in missing.json()["message"]
    assert sorted(routes_after_missing) == ["ok.vn", "two.vn"]
    restart_warnings = [
        x for x in logs if x["event"] == "Config changes outside routes are not applied until a restart"
    ]
    assert restart_warnings and restart_warnings[0]["sections"] == ["server"]
