"""The bench's runs as text: medians and spreads, the tables bench/RESULTS.md quotes, the verdicts.

A cell is the median of the runs and their spread, ``1,436 (1,311–1,507)``; a
target is met only when every run meets it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

# A scenario's runs, in the order they ran (one per round).
Results = dict[str, list[dict]]


@dataclass(frozen=True)
class Metric:
    label: str
    get: Callable[[dict], float | None]
    digits: int = 1


def named(name: str) -> Callable[[dict], float | None]:
    return lambda run: run.get(name)


METRICS = (
    Metric("accepted/s", lambda run: run.get("accepted_per_s", run.get("requests_per_s"))),
    # At maximum rate, events that reached both sinks during the load; at a fixed
    # rate, the rate times the share delivered (a hanging domain's share never is).
    Metric("forwarded/s", lambda run: run.get("forwarded_during_load_per_s", run.get("delivered_per_s"))),
    Metric("ratio to baseline", named("ratio_to_baseline"), 3),
    Metric("POST p99 ms", named("post_p99_ms")),
    Metric("e2e p50 ms", named("e2e_p50_ms")),
    Metric("e2e p90 ms", named("e2e_p90_ms")),
    Metric("e2e p99 ms", named("e2e_p99_ms")),
    Metric("CPU s per 1,000 events (service + nats-server)", named("cpu_s_per_1000_events_total"), 2),
    Metric("peak RSS MB (service + nats-server)", named("peak_rss_mb_total")),
    Metric("backlog at end", named("backlog_at_end_of_load"), 0),
)
PROCESSES = (("service (Python)", "service"), ("nats-server", "nats"), ("both", "total"))
SPLIT_METRICS = tuple(
    metric
    for label, suffix in PROCESSES[:2]
    for metric in (
        Metric(f"CPU s per 1,000 events: {label}", named(f"cpu_s_per_1000_events_{suffix}"), 2),
        Metric(f"peak RSS MB: {label}", named(f"peak_rss_mb_{suffix}")),
    )
)
MEMORY_METRICS = (
    Metric("memory: events", named("events"), 0),
    Metric("memory: RSS MB at half (service + nats-server)", named("rss_at_half_mb")),
    Metric("memory: RSS MB at the end (service + nats-server)", named("rss_at_end_mb")),
)


def values(runs: list[dict], get: Callable[[dict], float | None]) -> list[float]:
    return [value for run in runs if (value := get(run)) is not None]


def cell(found: list[float], digits: int) -> str:
    """``median (min–max)``; just the number when every run gave the same."""
    if not found:
        return ""
    low, middle, high = min(found), statistics.median(found), max(found)
    text = f"{middle:,.{digits}f}"
    return text if low == high else f"{text} ({low:,.{digits}f}–{high:,.{digits}f})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(results: Results) -> str:
    """One row per scenario, each number the median and spread of its runs."""
    rows = [_row(["scenario", *(metric.label for metric in METRICS)]), "|---" * (len(METRICS) + 1) + "|"]
    for name, runs in results.items():
        if name != "memory":
            rows.append(_row([name, *(cell(values(runs, m.get), m.digits) for m in METRICS)]))
    return "\n".join(rows)


def process_table(results: Results) -> str:
    """CPU and peak RSS of the service's process tree: the service, nats-server, and both."""
    rows = ["| scenario | process | CPU s per 1,000 events | peak RSS MB |", "|---|---|---|---|"]
    for name, runs in results.items():
        if "peak_rss_mb_total" not in runs[0]:
            continue
        for label, suffix in PROCESSES:
            cpu = cell(values(runs, named(f"cpu_s_per_1000_events_{suffix}")), 2)
            rows.append(_row([name, label, cpu, cell(values(runs, named(f"peak_rss_mb_{suffix}")), 1)]))
    return "\n".join(rows)


def memory_lines(results: Results) -> str:
    lines = []
    for n, m in enumerate(results.get("memory", []), 1):
        lines.append(
            f"Memory, run {n}: {m['events']:,} events over 50 domains x 2 endpoints; RSS of service + nats-server "
            f"{m['rss_at_half_mb']} MB at half, {m['rss_at_end_mb']} MB at the end "
            f"(service {m['rss_at_end_mb_service']}, nats-server {m['rss_at_end_mb_nats']}); "
            f"peak {m['peak_rss_mb_total']} MB (sum of each process's peak)."
        )
    return "\n".join(lines)


def ab_table(a: Results, b: Results, labels: tuple[str, str]) -> str:
    """Every figure of A and B side by side, with the ratio of their medians (B / A)."""
    rows = [_row(["scenario", "figure", labels[0], labels[1], "B / A (medians)"]), "|---|---|---|---|---|"]
    for name in dict.fromkeys([*a, *b]):
        for metric in (*METRICS, *SPLIT_METRICS, *MEMORY_METRICS):
            found_a, found_b = values(a.get(name, []), metric.get), values(b.get(name, []), metric.get)
            if not found_a and not found_b:
                continue
            ratio = ""
            if found_a and found_b and statistics.median(found_a):
                ratio = f"{statistics.median(found_b) / statistics.median(found_a):.3f}"
            rows.append(_row([name, metric.label, cell(found_a, metric.digits), cell(found_b, metric.digits), ratio]))
    return "\n".join(rows)


@dataclass(frozen=True)
class Verdict:
    target: str
    figures: list[str]  # each run's, in order
    met: bool | None  # None: not judged
    why: str

    def row(self) -> str:
        return _row([self.target, " · ".join(self.figures), f"**{self.why}**" if self.met is False else self.why])


def _judge(
    target: str, runs: list[dict], needs: str, figure: Callable[[dict], str], passes: Callable[[dict], bool]
) -> Verdict:
    if any(run.get(needs) is None for run in runs):
        return Verdict(target, [], None, f"not judged: no {needs} (its scenario did not run)")
    missed = sum(not passes(run) for run in runs)
    figures = [figure(run) for run in runs]
    if missed:
        return Verdict(target, figures, False, f"not met: {missed} of {len(runs)} runs miss it")
    return Verdict(target, figures, True, f"met in all {len(runs)} runs")


def verdicts(results: Results) -> list[Verdict]:
    """The targets bench/RESULTS.md states, judged on every run of the scenarios that ran."""
    found = []
    if runs := results.get("ingest_only"):
        found.append(
            _judge(
                "ingest ≥ 0.8 × baseline",
                runs,
                "ratio_to_baseline",
                lambda r: f"{r['ratio_to_baseline']:.3f}",
                lambda r: r["ratio_to_baseline"] >= 0.8,
            )
        )
    for name in ("full_1x2", "full_200x2"):
        if runs := results.get(name):
            found.append(
                _judge(
                    f"{name}: forwarded during load ≥ 0.6 × baseline, backlog flat (≤ 1 s of forwarding at the end)",
                    runs,
                    "ratio_to_baseline",
                    lambda r: f"{r['ratio_to_baseline']:.3f}, backlog {r['backlog_at_end_of_load']:+,}",
                    lambda r: (
                        r["ratio_to_baseline"] >= 0.6
                        and r["backlog_at_end_of_load"] <= r["forwarded_during_load_per_s"]
                    ),
                )
            )
    if runs := results.get("fixed_rate"):
        found.append(
            _judge(
                f"e2e p99 ≤ 50 ms at the fixed rate ({runs[0]['rate']:g}/s)",
                runs,
                "e2e_p99_ms",
                lambda r: f"{r['e2e_p99_ms']:.1f} ms",
                lambda r: r["e2e_p99_ms"] <= 50,
            )
        )
    if runs := results.get("isolation_with_hang"):
        found.append(
            _judge(
                # Saturated, both p99s are queueing time and their ratio says nothing about isolation.
                "a hanging domain raises the others' e2e p99 by ≤ 20 % (and the run is not saturated: "
                "p99 ≤ 50 ms without the hanging domain)",
                runs,
                "p99_increase",
                lambda r: (
                    f"{r['p99_increase']:+.1%} ({r['p99_without_hang_ms']:.1f} → {r['e2e_p99_ms']:.1f} ms)"
                    + (", saturated" if r["p99_without_hang_ms"] > 50 else "")
                ),
                lambda r: r["p99_increase"] <= 0.2 and r["p99_without_hang_ms"] <= 50,
            )
        )
    if runs := results.get("memory"):
        verdict = _judge(
            "peak RSS (service + nats-server) ≤ 250 MB after 1,000,000 events, no growth from 500,000 on (≤ 2 %)",
            runs,
            "peak_rss_mb_total",
            lambda r: f"{r['peak_rss_mb_total']} MB; {r['rss_at_half_mb']} → {r['rss_at_end_mb']} MB",
            lambda r: r["peak_rss_mb_total"] <= 250 and r["rss_at_end_mb"] <= r["rss_at_half_mb"] * 1.02,
        )
        if min(run["events"] for run in runs) < 1_000_000:
            verdict = Verdict(verdict.target, verdict.figures, None, "not judged: fewer than 1,000,000 events")
        found.append(verdict)
    return found


def verdict_table(found: list[Verdict]) -> str:
    rows = ["| target (every run must meet it) | each run | verdict |", "|---|---|---|"]
    return "\n".join(rows + [verdict.row() for verdict in found])
