"""Starting and driving the bench's processes: the service, the webhook sinks, the baseline, wrk.

Every process runs on this machine over loopback. bench/run.py,
bench/tenants.py and bench/profile.py build their scenarios from these pieces.
"""

from __future__ import annotations

import asyncio
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
import proctree
import yaml

HERE = Path(__file__).resolve().parent
EVENT = (
    '{"call_id":"c1","domain":"%s","direction":"inbound","state":"missed",'
    '"status":"busy-line","from_number":"0914315989"}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(
    url: str,
    timeout: float = 60,
    process: subprocess.Popen | None = None,
    errors: Path | None = None,
    healthy: bool = False,
) -> None:
    """Wait for ``url`` to answer (with ``healthy``: 200 with JSON ``"status": "ok"``, as /health
    says when all is well); fail at once, with its last error line, if ``process`` exits first."""
    end = time.monotonic() + timeout
    answer = "no answer"
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            last = errors.read_text().strip().splitlines()[-1:] if errors else []
            raise SystemExit(f"{url}: the process exited ({process.returncode}) before answering. {' '.join(last)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                answer = response.read().decode(errors="replace")
            if not healthy or json.loads(answer).get("status") == "ok":
                return
        except urllib.error.HTTPError as error:
            answer = f"{error.code} {error.read().decode(errors='replace')}"
            if not healthy:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer{' healthy' if healthy else ''} within {timeout} s (last: {answer})")


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
    by_domain: Counter[str] = field(default_factory=Counter)  # requests received, per event domain
    reported_at: float = 0.0
    reports: threading.Condition = field(default_factory=threading.Condition)

    def read_reports(self) -> None:
        for raw in self.process.stdout:
            line = json.loads(raw)
            with self.reports:
                self.received = line["received"]
                self.latencies += line["latencies_ms"]
                self.by_domain.update(line["domains"])
                self.reported_at = line["at"]
                self.reports.notify_all()

    def mark(self) -> SinkMark:
        """Where the sink's counts stand now, for ``since``."""
        with self.reports:
            return SinkMark(self.received, len(self.latencies), Counter(self.by_domain))

    def since(self, mark: SinkMark) -> tuple[list[float], Counter[str]]:
        """The e2e latencies (ms) and the requests per domain received after ``mark``."""
        with self.reports:
            return self.latencies[mark.latencies :], self.by_domain - mark.by_domain

    def poll(self) -> None:
        """Wait for the sink's first report made after this call (it reports once a second)."""
        asked = time.time()
        with self.reports:
            if not self.reports.wait_for(lambda: self.reported_at >= asked, timeout=10):
                raise RuntimeError(f"sink {self.url} stopped reporting")


@dataclass(frozen=True)
class SinkMark:
    received: int
    latencies: int
    by_domain: Counter[str]


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
    config: dict
    log: Path  # the service's own log (JSON lines)
    started_at: float  # time.monotonic() just before the process was started
    ready_s: float  # from then to the first answer of /health (a healthy one if start_service was asked)

    @property
    def pid(self) -> int:
        return self.process.pid

    def nats_url(self) -> str:
        """The NATS server the service uses: the configured one, or the embedded server's (from the log)."""
        if self.config["nats"]["url"] != "embedded":
            return self.config["nats"]["url"]
        for raw in self.log.read_text().splitlines():
            record = json.loads(raw)
            if record.get("msg") == "Embedded nats-server ready":
                return record["url"]
        raise RuntimeError(f"{self.log}: the embedded nats-server's URL is not logged")

    def consumers(self) -> int | None:
        """How many consumers the event stream has on the server (None, with a line on stderr, if NATS
        does not say): its own client, so the service's connection is not involved."""
        stream = self.config["nats"].get("stream_name", "call-signals")

        async def count() -> int:
            client = await nats.connect(self.nats_url(), allow_reconnect=False, connect_timeout=5)
            try:
                return (await client.jetstream(timeout=30).stream_info(stream)).state.consumer_count
            finally:
                await client.close()

        try:
            return asyncio.run(count())
        except (OSError, TimeoutError, nats.errors.Error) as error:
            print(f"consumers of {stream!r}: {error!r}", file=sys.stderr)
            return None


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


def start_service(
    work: Path,
    routes: dict[str, list[str]],
    processes: list,
    extra: dict | None = None,
    healthy: bool = False,
    timeout: float = 60,
) -> Service:
    """The service on a fresh port and data directory, with ``extra`` (YAML's mapping) merged into its config.

    Returns once /health answers (with ``healthy``: answers 200 with status ok), within ``timeout``.
    """
    work.mkdir(parents=True)
    port = free_port()
    config = service_config(work, port, routes, extra or {})
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    errors, log = work / "service-stderr.txt", work / "service-log.jsonl"
    started_at = time.monotonic()
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-config", str(work / "config.yaml"), "-log-file", str(log)],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(process)
    wait_http(f"http://127.0.0.1:{port}/health", timeout, process, errors, healthy)
    ready_s = round(time.monotonic() - started_at, 2)
    return Service(process, f"http://127.0.0.1:{port}", config, log, started_at, ready_s)


def tree_figures(service: Service, meter: proctree.CpuMeter, events: int) -> dict:
    """CPU per 1,000 events since ``meter`` started and peak RSS: service, nats-server and both."""
    cpu = meter.used()
    peak = proctree.memory_mb(service.pid, "VmHWM")
    figures: dict = {"cpu_s": cpu}
    for suffix, seconds, mb in (
        ("service", cpu["service"], peak["service"]),
        ("nats", cpu["nats-server"], peak["nats-server"]),
        ("total", sum(cpu.values()), sum(peak.values())),
    ):
        figures[f"cpu_s_per_1000_events_{suffix}"] = round(seconds / max(events, 1) * 1000, 3)
        figures[f"peak_rss_mb_{suffix}"] = round(mb, 1)
    return figures


def paced(url: str, rate: float, seconds: float, domains: list[str]) -> dict:
    """bench/paced.py against ``url``: ``rate`` × ``seconds`` events, event n to ``domains[n % len(domains)]``.

    The domains go in a file (thousands of them are too long for one argument); returns paced.py's report.
    """
    listing = Path(tempfile.mkstemp(suffix=".domains")[1])
    listing.write_text("\n".join(domains) + "\n")
    try:
        out = subprocess.run(
            [sys.executable, str(HERE / "paced.py"), url, str(rate), str(seconds), f"@{listing}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        listing.unlink()
    return json.loads(out)


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
