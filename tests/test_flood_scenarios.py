"""Scenario: strangers flood the open ingress with invented domains; routed tenants and the disk do not notice."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
import trio

from actors.log_writer import DomainLogRouter
from pipeline.domain_logs import UNROUTED, log_files
from pipeline.log_setup import configure_logging
from tests.conftest import StartBackend
from tests.harness import call_event, make_config, running_service, wait_for_api

# The flood: 10,000 domains nobody routes, each posted once.
INVENTED_DOMAINS = 10_000
# Clients posting at once: enough to interleave with the tenant's posts.
FLOOD_CLIENTS = 8
# Tight limits, so the flood meets all of them in a test: the shared unrouted
# bucket lets UNROUTED_BURST events through (its rate refills one token in
# 1,000 s, never within the test), and of those the stream takes UNROUTED_QUOTA.
UNROUTED_BURST = 200
UNROUTED_QUOTA = 100
LOG_FILE_SIZE = 8_000
LOG_BACKUPS = 2


@pytest.fixture
def domain_router() -> Iterator[DomainLogRouter]:
    """structlog as the CLI sets it up with -domain-logging (stdout captured)."""
    router = DomainLogRouter()
    configure_logging("info", io.StringIO(), router, cache_loggers=False)
    yield router
    structlog.reset_defaults()


async def test_a_flood_of_invented_domains_leaves_routed_tenants_served_and_the_disk_bounded(
    nats_server, start_backend: StartBackend, domain_router: DomainLogRouter, tmp_path: Path
):
    # Issue 13: each invented domain got a log directory of full payloads, a
    # fresh rate limit and its own backlog quota, so a flood could fill the
    # disk and the stream (and then routed tenants got 503 too).
    tenant = await start_backend()
    logs = tmp_path / "logs"
    config = make_config(
        nats_server.url,
        {"tenant.vn": [tenant.url]},
        ingress={"unrouted_rate_limit_per_second": 0.001, "unrouted_rate_limit_burst": UNROUTED_BURST},
        nats={"max_unrouted_backlog": UNROUTED_QUOTA},
        logging={"dir": str(logs), "max_file_size": LOG_FILE_SIZE, "max_backups": LOG_BACKUPS},
    )
    flood: Counter[tuple[int, str | None]] = Counter()
    tenant_answers: list[httpx.Response] = []
    with trio.fail_after(240):
        async with running_service(config, domain_router) as service:

            async def post_strangers(client: int) -> None:
                for n in range(client, INVENTED_DOMAINS, FLOOD_CLIENTS):
                    response = await service.post_event(call_event(f"stranger-{n}.example", f"s-{n}"))
                    flood[response.status_code, response.json().get("limit")] += 1
                    if n % 500 == 0:  # the tenant posts in the middle of the flood
                        tenant_answers.append(await service.post_event(call_event("tenant.vn", f"during-{n}")))

            async with trio.open_nursery() as clients:
                for client in range(FLOOD_CLIENTS):
                    clients.start_soon(post_strangers, client)
            for n in range(5):
                tenant_answers.append(await service.post_event(call_event("tenant.vn", f"after-{n}")))
            await tenant.wait_count(len(tenant_answers))
            stream = (await service.client.get(f"{service.url}/api/stream/messages", params={"limit": 1000})).json()
            listing = await wait_for_api(service, "/api/logs/domains", lambda r: len(r.json()["domains"]) >= 2)

    # Routed: every event accepted and delivered, during the flood and after it.
    assert [answer.status_code for answer in tenant_answers] == [202] * 25
    assert sorted(body["call_id"] for body in tenant.bodies()) == sorted(
        [f"during-{n}" for n in range(0, INVENTED_DOMAINS, 500)] + [f"after-{n}" for n in range(5)]
    )
    # Unrouted, as a whole: the shared bucket, then the shared backlog quota.
    assert flood == {
        (202, None): UNROUTED_QUOTA,
        (503, "unrouted_backlog"): UNROUTED_BURST - UNROUTED_QUOTA,
        (429, None): INVENTED_DOMAINS - UNROUTED_BURST,
    }
    # The stream: what waits unrouted stays within the quota (it only grows: nothing delivers it).
    unrouted_waiting = [message for message in stream["messages"] if message["domain"] != "tenant.vn"]
    assert len(unrouted_waiting) == UNROUTED_QUOTA
    # The disk: the routed domain's directory and one for everyone else, rotated as usual.
    assert sorted(path.name for path in logs.iterdir()) == [UNROUTED, "tenant_vn"]
    assert sorted(d["sanitized"] for d in listing.json()["domains"]) == [UNROUTED, "tenant_vn"]
    unrouted_files = log_files(logs / UNROUTED)
    assert any(f.compressed for f in unrouted_files)  # it rolled, and old parts were deleted
    assert len(unrouted_files) <= LOG_BACKUPS + 1
    assert sum(f.path.stat().st_size for f in unrouted_files) <= (LOG_BACKUPS + 1) * LOG_FILE_SIZE
