"""The NATS bridge against a real nats-server: what nats-py would get wrong by itself."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import nats.errors
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from trio_util import AsyncBool

from pipeline import nats_bridge
from pipeline.events import AcceptedEvent, parse_event
from pipeline.nats_bridge import (
    ConsumeFailure,
    JetStream,
    NatsUnavailable,
    PublishReceipt,
    PullConsumer,
    keep_consuming,
    open_jetstream,
)
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


class _FakeConsumer:
    name = "fake"

    async def close(self) -> None:
        pass


async def test_a_consumer_that_keeps_failing_is_retried_ever_more_slowly(autojump_clock: trio.testing.MockClock):
    # Regression: a consumer the server refused was tried again every second,
    # with a warning each time, however long it kept failing.
    opened_at: list[float] = []
    reports: list[ConsumeFailure | None] = []
    serves = 0

    async def open_consumer() -> PullConsumer:
        opened_at.append(trio.current_time())
        if len(opened_at) <= 6:
            raise NatsUnavailable("cannot open consumer fake: maximum consumers limit reached")
        return cast(PullConsumer, _FakeConsumer())

    async def serve(consumer: PullConsumer) -> None:
        nonlocal serves
        serves += 1
        if serves == 2:
            raise NatsUnavailable("fetch failed: the consumer is gone")
        if serves > 2:
            await trio.sleep_forever()

    jetstream = cast(JetStream, SimpleNamespace(connected=AsyncBool(True)))
    with capture_logs() as logs, trio.move_on_after(100):
        await keep_consuming(jetstream, open_consumer, serve, reports.append)
    start = opened_at[0]
    # Pauses of 1, 2, 4, 8, 16 s, then at most 30; a served consumer starts again from 1 s.
    assert [at - start for at in opened_at] == [0, 1, 3, 7, 15, 31, 61, 62]
    assert [report and report.failures for report in reports] == [1, 2, 3, 4, 5, 6, None, 1, None]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["failures"] for entry in warnings] == [1, 1]
    assert len([entry for entry in logs if entry["log_level"] == "debug"]) == 5
