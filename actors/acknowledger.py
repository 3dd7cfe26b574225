"""The acknowledger actor: forwarded deliveries in, acks to JetStream out, in batches."""

from __future__ import annotations

import trio

from pipeline.batching import batches
from pipeline.nats_bridge import Delivery, JetStream

# Most acks (and deletions of events forwarded from the ingress) sent together.
MAX_BATCH = 1024
# How long an ack waits for others to share its send. Nobody waits on an
# ack (ack_wait is seconds), so 50 ms cost nothing; at a moderate rate they
# turn one send and one answer an event (each a wake of this process and of
# nats-server) into one per batch of ~15 (bench/RESULTS.md: at 300 events/s
# 0.90 x the service's CPU and 0.57 x nats-server's against 5 ms).
LINGER_SECONDS = 0.05


class Acknowledger:
    """Acknowledges deliveries whose event reached every endpoint.

    In: ``Delivery`` from every forwarder (each holds a clone of the send end).
    Out: acks to JetStream (all that are waiting in one write over the NATS
    link) and deletions of events forwarded from the ingress (in one more).
    Returns when every forwarder has closed its end and the last acks are
    sent, which the NATS bridge flushes as it closes. Back-pressure: the bounded inbox.
    """

    def __init__(self, jetstream: JetStream, deliveries: trio.MemoryReceiveChannel[Delivery]) -> None:
        self._jetstream = jetstream
        self._deliveries = deliveries

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self._deliveries:
            async for batch in batches(self._deliveries, MAX_BATCH, linger_seconds=LINGER_SECONDS):
                await self._jetstream.ack_batch(batch)
