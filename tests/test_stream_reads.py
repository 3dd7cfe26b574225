"""What the service reads from its streams and files into them, against a real nats-server: given-up
events read, kept as dead letters and deleted over the NATS link; the backlog of every domain."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import trio

from pipeline.events import domain_subject, parse_event
from pipeline.nats_bridge import DeadLetter, EventTooLarge, open_jetstream
from tests.harness import NatsServer, call_event, make_config

DOMAIN = "given-up.example.vn"


async def test_events_are_read_kept_as_dead_letters_and_deleted_each_step_for_all_at_once(nats_server):
    config = make_config(nats_server.url, {DOMAIN: ["http://127.0.0.1:9/"]}).nats
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        with trio.fail_after(10):
            events = [parse_event(json.dumps(call_event(DOMAIN, call_id)).encode()) for call_id in ("a", "b")]
            before = datetime.now(UTC)
            sequences = [receipt.sequence for receipt in await jetstream.publish_batch(events)]
            after = datetime.now(UTC)
            read = await jetstream.stored_events([*sequences, sequences[-1] + 100])
            letters = [
                DeadLetter(DOMAIN, event.event_id, sequence, b'{"letter":%d}' % sequence)
                for event, sequence in zip(events, sequences, strict=True)
            ]
            kept = await jetstream.dead_letters(letters)
            kept_again = await jetstream.dead_letters(letters[:1])
            too_large = await jetstream.dead_letters([DeadLetter(DOMAIN, "big", 1, b"x" * (1024 * 1024 + 1))])
            deleted = await jetstream.delete_events(sequences)
            deleted_again = await jetstream.delete_events(sequences[:1])
            read_after = await jetstream.stored_events(sequences)
            dead, total = await jetstream.newest_messages(10, dead_letters=True)

    first, second, missing = read
    assert [(message.sequence, json.loads(message.data)["call_id"]) for message in (first, second)] == [
        (sequences[0], "a"),
        (sequences[1], "b"),
    ]
    assert first.subject == second.subject == domain_subject(config.subject_pattern, DOMAIN)
    assert before <= first.stored_at <= second.stored_at <= after
    assert missing is None
    # Filing one twice is deduplicated (by the event's sequence), not an error; one over
    # the server's max_payload is refused before it is sent.
    assert kept == [None, None] and kept_again == [None]
    assert [type(outcome) for outcome in too_large] == [EventTooLarge]
    assert total == 2 and sorted(message.data for message in dead) == [b'{"letter":%d}' % n for n in sequences]
    assert deleted == [True, True] and deleted_again == [True]
    assert read_after == [None, None]


async def test_the_backlog_counts_every_domain_beyond_jetstreams_100000_subjects_an_answer(nats_server: NatsServer):
    # JetStream lists at most 100,000 subjects an answer, in order. Domains anyone can
    # invent, sorting first, hid a routed one: after a restart its waiting events were
    # never fetched (its consumer is opened for the domains this reading names).
    config = make_config(nats_server.url, {"z.vn": ["http://127.0.0.1:9/"]}).nats
    invented = [f"{n:07d}.x" for n in range(100_000)]
    async with open_jetstream(config, nats_server.url, 1) as jetstream:
        with trio.fail_after(120):
            stream = await trio.open_tcp_stream("127.0.0.1", int(nats_server.url.rpartition(":")[2]))
            async with stream:
                publishes = b"".join(
                    b"PUB %s 1\r\nx\r\n" % domain_subject(config.subject_pattern, domain).encode()
                    for domain in [*invented, "z.vn"]
                )
                await stream.send_all(b'CONNECT {"verbose":false}\r\n%bPING\r\n' % publishes)
                answered = b""
                while b"PONG" not in answered:
                    answered += await stream.receive_some()
            while True:  # the server stores what it read before its PONG a moment later
                if await nats_server.stream_messages(config.stream_name) == 100_001:
                    break
                await trio.sleep(0.05)
            backlog = await jetstream.backlog(["z.vn"])
    assert backlog.by_domain["z.vn"] == 1
    assert len(backlog.by_domain) == 100_001 and backlog.messages == 100_001
