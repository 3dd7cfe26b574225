"""A quick load run: the bare-stack baseline, then the full service, with wrk.

Run from the project root: python bench/quick.py [SECONDS]
Needs wrk on PATH (Debian: apt-get install wrk). Prints a table; numbers mean
little alone on a shared machine, so compare the ratio measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVENT = (
    '{"call_id":"c1","domain":"bench.example.vn","direction":"inbound",'
    '"state":"missed","status":"busy-line","from_number":"0914315989"}'
)
LUA = f"""wrk.method = "POST"
wrk.body = '{EVENT}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def wrk(url: str, seconds: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": requests,
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "p99_ms": float(p99.group(1)) * scale,
    }


def run_service(work: Path, routes: str, seconds: int, script: Path, processes: list) -> tuple[dict, object]:
    """Start the service with ``routes`` (YAML flow items), load it with wrk; returns the result and a stop."""
    work.mkdir()
    port = free_port()
    (work / "config.yaml").write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"nats: {{url: embedded, data_dir: '{work / 'nats'}'}}\n"
        f"routes: [{routes}]\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-config", str(work / "config.yaml"), "-log-level", "warn"], cwd=work
    )
    processes.append(service)
    wait_http(f"http://127.0.0.1:{port}/health")
    result = wrk(f"http://127.0.0.1:{port}/events", seconds, script)

    def stop() -> None:
        service.terminate()
        service.wait(60)

    if not routes:
        stop()
    return result, stop


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    work = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    script = work / "post.lua"
    script.write_text(LUA)
    processes: list[subprocess.Popen] = []
    try:
        port = free_port()
        baseline = subprocess.Popen([sys.executable, str(HERE / "baseline_app.py"), str(port)])
        processes.append(baseline)
        wait_http(f"http://127.0.0.1:{port}/")
        base = wrk(f"http://127.0.0.1:{port}/events", seconds, script)
        baseline.terminate()
        baseline.wait()

        sink_ports = [free_port(), free_port()]
        sinks = [
            subprocess.Popen([sys.executable, str(HERE / "sink.py"), str(p)], stdout=subprocess.PIPE, text=True)
            for p in sink_ports
        ]
        processes += sinks
        endpoints = ", ".join(f'"http://127.0.0.1:{p}/webhook"' for p in sink_ports)

        # Ingest only: the domain has no route, so events are stored and wait.
        ingest, _ = run_service(work / "ingest", "", seconds, script, processes)
        routes = f"{{domain: bench.example.vn, endpoints: [{endpoints}]}}"
        started = time.monotonic()
        full, stop = run_service(work / "full", routes, seconds, script, processes)
        accepted = full["requests"] - full["errors"]
        # Forwarded: the slower sink's count once it has everything (sinks print once a second).
        counts = [0, 0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and min(counts) < accepted:
            counts = [int(sink.stdout.readline()) for sink in sinks]
        forwarded_at = time.monotonic()
        stop()
        result = {
            "baseline_requests_per_s": base["requests_per_s"],
            "ingest_only_requests_per_s": ingest["requests_per_s"],
            "ingest_only_p99_ms": ingest["p99_ms"],
            "full_requests_per_s": full["requests_per_s"],
            "full_errors": full["errors"],
            "full_p99_ms": full["p99_ms"],
            "accepted": accepted,
            "forwarded_to_both": min(counts),
            "forwarded_per_s": min(counts) / (forwarded_at - started),
            "ratio_ingest_only_to_baseline": ingest["requests_per_s"] / base["requests_per_s"],
            "ratio_full_to_baseline": full["requests_per_s"] / base["requests_per_s"],
        }
        print(json.dumps(result, indent=2))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
