"""CPU per publish: the service's ``JetStream.publish_batch`` of one event at a time, against the embedded server.

Run from the project root:

    python bench/nats_requests.py [EVENTS]
    PYTHONPATH=/path/to/an/older/tree python bench/nats_requests.py   # the same for older code

One event per call, each awaited before the next: the pattern of a moderate
rate, where nothing batches. Prints the service process's CPU (not the
server's) per publish, three rounds of EVENTS each, and their median.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog
import trio
from harness import free_port

from pipeline.config import NatsConfig
from pipeline.embedded_nats import EmbeddedNats
from pipeline.events import parse_event
from pipeline.nats_bridge import PublishReceipt, open_jetstream

DOMAINS = 20
ROUNDS = 3


async def measure(events: int) -> list[float]:
    store = Path(tempfile.mkdtemp(prefix="tf-nats-requests-"))
    server = EmbeddedNats(store / "nats", port=free_port(), monitor_port=free_port())
    per_publish_us = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        config = NatsConfig(url=server.url, max_bytes=10**8, dead_letter_max_bytes=10**7)
        async with open_jetstream(config, server.url, DOMAINS) as jetstream:
            for _ in range(ROUNDS):
                batch = [
                    parse_event(b'{"call_id":"c1","domain":"tenant-%d.example.vn","state":"missed"}' % (n % DOMAINS))
                    for n in range(events)
                ]
                started = time.process_time()
                for event in batch:
                    (outcome,) = await jetstream.publish_batch([event])
                    assert isinstance(outcome, PublishReceipt), outcome
                per_publish_us.append((time.process_time() - started) / events * 1e6)
        nursery.cancel_scope.cancel()
    return per_publish_us


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    found = trio.run(measure, events)
    rounds = ", ".join(f"{us:.0f}" for us in found)
    print(f"CPU µs per publish, {ROUNDS} rounds of {events}: {rounds}; median {statistics.median(found):.0f}")


if __name__ == "__main__":
    main()
