"""The log writer actor: event log records in, per-domain daily files on disk out.

Routed domains each have their own directory; records about every domain
without a route (as of the routes when they are written) share one,
``_unrouted``, so strangers inventing domains cannot create directories.

Three pieces: ``DomainLogRouter`` (a structlog processor that hands every
record about an event to the writer), ``LogWriter`` (the actor), and
``DomainLogFiles`` (the files themselves, used from worker threads so disk
I/O never runs on the trio thread: one writes lines, another compresses the
closed files and applies retention, so compressing a day's 500 MB never
holds up the lines).
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Container
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any

import pydantic_core
import structlog
import trio
from trio_util import AsyncValue

from pipeline.batching import batches
from pipeline.config import LoggingConfig
from pipeline.domain_logs import DAY_FILE_PART, DOMAIN_FILE, UNROUTED, log_files, sanitize_domain
from pipeline.events import InvalidEvent
from pipeline.routes import Routes

# Lines written in one worker-thread call, and how long a line waits for
# others to share that call (a thread round trip per line costs more than the
# write itself).
MAX_BATCH = 2048
LINGER_SECONDS = 0.05
# How often a failing disk is reported on stderr.
REPORT_INTERVAL_SECONDS = 60.0
# Read and compressed at a time: how long an orderly stop may wait for a compression to give up.
COMPRESS_CHUNK = 1024**2
# Lines waiting for the disk, together: each carries its event (up to 1 MiB), so the
# inbox's count of lines alone allowed GiBs while the writer is slow (a day compressed).
MAX_WAITING_BYTES = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class DomainLogLine:
    domain: str
    day: str  # YYYY-MM-DD (UTC), from the record's own timestamp
    line: bytes  # one JSON object and a newline


class DomainLogRouter:
    """structlog processor: sends each record about an event to the log writer.

    A record is about an event when it has ``event_id`` and ``domain``. Its
    full JSON goes to the writer's inbox without ever waiting (its ``payload``,
    the event's own JSON as bytes, goes into the line as it is, not encoded
    again): if the inbox is full, or its lines hold ``MAX_WAITING_BYTES``,
    the line is counted as dropped, because logging must not slow forwarding. Info and debug records about events then
    stop here (they are in the domain's file); warnings and errors also go on
    to stdout.
    """

    def __init__(self) -> None:
        self._lines: trio.MemorySendChannel[DomainLogLine] | None = None
        self.dropped = 0
        self.waiting_bytes = 0  # of the lines sent and not yet written (the writer counts them off)

    def attach(self, lines: trio.MemorySendChannel[DomainLogLine] | None) -> None:
        self._lines = lines

    def __call__(self, logger: Any, method_name: str, record: dict[str, Any]) -> dict[str, Any]:
        domain = record.get("domain")
        if self._lines is not None and isinstance(domain, str) and record.get("event_id"):
            payload = record.pop("payload", None)  # stdout never gets it
            try:
                # pydantic-core's encoder: a quarter of json's time (bench/RESULTS.md), three lines an event.
                line = pydantic_core.to_json(record, fallback=str)
            except pydantic_core.PydanticSerializationError:  # what it cannot write, json can
                line = json.dumps(record, ensure_ascii=False, default=str).encode()
            if payload is not None:
                line = b'%b,"payload":%b}' % (line[:-1], payload)
            line += b"\n"
            try:
                if self.waiting_bytes + len(line) > MAX_WAITING_BYTES:
                    raise trio.WouldBlock
                self._lines.send_nowait(DomainLogLine(domain, str(record.get("timestamp", ""))[:10], line))
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            else:
                self.waiting_bytes += len(line)
                if record.get("level") in ("debug", "info"):
                    raise structlog.DropEvent
        return record


@dataclass(slots=True)
class _OpenFile:
    day: str
    handle: IO[bytes]
    size: int


class DomainLogFiles:
    """Per-domain daily files with size rolling, retention and compression. Not async: run it in threads.

    Each routed domain has a directory; the lines of all other domains go to
    the one ``_unrouted`` directory (same rolling, retention, compression), so
    the number of directories is bounded by the routes, not by what clients
    send. Rolling never drops or repeats a line: a line goes whole into the
    file that is open when it is written, and a file is closed only between lines.

    ``write`` (one thread at a time) writes, rolls and closes; it notes in
    ``closed`` the directories where it closed a file, and ``None`` there once a
    new day began. ``housekeep`` (another thread, one call at a time, alongside
    ``write``) compresses the closed files of the directories it is given and
    applies retention there.
    """

    def __init__(self, root: Path, config: LoggingConfig, *, max_open_files: int = 256) -> None:
        self.root = root
        self._config = config
        self._max_open_files = max_open_files
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()  # directory name → its open day file
        self._newest_day = ""
        # Directory names where a file was closed since the caller last took them; None: every directory.
        self.closed: set[str] | None = set()
        # Held while a closed day is compressed, and by the writer to reopen a past day (a late line).
        self._compressing = threading.Lock()

    def write(self, lines: list[DomainLogLine], routed: Container[str]) -> None:
        """Append ``lines``; ``routed`` holds the domains that have a route now (the rest are unrouted)."""
        for line in lines:
            if line.day > self._newest_day:
                self._newest_day = line.day
                self._start_day(line.day)
            if line.domain in routed:
                try:
                    name, label = sanitize_domain(line.domain), line.domain
                except InvalidEvent:
                    continue  # only accepted (valid) domains are logged; nothing else can name a directory
            else:
                name = label = UNROUTED
            current = self._file_for(name, label, line.day)
            if current.size and current.size + len(line.line) > self._config.max_file_size:
                self._close(name, roll=True)
                current = self._file_for(name, label, line.day)
            current.handle.write(line.line)
            current.size += len(line.line)
        for current in self._open.values():
            current.handle.flush()

    def close(self) -> None:
        """Close every open file, leaving today's uncompressed (it is appended to after a restart)."""
        while self._open:
            _, current = self._open.popitem(last=False)
            current.handle.close()

    def _file_for(self, name: str, domain: str, day: str) -> _OpenFile:
        current = self._open.get(name)
        if current is not None and current.day == day:
            self._open.move_to_end(name)
            return current
        if current is not None:
            self._close(name)
        if len(self._open) >= self._max_open_files:
            _, idle = self._open.popitem(last=False)
            idle.handle.close()
        directory = self.root / name
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            (directory / DOMAIN_FILE).write_text(domain + "\n", encoding="utf-8")
        if day < self._newest_day:  # a past day (a late record, a clock step back): compressed, maybe now
            with self._compressing:
                return self._open_day(name, directory, day)
        return self._open_day(name, directory, day)

    def _open_day(self, name: str, directory: Path, day: str) -> _OpenFile:
        path = directory / f"{day}.log"
        closed_day = directory / f"{day}.log.gz"
        if closed_day.exists():
            if path.exists():  # compressed, the file not yet removed (a kill): the same lines
                path.unlink()
            # Lines for a day already closed: keep the closed file as that day's next part, so order still holds.
            closed_day.rename(directory / f"{day}.{self._next_part(directory, day)}.log.gz")
        handle = path.open("ab")
        current = self._open[name] = _OpenFile(day, handle, handle.tell())
        return current

    def _close(self, name: str, *, roll: bool = False) -> None:
        current = self._open.pop(name)
        current.handle.close()
        path = Path(current.handle.name)
        if roll:
            path.rename(path.with_name(f"{current.day}.{self._next_part(path.parent, current.day)}.log"))
        if self.closed is not None:
            self.closed.add(name)

    @staticmethod
    def _next_part(directory: Path, day: str) -> int:
        parts = [f.part for f in log_files(directory) if f.day == day and f.part != DAY_FILE_PART]
        return max(parts, default=0) + 1

    def _start_day(self, day: str) -> None:
        """A new UTC day: close yesterday's files; retention is due everywhere."""
        for name in [name for name, current in self._open.items() if current.day < day]:
            self._close(name)
        self.closed = None

    def housekeep(self, names: Collection[str] | None, stop: threading.Event) -> None:
        """Compress the closed files of the directories ``names`` (None: of every directory, as at
        start, for days that ended while the service was stopped), and apply retention there.

        A closed file is a rolled part, or a day before today's. Gives up (the file
        left whole, for the next time) once ``stop`` is set.
        """
        # The writer's day (a day file is closed once the writer has moved past it); before
        # its first line, the clock's.
        today = self._newest_day or time.strftime("%Y-%m-%d", time.gmtime())
        if names is None:
            directories = [d for d in self.root.iterdir() if d.is_dir()] if self.root.is_dir() else []
        else:
            directories = [self.root / name for name in names]
        for directory in directories:
            if stop.is_set():
                return
            if self._config.compress and directory.is_dir():
                for log_file in log_files(directory):
                    if stop.is_set():
                        return
                    if log_file.compressed or (log_file.part == DAY_FILE_PART and log_file.day >= today):
                        continue
                    with self._compressing:
                        open_file = self._open.get(directory.name)
                        if open_file is None or Path(open_file.handle.name) != log_file.path:
                            _compress(log_file.path, stop)
            if directory.is_dir():
                self._prune(directory, today)

    def _prune(self, directory: Path, today: str) -> None:
        cutoff = (date.fromisoformat(today) - timedelta(days=self._config.max_age_days)).isoformat()
        open_file = self._open.get(directory.name)
        closed = [f for f in log_files(directory) if open_file is None or f.path.name != f"{open_file.day}.log"]
        for log_file in closed:
            if log_file.day < cutoff:
                log_file.path.unlink(missing_ok=True)
        closed = [f for f in closed if f.day >= cutoff]
        for log_file in closed[: max(0, len(closed) - self._config.max_backups)]:
            log_file.path.unlink(missing_ok=True)


def _compress(path: Path, stop: threading.Event) -> None:
    """``path`` replaced by its gzip: the ``.gz`` appears whole (written under a name readers
    skip, then renamed) before ``path`` goes, so a reader, or a restart after a kill, never
    meets a half-written one. Once ``stop`` is set it gives up, ``path`` left as it was."""
    target = path.with_name(path.name + ".gz")
    partial = path.with_name(path.name + ".gz.partial")
    try:
        with path.open("rb") as source, gzip.open(partial, "wb") as sink:
            while chunk := source.read(COMPRESS_CHUNK):
                if stop.is_set():
                    break
                sink.write(chunk)
    except OSError:  # a full disk: no half-written gzip left behind
        partial.unlink(missing_ok=True)
        raise
    if stop.is_set():
        partial.unlink()
        return
    partial.replace(target)
    path.unlink()


@dataclass(frozen=True, slots=True)
class LogWriterHealth:
    failing: str | None  # the last write error, while writes fail
    dropped_lines: int


class LogWriter:
    """Writes the records ``DomainLogRouter`` hands it to the per-domain files.

    In: ``DomainLogLine``, and ``routes`` (read when a batch is written: a
    domain without a route then goes to ``_unrouted``). Out: files under the log directory, written in
    batches from a worker thread; the files it closes (rolled parts, past days) are compressed,
    and retention applied, by a task of its own in another thread, starting with every
    directory (days that ended while the service was stopped). A failing disk (full, read-only) never stops
    the service: the batch is lost, the failure is reported on stderr at most
    once a minute and through ``health()`` (``/health`` says degraded), and
    writing resumes when the disk does. Runs until its inbox is closed and
    drained, then closes its files. Back-pressure: none by design; the router
    drops lines when the bounded inbox is full, and counts them.
    """

    def __init__(
        self,
        lines: trio.MemoryReceiveChannel[DomainLogLine],
        files: DomainLogFiles,
        router: DomainLogRouter,
        routes: AsyncValue[Routes],
    ) -> None:
        self._lines = lines
        self._files = files
        self._router = router
        self._routes = routes
        self._failing: str | None = None
        self._last_report = -REPORT_INTERVAL_SECONDS
        # Directories with closed files to compress (None: every one); set when there are.
        self._closed: set[str] | None = None
        self._files_closed = trio.Event()
        self._files_closed.set()

    def health(self) -> LogWriterHealth:
        return LogWriterHealth(self._failing, self._router.dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        stop_housekeeping = threading.Event()
        try:
            async with trio.open_nursery() as housekeeping:
                housekeeping.start_soon(self._keep_house, stop_housekeeping)
                try:
                    with self._lines:
                        async for batch in batches(self._lines, MAX_BATCH, linger_seconds=LINGER_SECONDS):
                            # The routes are replaced whole, never mutated: the thread may read this mapping.
                            await trio.to_thread.run_sync(self._write, batch, self._routes.value)
                            self._router.waiting_bytes -= sum(len(line.line) for line in batch)
                            self._take_closed()
                finally:
                    # A compression under way gives up (its thread cannot be cancelled): done at the next start.
                    stop_housekeeping.set()
                    housekeeping.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._files.close)

    def _take_closed(self) -> None:
        """Hand the directories where the last write closed files to the housekeeping task."""
        closed, self._files.closed = self._files.closed, set()
        if closed is not None and not closed:
            return
        self._closed = None if closed is None or self._closed is None else self._closed | closed
        self._files_closed.set()

    async def _keep_house(self, stop: threading.Event) -> None:
        while True:
            await self._files_closed.wait()
            self._files_closed = trio.Event()
            names, self._closed = self._closed, set()
            if not await trio.to_thread.run_sync(self._housekeep, names, stop):
                self._closed = None  # all of them again, with the next file closed

    def _write(self, batch: list[DomainLogLine], routed: Routes) -> None:
        try:
            self._files.write(batch, routed)
        except OSError as error:
            self._report(error, f"cannot write domain logs: {{}}; {len(batch)} lines lost, forwarding continues")
            self._files.close()  # reopen from scratch once the disk is back
        else:
            self._failing = None

    def _housekeep(self, names: set[str] | None, stop: threading.Event) -> bool:
        try:
            self._files.housekeep(names, stop)
        except OSError as error:
            self._report(error, "cannot compress domain logs: {}; the files stay uncompressed for now")
            return False
        return True

    def _report(self, error: OSError, message: str) -> None:
        """Say what failed on stderr (at most once a minute), and in ``health()`` until a write succeeds."""
        self._failing = f"{error.strerror or error} ({getattr(error, 'filename', None) or self._files.root})"
        now = time.monotonic()
        if now - self._last_report >= REPORT_INTERVAL_SECONDS:
            self._last_report = now
            print(f"telephony-forwarder: {message.format(self._failing)}", file=sys.stderr, flush=True)
