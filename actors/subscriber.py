"""The subscriber actor: one durable pull consumer and one forwarder per routed domain."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial

import httpx
import structlog
import trio
import trio_util
from trio_util import AsyncValue

from actors.forwarder import Forwarder
from actors.stats import ForwardOutcome
from pipeline.config import Config
from pipeline.nats_bridge import ConsumeFailure, Delivery, JetStream, PullConsumer, keep_consuming
from pipeline.routes import Routes

log = structlog.get_logger(component="subscriber")

# While some routed domains cannot be consumed, one warning says so this often
# (each consumer's own failures after its first are logged at debug).
UNCONSUMABLE_REPORT_SECONDS = 60.0
# Domains named as examples in that warning, the statistics and the dashboard's health.
UNCONSUMABLE_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    in_flight: int
    in_flight_by_domain: dict[str, int]
    # Routed domains whose consumer cannot be opened or keeps failing, and a few of them (by name).
    unconsumable: int
    unconsumable_examples: dict[str, ConsumeFailure]


class Subscriber:
    """Feeds each routed domain's forwarder from that domain's own consumer.

    In: the routes, followed as they change. Out: ``Delivery`` to
    ``forwarder[domain]``, never more than the forwarder has room for (its
    ``room`` semaphore counts free in-flight slots; a fetch asks for exactly
    those), so no message waits in memory while its ack_wait runs out, and a
    domain whose backend hangs stops fetching while the others go on. A domain
    that gains a route gets its consumer and forwarder at once (its waiting
    events are then delivered); a domain that loses its route stops being
    fetched, and its forwarder finishes its in-flight events and retires (its
    undelivered events stay in the stream). A domain whose consumer cannot be
    opened (or keeps failing) is retried with a growing pause; ``statistics()``
    counts such domains and one warning per ``UNCONSUMABLE_REPORT_SECONDS``
    names a few. Runs until ``stopping`` is set:
    then it stops fetching, closes every forwarder's inbox, waits for them to
    finish their in-flight events, and closes its acks and outcomes channels.
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
        # One TLS context for every forwarder's client: each context holds the
        # CA bundle (~0.9 MB), which is too much per domain.
        self._tls = httpx.create_ssl_context()
        self._retirements: dict[str, trio.Event] = {}  # routed domain → set when its route goes
        self._unconsumable: dict[str, ConsumeFailure] = {}  # routed domain → why its consumer fails
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
            unconsumable=len(self._unconsumable),
            unconsumable_examples=self._unconsumable_examples(),
        )

    def _unconsumable_examples(self) -> dict[str, ConsumeFailure]:
        return {domain: self._unconsumable[domain] for domain in sorted(self._unconsumable)[:UNCONSUMABLE_EXAMPLES]}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._acks, self._outcomes:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio_util.wait_any, self._stopping.wait, self._report_unconsumable)
                while not self._stopping.is_set():
                    routes = self._routes.value
                    for domain in [d for d in self._retirements if d not in routes]:
                        log.info("Route removed; retiring the domain's forwarder", domain=domain)
                        self._retirements.pop(domain).set()
                    for domain in [d for d in routes if d not in self._retirements]:
                        retire = self._retirements[domain] = trio.Event()
                        await nursery.start(self._serve_domain, domain, retire)
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await trio_util.wait_any(
                        self._stopping.wait, partial(self._routes.wait_value, partial(operator.is_not, routes))
                    )

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

    async def _serve_domain(self, domain: str, retire: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
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
            tls=self._tls,
        )
        self._forwarders[domain] = forwarder
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(forwarder.run)
                with send:
                    async with trio.open_nursery() as fetching:
                        fetching.start_soon(self._fetch_forever, domain, send, room)
                        task_status.started()
                        await trio_util.wait_any(self._stopping.wait, retire.wait)
                        fetching.cancel_scope.cancel()
        finally:
            # A route that came back meanwhile has a forwarder of its own by now.
            if self._forwarders.get(domain) is forwarder:
                del self._forwarders[domain]
                self._unconsumable.pop(domain, None)

    async def _fetch_forever(
        self, domain: str, forwarder: trio.MemorySendChannel[Delivery], room: trio.Semaphore
    ) -> None:
        max_in_flight = self._config.forwarding.max_in_flight_per_domain

        async def fetch_into_room(consumer: PullConsumer) -> None:
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
            for delivery in deliveries:
                # The channel holds max_in_flight and the room semaphore
                # admits no more, so this never blocks.
                forwarder.send_nowait(delivery)

        with structlog.contextvars.bound_contextvars(domain=domain):
            await keep_consuming(
                self._jetstream,
                partial(self._jetstream.open_consumer, domain, max_in_flight),
                fetch_into_room,
                partial(self._report_consuming, domain),
            )
