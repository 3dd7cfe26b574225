"""A paced load generator: POSTs events at a fixed rate, each stamped with ``sent_at``.

Run: python bench/paced.py URL RATE SECONDS DOMAIN[,DOMAIN…]
     python bench/paced.py URL RATE SECONDS @FILE   (one domain a line: thousands do not fit in argv)
Sends RATE × SECONDS events on a fixed schedule (not closed-loop: a slow answer
does not slow the schedule) over a pool of keep-alive connections, event n to
the n-th domain of the list (round and round); prints one JSON line with what
was sent, accepted and the POST latencies.

One thread, asyncio protocols, the request bytes written directly and the answers
parsed by httptools: the client shares the 2 cores with what it measures, so it
must cost little (~0.13 of a core at 300/s; the thread pool and ``http.client`` it
replaced cost ~0.25, bench/RESULTS.md), and ``sent_at`` is stamped just before the
request is written, not before a thread took it up.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import httptools

RESPONSE_TIMEOUT_SECONDS = 10.0


class _Connection(asyncio.Protocol):
    """One keep-alive connection, its answers parsed by httptools (the service's own HTTP parser)."""

    def __init__(self, pool: list[_Connection]) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[int] | None = None
        self.used = False  # has answered a request: a close before the next answer means it went stale
        self._parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            if self.answer is not None and not self.answer.done():
                self.answer.set_exception(error)
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        self.used = True
        answer, self.answer = self.answer, None
        if self._parser.should_keep_alive():
            self._pool.append(self)
        else:
            assert self.transport is not None
            self.transport.close()
        if answer is not None and not answer.done():
            answer.set_result(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._pool:
            self._pool.remove(self)
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionResetError(f"connection closed before the answer: {exc}"))


class PacedClient:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._idle: list[_Connection] = []

    async def _connection(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: _Connection(self._idle), self._host, self._port)
        return connection

    async def post(self, event: dict) -> tuple[int, float]:
        """POST ``event`` (``sent_at`` stamped now); its status (0: failed) and latency in ms."""
        started = time.perf_counter()
        for _ in range(2):
            connection = await self._connection()
            event.setdefault("sent_at", time.time())  # a retry keeps the first send's stamp
            body = json.dumps(event).encode()
            head = (
                b"POST /events HTTP/1.1\r\nHost: %b:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (self._host.encode(), self._port, len(body))
            )
            connection.answer = asyncio.get_running_loop().create_future()
            assert connection.transport is not None
            connection.transport.write(head + body)
            try:
                status = await asyncio.wait_for(connection.answer, RESPONSE_TIMEOUT_SECONDS)
            except ConnectionResetError as error:
                # A kept-alive connection the server closed meanwhile (idle too long) fails
                # before the request reaches it: retry once on a new one, as HTTP clients do.
                if connection.used:
                    continue
                print(f"POST failed: {error!r}", file=sys.stderr)
                return 0, (time.perf_counter() - started) * 1000
            except (TimeoutError, httptools.HttpParserError) as error:
                connection.transport.close()
                print(f"POST failed: {error!r}", file=sys.stderr)
                return 0, (time.perf_counter() - started) * 1000
            return status, (time.perf_counter() - started) * 1000
        return 0, (time.perf_counter() - started) * 1000


async def main(url: str, rate: float, seconds: float, domains: list[str]) -> None:
    # A connection for every request in flight: a service that stalls for a second
    # at 300/s has 300 open, and a soft limit of 1,024 files is not far.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    host, port = url.removeprefix("http://").split(":")
    client = PacedClient(host, int(port))
    pending = []
    start = time.monotonic()
    total = round(rate * seconds)
    for n in range(total):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        event = {
            "call_id": f"bench-{n}",
            "domain": domains[n % len(domains)],
            "direction": "inbound",
            "state": "missed",
            "status": "busy-line",
            "from_number": "0914315989",
        }
        pending.append(asyncio.ensure_future(client.post(event)))
    results = await asyncio.gather(*pending)
    latencies = sorted(latency for _, latency in results)
    print(
        json.dumps(
            {
                "sent": total,
                "accepted": sum(1 for status, _ in results if status == 202),
                "statuses": {
                    str(code): sum(1 for status, _ in results if status == code) for code in {s for s, _ in results}
                },
                "elapsed_s": time.monotonic() - start,
                "post_p50_ms": latencies[len(latencies) // 2],
                "post_p99_ms": latencies[int(len(latencies) * 0.99)],
            }
        )
    )


def domain_list(argument: str) -> list[str]:
    if argument.startswith("@"):
        return Path(argument[1:]).read_text().split()
    return argument.split(",")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), domain_list(sys.argv[4])))
