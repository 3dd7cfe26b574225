"""Unit tests of the ingress actor's own logic (in-process, on a mock clock)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import trio
import trio.testing
from trio_util import AsyncValue

from actors.ingress import Ingress, PublishRequest
from pipeline.events import AcceptedEvent, parse_event
from pipeline.nats_bridge import JetStream, NatsUnavailable, PublishReceipt


class _UnansweredJetStream:
    """Stands for a JetStream that never answers a publish (the part of it the actor uses)."""

    async def publish_batch(self, events: Sequence[AcceptedEvent]) -> list[PublishReceipt | Exception]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_handler_publish_cut_short_by_its_deadline_is_settled_as_a_timed_out_one(
    autojump_clock: trio.testing.MockClock,
):
    # The subscriber counts each event between storing and stored: a publish cut
    # short must still end in stored, or the domain's backlog readings stay skewed.
    storing: list[str] = []
    stored: list[tuple[str, PublishReceipt | Exception]] = []
    _, inbox = trio.open_memory_channel[PublishRequest](8)
    ingress = Ingress(
        cast(JetStream, _UnansweredJetStream()),
        inbox,
        AsyncValue({}),
        storing.append,
        lambda domain, outcome, payload: stored.append((domain, outcome)),
    )
    request = PublishRequest(parse_event(b'{"domain": "a.vn", "event_id": "e-1"}'))
    with trio.move_on_after(7) as deadline:
        await ingress.publish_now(request)
    assert deadline.cancelled_caught
    assert request.done.is_set()
    assert isinstance(request.outcome, NatsUnavailable)
    assert storing == ["a.vn"]
    assert stored == [("a.vn", request.outcome)]
    # The slot it held is free again: the next request is published in its handler's task too.
    second = PublishRequest(parse_event(b'{"domain": "a.vn", "event_id": "e-2"}'))
    with trio.move_on_after(7):
        await ingress.publish_now(second)
    assert second.done.is_set()
    assert storing == ["a.vn", "a.vn"]
