"""A fast webhook sink for benchmarks: answers 200 to every POST and counts them.

Run: python bench/sink.py PORT — prints the running count to stdout once a second.
"""

from __future__ import annotations

import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from tiny_asgi import answer_lifespan, read_body

received = 0


async def app(scope, receive, send) -> None:
    global received
    if scope["type"] == "lifespan":
        return await answer_lifespan(receive, send)
    await read_body(receive)
    received += 1
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, app, config)
        while True:
            await trio.sleep(1)
            print(received, flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
