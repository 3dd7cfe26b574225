"""The NATS bridge against a real nats-server: what nats-py would get wrong by itself."""

from __future__ import annotations

import nats.errors
import pytest
import trio

from pipeline import nats_bridge
from pipeline.events import AcceptedEvent, parse_event
from pipeline.nats_bridge import PublishReceipt, open_jetstream
from tests.harness import NatsServer, make_config

# nats-server's default max_payload, and nats-py's limit of acks awaited at once (publish_async_max_pending).
MAX_PAYLOAD = 1024 * 1024
MAX_PENDING_ACKS = 4000


async def test_publishes_nats_py_refuses_give_their_pending_slots_back(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
):
    # The size check before publishing (headers included) keeps nats-py's
    # MaxPayloadError from ever happening; here it is made to let some through,
    # and each refused publish must give back what it took.
    monkeypatch.setattr(nats_bridge, "_header_block_size", lambda headers: -MAX_PAYLOAD)
    refused = AcceptedEvent("too-large", "ok.vn", b"x" * (MAX_PAYLOAD + 1), {}, {})
    config = make_config(nats_server.url, {}).nats
    with trio.fail_after(30):
        async with open_jetstream(config, nats_server.url, routed_domains=0) as jetstream:
            outcomes = await jetstream.publish_batch([refused] * (MAX_PENDING_ACKS + 1))
            # Had they kept their slots, this publish would wait for one forever.
            [stored] = await jetstream.publish_batch([parse_event(b'{"domain": "ok.vn"}')])
    assert all(isinstance(outcome, nats.errors.MaxPayloadError) for outcome in outcomes)
    assert stored == PublishReceipt(sequence=1, duplicate=False)
