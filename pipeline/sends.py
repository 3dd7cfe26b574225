"""Socket and channel I/O for the hot path, without trio's extra turns at the scheduler.

trio ends every socket send and every memory-channel send with a checkpoint,
also when the kernel's buffer or the channel's takes it whole: the task is
rescheduled and takes one more step of the run loop before it goes on. On the
hot path of an event that was a step per send, six of them an event
(bench/RESULTS.md, issue 16). These helpers try the send first; only when it
would block do they wait as trio does. The caller's next wait is its
checkpoint.

A trio socket receive is the other way round: it tries the read first, and
only when that finds nothing (one system call for nothing) waits for the
socket. Where the answer cannot be there yet (a reply to what was just sent,
a client's next request), ``receive_when_readable`` waits first.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar

import trio

T = TypeVar("T")


def write_now(stream: trio.abc.Stream, data: bytes) -> int:
    """How much of ``data`` the socket under ``stream`` took at once (0 for a TLS stream, a full
    buffer or a broken connection: ``send_all`` of the rest then waits, or says what is wrong)."""
    if type(stream) is not trio.SocketStream:  # not isinstance: an ABC's check costs more than the write
        return 0
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:
        return 0


async def send_all_now(stream: trio.abc.Stream, data: bytes, taken_within: float = math.inf) -> bool:
    """``stream.send_all(data)``, written at once when the socket takes it all.

    False when the rest was not taken within ``taken_within`` seconds (a timer only
    then, not per send): the stream is left with part of ``data`` sent, to be closed.
    """
    sent = write_now(stream, data)
    if sent < len(data):
        with trio.move_on_after(taken_within):
            await stream.send_all(memoryview(data)[sent:])
            return True
        return False
    return True


async def send_now(channel: trio.MemorySendChannel[T], item: T) -> None:
    """``channel.send(item)``, without yielding when the channel has room."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await channel.send(item)


async def receive_when_readable(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """``stream.receive_some(max_bytes)``, waiting for the socket under ``stream`` to be readable first
    (a TLS stream is read as it is); b"" at the end of the stream, as there."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    sock = stream.socket
    while True:
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("the connection was closed")
        await trio.lowlevel.wait_readable(sock)  # raises ClosedResourceError if closed meanwhile
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:  # woken, yet nothing to read: wait again
            continue
        except OSError as error:
            raise trio.BrokenResourceError(f"socket connection broken: {error}") from error
