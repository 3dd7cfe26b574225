"""Scenarios: the bundled nats-server as the service runs it."""

from __future__ import annotations

import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog
import trio

import pipeline.embedded_nats
from pipeline.embedded_nats import DataDirInUse, EmbeddedNats, server_binary
from tests.harness import free_port

# trio retires an idle worker thread after 10 s.
TRIO_THREAD_IDLE_SECONDS = 10


async def _answers(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return False
    async with stream:
        return (await stream.receive_some()).startswith(b"INFO ")


async def test_server_outlives_trios_idle_worker_threads(tmp_path: Path, nursery: trio.Nursery):
    # Regression: spawned from a trio worker thread with PR_SET_PDEATHSIG, the
    # server got SIGTERM as soon as that thread retired, 10 s after start.
    url = await nursery.start(EmbeddedNats(tmp_path).run)
    pid = int((tmp_path / "nats-server.pid").read_text())
    worker = await trio.to_thread.run_sync(threading.current_thread)  # an idle worker thread for trio to retire
    retired = trio.Event()
    token = trio.lowlevel.current_trio_token()
    # Joined from a thread of our own: a trio worker asked to join it would be that idle thread itself.
    threading.Thread(target=lambda: (worker.join(), token.run_sync_soon(retired.set)), daemon=True).start()
    with trio.fail_after(TRIO_THREAD_IDLE_SECONDS + 20):
        await retired.wait()
    assert await _answers(url)
    # The same server, not one restarted after it was stopped.
    assert int((tmp_path / "nats-server.pid").read_text()) == pid


def _start_unparented_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """A nats-server on ``data_dir``'s own config, with no parent link: one a killed run could leave behind."""
    data_dir.mkdir(exist_ok=True)
    config = EmbeddedNats(data_dir, port=port)._write_config()
    return subprocess.Popen(
        [str(server_binary()), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def test_stale_server_of_a_killed_run_is_stopped_before_start(tmp_path: Path, nursery: trio.Nursery):
    # A server left running on our data directory, as after a kill -9 where the
    # kernel could not stop the child. Its owner is gone: the lock file names a
    # dead pid and nobody holds it.
    port = free_port()
    stale = _start_unparented_server(tmp_path, port)
    (tmp_path / "instance.lock").write_text("4194304\n")
    try:
        with trio.fail_after(20):
            await _wait_pid_file(tmp_path / "nats-server.pid")
            url = await nursery.start(EmbeddedNats(tmp_path, port=port).run)
            assert await trio.to_thread.run_sync(stale.wait) == 0  # stopped by SIGTERM, cleanly
            assert await _answers(url)
            assert int((tmp_path / "nats-server.pid").read_text()) != stale.pid
    finally:
        if stale.poll() is None:
            stale.kill()


async def test_a_server_our_pid_file_names_but_on_another_config_is_left_alone(tmp_path: Path, nursery: trio.Nursery):
    # The pid in a leftover pid file now belongs to a nats-server of another
    # directory (pids are reused): it is not ours to stop.
    other = _start_unparented_server(tmp_path / "other", free_port())
    ours = tmp_path / "ours"
    ours.mkdir()
    try:
        with trio.fail_after(20):
            await _wait_pid_file(tmp_path / "other" / "nats-server.pid")
            (ours / "nats-server.pid").write_text(f"{other.pid}\n")
            url = await nursery.start(EmbeddedNats(ours).run)
            assert await _answers(url)
            assert other.poll() is None
            assert int((ours / "nats-server.pid").read_text()) != other.pid
    finally:
        other.terminate()
        await trio.to_thread.run_sync(other.wait)


async def test_a_second_owner_of_the_data_directory_is_refused_and_the_first_runs_on(
    tmp_path: Path, nursery: trio.Nursery
):
    first = EmbeddedNats(tmp_path)
    with trio.fail_after(20):
        url = await nursery.start(first.run)
        pid = int((tmp_path / "nats-server.pid").read_text())
        with pytest.raises(DataDirInUse) as refused:
            await EmbeddedNats(tmp_path).run()
        assert str(refused.value) == (
            f"nats.data_dir {first.data_dir} is in use by another instance (pid {os.getpid()}); "
            "stop that one first, or give this one its own nats.data_dir"
        )
        assert await _answers(url)
        assert int((tmp_path / "nats-server.pid").read_text()) == pid


async def test_a_clean_stop_removes_the_pid_file_and_frees_the_directory(tmp_path: Path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(EmbeddedNats(tmp_path).run)
            pid = int((tmp_path / "nats-server.pid").read_text())
            pidfd = os.pidfd_open(pid)
            nursery.cancel_scope.cancel()
        try:
            assert select.select([pidfd], [], [], 0)[0] == [pidfd]  # the server has exited
        finally:
            os.close(pidfd)
        assert not (tmp_path / "nats-server.pid").exists()
        async with trio.open_nursery() as nursery:  # the next instance may own it
            url = await nursery.start(EmbeddedNats(tmp_path).run)
            assert await _answers(url)
            nursery.cancel_scope.cancel()


def test_server_stops_when_the_service_is_killed(tmp_path: Path):
    script = (
        "import sys, trio\n"
        "from pathlib import Path\n"
        "from pipeline.embedded_nats import EmbeddedNats\n"
        "async def main():\n"
        "    async with trio.open_nursery() as n:\n"
        "        await n.start(EmbeddedNats(Path(sys.argv[1])).run)\n"
        "        print('ready', flush=True)\n"
        "trio.run(main)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        for line in service.stdout:  # the server's own log lines come first
            if line.strip() == "ready":
                break
        pid = int((tmp_path / "nats-server.pid").read_text())
        pidfd = os.pidfd_open(pid)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        # The kernel ends the server with its parent (PR_SET_PDEATHSIG).
        assert select.select([pidfd], [], [], 10)[0] == [pidfd]
        os.close(pidfd)
    finally:
        if service.poll() is None:
            service.kill()


async def _wait_pid_file(path: Path) -> None:
    # Another process writes it: there is nothing to wait on but the file itself.
    while not await trio.Path(path).exists():  # noqa: ASYNC110
        await trio.sleep(0.05)


def _environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


@pytest.mark.parametrize(("ours", "expected"), [(None, "1"), ("2", "2")])
async def test_the_server_runs_on_one_core_unless_the_environment_says_otherwise(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, ours: str | None, expected: str
):
    if ours is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", ours)
    await nursery.start(EmbeddedNats(tmp_path).run)
    pid = int((tmp_path / "nats-server.pid").read_text())
    assert _environment(pid)["GOMAXPROCS"] == expected


async def test_a_restart_that_fails_is_tried_again_and_the_server_comes_back_on_its_port(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
):
    # Regression: the server died, and its restart found the port taken meanwhile (any outgoing
    # connection of the host may get it as its source port): EmbeddedNatsError ended the service.
    monkeypatch.setattr(pipeline.embedded_nats, "RESTART_DELAY_SECONDS", 2.0)  # time to take the port
    said_send, said = trio.open_memory_channel[str](math.inf)

    def tell(logger: object, method_name: str, record: dict) -> dict:
        said_send.send_nowait(record["event"])
        return record

    async def until_said(message: str) -> None:
        while await said.receive() != message:
            pass

    with structlog.testing.capture_logs(processors=[tell]) as records, trio.fail_after(60):
        url = await nursery.start(EmbeddedNats(tmp_path).run)
        port = int(url.rpartition(":")[2])
        pidfd = os.pidfd_open(int((tmp_path / "nats-server.pid").read_text()))
        try:
            os.kill(int((tmp_path / "nats-server.pid").read_text()), signal.SIGKILL)
            await trio.lowlevel.wait_readable(pidfd)  # gone, and its port with it
        finally:
            os.close(pidfd)
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            await until_said("Embedded nats-server did not start again; retrying")
        await until_said("Embedded nats-server ready")  # the port free again: the next try took it
        answers = await _answers(url)
    messages = [r["event"] for r in records if r["log_level"] != "debug"]
    assert messages == [
        "Embedded nats-server ready",
        "Embedded nats-server exited; restarting it",
        "Embedded nats-server did not start again; retrying",
        "Embedded nats-server ready",
    ]
    assert answers
