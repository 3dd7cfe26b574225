"""The load benchmark: the service against its bare-stack baseline, measured in one run.

Run from the project root (wrk from Debian's package: found on the PATH, or installed with apt-get):

    python bench/run.py                 # every scenario but tenants, 3 times, 10 s each
    python bench/run.py --runs 5 --only baseline full_1x2
    python bench/run.py --seconds 20 --memory-events 1000000
    python bench/run.py --service-config 'forwarding: {max_in_flight_per_domain: 32}'
    python bench/run.py --ab 'forwarding: {max_in_flight_per_domain: 32}' \
                             'forwarding: {max_in_flight_per_domain: 64}'
    python bench/run.py --only tenants                 # 100, 1,000 and 10,000 routed domains
    python bench/run.py --only tenants --tenants 100 300 --runs 1 --seconds 3

``given_up`` sends ``GIVEN_UP_RATE`` events/s to a domain whose backend never
answers, with a short timeout, ack_wait and one delivery, and waits until each
is a dead letter: the CPU an event costs when its tenant's backend is dead.

``tenants`` (issue 15, bench/tenants.py says what it measures) runs only when
named in ``--only`` or given sizes with ``--tenants``: it takes minutes per
size. For each tenant count it prints its own table, one column per count.

Every selected scenario runs ``--runs`` times, in rounds (each round runs every
scenario once), so a slow minute of the machine does not land on one scenario
only. Each number printed is the median of the runs and their spread,
``1,436 (1,311–1,507)``; ratios to the baseline are taken run by run against the
baseline of the same round. CPU and peak RSS are the service's whole process
tree: the service itself and its embedded nats-server, each on its own line
and summed. A target counts as met only when every run meets it.

``--service-config`` merges YAML into every run's service configuration.
``--ab`` runs each scenario with A's and then B's YAML merged in (the order
alternating from round to round) and prints both columns with the ratio of
their medians; the scenarios that run no service (the baselines, sink ceiling) run
once per round and are shared by both columns.

Prints the tables and the verdicts, and writes every run's raw numbers as
JSON to bench/results/; ``--report FILE`` prints a saved file's tables and
verdicts again. Every process runs on this machine over loopback: wrk
or bench/paced.py → the service (embedded NATS) → bench/sink.py webhook sinks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import proctree
import report
import tenants
import yaml
from harness import (
    HERE,
    drain,
    ensure_wrk,
    free_port,
    merged,
    paced,
    percentile,
    start_service,
    start_sink,
    stop,
    tree_figures,
    wait_http,
    wrk,
)

SCENARIOS = (
    "sink_ceiling",
    "baseline",
    "baseline_paced",
    "ingest_only",
    "full_1x2",
    "full_200x2",
    "fixed_rate",
    "isolation",
    "isolation_100",
    "given_up",
    "tenants",
)
# The isolation scenarios: events spread over this many domains, then the same with one more that hangs.
ISOLATION_DOMAINS = {"isolation": 20, "isolation_100": 100}
# given_up: events/s to a domain whose backend never answers, each given up after one attempt.
GIVEN_UP_RATE = 100
GIVEN_UP_CONFIG = {"forwarding": {"timeout_seconds": 0.5}, "nats": {"ack_wait_seconds": 1, "max_deliveries": 1}}
# They start no service: run once per round, the same runs in both columns of an A/B.
WITHOUT_SERVICE = ("sink_ceiling", "baseline", "baseline_paced")
# Run only when asked for by name (or, for tenants, by --tenants): they take minutes.
OPT_IN = ("tenants",)
# The scenarios that load the service with wrk (the others use bench/paced.py).
WITH_WRK = ("sink_ceiling", "baseline", "ingest_only", "full_1x2", "full_200x2", "memory")


def start_baseline(processes: list) -> tuple[subprocess.Popen, str]:
    """bench/baseline_app.py on a free port, answering; returns it and its URL."""
    port = free_port()
    baseline = subprocess.Popen([sys.executable, str(HERE / "baseline_app.py"), str(port)], stderr=subprocess.DEVNULL)
    processes.append(baseline)
    wait_http(f"http://127.0.0.1:{port}/", process=baseline)
    return baseline, f"http://127.0.0.1:{port}"


def baseline_paced(seconds: float, rate: float, processes: list) -> dict:
    """The baseline at the isolation scenario's load (``rate`` over 20 domains): what HTTP alone costs there."""
    baseline, url = start_baseline(processes)
    meter = proctree.CpuMeter(baseline.pid)
    load = paced(url, rate, seconds, [f"tenant-{n}.example.vn" for n in range(ISOLATION_DOMAINS["isolation"])])
    cpu = meter.used()["service"]
    stop(baseline)
    return {
        "rate": rate,
        "accepted_per_s": round(rate * load["accepted"] / max(load["sent"], 1), 1),
        "post_p99_ms": round(load["post_p99_ms"], 2),
        "cpu_s_per_1000_events_service": round(cpu / max(load["accepted"], 1) * 1000, 2),
        "cpu_s_per_1000_events_total": round(cpu / max(load["accepted"], 1) * 1000, 2),
    }


def ingest_only(work: Path, seconds: float, processes: list, extra: dict) -> dict:
    service = start_service(work, {}, processes, extra)
    meter = proctree.CpuMeter(service.pid)
    result = wrk(f"{service.url}/events", seconds, ["unrouted.example.vn"])
    result |= tree_figures(service, meter, result["requests"] - result["errors"])
    stop(service.process)
    return result


def max_rate(work: Path, seconds: float, domains: int, processes: list, extra: dict) -> dict:
    sinks = [start_sink(processes), start_sink(processes)]
    names = ["bench.example.vn"] if domains == 1 else [f"tenant-{n}.example.vn" for n in range(domains)]
    service = start_service(work, {name: [s.url for s in sinks] for name in names}, processes, extra)
    meter, started = proctree.CpuMeter(service.pid), time.monotonic()
    load = wrk(f"{service.url}/events", seconds, names)
    load_ended = time.monotonic()
    for sink in sinks:
        sink.poll()
    backlog_at_end = load["requests"] - load["errors"] - min(s.received for s in sinks)
    accepted = load["requests"] - load["errors"]
    done = drain(sinks, accepted)
    result = {
        "accepted_per_s": load["requests_per_s"],
        "errors": load["errors"],
        "post_p99_ms": load["post_p99_ms"],
        # None: the sinks did not get every accepted event within drain's timeout.
        "forwarded_per_s": round(min(s.received for s in sinks) / (done - started), 1) if done == done else None,
        "forwarded_during_load_per_s": round((accepted - backlog_at_end) / (load_ended - started), 1),
        "backlog_at_end_of_load": backlog_at_end,
        **tree_figures(service, meter, accepted),
    }
    stop(service.process)
    for sink in sinks:
        stop(sink.process)
    return result


def fixed_rate(
    work: Path, seconds: float, rate: float, domains: int, processes: list, extra: dict, hanging: bool = False
) -> dict:
    sinks = [start_sink(processes), start_sink(processes)]
    names = [f"tenant-{n}.example.vn" for n in range(domains)]
    routes = {name: [s.url for s in sinks] for name in names}
    load_domains = list(names)
    if hanging:
        stuck = start_sink(processes, hang=True)
        routes["stuck.example.vn"] = [stuck.url]
        load_domains.append("stuck.example.vn")
    service = start_service(work, routes, processes, extra)
    meter = proctree.CpuMeter(service.pid)
    load = paced(service.url, rate, seconds, load_domains)
    healthy = load["accepted"] - (load["accepted"] // len(load_domains) if hanging else 0)
    drain(sinks, healthy - 1, timeout=30)
    latencies = sinks[0].latencies + sinks[1].latencies
    delivered = min(s.received for s in sinks)
    result = {
        "rate": rate,
        "sent": load["sent"],
        "accepted": load["accepted"],
        "statuses": load["statuses"],
        "accepted_per_s": round(rate * load["accepted"] / max(load["sent"], 1), 1),
        # The events that reached the sinks, per second of the schedule.
        "delivered_per_s": round(rate * delivered / max(load["accepted"], 1), 1),
        "post_p99_ms": round(load["post_p99_ms"], 2),
        "e2e_p50_ms": percentile(latencies, 0.50),
        "e2e_p90_ms": percentile(latencies, 0.90),
        "e2e_p99_ms": percentile(latencies, 0.99),
        # Without the first second, when every domain's first event starts its forwarder (a cold start).
        "e2e_p99_after_1s_ms": percentile(sinks[0].latencies[int(rate) :] + sinks[1].latencies[int(rate) :], 0.99),
        "delivered": delivered,
        **tree_figures(service, meter, load["accepted"]),
    }
    stop(service.process)
    for process in processes:
        stop(process)
    return result


def given_up(work: Path, seconds: float, processes: list, extra: dict) -> dict:
    """``GIVEN_UP_RATE`` events/s to a domain whose backend never answers: each is tried once, times
    out, and is filed as a dead letter. CPU an event from its POST to its dead letter."""
    stuck = start_sink(processes, hang=True)
    service = start_service(work, {"stuck.example.vn": [stuck.url]}, processes, merged(GIVEN_UP_CONFIG, extra))
    meter = proctree.CpuMeter(service.pid)
    load = paced(service.url, GIVEN_UP_RATE, seconds, ["stuck.example.vn"])
    end = time.monotonic() + 120
    filed = 0
    while filed < load["accepted"] and time.monotonic() < end:
        time.sleep(0.2)
        with urllib.request.urlopen(f"{service.url}/api/dead-letters?limit=1") as answer:
            filed = json.load(answer)["total"]
    result = {
        "rate": GIVEN_UP_RATE,
        "accepted": load["accepted"],
        "accepted_per_s": round(GIVEN_UP_RATE * load["accepted"] / max(load["sent"], 1), 1),
        "dead_letters": filed,  # all accepted, unless they took over 120 s to file
        "post_p99_ms": round(load["post_p99_ms"], 2),
        **tree_figures(service, meter, load["accepted"]),
    }
    stop(service.process)
    stop(stuck.process)
    return result


def memory(work: Path, events: int, processes: list, extra: dict) -> dict:
    sinks = [start_sink(processes), start_sink(processes)]
    names = [f"tenant-{n}.example.vn" for n in range(50)]
    service = start_service(work, {name: [s.url for s in sinks] for name in names}, processes, extra)
    samples = []
    sent = 0
    while sent < events:
        load = wrk(f"{service.url}/events", 10, names)
        sent += load["requests"] - load["errors"]
        # Each round is forwarded before the next starts, so what is measured
        # is the service after N events, not a backlog waiting in JetStream.
        drain(sinks, sent, timeout=600)
        rss = proctree.memory_mb(service.pid, "VmRSS")
        samples.append((sent, round(sum(rss.values()), 1), rss["service"], rss["nats-server"]))
    half = next(total for count, total, _, _ in samples if count >= events / 2)
    rss = proctree.memory_mb(service.pid, "VmRSS")
    peak = proctree.memory_mb(service.pid, "VmHWM")
    result = {
        "events": sent,
        "rss_at_half_mb": half,
        "rss_at_end_mb": round(sum(rss.values()), 1),
        "rss_at_end_mb_service": rss["service"],
        "rss_at_end_mb_nats": rss["nats-server"],
        "peak_rss_mb_service": peak["service"],
        "peak_rss_mb_nats": peak["nats-server"],
        "peak_rss_mb_total": round(sum(peak.values()), 1),
        # (events so far, RSS of service + nats-server, of the service, of nats-server)
        "rss_mb_by_events": samples,
    }
    stop(service.process)
    for sink in sinks:
        stop(sink.process)
    return result


def run_scenario(name: str, work: Path, args: argparse.Namespace, processes: list, extra: dict) -> dict[str, dict]:
    """One run of one scenario (an isolation scenario is two: without and with the hanging domain)."""
    if name == "sink_ceiling":
        sink = start_sink(processes)
        result = wrk(sink.url, args.seconds, ["bench.example.vn"])
        stop(sink.process)
        return {name: result}
    if name == "baseline":
        baseline, url = start_baseline(processes)
        result = wrk(f"{url}/events", args.seconds, ["bench.example.vn"])
        stop(baseline)
        return {name: result}
    if name == "baseline_paced":
        return {name: baseline_paced(args.seconds, args.rate, processes)}
    if name == "ingest_only":
        return {name: ingest_only(work, args.seconds, processes, extra)}
    if name in ("full_1x2", "full_200x2"):
        return {name: max_rate(work, args.seconds, 1 if name == "full_1x2" else 200, processes, extra)}
    if name == "fixed_rate":
        return {name: fixed_rate(work, args.seconds, args.rate, 1, processes, extra)}
    if name in ISOLATION_DOMAINS:
        domains = ISOLATION_DOMAINS[name]
        return {
            f"{name}_without_hang": fixed_rate(work / "without", args.seconds, args.rate, domains, processes, extra),
            f"{name}_with_hang": fixed_rate(work / "with", args.seconds, args.rate, domains, processes, extra, True),
        }
    if name == "given_up":
        return {name: given_up(work, args.seconds, processes, extra)}
    if name == "memory":
        return {name: memory(work, args.memory_events, processes, extra)}
    if name == "tenants":
        return {
            f"tenants_{count}": tenants.measure(work / str(count), count, args.rate, args.seconds, processes, extra)
            for count in args.tenants
        }
    raise ValueError(name)


@dataclass
class Variant:
    """One service configuration under test: the YAML merged into every run's config, and its runs."""

    label: str
    yaml: str
    extra: dict
    results: report.Results = field(default_factory=dict)


def yaml_mapping(parser: argparse.ArgumentParser, option: str, text: str) -> dict:
    try:
        found = yaml.safe_load(text)
    except yaml.YAMLError as error:
        parser.error(f"{option} {text!r}: not YAML: {error}")
    if not isinstance(found, dict):
        parser.error(f"{option} {text!r}: not a YAML mapping (e.g. 'forwarding: {{max_in_flight_per_domain: 32}}')")
    return found


def with_pairings(results: report.Results) -> None:
    """Ratios taken run by run: each against the baseline of its own round, isolation with its pair."""
    baseline = results.get("baseline", [])
    for run in baseline:
        run["ratio_to_baseline"] = 1.0
    for name, figure in (
        ("ingest_only", "requests_per_s"),
        ("full_1x2", "forwarded_during_load_per_s"),
        ("full_200x2", "forwarded_during_load_per_s"),
    ):
        if baseline and name in results:
            for run, base in zip(results[name], baseline, strict=True):
                run["ratio_to_baseline"] = round(run[figure] / base["requests_per_s"], 3)
                run["baseline_requests_per_s"] = base["requests_per_s"]
    for name in ISOLATION_DOMAINS:
        pairs = zip(results.get(f"{name}_with_hang", []), results.get(f"{name}_without_hang", []), strict=True)
        for with_hang, without in pairs:
            if with_hang["e2e_p99_ms"] is not None and without["e2e_p99_ms"]:
                with_hang["p99_without_hang_ms"] = without["e2e_p99_ms"]
                with_hang["p99_increase"] = round(with_hang["e2e_p99_ms"] / without["e2e_p99_ms"] - 1, 3)


class Record:
    """The JSON file of one invocation: every run's raw numbers, saved after each run (so a
    run that fails halfway keeps what it measured, with ``complete: false``)."""

    def __init__(self, args: argparse.Namespace, variants: list[Variant]) -> None:
        self.began = time.monotonic()
        self.date = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
        self.path = HERE / "results" / f"{self.date}.json"
        self.variants = variants
        self.head = {
            "date": self.date,
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "runs": args.runs,
            "seconds": args.seconds,
            "rate": args.rate,
            "tenants": args.tenants,
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        }

    def save(self, complete: bool = False) -> None:
        record = self.head | {
            "complete": complete,
            "load_average_now": [round(load, 2) for load in os.getloadavg()],
            "minutes": round((time.monotonic() - self.began) / 60, 1),
            "variants": [
                {"label": variant.label, "service_config": variant.yaml, "results": variant.results}
                | ({"verdicts": [asdict(v) for v in report.verdicts(variant.results)]} if complete else {})
                for variant in self.variants
            ],
        }
        self.path.parent.mkdir(exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2) + "\n")


def run_rounds(args: argparse.Namespace, variants: list[Variant], selected: list[str], record: Record) -> None:
    """Round after round, every selected scenario once per variant (A/B order alternating)."""
    work = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    processes: list[subprocess.Popen] = []
    try:
        for round_ in range(args.runs):
            for name in selected:
                # A then B in odd rounds, B then A in even ones: neither side always runs second.
                order = variants[:1] if name in WITHOUT_SERVICE else variants[:: 1 if round_ % 2 == 0 else -1]
                for variant in order:
                    tag = f"r{round_ + 1}-{name}" + (f"-{'AB'[variants.index(variant)]}" if len(order) > 1 else "")
                    stamp = {"round": round_ + 1, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
                    stamp["load_average_1min"] = round(os.getloadavg()[0], 2)
                    found = run_scenario(name, work / tag, args, processes, variant.extra)
                    shutil.rmtree(work / tag, ignore_errors=True)
                    for result_name, result in found.items():
                        for target in variants if name in WITHOUT_SERVICE else [variant]:
                            target.results.setdefault(result_name, []).append(stamp | result)
                    record.save()
                    print(f"[{time.monotonic() - record.began:5.0f} s] {tag} done", file=sys.stderr, flush=True)
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)


def print_report(runs: int, variants: list[Variant], path: Path) -> None:
    print(f"{runs} runs of each scenario: median (min–max)\n")
    if len(variants) == 2:
        print(report.ab_table(variants[0].results, variants[1].results, (variants[0].label, variants[1].label)))
        print("\n(baseline and sink_ceiling start no service: the same runs in both columns)")
    else:
        results = variants[0].results
        sections = []
        if any(name != "memory" and not name.startswith("tenants_") for name in results):
            sections += [report.table(results), "The service's process tree:", report.process_table(results)]
        if "memory" in results:
            sections.append(report.memory_lines(results))
        if found := report.tenants_table(results):
            sections += ["Tenants (issue 15): one column per number of routed domains (bench/tenants.py)", found]
        print("\n\n".join(sections))
    for variant in variants:
        if found := report.verdicts(variant.results):
            print(f"\nTargets ({variant.label}):\n")
            print(report.verdict_table(found))
    print(f"\nJSON: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--runs", type=int, default=3, help="runs of every scenario (default 3)")
    parser.add_argument("--memory-events", type=int, default=0, help="also run the memory scenario (e.g. 1000000)")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, help="scenario names to run")
    parser.add_argument(
        "--tenants",
        nargs="+",
        type=int,
        metavar="N",
        help=f"routed domains for the tenants scenario (default {' '.join(map(str, tenants.DEFAULT_COUNTS))})",
    )
    parser.add_argument("--service-config", metavar="YAML", help="merged into every run's service config")
    parser.add_argument("--ab", nargs=2, metavar=("A", "B"), help="YAML for side A and side B, run alternately")
    parser.add_argument("--report", metavar="JSON", type=Path, help="print a saved run's tables and verdicts again")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        variants = [Variant(v["label"], v["service_config"], {}, v["results"]) for v in saved["variants"]]
        print_report(saved["runs"], variants, args.report)
        return
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.tenants and min(args.tenants) < 1:
        parser.error("--tenants: each count must be at least 1")
    common = yaml_mapping(parser, "--service-config", args.service_config) if args.service_config else {}
    if args.ab:
        sides = [yaml_mapping(parser, "--ab", text) for text in args.ab]
        variants = [
            Variant(f"{side}: {text}", text, merged(common, extra))
            for side, text, extra in zip("AB", args.ab, sides, strict=True)
        ]
    else:
        variants = [Variant(args.service_config or "as shipped", args.service_config or "", common)]
    selected = [name for name in SCENARIOS if (not args.only and name not in OPT_IN) or name in (args.only or ())]
    if args.tenants and "tenants" not in selected:
        selected.append("tenants")
    if "tenants" in selected:
        args.tenants = args.tenants or list(tenants.DEFAULT_COUNTS)
    if args.memory_events:
        selected.append("memory")
    if set(selected) & set(WITH_WRK):
        ensure_wrk()
    record = Record(args, variants)
    run_rounds(args, variants, selected, record)
    for variant in variants:
        with_pairings(variant.results)
    record.save(complete=True)
    print_report(args.runs, variants, record.path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
