"""The one door to asyncio: nats-py's JetStream behind a trio-facing interface.

nats-py is asyncio-only; ``open_jetstream`` runs it on a trio-asyncio loop and
every method here crosses the bridge once (about 0.3 ms), so callers pass
batches: many publishes, many acks, one fetch of many messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from trio_asyncio import aio_as_trio
from trio_util import AsyncBool

from pipeline.config import NatsConfig
from pipeline.events import AcceptedEvent, consumer_name, domain_subject, domain_token

log = structlog.get_logger(component="nats")

# A consumer with nothing waiting long-polls for one message this long; one with
# a backlog takes a batch of what is waiting, collecting for at most the window.
IDLE_FETCH_SECONDS = 5.0
BATCH_WINDOW_SECONDS = 0.005
DRAIN_TIMEOUT_SECONDS = 5.0
RECONNECT_WAIT_SECONDS = 1.0


class NatsUnavailable(Exception):
    """NATS cannot serve the request now (disconnected, reconnected, consumer lost)."""


class EventTooLarge(Exception):
    """An event NATS cannot carry: with its headers it is over the server's ``max_payload``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"event too large: {size} bytes as stored (compact JSON with its event_id); the limit is {limit} bytes"
        )
        self.size = size
        self.limit = limit


# What nats-py raises when the server is away or the consumer is gone.
_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class PublishReceipt:
    sequence: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the stream holds it (read directly, not through a consumer)."""

    subject: str
    sequence: int
    stored_at: datetime
    data: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a stored event to this service."""

    data: bytes
    delivery_attempt: int
    stream_sequence: int
    stored_at: datetime
    handle: Msg  # for acknowledging; opaque outside this module


class DomainConsumer:
    """A domain's durable pull consumer, bound to a subscription."""

    def __init__(self, js: JetStream, domain: str, subscription: JetStreamContext.PullSubscription) -> None:
        self.domain = domain
        self.name = consumer_name(domain)
        self._js = js
        self._subscription = subscription
        self._backlog = False  # the last delivery said more messages were waiting
        # A pull subscription does not recover by itself after a server restart
        # (nats.py #504): after any reconnect the consumer is opened anew.
        self._connection = js.connection_number

    async def fetch(self, max_messages: int) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, or none after a few seconds of silence.

        Raises ``NatsUnavailable`` or a nats error when the consumer needs re-opening.
        """
        if not self._js.connected.value:
            raise NatsUnavailable("not connected to NATS")
        if self._connection != self._js.connection_number:
            raise NatsUnavailable("reconnected to NATS")
        # nats-py's fetch(n) waits for all n (or the expiry), so a batch is asked
        # for only when messages are known to be waiting; otherwise a fetch of
        # one returns as soon as the next event is stored.
        batch, wait = (max_messages, BATCH_WINDOW_SECONDS) if self._backlog else (1, IDLE_FETCH_SECONDS)
        try:
            messages = await aio_as_trio(self._fetch)(batch, wait)
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"fetch failed: {error or type(error).__name__}") from error
        self._backlog = bool(messages) and messages[-1].metadata.num_pending > 0
        return [
            Delivery(
                data=message.data,
                delivery_attempt=message.metadata.num_delivered,
                stream_sequence=message.metadata.sequence.stream,
                stored_at=message.metadata.timestamp,
                handle=message,
            )
            for message in messages
        ]

    async def _fetch(self, batch: int, wait_seconds: float) -> list[Msg]:
        try:
            return await self._subscription.fetch(batch, timeout=wait_seconds)
        except TimeoutError:  # nats-py raises its own subclass, or asyncio's
            return []

    async def close(self) -> None:
        """Stop the subscription (the durable consumer stays on the server)."""
        try:
            await aio_as_trio(self._subscription.unsubscribe)()
        except nats.errors.Error as error:
            log.debug("Unsubscribe failed", consumer=self.name, error=str(error))


class JetStream:
    """nats-py's connection and JetStream context, seen from trio.

    ``connected`` follows the connection (an ``AsyncBool`` to wait on), so
    /health and the fetch loops know when NATS is away and when it is back.
    """

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.connected = AsyncBool(False)
        self.connection_number = 0
        self._closing = False
        # Set when nats-py closed the client for good (not by us): _keep_connected replaces it.
        self._client_closed = trio.Event()
        self._client = NatsClient()
        self._js: JetStreamContext | None = None

    @property
    def server_url(self) -> str:
        return str(self._client.connected_url.geturl()) if self._client.connected_url else ""

    async def _connect(self, url: str) -> None:
        client = NatsClient()

        async def disconnected() -> None:
            if client is not self._client:
                return  # a client already replaced
            self.connected.value = False
            if not self._closing:
                log.warning("NATS disconnected")

        async def reconnected() -> None:
            self.connection_number += 1
            self.connected.value = True
            log.info("NATS reconnected", url=self.server_url)

        async def error(exc: Exception) -> None:
            log.warning("NATS error", error=str(exc) or type(exc).__name__)

        async def closed() -> None:
            if client is not self._client:
                return
            self.connected.value = False
            if not self._closing:
                self._client_closed.set()

        self._client = client
        await client.connect(
            servers=[server.strip() for server in url.split(",")],
            name="telephony-forwarder",
            # nats-py gives up after 60 reconnects by default and notices a dead
            # link only after two missed 120 s pings: never give up, notice fast.
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_SECONDS,
            ping_interval=10,
            max_outstanding_pings=2,
            connect_timeout=2,
            drain_timeout=int(DRAIN_TIMEOUT_SECONDS),
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            closed_cb=closed,
        )
        self._js = client.jetstream(timeout=self.config.publish_timeout_seconds)
        self.connected.value = True

    async def _connect_until_up(self, url: str) -> None:
        """Connect to NATS at ``url``, retrying until it answers."""
        while True:
            try:
                await aio_as_trio(self._connect)(url)
                return
            except (TimeoutError, nats.errors.Error, OSError) as error:
                log.warning("NATS not reachable; retrying", url=url, error=str(error) or type(error).__name__)
                await trio.sleep(RECONNECT_WAIT_SECONDS)

    async def _keep_connected(self, url: str) -> None:
        """Replace the client whenever nats-py closes it, until cancelled.

        nats-py reconnects a dropped connection by itself, but a closed client
        (a server's -ERR, such as for a message over max_payload; a failed
        reconnect) stays closed: without a new one every publish and fetch fails.
        """
        while True:
            await self._client_closed.wait()
            self._client_closed = trio.Event()
            reason = self._client.last_error
            log.error("NATS connection closed; opening a new one", error=str(reason) if reason else None)
            # The fetch loops re-open their consumers when this changes.
            self.connection_number += 1
            await self._connect_until_up(url)
            log.info("NATS connection rebuilt", url=self.server_url)

    async def _drain(self) -> None:
        self._closing = True
        if not self._client.is_closed:
            try:
                await self._client.drain()
            except (TimeoutError, nats.errors.Error) as error:
                log.warning("NATS drain failed; closing", error=str(error))
                await self._client.close()

    @property
    def _context(self) -> JetStreamContext:
        assert self._js is not None, "use open_jetstream()"
        return self._js

    async def ensure_stream(self) -> None:
        """Create the stream and its dead-letter stream, or bring existing ones' limits up to the config."""
        stream = api.StreamConfig(
            name=self.config.stream_name,
            subjects=[self.config.subject_pattern],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            max_age=self.config.max_age_days * 86400,
            max_bytes=int(self.config.max_bytes),
            duplicate_window=self.config.duplicate_window_seconds,
        )

        dead_letters = api.StreamConfig(
            name=self.dead_letter_stream,
            subjects=[f"dead-letters.{self.config.stream_name}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            max_age=self.config.dead_letter_max_age_days * 86400,
            max_bytes=int(self.config.max_bytes),
            duplicate_window=self.config.duplicate_window_seconds,
        )

        async def ensure(config: api.StreamConfig) -> None:
            try:
                await self._context.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                await self._context.add_stream(config)
            else:
                await self._context.update_stream(config)

        await aio_as_trio(ensure)(stream)
        await aio_as_trio(ensure)(dead_letters)

    async def publish_batch(self, events: Sequence[AcceptedEvent]) -> list[PublishReceipt | Exception]:
        """Store ``events`` in one bridge crossing; one receipt or error per event, in order.

        Each is published with ``Nats-Msg-Id`` = event_id, so a repeat inside the
        duplicate window is stored once (and reported as a duplicate). An event
        over the server's ``max_payload`` gets ``EventTooLarge`` and is not sent.
        """
        if not self.connected.value:
            unavailable = NatsUnavailable("not connected to NATS")
            return [unavailable for _ in events]
        pattern = self.config.subject_pattern

        async def publish_all() -> list[Any]:
            # publish_async: every message goes out at once and one timer bounds
            # the batch (js.publish would make a task and a timer per message).
            futures: list[asyncio.Future | Exception] = []
            for event in events:
                try:
                    futures.append(
                        await self._publish_async(
                            domain_subject(pattern, event.domain),
                            event.payload,
                            headers={"Nats-Msg-Id": event.message_id or event.event_id},
                        )
                    )
                except Exception as error:  # this event's own outcome; the others go on
                    futures.append(error)
            pending = [future for future in futures if isinstance(future, asyncio.Future)]
            if pending:
                await asyncio.wait(pending, timeout=self.config.publish_timeout_seconds)
            results: list[Any] = []
            for future in futures:
                if isinstance(future, Exception):
                    results.append(future)
                elif not future.done():
                    future.cancel()
                    results.append(NatsUnavailable("timed out waiting for JetStream to store the event"))
                elif future.exception() is not None:
                    results.append(future.exception())
                else:
                    results.append(future.result())
            return results

        results = await aio_as_trio(publish_all)()
        return [
            PublishReceipt(result.seq, bool(result.duplicate)) if isinstance(result, api.PubAck) else result
            for result in results
        ]

    async def _publish_async(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future:
        """``publish_async``, refusing what nats-server would close the connection for.

        The server counts the headers against ``max_payload``; nats-py checks the
        payload alone, so a message it lets through can still cost the connection.
        """
        limit = self._client.max_payload - _header_block_size(headers)
        if len(payload) > limit:
            raise EventTooLarge(len(payload), limit)
        # nats-py takes a pending slot (of 4,000) and registers the ack's future
        # before it publishes, and keeps both when the publish raises
        # (MaxPayloadError, a closed connection): thousands wedge publishing.
        # Cancelling that future frees both. It is the newest one: publish_async
        # awaits nothing between registering it and raising.
        pending = self._context._publish_async_futures
        newest_before = next(reversed(pending), None)
        try:
            return await self._context.publish_async(subject, payload, headers=headers)
        except Exception:
            newest = next(reversed(pending), None)
            if newest is not None and newest != newest_before:
                pending[newest].cancel()
            raise

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.config.stream_name}-dead-letters"

    def dead_letter_subject(self, domain: str = "*", event_id: str | None = None) -> str:
        """``dead-letters.<stream>.<domain token>.<event_id token>`` (wildcards where not given)."""
        domain_part = domain if domain == "*" else domain_token(domain)
        event_part = "*" if event_id is None else domain_token(event_id)
        return f"dead-letters.{self.config.stream_name}.{domain_part}.{event_part}"

    async def newest_messages(
        self, limit: int, subject: str | None = None, *, dead_letters: bool = False
    ) -> tuple[list[StoredMessage], int]:
        """The newest ``limit`` messages of the stream (of ``subject`` only, if given), newest first.

        ``dead_letters`` reads the dead-letter stream instead. Also returns how
        many messages the stream holds (of that subject). Reads
        the stream directly, so delivery and acks are not disturbed. Walks back
        from the end in doubling windows, each read forward with next-by-subject
        lookups, so a sparse subject costs about as many requests as it has
        messages to show. One bridge crossing.
        """
        name = self.dead_letter_stream if dead_letters else self.config.stream_name
        every = self.dead_letter_subject() if dead_letters else self.config.subject_pattern
        wanted_subject = subject or every

        async def read() -> tuple[list[StoredMessage], int]:
            info = await self._context.stream_info(name, subjects_filter=subject)
            state = info.state
            total = state.messages if subject is None else sum((state.subjects or {}).values())
            newest: list[StoredMessage] = []
            high, size = state.last_seq, max(2 * limit, 64)
            while total and high >= state.first_seq and len(newest) < limit:
                low = max(state.first_seq, high - size + 1)
                window: list[StoredMessage] = []
                sequence = low
                while sequence <= high:
                    try:
                        raw = await self._context.get_msg(name, seq=sequence, subject=wanted_subject, next=True)
                    except nats.js.errors.NotFoundError:
                        break
                    if raw.seq is None or raw.seq > high:
                        break
                    window.append(StoredMessage(raw.subject or "", raw.seq, raw.time, raw.data or b""))
                    sequence = raw.seq + 1
                newest.extend(reversed(window))
                high, size = low - 1, size * 2
            return newest[:limit], total

        try:
            return await aio_as_trio(read)()
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot read the stream: {error or type(error).__name__}") from error

    async def dead_letter(self, domain: str, event_id: str, stream_sequence: int, envelope: bytes) -> None:
        """Store an event that used up its deliveries in the dead-letter stream.

        Deduplicated by the stored message it came from, so a replayed event
        that fails again becomes a new dead letter.
        """

        async def publish() -> None:
            await self._context.publish(
                self.dead_letter_subject(domain, event_id),
                envelope,
                headers={"Nats-Msg-Id": f"dead:{self.config.stream_name}:{stream_sequence}"},
            )

        try:
            await aio_as_trio(publish)()
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot store the dead letter: {error or type(error).__name__}") from error

    async def find_dead_letter(self, event_id: str) -> StoredMessage | None:
        """The dead letter of ``event_id``, if there is one."""

        async def find() -> StoredMessage | None:
            try:
                raw = await self._context.get_msg(
                    self.dead_letter_stream, seq=1, subject=self.dead_letter_subject("*", event_id), next=True
                )
            except nats.js.errors.NotFoundError:
                return None
            return StoredMessage(raw.subject or "", raw.seq or 0, raw.time, raw.data or b"")

        try:
            return await aio_as_trio(find)()
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot read the dead letters: {error or type(error).__name__}") from error

    async def delete_dead_letter(self, sequence: int) -> None:
        try:
            await aio_as_trio(self._context.delete_msg)(self.dead_letter_stream, sequence)
        except nats.js.errors.NotFoundError:
            pass  # already gone: deleting twice is not an error
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot delete the dead letter: {error or type(error).__name__}") from error

    async def ack_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries`` in one bridge crossing."""

        async def ack_all() -> None:
            for delivery in deliveries:
                try:
                    await delivery.handle.ack()
                except nats.errors.Error as error:
                    # Not acked means redelivered after ack_wait: at-least-once holds.
                    log.warning("Ack failed", stream_sequence=delivery.stream_sequence, error=str(error))

        await aio_as_trio(ack_all)()

    async def open_consumer(self, domain: str, max_in_flight: int) -> DomainConsumer:
        """Create or update ``domain``'s durable pull consumer and subscribe to it."""
        name = consumer_name(domain)
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=domain_subject(self.config.subject_pattern, domain),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait_seconds,
            max_deliver=self.config.max_deliveries,
            # Room for the in-flight events plus the failed ones waiting out ack_wait.
            max_ack_pending=max(1000, 4 * max_in_flight),
        )

        async def create() -> JetStreamContext.PullSubscription:
            await self._context.add_consumer(self.config.stream_name, config)
            return await self._context.pull_subscribe_bind(durable=name, stream=self.config.stream_name)

        if not self.connected.value:
            raise NatsUnavailable("not connected to NATS")
        try:
            subscription = await aio_as_trio(create)()
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot open consumer {name}: {error or type(error).__name__}") from error
        return DomainConsumer(self, domain, subscription)


def _header_block_size(headers: dict[str, str]) -> int:
    """Bytes of the header block nats-py sends (HPUB): ``NATS/1.0``, one line per header, a blank line."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{name}: {value}\r\n".encode()) for name, value in headers.items())


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Without a handler trio-asyncio re-raises stray asyncio errors into its
    # nursery and tears the whole service down.
    error = context.get("exception")
    log.error("asyncio error", message=context.get("message"), error=repr(error) if error else None)


@asynccontextmanager
async def open_jetstream(config: NatsConfig, url: str) -> AsyncIterator[JetStream]:
    """Connect to NATS at ``url`` (retrying until it answers) and ensure the stream.

    While open, a client that nats-py closes is replaced by a new connection
    (``connection_number`` changes, so consumers are re-opened). On exit the
    connection is drained (bounded by ``DRAIN_TIMEOUT_SECONDS``), so acks
    already handed to nats-py reach the server.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        jetstream = JetStream(config)
        await jetstream._connect_until_up(url)
        log.info("NATS connected", url=jetstream.server_url)
        try:
            await jetstream.ensure_stream()
            async with trio.open_nursery() as keeper:
                keeper.start_soon(jetstream._keep_connected, url)
                try:
                    yield jetstream
                finally:
                    keeper.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT_SECONDS):
                await aio_as_trio(jetstream._drain)()
