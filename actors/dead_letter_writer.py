"""The dead-letter writer actor: JetStream's "gave up on this event" advisories in, dead letters out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import trio

from actors.stats import ForwardOutcome, rfc3339
from pipeline.events import describe, event_json, parse_strict_json, subject_domain
from pipeline.nats_bridge import (
    DEAD_LETTER_ROOM,
    DeadLetter,
    Delivery,
    EventTooLarge,
    JetStream,
    NatsUnavailable,
    PullConsumer,
    StoredMessage,
    keep_consuming,
)

log = structlog.get_logger(component="dead-letters")

# Advisories filed per fetch, and how many of them are filed together: each step (read the
# events, store the letters, delete the events) is one send over the NATS link for those.
# Not more together: events may be up to max_payload (1 MiB) each, and the answers to 64
# reads would be ~90 MB at once (base64), in memory and in what the server holds for this
# connection (64 MiB by default before it drops a slow client).
MAX_BATCH = 64
FILED_TOGETHER = 8
# What a dead letter may add around its event: the ingress keeps DEAD_LETTER_ROOM of NATS's
# max_payload for it, half of that for the letter's headers.
MAX_LETTER_OVERHEAD = DEAD_LETTER_ROOM // 2
# A longer call_id is cut in the letter's own fields (the event keeps it whole).
MAX_CALL_ID_SHOWN = 256


@dataclass(frozen=True, slots=True)
class _Letter:
    """A dead letter being filed, with the advisory that asked for it and what its log line says."""

    advisory: Delivery
    stored: DeadLetter
    fields: dict[str, Any]
    deliveries: int | None
    errors: dict[str, str] | None


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
            filed = []
            for start in range(0, len(advisories), FILED_TOGETHER):
                filed += await self._file(advisories[start : start + FILED_TOGETHER])
            if filed:
                await self._jetstream.ack_batch(filed)

        await keep_consuming(self._jetstream, self._jetstream.open_advisory_consumer, file_batch)

    async def _file(self, advisories: list[Delivery]) -> list[Delivery]:
        """File the advisories' events, each step for all of them at once; the advisories done with.

        An advisory is done with once its event is filed and deleted, or is no
        longer in the stream, or when it cannot be read; any other is left for
        JetStream to deliver again. Raises ``NatsUnavailable`` when NATS does not
        answer (the batch then comes again).
        """
        notices: dict[int, tuple[Delivery, dict[str, Any]]] = {}  # by the event's sequence
        done: list[Delivery] = []
        for advisory in advisories:
            try:
                notice = json.loads(advisory.data)
                notices[int(notice["stream_seq"])] = (advisory, notice)
            except (ValueError, KeyError, TypeError):
                log.error("Ignoring an unreadable advisory", data=advisory.data[:200].decode(errors="replace"))
                done.append(advisory)
        letters: list[_Letter] = []
        stored_events = await self._jetstream.stored_events(list(notices)) if notices else []
        for (sequence, (advisory, notice)), stored in zip(notices.items(), stored_events, strict=True):
            if stored is None:
                done.append(advisory)  # acknowledged after all, or filed already
            elif isinstance(stored, Exception):
                raise stored  # NATS is out of reach: the batch comes again
            else:
                letters.append(self._letter(advisory, notice, sequence, stored))
        filed: list[_Letter] = []
        outcomes = await self._jetstream.dead_letters([letter.stored for letter in letters]) if letters else []
        for letter, failure in zip(letters, outcomes, strict=True):
            if failure is None:
                filed.append(letter)
            elif isinstance(failure, EventTooLarge):
                # Its event waits in the stream, and its advisory comes again after ack_wait.
                log.error(
                    "Cannot keep a given-up event as a dead letter: too large",
                    stream_sequence=letter.stored.stream_sequence,
                    error=str(failure),
                )
            else:
                # Not stored (NATS out of reach, or the stream refusing it): the batch comes again once
                # the consumer is open again, and filing twice is deduplicated.
                raise NatsUnavailable(f"cannot store a dead letter: {failure}") from failure
        deleted = (
            await self._jetstream.delete_events([letter.stored.stream_sequence for letter in filed]) if filed else []
        )
        for letter, gone in zip(filed, deleted, strict=True):
            if not gone:
                continue  # filed: its advisory comes again, and filing twice is deduplicated
            log.error(
                "Event given up after last delivery attempt; kept as a dead letter",
                **letter.fields,
                delivery_attempt=letter.deliveries,
                errors=letter.errors,
                stream_sequence=letter.stored.stream_sequence,
            )
            done.append(letter.advisory)
        return done

    def _letter(self, advisory: Delivery, notice: dict[str, Any], sequence: int, stored: StoredMessage) -> _Letter:
        """The dead letter of the event stored at ``sequence``, which ``advisory`` says was given up."""
        domain = subject_domain(self._jetstream.config.subject_pattern, stored.subject) or ""
        try:
            event: Any = parse_strict_json(stored.data)
        except ValueError:
            event = stored.data.decode(errors="replace")
        fields = (describe(event) if isinstance(event, dict) else {}) | {"domain": domain}
        event_id = str(fields.get("event_id") or f"seq-{sequence}")
        last = self._last_failure(domain, sequence)
        failed_at = last.at if last is not None else datetime.now(UTC)
        errors = last.errors if last is not None else None
        letter_fields = {
            "event_id": event_id,
            "domain": domain,
            "call_id": fields.get("call_id"),
            "failed_at": rfc3339(failed_at),
            "delivery_attempts": notice.get("deliveries"),
            # None when the last attempt was cut short (crash, shutdown, route
            # removed) or another instance made it: its errors were not seen here.
            "errors": errors,
        }
        envelope = _envelope(letter_fields, event)
        if len(envelope) - len(stored.data) > MAX_LETTER_OVERHEAD:
            # A long call_id (repeated from the event) or many long errors: shortened, so that
            # every event accepted fits in its dead letter. The event is kept whole, the errors
            # are in the log line below.
            letter_fields["call_id"] = _shortened(letter_fields["call_id"])
            if errors:
                letter_fields["errors"] = {"(all endpoints)": f"{len(errors)} failed; their errors are in the log"}
            envelope = _envelope(letter_fields, event)
        stored_letter = DeadLetter(domain, event_id, sequence, envelope)
        return _Letter(advisory, stored_letter, fields, notice.get("deliveries"), errors)


def _envelope(letter_fields: dict[str, Any], event: Any) -> bytes:
    """The dead letter's JSON: its own fields, then the event, compact as the stream stores it."""
    head = json.dumps(letter_fields, separators=(",", ":"), allow_nan=False).encode()
    try:
        body = event_json(event) if isinstance(event, dict) else json.dumps(event, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # an unpaired surrogate (stored by an older version): JSON escapes it
        body = json.dumps(event, separators=(",", ":")).encode()
    return b'%b,"event":%b}' % (head[:-1], body)


def _shortened(call_id: Any) -> Any:
    shown = call_id if isinstance(call_id, str) else json.dumps(call_id, ensure_ascii=False)
    return call_id if len(shown) <= MAX_CALL_ID_SHOWN else f"{shown[:MAX_CALL_ID_SHOWN]}… (see the event)"
