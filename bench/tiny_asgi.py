"""The smallest ASGI pieces the bench servers share: lifespan handling and body reading."""

from __future__ import annotations


async def answer_lifespan(receive, send) -> None:
    """Acknowledge hypercorn's lifespan startup and shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
