"""The log writer actor: event log records in, per-domain daily files on disk out.

Routed domains each have their own directory; records about every domain
without a route (as of the routes when they are written) share one,
``_unrouted``, so strangers inventing domains cannot create directories.

Three pieces: ``DomainLogRouter`` (a structlog processor that hands every
record about an event to the writer), ``LogWriter`` (the actor), and
``DomainLogFiles`` (the files themselves, used from a worker thread so disk
I/O never runs on the trio thread).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Container
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
    """Per-domain daily files with size rolling, retention and compression. Not async: run it in a thread.

    Each routed domain has a directory; the lines of all other domains go to
    the one ``_unrouted`` directory (same rolling, retention, compression), so
    the number of directories is bounded by the routes, not by what clients
    send. Rolling never drops or repeats a line: a line goes whole into the
    file that is open when it is written, and a file is closed (and
    compressed) only between lines.
    """

    def __init__(self, root: Path, config: LoggingConfig, *, max_open_files: int = 256) -> None:
        self.root = root
        self._config = config
        self._max_open_files = max_open_files
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()  # directory name → its open day file
        self._newest_day = ""

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
        path = directory / f"{day}.log"
        closed_day = directory / f"{day}.log.gz"
        if closed_day.exists():
            # Lines for a day already closed (a late record, a clock step back):
            # keep the closed file as that day's next part, so order still holds.
            closed_day.rename(directory / f"{day}.{self._next_part(directory, day)}.log.gz")
        handle = path.open("ab")
        current = self._open[name] = _OpenFile(day, handle, handle.tell())
        return current

    def _close(self, name: str, *, roll: bool = False) -> None:
        current = self._open.pop(name)
        current.handle.close()
        path = Path(current.handle.name)
        if roll:
            rolled = path.with_name(f"{current.day}.{self._next_part(path.parent, current.day)}.log")
            path.rename(rolled)
            path = rolled
        if self._config.compress:
            _compress(path)
        self._prune(path.parent)

    @staticmethod
    def _next_part(directory: Path, day: str) -> int:
        parts = [f.part for f in log_files(directory) if f.day == day and f.part != DAY_FILE_PART]
        return max(parts, default=0) + 1

    def _start_day(self, day: str) -> None:
        """A new UTC day: close yesterday's files, and apply retention everywhere."""
        for name in [name for name, current in self._open.items() if current.day < day]:
            self._close(name)
        if self.root.is_dir():
            for directory in self.root.iterdir():
                if directory.is_dir():
                    self._prune(directory)

    def _prune(self, directory: Path) -> None:
        cutoff = (date.fromisoformat(self._newest_day) - timedelta(days=self._config.max_age_days)).isoformat()
        open_file = self._open.get(directory.name)
        closed = [f for f in log_files(directory) if open_file is None or f.path.name != f"{open_file.day}.log"]
        for log_file in closed:
            if log_file.day < cutoff:
                log_file.path.unlink(missing_ok=True)
        closed = [f for f in closed if f.day >= cutoff]
        for log_file in closed[: max(0, len(closed) - self._config.max_backups)]:
            log_file.path.unlink(missing_ok=True)


def _compress(path: Path) -> None:
    """``path`` replaced by its gzip: the ``.gz`` appears whole (written under a name readers
    skip, then renamed) before ``path`` goes, so a reader, or a restart after a kill, never
    meets a half-written one."""
    target = path.with_name(path.name + ".gz")
    partial = path.with_name(path.name + ".gz.partial")
    with path.open("rb") as source, gzip.open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink)
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
    batches from a worker thread. A failing disk (full, read-only) never stops
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

    def health(self) -> LogWriterHealth:
        return LogWriterHealth(self._failing, self._router.dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            with self._lines:
                async for batch in batches(self._lines, MAX_BATCH, linger_seconds=LINGER_SECONDS):
                    # The routes are replaced whole, never mutated: the thread may read this mapping.
                    await trio.to_thread.run_sync(self._write, batch, self._routes.value)
                    self._router.waiting_bytes -= sum(len(line.line) for line in batch)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._files.close)

    def _write(self, batch: list[DomainLogLine], routed: Routes) -> None:
        try:
            self._files.write(batch, routed)
        except OSError as error:
            self._failing = f"{error.strerror or error} ({getattr(error, 'filename', None) or self._files.root})"
            now = time.monotonic()
            if now - self._last_report >= REPORT_INTERVAL_SECONDS:
                self._last_report = now
                print(
                    f"telephony-forwarder: cannot write domain logs: {self._failing}; "
                    f"{len(batch)} lines lost, forwarding continues",
                    file=sys.stderr,
                    flush=True,
                )
            self._files.close()  # reopen from scratch once the disk is back
        else:
            self._failing = None
