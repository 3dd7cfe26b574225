"""The service's host name lookups (pipeline/name_lookups.py), with a system resolver that does not answer.

The system resolver is the one thing replaced here: a name whose nameservers
never answer cannot be made on loopback. trio asks it for names only (numbers
are read without it), on threads.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from pipeline.name_lookups import LOOKUP_THREADS, SharedLookups


class SystemResolver:
    """``dead.test`` never answers until ``answer_dead`` is set (then: no such name); any other name is 127.0.0.1."""

    def __init__(self) -> None:
        self.asked: Counter[bytes] = Counter()
        self.answer_dead = threading.Event()

    def getaddrinfo(self, host: bytes, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0):
        self.asked[host] += 1
        if host == b"dead.test":
            self.answer_dead.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return socket.getaddrinfo("127.0.0.1", port, family, type, proto, flags)


async def test_a_name_that_never_answers_holds_one_thread_and_other_names_are_answered():
    # trio's default: a thread of its 40 shared ones per lookup, kept until the system resolver
    # gives up, also after its caller did; 64 attempts in flight to such a name held them all.
    resolver = SystemResolver()
    trio.socket.set_custom_hostname_resolver(SharedLookups(resolver.getaddrinfo))
    failures: list[BaseException] = []

    async def look_up_dead(cancel_at_once: bool) -> None:
        with trio.CancelScope() as scope:
            if cancel_at_once:
                scope.cancel()  # a caller that gives up (a forward's deadline) ends no lookup
            try:
                await trio.socket.getaddrinfo("dead.test", 80, type=socket.SOCK_STREAM)
            except socket.gaierror as error:
                failures.append(error)

    async with trio.open_nursery() as lookups:
        try:
            for n in range(3 * LOOKUP_THREADS):
                lookups.start_soon(look_up_dead, n % 2 == 0)
            await trio.testing.wait_all_tasks_blocked()
            answered = await trio.socket.getaddrinfo("good.test", 80, type=socket.SOCK_STREAM)
            asked_while_dead = dict(resolver.asked)
            # Every thread of trio's own limiter is still free for the log writer and reloads.
            free_threads = trio.to_thread.current_default_thread_limiter().available_tokens
        finally:
            resolver.answer_dead.set()
    assert answered[0][4] == ("127.0.0.1", 80)
    assert asked_while_dead == {b"dead.test": 1, b"good.test": 1}
    assert free_threads == trio.to_thread.current_default_thread_limiter().total_tokens
    # The callers still waiting got the resolver's answer; those that gave up, nothing.
    assert len(failures) == 3 * LOOKUP_THREADS // 2
    assert all(error.errno == socket.EAI_AGAIN for error in failures)
    with pytest.raises(socket.gaierror):  # asked again once the first lookup ended: a new lookup
        await trio.socket.getaddrinfo("dead.test", 80, type=socket.SOCK_STREAM)
    assert resolver.asked[b"dead.test"] == 2
