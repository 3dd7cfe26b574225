"""Scenarios: the service is killed (kill -9) mid-load and restarted; nothing accepted is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import trio

from tests.harness import Backend, NatsServer, free_port, serve_backend

EVENTS = 2000
CONCURRENCY = 16


async def _start(config: Path) -> trio.Process:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pipeline", "-config", str(config), "-log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process


async def _wait_healthy(client: httpx.AsyncClient, url: str) -> None:
    # A new process: nothing to wait on but its /health answering.
    while True:
        try:
            if (await client.get(f"{url}/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await trio.sleep(0.1)


async def _crash_and_restart(tmp_path: Path, nats_url: str, nursery: trio.Nursery) -> dict[str, int]:
    backend = Backend()
    await nursery.start(serve_backend, backend)
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"nats: {{url: '{nats_url}', data_dir: '{tmp_path / 'nats'}', ack_wait_seconds: 2}}\n"
        f"forwarding: {{timeout_seconds: 1}}\n"
        f"logging: {{dir: '{tmp_path / 'logs'}'}}\n"
        f"routes: [{{domain: crash.vn, endpoints: ['{backend.url}']}}]\n"
    )
    url = f"http://127.0.0.1:{port}"
    accepted: list[str] = []
    killed = trio.Event()
    service = await _start(config)
    async with httpx.AsyncClient(timeout=10) as client:
        await _wait_healthy(client, url)
        numbers = iter(range(EVENTS))

        async def post_events() -> None:
            for n in numbers:
                event = {"domain": "crash.vn", "call_id": f"call-{n}", "event_id": f"crash-{n}"}
                try:
                    response = await client.post(f"{url}/events", json=event)
                except httpx.TransportError:
                    continue  # the service is down: this event was never accepted
                if response.status_code == 202:
                    accepted.append(event["event_id"])
                    if len(accepted) == EVENTS // 2 and not killed.is_set():
                        service.send_signal(signal.SIGKILL)
                        killed.set()

        async with trio.open_nursery() as posters:
            for _ in range(CONCURRENCY):
                posters.start_soon(post_events)
        await service.wait()
        assert killed.is_set()

        restarted = await _start(config)
        try:
            await _wait_healthy(client, url)
            await backend.count.wait_value(lambda _: set(accepted) <= {b["event_id"] for b in backend.bodies()})
        finally:
            restarted.send_signal(signal.SIGTERM)
            await restarted.wait()
    seen = Counter(body["event_id"] for body in backend.bodies())
    return {
        "sent": EVENTS,
        "accepted": len(accepted),
        "delivered": len(set(accepted) & set(seen)),
        "lost": len(set(accepted) - set(seen)),
        "duplicated": sum(count - 1 for count in seen.values() if count > 1),
    }


async def test_kill_9_with_embedded_nats_loses_no_accepted_event(tmp_path: Path, nursery: trio.Nursery):
    with trio.fail_after(120):
        figures = await _crash_and_restart(tmp_path, "embedded", nursery)
    print("kill -9, embedded NATS:", figures)
    assert figures["lost"] == 0
    assert figures["accepted"] >= EVENTS // 2


async def test_kill_9_with_external_nats_loses_no_accepted_event(
    tmp_path: Path, nats_server: NatsServer, nursery: trio.Nursery
):
    with trio.fail_after(120):
        figures = await _crash_and_restart(tmp_path, nats_server.url, nursery)
    print("kill -9, external NATS:", figures)
    assert figures["lost"] == 0
    assert figures["accepted"] >= EVENTS // 2
