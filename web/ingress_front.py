"""The HTTP server of a listener that takes POST /events: the hot path on trio streams, the rest by hypercorn.

At 300 requests/s hypercorn costs ~1 CPU-ms a request on these machines
against 0.28 for a bare trio server (bench/RESULTS.md): tasks and checkpoints
per request (an app task, an idle timer restarted per request, a lock and a
send per part of the answer). So the front reads every connection first. A
request that is ``POST /events`` with a Content-Length body, what PBXs send,
is answered here by ``EventIngress.post_event``, in one send; a head that
cannot be read gets a JSON 400 here (hypercorn's has no body). The first
request of any other kind (another path or method, a chunked body,
``Expect: 100-continue``, an upgrade, lines ending in a bare LF) hands the
connection, with every byte read from it, to hypercorn's own connection
handler, which serves it from then on as if it had accepted it: the same app,
configuration, limits and shutdown as ``hypercorn.trio.serve``, whose
``worker_serve`` this follows (hypercorn is pinned to the versions tested).

Slow clients: a connection whose next request head is not complete within
``keep_alive_timeout`` is closed (hypercorn's rule; looked for four times per
timeout by one task, ``close_idle``, not by a timer per request, which costs
~10 µs of each request's CPU), a body has
``EventIngress``'s body timeout (408), an answer the client does not take
within that timeout closes the connection (here and under hypercorn), and a
head still incomplete after ``MAX_HEAD`` bytes (h11's limit) gets a JSON 431.
"""

from __future__ import annotations

import functools
import re
import time
from functools import partial
from http import HTTPStatus
from wsgiref.handlers import format_date_time

import httptools
import structlog
import trio
import trio_util
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from pipeline.sends import receive_when_readable, send_all_now
from web.ingress import Answer, BodyTooSlow, ClientGone, EventIngress, encoded

log = structlog.get_logger(component="http")

# hypercorn's own limit on a request head (h11's max incomplete event size).
MAX_HEAD = 16 * 1024
RECEIVE_SIZE = 64 * 1024
# A refused request's client still sending its body: how long a pause ends the wait for the rest.
LINGER_IDLE_SECONDS = 2
# How often a connection waiting for its next request head is looked at: one idle that long is
# closed after 1 to 1.25 × keep_alive_timeout.
IDLE_CHECKS_PER_TIMEOUT = 4
_HEAD_END = b"\r\n\r\n"
# A head whose lines end in LF alone (which h11, and so hypercorn, accepts).
_BARE_LF_HEAD_END = re.compile(rb"\n\r?\n")
_INTERNAL_ERROR: Answer = (500, {"status": "error", "error": "internal error"}, {})


class _HeadTooLarge(Exception):
    """No complete request head within ``MAX_HEAD`` bytes."""


class _HandedOver(trio.abc.Stream):
    """A connection given to hypercorn: first the bytes the front read, then the socket's.

    hypercorn sends with no deadline (and shielded): a client that stops reading would
    hold its connection, and a file descriptor, for good. A send not taken within
    ``send_timeout`` closes the connection.
    """

    def __init__(self, stream: trio.SocketStream, unread: bytes, send_timeout: float) -> None:
        self._stream = stream
        self._unread = unread
        self._send_timeout = send_timeout
        self.socket = stream.socket  # hypercorn reads the client's address from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._unread:
            await trio.lowlevel.checkpoint()
            size = max_bytes or len(self._unread)
            data, self._unread = self._unread[:size], self._unread[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(self._send_timeout):
            await self._stream.send_all(data)
            return
        await trio.aclose_forcefully(self._stream)
        raise trio.BrokenResourceError(f"the client did not take its answer within {self._send_timeout:g} s")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Head:
    """httptools' callbacks for one request head: its target and headers (names lower case, the last of a repeat)."""

    __slots__ = ("target", "headers", "repeated")

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[str, str] = {}
        self.repeated: set[str] = set()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in self.headers:
            self.repeated.add(key)
        self.headers[key] = value.decode("latin-1")


class _Malformed(Exception):
    """A request head refused with 400: ``str()`` says what is wrong, for the client."""


def _event_post(head: bytes) -> tuple[dict[str, str], int, bool] | None:
    """For a head the front answers itself: its headers, Content-Length and whether to keep the
    connection; None for one hypercorn serves. Raises ``_Malformed`` for one nothing can serve
    (hypercorn's own 400 has no body; the client gets a JSON error here)."""
    request = _Head()
    parser = httptools.HttpRequestParser(request)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        return None
    except httptools.HttpParserError as error:
        raise _Malformed(f"malformed request head: {error}") from None
    headers = request.headers
    http_1_0 = parser.get_http_version() == "1.0"
    if "host" not in headers and not http_1_0:
        raise _Malformed("an HTTP/1.1 request needs a Host header")
    if parser.get_method() != b"POST" or request.target.partition(b"?")[0] != b"/events":
        return None
    if "transfer-encoding" in headers or "expect" in headers or "content-length" not in headers:
        return None
    length = headers["content-length"]
    if "content-length" in request.repeated or not (length.isascii() and length.isdigit()):
        raise _Malformed("Content-Length must be given once, as a number of bytes")
    # HTTP/1.0 connections close after the answer, as hypercorn's do.
    return headers, int(length), parser.should_keep_alive() and not http_1_0


@functools.lru_cache(maxsize=1)  # the same for every answer within a second
def _http_date(second: int) -> bytes:
    return format_date_time(second).encode()


def _response(answer: Answer, keep_alive: bool) -> bytes:
    status, headers, payload = encoded(answer)
    if not keep_alive:
        headers.append((b"connection", b"close"))
    headers.append((b"date", _http_date(int(time.time()))))
    lines = b"".join(b"%s: %s\r\n" % header for header in headers)
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, HTTPStatus(status).phrase.encode(), lines, payload)


class IngressFront:
    """Serves one listener's connections: POST /events itself, everything else through hypercorn."""

    def __init__(self, ingress: EventIngress, hand_over: partial[TCPServer], keep_alive_timeout: float) -> None:
        self._ingress = ingress
        self._hand_over = hand_over
        self._keep_alive_timeout = keep_alive_timeout
        # The connections waiting for a request head, and since when.
        self._waiting: dict[trio.SocketStream, float] = {}
        self._stopping = False

    def stop(self) -> None:
        """Close the connections waiting for a request; the others after their answer."""
        self._stopping = True
        for stream in list(self._waiting):
            stream.socket.close()  # its task, waiting to read, gets ClosedResourceError

    async def close_idle(self) -> None:
        """Close each connection whose next request head has not come within the keep-alive timeout, until cancelled."""
        async for _ in trio_util.periodic(self._keep_alive_timeout / IDLE_CHECKS_PER_TIMEOUT):
            expired = trio.current_time() - self._keep_alive_timeout
            for stream, since in list(self._waiting.items()):
                if since <= expired:
                    stream.socket.close()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            while not self._stopping:
                try:
                    end = await self._receive_head(stream, buffer)
                    if end is None:
                        return
                    post = _event_post(bytes(buffer[:end])) if end else None
                except _HeadTooLarge:
                    await self._refuse(stream, 431, f"request head larger than {MAX_HEAD} bytes")
                    return
                except _Malformed as error:
                    await self._refuse(stream, 400, str(error))
                    return
                if post is None:
                    await self._hand_over(_HandedOver(stream, bytes(buffer), self._ingress.body_timeout))
                    return
                del buffer[:end]
                if not await self._answer(stream, buffer, *post):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
            pass
        except Exception:
            # One connection's failure must not end the server (and every other connection).
            log.exception("Error serving a connection; it is closed")
        finally:
            await stream.aclose()

    async def _receive_head(self, stream: trio.SocketStream, buffer: bytearray) -> int | None:
        """Read until ``buffer`` holds a request head: the index past its blank line; 0 for a head
        whose lines end in a bare LF (hypercorn reads those); None at the end of the stream.
        Raises ``_HeadTooLarge`` when no complete head came within ``MAX_HEAD`` bytes, and
        ``trio.ClosedResourceError`` when the connection was closed waiting (idle, stopping)."""
        searched = 0
        self._waiting[stream] = trio.current_time()
        try:
            while (found := buffer.find(_HEAD_END, searched)) < 0:
                if _BARE_LF_HEAD_END.search(buffer):
                    return 0
                if len(buffer) > MAX_HEAD:
                    raise _HeadTooLarge
                searched = max(0, len(buffer) - len(_HEAD_END) + 1)
                data = await receive_when_readable(stream, RECEIVE_SIZE)
                if not data:
                    return None
                buffer += data
            return found + len(_HEAD_END)
        finally:
            del self._waiting[stream]

    async def _refuse(self, stream: trio.SocketStream, status: int, message: str) -> None:
        """Answer a request the front cannot read with a JSON error; the connection is then closed."""
        refusal: Answer = (status, {"status": "error", "error": message}, {})
        if await send_all_now(stream, _response(refusal, keep_alive=False), self._ingress.body_timeout):
            await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Before closing a connection whose request was not read whole: the answer's end (FIN)
        first, then what the client still sends is read and dropped until it stops
        (``LINGER_IDLE_SECONDS`` without a byte), for the body timeout at most. Closed at once,
        the unread bytes make the kernel reset the connection, and a client still sending its
        body (one too large: 413) loses the answer."""
        with trio.move_on_after(self._ingress.body_timeout):
            await stream.send_eof()
            while True:
                with trio.move_on_after(LINGER_IDLE_SECONDS):
                    if await receive_when_readable(stream, RECEIVE_SIZE):
                        continue
                return

    async def _answer(
        self, stream: trio.SocketStream, buffer: bytearray, headers: dict[str, str], length: int, keep_alive: bool
    ) -> bool:
        """Answer one POST /events whose body starts in ``buffer``; whether the connection stays open."""
        body_read = False

        async def read_body() -> bytes | None:
            nonlocal body_read
            if length > self._ingress.max_body_size:
                return None
            if len(buffer) < length:  # mostly the body comes with its head, and waits for nothing
                with trio.move_on_after(self._ingress.body_timeout):
                    while len(buffer) < length:
                        data = await receive_when_readable(stream, RECEIVE_SIZE)
                        if not data:
                            raise ClientGone
                        buffer.extend(data)
                if len(buffer) < length:
                    raise BodyTooSlow
            body = bytes(buffer[:length])
            del buffer[:length]
            body_read = True
            return body

        try:
            answer = await self._ingress.post_event(headers, read_body)
        except ClientGone:
            raise
        except Exception:
            log.exception("Error answering POST /events")
            answer, body_read = _INTERNAL_ERROR, False
        # A body left unread (refused before it was read, or too slow) ends the connection.
        keep_alive = keep_alive and body_read and not self._stopping
        # A client that stops reading its answers has as long to take one as to send a body.
        taken = await send_all_now(stream, _response(answer, keep_alive), self._ingress.body_timeout)
        if taken and not body_read:
            await self._linger(stream)
        return keep_alive and taken


async def serve_front(
    ingress: EventIngress,
    config: HypercornConfig,
    sockets: Sockets,
    stopping: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve(ingress, config, shutdown_trigger=stopping.wait)`` on ``sockets`` (listening),
    with the front reading connections."""
    app = wrap_app(ingress, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        front = IngressFront(
            ingress,
            partial(TCPServer, app, config, context, ConnectionState(lifespan_state.copy())),
            config.keep_alive_timeout,
        )
        async with trio.open_nursery() as connections:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets.insecure_sockets]
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(trio.serve_listeners, front.serve_connection, listeners, handler_nursery=connections)
                    )
                    accepting.start_soon(front.close_idle)
                    task_status.started(
                        [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets.insecure_sockets]
                    )
                    await stopping.wait()
                    accepting.cancel_scope.cancel()
            finally:
                front.stop()
                await context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
