"""The ingress actor against a real nats-server: a handler's own publish, cut short by its deadline."""

from __future__ import annotations

import trio
from trio_util import AsyncValue

from actors.ingress import Ingress, PublishRequest
from pipeline.events import parse_event
from pipeline.nats_bridge import NatsUnavailable, PublishReceipt, open_jetstream
from tests.harness import NatsServer, make_config

DOMAIN = "ingress.example.vn"


async def test_a_handler_publish_cut_short_by_its_deadline_is_settled_as_a_timed_out_one(nats_server: NatsServer):
    # The subscriber counts each event between storing and stored: a publish cut
    # short must still end in stored, or the domain's backlog readings stay skewed.
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    storing: list[str] = []
    stored: list[tuple[str, PublishReceipt | Exception]] = []
    _, inbox = trio.open_memory_channel[PublishRequest](8)
    with trio.fail_after(30):
        async with open_jetstream(config, nats_server.url, 1) as jetstream:
            ingress = Ingress(
                jetstream,
                inbox,
                AsyncValue({}),
                storing.append,
                lambda domain, outcome, event: stored.append((domain, outcome)),
            )
            first = PublishRequest(parse_event(b'{"domain": "ingress.example.vn", "event_id": "e-1"}'))
            assert await ingress.publish_now(first)
            assert isinstance(first.outcome, PublishReceipt)

            # A server that stops answering (SIGSTOP), and a handler whose deadline
            # comes before the publish timeout (5 s) would.
            cut = PublishRequest(parse_event(b'{"domain": "ingress.example.vn", "event_id": "e-2"}'))
            with nats_server.frozen(), trio.move_on_after(1) as deadline:
                await ingress.publish_now(cut)
            assert deadline.cancelled_caught
            assert cut.done.is_set()
            assert isinstance(cut.outcome, NatsUnavailable)
            assert storing == [DOMAIN, DOMAIN]
            assert stored == [(DOMAIN, first.outcome), (DOMAIN, cut.outcome)]

            # The slot it held is free again: the next request is published in its handler's task too.
            third = PublishRequest(parse_event(b'{"domain": "ingress.example.vn", "event_id": "e-3"}'))
            assert await ingress.publish_now(third)
            assert isinstance(third.outcome, PublishReceipt)
            assert storing == [DOMAIN] * 3
