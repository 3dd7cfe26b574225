from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from tests.harness import Backend, NatsServer, serve_backend


@pytest.fixture
async def nats_server(nursery: trio.Nursery, tmp_path) -> NatsServer:
    server = NatsServer(tmp_path / "nats")
    await nursery.start(server.run)
    return server


StartBackend = Callable[..., Awaitable[Backend]]


@pytest.fixture
def start_backend(nursery: trio.Nursery) -> StartBackend:
    """Start a webhook backend on loopback; ``answer(n, body)`` picks each reply."""

    async def start(answer: Callable[[int, dict[str, Any]], int] | None = None) -> Backend:
        backend = Backend(answer) if answer is not None else Backend()
        await nursery.start(serve_backend, backend)
        return backend

    return start
