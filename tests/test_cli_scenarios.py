"""Scenarios: the console command as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import nats
import nats.js.api
import pytest
import trio

from tests.harness import Backend, NatsServer, call_event, free_port, serve_backend, write_config

COMMAND = [sys.executable, "-m", "pipeline"]

VALID = """\
server:
  port: 8080
nats:
  url: embedded
routes:
  - domain: vietanh.cloudgo.vn
    endpoints: ["http://127.0.0.1:9000/webhook"]
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # In a directory of its own: a run that starts after all must not leave data/ or logs/ in the checkout.
    work = tempfile.mkdtemp(prefix="tf-cli-")
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=60, cwd=work)  # noqa: ASYNC221


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "config.yaml: file not found"),
        # Regression: an empty file started the service with no routes.
        (
            "",
            "config.yaml: the file has no settings (empty, or only comments); "
            'a config without routes says "routes: []"',
        ),
        ("# routes come later\n\n", "config.yaml: the file has no settings (empty, or only comments)"),
        ("server: [port: 1\n", "config.yaml: invalid YAML (line 2, column 1): expected ',' or ']'"),
        ("- just\n- a list\n", "config.yaml: the top level must be a mapping"),
        ("server:\n  port: eighty\n", "config.yaml: server.port: Input should be a valid integer"),
        ("server:\n  prot: 8080\n", "config.yaml: server.prot: Extra inputs are not permitted"),
        (
            VALID + "  - domain: VIETANH.cloudgo.vn\n    endpoints: [http://127.0.0.1:9001/]\n",
            "config.yaml: routes: duplicate domain 'vietanh.cloudgo.vn'",
        ),
        (
            "routes:\n  - domain: a.vn\n    endpoints: [ftp://files.example/x]\n",
            "config.yaml: routes[0].endpoints[0].url: URL scheme should be 'http' or 'https'",
        ),
        (
            "routes:\n  - domain: a.vn\n    endpoints: []\n",
            "config.yaml: routes[0].endpoints: List should have at least 1 item",
        ),
        (
            "nats:\n  ack_wait_seconds: 3\n",
            "config.yaml: nats.ack_wait_seconds (3) must exceed forwarding.timeout_seconds (3)",
        ),
        ('nats:\n  subject_pattern: "call.signal"\n', "config.yaml: nats.subject_pattern: must be dot-separated"),
        ('nats:\n  url: "http://localhost:4222"\n', 'config.yaml: nats.url: must be "embedded" or nats://'),
    ],
)
def test_config_errors_exit_2_with_one_clear_line(tmp_path: Path, text: str | None, expected: str):
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    result = run_cli("-config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"telephony-forwarder: {tmp_path}/{expected}"), lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_the_go_style_flags():
    result = run_cli("-h")
    assert result.returncode == 0
    for flag in ("-config", "-log-level", "-log-file", "-domain-logging"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["-log-level", "loud"], "argument -log-level/--log-level: invalid choice: 'loud'"),
        (["-domain-logging=maybe"], "expected true or false, got 'maybe'"),
        (["-no-such-flag"], "unrecognized arguments: -no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_a_message(args: list[str], complaint: str):
    result = run_cli(*args)
    assert result.returncode == 2
    assert complaint in result.stderr


@pytest.mark.parametrize(
    ("nats_settings", "expected"),
    [
        ("max_bytes: 1PB", "nats.max_bytes: JetStream has too little storage for stream 'call-signals'"),
        ("dead_letter_max_bytes: 1PB", "nats.dead_letter_max_bytes: JetStream has too little storage"),
        ("replicas: 3", "nats.replicas: 3 replicas need a NATS cluster; this server runs alone"),
    ],
)
async def test_streams_the_server_cannot_hold_exit_2_with_one_line(
    nats_server: NatsServer, tmp_path: Path, nats_settings: str, expected: str
):
    # Regression: the defaults reserved 2 x 10 GiB and a small disk ended the
    # first start with a traceback ("insufficient storage resources available").
    config = tmp_path / "config.yaml"
    config.write_text(f"nats: {{url: '{nats_server.url}', {nats_settings}}}\n")
    result = await trio.to_thread.run_sync(run_cli, "-config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"telephony-forwarder: {expected}"), result.stderr


def _create_limits_stream(url: str) -> None:
    """The event stream as earlier versions made it: limits retention."""

    async def create() -> None:
        client = await nats.connect(url)
        await client.jetstream().add_stream(nats.js.api.StreamConfig(name="call-signals", subjects=["call.signal.*"]))
        await client.close()

    asyncio.run(create())


async def test_a_stream_made_by_an_earlier_version_exits_2_saying_how_to_migrate(
    nats_server: NatsServer, tmp_path: Path
):
    await trio.to_thread.run_sync(_create_limits_stream, nats_server.url)
    config = tmp_path / "config.yaml"
    config.write_text(f"nats: {{url: '{nats_server.url}'}}\n")
    result = await trio.to_thread.run_sync(run_cli, "-config", str(config))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "stream 'call-signals' has limits retention" in line
    assert "set nats.stream_name to a new name" in line


async def test_sigterm_finishes_in_flight_forward_acks_it_and_exits_0(
    nats_server: NatsServer, nursery: trio.Nursery, tmp_path: Path
):
    release = trio.Event()
    backend = Backend(release=release)
    await nursery.start(serve_backend, backend)
    port, config = _cli_config(tmp_path, nats_server.url, backend.url)
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            [*COMMAND, "-config", str(config), "-log-level", "info"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            log = _LogReader(process.stdout)
            await log.wait_for("Service ready")
            async with httpx.AsyncClient() as client:
                response = await client.post(f"http://127.0.0.1:{port}/events", json=call_event("ok.vn", "slow"))
            assert response.status_code == 202
            await backend.wait_count(1)  # the forward is in flight, held by the backend

            process.send_signal(signal.SIGTERM)
            await log.wait_for("Shutting down")
            release.set()
            await log.wait_for("Service stopped")
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
    # Acknowledged before exit (the event left the stream): not delivered again.
    assert await nats_server.stream_messages("cli") == 0
    assert backend.attempts_of("slow") == [1]


async def test_the_service_runs_on_when_the_reader_of_its_log_is_gone(
    nats_server: NatsServer, nursery: trio.Nursery, tmp_path: Path
):
    # Regression: the next line written to a stdout whose reader had exited (or to a
    # -log-file on a full disk) raised, and the service ended.
    backend = Backend()
    await nursery.start(serve_backend, backend)
    port, config = _cli_config(tmp_path, nats_server.url, backend.url)
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            [*COMMAND, "-config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            await _LogReader(process.stdout).wait_for("Service ready")
            await process.stdout.aclose()  # the reader of its stdout is gone
            async with httpx.AsyncClient() as client:
                # A domain without a route: its warning goes to stdout.
                unrouted = await client.post(f"http://127.0.0.1:{port}/events", json=call_event("nobody.vn", "x"))
                routed = await client.post(f"http://127.0.0.1:{port}/events", json=call_event("ok.vn", "after"))
                await backend.wait_count(1)
                health = await client.get(f"http://127.0.0.1:{port}/health")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
    assert (unrouted.status_code, routed.status_code, health.status_code) == (202, 202, 200)
    assert backend.attempts_of("after") == [1]


async def test_a_second_instance_on_the_same_data_dir_exits_2_and_the_first_runs_on(
    nursery: trio.Nursery, tmp_path: Path
):
    # Regression: a second copy (started after "port already in use") stopped the
    # first one's live nats-server as stale and ran its own on the same store.
    backend = Backend()
    await nursery.start(serve_backend, backend)
    store = tmp_path / "store"

    def config_on(port: int, name: str) -> Path:
        config = tmp_path / name
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {port}}}\n"
            f"nats: {{url: embedded, data_dir: '{store}'}}\n"
            f"logging: {{dir: '{tmp_path / 'logs'}'}}\n"
            f"routes: [{{domain: ok.vn, endpoints: ['{backend.url}']}}]\n"
        )
        return config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(90):
        first = await trio.lowlevel.open_process(
            [*COMMAND, "-config", str(config_on(port, "first.yaml"))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            log = _LogReader(first.stdout)
            await log.wait_for("Service ready")
            server_pid = (store / "nats-server.pid").read_text()
            with trio.fail_after(30):  # before the fix, the second one ran on
                second = await trio.run_process(
                    [*COMMAND, "-config", str(config_on(free_port(), "second.yaml"))],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            assert second.returncode == 2
            [line] = second.stderr.decode().strip().splitlines()
            assert line.startswith(f"telephony-forwarder: nats.data_dir {store.resolve()} is in use"), line
            assert f"(pid {first.pid})" in line
            assert (store / "nats-server.pid").read_text() == server_pid  # the first one's server, untouched

            async with httpx.AsyncClient() as client:
                waiting = await client.post(f"{url}/events", json=call_event("unrouted.vn", "waiting"))
                assert waiting.status_code == 202
                listed = (await client.get(f"{url}/api/stream/messages")).json()
                assert (await client.post(f"{url}/events", json=call_event("ok.vn", "after"))).status_code == 202
                await backend.wait_count(1)
            first.send_signal(signal.SIGTERM)
            await log.wait_for("Service stopped")
            assert await first.wait() == 0
        finally:
            if first.returncode is None:
                first.kill()
    assert [message["data"]["call_id"] for message in listed["messages"]] == ["waiting"]
    assert listed["total"] == 1
    assert backend.attempts_of("after") == [1]
    assert not (store / "nats-server.pid").exists()  # removed on a clean stop


async def test_a_second_instance_on_the_same_port_exits_1_with_one_line_before_touching_nats(
    nats_server: NatsServer, nursery: trio.Nursery, tmp_path: Path
):
    # Regression: it connected to NATS and started its consumers (taking events meant for the
    # first), and only then failed to bind, with a 110-line exception-group traceback.
    backend = Backend()
    await nursery.start(serve_backend, backend)
    port, config = _cli_config(tmp_path, nats_server.url, backend.url)
    second_config = tmp_path / "second.yaml"
    second_config.write_text(config.read_text().replace(str(tmp_path / "logs"), str(tmp_path / "second-logs")))
    with trio.fail_after(60):
        first = await trio.lowlevel.open_process(
            [*COMMAND, "-config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            log = _LogReader(first.stdout)
            await log.wait_for("Service ready")
            connections_before = await nats_server.total_connections()
            second = await trio.run_process(
                [*COMMAND, "-config", str(second_config)], capture_stdout=True, capture_stderr=True, check=False
            )
            connections_after = await nats_server.total_connections()
            async with httpx.AsyncClient() as client:
                response = await client.post(f"http://127.0.0.1:{port}/events", json=call_event("ok.vn", "first"))
            await backend.wait_count(1)
            first.send_signal(signal.SIGTERM)
            assert await first.wait() == 0
        finally:
            if first.returncode is None:
                first.kill()
    assert second.returncode == 1
    assert second.stderr.decode().strip().splitlines() == [
        f"telephony-forwarder: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert connections_after == connections_before
    assert response.status_code == 202
    assert backend.attempts_of("first") == [1]


@pytest.mark.parametrize(
    ("nats_url", "signalled_after"),
    [
        pytest.param("embedded", "Embedded nats-server ready", id="embedded, the server just up"),
        pytest.param(f"nats://127.0.0.1:{free_port()}", "NATS error", id="NATS unreachable"),
    ],
)
async def test_sigterm_during_start_up_stops_it_and_exits_0(tmp_path: Path, nats_url: str, signalled_after: str):
    # Regression: a signal while the service started (systemctl stop or restart during a slow
    # start) exited 1 with a traceback (a subscriber that never said it had started), or, with
    # NATS unreachable, was ignored until NATS answered.
    config = tmp_path / "config.yaml"
    write_config(
        config,
        nats_url,
        {"ok.vn": ["http://127.0.0.1:9/"]},
        server={"port": free_port()},
        nats={"data_dir": str(tmp_path / "nats")},
        logging={"dir": str(tmp_path / "logs")},
    )
    with trio.fail_after(60):  # before the fix, with NATS unreachable: until NATS answered
        process = await trio.lowlevel.open_process(
            [*COMMAND, "-config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            log = _LogReader(process.stdout)
            await log.wait_for(signalled_after)
            process.send_signal(signal.SIGTERM)
            await log.wait_for("Service stopped")
            errors = b""
            while chunk := await process.stderr.receive_some():
                errors += chunk
            returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    assert errors.decode() == ""
    assert returncode == 0


def _cli_config(tmp_path: Path, nats_url: str, backend_url: str) -> tuple[int, Path]:
    """A config file for the CLI on a free port, routing ok.vn to ``backend_url``: the port and the file."""
    port = free_port()
    config = tmp_path / "config.yaml"
    write_config(
        config,
        nats_url,
        {"ok.vn": [backend_url]},
        server={"port": port},
        # The defaults' timeouts, not the tests' short ones: a forward is held through a shutdown.
        nats={"stream_name": "cli", "subject_pattern": "cli.*", "ack_wait_seconds": 10},
        forwarding={"timeout_seconds": 3},
        logging={"dir": str(tmp_path / "logs")},
    )
    return port, config


class _LogReader:
    def __init__(self, stream) -> None:
        self._stream = stream
        self._buffer = b""

    async def wait_for(self, message: str) -> dict:
        while True:
            *lines, self._buffer = self._buffer.split(b"\n")
            for index, line in enumerate(lines):
                record = json.loads(line) if line.startswith(b"{") else {}
                if record.get("msg") == message:
                    self._buffer = b"\n".join(lines[index + 1 :] + [self._buffer])
                    return record
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"process output ended before {message!r}")
            self._buffer += chunk
