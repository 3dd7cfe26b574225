"""The per-domain log files: their layout on disk, and reading them back.

```
logs/<sanitized domain>/.domain              the domain itself (one line)
logs/<sanitized domain>/2026-01-04.log       the day being written (UTC)
logs/<sanitized domain>/2026-01-04.1.log.gz  earlier parts of that day, rolled at the size limit
logs/<sanitized domain>/2026-01-03.log.gz    a closed day
logs/_unrouted/...                           the same, for every domain without a route
```

A day's lines are its numbered parts in order, then its day file. The writer
is ``actors.log_writer``; this module is what both sides agree on.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.events import InvalidEvent, normalize_domain, outcome_record

DOMAIN_FILE = ".domain"
# The one directory of all domains without a route. sanitize_domain never gives
# it: without "+", a name comes from a domain with no "_" whose dots became "_",
# and no domain starts with "." (every label needs a letter or digit); a domain
# with "_" in it gets "+<hash>" appended.
UNROUTED = "_unrouted"
_FILE_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.log(\.gz)?")
_SANITIZED = re.compile(r"[a-z0-9_+-]{1,280}")

SUCCEEDED = "Event forwarded successfully"
FAILED = "Failed to forward event"


@functools.lru_cache(maxsize=4096)  # the log writer asks for every line's
def sanitize_domain(domain: str) -> str:
    """The directory name of ``domain``: ``example.com`` → ``example_com``.

    Always one safe path component: the domain is validated first (so no ``/``,
    ``\\``, NUL, ``..``, empty label or empty name gets through) and its dots
    become underscores. A domain that already contains ``_`` gets a ``+`` and
    a hash of itself appended (``+`` never occurs in a domain), so distinct
    domains never share a directory (``a_b.vn`` and ``a.b.vn`` differ) and
    none gets ``UNROUTED``'s.
    """
    normalized = normalize_domain(domain)
    name = normalized.replace(".", "_")
    if "_" in normalized:
        name += "+" + hashlib.sha256(normalized.encode()).hexdigest()[:16]
    return name


@dataclass(frozen=True, order=True, slots=True)
class LogFile:
    """One file of a domain's log, ordered as its lines were written."""

    day: str  # YYYY-MM-DD
    part: int  # 1, 2, … for parts rolled at the size limit; the day file itself sorts last
    path: Path

    @property
    def compressed(self) -> bool:
        return self.path.suffix == ".gz"


DAY_FILE_PART = 1 << 30


def log_files(directory: Path) -> list[LogFile]:
    """A domain directory's log files, oldest first.

    A file and its gzip both there (compressed a moment ago, or the writer killed
    before it removed the file) hold the same lines: the file is listed, once.
    """
    files: dict[tuple[str, int], LogFile] = {}
    for path in directory.iterdir():
        match = _FILE_NAME.fullmatch(path.name)
        if match and path.is_file():
            day, part, compressed = match.groups()
            found = LogFile(day, int(part) if part else DAY_FILE_PART, path)
            if not compressed or (found.day, found.part) not in files:
                files[found.day, found.part] = found
    return sorted(files.values())


def open_lines(log_file: LogFile) -> IO[bytes]:
    return gzip.open(log_file.path, "rb") if log_file.compressed else log_file.path.open("rb")


@dataclass(frozen=True, slots=True)
class LoggedDomain:
    domain: str
    sanitized: str
    dates: list[str]  # newest first


def logged_domains(root: Path) -> list[LoggedDomain]:
    """Every domain with a log directory under ``root``, with the days it has files for."""
    if not root.is_dir():
        return []
    domains = []
    for directory in sorted(root.iterdir()):
        if not directory.is_dir() or not _SANITIZED.fullmatch(directory.name):
            continue
        try:
            domain = (directory / DOMAIN_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            domain = directory.name.replace("_", ".")
        dates = sorted({log_file.day for log_file in log_files(directory)}, reverse=True)
        domains.append(LoggedDomain(domain, directory.name, dates))
    return domains


def domain_directory(root: Path, requested: str) -> Path | None:
    """The existing log directory for ``requested`` (a sanitized name or a domain), else None.

    Only names that ``sanitize_domain`` can produce are looked up, so no value
    can reach outside ``root``.
    """
    candidates = []
    if _SANITIZED.fullmatch(requested):
        candidates.append(requested)
    try:
        candidates.append(sanitize_domain(requested))
    except InvalidEvent:
        pass
    for name in candidates:
        directory = root / name
        if directory.is_dir():
            return directory
    return None


def _as_record(line: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    succeeded = line.get("msg") == SUCCEEDED
    record = outcome_record(
        line,
        at=line.get("timestamp"),
        delivery_attempt=line.get("delivery_attempt"),
        errors=None if succeeded else (line.get("errors") or {}),
        max_deliveries=line.get("max_deliveries"),
        will_retry=line.get("will_retry"),
    )
    if "payload" in line:
        record["event"] = line["payload"]
    return ("successful" if succeeded else "failed"), record


def _day_lines(directory: Path, day: str) -> Iterator[dict[str, Any]]:
    for log_file in log_files(directory):
        if log_file.day != day:
            continue
        with open_lines(log_file) as lines:
            for raw in lines:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # a line cut short by a crash: skip it, keep reading
                if isinstance(line, dict):
                    yield line


def read_day(directory: Path, day: str, *, kind: str, offset: int, limit: int) -> dict[str, Any]:
    """A day's forwarding outcomes from its files, newest first, as ``/api/logs`` shows them.

    Streams the files line by line, keeping at most ``offset + limit`` records
    in memory, so a day of any size can be read. Counts cover the whole day.
    """
    totals = {"total_successful": 0, "total_failed": 0, "retry_count": 0}
    newest: deque[tuple[str, dict[str, Any]]] = deque(maxlen=offset + limit)
    matched = 0
    for line in _day_lines(directory, day):
        if line.get("msg") not in (SUCCEEDED, FAILED):
            continue
        outcome, record = _as_record(line)
        totals["total_successful" if outcome == "successful" else "total_failed"] += 1
        if isinstance(record["delivery_attempt"], int) and record["delivery_attempt"] > 1:
            totals["retry_count"] += 1
        if kind in (outcome, "all"):
            matched += 1
            newest.append((outcome, record))
    page = list(reversed(newest))[offset:]
    successful: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, list[dict[str, Any]]] = {}
    for outcome, record in page:
        (successful if outcome == "successful" else failed).setdefault(str(record["domain"]), []).append(record)
    return {
        "events_by_domain": successful,
        "failed_events_by_domain": failed,
        "stats": totals,
        "total": matched,
        "offset": offset,
        "limit": limit,
    }
