"""Where the service's CPU goes: py-spy on the running service under load.

Run from the project root (needs py-spy: `pip install py-spy`; wrk as for bench/run.py):

    python bench/profile.py            # 1 domain x 2 endpoints, wrk at maximum rate
    python bench/profile.py --rate 250 # the same at a fixed rate (bench/paced.py)
    python bench/profile.py --ingest   # POST /events only, no route
    python bench/profile.py --rate 300 --domains 20  # the isolation scenario's load

Samples only while the service holds the GIL (py-spy --gil), so waiting is not
counted; py-spy pauses the service for each sample (--nonblocking reads stacks
torn mid-switch, most of them then counted as trio's scheduler), so latencies
under the profile mean little. Prints the CPU per event (the service's and its
nats-server's: py-spy samples the service only), the share of samples by part
of the pipeline, then the functions most often on the stack; keeps py-spy's raw
stacks in bench/results/profile-<date>.txt.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from harness import HERE, ensure_wrk, paced, start_service, start_sink, stop, wrk
from proctree import CpuMeter

DOMAIN = "bench.example.vn"
# Each stack is counted once, for the first part whose marker it contains.
PARTS = [
    ("domain logs (structlog, log writer)", ["structlog", "log_writer.py", "log_setup.py"]),
    (
        "webhook POSTs (the lean transport, httptools; httpcore and h11 with http_transport: httpx)",
        ["webhook_transport.py", "httptools", "httpcore", "httpx"],
    ),
    ("forwarder, own code", ["forwarder.py"]),
    ("stats collector", ["stats.py"]),
    ("consumers' fetch loops", ["subscriber.py"]),
    ("acknowledger", ["acknowledger.py"]),
    ("ingress actor (publish batches)", ["actors/ingress.py"]),
    ("HTTP ingress (the front, hypercorn, POST /events)", ["ingress_front.py", "hypercorn", "web/ingress.py", "quart"]),
    ("the hot path's NATS link (publish and delete replies)", ["nats_link.py"]),
    ("nats-py on the trio-asyncio loop", ["nats/", "trio_asyncio", "asyncio"]),
    ("trio worker threads", ["_thread_cache.py", "_threads.py"]),
    ("trio scheduler and I/O", ["trio/"]),
]


# Frames under which everything runs: always on the stack, so they say nothing.
ROOT_FRAMES = ("<module>", "_run_module_as_main", "_run_code", "main (cli.py)", "run (_run.py)", "unrolled_run")


def part_of(stack: str) -> str:
    for name, markers in PARTS:
        if any(marker in stack for marker in markers):
            return name
    return "other (no Python frame: C code, GC)"


def function_of(frame: str) -> str:
    name, _, place = frame.partition(" (")
    return f"{name} ({place.rsplit('/', 1)[-1].split(':')[0]})" if place else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--rate", type=float, help="events/s (paced); default: wrk at maximum rate")
    parser.add_argument("--ingest", action="store_true", help="no route: measure POST /events alone")
    parser.add_argument("--domains", type=int, default=1, help="events spread over this many routed domains")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("needs py-spy: pip install py-spy")
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="tf-profile-"))
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    raw = HERE / "results" / f"profile-{stamp}.txt"
    raw.parent.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        sinks = [start_sink(processes), start_sink(processes)]
        domains = [DOMAIN] if args.domains == 1 else [f"tenant-{n}.example.vn" for n in range(args.domains)]
        routes = {} if args.ingest else {domain: [sink.url for sink in sinks] for domain in domains}
        service = start_service(work / "service", routes, processes)
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(service.pid), "--duration", str(args.seconds), "--rate", "200"]
            + ["--format", "raw", "--output", str(raw), "--gil"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        meter = CpuMeter(service.pid)
        if args.rate:
            accepted = paced(service.url, args.rate, args.seconds, domains)["accepted"]
        else:
            load = wrk(f"{service.url}/events", args.seconds, domains)
            accepted = load["requests"] - load["errors"]
        cpu = meter.used()
        for sink in sinks:
            sink.poll()
        spy.wait()
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    parts: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        parts[part_of(stack)] += samples
        for function in {function_of(frame) for frame in stack.split(";")}:
            if function and not function.startswith(ROOT_FRAMES):
                functions[function] += samples
    forwarded = min(sink.received for sink in sinks)
    print(f"accepted {accepted} events in {args.seconds} s, forwarded {forwarded} to both sinks")
    for name, seconds in cpu.items():
        print(f"{name} CPU {seconds:.2f} s: {seconds / max(accepted, 1) * 1000:.2f} ms per accepted event")
    print(f"\nshare of {total} samples by part of the pipeline")
    for name, samples in parts.most_common():
        print(f"{100 * samples / total:5.1f} %  {name}")
    print("\nfunctions most often on the stack (inclusive)")
    for name, samples in functions.most_common(40):
        print(f"{100 * samples / total:5.1f} %  {name}")
    print(f"\nraw stacks: {raw.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
