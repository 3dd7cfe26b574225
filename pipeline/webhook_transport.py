"""The lean webhook transport: keep-alive HTTP/1.1 on trio streams, responses parsed by httptools.

An ``httpx.AsyncBaseTransport``, so httpx's ``Request`` and ``Response`` stay
the interface, but none of httpcore's machinery: a request takes an idle
connection of its origin (or opens one), writes the request in one send, and
reads the whole answer, its body capped at ``BODY_CAP`` bytes, before it
returns. So a response never holds a connection: whatever happens to the
request (an error, a cancellation, a body over the cap) either returns its
connection to the pool whole or closes it on the spot.

The caller's cancel scope is the deadline: connect, send and the whole answer
are one operation, so ``with trio.move_on_after(t)`` around
``handle_async_request`` bounds the request, however slowly a backend
trickles. httpx's per-operation ``timeout`` extension is not read.
"""

from __future__ import annotations

import re
import select
import ssl
from collections import deque
from dataclasses import dataclass

import httptools
import httpx
import trio

from pipeline.sends import receive_when_readable, send_all_now

# A webhook answer is a status; its body is read this far, then the connection is dropped.
BODY_CAP = 64 * 1024
# A response head (status line and headers) larger than this is refused.
HEAD_CAP = 64 * 1024
RECEIVE_SIZE = 64 * 1024
# Idle connections are closed after this long (httpx's default).
KEEPALIVE_EXPIRY_SECONDS = 5.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\r\n\x00]")
_DEFAULT_PORTS = {b"http": 80, b"https": 443}


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    open_connections: int  # idle or in use; a connection is closed the moment it is not reusable
    idle_connections: int
    active_requests: int
    connections_opened: int  # over the transport's life
    bytes_received: int  # response bytes read from the network, over the transport's life


class _StaleConnection(Exception):
    """A reused connection failed before any response byte: the server had closed it while idle."""


class _Connection:
    __slots__ = ("stream", "socket", "idle_since", "reused")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = socket
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        """Drop the connection at once (no TLS close_notify): nothing waits on a webhook's goodbye."""
        self.socket.close()

    def dropped(self) -> bool:
        """Readable while idle: the server closed it (or sent what no request asked for)."""
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class _Response:
    """httptools' callbacks for one response: status, headers, and a body kept up to ``BODY_CAP``."""

    __slots__ = (
        "headers",
        "chunks",
        "body_size",
        "headers_done",
        "complete",
        "truncated",
        "head_only",
        "keep_alive",
        "status",
        "parser",
    )

    def __init__(self, head_only: bool) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.headers_done = False
        self.complete = False
        self.truncated = False
        self.head_only = head_only  # a HEAD request: the answer ends with its head
        self.keep_alive = False  # read with the head: llhttp resets it once the message ends
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.complete:
            raise RuntimeError("data after the response")  # stops the parser: the connection is out of step

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            self.headers = []  # an interim answer (100 Continue): the real one follows
            return
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > BODY_CAP:
            self.truncated = True
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True

    def delimited_by_close(self) -> bool:
        """No Content-Length and not chunked: the body ends when the server closes the connection."""
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names


class WebhookTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive for webhooks; one instance is one connection pool.

    Connections open with ``trio.open_tcp_stream`` (IPv6 and happy eyeballs)
    and, for https, ``trio.SSLStream`` on the shared ``ssl_context`` (SNI and
    verification as the context says). Idle connections are reused newest
    first and closed after ``KEEPALIVE_EXPIRY_SECONDS`` (when their origin is
    next used, or by ``close_expired``). Their number is not capped: idle
    connections are never more than were in use at once a moment ago, which
    the callers' in-flight limits bound. A response with ``Connection: close``,
    an HTTP/1.0 one, a close-delimited body or a body over ``BODY_CAP``
    (``extensions["body_truncated"]`` says so) closes its connection. A request
    that fails on a reused connection before any response byte arrived (the
    server closed it while it was idle) is sent once more on a new connection.
    Redirects are answers like any other: never followed. CR, LF or NUL in the
    method, target or a header is refused with ``httpx.LocalProtocolError``.
    Errors are httpx's: ``ConnectError`` (with the TLS reason, e.g.
    certificate verify failed), ``WriteError``, ``ReadError``,
    ``RemoteProtocolError``. After ``aclose`` idle connections are closed and
    those in use close when their request ends.
    """

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[tuple[bytes, str, int], deque[_Connection]] = {}
        self._closed = False
        self._active = 0
        self._opened = 0
        self._dropped = 0
        self._received = 0

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            open_connections=self._opened - self._dropped,
            idle_connections=sum(len(idle) for idle in self._idle.values()),
            active_requests=self._active,
            connections_opened=self._opened,
            bytes_received=self._received,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the webhook transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}: http or https only")
        # raw_host: an international name in its IDNA (xn--) form, which is what DNS and SNI take.
        origin = (scheme, url.raw_host.decode("ascii"), url.port or _DEFAULT_PORTS[scheme])
        method = request.method.encode("latin-1", errors="replace")
        head_only = method == b"HEAD"
        stream = request.stream
        # The forwarder's bodies are ByteStreams, readable as they are: aread's await and copy skipped.
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else await request.aread()
        data, keep_alive = _request_bytes(method, url.raw_path, request.headers.raw, body)
        self._active += 1
        try:
            connection = self._take_idle(origin)
            if connection is not None:
                try:
                    return await self._exchange(origin, connection, data, head_only, keep_alive)
                except _StaleConnection:
                    pass  # the one retry, on a new connection
            connection = await self._connect(origin)
            return await self._exchange(origin, connection, data, head_only, keep_alive)
        finally:
            self._active -= 1

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                self._drop(connection)
        self._idle.clear()

    def close_expired(self) -> None:
        """Close the connections idle for longer than ``KEEPALIVE_EXPIRY_SECONDS``, of every origin."""
        for origin in list(self._idle):
            self._drop_expired(self._idle[origin])
            if not self._idle[origin]:
                del self._idle[origin]

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._dropped += 1

    def _drop_expired(self, idle: deque[_Connection]) -> None:
        expired = trio.current_time() - KEEPALIVE_EXPIRY_SECONDS
        while idle and idle[0].idle_since < expired:
            self._drop(idle.popleft())

    def _take_idle(self, origin: tuple[bytes, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        self._drop_expired(idle)
        while idle:
            connection = idle.pop()
            if not connection.dropped():
                connection.reused = True
                return connection
            self._drop(connection)
        return None

    def _keep(self, origin: tuple[bytes, str, int], connection: _Connection) -> None:
        if self._closed:
            self._drop(connection)
            return
        idle = self._idle.setdefault(origin, deque())
        connection.idle_since = trio.current_time()
        idle.append(connection)

    async def _connect(self, origin: tuple[bytes, str, int]) -> _Connection:
        scheme, host, port = origin
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as error:
            raise httpx.ConnectError(_connect_failure(error, host, port)) from error
        self._opened += 1
        connection = _Connection(tcp, tcp.socket)
        if scheme == b"http":
            return connection
        try:
            # https_compatible: servers may end a close-delimited body without close_notify.
            tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=host, https_compatible=True)
            await tls.do_handshake()
        except trio.BrokenResourceError as error:
            self._drop(connection)
            raise httpx.ConnectError(f"TLS handshake failed: {error.__cause__ or error}") from error
        except BaseException:
            self._drop(connection)
            raise
        connection.stream = tls
        return connection

    async def _exchange(
        self,
        origin: tuple[bytes, str, int],
        connection: _Connection,
        data: bytes,
        head_only: bool,
        keep_alive: bool,
    ) -> httpx.Response:
        """Send ``data`` and read the answer; keeps the connection only if the answer ended cleanly."""
        response = _Response(head_only)
        received = 0
        try:
            try:
                await send_all_now(connection.stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                if connection.reused:
                    raise _StaleConnection from error
                raise httpx.WriteError(f"connection lost while sending: {error.__cause__ or error}") from error
            while not response.complete:
                try:
                    chunk = await receive_when_readable(connection.stream, RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    if connection.reused and not received:
                        raise _StaleConnection from error
                    raise httpx.ReadError(f"connection lost while reading: {error.__cause__ or error}") from error
                if not chunk:
                    if response.headers_done and response.delimited_by_close():
                        keep_alive = False
                        break
                    if connection.reused and not received:
                        raise _StaleConnection
                    raise httpx.RemoteProtocolError(
                        "server closed the connection before the response was complete"
                        if received
                        else "server closed the connection without answering"
                    )
                received += len(chunk)
                self._received += len(chunk)
                try:
                    response.parser.feed_data(chunk)
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
                    if not response.complete:
                        raise httpx.RemoteProtocolError(f"invalid HTTP response: {error}") from error
                    keep_alive = False  # bytes after the answer: the connection is out of step
                if response.truncated:
                    keep_alive = False
                    break
                if not response.headers_done and received > HEAD_CAP:
                    raise httpx.RemoteProtocolError(f"response head larger than {HEAD_CAP} bytes")
        except BaseException:
            # An error or a cancellation leaves the connection mid-answer: never reused.
            self._drop(connection)
            raise
        finally:
            # The parser holds the response's methods and the response the parser: left
            # to the garbage collector, such cycles (two an event) piled up between its
            # young collections, each then a pause of 15-50 ms at 300 events/s.
            del response.parser
        if keep_alive and not head_only and response.keep_alive:
            self._keep(origin, connection)
        else:
            self._drop(connection)
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=httpx.ByteStream(b"".join(response.chunks)),
            extensions={"http_version": b"HTTP/1.1", "body_truncated": response.truncated},
        )


def _request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[bytes, bool]:
    """The request as sent, and whether it lets the connection live on; refuses what could end a line or the head."""
    if not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError(f"invalid method {method!r}")
    if _CONTROL.search(target) or b" " in target:
        raise httpx.LocalProtocolError(f"request target {target!r} contains a space, CR, LF or NUL: refused")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    chunked = False
    keep_alive = True
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise httpx.LocalProtocolError(f"invalid header name {name!r}: refused")
        if _CONTROL.search(value):
            raise httpx.LocalProtocolError(f"header {name.decode()} contains CR, LF or NUL: refused")
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lowered == b"connection":
            keep_alive = b"close" not in value.lower()
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    if chunked:  # a streamed request body, read whole: sent as one chunk
        lines += (b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n") if body else (b"0\r\n\r\n",)
    else:
        lines.append(body)
    return b"".join(lines), keep_alive


def _connect_failure(error: OSError, host: str, port: int) -> str:
    """trio's "all attempts … failed" with each attempt's reason, which is what an operator needs."""
    cause = error.__cause__
    if isinstance(cause, ExceptionGroup):
        reasons = dict.fromkeys(str(attempt) for attempt in cause.exceptions)
        return f"{error}: {'; '.join(reasons)}"
    return f"{host}:{port}: {error}"  # name resolution: the error does not say which name
