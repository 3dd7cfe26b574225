"""Signed webhooks: unit tests of the signature, scenarios with the real forwarder and receiver."""

from __future__ import annotations

import base64
import subprocess
import sys

import trio

from pipeline.signing import signature_headers, verify
from tests.conftest import StartBackend
from tests.harness import call_event, free_port, make_config, running_service, wait_for_api

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_signature_round_trip_and_what_breaks_it():
    body = b'{"domain":"ok.vn"}'
    headers = signature_headers(SECRET, "evt-1", body, now=1_800_000_000)
    assert headers["webhook-id"] == "evt-1" and headers["webhook-timestamp"] == "1800000000"
    assert headers["webhook-signature"].startswith("v1,")
    assert verify(SECRET, headers, body, now=1_800_000_010) is None
    assert verify(SECRET, headers, body + b" ", now=1_800_000_010) == "signature does not match"
    assert (
        verify(
            "whsec_" + base64.b64encode(b"another key, 32 bytes long......").decode(), headers, body, now=1_800_000_010
        )
        == "signature does not match"
    )
    assert "replay" in verify(SECRET, headers, body, now=1_800_001_000)
    assert verify(SECRET, {}, body) == "missing webhook-id, webhook-timestamp or webhook-signature"


def test_standard_webhooks_reference_vector():
    # The example from the Standard Webhooks specification's reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    assert verify(secret, headers, body, now=1614265330) is None


async def test_forwarder_signs_requests_to_endpoints_with_a_secret(nats_server, start_backend: StartBackend):
    signed, plain = await start_backend(), await start_backend()
    config = make_config(
        nats_server.url,
        {"ok.vn": [{"url": signed.url, "secret": SECRET}, plain.url]},
    )
    with trio.fail_after(30):
        async with running_service(config) as service:
            event_id = (await service.post_event(call_event("ok.vn", "signed"))).json()["event_id"]
            await signed.wait_count(1)
            await plain.wait_count(1)
            routes = (await service.client.get(f"{service.url}/api/config/routes")).json()
    [request] = signed.received
    assert request.headers["webhook-id"] == f"ok.vn:{event_id}"
    assert verify(SECRET, request.headers, signed.raw_bodies[0]) is None
    assert "webhook-signature" not in plain.received[0].headers
    assert routes["routes"][0]["signed_endpoints"] == [signed.url]
    assert SECRET not in str(routes)


async def test_receiver_command_verifies_real_signatures(nats_server, nursery: trio.Nursery):
    port = free_port()
    receiver = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pipeline", "receive", "--port", str(port), "--secret", SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # It says on stderr when it listens.
        assert b"Receiving webhooks on" in await receiver.stderr.receive_some()
        url = f"http://127.0.0.1:{port}/webhook"
        wrong = "whsec_" + base64.b64encode(b"not the receiver's secret at all").decode()
        config = make_config(
            nats_server.url,
            {"good.vn": [{"url": url, "secret": SECRET}], "bad.vn": [{"url": url, "secret": wrong}]},
            nats={"max_deliveries": 1},
        )
        output = b""
        with trio.fail_after(30):
            async with running_service(config) as service:
                await service.post_event(call_event("good.vn", "from-good"))
                while b"signature valid" not in output:
                    output += await receiver.stdout.receive_some()
                await service.post_event(call_event("bad.vn", "from-bad"))
                while b"INVALID" not in output:
                    output += await receiver.stdout.receive_some()
                failed = (await wait_for_api(service, "/api/dead-letters", lambda r: r.json()["total"] == 1)).json()
        text = output.decode()
        assert "signature valid" in text and '"call_id": "from-good"' in text
        assert "INVALID: signature does not match" in text
        assert failed["dead_letters"][0]["errors"] == {url: "HTTP 401"}
    finally:
        receiver.kill()
        await receiver.wait()
