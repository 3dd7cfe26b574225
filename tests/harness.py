"""Real pieces for scenario tests: a nats-server, webhook backends, the service itself.

Everything listens on 127.0.0.1 and port 0 (or a free port), so tests run side
by side and leave nothing behind. A nats-server that exits on its own fails the
test with its last log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from trio_util import AsyncValue

from actors.log_writer import DomainLogRouter
from pipeline.config import Config
from pipeline.embedded_nats import _LISTENING, _READY, EmbeddedNats, _read_lines, _ServerProcess, server_binary
from pipeline.supervisor import run_service

# An answer a backend can give: an HTTP status, or HANG (never answer).
HANG = -1


# How much of a nats-server's log its exit reports.
LOG_TAIL_LINES = 20
# A cluster node logs this once it has bound its route port (after "Server is ready").
_ROUTES_LISTENING = b"Listening for route connections on"


def free_port() -> int:
    """A loopback port free right now, for a server started at once.

    The kernel picked it from its ephemeral range and may hand it out again
    (to another ``free_port``, a port-0 listener) before it is bound: for
    several ports that must be known before their servers start, ``fixed_ports``.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixed_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free right now, outside the kernel's ephemeral range.

    The kernel never picks these itself (not for a port-0 bind, not as a
    connection's source port), so each stays free until its server binds it,
    unless another program asks for that very port. nats-server's own cluster
    tests keep their route ports out of that range for the same reason.
    """
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [port for port in range(1024, 65536) if not low <= port <= high]
    ports: list[int] = []
    for port in random.sample(candidates, len(candidates)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports outside the ephemeral range {low}-{high}")


class NatsServerExited(RuntimeError):
    """A test's nats-server exited on its own; the message ends with its last log lines."""


async def run_nats_server(
    name: str,
    conf: Path,
    *,
    ready: Collection[bytes] = (_READY,),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the bundled nats-server on ``conf`` until cancelled; reports its client port once ``ready`` is all logged.

    If it exits on its own, before that or after, raises ``NatsServerExited``
    naming ``name``, its exit code and its last log lines: the test fails there,
    not later on a refused connection.
    """
    process = _ServerProcess([str(server_binary()), "-c", str(conf)])
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    try:
        lines = _read_lines(process.stderr)
        waiting = set(ready)
        port = 0
        async for line in lines:
            tail.append(line.decode(errors="replace"))
            if match := _LISTENING.search(line):
                port = int(match.group(2))
            waiting = {marker for marker in waiting if marker not in line}
            if not waiting:
                break
        else:
            raise NatsServerExited(_exit_report(name, "before it was ready", await process.wait(), tail))
        task_status.started(port)
        async for line in lines:  # keep its log pipe drained, and its last lines
            tail.append(line.decode(errors="replace"))
        raise NatsServerExited(_exit_report(name, "while the test ran", await process.wait(), tail))
    finally:
        with trio.CancelScope(shield=True):
            await process.stop()


def _exit_report(name: str, when: str, code: int, tail: deque[str]) -> str:
    return f"{name} exited {when} (code {code}); its last lines:\n" + "\n".join(tail)


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(eq=False)
class Backend:
    """A webhook receiver: records every request; answers what ``answer`` says.

    ``answer(request_number, body)`` returns a status code or ``HANG``
    (request_number counts from 1 across all requests to this backend).
    """

    answer: Callable[[int, dict[str, Any]], int] = lambda number, body: 200
    # When given, every request waits for it before answering.
    release: trio.Event | None = None
    received: list[ReceivedRequest] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)
    count: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
    completed: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
    most_open: int = 0  # requests open at once, at most
    url: str = ""

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        body = json.loads(raw)
        self.raw_bodies.append(raw)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(ReceivedRequest(scope["path"], headers, body))
        self.count.value += 1
        self.most_open = max(self.most_open, self.count.value - self.completed.value)
        status = self.answer(self.count.value, body)
        if self.release is not None:
            await self.release.wait()
        if status == HANG:
            await trio.sleep_forever()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        self.completed.value += 1

    async def wait_count(self, at_least: int) -> None:
        await self.count.wait_value(lambda count: count >= at_least)

    def bodies(self) -> list[dict[str, Any]]:
        return [request.body for request in self.received]

    def attempts_of(self, call_id: str) -> list[int]:
        return [r.body["delivery_attempt"] for r in self.received if r.body.get("call_id") == call_id]


async def serve_backend(backend: Backend, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``backend`` on a free loopback port; reports its webhook URL."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1

    class _Started:
        def started(self, binds: list[str]) -> None:
            backend.url = f"{binds[0]}/webhook"
            task_status.started(backend.url)

    await serve(backend, config, task_status=_Started(), mode="asgi")


class WireRequests:
    """The HTTP/1.1 requests arriving on one raw connection, one at a time, for backends that write the wire by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next request, head and body (by its Content-Length); None when the client closed first."""
        while b"\r\n\r\n" not in self._buffer:
            if not await self._fill():
                return None
        end = self._buffer.index(b"\r\n\r\n") + 4
        length = 0
        for line in bytes(self._buffer[:end]).split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(self._buffer) < end + length:
            if not await self._fill():
                return None
        request = bytes(self._buffer[: end + length])
        del self._buffer[: end + length]
        return request

    async def wait_closed(self) -> None:
        """Return once the client closed (or reset) the connection; what it sends meanwhile is kept."""
        with contextlib.suppress(trio.BrokenResourceError):
            while await self._fill():
                pass

    async def _fill(self) -> bool:
        data = await self._stream.receive_some()
        self._buffer += data
        return bool(data)


def answering_huge(
    size: int, sent_whole: list[bool], on_request: Callable[[bytes | None], object] = lambda request: None
) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """A raw backend that reads one request (to ``on_request``) and answers 200 with a ``size``-byte body;
    ``sent_whole`` gets ``True`` if the whole body went out (a client that stops reading prevents it)."""

    async def handler(stream: trio.abc.Stream) -> None:
        on_request(await WireRequests(stream).next())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = bytes(1024 * 1024)
        for _ in range(size // len(block)):
            await stream.send_all(block)
        sent_whole.append(True)

    return handler


class NatsServer:
    """The bundled nats-server on fixed ports with a temporary store; can be stopped and restarted."""

    def __init__(self, data_dir: Path) -> None:
        self.monitor_port = free_port()
        self.embedded = EmbeddedNats(data_dir, port=free_port(), monitor_port=self.monitor_port)
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return self.embedded.url

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            await self.embedded.run(task_status=task_status)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped for the block (SIGSTOP: a stalled disk or VM), its connections open.

        SIGSTOP takes effect a moment after ``kill`` returns, and a thread of the server
        running then could still answer what the block sends first; so the block starts
        once the server is stopped (the parent's ``waitid`` says so), and SIGCONT ends it.
        """
        pid = int((self.embedded.data_dir / "nats-server.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    async def consumers(self, stream: str) -> dict[str, dict[str, Any]]:
        """The stream's consumers by name, with their state, from the server's monitoring endpoint (/jsz)."""
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"http://127.0.0.1:{self.monitor_port}/jsz", params={"consumers": "true", "config": "true"}
            )
        return {
            info["name"]: info
            for account in response.json().get("account_details", [])
            for stream_detail in account.get("stream_detail", [])
            if stream_detail["name"] == stream
            for info in stream_detail.get("consumer_detail", [])
        }

    async def stream_messages(self, stream: str) -> int:
        """How many messages the stream holds, from the server's monitoring endpoint (/jsz)."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.monitor_port}/jsz", params={"streams": "true"})
        [messages] = [
            stream_detail["state"]["messages"]
            for account in response.json().get("account_details", [])
            for stream_detail in account.get("stream_detail", [])
            if stream_detail["name"] == stream
        ]
        return messages

    async def connection(self, name: str) -> dict[str, Any]:
        """The client connection named ``name`` (its CONNECT's), from the server's monitoring endpoint (/connz)."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.monitor_port}/connz")
        [connection] = [info for info in response.json()["connections"] if info.get("name") == name]
        return connection

    async def total_connections(self) -> int:
        """How many client connections the server has accepted since it started (/varz)."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.monitor_port}/varz")
        return response.json()["total_connections"]

    async def consumer_state(self, stream: str, consumer: str) -> dict[str, Any]:
        """The consumer's state from the server's monitoring endpoint (/jsz)."""
        consumers = await self.consumers(stream)
        if consumer not in consumers:
            raise LookupError(f"no consumer {consumer} on stream {stream}")
        return consumers[consumer]


async def serve_limited_nats(
    work: Path, *, max_consumers: int, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """The bundled nats-server with one account whose JetStream allows ``max_consumers`` consumers.

    Reports the client URL (with the account's user) once the server is ready; runs until cancelled.
    """
    conf = work / "nats-limited.conf"
    # Port -1: the server binds a port of the kernel's choosing and logs it.
    conf.write_text(
        f'host: 127.0.0.1\nport: -1\njetstream {{ store_dir: "{work / "jetstream"}" }}\n'
        f"accounts {{ APP {{ jetstream {{ max_file: 1G, max_mem: 64M, max_consumers: {max_consumers} }}, "
        "users: [{user: app, password: app}] } }\n"
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_nats_server, "the limited nats-server", conf)
        task_status.started(f"nats://app:app@127.0.0.1:{port}")


@dataclass(frozen=True)
class ClusterNode:
    """One nats-server of a ``NatsCluster``: its name and its client, route and monitoring ports."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster:
    """``size`` nodes of the bundled nats-server in one JetStream cluster, all on 127.0.0.1.

    Each node has its own ``server_name``, store and monitoring port and routes
    to every other. ``run`` reports the comma-separated client URLs once every
    node says it is ready and listens for routes; JetStream answers only once
    the nodes have elected a meta leader (``wait_meta_leader``). A node can be
    started (``run_node``) and stopped on its own; one that exits unbidden
    raises ``NatsServerExited``.
    """

    def __init__(self, work: Path, size: int = 3) -> None:
        # Known before any node starts (every node's routes name them all), so
        # none may be one the kernel could give a running node's connection.
        ports = iter(fixed_ports(3 * size))
        self.nodes = [ClusterNode(f"node-{n}", next(ports), next(ports), next(ports)) for n in range(size)]
        self._configs: dict[str, Path] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        work.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            routes = ", ".join(f"nats-route://127.0.0.1:{o.cluster_port}" for o in self.nodes if o is not node)
            self._configs[node.name] = conf = work / f"{node.name}.conf"
            conf.write_text(
                f"server_name: {node.name}\nhost: 127.0.0.1\nport: {node.port}\n"
                f"http: 127.0.0.1:{node.monitor_port}\n"
                f'jetstream {{ store_dir: "{work / node.name}" }}\n'
                f"cluster {{ name: test-cluster, listen: 127.0.0.1:{node.cluster_port}, routes: [{routes}] }}\n"
            )

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        [found] = [node for node in self.nodes if node.name == name]
        return found

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every node until cancelled; reports the client URLs once all are ready."""
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                await nursery.start(self.run_node, node)
            task_status.started(self.urls)

    async def run_node(
        self, node: ClusterNode, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one node until cancelled or ``stop``ped; reports its client port once it is ready and listens for routes.

        nats-server says it is ready before it binds its route port (and exits
        if it cannot), so readiness waits for both lines.
        """
        with trio.CancelScope() as self._scopes[node.name]:
            await run_nats_server(
                node.name, self._configs[node.name], ready=(_READY, _ROUTES_LISTENING), task_status=task_status
            )

    def stop(self, node: ClusterNode) -> None:
        """Stop ``node`` (SIGTERM, as an operator would); the others run on."""
        self._scopes[node.name].cancel()

    async def monitor(self, node: ClusterNode, endpoint: str, **params: str) -> dict[str, Any]:
        """``node``'s monitoring ``endpoint`` (``jsz``, ``connz``, ...) with ``params``."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{node.monitor_port}/{endpoint}", params=params)
        response.raise_for_status()
        return response.json()

    async def jsz(self, node: ClusterNode) -> dict[str, Any]:
        """``node``'s JetStream report, with every stream's and consumer's config and cluster."""
        return await self.monitor(node, "jsz", streams="true", consumers="true", config="true")

    async def wait_meta_leader(self) -> str:
        """Poll every node until each names the same meta leader; returns its name.

        The caller's ``fail_after`` bounds the wait (an election takes well under a second here).
        """
        while True:
            leaders = {(await self.jsz(node)).get("meta_cluster", {}).get("leader") for node in self.nodes}
            if len(leaders) == 1 and None not in leaders and "" not in leaders:
                return leaders.pop()
            await trio.sleep(0.05)


def make_config(nats_url: str, routes: dict[str, list[Any]], **sections: dict[str, Any]) -> Config:
    """A service config for tests: port 0, short timeouts, so redeliveries take a second or two."""
    return Config.model_validate(config_dict(nats_url, routes, **sections))


def write_config(path: Path, nats_url: str, routes: dict[str, list[Any]], **sections: dict[str, Any]) -> None:
    """``make_config``'s config as a YAML file, written in place."""
    path.write_text(yaml.safe_dump(config_dict(nats_url, routes, **sections)))


def config_dict(nats_url: str, routes: dict[str, list[Any]], **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 5},
        "nats": {
            "url": nats_url,
            "stream_name": "test-signals",
            "subject_pattern": "test.signal.*",
            "ack_wait_seconds": 1.5,
            "max_deliveries": 3,
        },
        "forwarding": {"timeout_seconds": 1.0, "max_in_flight_per_domain": 16},
        "routes": [{"domain": domain, "endpoints": endpoints} for domain, endpoints in routes.items()],
    }
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    return raw


@dataclass
class RunningService:
    url: str
    client: httpx.AsyncClient
    stopping: trio.Event

    async def post_event(self, event: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"{self.url}/events", json=event)

    async def post_sized(self, domain: str, call_id: str, size: int, **fields: Any) -> httpx.Response:
        """POST an event whose body, as the service stores it (compact JSON), is ``size`` bytes (a ``padding``
        field fills it)."""
        event = call_event(domain, call_id, **fields, padding="")
        event["padding"] = "x" * (size - len(_compact(event)))
        body = _compact(event)
        assert len(body) == size
        return await self.client.post(f"{self.url}/events", content=body, headers={"Content-Type": "application/json"})


def _compact(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


@asynccontextmanager
async def running_service(
    config: Config, domain_router: DomainLogRouter | None = None, config_path: Path | None = None
) -> AsyncIterator[RunningService]:
    """Run the service in-process until the block ends, then shut it down gracefully."""
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(run_service, config, stopping, domain_router=domain_router, config_path=config_path)
        )
        # As an operator's script: replay, discard and reload refuse requests that lack
        # a JSON content type or this header (tests/test_access_scenarios.py).
        async with httpx.AsyncClient(timeout=10, headers={"X-Requested-With": "tests"}) as client:
            yield RunningService(binds[0], client, stopping)
        stopping.set()


async def wait_for_api(service: RunningService, path: str, holds: Callable[[httpx.Response], bool]) -> httpx.Response:
    """Poll ``path`` until ``holds(response)``, as an operator's probe would.

    For state the service shows only through its API (health, counters); the
    scenario's ``fail_after`` bounds the wait.
    """
    while True:
        response = await service.client.get(f"{service.url}{path}")
        if holds(response):
            return response
        await trio.sleep(0.05)


def call_event(domain: str, call_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "domain": domain,
        "direction": "inbound",
        "state": "missed",
        "status": "busy-line",
        "from_number": "0914315989",
        **extra,
    }


@dataclass
class CliService:
    """The service as operators run it: the console command in a subprocess, embedded NATS."""

    url: str
    config: Path

    def post(self, event: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/events", data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.loads(response.read())


@contextmanager
def cli_service(work: Path, sections: str) -> Iterator[CliService]:
    """Run ``python -m pipeline`` on a config of ``sections`` (YAML) plus its own port, store and logs."""
    port = free_port()
    config = work / "config.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"logging: {{dir: '{work / 'logs'}'}}\n"
        + sections.replace("nats: {", f"nats: {{url: embedded, data_dir: '{work / 'nats'}', ", 1)
        + ("" if "nats: {" in sections else f"nats: {{url: embedded, data_dir: '{work / 'nats'}'}}\n")
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-config", str(config)],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the service says when it is ready
            if '"Service ready"' in line:
                break
        else:
            raise AssertionError("the service exited before it was ready")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
        yield CliService(f"http://127.0.0.1:{port}", config)
    finally:
        process.terminate()
        process.wait(30)
