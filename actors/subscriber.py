"""The subscriber actor: one durable pull consumer and one forwarder per routed domain."""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import httpx
import structlog
import trio
import trio_util
from trio_util import AsyncValue

from actors.forwarder import EndpointConnections, Forwarder
from actors.stats import ForwardOutcome
from pipeline.config import Config
from pipeline.events import AcceptedEvent, consumer_name
from pipeline.nats_bridge import (
    IDLE_FETCH_SECONDS,
    ConsumeFailure,
    Delivery,
    FromIngress,
    JetStream,
    NatsUnavailable,
    PublishReceipt,
    PullConsumer,
    keep_consuming,
)
from pipeline.routes import Routes

log = structlog.get_logger(component="subscriber")

# While some routed domains cannot be consumed, one warning says so this often
# (each consumer's own failures after its first are logged at debug).
UNCONSUMABLE_REPORT_SECONDS = 60.0
# Domains named as examples in that warning, the statistics and the dashboard's health.
UNCONSUMABLE_EXAMPLES = 5
# A domain's forwarder takes events straight from the ingress while fewer than this
# many of their attempts are under way (not counting those forwarded and waiting for
# their deletion, which lingers to go in a batch); a domain with more waiting (a flood,
# a slow backend) is fetched in batches by its consumer. Not fewer: at 4, one domain
# at a steady 300 events/s (~1 attempt under way) went over whenever this machine
# paused for a few ms, and its consumer then served it for the rest of its busy
# spell, at ~1.5 x the CPU an event and with p99s of 15-80 ms, not 6-15 (bench/RESULTS.md).
INGRESS_MAX_IN_FLIGHT = 16


@dataclass(eq=False, slots=True)
class _Domain:
    """A routed domain's state: ``woken`` is set when it has work (replaced once that work is
    done), and when its route goes or the service stops; ``consumer_wanted`` says the work is its
    consumer's, not only ``arrivals`` (events the ingress stored and handed over while the domain
    was dormant). ``intake``: the forwarder taking events from the ingress while the domain has
    no consumer.
    """

    woken: trio.Event = field(default_factory=trio.Event)
    consumer_wanted: bool = False
    visiting: bool = False  # a forwarder runs: the domain is not dormant
    arrivals: list[Delivery] = field(default_factory=list)
    intake: _Intake | None = None
    removed: int = 0  # events its intakes deleted from the stream, ever
    feeding: trio.CancelScope | None = None  # its forwarder's feed; cancelled when the route goes or the service stops

    def from_ingress(self) -> int:
        """Events of this domain in the stream that its forwarder has from the ingress, or is about to."""
        return len(self.arrivals) + (self.intake.in_stream if self.intake is not None else 0)


@dataclass(eq=False, slots=True)
class _Intake:
    """A domain's forwarder taking events straight from the ingress, with no consumer.

    ``in_stream`` counts those not yet deleted from the stream; ``unsettled``
    holds the sequences whose attempt goes on; of the settled ones, ``failed``
    holds those whose attempt failed (the consumer's first delivery of each is
    JetStream's count of that attempt) and ``forwarded`` those that reached
    every endpoint but could not be deleted.
    """

    state: _Domain  # the domain's, which counts what its intakes deleted
    forward_now: Callable[[Delivery], None]  # the domain's forwarder's
    room: trio.Semaphore
    woken: trio.Event  # the domain's, when the intake opened: set when the consumer is needed
    last_event_at: float = -math.inf
    in_flight: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))  # taken, not yet settled
    attempts: int = 0  # taken, their attempt under way
    in_stream: int = 0
    unsettled: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    forwarded: set[int] = field(default_factory=set)

    def take(self, delivery: Delivery) -> bool:
        """Forward ``delivery`` now if the forwarder keeps up; whether it was taken."""
        if self.attempts >= INGRESS_MAX_IN_FLIGHT:
            return False
        try:
            self.room.acquire_nowait()
        except trio.WouldBlock:
            return False
        assert isinstance(delivery.handle, FromIngress)
        delivery.handle.on_ended = self._ended
        delivery.handle.on_settled = partial(self._settled, delivery.stream_sequence)
        self.attempts += 1
        self.in_flight.value += 1
        self.unsettled.add(delivery.stream_sequence)
        self.in_stream += 1
        self.last_event_at = trio.current_time()
        self.forward_now(delivery)
        return True

    def _ended(self) -> None:
        self.attempts -= 1

    def _settled(self, sequence: int, forwarded: bool, removed: bool) -> None:
        self.in_flight.value -= 1
        self.unsettled.discard(sequence)
        if removed:
            self.in_stream -= 1
            self.state.removed += 1
        elif forwarded:
            self.forwarded.add(sequence)
            self.woken.set()
        else:
            self.failed.add(sequence)
            self.woken.set()

    async def all_settled(self) -> None:
        await self.in_flight.wait_value(0)


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    in_flight: int
    in_flight_by_domain: dict[str, int]
    consuming: int  # routed domains with work now, each with its consumer and forwarder
    # Routed domains whose consumer cannot be opened or keeps failing, and a few of them (by name).
    unconsumable: int
    unconsumable_examples: dict[str, ConsumeFailure]


class Subscriber:
    """Feeds each routed domain's forwarder, from the ingress or from the domain's own consumer, while it has work.

    In: the routes, followed as they change; each event the ingress stores
    (``stored``); wakes (``wake``, ``wake_waiting``) for domains with events
    waiting in the stream: from each reading of the backlog (events other
    instances stored, events waiting since before the start, redeliveries),
    replays, and events the ingress stored that no forwarder took. Out:
    ``Delivery`` to ``forwarder[domain]``, never more than the forwarder has
    room for (its ``room`` semaphore counts free in-flight slots; a fetch asks
    for exactly those), so no message waits in memory while its ack_wait runs
    out, and a domain whose backend hangs takes no more while the others go on.

    A routed domain is dormant until it has work: no consumer, no forwarder,
    no fetch, so idle tenants cost next to nothing. An event the ingress
    stores for a dormant domain starts its forwarder, which takes that event
    and the next ones straight from the ingress while it keeps up (fewer than
    ``INGRESS_MAX_IN_FLIGHT`` in flight; no consumer, no fetch; a forwarded
    event is deleted from the stream rather than acked). The domain's
    consumer is opened only when events wait in the stream for it: one came
    while the forwarder was behind, failed (the consumer's first
    delivery of it stands for that attempt, so ``max_deliveries`` counts it),
    was stored elsewhere or before the start, or a wake came. It opens at
    once, while events taken from the ingress are still being forwarded: its
    first delivery of one of those stands for that attempt and is left
    unacked, so none goes out twice at once. The consumer is fetched while
    fetches bring events. After
    ``nats.consumer_idle_seconds`` with nothing to do, the consumer is
    deleted if drained (nothing waiting, nothing unacknowledged) and the
    domain is dormant again. A
    domain that loses its route stops being fed, and its forwarder finishes
    its in-flight events and retires (its undelivered events stay in the
    stream). A domain whose consumer cannot be opened (or keeps failing) is
    retried with a growing pause; ``statistics()`` counts such domains and one
    warning per ``UNCONSUMABLE_REPORT_SECONDS`` names a few. Runs until
    ``stopping`` is set: then it stops fetching, closes every forwarder's inbox,
    waits for them to finish their in-flight events, and closes its acks and
    outcomes channels.
    """

    def __init__(
        self,
        jetstream: JetStream,
        routes: AsyncValue[Routes],
        acks: trio.MemorySendChannel[Delivery],
        outcomes: trio.MemorySendChannel[ForwardOutcome],
        config: Config,
        stopping: trio.Event,
    ) -> None:
        self._jetstream = jetstream
        self._routes = routes
        self._acks = acks
        self._outcomes = outcomes
        self._forwarders: dict[str, Forwarder] = {}
        self._connections = EndpointConnections(config.forwarding, httpx.create_ssl_context())
        self._retirements: dict[str, trio.Event] = {}  # routed domain → set when its route goes
        self._domains: dict[str, _Domain] = {}  # routed domain → its state
        self._unconsumable: dict[str, ConsumeFailure] = {}  # routed domain → why its consumer fails
        self._storing: Counter[str] = Counter()  # domain → events the ingress is publishing
        self._config = config
        self._stopping = stopping

    def routes(self) -> Routes:
        """The routes being followed."""
        return self._routes.value

    def statistics(self) -> SubscriberStatistics:
        in_flight = {domain: forwarder.in_flight for domain, forwarder in self._forwarders.items()}
        return SubscriberStatistics(
            in_flight=sum(in_flight.values()),
            in_flight_by_domain=in_flight,
            consuming=len(self._forwarders),
            unconsumable=len(self._unconsumable),
            unconsumable_examples=self._unconsumable_examples(),
        )

    def _unconsumable_examples(self) -> dict[str, ConsumeFailure]:
        return {domain: self._unconsumable[domain] for domain in sorted(self._unconsumable)[:UNCONSUMABLE_EXAMPLES]}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._acks, self._outcomes:
            try:
                await self._follow_routes(task_status)
            finally:
                await self._connections.aclose()

    async def _follow_routes(self, task_status: trio.TaskStatus[None]) -> None:
        """Serve every routed domain, as the routes change, until the service stops and every forwarder finished."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio_util.wait_any, self._stopping.wait, self._report_unconsumable, self._connections.keep_fresh
            )
            while not self._stopping.is_set():
                routes = self._routes.value
                for domain in [d for d in self._retirements if d not in routes]:
                    log.info("Route removed; retiring the domain's forwarder", domain=domain)
                    self._retirements.pop(domain).set()
                    self.wake(domain)
                    self._stop_feeding(domain)
                for domain in [d for d in routes if d not in self._retirements]:
                    retire = self._retirements[domain] = trio.Event()
                    await nursery.start(self._serve_domain, domain, retire)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio_util.wait_any(
                    self._stopping.wait, partial(self._routes.wait_value, partial(operator.is_not, routes))
                )
            task_status.started()  # stopping before the first round: nothing to serve
            for domain, state in self._domains.items():
                state.woken.set()
                self._stop_feeding(domain)

    def _stop_feeding(self, domain: str) -> None:
        """End the feed of ``domain``'s forwarder, if one runs: its route went, or the service stops."""
        state = self._domains.get(domain)
        if state is not None and state.feeding is not None:
            state.feeding.cancel()

    async def _report_unconsumable(self) -> None:
        """Once per interval, while some routed domains cannot be consumed: one warning for them all."""
        async for _ in trio_util.periodic(UNCONSUMABLE_REPORT_SECONDS):
            if self._unconsumable:
                examples = self._unconsumable_examples()
                routed = "routed domain" if len(self._unconsumable) == 1 else "routed domains"
                log.warning(
                    f"{len(self._unconsumable)} {routed} cannot be consumed",
                    count=len(self._unconsumable),
                    examples={domain: failure.error for domain, failure in examples.items()},
                )

    def _report_consuming(self, domain: str, failure: ConsumeFailure | None) -> None:
        if failure is None:
            self._unconsumable.pop(domain, None)
        else:
            self._unconsumable[domain] = failure

    def wake(self, domain: str) -> None:
        """``domain`` has events waiting for its consumer (seen in the stream, replayed, stored but
        not taken from the ingress), or its route went, or the service stops."""
        state = self._domains.get(domain)
        if state is not None:
            state.consumer_wanted = True
            state.woken.set()

    def storing(self, domain: str) -> None:
        """The ingress publishes an event for ``domain``; ``stored`` follows, whatever the outcome.

        Until then a reading of the backlog may count the event already, and
        must not take it for one waiting for the consumer.
        """
        self._storing[domain] += 1

    def stored(self, domain: str, outcome: PublishReceipt | Exception, event: AcceptedEvent) -> None:
        """The ingress stored an event for ``domain`` (or failed to: ``outcome`` is the error).

        A stored event is handed over, or the domain's consumer is woken.

        A dormant domain takes it straight from memory, and so does a domain
        whose forwarder does so already, while it keeps up: no consumer, no
        fetch; the event leaves the stream once it reached every endpoint.
        Otherwise (a consumer serves the domain, the forwarder is behind, a
        repeat of an event already stored) the domain's consumer is woken to
        fetch it.
        """
        self._storing[domain] -= 1
        if not self._storing[domain]:
            del self._storing[domain]
        state = self._domains.get(domain)
        if state is None or isinstance(outcome, Exception):
            return
        receipt = outcome
        dormant = not (state.visiting or state.consumer_wanted)
        if not receipt.duplicate and (state.intake is not None or dormant):
            delivery = Delivery.from_ingress(event, receipt.sequence)
            if state.intake is not None and state.intake.take(delivery):
                return
            if dormant and len(state.arrivals) < INGRESS_MAX_IN_FLIGHT:
                state.arrivals.append(delivery)
                state.woken.set()
                return
        self.wake(domain)

    def begin_reading(self) -> Callable[[Mapping[str, int]], None]:
        """A reading of the backlog begins: the function to give its waiting events by domain.

        The reading comes over nats-py's connection and the deletions over
        another: by the time it arrives, events it counts may be gone.
        """
        removed_before = {domain: state.removed for domain, state in self._domains.items() if state.removed}
        return partial(self.wake_waiting, removed_before)

    def wake_waiting(self, removed_before: Mapping[str, int], waiting_by_domain: Mapping[str, int]) -> None:
        """Wake every domain with more events in the stream (a reading of the backlog) than it has
        from the ingress (taken, about to be, being stored, or deleted since the reading began)."""
        for domain, waiting in waiting_by_domain.items():
            state = self._domains.get(domain)
            if state is None:
                continue
            deleted_since = state.removed - removed_before.get(domain, 0)
            if waiting > state.from_ingress() + self._storing[domain] + deleted_since:
                self.wake(domain)

    async def _serve_domain(self, domain: str, retire: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        """Consume ``domain`` whenever it has work, until its route goes or the service stops.

        Dormant, a domain costs one waiting task: no consumer, no forwarder, no
        fetch. Its route going and the service stopping wake it too.
        """
        state = self._domains[domain] = _Domain()
        task_status.started()
        try:
            while not (self._stopping.is_set() or retire.is_set()):
                await state.woken.wait()
                if not (self._stopping.is_set() or retire.is_set()):
                    state.visiting = True
                    try:
                        await self._consume(domain, state, retire)
                    finally:
                        state.visiting = False
        finally:
            # A route that came back meanwhile has a task of its own by now.
            if self._domains.get(domain) is state:
                del self._domains[domain]
                self._unconsumable.pop(domain, None)
        if retire.is_set() and not self._stopping.is_set():
            await self._delete_consumer_when_idle(domain)

    async def _delete_consumer_when_idle(self, domain: str) -> None:
        """Its route gone, the domain's consumer is deleted as an idle one is: after
        ``nats.consumer_idle_seconds`` (its last acks have landed by then), if drained. Unless the
        route came back (its own task has the consumer) or the service stops first. Left on the
        server, the consumers of removed routes would count against the stream's consumer limit."""
        with trio.move_on_after(self._config.nats.consumer_idle_seconds):
            await self._stopping.wait()
            return
        if domain in self._routes.value:
            return
        try:
            if await self._jetstream.delete_consumer_if_drained(self._config.nats.stream_name, consumer_name(domain)):
                log.info("Consumer of a removed route deleted", domain=domain)
        except NatsUnavailable as error:
            log.warning("Cannot delete the consumer of a removed route", domain=domain, error=str(error))

    async def _consume(self, domain: str, state: _Domain, retire: trio.Event) -> None:
        """Run the domain's forwarder and feed it, from the ingress while it can and from the
        domain's consumer after that, until it is idle, the route goes or the service stops; then
        let the forwarder finish."""
        max_in_flight = self._config.forwarding.max_in_flight_per_domain
        room = trio.Semaphore(max_in_flight)
        send, receive = trio.open_memory_channel[Delivery](max_in_flight)
        forwarder = Forwarder(
            domain,
            receive,
            self._acks.clone(),
            self._outcomes.clone(),
            room,
            self._routes,
            self._config.forwarding,
            max_deliveries=self._config.nats.max_deliveries,
            grace_seconds=self._config.server.shutdown_grace_seconds,
            connections=self._connections,
        )
        self._forwarders[domain] = forwarder
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(forwarder.run)
                # Not a wait_any on the stop and the retirement: a visit lingers for
                # nats.consumer_idle_seconds, and its tasks are most of what an active
                # domain holds (the garbage collector scans them all).
                with send, trio.CancelScope() as state.feeding:
                    if not (self._stopping.is_set() or retire.is_set()):
                        await self._feed(domain, state, send, forwarder.forward_now, room)
                state.feeding = None
        finally:
            if self._forwarders.get(domain) is forwarder:
                del self._forwarders[domain]

    async def _feed(
        self,
        domain: str,
        state: _Domain,
        forwarder: trio.MemorySendChannel[Delivery],
        forward_now: Callable[[Delivery], None],
        room: trio.Semaphore,
    ) -> None:
        """Feed the forwarder from the ingress, if an event the ingress stored woke the domain, until
        the domain's consumer is needed (or the intake was idle for ``nats.consumer_idle_seconds``);
        then, if needed, from the consumer."""
        arrivals, state.arrivals = state.arrivals, []
        intake = None
        if arrivals and not state.consumer_wanted:
            # A wake from now on is work for the consumer.
            state.woken = trio.Event()
            intake = _Intake(state, forward_now, room, state.woken)
            for delivery in arrivals:
                if not intake.take(delivery):
                    state.woken.set()  # no room (a smaller max_in_flight_per_domain): the consumer fetches it
            del arrivals, delivery  # not held while the intake lingers
            state.intake = intake
            idle_seconds = self._config.nats.consumer_idle_seconds
            try:
                while not state.woken.is_set():
                    with trio.move_on_at(intake.last_event_at + idle_seconds):
                        await state.woken.wait()
                    if state.woken.is_set():
                        break
                    if intake.in_flight.value:
                        await trio_util.wait_any(intake.all_settled, state.woken.wait)
                    elif trio.current_time() >= intake.last_event_at + idle_seconds:
                        return
            finally:
                state.intake = None  # the ingress's events go to the consumer from now on
        # At once, not once the events the intake took have settled: a backend that
        # hangs would hold the domain's next events back until those time out (and
        # then send them all at once).
        await self._fetch_while_busy(domain, state, forwarder, room, intake)

    async def _fetch_while_busy(
        self,
        domain: str,
        state: _Domain,
        forwarder: trio.MemorySendChannel[Delivery],
        room: trio.Semaphore,
        intake: _Intake | None,
    ) -> None:
        """Fetch into the forwarder's room; return once the consumer was deleted for idleness.

        While fetches bring events of a busy domain (its previous events came
        less than a long poll ago) or say more are waiting, it fetches again at
        once (a fetch with nothing waiting long-polls for a few seconds, so a
        busy domain's next event, or a redelivery, arrives on a waiting
        request); a sparse domain's next event comes with a wake instead. Once a
        fetch comes back empty, it fetches again only when woken. If its
        forwarder finishes first, it waits for a wake up to
        ``nats.consumer_idle_seconds``, then deletes the consumer, if drained
        (nothing waiting, nothing unacknowledged). An event it leaves unacked is
        still in the stream: the next backlog reading wakes the domain, whose
        first fetch then waits for the redelivery.
        """
        max_in_flight = self._config.forwarding.max_in_flight_per_domain
        # Taken from the ingress and still being forwarded as the consumer opens: it may
        # deliver them too, even after their attempt deleted them from the stream.
        going_from_ingress = set(intake.unsettled) if intake is not None else set()

        async def fetch_into_room(consumer: PullConsumer) -> bool:
            await room.acquire()
            wanted = 1
            while wanted < max_in_flight:
                try:
                    room.acquire_nowait()
                except trio.WouldBlock:
                    break
                wanted += 1
            deliveries: list[Delivery] = []
            try:
                deliveries = await consumer.fetch(wanted)
            finally:
                for _ in range(wanted - len(deliveries)):
                    room.release()
            tried_from_ingress = intake.failed if intake is not None else set()
            forwarded_from_ingress = intake.forwarded if intake is not None else set()
            for delivery in deliveries:
                sequence = delivery.stream_sequence
                if sequence in forwarded_from_ingress:
                    # It reached every endpoint from the ingress; only its deletion failed.
                    forwarded_from_ingress.discard(sequence)
                    room.release()
                    await self._acks.send(delivery)
                elif delivery.delivery_attempt == 1 and (
                    sequence in tried_from_ingress or sequence in going_from_ingress
                ):
                    # JetStream's count of the attempt made from the ingress (failed, or
                    # going on as the consumer opened): left unacked, it comes again after
                    # ack_wait as the second, unless that attempt deleted it.
                    tried_from_ingress.discard(sequence)
                    going_from_ingress.discard(sequence)
                    room.release()
                else:
                    # The channel holds max_in_flight and the room semaphore
                    # admits no more, so this never blocks.
                    forwarder.send_nowait(delivery)
            return bool(deliveries)

        async def all_forwarded() -> None:
            taken = 0
            try:
                while taken < max_in_flight:
                    await room.acquire()
                    taken += 1
            finally:
                for _ in range(taken):
                    room.release()

        last_events_at = -math.inf

        async def serve(consumer: PullConsumer) -> None:
            nonlocal last_events_at
            # A wake from now on means work this fetch may not see.
            state.woken = trio.Event()
            state.consumer_wanted = False
            fetched_at = trio.current_time()
            if await fetch_into_room(consumer):
                busy = fetched_at - last_events_at < IDLE_FETCH_SECONDS
                last_events_at = fetched_at
                if consumer.more_waiting or busy:
                    return
                # Nothing more waiting, and events come further apart than a fetch
                # lingers: the next one comes with a wake, and a lingering fetch would
                # only expire (thousands of sparse tenants, thousands of such fetches).
            if not state.woken.is_set():
                await trio_util.wait_any(all_forwarded, state.woken.wait)
            if state.woken.is_set():
                return
            with trio.move_on_after(self._config.nats.consumer_idle_seconds):
                await state.woken.wait()
                return
            if await consumer.delete_if_drained():
                log.debug("Consumer deleted; the domain had nothing to do", consumer=consumer.name)
                idle.cancel()

        with structlog.contextvars.bound_contextvars(domain=domain), trio.CancelScope() as idle:
            await keep_consuming(
                self._jetstream,
                partial(self._jetstream.open_consumer, domain, max_in_flight),
                serve,
                partial(self._report_consuming, domain),
            )
