"""The bare-stack baseline: hypercorn's trio worker, parse the JSON, answer 202. Nothing else.

Run: python bench/baseline_app.py PORT
"""

from __future__ import annotations

import json
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from tiny_asgi import answer_lifespan, read_body


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await answer_lifespan(receive, send)
    body = await read_body(receive)
    if body:  # the harness's readiness probe is a bodiless GET
        json.loads(body)
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"accepted"}'})


if __name__ == "__main__":
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    trio.run(serve, app, config)
