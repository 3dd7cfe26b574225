"""Scenarios: what a client posting to /events sees, against a real nats-server."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import trio

from pipeline.config import Config
from tests.conftest import StartBackend
from tests.harness import RunningService, call_event, make_config, running_service

UNPAIRED = "body is not valid JSON: a string holds an unpaired surrogate"


@pytest.fixture
async def service(nats_server, nursery):
    """The service with one routed domain and a 1 KiB body limit."""
    config = make_config(nats_server.url, {}, server={"max_body_size": 1024})
    ready: trio.Event = trio.Event()
    holder: list[RunningService] = []

    async def run(config: Config) -> None:
        async with running_service(config) as running:
            holder.append(running)
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run, config)
    await ready.wait()
    return holder[0]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        (b"[1, 2]", "body must be a JSON object"),
        (b'"domain"', "body must be a JSON object"),
        (b"{}", "domain is required"),
        (b'{"domain": ""}', "domain must not be empty"),
        (b'{"domain": 42}', "domain must be a string"),
        (b'{"domain": null}', "domain must be a string"),
        (b'{"domain": "bad domain.com"}', "domain must be 1-253 characters"),
        (b'{"domain": "call.*"}', "domain must be 1-253 characters"),
        (b'{"domain": "a.>"}', "domain must be 1-253 characters"),
        (b'{"domain": "' + b"a" * 254 + b'"}', "domain must be 1-253 characters"),
        (b'{"domain": "ok.vn", "event_id": "has space"}', "event_id must be a string"),
        (b'{"domain": "ok.vn", "event_id": 7}', "event_id must be a string"),
        (b'{"domain": "ok.vn", "duration": NaN}', "body is not valid JSON: NaN is not a JSON value"),
        (b'{"domain": "ok.vn", "duration": Infinity}', "body is not valid JSON: Infinity is not a JSON value"),
        (b'{"domain": "ok.vn", "duration": -Infinity}', "body is not valid JSON: -Infinity is not a JSON value"),
        (b'{"domain": "ok.vn", "duration": 1e999}', "body is not valid JSON: number 1e999 is too large"),
        # JSON's grammar allows an unpaired surrogate, escaped or (with a lenient
        # decoder) as bytes; no UTF-8 text holds one. Once answered 500.
        (b'{"domain": "ok.vn", "name": "\\ud800"}', UNPAIRED),
        (b'{"domain": "ok.vn", "name": "\xed\xa0\x80"}', UNPAIRED),
    ],
)
async def test_invalid_event_gets_400_with_reason(service: RunningService, body: bytes, reason: str):
    response = await service.client.post(
        f"{service.url}/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["status"] == "error"
    assert response.json()["error"].startswith(reason)


async def test_a_nan_is_refused_unstored_and_what_follows_is_forwarded_as_strict_json(
    nats_server, start_backend: StartBackend
):
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(30):
        async with running_service(config) as service:
            refused = await service.client.post(
                f"{service.url}/events",
                content=b'{"domain": "ok.vn", "call_id": "nan", "duration": NaN}',
                headers={"Content-Type": "application/json"},
            )
            accepted = await service.post_event(call_event("ok.vn", "after", duration=1.5))
            await backend.wait_count(1)
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("body is not valid JSON: NaN")
    # Nothing was stored for the refused body: the next event is the stream's first.
    assert accepted.status_code == 202 and accepted.json()["sequence"] == 1
    [forwarded] = backend.raw_bodies
    assert _strict_json(forwarded)["call_id"] == "after"


async def test_a_body_nested_too_deeply_gets_400_and_what_follows_is_forwarded(
    nats_server, start_backend: StartBackend
):
    # Python's parser recurses once a level; ~1,000 levels once ended it in a
    # RecursionError: a 500, and a traceback in the log for every such request.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    deep = b'{"domain": "ok.vn", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with trio.fail_after(30):
        async with running_service(config) as service:
            refused = await service.client.post(
                f"{service.url}/events", content=deep, headers={"Content-Type": "application/json"}
            )
            accepted = await service.post_event(call_event("ok.vn", "after"))
            await backend.wait_count(1)
    assert refused.status_code == 400
    assert refused.json()["error"] == "body is not valid JSON: arrays and objects nested too deeply to read"
    assert accepted.status_code == 202 and accepted.json()["sequence"] == 1
    assert [body["call_id"] for body in backend.bodies()] == ["after"]


def _strict_json(raw: bytes) -> Any:
    """Parse as RFC 8259 has it (Python's json accepts NaN and Infinity unless told not to)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=refuse)


async def test_body_over_limit_gets_413(service: RunningService):
    event = call_event("ok.vn", "big", padding="x" * 2000)
    response = await service.post_event(event)
    assert response.status_code == 413
    assert response.json() == {"status": "error", "error": "body larger than 1024 bytes"}


async def test_an_event_too_large_for_nats_gets_413_and_nats_stays_connected(nats_server, start_backend: StartBackend):
    # nats-server's max_payload (1 MiB, as server.max_body_size) counts the headers,
    # and the stored event carries its event_id: such a body used to make the server
    # close the connection, and every later POST failed.
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    with trio.fail_after(60):
        async with running_service(config) as service:
            too_large = await service.post_sized("ok.vn", "too-large", 1_048_500)  # the service adds a UUID event_id
            assert too_large.status_code == 413, too_large.text
            after = await service.post_event(call_event("ok.vn", "after"))
            assert after.status_code == 202
            await backend.wait_count(1)

            # The limit the answer names holds to the byte, for an event_id as long as the UUID.
            limit = too_large.json()["limit_bytes"]
            assert str(limit) in too_large.json()["error"]
            over = await service.post_sized("ok.vn", "over", limit + 1, event_id=str(uuid.uuid4()))
            at_limit = await service.post_sized("ok.vn", "at-limit", limit, event_id=str(uuid.uuid4()))
            assert over.status_code == 413
            assert at_limit.status_code == 202, at_limit.text
            await backend.wait_count(2)
            health = await service.client.get(f"{service.url}/health")
    assert 1_046_400 < limit < 1_048_576 - 2048
    assert health.status_code == 200
    assert [b["call_id"] for b in backend.bodies()] == ["after", "at-limit"]


async def test_unsupported_content_type_gets_415(service: RunningService):
    response = await service.client.post(
        f"{service.url}/events", content=b"<event/>", headers={"Content-Type": "application/xml"}
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


async def test_curl_default_content_type_is_accepted(service: RunningService):
    response = await service.client.post(
        f"{service.url}/events",
        content=b'{"domain": "ok.vn", "call_id": "curl"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 202


async def test_wrong_method_and_unknown_path_get_json_errors(service: RunningService):
    response = await service.client.get(f"{service.url}/events")
    assert response.status_code == 405
    assert response.json()["status"] == "error"
    response = await service.client.get(f"{service.url}/nowhere")
    assert response.status_code == 404
    assert response.json()["status"] == "error"


async def test_client_event_id_is_kept_and_a_retry_is_stored_once(nats_server, start_backend: StartBackend):
    backend = await start_backend()
    config = make_config(nats_server.url, {"ok.vn": [backend.url]})
    event = call_event("ok.vn", "dup", event_id="pbx-42")
    with trio.fail_after(30):
        async with running_service(config) as service:
            first = await service.post_event(event)
            again = await service.post_event(event)
            marker = await service.post_event(call_event("ok.vn", "after"))
            await backend.wait_count(2)
    assert first.status_code == again.status_code == 202
    assert first.json() == {"status": "accepted", "event_id": "pbx-42", "sequence": 1}
    assert again.json() == {"status": "accepted", "event_id": "pbx-42", "sequence": 1, "duplicate": True}
    assert marker.json()["sequence"] == 2
    # The marker event came after the retry, so the backend has seen everything it will.
    assert [b["call_id"] for b in backend.bodies()].count("dup") == 1
    assert backend.received[0].headers["idempotency-key"] == "ok.vn:pbx-42"


async def test_health_reports_nats_connected(service: RunningService):
    response = await service.client.get(f"{service.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "nats": "connected"}
