"""The ingress actor: accepted events in, JetStream receipts out, in batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio
from trio_util import AsyncValue

from pipeline.batching import batches
from pipeline.events import AcceptedEvent
from pipeline.nats_bridge import JetStream, PublishReceipt
from pipeline.routes import Routes

log = structlog.get_logger(component="ingress")

# Largest batch published in one send over the NATS link, and how many batches
# may be in flight at once (their round trips overlap).
MAX_BATCH = 256
CONCURRENT_BATCHES = 4
# Domains already warned about as unrouted; forgotten when full, so a flood of
# invented domains costs a few more warnings, not memory.
MAX_WARNED_DOMAINS = 10_000


@dataclass(eq=False, slots=True)
class PublishRequest:
    """One POST /events waiting for its event to be stored."""

    event: AcceptedEvent
    done: trio.Event = field(default_factory=trio.Event)
    outcome: PublishReceipt | Exception | None = None


class Ingress:
    """Publishes accepted events to JetStream and answers each request.

    In: ``PublishRequest`` from the HTTP handlers. Out: each request's outcome
    (its receipt or the error), set before its ``done`` event. Whatever is
    waiting in the inbox is published together, in one send over the NATS link. Runs
    until the inbox is closed (the HTTP server has stopped) and drained.
    The subscriber hears of each event before its publish (``storing``) and
    of its outcome after (``stored``): it hands a stored event to its domain's
    forwarder at once or wakes the domain's consumer.
    Back-pressure: the bounded inbox; a full one makes handlers wait.
    """

    def __init__(
        self,
        jetstream: JetStream,
        requests: trio.MemoryReceiveChannel[PublishRequest],
        routes: AsyncValue[Routes],
        storing: Callable[[str], None],
        stored: Callable[[str, PublishReceipt | Exception, bytes], None],
    ) -> None:
        self._jetstream = jetstream
        self._requests = requests
        self._routes = routes
        self._storing = storing
        self._stored = stored
        self._warned_unrouted: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._requests:
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENT_BATCHES):
                    nursery.start_soon(self._publish_batches)
                task_status.started()

    async def _publish_batches(self) -> None:
        async for batch in batches(self._requests, MAX_BATCH):
            for request in batch:
                self._storing(request.event.domain)
            outcomes = await self._jetstream.publish_batch([request.event for request in batch])
            for request, outcome in zip(batch, outcomes, strict=True):
                request.outcome = outcome
                request.done.set()
                self._stored(request.event.domain, outcome, request.event.payload)
                self._log(request.event, outcome)

    def _log(self, event: AcceptedEvent, outcome: PublishReceipt | Exception) -> None:
        if isinstance(outcome, Exception):
            log.error("Failed to publish event", **event.fields, error=str(outcome) or type(outcome).__name__)
            return
        log.info(
            "Event received and published",
            **event.fields,
            sequence=outcome.sequence,
            duplicate=outcome.duplicate,
            payload=event.event,
        )
        if event.domain not in self._routes.value and event.domain not in self._warned_unrouted:
            if len(self._warned_unrouted) >= MAX_WARNED_DOMAINS:
                self._warned_unrouted.clear()
            self._warned_unrouted.add(event.domain)
            log.warning(
                "No route for domain; its events wait in the stream until one is configured",
                domain=event.domain,
            )
