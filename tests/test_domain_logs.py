"""Unit tests: domain sanitization, and the log files' rolling, retention and reading."""

from __future__ import annotations

import gzip
import json
import math
import threading
from collections.abc import Callable, Collection, Container
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
import trio

from actors import log_writer
from actors.log_writer import DomainLogFiles, DomainLogLine, DomainLogRouter, LogWriter
from pipeline.config import LoggingConfig
from pipeline.domain_logs import UNROUTED, domain_directory, log_files, logged_domains, read_day, sanitize_domain
from pipeline.events import InvalidEvent
from pipeline.routes import open_routes

ROUTED = frozenset({"ok.vn", "a_b.vn"})


def test_sanitize_keeps_the_familiar_form():
    assert sanitize_domain("example.com") == "example_com"
    assert sanitize_domain("VietAnh.CloudGo.VN") == "vietanh_cloudgo_vn"


@pytest.mark.parametrize(
    "hostile", ["", "..", "../etc", "a/b", "a\\b", "a\0b", "/abs", "a b", "ü.vn", "a" * 254, ".", "~", "_", ".a", "a."]
)
def test_sanitize_rejects_what_could_escape_or_is_not_a_domain(hostile: str):
    with pytest.raises(InvalidEvent):
        sanitize_domain(hostile)


def test_no_domain_is_sanitized_to_the_unrouted_directory():
    assert sanitize_domain("_unrouted") != UNROUTED
    with pytest.raises(InvalidEvent):
        sanitize_domain(".unrouted")  # what once became "_unrouted"


def test_distinct_domains_never_share_a_directory():
    domains = ["a.b.vn", "a_b.vn", "a_b_vn", "a.b_vn", "a-b.vn", "ab.vn", "a__b.vn", "a._b.vn", "a_.b.vn"]
    names = [sanitize_domain(d) for d in domains]
    assert len(set(names)) == len(domains)
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) <= 255


def line(domain: str, day: str, number: int, msg: str = "Event forwarded successfully", **extra) -> DomainLogLine:
    record = {
        "msg": msg,
        "domain": domain,
        "event_id": f"e-{number}",
        "call_id": f"c-{number}",
        "timestamp": f"{day}T10:00:00.000000Z",
        "delivery_attempt": 1,
        "payload": {"n": number},
        **extra,
    }
    return DomainLogLine(domain, day, json.dumps(record).encode() + b"\n")


def housekeep(files: DomainLogFiles) -> None:
    """What the log writer's housekeeping task does after a write that closed files."""
    files.housekeep(None, threading.Event())


def all_lines(directory: Path, day: str) -> list[int]:
    numbers = []
    for log_file in log_files(directory):
        if log_file.day == day:
            opener = gzip.open if log_file.compressed else open
            with opener(log_file.path, "rb") as lines:
                numbers += [json.loads(raw)["payload"]["n"] for raw in lines]
    return numbers


def test_files_roll_by_size_and_day_without_dropping_or_repeating_lines(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig(max_file_size=1000, max_backups=30, max_age_days=30))
    files.write([line("ok.vn", "2026-01-04", n) for n in range(40)], routed=ROUTED)
    files.write([line("ok.vn", "2026-01-04", n) for n in range(40, 60)], routed=ROUTED)
    housekeep(files)
    directory = tmp_path / "ok_vn"
    names = sorted(p.name for p in directory.iterdir())
    assert "2026-01-04.log" in names and "2026-01-04.1.log.gz" in names and ".domain" in names
    assert all(p.stat().st_size <= 1000 for p in directory.glob("*.log"))
    assert all_lines(directory, "2026-01-04") == list(range(60))

    files.write([line("ok.vn", "2026-01-05", 60)], routed=ROUTED)  # a new UTC day closes the old one
    housekeep(files)  # which is then compressed
    assert (directory / "2026-01-04.log.gz").exists() and not (directory / "2026-01-04.log").exists()
    assert all_lines(directory, "2026-01-04") == list(range(60))
    assert all_lines(directory, "2026-01-05") == [60]
    files.close()


def test_retention_deletes_old_days_and_keeps_at_most_max_backups(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig(max_file_size=10**6, max_backups=3, max_age_days=5))
    for day in range(1, 9):
        files.write([line("ok.vn", f"2026-01-{day:02d}", day)], routed=ROUTED)
        housekeep(files)
    directory = tmp_path / "ok_vn"
    # Closed days 05, 06, 07 kept (3 backups), 08 open.
    assert sorted(f.day for f in log_files(directory)) == ["2026-01-05", "2026-01-06", "2026-01-07", "2026-01-08"]
    files.write([line("ok.vn", "2026-01-20", 20)], routed=ROUTED)  # days older than 5 days before the 20th go
    housekeep(files)
    assert sorted(f.day for f in log_files(directory)) == ["2026-01-20"]
    files.close()


def test_a_late_line_for_a_closed_day_keeps_the_days_order(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig())
    files.write(
        [line("ok.vn", "2026-01-04", 1), line("ok.vn", "2026-01-05", 2), line("ok.vn", "2026-01-04", 3)], routed=ROUTED
    )
    files.close()
    assert all_lines(tmp_path / "ok_vn", "2026-01-04") == [1, 3]


def test_read_day_pages_newest_first_over_plain_and_gzip_parts(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig(max_file_size=800))
    records = []
    for n in range(30):
        if n % 3 == 0:
            records.append(
                line(
                    "ok.vn",
                    "2026-01-04",
                    n,
                    msg="Failed to forward event",
                    errors={"u": "HTTP 500"},
                    will_retry=True,
                    max_deliveries=3,
                    delivery_attempt=2,
                )
            )
        else:
            records.append(line("ok.vn", "2026-01-04", n))
    records.append(line("ok.vn", "2026-01-04", 99, msg="Forwarding event"))
    files.write(records, routed=ROUTED)
    housekeep(files)
    files.close()
    directory = tmp_path / "ok_vn"
    assert any(f.compressed for f in log_files(directory)) and any(not f.compressed for f in log_files(directory))

    page = read_day(directory, "2026-01-04", kind="all", offset=0, limit=5)
    assert page["stats"] == {"total_successful": 20, "total_failed": 10, "retry_count": 10}
    assert page["total"] == 30
    newest = page["events_by_domain"]["ok.vn"] + page["failed_events_by_domain"]["ok.vn"]
    assert sorted(r["event"]["n"] for r in newest) == [25, 26, 27, 28, 29]
    failed = read_day(directory, "2026-01-04", kind="failed", offset=2, limit=3)["failed_events_by_domain"]["ok.vn"]
    assert [r["event"]["n"] for r in failed] == [21, 18, 15]
    assert failed[0]["error"] == "u: HTTP 500" and failed[0]["will_retry"] is True
    assert read_day(directory, "2026-01-03", kind="all", offset=0, limit=5)["total"] == 0


def test_a_day_being_compressed_or_left_so_by_a_kill_is_read_whole_and_once(tmp_path: Path):
    # The gzip was written under its final name: read meanwhile, or left half-written by a
    # kill beside the whole file, it failed every read of that day (500) until retention.
    directory = tmp_path / "ok_vn"
    directory.mkdir()
    lines = b"".join(line("ok.vn", "2026-01-04", n).line for n in range(3))
    (directory / "2026-01-04.log").write_bytes(lines)
    (directory / "2026-01-04.log.gz.partial").write_bytes(gzip.compress(lines)[:20])  # killed mid-compression
    assert read_day(directory, "2026-01-04", kind="all", offset=0, limit=10)["total"] == 3
    (directory / "2026-01-04.log.gz").write_bytes(gzip.compress(lines))  # killed before the file was removed
    assert all_lines(directory, "2026-01-04") == [0, 1, 2]
    assert read_day(directory, "2026-01-04", kind="all", offset=0, limit=10)["total"] == 3


def test_domain_directory_never_leaves_the_root(tmp_path: Path):
    (tmp_path / "logs" / "ok_vn").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    root = tmp_path / "logs"
    assert domain_directory(root, "ok_vn") == root / "ok_vn"
    assert domain_directory(root, "ok.vn") == root / "ok_vn"
    for hostile in ["../secret", "..", "/etc", "ok_vn/..", "ok_vn/../../secret", "%2e%2e", ""]:
        assert domain_directory(root, hostile) is None


def test_logged_domains_lists_days_newest_first(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig())
    files.write(
        [line("a_b.vn", "2026-01-03", 1), line("a_b.vn", "2026-01-04", 2), line("ok.vn", "2026-01-04", 3)],
        routed=ROUTED,
    )
    files.close()
    listed = {d.domain: d for d in logged_domains(tmp_path)}
    assert listed["a_b.vn"].dates == ["2026-01-04", "2026-01-03"]
    assert listed["a_b.vn"].sanitized == sanitize_domain("a_b.vn")
    assert listed["ok.vn"].sanitized == "ok_vn"


def test_domains_without_a_route_share_the_unrouted_directory(tmp_path: Path):
    files = DomainLogFiles(tmp_path, LoggingConfig(max_file_size=1000, max_backups=2))
    invented = [line(f"stranger-{n}.vn", "2026-01-04", n) for n in range(60)]
    files.write([line("ok.vn", "2026-01-04", 100), *invented], routed=ROUTED)
    files.write([line("ok.vn", "2026-01-05", 101), line("stranger-0.vn", "2026-01-05", 61)], routed=ROUTED)
    # The routes change: a domain that gains one gets its own directory from then on.
    files.write([line("stranger-0.vn", "2026-01-05", 62)], routed=ROUTED | {"stranger-0.vn"})
    housekeep(files)
    files.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [UNROUTED, "ok_vn", "stranger-0_vn"]
    unrouted = tmp_path / UNROUTED
    assert (unrouted / ".domain").read_text() == f"{UNROUTED}\n"
    # The usual rotation: parts rolled at max_file_size, compressed, at most max_backups kept.
    closed = [f for f in log_files(unrouted) if f.compressed]
    assert closed and len(closed) <= 2
    assert all(f.path.stat().st_size <= 1000 for f in log_files(unrouted) if not f.compressed)
    assert all_lines(unrouted, "2026-01-05") == [61]
    assert all_lines(tmp_path / "stranger-0_vn", "2026-01-05") == [62]
    # Each line still says which domain it was about.
    with (unrouted / "2026-01-05.log").open() as lines:
        assert [json.loads(raw)["domain"] for raw in lines] == ["stranger-0.vn"]
    listed = {d.sanitized: d for d in logged_domains(tmp_path)}
    assert listed[UNROUTED].domain == UNROUTED and listed[UNROUTED].dates == ["2026-01-05", "2026-01-04"]


async def test_lines_waiting_for_the_disk_are_bounded_in_bytes_not_only_in_lines(tmp_path: Path, monkeypatch):
    # Each line carries its event (up to 1 MiB): 16,384 waiting lines could hold 16 GiB
    # while the writer is slow (compressing a day's 500 MB); beyond the budget they are dropped.
    monkeypatch.setattr(log_writer, "MAX_WAITING_BYTES", 3_000_000)
    send, receive = trio.open_memory_channel[DomainLogLine](16384)
    router = DomainLogRouter()
    router.attach(send)
    payload = b'"%b"' % (b"x" * 1_000_000)
    sent = 0
    for n in range(5):
        record = {"domain": "ok.vn", "event_id": f"e-{n}", "level": "info", "timestamp": "2026-01-04T10:00:00Z"}
        try:
            router(None, "info", record | {"payload": payload})
        except structlog.DropEvent:  # handed to the writer (not for stdout)
            sent += 1
    assert (sent, router.dropped) == (2, 3)
    writer = LogWriter(receive, DomainLogFiles(tmp_path, LoggingConfig()), router, open_routes({"ok.vn": ()}))
    send.close()
    await writer.run()  # writes what waits, then ends: its inbox is closed
    assert router.waiting_bytes == 0
    assert len((tmp_path / "ok_vn" / "2026-01-04.log").read_bytes().splitlines()) == 2


class ObservedFiles(DomainLogFiles):
    """The real files, saying on the trio thread each time a write or a housekeeping call has ended."""

    def __init__(self, root: Path, config: LoggingConfig) -> None:
        super().__init__(root, config)
        self._ended_send, self._ended = trio.open_memory_channel[None](math.inf)

    def write(self, lines: list[DomainLogLine], routed: Container[str]) -> None:
        super().write(lines, routed)
        trio.from_thread.run_sync(self._ended_send.send_nowait, None)

    def housekeep(self, names: Collection[str] | None, stop: threading.Event) -> None:
        super().housekeep(names, stop)
        trio.from_thread.run_sync(self._ended_send.send_nowait, None)

    async def until(self, holds: Callable[[], bool]) -> None:
        """Until ``holds()``: looked at again after each write and each housekeeping call."""
        while not holds():
            await self._ended.receive()


async def test_lines_are_written_while_a_closed_day_is_compressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Regression: the writer's own thread compressed each file it closed (a day's 500 MB takes tens
    # of seconds, and at midnight every domain's closes at once); the lines waited meanwhile, and
    # beyond the queue's bounds they were dropped.
    compressing, may_finish = trio.Event(), threading.Event()
    compress = log_writer._compress

    def held_compress(path: Path, *args) -> None:
        trio.from_thread.run_sync(compressing.set)
        may_finish.wait(15)  # bounded: a writer stuck here (the bug) must not hang the test
        compress(path, *args)

    monkeypatch.setattr(log_writer, "_compress", held_compress)
    send, receive = trio.open_memory_channel[DomainLogLine](100)
    files = ObservedFiles(tmp_path, LoggingConfig())
    writer = LogWriter(receive, files, DomainLogRouter(), open_routes({"ok.vn": ()}))
    directory = tmp_path / "ok_vn"
    try:
        with trio.fail_after(10):  # a guard: before, the third line waited for the compression
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await send.send(line("ok.vn", "2026-01-04", 1))
                await send.send(line("ok.vn", "2026-01-05", 2))  # the 4th is closed, and compressed
                await compressing.wait()
                await send.send(line("ok.vn", "2026-01-05", 3))
                await files.until(lambda: all_lines(directory, "2026-01-05") == [2, 3])
                written_while_compressing = not may_finish.is_set()
                may_finish.set()
                await files.until(lambda: not (directory / "2026-01-04.log").exists())
                send.close()
    finally:
        may_finish.set()
    assert written_while_compressing
    assert [f.path.name for f in log_files(directory)] == ["2026-01-04.log.gz", "2026-01-05.log"]
    assert all_lines(directory, "2026-01-04") == [1]


async def test_a_day_that_ended_while_the_service_was_stopped_is_compressed_at_the_next_start(tmp_path: Path):
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    files = DomainLogFiles(tmp_path, LoggingConfig())
    files.write([line("ok.vn", yesterday, 1)], routed=ROUTED)
    files.close()  # stopped yesterday, started again today
    send, receive = trio.open_memory_channel[DomainLogLine](10)
    restarted = ObservedFiles(tmp_path, LoggingConfig())
    writer = LogWriter(receive, restarted, DomainLogRouter(), open_routes({"ok.vn": ()}))
    directory = tmp_path / "ok_vn"
    with trio.fail_after(10):  # a guard: before, it was never compressed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await restarted.until(lambda: not (directory / f"{yesterday}.log").exists())
            send.close()
    assert [f.path.name for f in log_files(directory)] == [f"{yesterday}.log.gz"]
    assert all_lines(directory, yesterday) == [1]
