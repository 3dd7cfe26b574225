"""Host name lookups that one unanswering name cannot let starve the others.

trio looks a name up with the system's ``getaddrinfo`` in a worker thread of
its default limiter (40 threads, shared with every ``trio.to_thread`` call: the
log writer's disk writes, config reloads). A lookup its caller gave up on (a
forward's deadline) keeps its thread until the system resolver itself gives up,
~10 s or more when a name's nameservers do not answer: one tenant's endpoint
with such a name, at 64 attempts in flight, held every thread, and the other
tenants' new connections, the log writer and reloads waited behind it.

``SharedLookups`` runs lookups on threads of their own, and one at a time per
name: callers asking while a lookup of the same name runs wait for its answer.
A name that does not answer holds one thread, not one per attempt.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

# Lookups of different names running at once.
LOOKUP_THREADS = 16

_Key = tuple[bytes | None, Any, int, int, int, int]


@dataclass
class _Lookup:
    done: trio.Event = field(default_factory=trio.Event)
    addresses: list[Any] | None = None
    error: Exception | None = None


class SharedLookups(trio.abc.HostnameResolver):
    """``getaddrinfo`` on ``LOOKUP_THREADS`` threads of its own, one lookup at a time per name and query.

    Install with ``trio.socket.set_custom_hostname_resolver`` (trio then
    calls it for names only; numeric addresses never need a thread).
    """

    def __init__(self, lookup: Callable[..., list[Any]] = socket.getaddrinfo) -> None:
        self._lookup = lookup  # the system resolver's getaddrinfo, blocking
        self._threads = trio.CapacityLimiter(LOOKUP_THREADS)
        self._running: dict[_Key, _Lookup] = {}

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        key = (host, port, family, type, proto, flags)
        lookup = self._running.get(key)
        if lookup is None:
            lookup = self._running[key] = _Lookup()
            # Not the caller's task: a caller that gives up must not end the lookup the others wait for.
            trio.lowlevel.spawn_system_task(self._look_up, key, lookup)
        await lookup.done.wait()
        if lookup.error is not None:
            raise lookup.error
        if lookup.addresses is None:
            raise socket.gaierror("the lookup was cancelled (the service is stopping)")
        return lookup.addresses

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return await trio.to_thread.run_sync(
            socket.getnameinfo, sockaddr, flags, abandon_on_cancel=True, limiter=self._threads
        )

    async def _look_up(self, key: _Key, lookup: _Lookup) -> None:
        try:
            lookup.addresses = await trio.to_thread.run_sync(
                partial(self._lookup, *key), abandon_on_cancel=True, limiter=self._threads
            )
        except Exception as error:  # socket.gaierror (no such name, no answer), a bad port, ...: the callers'
            lookup.error = error
        finally:
            del self._running[key]
            lookup.done.set()
