"""A paced load generator: POSTs events at a fixed rate, each stamped with ``sent_at``.

Run: python bench/paced.py URL RATE SECONDS DOMAIN[,DOMAIN…]
     python bench/paced.py URL RATE SECONDS @FILE   (one domain a line: thousands do not fit in argv)
Sends RATE × SECONDS events on a fixed schedule (not closed-loop: a slow answer
does not slow the schedule) over a pool of keep-alive connections, event n to
the n-th domain of the list (round and round); prints one JSON line with what
was sent, accepted and the POST latencies.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import local

_connections = local()


def post(host: str, port: int, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    status = 0
    for _ in range(2):
        # A kept-alive connection the server has closed meanwhile (idle too
        # long) fails before the request reaches it: retry once on a new one,
        # as HTTP clients do.
        reused = getattr(_connections, "connection", None)
        connection = reused or http.client.HTTPConnection(host, port, timeout=10)
        _connections.connection = connection
        try:
            connection.request("POST", "/events", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            status = response.status
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
            connection.close()
            _connections.connection = None
            if reused is None:
                print(f"POST failed: {error!r}", file=sys.stderr)
                break
        except OSError as error:
            connection.close()
            _connections.connection = None
            print(f"POST failed: {error!r}", file=sys.stderr)
            break
    return status, (time.perf_counter() - started) * 1000


async def main(url: str, rate: float, seconds: float, domains: list[str]) -> None:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=64)
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
            "sent_at": time.time(),
        }
        pending.append(loop.run_in_executor(pool, post, host, int(port), json.dumps(event).encode()))
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
