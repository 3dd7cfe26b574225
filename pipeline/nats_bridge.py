"""The one door to asyncio: nats-py's JetStream behind a trio-facing interface.

nats-py is asyncio-only; ``open_jetstream`` runs it on a trio-asyncio loop and
every method that uses it crosses the bridge once (about 0.3 ms). The hot
path does not cross: publishing events, deleting forwarded ones, a consumer's
pulls and acks go over a trio-native connection of their own
(``pipeline/nats_link.py``); nats-py manages streams and consumers, reads
the stream for the API and follows the connection's state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import ParseResult, urlparse

import nats
import nats.errors
import nats.js.errors
import pydantic_core
import structlog
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api
from trio_asyncio import aio_as_trio
from trio_util import AsyncBool, AsyncValue

from pipeline.config import NatsConfig
from pipeline.events import AcceptedEvent, consumer_name, domain_subject, event_key, subject_domain
from pipeline.nats_link import LinkError, NatsLink, Reply, Request, header_block, open_nats_link
from pipeline.streams import (
    ERR_NO_SUITABLE_PEERS,
    MIN_CONSUMER_LIMIT,
    Streams,
    StreamSetupError,
    consumer_limit,
    retention_mismatch,
)

log = structlog.get_logger(component="nats")

# A consumer with nothing waiting long-polls for one message this long; one with
# a backlog asks for a batch, which ends once full or after the window. (Not a
# no_wait pull: at max_ack_pending the server leaves those unanswered.)
IDLE_FETCH_SECONDS = 5.0
BATCH_WINDOW_SECONDS = 0.005
# The status messages that end a pull: nothing waiting, the pull expired, a
# conflict (fatal when the consumer was deleted); a heartbeat ends nothing.
_NO_MESSAGES = "404"
_PULL_EXPIRED = "408"
_PULL_CONFLICT = "409"
_CONSUMER_DELETED = "Consumer Deleted"
_HEARTBEAT = "100"
DRAIN_TIMEOUT_SECONDS = 5.0
RECONNECT_WAIT_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 2.0
# Pause before re-opening a consumer after an error, doubling while it keeps failing,
# so a consumer the server refuses (an account's consumer limit) costs little.
RECONSUME_DELAY_SECONDS = 1.0
RECONSUME_MAX_DELAY_SECONDS = 30.0
# Requests that create, read or delete consumers, at most this many at once: a
# wake of thousands of domains (one backlog reading) queues here, in order,
# instead of piling on the JetStream API until requests time out and are retried.
CONSUMER_REQUESTS_AT_ONCE = 16
# A dead-letter writer that took an advisory has this long to file it before
# another instance gets it.
ADVISORY_ACK_WAIT_SECONDS = 30.0
# Unrouted domains whose oldest waiting event is looked up (one request each), largest backlog first.
MAX_UNROUTED_LOOKUPS = 50
# JetStream's answer to deleting a message, read without parsing when it is this one.
_DELETED = b'{"type":"io.nats.jetstream.api.v1.stream_msg_delete_response","success":true}'
# Of NATS's max_payload, what an event stored leaves for what its dead letter adds around
# it (the letter's own fields, its headers): every event accepted can be kept as a dead letter.
DEAD_LETTER_ROOM = 2048
# JetStream's answers to deleting a message that is not (or no longer) in the stream.
_ERR_SEQUENCE_NOT_FOUND = 10043
_NO_MESSAGE_FOUND = "no message found"
_ERR_NO_MESSAGE = 10037  # reading a stored message: "no message found"
# JetStream's refusal of a publish because a limit is reached: "maximum
# messages per subject exceeded", "maximum bytes exceeded", ...
_ERR_STREAM_LIMIT = 10077
# A NATS cluster answers JetStream requests only once its nodes have elected a
# meta leader (under a second for a new cluster, seconds after a restart of the
# whole cluster): until then a start sets up its streams again and again, this long.
JETSTREAM_READY_TIMEOUT_SECONDS = 30.0
# A cluster still forming: no meta leader (silence for its first 10 s, then this),
# or a leader that does not yet see enough servers (also what too many replicas get).
_ERR_CLUSTER_NOT_AVAILABLE = 10008  # "JetStream system temporarily unavailable"


class NatsUnavailable(Exception):
    """NATS cannot serve the request now (disconnected, reconnected, consumer lost)."""


class _JetStreamNotReady(NatsUnavailable):
    """JetStream cannot set up streams yet (a cluster electing its meta leader, meeting its peers).

    ``setup_error`` is what to report if it stays so because of the config (more replicas than servers).
    """

    def __init__(self, message: str, setup_error: StreamSetupError | None = None) -> None:
        super().__init__(message)
        self.setup_error = setup_error


class StreamRefused(Exception):
    """JetStream refused to store an event because a limit is reached.

    ``limit`` is ``domain_backlog`` (the domain's quota of waiting events) or
    ``stream_full`` (the whole stream); ``str()`` says it for the client.
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class EventTooLarge(Exception):
    """An event (or a dead letter) NATS cannot carry: with its headers, and for an event the room
    its dead letter would need, it is over the server's ``max_payload``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"event too large: {size} bytes as stored (compact JSON with its event_id); the limit is {limit} bytes"
        )
        self.size = size
        self.limit = limit


# What nats-py raises when the server is away or the consumer is gone.
_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class ConsumeFailure:
    """Why a consumer cannot be consumed now: the last error and how many tries in a row failed."""

    error: str
    failures: int


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
class DeadLetter:
    """An event that used up its deliveries, as the dead-letter stream keeps it."""

    domain: str
    event_id: str
    stream_sequence: int  # where the event stream held it: what deduplicates filing it twice
    envelope: bytes  # the dead letter's JSON


@dataclass(frozen=True, slots=True)
class StreamBacklog:
    """What waits in the event stream: the work queue's size and each domain's share."""

    messages: int
    bytes: int
    max_bytes: int
    by_domain: dict[str, int]
    # When the oldest waiting event of each of the largest unrouted backlogs was stored.
    oldest_unrouted: dict[str, datetime]
    dead_letters: int  # kept in the dead-letter stream


class FromIngress:
    """The handle of a delivery the ingress hands over as it stores the event, with no consumer.

    Its ack deletes the event from the stream. Whoever takes the delivery sets
    ``on_ended``, called once when the attempt ends, and ``on_settled``, called
    once with whether the event reached every endpoint (``forwarded``) and
    whether it has left the stream (``removed``): at the attempt's end if it
    failed, else once its deletion was answered.
    """

    __slots__ = ("on_ended", "on_settled")

    def __init__(self) -> None:
        self.on_ended: Callable[[], None] = lambda: None
        self.on_settled: Callable[[bool, bool], None] = lambda forwarded, removed: None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a stored event to this service."""

    data: bytes
    delivery_attempt: int
    stream_sequence: int
    stored_at: datetime
    handle: FromConsumer | FromIngress  # for acknowledging; opaque outside this module
    # The event as the ingress parsed it (a delivery from the ingress only): ``data`` needs no parsing again.
    accepted: AcceptedEvent | None = None

    @classmethod
    def from_ingress(cls, event: AcceptedEvent, sequence: int) -> Delivery:
        """The first delivery of an event just stored, straight from the ingress's memory."""
        return cls(event.payload, 1, sequence, datetime.now(UTC), FromIngress(), event)

    def ended(self, acked: bool) -> None:
        """This attempt ended (``acked``: it went to the acknowledger); one from the ingress tells whoever took it."""
        if isinstance(self.handle, FromIngress):
            self.handle.on_ended()
            if not acked:
                self.handle.on_settled(False, False)


@dataclass(frozen=True, slots=True)
class FromConsumer:
    """The handle of a delivery a consumer made: acked by a message to its ``ack_subject``."""

    ack_subject: bytes


class PullConsumer:
    """A durable pull consumer (a domain's, or the dead-letter writers'), pulled over the link.

    At most one pull is open at a time. What it delivers waits here until
    fetched: a fetch given up (cancelled) or asking less than came loses
    nothing, the next fetch takes it.
    """

    def __init__(self, js: JetStream, stream: str, name: str, link: NatsLink) -> None:
        self.name = name
        self._stream = stream
        self._js = js
        self._link = link
        self._inbox = b""
        self._next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{name}"
        self.more_waiting = False  # the last fetch said more messages were waiting
        self._arrived: deque[Reply] = deque()  # delivered, not yet fetched
        self._pull_left = 0  # messages the open pull may still deliver; 0: none is open
        self._pull_deadline = math.inf  # by when the open pull must have ended
        self._failure: str | None = None
        self._changed = trio.Event()

    async def _listen(self) -> None:
        self._inbox = await self._link.listen(self._on_message)

    def _on_message(self, message: Reply | None) -> None:
        if message is None:
            self._failure = "the connection to NATS broke"
        elif message.status is None:
            self._arrived.append(message)
            self._pull_left = max(self._pull_left - 1, 0)
        elif message.status in (_NO_MESSAGES, _PULL_EXPIRED) or (
            # A leader changed, too many pulls waiting, ...: this pull ended, not the consumer.
            message.status == _PULL_CONFLICT and message.description != _CONSUMER_DELETED
        ):
            self._pull_left = 0
        elif message.status == _HEARTBEAT:
            return
        else:  # the consumer deleted, no such consumer (503: nothing answers its pulls), ...
            self._pull_left = 0
            self._failure = f"pull refused: {message.status} {message.description}".strip()
        self._changed.set()

    async def fetch(self, max_messages: int) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, or none after a few seconds of silence.

        Raises ``NatsUnavailable`` when the consumer needs re-opening.
        """
        if not self._arrived and not self._pull_left:
            await self._pull(max_messages)
        while not self._arrived and self._pull_left and self._failure is None:
            self._changed = trio.Event()
            with trio.move_on_at(self._pull_deadline):
                await self._changed.wait()
            if not self._changed.is_set():
                self._failure = "no answer to a pull"
                # Lost on the way (a consumer's leader gone), or the connection went silent (a
                # host gone without a FIN): a PING the server does not answer within the link's
                # timeout closes it, or every consumer that re-opens would get the same dead link.
                await self._link.flush()
        if not self._arrived and self._failure is not None:
            raise NatsUnavailable(f"fetch failed: {self._failure}")
        deliveries: list[Delivery] = []
        still_pending = 0
        while self._arrived and len(deliveries) < max_messages:
            message = self._arrived.popleft()
            # $JS.ACK.<stream>.<consumer>.<deliveries>.<stream seq>.<consumer seq>.<stored, ns>.<pending>,
            # or with a domain and an account hash after ACK (and a token at the end).
            tokens = message.reply_to.split(b".")
            delivered, sequence, _, stored_ns, pending = tokens[4:9] if len(tokens) == 9 else tokens[6:11]
            deliveries.append(
                Delivery(
                    data=message.data,
                    delivery_attempt=int(delivered),
                    stream_sequence=int(sequence),
                    stored_at=datetime.fromtimestamp(int(stored_ns) / 1e9, UTC),
                    handle=FromConsumer(message.reply_to),
                )
            )
            still_pending = int(pending)
        self.more_waiting = bool(self._arrived) or still_pending > 0
        return deliveries

    async def _pull(self, max_messages: int) -> None:
        # With messages known to be waiting, a batch, within the window; otherwise one
        # message, as soon as it is stored, or an expiry after a few seconds.
        if self._failure is not None:
            raise NatsUnavailable(f"fetch failed: {self._failure}")
        batch, expires = (max_messages, BATCH_WINDOW_SECONDS) if self.more_waiting else (1, IDLE_FETCH_SECONDS)
        self._pull_left = batch
        self._pull_deadline = trio.current_time() + expires + self._js.config.publish_timeout_seconds
        request = b'{"batch":%d,"expires":%d}' % (batch, expires * 1e9)
        await self._link.publish([Request(self._next_subject, request)], reply_to=self._inbox)

    async def delete_if_drained(self) -> bool:
        """Delete the durable consumer if it is drained; whether it was (``JetStream.delete_consumer_if_drained``)."""
        return await self._js.delete_consumer_if_drained(self._stream, self.name)

    async def close(self) -> None:
        """Stop listening (the durable consumer stays on the server)."""
        await self._link.unlisten(self._inbox)


class JetStream:
    """nats-py's connection and JetStream context, seen from trio.

    ``connected`` follows the connection (an ``AsyncBool`` to wait on), so
    /health and the fetch loops know when NATS is away and when it is back.
    """

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.connected = AsyncBool(False)
        self._closing = False
        # Set when nats-py closed the client for good (not by us): _keep_connected replaces it.
        self._client_closed = trio.Event()
        self._client = NatsClient()
        self._js: JetStreamContext | None = None
        self.streams = Streams(config)
        self.consumer_limit = MIN_CONSUMER_LIMIT  # of the event stream, once ensure_streams ran
        self._consumer_requests = trio.Semaphore(CONSUMER_REQUESTS_AT_ONCE)
        # The connection publishes and deletions go over (see _keep_link); None while there is none.
        self._link: AsyncValue[NatsLink | None] = AsyncValue(None)

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
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
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
            await self._connect_until_up(url)
            log.info("NATS connection rebuilt", url=self.server_url)

    async def _keep_link(self, url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the hot path's connection open to the server nats-py is connected to, until cancelled.

        Started once the first link is up; a link that breaks is replaced as
        soon as nats-py is connected (again).
        """
        started = False
        while True:
            await self.connected.wait_value(True)
            connected_url = self._client.connected_url
            if connected_url is None:
                # nats-py lost its server and has not said so yet (it does once its old
                # transport is closed): no server to open the link to for now.
                await trio.sleep(RECONNECT_WAIT_SECONDS)
                continue
            server = with_configured_credentials(connected_url, url)
            try:
                async with open_nats_link(
                    server,
                    "telephony-forwarder",
                    CONNECT_TIMEOUT_SECONDS,
                    io_timeout=self.config.publish_timeout_seconds,
                ) as link:
                    self._link.value = link
                    if not started:
                        task_status.started()
                        started = True
                    await link.serve()
                log.warning("NATS request connection closed; opening a new one")
            except (LinkError, OSError, trio.TooSlowError, trio.BrokenResourceError) as error:
                log.warning("NATS request connection failed; retrying", error=str(error) or type(error).__name__)
                await trio.sleep(RECONNECT_WAIT_SECONDS)
            finally:
                self._link.value = None

    async def _requests_link(self) -> NatsLink:
        """The link for a request, waiting for one while nats-py is connected, at most the publish timeout."""
        link = self._link.value
        if link is not None and not link.closed:
            return link
        if self.connected.value:
            with trio.move_on_after(self.config.publish_timeout_seconds):
                return await self._link.wait_value(lambda link: link is not None and not link.closed)
        raise NatsUnavailable("not connected to NATS")

    async def _flush_link(self) -> None:
        """Until the server has read what was sent over the link (the acks: no answer says so)."""
        link = self._link.value
        if link is not None:
            await link.flush()

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

    async def ensure_streams(self, routed_domains: int) -> None:
        """Create the event, dead-letter and advisory streams, or bring existing ones up to the config.

        Raises ``StreamSetupError`` (one line naming what to change) when the
        server cannot hold them as configured or the event stream was made with
        another retention. While JetStream is not ready (a cluster without a
        meta leader yet) it tries again every second, with a log line, for up
        to ``JETSTREAM_READY_TIMEOUT_SECONDS``.
        """
        waiting: _JetStreamNotReady | None = None
        with trio.move_on_after(JETSTREAM_READY_TIMEOUT_SECONDS):
            while True:
                try:
                    await self._ensure_streams_once(routed_domains)
                    return
                except _JetStreamNotReady as error:
                    waiting = error
                    log.warning("JetStream not ready (a cluster without a leader yet?); retrying", error=str(error))
                await trio.sleep(RECONNECT_WAIT_SECONDS)
        if waiting is not None and waiting.setup_error is not None:
            raise waiting.setup_error
        raise NatsUnavailable(
            f"JetStream not ready within {JETSTREAM_READY_TIMEOUT_SECONDS:g} s (a NATS cluster without "
            f"a meta leader?): {waiting or 'no answer'}"
        )

    async def _ensure_streams_once(self, routed_domains: int) -> None:
        limit = await self._consumer_limit(routed_domains)

        async def ensure(config: api.StreamConfig) -> api.StreamInfo:
            try:
                info = await self._context.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                return await self._context.add_stream(config)
            # nats-py parses the server's answer into plain strings, not the enum.
            existing = api.RetentionPolicy(info.config.retention)
            if existing != config.retention:
                raise retention_mismatch(config, existing)
            if config.name == self.streams.events:
                if info.state.messages and info.config.subjects != config.subjects:
                    raise StreamSetupError(
                        f"nats.subject_pattern: stream {config.name!r} holds {info.state.messages} events "
                        f"under {', '.join(info.config.subjects or [])}, which {self.config.subject_pattern!r} "
                        "would leave where nothing reads them: start with the old pattern until they are "
                        "delivered, then change it"
                    )
                config = await self._without_trimming(info, config)
            return await self._context.update_stream(config)

        for key, config in self.streams.configs(limit).items():
            try:
                info = await aio_as_trio(ensure)(config)
            except nats.js.errors.APIError as error:
                setup_error = self.streams.setup_error(key, config, error)
                if error.err_code == _ERR_CLUSTER_NOT_AVAILABLE:
                    raise _JetStreamNotReady(f"stream {config.name!r}: {error.description}") from None
                if error.err_code == ERR_NO_SUITABLE_PEERS:
                    raise _JetStreamNotReady(f"stream {config.name!r}: {error.description}", setup_error) from None
                raise setup_error from None
            except TimeoutError as error:  # nats-py's own subclass too
                raise _JetStreamNotReady(f"stream {config.name!r}: no answer from JetStream") from error
            replicas = info.config.num_replicas or 1
            if replicas < self.config.replicas:
                raise StreamSetupError(
                    f"nats.replicas: stream {config.name!r} has {replicas} replicas, "
                    f"{self.config.replicas} configured; the cluster did not apply them"
                )
        self.consumer_limit = limit

    async def _without_trimming(self, info: api.StreamInfo, config: api.StreamConfig) -> api.StreamConfig:
        """``config``, with the stream's own per-domain limit while a lower one would delete waiting events.

        JetStream applies a lowered max_msgs_per_subject to what a subject already
        holds, deleting its oldest messages: accepted events. The lower
        ``nats.max_backlog_per_domain`` is applied at a start where no domain has more waiting (asyncio side).
        """
        lowered, current = config.max_msgs_per_subject, info.config.max_msgs_per_subject
        if lowered is None or lowered < 0 or (current is not None and 0 <= current <= lowered):
            return config
        _, waiting = await self._subject_counts(config.name, self.config.subject_pattern)
        over = sorted((count, subject) for subject, count in waiting.items() if count > lowered)
        if not over:
            return config
        count, subject = over[-1]
        log.warning(
            "nats.max_backlog_per_domain not lowered: JetStream would delete the waiting events beyond it; "
            "kept until no domain has more waiting (applied at a later start)",
            configured=lowered,
            kept=current,
            domains_over=len(over),
            largest={"domain": subject_domain(self.config.subject_pattern, subject), "waiting": count},
        )
        return config.evolve(max_msgs_per_subject=current)

    async def _consumer_limit(self, routed_domains: int) -> int:
        """The event stream's consumer limit for ``routed_domains``, within the NATS account's own limit.

        Raises ``StreamSetupError`` when the account cannot give each routed domain its consumer.
        """
        try:
            account = await aio_as_trio(self._context.account_info)()
        except _NATS_ERRORS as error:
            message = f"cannot read the account's limits: {error or type(error).__name__}"
            cluster_forming = isinstance(error, TimeoutError) or (
                isinstance(error, nats.js.errors.APIError) and error.err_code == _ERR_CLUSTER_NOT_AVAILABLE
            )
            raise (_JetStreamNotReady if cluster_forming else NatsUnavailable)(message) from error
        limit = consumer_limit(routed_domains)
        allowed = account.limits.max_consumers
        if allowed is not None and allowed >= 0:
            # The account's limit counts every consumer: keep one for the dead-letter writers.
            limit = min(limit, allowed - 1)
            if routed_domains > limit:
                raise StreamSetupError(
                    f"{routed_domains} routed domains need a consumer each, and the NATS account allows "
                    f"{allowed} consumers in all (one is the dead-letter writer's): route fewer domains "
                    "or raise the account's jetstream max_consumers"
                )
        return limit

    async def admit_routes(self, routed_domains: int) -> None:
        """Make sure the event stream allows a consumer for each of ``routed_domains``.

        Raises ``StreamSetupError`` (one line) when the server cannot serve that many.
        """
        limit = await self._consumer_limit(routed_domains)
        if limit <= self.consumer_limit:
            return  # only ever raised: consumers of removed routes may remain on the server
        config = self.streams.configs(limit)["nats.max_bytes"]
        try:
            await aio_as_trio(self._context.update_stream)(config)
        except nats.js.errors.APIError as error:
            raise StreamSetupError(
                f"{routed_domains} routed domains need {limit} consumers on stream {config.name!r}; "
                f"JetStream refused: {error.description}"
            ) from None
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot change the consumer limit: {error or type(error).__name__}") from error
        self.consumer_limit = limit

    async def publish_batch(self, events: Sequence[AcceptedEvent]) -> list[PublishReceipt | Exception]:
        """Store ``events`` with one send over the link; one receipt or error per event, in order.

        Each is published with ``Nats-Msg-Id`` = ``event_key(domain, event_id)``,
        so a repeat inside the duplicate window is stored once (and reported as
        a duplicate). A limit JetStream enforces comes back as ``StreamRefused``;
        an event that with its headers and ``DEAD_LETTER_ROOM`` is over the server's
        ``max_payload`` gets ``EventTooLarge`` and is not sent.
        """
        try:
            link = await self._requests_link()
        except NatsUnavailable as unavailable:
            return [unavailable for _ in events]
        pattern = self.config.subject_pattern
        results: list[PublishReceipt | Exception | None] = []
        requests: list[Request] = []
        for event in events:
            headers = header_block({"Nats-Msg-Id": event.message_id or event_key(event.domain, event.event_id)})
            # The server counts the headers against max_payload and closes the connection for a message over it.
            limit = link.max_payload - len(headers) - DEAD_LETTER_ROOM
            if len(event.payload) > limit:
                results.append(EventTooLarge(len(event.payload), limit))
            else:
                results.append(None)
                requests.append(Request(domain_subject(pattern, event.domain), event.payload, headers))
        replies = iter(await self._request_all(link, requests))
        return [result if result is not None else self._publish_outcome(next(replies)) for result in results]

    async def _request_all(self, link: NatsLink, requests: Sequence[Request]) -> list[Reply | None]:
        """Send ``requests`` over ``link``; their replies (None: none) within the publish timeout.

        A request left unanswered that long closes the link (the link's own timeout): a
        server that does not answer in time is not trusted with the next ones.
        """
        pending = await link.send_requests(requests)
        try:
            await pending.wait_answered()
        finally:
            replies = pending.collect()
        return replies

    def _publish_outcome(self, message: Reply | None) -> PublishReceipt | Exception:
        """JetStream's answer to a publish: the receipt, or the refusal."""
        if message is None:
            return NatsUnavailable(
                "timed out waiting for JetStream to store the event (or the connection to it dropped)"
            )
        if message.status == "503":
            return NatsUnavailable(f"no JetStream stream stores {self.config.subject_pattern}")
        try:
            answer = pydantic_core.from_json(message.data)
        except ValueError:
            return NatsUnavailable("JetStream answered a publish with something unreadable")
        error = answer.get("error")
        if error is None:
            return PublishReceipt(int(answer["seq"]), bool(answer.get("duplicate")))
        if error.get("err_code") == _ERR_STREAM_LIMIT and "per subject" in error.get("description", ""):
            return StreamRefused(
                "domain_backlog",
                f"the domain has {self.config.max_backlog_per_domain} events waiting "
                "(nats.max_backlog_per_domain) until its endpoints take them",
            )
        if error.get("err_code") == _ERR_STREAM_LIMIT:
            return StreamRefused("stream_full", f"the event stream is full ({error.get('description')})")
        return NatsUnavailable(f"JetStream refused the event: {error.get('description')}")

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
        name = self.streams.dead_letters if dead_letters else self.config.stream_name
        every = self.streams.dead_letter_subject() if dead_letters else self.config.subject_pattern
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

    async def _subject_counts(self, stream: str, pattern: str) -> tuple[api.StreamInfo, dict[str, int]]:
        """``stream``'s info and its message count for every subject of ``pattern`` (asyncio side).

        JetStream lists at most 100,000 subjects an answer, in order, and nats-py asks
        for the first page only: domains invented by anyone, sorting first, would hide
        the routed ones, and their waiting events would never be fetched after a restart.
        """
        subjects: dict[str, int] = {}
        while True:
            asked = json.dumps({"subjects_filter": pattern, "offset": len(subjects)}).encode()
            subject = f"{api.DEFAULT_PREFIX}.STREAM.INFO.{stream}"
            answer = json.loads((await self._client.request(subject, asked, self.config.publish_timeout_seconds)).data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            info = api.StreamInfo.from_response(answer)
            page = info.state.subjects or {}
            subjects |= page
            if not page or len(subjects) >= answer.get("total", 0):
                return info, subjects

    async def backlog(self, routed: Collection[str]) -> StreamBacklog:
        """The event stream's waiting events, by domain, in one bridge crossing.

        For the largest backlogs of domains not in ``routed`` (at most
        ``MAX_UNROUTED_LOOKUPS``), also when their oldest event was stored.
        """
        name, pattern = self.config.stream_name, self.config.subject_pattern

        async def read() -> StreamBacklog:
            info, subjects = await self._subject_counts(name, pattern)
            by_domain: dict[str, int] = {}
            for subject, count in subjects.items():
                domain = subject_domain(pattern, subject)
                if domain is not None:
                    by_domain[domain] = count
            unrouted = sorted((d for d in by_domain if d not in routed), key=by_domain.__getitem__, reverse=True)
            oldest: dict[str, datetime] = {}
            for domain in unrouted[:MAX_UNROUTED_LOOKUPS]:
                subject = domain_subject(pattern, domain)
                try:
                    raw = await self._context.get_msg(name, seq=info.state.first_seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    continue  # delivered or expired meanwhile
                oldest[domain] = raw.time
            dead_letters = (await self._context.stream_info(self.streams.dead_letters)).state.messages
            return StreamBacklog(
                info.state.messages, info.state.bytes, int(self.config.max_bytes), by_domain, oldest, dead_letters
            )

        try:
            return await aio_as_trio(read)()
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot read the stream: {error or type(error).__name__}") from error

    async def dead_letters(self, letters: Sequence[DeadLetter]) -> list[Exception | None]:
        """Store events that used up their deliveries in the dead-letter stream, together over the link;
        for each, None once stored (or stored before), else what went wrong.

        Deduplicated by the stored message each came from, so filing one twice is
        harmless and a replayed event that fails again becomes a new dead letter.
        """
        try:
            link = await self._requests_link()
        except NatsUnavailable as unavailable:
            return [unavailable for _ in letters]
        results: list[Exception | None] = []
        requests: list[Request] = []
        for letter in letters:
            headers = header_block({"Nats-Msg-Id": f"dead:{self.config.stream_name}:{letter.stream_sequence}"})
            limit = link.max_payload - len(headers)
            if len(letter.envelope) > limit:
                results.append(EventTooLarge(len(letter.envelope), limit))
            else:
                results.append(None)
                subject = self.streams.dead_letter_subject(letter.domain, letter.event_id)
                requests.append(Request(subject, letter.envelope, headers))
        receipts = iter(self._publish_outcome(reply) for reply in await self._request_all(link, requests))
        for index, result in enumerate(results):
            if result is None and isinstance(receipt := next(receipts), Exception):
                results[index] = receipt
        return results

    async def find_dead_letter(self, letter_id: int) -> StoredMessage | None:
        """The dead letter ``letter_id`` (its sequence in the dead-letter stream), if there is one.

        Raises ``NatsUnavailable`` when it cannot be read.
        """
        [found] = await self._read_stored(self.streams.dead_letters, [letter_id])
        if isinstance(found, Exception):
            raise found
        return found

    async def stored_events(self, sequences: Sequence[int]) -> list[StoredMessage | Exception | None]:
        """The events stored at ``sequences`` in the event stream, read together over the link;
        None for one no longer there, the error for one that could not be read."""
        return await self._read_stored(self.config.stream_name, sequences)

    async def _read_stored(self, stream: str, sequences: Sequence[int]) -> list[StoredMessage | Exception | None]:
        try:
            link = await self._requests_link()
        except NatsUnavailable as unavailable:
            return [unavailable for _ in sequences]
        subject = f"{api.DEFAULT_PREFIX}.STREAM.MSG.GET.{stream}"
        replies = await self._request_all(link, [Request(subject, b'{"seq":%d}' % sequence) for sequence in sequences])
        return [self._stored_message(reply) for reply in replies]

    @staticmethod
    def _stored_message(reply: Reply | None) -> StoredMessage | Exception | None:
        """JetStream's answer to reading a stored message: the message, None when there is none, or the error."""
        if reply is None:
            return NatsUnavailable("no answer to reading a stored message")
        try:
            answer = json.loads(reply.data)
            error = answer.get("error")
            if error is not None:
                if error.get("err_code") == _ERR_NO_MESSAGE or error.get("description") == _NO_MESSAGE_FOUND:
                    return None
                return NatsUnavailable(f"cannot read a stored message: {error.get('description')}")
            # Read as nats-py's get_msg reads it (its time with nanoseconds, its data in base64).
            message = api.RawStreamMsg.from_response(answer["message"])
            data = base64.b64decode(message.data) if message.data else b""
            return StoredMessage(message.subject or "", int(message.seq or 0), message.time or datetime.now(UTC), data)
        except (ValueError, KeyError, TypeError, AttributeError):
            return NatsUnavailable("JetStream answered a read with something unreadable")

    async def delete_dead_letter(self, sequence: int) -> None:
        await self._delete(self.streams.dead_letters, sequence)

    async def _delete(self, stream: str, sequence: int) -> None:
        try:
            await aio_as_trio(self._context.delete_msg)(stream, sequence)
        except nats.js.errors.NotFoundError:
            pass  # already gone: deleting twice is not an error
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot delete from {stream}: {error or type(error).__name__}") from error

    async def ack_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Settle ``deliveries``: those a consumer delivered are acked, all in one write over the link.

        Acks are fire and forget. Events from the ingress are deleted from the
        stream, all at once over the link under one timeout, and each one's
        ``on_settled`` learns whether that worked.
        """
        acks = [
            Request(delivery.handle.ack_subject.decode(), b"+ACK")
            for delivery in deliveries
            if isinstance(delivery.handle, FromConsumer)
        ]
        if acks:
            try:
                link = await self._requests_link()
            except NatsUnavailable as error:
                # Not acked means redelivered after ack_wait: at-least-once holds.
                log.warning("Cannot ack", events=len(acks), error=str(error))
            else:
                await link.publish(acks)
        from_ingress = [delivery for delivery in deliveries if isinstance(delivery.handle, FromIngress)]
        if not from_ingress:
            return
        removed = await self.delete_events([delivery.stream_sequence for delivery in from_ingress])
        for delivery, gone in zip(from_ingress, removed, strict=True):
            assert isinstance(delivery.handle, FromIngress)
            delivery.handle.on_settled(True, gone)

    async def delete_events(self, sequences: Sequence[int]) -> list[bool]:
        """Delete events from the event stream, together over the link; whether each is gone."""
        try:
            link = await self._requests_link()
        except NatsUnavailable as error:
            log.warning("Cannot delete events", events=len(sequences), error=str(error))
            return [False for _ in sequences]
        # nats-py's delete_msg has the server overwrite the message first; no need.
        subject = f"{api.DEFAULT_PREFIX}.STREAM.MSG.DELETE.{self.config.stream_name}"
        requests = [Request(subject, b'{"seq":%d,"no_erase":true}' % sequence) for sequence in sequences]
        replies = await self._request_all(link, requests)
        return [self._deleted(sequence, reply) for sequence, reply in zip(sequences, replies, strict=True)]

    @staticmethod
    def _deleted(sequence: int, answer: Reply | None) -> bool:
        """Whether JetStream's answer to deleting the event at ``sequence`` says it is gone."""
        if answer is None:
            log.warning("No answer to deleting an event", stream_sequence=sequence)
            return False
        if answer.data == _DELETED:
            return True
        try:
            error = json.loads(answer.data).get("error")
        except ValueError:
            error = {"description": "an unreadable answer"}
        if error is None:
            return True
        if error.get("err_code") == _ERR_SEQUENCE_NOT_FOUND or error.get("description") == _NO_MESSAGE_FOUND:
            return True  # already gone
        log.warning("Cannot delete an event", stream_sequence=sequence, error=error.get("description"))
        return False

    async def delete_consumer_if_drained(self, stream: str, name: str) -> bool:
        """Delete the durable consumer ``name`` if nothing waits for it and nothing it delivered
        is unacknowledged; whether it was deleted (False also when there is none).

        One that holds unacknowledged events is kept: a new consumer would
        count their deliveries from one again, past max_deliveries.
        """

        async def delete() -> bool:
            try:
                info = await self._context.consumer_info(stream, name)
            except nats.js.errors.NotFoundError:
                return False
            if info.num_pending or info.num_ack_pending:
                return False
            await self._context.delete_consumer(stream, name)
            return True

        async with self._consumer_requests:
            try:
                return await aio_as_trio(delete)()
            except _NATS_ERRORS as error:
                raise NatsUnavailable(f"cannot delete consumer {name}: {error or type(error).__name__}") from error

    async def open_consumer(self, domain: str, max_in_flight: int) -> PullConsumer:
        """Create or update ``domain``'s durable pull consumer and subscribe to it."""
        return await self._open(self.config.stream_name, domain_consumer_config(self.config, domain, max_in_flight))

    async def open_advisory_consumer(self) -> PullConsumer:
        """The dead-letter writers' shared consumer of the advisory stream."""
        config = api.ConsumerConfig(
            name="dead-letter-writer",
            durable_name="dead-letter-writer",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ADVISORY_ACK_WAIT_SECONDS,
            max_ack_pending=1000,
            num_replicas=self.config.replicas,
        )
        return await self._open(self.streams.given_up, config)

    async def _open(self, stream: str, config: api.ConsumerConfig) -> PullConsumer:
        name = config.durable_name
        assert name is not None

        if not self.connected.value:
            raise NatsUnavailable("not connected to NATS")
        try:
            async with self._consumer_requests:
                info = await aio_as_trio(self._context.add_consumer)(stream, config)
        except _NATS_ERRORS as error:
            raise NatsUnavailable(f"cannot open consumer {name}: {error or type(error).__name__}") from error
        replicas = info.config.num_replicas or self.config.replicas  # none given: the stream's, verified
        if replicas < self.config.replicas:
            raise StreamSetupError(
                f"nats.replicas: consumer {name!r} has {replicas} replicas, "
                f"{self.config.replicas} configured; the cluster did not apply them"
            )
        consumer = PullConsumer(self, stream, name, await self._requests_link())
        await consumer._listen()
        return consumer


def with_configured_credentials(connected: ParseResult, url: str) -> ParseResult:
    """The server nats-py is ``connected`` to, with the credentials of the configured ``url``s.

    A server nats-py found itself (a cluster's other nodes) has no
    credentials in its URL; nats-py, too, uses the configured ones then.
    """
    if connected.username:
        return connected
    for server in url.split(","):
        configured = urlparse(server.strip())
        if configured.username:
            return connected._replace(netloc=f"{configured.netloc.rpartition('@')[0]}@{connected.netloc}")
    return connected


def domain_consumer_config(config: NatsConfig, domain: str, max_in_flight: int) -> api.ConsumerConfig:
    """The durable pull consumer of ``domain``'s events."""
    name = consumer_name(domain)
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=domain_subject(config.subject_pattern, domain),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_seconds,
        max_deliver=config.max_deliveries,
        # Room for the in-flight events plus the failed ones waiting out ack_wait.
        max_ack_pending=max(1000, 4 * max_in_flight),
        num_replicas=config.replicas,
    )


async def keep_consuming(
    jetstream: JetStream,
    open_consumer: Callable[[], Awaitable[PullConsumer]],
    serve: Callable[[PullConsumer], Awaitable[None]],
    report: Callable[[ConsumeFailure | None], None] = lambda failure: None,
) -> NoReturn:
    """Keep a consumer open and call ``serve(consumer)`` again and again, until cancelled.

    Whenever NATS interrupts (``NatsUnavailable``: disconnected, reconnected,
    the consumer gone or refused), the consumer is closed, and opened anew once
    NATS is back, so a pull subscription never stays dead (nats.py #504). While
    it keeps failing, the pause before the next try doubles from
    ``RECONSUME_DELAY_SECONDS`` up to ``RECONSUME_MAX_DELAY_SECONDS``; a serve
    that completes starts again from the first. The first failure in a row is
    logged as a warning, the next ones at debug. ``report`` is told each
    failure (with the count in a row) and ``None`` once the consumer is open.
    """
    consumer: PullConsumer | None = None
    failures = 0
    try:
        while True:
            try:
                if consumer is None:
                    consumer = await open_consumer()
                    log.debug("Consuming", consumer=consumer.name)
                    report(None)
                await serve(consumer)
                failures = 0
            except NatsUnavailable as error:
                failures += 1
                delay = min(RECONSUME_DELAY_SECONDS * 2 ** min(failures - 1, 16), RECONSUME_MAX_DELAY_SECONDS)
                level = log.warning if failures == 1 else log.debug
                level("Consumer interrupted; re-opening", error=str(error), failures=failures, retry_in=delay)
                report(ConsumeFailure(str(error), failures))
                if consumer is not None:
                    await consumer.close()
                    consumer = None
                await jetstream.connected.wait_value(True)
                await trio.sleep(delay)
    finally:
        if consumer is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await consumer.close()


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Without a handler trio-asyncio re-raises stray asyncio errors into its
    # nursery and tears the whole service down.
    error = context.get("exception")
    log.error("asyncio error", message=context.get("message"), error=repr(error) if error else None)


@asynccontextmanager
async def open_jetstream(config: NatsConfig, url: str, routed_domains: int) -> AsyncIterator[JetStream]:
    """Connect to NATS at ``url`` (retrying until it answers) and ensure the streams.

    While open, a client that nats-py closes is replaced by a new connection. On exit the
    link is flushed and nats-py's connection drained (each bounded by
    ``DRAIN_TIMEOUT_SECONDS``), so acks already sent reach the server.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        jetstream = JetStream(config)
        await jetstream._connect_until_up(url)
        log.info("NATS connected", url=jetstream.server_url)
        try:
            await jetstream.ensure_streams(routed_domains)
            async with trio.open_nursery() as keeper:
                keeper.start_soon(jetstream._keep_connected, url)
                await keeper.start(jetstream._keep_link, url)
                try:
                    yield jetstream
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT_SECONDS):
                        await jetstream._flush_link()
                    keeper.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT_SECONDS):
                await aio_as_trio(jetstream._drain)()
