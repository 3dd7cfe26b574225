"""pipeline.sends.receive_when_readable on real loopback sockets: what trio's receive_some would give."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from pipeline.sends import receive_when_readable


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """Two ends of a TCP connection on 127.0.0.1."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    async with client, server:
        yield client, server


async def test_it_waits_for_the_data_and_then_returns_it():
    async with connected() as (client, server), trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await receive_when_readable(server, 1024))

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []  # nothing sent yet: it waits
        await client.send_all(b"ringing")
    assert received == [b"ringing"]


async def test_the_end_of_the_stream_is_empty_bytes():
    async with connected() as (client, server):
        await client.send_eof()
        assert await receive_when_readable(server, 1024) == b""


async def test_a_connection_reset_by_the_peer_is_a_broken_resource():
    async with connected() as (client, server):
        # SO_LINGER 0: close sends a reset, not an end of stream.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.socket.close()
        with pytest.raises(trio.BrokenResourceError):
            await receive_when_readable(server, 1024)


async def test_a_stream_closed_here_is_a_closed_resource_also_while_waiting():
    async with connected() as (_client, server):
        raised: list[BaseException] = []

        async def receive() -> None:
            try:
                await receive_when_readable(server, 1024)
            except trio.ClosedResourceError as error:
                raised.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()
        assert len(raised) == 1
        with pytest.raises(trio.ClosedResourceError):
            await receive_when_readable(server, 1024)
