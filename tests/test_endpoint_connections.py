"""The connections all forwarders share: idle ones close once expired, whichever endpoint they reach."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from actors.forwarder import EndpointConnections
from pipeline.config import ForwardingConfig
from pipeline.webhook_transport import KEEPALIVE_EXPIRY_SECONDS
from tests.conftest import StartRawBackend
from tests.harness import WireRequests

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_an_idle_connection_closes_once_expired_without_another_request(
    start_raw_backend: StartRawBackend, mock_clock: trio.testing.MockClock
):
    # As when the route no longer has the endpoint: nothing is sent to it again.
    closed = trio.Event()

    async def answering(stream: trio.abc.Stream) -> None:
        requests = WireRequests(stream)
        while await requests.next() is not None:
            await stream.send_all(OK)
        closed.set()

    url = await start_raw_backend(answering)
    connections = EndpointConnections(ForwardingConfig(), httpx.create_ssl_context())
    with trio.fail_after(4 * KEEPALIVE_EXPIRY_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connections.keep_fresh)
            response = await connections.transport.handle_async_request(httpx.Request("POST", url, content=b"{}"))
            assert response.status_code == 200
            opened_at = trio.current_time()
            mock_clock.autojump_threshold = 0.5  # the clock moves on whenever everything waits
            await closed.wait()
            assert trio.current_time() - opened_at > KEEPALIVE_EXPIRY_SECONDS
            nursery.cancel_scope.cancel()
    await connections.aclose()
