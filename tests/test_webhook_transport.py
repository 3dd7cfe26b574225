"""The lean webhook transport against raw servers on 127.0.0.1 that write the wire by hand."""

from __future__ import annotations

import gc
import ssl

import httpx
import pytest
import trio
import trio.testing
import trustme
from trio_util import AsyncValue

from pipeline.webhook_transport import BODY_CAP, KEEPALIVE_EXPIRY_SECONDS, RECEIVE_SIZE, WebhookTransport
from tests.conftest import StartRawBackend
from tests.harness import WireRequests, answering_huge

TEST_TIMEOUT = 20
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def transport(tls: ssl.SSLContext | None = None) -> WebhookTransport:
    return WebhookTransport(tls or httpx.create_ssl_context())


async def post(client: WebhookTransport, url: str, **headers: str) -> httpx.Response:
    request = httpx.Request("POST", url, headers=headers, content=b'{"call_id": "c-1"}')
    response = await client.handle_async_request(request)
    await response.aread()
    return response


class Connections:
    """What a raw backend saw: connections accepted and requests read, in order."""

    def __init__(self) -> None:
        self.accepted = 0
        self.requests: list[bytes] = []
        self.closed_by_client = AsyncValue(0)


def answering(answer: bytes, seen: Connections, *, then_close: bool = False):
    """A backend giving every request ``answer``; with ``then_close``, it closes after each answer."""

    async def handler(stream: trio.abc.Stream) -> None:
        seen.accepted += 1
        requests = WireRequests(stream)
        while (request := await requests.next()) is not None:
            seen.requests.append(request)
            await stream.send_all(answer)
            if then_close:
                return
        seen.closed_by_client.value += 1

    return handler


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", id="chunked"
        ),
    ],
)
async def test_framed_bodies_are_read_whole_and_the_connection_kept(start_raw_backend: StartRawBackend, answer):
    seen = Connections()
    url = await start_raw_backend(answering(answer, seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(3):
            response = await post(client, url)
            assert (response.status_code, response.content) == (200, b"hello world")
    assert seen.accepted == 1 and len(seen.requests) == 3
    assert client.statistics().idle_connections == 1


async def test_a_body_in_bytes_goes_with_its_length_and_a_streamed_one_as_one_chunk(
    start_raw_backend: StartRawBackend,
):
    wire: list[bytes] = []

    async def handler(stream: trio.abc.Stream) -> None:
        received = b""
        while not received.endswith((b'"c-1"}', b"0\r\n\r\n")):  # the end of either body
            if not (chunk := await stream.receive_some(4096)):
                return
            received += chunk
        wire.append(received)
        await stream.send_all(OK)

    url = await start_raw_backend(handler)
    client = transport()

    async def streamed_body():
        yield b'{"call_id": '
        yield b'"c-1"}'

    with trio.fail_after(TEST_TIMEOUT):
        for content in (b'{"call_id": "c-1"}', streamed_body()):
            response = await client.handle_async_request(httpx.Request("POST", url, content=content))
            assert response.status_code == 200
    assert wire[0].endswith(b'Content-Length: 18\r\n\r\n{"call_id": "c-1"}')
    assert b"Transfer-Encoding: chunked\r\n" in wire[1]
    assert wire[1].endswith(b'\r\n\r\n12\r\n{"call_id": "c-1"}\r\n0\r\n\r\n')


async def test_answers_leave_nothing_for_the_garbage_collector(start_raw_backend: StartRawBackend):
    # The service raises the collector's thresholds (cli.GC_THRESHOLDS): cycles left
    # by every request would pile up between its collections, each then a long pause.
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        await post(client, url)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await post(client, url)
            gc.collect()
            ours = ("pipeline", "httptools")
            left = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(ours)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert len(seen.requests) == 4
    assert left == []


async def test_a_close_delimited_body_is_read_to_the_end_and_its_connection_not_reused(
    start_raw_backend: StartRawBackend,
):
    seen = Connections()
    url = await start_raw_backend(answering(b"HTTP/1.1 200 OK\r\n\r\nhello world", seen, then_close=True))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(2):
            response = await post(client, url)
            assert (response.status_code, response.content) == (200, b"hello world")
    assert seen.accepted == 2
    assert client.statistics().open_connections == 0


async def test_connection_close_is_honoured(start_raw_backend: StartRawBackend):
    seen = Connections()
    url = await start_raw_backend(answering(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(2):
            assert (await post(client, url)).status_code == 204
        # Closed by the client as soon as each answer ended: the backend saw both ends.
        await seen.closed_by_client.wait_value(2)
    assert seen.accepted == 2


async def test_a_request_saying_connection_close_is_not_kept(start_raw_backend: StartRawBackend):
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(2):
            assert (await post(client, url, Connection="close")).status_code == 200
        await seen.closed_by_client.wait_value(2)
    assert seen.accepted == 2 and client.statistics().open_connections == 0


async def test_idle_connections_expire(start_raw_backend: StartRawBackend, mock_clock: trio.testing.MockClock):
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        await post(client, url)
        await post(client, url)
        assert seen.accepted == 1
        mock_clock.jump(KEEPALIVE_EXPIRY_SECONDS + 0.1)
        await post(client, url)
        await seen.closed_by_client.wait_value(1)  # the expired one was closed
    assert seen.accepted == 2


async def test_close_expired_closes_only_the_expired_idle_connections_of_every_origin(
    start_raw_backend: StartRawBackend, mock_clock: trio.testing.MockClock
):
    old_seen, fresh_seen = Connections(), Connections()
    old_url = await start_raw_backend(answering(OK, old_seen))
    fresh_url = await start_raw_backend(answering(OK, fresh_seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        await post(client, old_url)
        mock_clock.jump(KEEPALIVE_EXPIRY_SECONDS / 2)
        await post(client, fresh_url)
        mock_clock.jump(KEEPALIVE_EXPIRY_SECONDS / 2 + 0.1)
        client.close_expired()  # nothing posted to either origin since
        mock_clock.autojump_threshold = 1.0  # a connection left open fails the test, not hangs it
        await old_seen.closed_by_client.wait_value(1)
    assert fresh_seen.closed_by_client.value == 0
    assert client.statistics().open_connections == client.statistics().idle_connections == 1


async def test_a_connection_the_backend_closed_while_idle_costs_no_failure(start_raw_backend: StartRawBackend):
    # Keep-alive answers, but the backend closes each connection right after answering.
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen, then_close=True))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(5):
            assert (await post(client, url)).status_code == 200
    assert len(seen.requests) == 5


async def test_a_request_lost_on_a_reused_connection_before_any_answer_is_sent_once_more(
    start_raw_backend: StartRawBackend,
):
    # The first connection answers once, then takes the second request and
    # closes without a byte (as a server closing an idle connection at that
    # moment does); the request is sent again on a new connection.
    seen = Connections()

    async def handler(stream: trio.abc.Stream) -> None:
        seen.accepted += 1
        requests = WireRequests(stream)
        while (request := await requests.next()) is not None:
            seen.requests.append(request)
            if seen.accepted == 1 and len(seen.requests) == 2:
                return
            await stream.send_all(OK)

    url = await start_raw_backend(handler)
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        assert (await post(client, url)).status_code == 200
        assert (await post(client, url)).status_code == 200
    assert seen.accepted == 2 and len(seen.requests) == 3


async def test_a_new_connection_closed_without_an_answer_is_a_failure_not_retried(start_raw_backend: StartRawBackend):
    seen = Connections()

    async def handler(stream: trio.abc.Stream) -> None:
        seen.accepted += 1
        seen.requests.append(await WireRequests(stream).next())

    url = await start_raw_backend(handler)
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(httpx.RemoteProtocolError, match="without answering"):
        await post(transport(), url)
    assert seen.accepted == 1


async def test_https_with_a_trusted_certificate_sends_sni_and_verifies(
    start_raw_backend: StartRawBackend, test_ca: trustme.CA
):
    server_names: list[str | None] = []
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost").configure_cert(server)
    server.sni_callback = lambda sock, name, context: server_names.append(name)
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen), tls=server, host="localhost")
    trusting = ssl.create_default_context()
    test_ca.configure_trust(trusting)
    client = transport(trusting)
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(2):
            response = await post(client, url)
            assert (response.status_code, response.content) == (200, b"ok")
    assert server_names == ["localhost"] and seen.accepted == 1


async def test_https_with_an_untrusted_certificate_fails_naming_the_reason(
    start_raw_backend: StartRawBackend, server_tls: ssl.SSLContext
):
    seen = Connections()
    url = await start_raw_backend(answering(OK, seen), tls=server_tls)
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(httpx.ConnectError, match="certificate verify failed"):
        await post(transport(), url)
    assert seen.requests == []


async def test_a_body_over_the_cap_is_cut_and_its_connection_dropped(start_raw_backend: StartRawBackend):
    size = 50 * 1024 * 1024
    sent_whole = []
    url = await start_raw_backend(answering_huge(size, sent_whole))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        response = await post(client, url)
    assert response.status_code == 200 and response.extensions["body_truncated"]
    assert len(response.content) <= BODY_CAP
    statistics = client.statistics()
    # Read no further than the cap and one more receive: memory stays flat, whatever the size.
    assert statistics.bytes_received <= BODY_CAP + RECEIVE_SIZE + 1024
    assert statistics.open_connections == 0 and not sent_whole


async def test_a_redirect_is_an_answer_not_followed(start_raw_backend: StartRawBackend):
    seen = Connections()
    url = await start_raw_backend(
        answering(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n", seen)
    )
    with trio.fail_after(TEST_TIMEOUT):
        response = await post(transport(), url)
    assert response.status_code == 302 and response.headers["location"] == "/elsewhere"
    assert len(seen.requests) == 1


async def test_an_interim_answer_is_skipped(start_raw_backend: StartRawBackend):
    seen = Connections()
    url = await start_raw_backend(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK, seen))
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        for _ in range(2):
            response = await post(client, url)
            assert (response.status_code, response.content) == (200, b"ok")
    assert seen.accepted == 1


async def test_a_trickling_answer_is_cut_by_the_callers_deadline_and_its_connection_closed(
    start_raw_backend: StartRawBackend,
):
    closed = trio.Event()

    async def trickle(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        await requests.next()
        async with trio.open_nursery() as nursery:

            async def send_slowly() -> None:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)  # the backend's behaviour: one byte every half second

            nursery.start_soon(send_slowly)
            await requests.wait_closed()
            closed.set()
            nursery.cancel_scope.cancel()

    url = await start_raw_backend(trickle)
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        with trio.move_on_after(1.0) as deadline:
            await post(client, url)
        await closed.wait()
    statistics = client.statistics()
    assert deadline.cancelled_caught
    assert (statistics.open_connections, statistics.active_requests, statistics.connections_opened) == (0, 0, 1)


@pytest.mark.parametrize("header", [{"X-Injected": "a\r\nX-Evil: 1"}, {"X-Nul": "a\x00b"}, {"X Bad": "name"}])
async def test_cr_lf_and_nul_never_reach_the_wire(header: dict[str, str]):
    client = transport()
    with pytest.raises(httpx.LocalProtocolError, match="refused"):
        await post(client, "http://127.0.0.1:9/webhook", **header)
    assert client.statistics().connections_opened == 0


async def test_requests_cut_by_the_deadline_leave_the_pool_serving(start_raw_backend: StartRawBackend):
    # 500 requests cut at every stage (no answer, half a head, half a body),
    # many on reused connections; each cut connection is closed, none goes
    # back to the pool, and the same pool then serves normal requests.
    stalls = [b"", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]
    # Connections the backend holds open. A request cut before it reached the
    # backend (a loaded machine may take the whole deadline to connect) is not
    # stalled there; its connection, if any, is closed all the same.
    open_connections = AsyncValue(0)
    stalled = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal stalled
        open_connections.value += 1
        try:
            requests = WireRequests(stream)
            while (request := await requests.next()) is not None:
                if b"X-Stall: " not in request:
                    await stream.send_all(OK)
                    continue
                stall = int(request.split(b"X-Stall: ")[1].split(b"\r\n")[0])
                await stream.send_all(stalls[stall])
                stalled += 1
                await requests.wait_closed()
                return
        finally:
            open_connections.value -= 1

    url = await start_raw_backend(handler)
    client = transport()
    cut = 0
    with trio.fail_after(60):
        for _ in range(5):
            # Some idle connections first, so cut requests run on reused ones too.
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(post, client, url)
            async with trio.open_nursery() as nursery:
                for n in range(100):

                    async def cut_request(n: int = n) -> None:
                        nonlocal cut
                        with trio.move_on_after(0.2) as deadline:
                            await post(client, url, **{"X-Stall": str(n % len(stalls))})
                        cut += deadline.cancelled_caught

                    nursery.start_soon(cut_request)
        statistics = client.statistics()
        assert (cut, statistics.active_requests) == (500, 0)
        # Every cut connection was closed by the transport, none is left in the pool:
        # the backend ends up holding just the pool's idle ones.
        assert statistics.open_connections == statistics.idle_connections
        await open_connections.wait_value(statistics.idle_connections)
        assert stalled > 0
        for _ in range(20):
            assert (await post(client, url)).status_code == 200
    statistics = client.statistics()
    assert statistics.open_connections == statistics.idle_connections >= 1


async def test_after_aclose_a_request_in_flight_ends_and_closes_its_connection(start_raw_backend: StartRawBackend):
    release = trio.Event()
    arrived = trio.Event()
    seen = Connections()

    async def handler(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while await requests.next() is not None:
            arrived.set()
            await release.wait()
            await stream.send_all(OK)
        seen.closed_by_client.value += 1

    url = await start_raw_backend(handler)
    client = transport()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            answers: list[int] = []

            async def request() -> None:
                answers.append((await post(client, url)).status_code)

            nursery.start_soon(request)
            await arrived.wait()
            await client.aclose()
            release.set()
        await seen.closed_by_client.wait_value(1)
    assert answers == [200] and client.statistics().open_connections == 0
    with pytest.raises(RuntimeError, match="closed"):
        await post(client, url)
