"""Scenarios: the service forwarding to backends whose wire behaviour is exact (raw servers on 127.0.0.1)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from structlog.testing import capture_logs
from trio_util import AsyncValue

from actors.subscriber import INGRESS_MAX_IN_FLIGHT
from tests.conftest import StartRawBackend
from tests.harness import WireRequests, answering_huge, call_event, make_config, running_service, wait_for_api

SCENARIO_TIMEOUT = 30
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Received:
    """The events a raw backend read, in order, and their count to wait on."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.count = AsyncValue(0)

    def add(self, request: bytes) -> dict[str, Any]:
        body = json.loads(request.split(b"\r\n\r\n", 1)[1])
        self.bodies.append(body)
        self.count.value += 1
        return body


def answering(received: Received, answer: bytes = OK):
    async def handler(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while (request := await requests.next()) is not None:
            received.add(request)
            await stream.send_all(answer)

    return handler


def failures(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "Failed to forward event"]


async def test_https_backends_are_verified_and_an_untrusted_certificate_fails_naming_the_reason(
    nats_server,
    start_raw_backend: StartRawBackend,
    test_ca: trustme.CA,
    server_tls: ssl.SSLContext,
    http_transport: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # The service trusts the test CA the way an operator would make it trust a private one.
    test_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(stranger)
    trusted, untrusted = Received(), Received()
    trusted_url = await start_raw_backend(answering(trusted), tls=server_tls)
    untrusted_url = await start_raw_backend(answering(untrusted), tls=stranger)
    config = make_config(
        nats_server.url, {"tls.example": [trusted_url, untrusted_url]}, forwarding={"http_transport": http_transport}
    )
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("tls.example", "tls-1"))
            await trusted.count.wait_value(2)  # attempt 1 ended (failed), attempt 2 began
    assert [body["delivery_attempt"] for body in trusted.bodies[:2]] == [1, 2]
    assert untrusted.bodies == []
    error = failures(logs)[0]["errors"][untrusted_url]
    assert error.startswith("ConnectError") and "certificate verify failed" in error


async def test_a_backend_closing_idle_connections_costs_no_attempt(nats_server, start_raw_backend: StartRawBackend):
    # Each connection answers one request; the next request on it is read and
    # the connection closed without a byte, as when a server's idle timeout
    # closes a connection just as a request goes out. The request is sent
    # again on a new connection, so every event is delivered on attempt 1.
    received = Received()

    async def answer_once_per_connection(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        received.add(await requests.next())
        await stream.send_all(OK)
        await requests.next()

    url = await start_raw_backend(answer_once_per_connection)
    config = make_config(nats_server.url, {"idle.example": [url]})
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            for n in range(5):
                await service.post_event(call_event("idle.example", f"idle-{n}"))
                await received.count.wait_value(n + 1)
            await wait_for_api(service, "/api/stats", lambda r: r.json()["total_successful"] == 5)
    assert [(body["call_id"], body["delivery_attempt"]) for body in received.bodies] == [
        (f"idle-{n}", 1) for n in range(5)
    ]
    assert failures(logs) == []


async def test_domains_routed_to_one_backend_share_its_connections(
    nats_server, start_raw_backend: StartRawBackend, http_transport: str
):
    # Connections follow the requests in flight, not the routed domains: one
    # event at a time to each of 20 domains goes over the connection the first opened.
    received = Received()
    connections = 0

    async def counting_connections(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await answering(received)(stream)

    url = await start_raw_backend(counting_connections)
    domains = [f"tenant-{n}.example" for n in range(20)]
    config = make_config(nats_server.url, dict.fromkeys(domains, [url]), forwarding={"http_transport": http_transport})
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            for n, domain in enumerate(domains):
                await service.post_event(call_event(domain, f"shared-{n}"))
                # Its outcome counted: its connection is back among the idle ones.
                await wait_for_api(service, "/api/stats", lambda r, n=n: r.json()["total_successful"] == n + 1)
    assert sorted(body["domain"] for body in received.bodies) == sorted(domains)
    assert connections == 1


async def test_a_domain_hanging_on_a_shared_backend_holds_only_its_own_connections(
    nats_server, start_raw_backend: StartRawBackend, http_transport: str
):
    # Two domains, one backend (one origin): it never answers the first domain's
    # path. While those requests hang, each on a connection of its own, the other
    # domain's events still go out at once, on connections of their own.
    stuck = INGRESS_MAX_IN_FLIGHT  # all in flight at once, straight from the ingress
    hanging = AsyncValue(0)
    received = Received()
    connections = 0

    async def hang_on_stuck_path(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        requests = WireRequests(stream)
        while (request := await requests.next()) is not None:
            if request.startswith(b"POST /stuck "):
                hanging.value += 1
                await trio.sleep_forever()
            received.add(request)
            await stream.send_all(OK)

    base = (await start_raw_backend(hang_on_stuck_path)).removesuffix("/webhook")
    config = make_config(
        nats_server.url,
        {"stuck.example": [f"{base}/stuck"], "flowing.example": [f"{base}/ok"]},
        # Its requests outlast the test: nothing frees their connections but the stop.
        forwarding={"http_transport": http_transport, "timeout_seconds": 2 * SCENARIO_TIMEOUT},
        nats={"ack_wait_seconds": 3 * SCENARIO_TIMEOUT},
    )
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            for n in range(stuck):
                await service.post_event(call_event("stuck.example", f"stuck-{n}"))
            await hanging.wait_value(stuck)
            for n in range(5):
                await service.post_event(call_event("flowing.example", f"flowing-{n}"))
            await received.count.wait_value(5)
            assert hanging.value == stuck  # still hanging, none answered
    assert sorted(body["call_id"] for body in received.bodies) == [f"flowing-{n}" for n in range(5)]
    assert connections >= stuck + 1


async def test_a_trickling_backend_fails_the_attempt_at_the_deadline_before_ack_wait(
    nats_server, start_raw_backend: StartRawBackend
):
    # Attempt 1 gets its answer one byte every half second, which no
    # per-operation timeout of 1 s would ever cut. The deadline closes the
    # connection before ack_wait (1.5 s) brings attempt 2: the backend sees
    # attempt 1's connection end before attempt 2 arrives.
    seen: list[tuple[str, int]] = []
    received = Received()

    async def trickle_first_attempt(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while (request := await requests.next()) is not None:
            attempt = received.add(request)["delivery_attempt"]
            seen.append(("request", attempt))
            if attempt > 1:
                await stream.send_all(OK)
                continue
            async with trio.open_nursery() as nursery:

                async def send_slowly() -> None:
                    for byte in OK:
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.5)  # the backend's behaviour, not synchronisation

                nursery.start_soon(send_slowly)
                await requests.wait_closed()
                seen.append(("closed", attempt))
                nursery.cancel_scope.cancel()
            return

    url = await start_raw_backend(trickle_first_attempt)
    config = make_config(nats_server.url, {"trickle.example": [url]})
    assert (config.forwarding.timeout_seconds, config.nats.ack_wait_seconds) == (1.0, 1.5)
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("trickle.example", "trickle-1"))
            await received.count.wait_value(2)
            await wait_for_api(service, "/api/stats", lambda r: r.json()["total_successful"] == 1)
    assert seen == [("request", 1), ("closed", 1), ("request", 2)]
    [failure] = failures(logs)
    assert failure["errors"] == {url: "timeout (no complete answer within 1 s)"}


async def test_a_huge_answer_is_read_to_the_cap_only(
    nats_server, start_raw_backend: StartRawBackend, http_transport: str
):
    size = 50 * 1024 * 1024
    received = Received()
    sent_whole: list[bool] = []
    url = await start_raw_backend(answering_huge(size, sent_whole, received.add))
    config = make_config(nats_server.url, {"huge.example": [url]}, forwarding={"http_transport": http_transport})
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with running_service(config) as service:
            await service.post_event(call_event("huge.example", "huge-1"))
            # A 2xx is a 2xx: delivered on attempt 1, the rest of the body never read.
            await wait_for_api(service, "/api/stats", lambda r: r.json()["total_successful"] == 1)
    assert [body["delivery_attempt"] for body in received.bodies] == [1]
    assert sent_whole == []  # the connection was dropped: the backend could not send it all


async def test_a_redirect_is_a_failure_named_as_such(
    nats_server, start_raw_backend: StartRawBackend, http_transport: str
):
    target = Received()
    target_url = await start_raw_backend(answering(target))
    redirecting = Received()
    redirect = b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % target_url.encode()
    url = await start_raw_backend(answering(redirecting, redirect))
    config = make_config(nats_server.url, {"moved.example": [url]}, forwarding={"http_transport": http_transport})
    with trio.fail_after(SCENARIO_TIMEOUT), capture_logs() as logs:
        async with running_service(config) as service:
            await service.post_event(call_event("moved.example", "moved-1"))
            await redirecting.count.wait_value(2)
    assert failures(logs)[0]["errors"] == {url: "HTTP 302 (redirects are not followed)"}
    assert target.bodies == []
