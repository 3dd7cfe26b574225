"""The dead-letter writer actor: JetStream's "gave up on this event" advisories in, dead letters out."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
import trio

from actors.stats import ForwardOutcome, rfc3339
from pipeline.events import describe, subject_domain
from pipeline.nats_bridge import Delivery, JetStream, PullConsumer, keep_consuming

log = structlog.get_logger(component="dead-letters")

# Advisories filed per fetch; each costs a few bridge crossings.
MAX_BATCH = 64


class DeadLetterWriter:
    """Files every event JetStream stopped delivering as a dead letter, and takes it off the work queue.

    In: the advisories JetStream publishes when an event used up
    ``max_deliveries`` (``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES``), kept
    in the advisory stream, so the ones raised while no instance ran are filed
    at the next start; instances share one consumer of it. Out: one dead letter
    per event (its body, the number of deliveries, and the last errors when
    this instance saw them), then the event is deleted from the event stream
    and the advisory acknowledged. However the last delivery ended — its POSTs
    failed, a crash, a shutdown, a removed route — the event ends here. A step
    that fails leaves the advisory unacknowledged, so it comes back; filing
    twice is deduplicated. An advisory whose event has left the stream (it was
    delivered after all) is simply acknowledged. Runs until ``stopping`` is set.
    Back-pressure: one batch at a time.
    """

    def __init__(
        self,
        jetstream: JetStream,
        last_failure: Callable[[str, int], ForwardOutcome | None],
        stopping: trio.Event,
    ) -> None:
        self._jetstream = jetstream
        self._last_failure = last_failure
        self._stopping = stopping

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._file_forever)
            await self._stopping.wait()
            nursery.cancel_scope.cancel()

    async def _file_forever(self) -> None:
        async def file_batch(consumer: PullConsumer) -> None:
            advisories = await consumer.fetch(MAX_BATCH)
            filed = [advisory for advisory in advisories if await self._file(advisory)]
            if filed:
                await self._jetstream.ack_batch(filed)

        await keep_consuming(self._jetstream, self._jetstream.open_advisory_consumer, file_batch)

    async def _file(self, advisory: Delivery) -> bool:
        """File one advisory's event; True when the advisory is done with."""
        try:
            notice = json.loads(advisory.data)
            sequence = int(notice["stream_seq"])
        except (ValueError, KeyError, TypeError):
            log.error("Ignoring an unreadable advisory", data=advisory.data[:200].decode(errors="replace"))
            return True
        stored = await self._jetstream.stored_event(sequence)
        if stored is None:
            return True  # acknowledged after all, or filed already
        domain = subject_domain(self._jetstream.config.subject_pattern, stored.subject) or ""
        try:
            event: Any = json.loads(stored.data)
        except ValueError:
            event = stored.data.decode(errors="replace")
        fields = (describe(event) if isinstance(event, dict) else {}) | {"domain": domain}
        event_id = str(fields.get("event_id") or f"seq-{sequence}")
        last = self._last_failure(domain, sequence)
        failed_at = last.at if last is not None else datetime.now(UTC)
        envelope = {
            "event_id": event_id,
            "domain": domain,
            "call_id": fields.get("call_id"),
            "failed_at": rfc3339(failed_at),
            "delivery_attempts": notice.get("deliveries"),
            # None when the last attempt was cut short (crash, shutdown, route
            # removed) or another instance made it: its errors were not seen here.
            "errors": last.errors if last is not None else None,
            "event": event,
        }
        await self._jetstream.dead_letter(domain, event_id, sequence, json.dumps(envelope, allow_nan=False).encode())
        await self._jetstream.delete_event(sequence)
        log.error(
            "Event given up after last delivery attempt; kept as a dead letter",
            **fields,
            delivery_attempt=notice.get("deliveries"),
            errors=envelope["errors"],
            stream_sequence=sequence,
        )
        return True
