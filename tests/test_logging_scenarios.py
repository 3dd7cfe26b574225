"""Scenarios: per-domain log files written by the real pipeline and read back through /api/logs."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import structlog
import trio

from actors.log_writer import DomainLogRouter
from pipeline.config import load_config
from pipeline.domain_logs import UNROUTED, log_files
from pipeline.log_setup import configure_logging
from tests.conftest import StartBackend
from tests.harness import call_event, make_config, running_service, wait_for_api, write_config


@pytest.fixture
def domain_router() -> Iterator[tuple[DomainLogRouter, io.StringIO]]:
    """structlog as the CLI sets it up with -domain-logging; stdout captured."""
    router, stdout = DomainLogRouter(), io.StringIO()
    configure_logging("info", stdout, router, cache_loggers=False)
    yield router, stdout
    structlog.reset_defaults()


async def test_forwarded_events_land_in_their_domains_files_and_come_back(
    nats_server, start_backend: StartBackend, domain_router, tmp_path: Path
):
    router, stdout = domain_router
    fine = await start_backend()
    dead = await start_backend(lambda number, body: 503)
    logs = tmp_path / "logs"
    config = make_config(
        nats_server.url,
        {"vietanh.cloudgo.vn": [fine.url], "dead.vn": [dead.url]},
        # Small files: the day's first parts roll over and are gzipped.
        logging={"dir": str(logs), "max_file_size": 4000},
    )
    today = datetime.now(UTC).date().isoformat()
    with trio.fail_after(60):
        async with running_service(config, router) as service:
            for n in range(12):
                await service.post_event(call_event("vietanh.cloudgo.vn", f"vn-{n}"))
            await service.post_event(call_event("dead.vn", "dead-0"))
            await wait_for_api(
                service, "/api/stats", lambda r: (r.json()["total_successful"], r.json()["total_failed"]) == (12, 3)
            )
        # Shut down: every record is on disk now. Read it back with a fresh service.
        async with running_service(make_config(nats_server.url, {}, logging={"dir": str(logs)})) as service:
            listing = (await service.client.get(f"{service.url}/api/logs/domains")).json()
            page = (await service.client.get(f"{service.url}/api/logs", params={"domain": "vietanh_cloudgo_vn"})).json()
            dead_page = (
                await service.client.get(f"{service.url}/api/logs", params={"domain": "dead_vn", "date": today})
            ).json()
            limited = (
                await service.client.get(f"{service.url}/api/logs", params={"domain": "vietanh_cloudgo_vn", "limit": 5})
            ).json()

    directory = logs / "vietanh_cloudgo_vn"
    files = log_files(directory)
    assert any(f.compressed for f in files) and any(not f.compressed for f in files)
    assert {f.day for f in files} == {today}
    lines = []
    for log_file in files:
        opener = gzip.open if log_file.compressed else open
        with opener(log_file.path, "rb") as handle:
            lines += [json.loads(raw) for raw in handle]
    by_message: dict[str, list[dict]] = {}
    for record in lines:
        by_message.setdefault(record["msg"], []).append(record)
    assert len(by_message["Event received and published"]) == 12
    assert len(by_message["Forwarding event"]) == 12
    assert len(by_message["Event forwarded successfully"]) == 12
    forwarded = by_message["Event forwarded successfully"][0]
    for key in ("call_id", "domain", "direction", "state", "status", "delivery_attempt", "event_id"):
        assert forwarded[key] is not None, key
    assert forwarded["payload"]["from_number"] == "0914315989"  # the full event stays in the domain's file
    assert {r["domain"] for r in lines} == {"vietanh.cloudgo.vn"}

    # stdout: no info record about an event, no phone number; the failures (warnings) are there.
    printed = [json.loads(text) for text in stdout.getvalue().splitlines()]
    assert not [p for p in printed if p.get("event_id") and p["level"] == "info"]
    assert "0914315989" not in stdout.getvalue()
    assert [p["msg"] for p in printed if p.get("domain") == "dead.vn" and p.get("event_id")].count(
        "Failed to forward event"
    ) == 3

    assert {d["domain"]: d for d in listing["domains"]}["vietanh.cloudgo.vn"] == {
        "domain": "vietanh.cloudgo.vn",
        "sanitized": "vietanh_cloudgo_vn",
        "dates": [today],
    }
    assert page["stats"] == {"total_successful": 12, "total_failed": 0, "retry_count": 0}
    assert sorted(r["call_id"] for r in page["events_by_domain"]["vietanh.cloudgo.vn"]) == sorted(
        f"vn-{n}" for n in range(12)
    )
    assert len(limited["events_by_domain"]["vietanh.cloudgo.vn"]) == 5 and limited["total"] == 12
    failures = dead_page["failed_events_by_domain"]["dead.vn"]
    assert [(f["delivery_attempt"], f["will_retry"]) for f in failures] == [(3, False), (2, True), (1, True)]
    assert failures[0]["error"] == f"{dead.url}: HTTP 503"
    assert failures[0]["event"]["call_id"] == "dead-0"


def _logged(directory: Path) -> list[dict]:
    lines = []
    for log_file in log_files(directory):
        opener = gzip.open if log_file.compressed else open
        with opener(log_file.path, "rb") as handle:
            lines += [json.loads(raw) for raw in handle]
    return lines


async def test_domains_without_a_route_share_one_log_directory_until_they_get_a_route(
    nats_server, start_backend: StartBackend, domain_router, tmp_path: Path
):
    # Issue 13: every invented domain got its own directory of full payloads.
    router, _ = domain_router
    backend = await start_backend()
    logs, path = tmp_path / "logs", tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"ok.vn": [backend.url]}, logging={"dir": str(logs)})
    today = datetime.now(UTC).date().isoformat()
    with trio.fail_after(60):
        async with running_service(load_config(path), router, config_path=path) as service:
            for domain in ("ok.vn", "stranger-1.vn", "stranger-2.vn"):
                assert (await service.post_event(call_event(domain, f"{domain}-call"))).status_code == 202
            await backend.wait_count(1)
            # Two directories: the routed domain's and the strangers' (before the fix, one per stranger).
            listing = await wait_for_api(service, "/api/logs/domains", lambda r: len(r.json()["domains"]) >= 2)
            assert sorted(d["sanitized"] for d in listing.json()["domains"]) == [UNROUTED, "ok_vn"]
            # A route for stranger-1.vn appears: its waiting event is delivered and logged in its own directory.
            write_config(
                path,
                nats_server.url,
                {"ok.vn": [backend.url], "stranger-1.vn": [backend.url]},
                logging={"dir": str(logs)},
            )
            assert (await service.client.post(f"{service.url}/api/config/reload")).status_code == 200
            await backend.wait_count(2)
            unrouted_page = await service.client.get(f"{service.url}/api/logs", params={"domain": UNROUTED})

    assert sorted(p.name for p in logs.iterdir()) == [UNROUTED, "ok_vn", "stranger-1_vn"]
    assert {d["sanitized"]: d for d in listing.json()["domains"]}[UNROUTED] == {
        "domain": UNROUTED,
        "sanitized": UNROUTED,
        "dates": [today],
    }
    assert unrouted_page.status_code == 200 and unrouted_page.json()["domain"] == UNROUTED
    unrouted = _logged(logs / UNROUTED)
    assert sorted((r["msg"], r["domain"]) for r in unrouted) == [
        ("Event received and published", "stranger-1.vn"),
        ("Event received and published", "stranger-2.vn"),
    ]
    assert unrouted[0]["payload"]["from_number"] == "0914315989"  # the full event, as in a domain's own file
    routed_later = _logged(logs / "stranger-1_vn")
    assert [r["msg"] for r in routed_later] == ["Forwarding event", "Event forwarded successfully"]
    assert {r["call_id"] for r in routed_later} == {"stranger-1.vn-call"}


async def test_logs_api_refuses_bad_requests(nats_server, tmp_path: Path):
    (tmp_path / "logs" / "ok_vn").mkdir(parents=True)
    (tmp_path / "secret.log").write_text("nope")
    config = make_config(nats_server.url, {}, logging={"dir": str(tmp_path / "logs")})
    with trio.fail_after(30):
        async with running_service(config) as service:
            cases = {
                "/api/logs?domain=ok_vn&date=2026-13-01": (400, "date must be YYYY-MM-DD"),
                "/api/logs?domain=ok_vn&date=yesterday": (400, "date must be YYYY-MM-DD"),
                "/api/logs?domain=ok_vn&offset=-1": (400, "offset must be a whole number"),
                "/api/logs?domain=ok_vn&offset=%C2%B2": (400, "offset must be a whole number"),  # "²"
                f"/api/logs?domain=ok_vn&offset={'9' * 5000}": (400, "offset must be a whole number"),
                "/api/logs?domain=ok_vn&type=odd": (400, "type must be one of"),
                "/api/logs?domain=nobody_vn": (404, "no log files for domain 'nobody_vn'"),
                "/api/logs?domain=../secret": (404, "no log files for domain '../secret'"),
                "/api/logs?domain=..%2F..%2Fetc": (404, "no log files for domain"),
            }
            for path, (status, reason) in cases.items():
                response = await service.client.get(f"{service.url}{path}")
                assert response.status_code == status, path
                assert response.json()["error"].startswith(reason), path
            empty = (await service.client.get(f"{service.url}/api/logs?domain=ok_vn")).json()
            assert empty["total"] == 0 and empty["events_by_domain"] == {}
            listing = (await service.client.get(f"{service.url}/api/logs")).json()
            assert listing == {"domains": [{"domain": "ok.vn", "sanitized": "ok_vn", "dates": []}]}


async def test_unwritable_log_directory_does_not_stop_forwarding(
    nats_server, start_backend: StartBackend, domain_router, tmp_path: Path
):
    router, _ = domain_router
    backend = await start_backend()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be")
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, logging={"dir": str(blocker / "logs")})
    with trio.fail_after(30):
        async with running_service(config, router) as service:
            for n in range(5):
                assert (await service.post_event(call_event("ok.vn", f"ok-{n}"))).status_code == 202
            await backend.wait_count(5)
            health = (await wait_for_api(service, "/health", lambda r: r.json()["status"] == "degraded")).json()
            assert health["nats"] == "connected"
            assert "domain logs not written" in health["reason"]
            # /health is public: it says why, but names no tenant's file.
            assert str(blocker) not in health["reason"] and "ok_vn" not in health["reason"]
            assert set(health) == {"status", "nats", "reason"}
            # Still forwarding after the failure was noticed.
            assert (await service.post_event(call_event("ok.vn", "after"))).status_code == 202
            await backend.wait_count(6)


@pytest.mark.parametrize("levels", [300, 900])
async def test_an_identifying_field_nested_deeply_is_logged_and_forwarded_and_the_service_stays_up(
    nats_server, start_backend: StartBackend, domain_router, tmp_path: Path, levels: int
):
    # A call_id of arrays within arrays goes into every log record of its event. At
    # 300 levels pydantic-core's encoder refused the record, at ~900 json's could run
    # out of recursion: the exception left the forwarder's task and ended the service.
    router, _ = domain_router
    backend = await start_backend()
    logs = tmp_path / "logs"
    config = make_config(nats_server.url, {"ok.vn": [backend.url]}, logging={"dir": str(logs)})
    nested = b'{"domain": "ok.vn", "call_id": ' + b"[" * levels + b"]" * levels + b"}"
    with trio.fail_after(30):
        async with running_service(config, router) as service:
            deep = await service.client.post(
                f"{service.url}/events", content=nested, headers={"Content-Type": "application/json"}
            )
            after = await service.post_event(call_event("ok.vn", "after"))
            await backend.wait_count(2)
            shown = await wait_for_api(service, "/api/events", _both_of_ok_vn_shown)
    assert deep.status_code == 202 and after.status_code == 202
    note = "(nested more than 16 levels deep: see the event)"
    assert sorted(record["call_id"] for record in shown.json()["events_by_domain"]["ok.vn"]) == [note, "after"]
    assert sorted(str(body["call_id"])[:3] for body in backend.bodies()) == ["[[[", "aft"]
    lines = [line for file in log_files(logs / "ok_vn") for line in file.path.read_text().splitlines()]
    records = [json.loads(line) for line in lines]
    forwarded = {record["event_id"]: record for record in records if record["msg"] == "Event forwarded successfully"}
    assert set(forwarded) == {deep.json()["event_id"], after.json()["event_id"]}
    assert forwarded[deep.json()["event_id"]]["call_id"] == note
    assert len(json.dumps(forwarded[deep.json()["event_id"]]["payload"]["call_id"])) == 2 * levels


def _both_of_ok_vn_shown(response: httpx.Response) -> bool:
    return len(response.json()["events_by_domain"].get("ok.vn", [])) == 2
