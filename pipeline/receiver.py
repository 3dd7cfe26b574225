"""``telephony-forwarder receive``: a webhook receiver to try the service with, and for backends to copy.

It prints every webhook it gets (the event as JSON) and, with ``--secret``,
whether its Standard Webhooks signature verifies; a request whose signature
does not verify gets 401, as a real backend should answer it.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from pipeline.signing import verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telephony-forwarder receive",
        description="Print the webhooks telephony-forwarder sends, and check their signatures.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="listen port (default: 9000)")
    parser.add_argument("--secret", help="the endpoint's secret from the config: verify signatures with it")
    return parser


def make_app(secret: str | None):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        if secret is None:
            verdict, status = "not checked (no --secret)", 200
        else:
            problem = verify(secret, headers, body)
            verdict, status = ("valid", 200) if problem is None else (f"INVALID: {problem}", 401)
        try:
            shown = json.dumps(json.loads(body), ensure_ascii=False)
        except ValueError:
            shown = body.decode(errors="replace")
        print(f"{scope['method']} {scope['path']} signature {verdict}\n{shown}", flush=True)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = HypercornConfig()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    print(f"Receiving webhooks on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        trio.run(serve, make_app(args.secret), config)
    except KeyboardInterrupt:
        pass
    return 0
