"""Reading a channel in batches: one item waited for, then whatever else is already there."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import trio

T = TypeVar("T")


async def batches(
    channel: trio.MemoryReceiveChannel[T], max_size: int, *, linger_seconds: float = 0.0
) -> AsyncIterator[list[T]]:
    """Yield lists of at most ``max_size`` items until ``channel`` is closed and drained.

    Under load a batch grows with what queued while the last one was handled,
    so one bridge crossing or one disk write serves many items. When idle each
    item goes alone, unless ``linger_seconds`` asks to wait that long after the
    first item for company: for work nobody waits on (acks, log lines), a few
    milliseconds turn one crossing per item into one per batch.
    """
    async for first in channel:
        if linger_seconds:
            await trio.sleep(linger_seconds)
        batch = [first]
        while len(batch) < max_size:
            try:
                batch.append(channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        yield batch
