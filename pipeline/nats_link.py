"""The hot path's own NATS connection: requests and their replies on a trio stream.

Publishing an event and deleting a forwarded one are a request each (a PUB or
HPUB with a reply subject) and JetStream's one-message answer. Through nats-py
on the trio-asyncio loop such a request cost ~0.5 ms of CPU, most of it asyncio
callbacks each taking a trio step; spoken here in NATS's text protocol on a
trio socket it costs ~0.2 ms (bench/RESULTS.md). A consumer's pulls go over it
too: a pull is a request whose replies (the messages, then maybe a status) come
to an inbox of its own (``listen``), and an ack is a message with no reply
(``publish``). nats-py keeps everything else: stream and consumer management,
and the connection state the service follows (``JetStream.connected``).

A link is one connection. It never reconnects: when it breaks every request
waiting on it gets no answer, and ``JetStream`` opens another. It closes itself
when the server does not take a send, or does not answer, within its timeout:
a server late once is not trusted with the next requests. The answers are
timed by one task for the whole link, not by a timer per request (trio's
cancel scope costs ~10 µs, and every event is a request).
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import ParseResult, unquote

import trio

from pipeline.sends import receive_when_readable, write_now

DEFAULT_PORT = 4222
RECEIVE_SIZE = 64 * 1024
# A line the server sends (INFO, a message's control line) is never near this long.
MAX_LINE = 1024 * 1024
# Under the link's inbox: replies to requests at R.<token> (one wildcard subscription, sid 1),
# each ``listen`` inbox at L<sid>, which that wildcard does not match: the server sends a
# message once for every subscription it matches.
_REPLIES = b"R."
_LISTENER = b"L"
_CRLF = b"\r\n"
# While no answer is awaited, how often the link looks again: an answer awaited from then on
# is found late within 1.25 × the timeout.
_IDLE_CHECKS_PER_TIMEOUT = 4


class LinkError(Exception):
    """The connection could not be opened, or the server refused it."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A message the link received: its status (``"503"`` for no responders) if it had one, its data.

    ``reply_to`` is the subject it asks an answer on (a JetStream message's ack
    subject), ``description`` the status's words (``"Consumer Deleted"``).
    """

    status: str | None
    data: bytes
    reply_to: bytes = b""
    description: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    subject: str
    payload: bytes
    headers: bytes | None = None  # a header_block(): built once by the caller, who may check its size

    def encode(self, reply_to: bytes = b"") -> bytes:
        """The PUB (HPUB with headers) command; with ``reply_to`` empty, one that asks no answer."""
        subject = self.subject.encode()
        if reply_to:
            subject += b" " + reply_to
        if self.headers is None:
            return b"PUB %s %d\r\n%s\r\n" % (subject, len(self.payload), self.payload)
        return b"HPUB %s %d %d\r\n%s%s\r\n" % (
            subject,
            len(self.headers),
            len(self.headers) + len(self.payload),
            self.headers,
            self.payload,
        )


def header_block(headers: dict[str, str]) -> bytes:
    """``NATS/1.0``, one line per header, a blank line: what the server counts against max_payload too."""
    return b"NATS/1.0\r\n%s\r\n" % b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())


class PendingReplies:
    """The replies to requests sent together: wait for them, then collect them."""

    def __init__(self, link: NatsLink, tokens: list[bytes]) -> None:
        self._link = link
        self._tokens = tokens
        self._replies: list[Reply | None] = [None] * len(tokens)
        self._unanswered = len(tokens)
        self._answered = trio.Event()
        if not tokens:
            self._answered.set()

    @property
    def done(self) -> trio.Event:
        """Set once every request has its reply or no longer waits for one (collected)."""
        return self._answered

    def _settle(self, index: int, reply: Reply | None) -> None:
        self._replies[index] = reply
        self._unanswered -= 1
        if not self._unanswered:
            self._answered.set()

    async def wait_answered(self) -> None:
        """Until every request has its reply, or the link broke."""
        await self._answered.wait()

    def collect(self) -> list[Reply | None]:
        """One reply per request, in order; None where none came. Later replies are dropped."""
        for token in self._tokens:
            self._link._waiting.pop(token, None)
        self._answered.set()  # nothing awaited any more: not late, whatever comes
        return self._replies


class NatsLink:
    """One connection to a NATS server that sends requests and reads their replies.

    ``send_requests`` may be called from many tasks at once; ``serve`` must
    run (in its own task) for replies to arrive, and returns when the connection ends.
    A send not taken whole within ``io_timeout``, or a reply (a flush's PONG) not
    come within it, closes the link.
    """

    def __init__(self, stream: trio.abc.Stream, info: dict, inbox: bytes, leftover: bytes, io_timeout: float) -> None:
        self._stream = stream
        self._timeout = io_timeout
        self.max_payload: int = info.get("max_payload", 1024 * 1024)
        self._buffer = bytearray(leftover)
        self._send_lock = trio.Lock()
        self._inbox = inbox
        self._replies = inbox + _REPLIES
        self._next_token = 0
        self._waiting: dict[bytes, tuple[PendingReplies, int]] = {}
        # The inboxes ``listen`` opened, by their subscription id (the replies' is 1).
        self._listeners: dict[bytes, Callable[[Reply | None], None]] = {}
        self._next_sid = 2
        self._pongs_awaited: deque[trio.Event] = deque()  # the flushes' PINGs, in the order sent
        # What was sent and awaits an answer, in the order sent: by when, and set once answered.
        self._awaited: deque[tuple[float, trio.Event]] = deque()
        self.closed = False

    async def send_requests(self, requests: Sequence[Request]) -> PendingReplies:
        """Send ``requests`` at once (one write); their replies arrive in the returned ``PendingReplies``."""
        tokens = [b"%d" % token for token in range(self._next_token, self._next_token + len(requests))]
        self._next_token += len(requests)
        pending = PendingReplies(self, tokens)
        if self.closed:
            for index in range(len(tokens)):
                pending._settle(index, None)
            return pending
        for index, token in enumerate(tokens):
            self._waiting[token] = (pending, index)
        commands = [request.encode(self._replies + token) for request, token in zip(requests, tokens, strict=True)]
        try:
            await self._send(b"".join(commands))
        except BaseException:  # cancelled waiting for the send lock: nothing was sent
            pending.collect()
            raise
        self._awaited.append((trio.current_time() + self._timeout, pending.done))
        return pending

    async def publish(self, messages: Sequence[Request], reply_to: bytes = b"") -> None:
        """Send ``messages`` at once (one write), with no answer awaited; lost if the link breaks.

        Answers to ``reply_to`` (an inbox of ``listen``), if given, go to its listener.
        """
        await self._send(b"".join(message.encode(reply_to) for message in messages))

    async def flush(self) -> None:
        """Until the server has read everything sent before (a PING's PONG), or the link ended."""
        if self.closed:
            return
        answered = trio.Event()
        self._pongs_awaited.append(answered)
        await self._send(b"PING\r\n")
        self._awaited.append((trio.current_time() + self._timeout, answered))
        await answered.wait()

    async def listen(self, on_message: Callable[[Reply | None], None]) -> bytes:
        """A new inbox subject: ``on_message`` is called with each message sent to it, and with None when the link ends.

        Messages come in the order the server sent them; ``unlisten`` ends it.
        """
        sid = b"%d" % self._next_sid
        self._next_sid += 1
        subject = self._inbox + _LISTENER + sid
        if self.closed:
            on_message(None)
            return subject
        self._listeners[sid] = on_message
        await self._send(b"SUB %s %s\r\n" % (subject, sid))  # a failed send closes the link, which tells on_message
        return subject

    async def unlisten(self, subject: bytes) -> None:
        """Stop ``subject``'s messages (those on their way are dropped)."""
        sid = subject.rpartition(b"." + _LISTENER)[2]
        if self._listeners.pop(sid, None) is not None:
            await self._send(b"UNSUB %s\r\n" % sid)

    async def _send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            try:
                self._send_lock.acquire_nowait()  # not a turn at the scheduler when nobody else sends
            except trio.WouldBlock:
                await self._send_lock.acquire()
            try:
                sent = write_now(self._stream, data)
                if sent < len(data):
                    # A send cut short would leave half a command on the wire: it finishes
                    # (by the caller's deadline, and within the timeout: a server that
                    # stopped reading must not hold every sender behind this lock), or the link is closed.
                    deadline = min(trio.current_effective_deadline(), trio.current_time() + self._timeout)
                    with trio.CancelScope(shield=True, deadline=deadline) as sending:
                        await self._stream.send_all(memoryview(data)[sent:])
                    if sending.cancelled_caught:
                        self.close()
            finally:
                self._send_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.close()

    def close(self) -> None:
        """End the link: every request still waiting gets no answer; ``serve`` returns."""
        if self.closed:
            return
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for pending, index in waiting.values():
            pending._settle(index, None)
        listeners, self._listeners = self._listeners, {}
        for on_message in listeners.values():
            on_message(None)
        for answered in self._pongs_awaited:
            answered.set()
        # Closing a trio stream is synchronous for sockets; an SSL stream's is not.
        transport = self._stream.transport_stream if isinstance(self._stream, trio.SSLStream) else self._stream
        assert isinstance(transport, trio.SocketStream)
        transport.socket.close()

    async def serve(self) -> None:
        """Read replies (and answer the server's pings) until the connection ends; the link is closed then.

        Raises what ended the connection, unless it was ``close``.
        """
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_when_late)
            try:
                await self._read()
            except BaseException as error:  # raised below, not as a group of the nursery's
                failure = error
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _close_when_late(self) -> None:
        """Close the link once an answer it awaits is later than the timeout."""
        awaited = self._awaited
        while True:
            while awaited and awaited[0][1].is_set():
                awaited.popleft()
            if not awaited:
                await trio.sleep(self._timeout / _IDLE_CHECKS_PER_TIMEOUT)
                continue
            deadline, answered = awaited[0]
            await trio.sleep_until(deadline)
            if not answered.is_set():
                self.close()
                return

    async def _read(self) -> None:
        try:
            while not self.closed:
                line = await self._line()
                if line.startswith((b"MSG ", b"HMSG ")):
                    await self._message(line)
                elif line == b"PING":
                    await self._send(b"PONG\r\n")
                elif line == b"PONG":
                    if self._pongs_awaited:
                        self._pongs_awaited.popleft().set()
                elif line.startswith(b"-ERR"):
                    raise LinkError(f"the server said {line[5:].decode(errors='replace').strip()}")
                # +OK and INFO (the cluster's servers changed) need nothing.
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if not self.closed:
                raise
        finally:
            self.close()

    async def _message(self, line: bytes) -> None:
        # MSG <subject> <sid> [reply-to] <size>, HMSG <subject> <sid> [reply-to] <header size> <size>
        fields = line.split()
        with_headers = fields[0] == b"HMSG"
        size = int(fields[-1])
        header_size = int(fields[-2]) if with_headers else 0
        body = await self._exactly(size + 2)
        status, description = None, ""
        if with_headers:
            first = body[: body.find(_CRLF)].split(maxsplit=2)
            status = first[1].decode() if len(first) > 1 else None
            description = first[2].decode(errors="replace") if len(first) > 2 else ""
        reply_to = fields[3] if len(fields) == (6 if with_headers else 5) else b""
        reply = Reply(status, bytes(body[header_size:size]), reply_to, description)
        sid = fields[2]
        if sid != b"1":
            on_message = self._listeners.get(sid)
            if on_message is not None:
                on_message(reply)
            return
        waiting = self._waiting.pop(fields[1].rpartition(b".")[2], None)
        if waiting is not None:
            pending, index = waiting
            pending._settle(index, reply)

    async def _line(self) -> bytes:
        while (end := self._buffer.find(_CRLF)) < 0:
            if len(self._buffer) > MAX_LINE:
                raise LinkError("the server sent a line longer than any it should")
            await self._receive()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytearray:
        while len(self._buffer) < size:
            await self._receive()
        data = self._buffer[:size]
        del self._buffer[:size]
        return data

    async def _receive(self) -> None:
        data = await receive_when_readable(self._stream, RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("the server closed the connection")
        self._buffer += data


@asynccontextmanager
async def open_nats_link(
    url: ParseResult, name: str, connect_timeout: float, tls: ssl.SSLContext | None = None, *, io_timeout: float
) -> AsyncIterator[NatsLink]:
    """Connect to the server at ``url`` (``nats://`` or ``tls://``, credentials as nats-py reads them).

    A send the server does not take whole within ``io_timeout``, or an answer it does not
    send within it, closes the link.

    TLS, when the URL or the server asks for it, as nats-py does it: the
    system's trusted CAs (or ``tls``'s), after the server's INFO.

    Raises ``LinkError`` (or ``OSError``) if it cannot connect, or refuses the connection, within ``connect_timeout``.
    """
    host = url.hostname or "127.0.0.1"
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, url.port or DEFAULT_PORT)
        try:
            info_line, leftover = await _first_line(stream, b"")
            if not info_line.startswith(b"INFO "):
                raise LinkError(f"not a NATS server (it said {info_line[:40]!r})")
            info = json.loads(info_line[5:])
            if url.scheme == "tls" or info.get("tls_required"):
                stream = trio.SSLStream(stream, tls or ssl.create_default_context(), server_hostname=host)
                await stream.do_handshake()
            options = {
                "verbose": False,
                "pedantic": False,
                "lang": "python3",
                "version": "telephony-forwarder",
                "protocol": 1,
                "headers": True,
                "no_responders": True,
                "name": name,
            }
            # As nats-py reads a URL: user and password, or a lone user as a token.
            if url.username and url.password:
                options |= {"user": unquote(url.username), "pass": unquote(url.password)}
            elif url.username:
                options["auth_token"] = unquote(url.username)
            # Subscribed to the replies before the first request: the server has the SUB once it answers the PING.
            inbox = b"_INBOX.%s." % secrets.token_hex(11).encode()
            await stream.send_all(
                b"CONNECT %s\r\nSUB %s%s* 1\r\nPING\r\n" % (json.dumps(options).encode(), inbox, _REPLIES)
            )
            while True:
                line, leftover = await _first_line(stream, leftover)
                if line == b"PONG":
                    break
                if line.startswith(b"-ERR"):
                    raise LinkError(f"the server refused the connection: {line[5:].decode(errors='replace').strip()}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    link = NatsLink(stream, info, inbox, leftover, io_timeout)
    try:
        yield link
    finally:
        link.close()


async def _first_line(stream: trio.abc.Stream, buffer: bytes) -> tuple[bytes, bytes]:
    """The first line in ``buffer`` + what ``stream`` sends next, and what comes after it."""
    data = bytearray(buffer)
    while (end := data.find(_CRLF)) < 0:
        if len(data) > MAX_LINE:
            raise LinkError("the server sent a line longer than any it should")
        chunk = await stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            raise LinkError("the server closed the connection")
        data += chunk
    return bytes(data[:end]), bytes(data[end + 2 :])
