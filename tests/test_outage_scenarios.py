"""Scenario: the NATS server goes away and comes back while the service runs."""

from __future__ import annotations

import trio

from tests.conftest import StartBackend
from tests.harness import NatsServer, call_event, make_config, running_service, wait_for_api


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
