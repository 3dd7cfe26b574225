"""The load benchmark: the service against its bare-stack baseline, measured in one run.

Run from the project root (wrk from Debian's package: found on the PATH, or installed with apt-get):

    python bench/run.py                 # every scenario, 10 s each
    python bench/run.py --seconds 20 --memory-events 1000000
    python bench/run.py --service-config 'forwarding: {max_in_flight_per_domain: 32}'

``--service-config`` merges YAML into the service's configuration (mappings key
by key). Prints a table and writes it as JSON to bench/results/. Every process runs on
this machine over loopback: wrk or bench/paced.py → the service (embedded NATS)
→ bench/sink.py webhook sinks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
EVENT = (
    '{"call_id":"c1","domain":"%s","direction":"inbound","state":"missed",'
    '"status":"busy-line","from_number":"0914315989"}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(
    url: str, timeout: float = 60, process: subprocess.Popen | None = None, errors: Path | None = None
) -> None:
    """Wait for ``url`` to answer; fail at once, with its last error line, if ``process`` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            last = errors.read_text().strip().splitlines()[-1:] if errors else []
            raise SystemExit(f"{url}: the process exited ({process.returncode}) before answering. {' '.join(last)}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 2)


def ensure_wrk() -> None:
    """Find wrk, or install Debian's package (as root, or through sudo)."""
    if shutil.which("wrk"):
        return
    if shutil.which("apt-get") is None:
        raise SystemExit("wrk not found, and no apt-get to install it with: install wrk and run again")
    apt = ([] if os.geteuid() == 0 else ["sudo"]) + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    print("Installing Debian's wrk for the load…", file=sys.stderr)
    subprocess.run([*apt, "update", "-qq"], check=True)
    subprocess.run([*apt, "install", "-y", "-qq", "wrk"], check=True)


def wrk(url: str, seconds: float, domains: list[str], connections: int = 32) -> dict:
    """Maximum rate: wrk with a script that spreads events over ``domains``."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    bodies = ", ".join("'" + EVENT % domain + "'" for domain in domains)
    script.write_text(
        f"local bodies = {{{bodies}}}\nlocal n = 0\n"
        "request = function()\n  n = n + 1\n"
        '  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[(n % #bodies) + 1])\nend\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "post_p99_ms": float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)],
    }


@dataclass
class Sink:
    """A running bench/sink.py. Its reports are read as they come, by a thread of their own:
    a sink whose stdout pipe fills up blocks on print and stops answering webhooks."""

    process: subprocess.Popen
    url: str
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    reported_at: float = 0.0
    reports: threading.Condition = field(default_factory=threading.Condition)

    def read_reports(self) -> None:
        for raw in self.process.stdout:
            line = json.loads(raw)
            with self.reports:
                self.received = line["received"]
                self.latencies += line["latencies_ms"]
                self.reported_at = line["at"]
                self.reports.notify_all()

    def poll(self) -> None:
        """Wait for the sink's first report made after this call (it reports once a second)."""
        asked = time.time()
        with self.reports:
            if not self.reports.wait_for(lambda: self.reported_at >= asked, timeout=10):
                raise RuntimeError(f"sink {self.url} stopped reporting")


def start_sink(processes: list, hang: bool = False) -> Sink:
    port = free_port()
    args = [sys.executable, str(HERE / "sink.py"), str(port)] + (["hang"] if hang else [])
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    processes.append(process)
    sink = Sink(process, f"http://127.0.0.1:{port}/webhook")
    threading.Thread(target=sink.read_reports, daemon=True).start()
    sink.poll()
    return sink


@dataclass
class Service:
    process: subprocess.Popen
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def service_config(work: Path, port: int, routes: dict[str, list[str]], extra: dict) -> dict:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "nats": {"url": "embedded", "data_dir": str(work / "nats")},
        "logging": {"dir": str(work / "logs")},
        # Capacity is what is measured: no rate limit in the way (ingest_only posts to an unrouted domain).
        "ingress": {"rate_limit_per_second": 0, "unrouted_rate_limit_per_second": 0},
        "routes": [{"domain": domain, "endpoints": endpoints} for domain, endpoints in routes.items()],
    }
    return merged(config, extra)


def start_service(work: Path, routes: dict[str, list[str]], processes: list, extra: dict | None = None) -> Service:
    """The service on a fresh port and data directory, with ``extra`` (YAML's mapping) merged into its config."""
    work.mkdir(parents=True)
    port = free_port()
    config = service_config(work, port, routes, extra or {})
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    errors = work / "service-stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-config", str(work / "config.yaml")],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(process)
    wait_http(f"http://127.0.0.1:{port}/health", process=process, errors=errors)
    return Service(process, f"http://127.0.0.1:{port}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def drain(sinks: list[Sink], expected: int, timeout: float = 120) -> float:
    """Wait until every sink has ``expected`` requests; returns when that was (monotonic)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for sink in sinks:
            sink.poll()
        if all(sink.received >= expected for sink in sinks):
            return time.monotonic()
    return float("nan")


def max_rate(work: Path, seconds: float, domains: int, processes: list, extra: dict) -> dict:
    sinks = [start_sink(processes), start_sink(processes)]
    names = ["bench.example.vn"] if domains == 1 else [f"tenant-{n}.example.vn" for n in range(domains)]
    service = start_service(work, {name: [s.url for s in sinks] for name in names}, processes, extra)
    cpu_before, started = cpu_seconds(service.pid), time.monotonic()
    load = wrk(f"{service.url}/events", seconds, names)
    load_ended = time.monotonic()
    for sink in sinks:
        sink.poll()
    backlog_at_end = load["requests"] - load["errors"] - min(s.received for s in sinks)
    accepted = load["requests"] - load["errors"]
    done = drain(sinks, accepted)
    cpu = cpu_seconds(service.pid) - cpu_before
    result = {
        "accepted_per_s": load["requests_per_s"],
        "errors": load["errors"],
        "post_p99_ms": load["post_p99_ms"],
        "forwarded_per_s": round(min(s.received for s in sinks) / (done - started), 1),
        "forwarded_during_load_per_s": round((accepted - backlog_at_end) / (load_ended - started), 1),
        "backlog_at_end_of_load": backlog_at_end,
        "cpu_s_per_1000_events": round(cpu / max(accepted, 1) * 1000, 3),
        "peak_rss_mb": round(memory_mb(service.pid, "VmHWM"), 1),
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
    cpu_before = cpu_seconds(service.pid)
    out = subprocess.run(
        [sys.executable, str(HERE / "paced.py"), service.url, str(rate), str(seconds), ",".join(load_domains)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paced = json.loads(out)
    healthy = paced["accepted"] - (paced["accepted"] // len(load_domains) if hanging else 0)
    drain(sinks, healthy - 1, timeout=30)
    cpu = cpu_seconds(service.pid) - cpu_before
    latencies = sinks[0].latencies + sinks[1].latencies
    result = {
        "rate": rate,
        "sent": paced["sent"],
        "accepted": paced["accepted"],
        "statuses": paced["statuses"],
        "post_p99_ms": round(paced["post_p99_ms"], 2),
        "e2e_p50_ms": percentile(latencies, 0.50),
        "e2e_p90_ms": percentile(latencies, 0.90),
        "e2e_p99_ms": percentile(latencies, 0.99),
        "delivered": min(s.received for s in sinks),
        "cpu_s_per_1000_events": round(cpu / max(paced["accepted"], 1) * 1000, 3),
        "peak_rss_mb": round(memory_mb(service.pid, "VmHWM"), 1),
    }
    stop(service.process)
    for process in processes:
        stop(process)
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
        samples.append((sent, round(memory_mb(service.pid, "VmRSS"), 1)))
    half = next(rss for count, rss in samples if count >= events / 2)
    result = {
        "events": sent,
        "rss_at_half_mb": half,
        "rss_at_end_mb": round(memory_mb(service.pid, "VmRSS"), 1),
        "peak_rss_mb": round(memory_mb(service.pid, "VmHWM"), 1),
        "rss_mb_by_events": samples,
    }
    stop(service.process)
    for sink in sinks:
        stop(sink.process)
    return result


def yaml_mapping(parser: argparse.ArgumentParser, option: str, text: str) -> dict:
    try:
        found = yaml.safe_load(text)
    except yaml.YAMLError as error:
        parser.error(f"{option} {text!r}: not YAML: {error}")
    if not isinstance(found, dict):
        parser.error(f"{option} {text!r}: not a YAML mapping (e.g. 'forwarding: {{max_in_flight_per_domain: 32}}')")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--memory-events", type=int, default=0, help="also run the memory scenario (e.g. 1000000)")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--service-config", metavar="YAML", help="merged into every run's service config")
    args = parser.parse_args()
    extra = yaml_mapping(parser, "--service-config", args.service_config) if args.service_config else {}
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    processes: list[subprocess.Popen] = []
    results: dict[str, dict] = {}

    def want(name: str) -> bool:
        return not args.only or name in args.only

    try:
        if want("sink_ceiling"):
            sink = start_sink(processes)
            results["sink_ceiling"] = wrk(sink.url, args.seconds, ["bench.example.vn"])
            stop(sink.process)
        if want("baseline"):
            port = free_port()
            baseline = subprocess.Popen(
                [sys.executable, str(HERE / "baseline_app.py"), str(port)], stderr=subprocess.DEVNULL
            )
            processes.append(baseline)
            wait_http(f"http://127.0.0.1:{port}/")
            results["baseline"] = wrk(f"http://127.0.0.1:{port}/events", args.seconds, ["bench.example.vn"])
            stop(baseline)
        if want("ingest_only"):
            service = start_service(work / "ingest", {}, processes, extra)
            results["ingest_only"] = wrk(f"{service.url}/events", args.seconds, ["unrouted.example.vn"])
            stop(service.process)
        if want("full_1x2"):
            results["full_1x2"] = max_rate(work / "full1", args.seconds, 1, processes, extra)
        if want("full_200x2"):
            results["full_200x2"] = max_rate(work / "full200", args.seconds, 200, processes, extra)
        if want("fixed_rate"):
            results["fixed_rate"] = fixed_rate(work / "fixed", args.seconds, args.rate, 1, processes, extra)
        if want("isolation"):
            results["isolation_without_hang"] = fixed_rate(work / "iso0", args.seconds, args.rate, 20, processes, extra)
            results["isolation_with_hang"] = fixed_rate(
                work / "iso1", args.seconds, args.rate, 20, processes, extra, hanging=True
            )
        if args.memory_events:
            results["memory"] = memory(work / "memory", args.memory_events, processes, extra)
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    base = results.get("baseline", {}).get("requests_per_s")
    if base:
        for name in ("ingest_only",):
            if name in results:
                results[name]["ratio_to_baseline"] = round(results[name]["requests_per_s"] / base, 3)
        for name in ("full_1x2", "full_200x2"):
            if name in results:
                results[name]["ratio_to_baseline"] = round(results[name]["forwarded_during_load_per_s"] / base, 3)
    if "isolation_with_hang" in results and results["isolation_without_hang"]["e2e_p99_ms"]:
        results["isolation_with_hang"]["p99_increase"] = round(
            results["isolation_with_hang"]["e2e_p99_ms"] / results["isolation_without_hang"]["e2e_p99_ms"] - 1, 3
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    record = {
        "date": stamp,
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "service_config": args.service_config or "",
        "results": results,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"\nJSON: {(HERE / 'results' / f'{stamp}.json').relative_to(HERE.parent)}")


def table(results: dict[str, dict]) -> str:
    """The results as a Markdown table (what bench/RESULTS.md quotes)."""

    def number(value: float | None, digits: int = 1) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    rows = [
        "| scenario | accepted/s | forwarded/s | ratio to baseline | POST p99 ms | e2e p50 / p90 / p99 ms "
        "| CPU s per 1,000 events | peak RSS MB | backlog at end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "memory":
            continue
        e2e = " / ".join(number(r.get(k)) for k in ("e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms")) if "rate" in r else ""
        if "p99_increase" in r:
            e2e += f" ({r['p99_increase']:+.1%} p99)"
        accepted = r.get("accepted_per_s", r.get("requests_per_s", r.get("rate")))
        forwarded = r.get("forwarded_during_load_per_s")
        if "delivered" in r:  # paced: the events that reached the sinks, per second of the schedule
            forwarded = r["rate"] * r["delivered"] / max(r["accepted"], 1)
        cells = [
            name,
            number(accepted),
            number(forwarded),
            number(r.get("ratio_to_baseline", 1.0 if name == "baseline" else None), 3),
            number(r.get("post_p99_ms")),
            e2e,
            number(r.get("cpu_s_per_1000_events"), 2),
            number(r.get("peak_rss_mb")),
            str(r.get("backlog_at_end_of_load", "")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if "memory" in results:
        m = results["memory"]
        rows.append(
            f"\nMemory: {m['events']:,} events over 50 domains x 2 endpoints; RSS {m['rss_at_half_mb']} MB at half, "
            f"{m['rss_at_end_mb']} MB at the end, peak {m['peak_rss_mb']} MB."
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
