"""The ingress actor: accepted events in, JetStream receipts out, in batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio
from trio_util import AsyncValue

from pipeline.batching import batches
from pipeline.events import AcceptedEvent
from pipeline.nats_bridge import JetStream, NatsUnavailable, PublishReceipt
from pipeline.routes import Routes

log = structlog.get_logger(component="ingress")

# Largest batch published in one send over the NATS link, and how many batches
# may be in flight at once (their round trips overlap).
MAX_BATCH = 256
CONCURRENT_BATCHES = 4
# Domains already warned about as unrouted; forgotten when full, so a flood of
# invented domains costs a few more warnings, not memory.
MAX_WARNED_DOMAINS = 10_000
_CUT_SHORT = "no answer from JetStream before the request's deadline (the event may be stored)"


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
    until the inbox is closed (the HTTP server has stopped) and drained. A handler
    may instead have its request published in its own task (``publish_now``) while
    nothing waits in the inbox: at a moderate rate every event goes that way.
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
        stored: Callable[[str, PublishReceipt | Exception, AcceptedEvent], None],
    ) -> None:
        self._jetstream = jetstream
        self._requests = requests
        self._routes = routes
        self._storing = storing
        self._stored = stored
        self._warned_unrouted: set[str] = set()
        self._publishing = 0  # batches being published, by this actor's tasks or by handlers

    async def publish_now(self, request: PublishRequest) -> bool:
        """Publish ``request`` in the caller's task, if nothing waits in the inbox and fewer
        than ``CONCURRENT_BATCHES`` are being published; whether it was (then its outcome is set).

        The inbox's way costs this actor's task a step for each event, on top of the
        handler's own; when the service keeps up, every event can skip it. When it does not,
        requests queue in the inbox and go in batches, as before. A publish cut short
        (the caller's deadline) closes the link if it was sending, and settles the
        request as one that timed out.
        """
        if self._publishing >= CONCURRENT_BATCHES or self._requests.statistics().current_buffer_used:
            return False
        await self._publish([request])
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._requests:
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENT_BATCHES):
                    nursery.start_soon(self._publish_batches)
                task_status.started()

    async def _publish_batches(self) -> None:
        async for batch in batches(self._requests, MAX_BATCH):
            await self._publish(batch)

    async def _publish(self, batch: list[PublishRequest]) -> None:
        for request in batch:
            self._storing(request.event.domain)
        self._publishing += 1
        outcomes: list[PublishReceipt | Exception] = []
        try:
            outcomes = await self._jetstream.publish_batch([request.event for request in batch])
        finally:
            self._publishing -= 1
            if not outcomes:  # cut short by the handler's answer deadline: as a publish that timed out
                outcomes = [NatsUnavailable(_CUT_SHORT) for _ in batch]
            for request, outcome in zip(batch, outcomes, strict=True):
                request.outcome = outcome
                request.done.set()
                self._stored(request.event.domain, outcome, request.event)
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
            payload=event.payload,
        )
        if event.domain not in self._routes.value and event.domain not in self._warned_unrouted:
            if len(self._warned_unrouted) >= MAX_WARNED_DOMAINS:
                self._warned_unrouted.clear()
            self._warned_unrouted.add(event.domain)
            log.warning(
                "No route for domain; its events wait in the stream until one is configured",
                domain=event.domain,
            )
