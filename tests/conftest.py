from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
import trio_asyncio
import trustme

from pipeline import supervisor
from pipeline.config import NatsConfig
from pipeline.events import domain_subject
from pipeline.nats_bridge import JetStream
from tests.harness import Backend, NatsCluster, NatsServer, serve_backend


@pytest.fixture
async def nats_server(nursery: trio.Nursery, tmp_path) -> NatsServer:
    server = NatsServer(tmp_path / "nats")
    await nursery.start(server.run)
    return server


@pytest.fixture
async def nats_cluster(nursery: trio.Nursery, tmp_path) -> NatsCluster:
    """Three nats-server nodes in one JetStream cluster, every node ready (the meta leader may still be coming)."""
    cluster = NatsCluster(tmp_path / "nats-cluster")
    await nursery.start(cluster.run)
    return cluster


@pytest.fixture(params=["lean", "httpx"])
def http_transport(request: pytest.FixtureRequest) -> str:
    """Each webhook transport in turn (``forwarding.http_transport``), for scenarios that must hold with both."""
    return request.param


StartBackend = Callable[..., Awaitable[Backend]]


@pytest.fixture
def start_backend(nursery: trio.Nursery) -> StartBackend:
    """Start a webhook backend on loopback; ``answer(n, body)`` picks each reply."""

    async def start(answer: Callable[[int, dict[str, Any]], int] | None = None) -> Backend:
        backend = Backend(answer) if answer is not None else Backend()
        await nursery.start(serve_backend, backend)
        return backend

    return start


RawHandler = Callable[[trio.abc.Stream], Awaitable[None]]
StartRawBackend = Callable[..., Awaitable[str]]


@pytest.fixture
def start_raw_backend(nursery: trio.Nursery) -> StartRawBackend:
    """Serve ``handler(stream)`` for each connection on a loopback port; returns the webhook URL.

    For exact wire behaviour (trickling, closing, malformed answers). With
    ``tls`` (a server context) it is an https URL. A client that drops the
    connection ends that connection's handler quietly.
    """

    async def start(handler: RawHandler, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> str:
        async def serve_connection(stream: trio.abc.Stream) -> None:
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await handler(stream)

        if tls is None:
            [listener] = await nursery.start(partial(trio.serve_tcp, serve_connection, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
        else:
            [listener] = await nursery.start(
                partial(trio.serve_ssl_over_tcp, serve_connection, 0, tls, host="127.0.0.1")
            )
            port = listener.transport_listener.socket.getsockname()[1]
        return f"{'https' if tls else 'http'}://{host}:{port}/webhook"

    return start


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    """A certificate authority of the tests' own: trusted only by contexts that are told so."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(test_ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate from ``test_ca`` for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@dataclass(frozen=True)
class OpenedJetStream:
    """A ``JetStream`` of the service under test and the trio-asyncio loop its client runs on."""

    jetstream: JetStream
    loop: asyncio.AbstractEventLoop

    async def run_asyncio(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Await the asyncio ``function(*args)`` on the service's loop (a test task is not inside it)."""
        return await trio_asyncio.aio_as_trio(function, loop=self.loop)(*args)

    async def publish_elsewhere(self, domain: str, data: bytes) -> None:
        """Publish ``data`` to ``domain``'s subject as something other than the ingress would (the service's client)."""
        subject = domain_subject(self.jetstream.config.subject_pattern, domain)
        await self.run_asyncio(self.jetstream._context.publish, subject, data)


@pytest.fixture
def jetstreams(monkeypatch: pytest.MonkeyPatch) -> list[OpenedJetStream]:
    """Every ``JetStream`` the service under test opens, for scenarios that act on its NATS client."""
    opened: list[OpenedJetStream] = []
    open_jetstream = supervisor.open_jetstream

    @asynccontextmanager
    async def recording(config: NatsConfig, url: str, routed_domains: int) -> AsyncIterator[JetStream]:
        async with open_jetstream(config, url, routed_domains) as jetstream:
            opened.append(OpenedJetStream(jetstream, trio_asyncio.current_loop.get()))
            yield jetstream

    monkeypatch.setattr(supervisor, "open_jetstream", recording)
    return opened


@pytest.fixture
def served_apps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ASGI app the service under test serves, in the order built, for requests made in-process.

    A request sent to one through ``httpx.ASGITransport(app, client=...)`` can
    carry any client address, so scenarios can play a remote client without
    traffic leaving 127.0.0.1.
    """
    built: list[Any] = []
    create_app = supervisor.create_app

    def recording(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        built.append(app)
        return app

    monkeypatch.setattr(supervisor, "create_app", recording)
    return built
