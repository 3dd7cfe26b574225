"""The service's process tree, read from /proc: CPU time and memory by role.

The service is one Python process; the embedded nats-server is its child. Both
do the work of an event (the service ingests and forwards, nats-server stores
and delivers), so the bench counts the whole tree and names each part: a
process whose name is ``nats-server`` is "nats-server", every other process in
the tree (the service itself, anything else it starts) is "service".

A process that exits between two readings takes its CPU time with it (the
parent only inherits it once it reaps the child); the service's children live
as long as it does, so nothing is lost in practice.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("service", "nats-server")


def _children(pid: int) -> list[int]:
    """Direct children, from each thread's ``children`` list (any thread may have forked)."""
    found: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in listing.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def _children_by_parent_pid(pid: int) -> list[int]:
    """Direct children, by scanning every process's parent (kernels without CONFIG_PROC_CHILDREN)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children = _children if Path(f"/proc/{root}/task/{root}/children").exists() else _children_by_parent_pid
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids


def role(pid: int) -> str:
    return "nats-server" if Path(f"/proc/{pid}/comm").read_text().strip() == "nats-server" else "service"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included, reaped children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_by_process(root: int) -> dict[int, tuple[str, float]]:
    """pid → (role, CPU seconds so far) for every process in the tree."""
    found = {}
    for pid in descendants(root):
        try:
            found[pid] = (role(pid), cpu_seconds(pid))
        except OSError:  # exited meanwhile
            continue
    return found


class CpuMeter:
    """CPU used by the tree since it was created, by role.

    Synopsis::

        meter = CpuMeter(service.pid)
        ...  # the load
        meter.used()  # {"service": 12.1, "nats-server": 3.4}
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.start = cpu_by_process(root)

    def used(self) -> dict[str, float]:
        used = dict.fromkeys(ROLES, 0.0)
        for pid, (name, seconds) in cpu_by_process(self.root).items():
            used[name] += seconds - self.start.get(pid, (name, 0.0))[1]
        return {name: round(seconds, 3) for name, seconds in used.items()}


def memory_mb(root: int, key: str) -> dict[str, float]:
    """A /proc/<pid>/status figure (``VmRSS`` now, ``VmHWM`` peak) summed by role, in MB.

    Summed peaks (``VmHWM``) are an upper bound of the tree's peak: the
    processes need not peak at the same moment.
    """
    total = dict.fromkeys(ROLES, 0.0)
    for pid in descendants(root):
        try:
            name = role(pid)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total[name] += int(line.split()[1]) / 1024
        except OSError:
            continue
    return {name: round(mb, 1) for name, mb in total.items()}
