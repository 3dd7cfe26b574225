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
    Metric("e2e p99 ms after the first second", named("e2e_p99_after_1s_ms")),
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
# The tenants scenario (bench/tenants.py): one table, a column per tenant count.
TENANTS_METRICS = (
    Metric("rate of phases 3 and 4, events/s", named("rate"), 0),
    Metric("start → /health 200 ok, s", named("healthy_s"), 2),
    Metric("consumers after the start", named("consumers_after_start"), 0),
    Metric("idle CPU % of a core: service (Python)", named("idle_cpu_pct_service"), 1),
    Metric("idle CPU % of a core: nats-server", named("idle_cpu_pct_nats"), 1),
    Metric("idle RSS MB: service (Python)", named("idle_rss_mb_service")),
    Metric("idle RSS MB: nats-server", named("idle_rss_mb_nats")),
    Metric("consumers after idle", named("consumers_after_idle"), 0),
    Metric("one event each: accepted", named("one_each_accepted"), 0),
    Metric("one event each: domains without their event", named("one_each_domains_short"), 0),
    Metric("one event each: POST p99 ms", named("one_each_post_p99_ms")),
    Metric("one event each: e2e p50 ms", named("one_each_e2e_p50_ms")),
    Metric("one event each: e2e p99 ms", named("one_each_e2e_p99_ms")),
    Metric(
        "one event each: CPU s per 1,000 events: service (Python)", named("one_each_cpu_s_per_1000_events_service"), 2
    ),
    Metric("one event each: CPU s per 1,000 events: nats-server", named("one_each_cpu_s_per_1000_events_nats"), 2),
    Metric("consumers after one event each", named("consumers_after_one_each"), 0),
    Metric("hang: events sent (all domains)", named("hang_sent"), 0),
    Metric("hang: events accepted", named("hang_accepted"), 0),
    Metric("hang: other domains short of their events", named("hang_domains_short"), 0),
    Metric("hang: POST p99 ms", named("hang_post_p99_ms")),
    Metric("hang: others' e2e p50 ms", named("hang_e2e_p50_ms")),
    Metric("hang: others' e2e p99 ms", named("hang_e2e_p99_ms")),
    Metric("hang: events to the hanging domain", named("hang_stuck_sent"), 0),
    Metric("hang: requests the hanging sink received", named("hang_stuck_received"), 0),
    Metric("hang: CPU s per 1,000 events: service (Python)", named("cpu_s_per_1000_events_service"), 2),
    Metric("hang: CPU s per 1,000 events: nats-server", named("cpu_s_per_1000_events_nats"), 2),
    Metric("hang: CPU s per 1,000 events: both", named("cpu_s_per_1000_events_total"), 2),
    Metric("consumers after the hang phase", named("consumers_after_hang"), 0),
    Metric("peak RSS MB over the run: service (Python)", named("peak_rss_mb_service")),
    Metric("peak RSS MB over the run: nats-server", named("peak_rss_mb_nats")),
)
MEMORY_METRICS = (
    Metric("memory: events", named("events"), 0),
    Metric("memory: RSS MB at half (service + nats-server)", named("rss_at_half_mb")),
    Metric("memory: RSS MB at the end (service + nats-server)", named("rss_at_end_mb")),
)


def tenant_counts(results: Results) -> list[int]:
    """The tenant counts the tenants scenario ran at (its results are named ``tenants_<count>``)."""
    return sorted(int(name.removeprefix("tenants_")) for name in results if name.startswith("tenants_"))


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
        if name != "memory" and not name.startswith("tenants_"):
            rows.append(_row([name, *(cell(values(runs, m.get), m.digits) for m in METRICS)]))
    return "\n".join(rows)


def process_table(results: Results) -> str:
    """CPU and peak RSS of the service's process tree: the service, nats-server, and both."""
    rows = ["| scenario | process | CPU s per 1,000 events | peak RSS MB |", "|---|---|---|---|"]
    for name, runs in results.items():
        if "peak_rss_mb_total" not in runs[0] or name.startswith("tenants_"):
            continue
        for label, suffix in PROCESSES:
            cpu = cell(values(runs, named(f"cpu_s_per_1000_events_{suffix}")), 2)
            rows.append(_row([name, label, cpu, cell(values(runs, named(f"peak_rss_mb_{suffix}")), 1)]))
    return "\n".join(rows)


def tenants_table(results: Results) -> str:
    """The tenants scenario's figures, one column per tenant count ("" if it did not run)."""
    counts = tenant_counts(results)
    if not counts:
        return ""
    rows = [_row(["figure", *(f"{count:,} domains" for count in counts)]), "|---" * (len(counts) + 1) + "|"]
    for metric in TENANTS_METRICS:
        cells = [cell(values(results[f"tenants_{count}"], metric.get), metric.digits) for count in counts]
        rows.append(_row([metric.label, *cells]))
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
        for metric in (*METRICS, *SPLIT_METRICS, *MEMORY_METRICS, *TENANTS_METRICS):
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


def _cores(run: dict, process: str) -> str:
    """A fixed-rate run's CPU of ``process`` (service, nats or total) as a share of one core."""
    return f"{run[f'cpu_s_per_1000_events_{process}'] * run['rate'] / 1000:.2f}"


def _hang_ratio(domains: int, runs: list[dict]) -> Verdict:
    """Issue 16's isolation target, on medians: the p99 with a hanging domain ≤ 1.2 × the p99 without."""
    target = f"{domains} domains: median e2e p99 with a hanging domain ≤ 1.2 × the median without (issue 16)"
    if any(run.get("p99_without_hang_ms") is None for run in runs):
        return Verdict(target, [], None, "not judged: a run without its pair")
    with_hang = statistics.median(run["e2e_p99_ms"] for run in runs)
    without = statistics.median(run["p99_without_hang_ms"] for run in runs)
    # Saturated (p99 over 50 ms without the hanging domain), both p99s are mostly queueing time.
    saturated = ", saturated" if without > 50 else ""
    # Shown beside the verdict, not judged: three p99s of a few ms a side move more between rounds
    # than 1.2 ×, and each round's own ratio, compared over many rounds, tells more (bench/RESULTS.md).
    by_round = [run["e2e_p99_ms"] / run["p99_without_hang_ms"] for run in runs]
    figures = [
        f"{without:.1f} → {with_hang:.1f} ms: {with_hang / without:.2f} ×{saturated} (round by round "
        f"{' · '.join(f'{ratio:.2f}' for ratio in by_round)}, geometric mean {statistics.geometric_mean(by_round):.2f})"
    ]
    if with_hang <= 1.2 * without:
        return Verdict(target, figures, True, "met")
    return Verdict(target, figures, False, "not met")


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
    for name, domains in (("isolation", 20), ("isolation_100", 100)):
        if runs := results.get(f"{name}_with_hang"):
            found.append(
                _judge(
                    f"{domains} domains at {runs[0]['rate']:g}/s: the others' e2e p99 ≤ 50 ms without and with "
                    "a hanging domain (issue 16)",
                    runs,
                    "p99_without_hang_ms",
                    lambda r: f"{r['p99_without_hang_ms']:.1f} → {r['e2e_p99_ms']:.1f} ms ({r['p99_increase']:+.1%})",
                    lambda r: r["p99_without_hang_ms"] <= 50 and r["e2e_p99_ms"] <= 50,
                )
            )
            found.append(_hang_ratio(domains, runs))
    if runs := results.get("isolation_without_hang"):
        # Issue 16's table measured the service's own process (its nats-server apart): so is this
        # judged; the figure adds the server's share, and both together.
        found.append(
            _judge(
                f"20 domains at {runs[0]['rate']:g}/s: CPU of the service ≤ half a core (issue 16; "
                "in brackets its nats-server's and both)",
                runs,
                "cpu_s_per_1000_events_service",
                lambda r: f"{_cores(r, 'service')} of a core ({_cores(r, 'nats')}; both {_cores(r, 'total')})",
                lambda r: r["cpu_s_per_1000_events_service"] * r["rate"] / 1000 <= 0.5,
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
    found += tenants_verdicts(results)
    return found


def _ms(value: float | None) -> str:
    return "none delivered" if value is None else f"{value:,.1f} ms"


def tenants_verdicts(results: Results) -> list[Verdict]:
    """Issue 15's targets, at every tenant count that ran (the issue states them for 10,000 domains)."""
    counts = tenant_counts(results)
    found = []
    if counts and 10000 not in counts:
        found.append(Verdict("issue 15's targets at 10,000 domains", [], None, "not judged: 10,000 not run"))
    for count in counts:
        runs = results[f"tenants_{count}"]
        rate = f"{runs[0]['rate']:g}/s"
        found += [
            _judge(
                f"{count:,} domains: /health 200 ok ≤ 10 s after the process starts",
                runs,
                "healthy_s",
                lambda r: f"{r['healthy_s']:.2f} s",
                lambda r: r["healthy_s"] <= 10,
            ),
            _judge(
                f"{count:,} domains: idle CPU of the service ≤ 5 % of a core (nats-server shown, not judged)",
                runs,
                "idle_cpu_pct_service",
                lambda r: f"{r['idle_cpu_pct_service']:.1f} % (nats-server {r['idle_cpu_pct_nats']:.1f} %)",
                lambda r: r["idle_cpu_pct_service"] <= 5,
            ),
            _judge(
                f"{count:,} domains: RSS of the service at idle ≤ 300 MB (its peak over the run shown)",
                runs,
                "idle_rss_mb_service",
                lambda r: f"{r['idle_rss_mb_service']:.0f} MB (peak {r['peak_rss_mb_service']:.0f} MB)",
                lambda r: r["idle_rss_mb_service"] <= 300,
            ),
            _judge(
                f"{count:,} domains: one event to each ({rate}), every domain gets it, e2e p99 ≤ 1 s",
                runs,
                "one_each_all_delivered",
                lambda r: f"{_ms(r['one_each_e2e_p99_ms'])}, {r['one_each_domains_short']:,} without",
                lambda r: (
                    r["one_each_all_delivered"]
                    and r["one_each_e2e_p99_ms"] is not None
                    and r["one_each_e2e_p99_ms"] <= 1000
                ),
            ),
            _judge(
                f"{count:,} domains: {rate} with one more domain hanging, every other event delivered, "
                "their e2e p99 ≤ 100 ms",
                runs,
                "hang_all_delivered",
                lambda r: f"{_ms(r['hang_e2e_p99_ms'])}, {r['hang_domains_short']:,} domains short",
                lambda r: r["hang_all_delivered"] and r["hang_e2e_p99_ms"] is not None and r["hang_e2e_p99_ms"] <= 100,
            ),
        ]
    return found


def verdict_table(found: list[Verdict]) -> str:
    rows = ["| target (every run must meet it) | each run | verdict |", "|---|---|---|"]
    return "\n".join(rows + [verdict.row() for verdict in found])
