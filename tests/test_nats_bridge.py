"""Unit tests of the NATS bridge's own logic (in-process, on a mock clock).

The bridge against a real nats-server is exercised by the scenario tests: the size
check before publishing by tests/test_ingress_scenarios.py (413), refusals by
tests/test_retention_scenarios.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast
from urllib.parse import urlparse

import trio
import trio.testing
from structlog.testing import capture_logs
from trio_util import AsyncBool

from pipeline.nats_bridge import (
    ConsumeFailure,
    JetStream,
    NatsUnavailable,
    PullConsumer,
    keep_consuming,
    with_configured_credentials,
)


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
    quiet = [entry for entry in logs if entry["log_level"] == "debug" and entry["event"].startswith("Consumer inter")]
    assert [entry["failures"] for entry in quiet] == [2, 3, 4, 5, 6]


def test_the_link_goes_to_nats_pys_server_with_the_configured_credentials():
    # A cluster's other nodes, as nats-py finds them, come without credentials;
    # the link, like nats-py, uses the configured ones for them.
    configured = "nats://app:s%40cret@127.0.0.1:4222, nats://127.0.0.1:4224"
    discovered = with_configured_credentials(urlparse("nats://127.0.0.1:4223"), configured)
    assert discovered.geturl() == "nats://app:s%40cret@127.0.0.1:4223"
    own = with_configured_credentials(urlparse("nats://other:pw@127.0.0.1:4222"), configured)
    assert own.geturl() == "nats://other:pw@127.0.0.1:4222"
    none = with_configured_credentials(urlparse("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222")
    assert none.geturl() == "nats://127.0.0.1:4222"
