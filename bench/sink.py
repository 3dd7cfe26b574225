"""A fast webhook sink for benchmarks: raw asyncio HTTP/1.1, so it is never the bottleneck.

Run: python bench/sink.py PORT [hang]
Answers every POST with 200 (or, with ``hang``, never answers). Once a second it
prints a JSON line: requests received, and, for the requests received since the
last line, the end-to-end latencies (ms) of the events that carried ``sent_at``
(epoch seconds) and how many came for each ``domain`` (only the domains that
had some, so a line stays small whatever the number of domains routed here).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

received = 0
latencies: list[float] = []
domains: Counter[str] = Counter()
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hang: bool) -> None:
    global received
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            arrived = time.time()
            received += 1
            marker = body.find(b'"sent_at":')
            if marker >= 0:
                end = body.find(b",", marker)
                end = body.find(b"}", marker) if end < 0 else end
                latencies.append((arrived - float(body[marker + 10 : end])) * 1000)
            marker = body.find(b'"domain":"')
            if marker >= 0:
                domains[body[marker + 10 : body.find(b'"', marker + 10)].decode()] += 1
            if hang:
                await asyncio.sleep(3600)
            writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, hang: bool) -> None:
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, hang), "127.0.0.1", port, backlog=1024)
    async with server:
        while True:
            await asyncio.sleep(1)
            batch, by_domain = latencies[:], dict(domains)
            latencies.clear()
            domains.clear()
            line = {"at": time.time(), "received": received, "latencies_ms": batch, "domains": by_domain}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), len(sys.argv) > 2 and sys.argv[2] == "hang"))
