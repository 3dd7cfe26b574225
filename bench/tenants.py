"""The tenants scenario (issue 15, "Thousands of tenants per instance"): one service, N routed domains.

For each tenant count N: N domains ``tenant-<n>.example.vn``, each routed to one
endpoint of the same sink (bench/sink.py, which counts what it receives per
domain), plus ``stuck.example.vn`` routed to a sink that never answers (N + 1
routes from the start); embedded NATS, the service otherwise as the other
scenarios run it (domain logging on, no ingress rate limit). Then, in order:

1. start: seconds from the service's process start to the first /health
   answering 200 with status ok;
2. idle: ``SETTLE_SECONDS`` after that, CPU (% of one core) over
   ``IDLE_SECONDS`` with no traffic, and RSS at the end; the service and
   nats-server apart;
3. one event each: one event to every one of the N domains, paced at the rate
   (``--rate``, so N / rate seconds); each domain must get its own; e2e
   latency from paced.py's ``sent_at`` to the sink's receipt, and the CPU per
   1,000 events (each the first its domain gets since the start);
4. hang: the rate for ``--seconds`` over the N domains in turn, one event in
   ``HANG_SHARE`` going to the hanging domain instead (a steady share, about
   the isolation scenario's 1 in 21, whatever N); every event of the others
   must be delivered; their e2e latency, and the CPU per 1,000 events from the
   first POST until the last of them arrived.

After phases 1, 2, 3 and 4: how many consumers the event stream has (asked of
nats-server with a client of the bench's own).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import proctree
from harness import Sink, SinkMark, paced, percentile, start_service, start_sink, stop, tree_figures

DEFAULT_COUNTS = (100, 1000, 10000)
STUCK = "stuck.example.vn"
# A service that is slow with many domains is measured, not abandoned: these
# bound the waits for /health and for deliveries after the last POST.
START_TIMEOUT_SECONDS = 300.0
DRAIN_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 2.0
IDLE_SECONDS = 10.0
HANG_SHARE = 20


def domain_names(count: int) -> list[str]:
    return [f"tenant-{n}.example.vn" for n in range(count)]


def hang_schedule(names: list[str], events: int) -> list[str]:
    """Event n's domain: one in ``HANG_SHARE`` the hanging one, the others ``names`` in turn."""
    others = iter(names * (events // len(names) + 1))
    return [STUCK if n % HANG_SHARE == HANG_SHARE - 1 else next(others) for n in range(events)]


def delivered(sink: Sink, mark: SinkMark, expected: Counter[str], post: dict, phase: str) -> dict:
    """What ``sink`` received since ``mark`` against ``expected`` (events per domain), as ``phase``'s figures.

    Waits, up to ``DRAIN_TIMEOUT_SECONDS``, until every domain has its count (a total would let
    one domain's redeliveries hide another's missing events).
    """
    end = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while True:
        sink.poll()
        latencies, got = sink.since(mark)
        short = sum(1 for domain, events in expected.items() if got[domain] < events)
        if short == 0 or time.monotonic() > end:
            break
    return {
        f"{phase}_sent": post["sent"],
        f"{phase}_accepted": post["accepted"],
        f"{phase}_statuses": post["statuses"],
        f"{phase}_post_p99_ms": round(post["post_p99_ms"], 2),
        f"{phase}_expected": sum(expected.values()),
        f"{phase}_delivered": sum(got[domain] for domain in expected),
        # Domains that received fewer events than were sent to them (the count, not their names).
        f"{phase}_domains_short": short,
        f"{phase}_all_delivered": short == 0 and post["accepted"] == post["sent"],
        f"{phase}_e2e_p50_ms": percentile(latencies, 0.50),
        f"{phase}_e2e_p99_ms": percentile(latencies, 0.99),
    }


def measure(work: Path, count: int, rate: float, seconds: float, processes: list, extra: dict) -> dict:
    """One run at ``count`` tenants: the four phases' figures."""
    sink, stuck = start_sink(processes), start_sink(processes, hang=True)
    names = domain_names(count)
    routes = {name: [sink.url] for name in names} | {STUCK: [stuck.url]}
    service = start_service(work, routes, processes, extra, healthy=True, timeout=START_TIMEOUT_SECONDS)
    result: dict = {"tenants": count, "rate": rate, "healthy_s": service.ready_s}
    result["consumers_after_start"] = service.consumers()

    time.sleep(SETTLE_SECONDS)
    meter, began = proctree.CpuMeter(service.pid), time.monotonic()
    time.sleep(IDLE_SECONDS)
    cpu, elapsed = meter.used(), time.monotonic() - began
    rss = proctree.memory_mb(service.pid, "VmRSS")
    result |= {
        "idle_cpu_pct_service": round(cpu["service"] / elapsed * 100, 2),
        "idle_cpu_pct_nats": round(cpu["nats-server"] / elapsed * 100, 2),
        "idle_rss_mb_service": rss["service"],
        "idle_rss_mb_nats": rss["nats-server"],
        "consumers_after_idle": service.consumers(),
    }

    mark, meter = sink.mark(), proctree.CpuMeter(service.pid)
    post = paced(service.url, rate, count / rate, names)
    result |= delivered(sink, mark, Counter(names), post, "one_each")
    cpu = meter.used()
    for suffix, role in (("service", "service"), ("nats", "nats-server")):
        result[f"one_each_cpu_s_per_1000_events_{suffix}"] = round(cpu[role] / max(post["accepted"], 1) * 1000, 3)
    result["consumers_after_one_each"] = service.consumers()

    schedule = hang_schedule(names, round(rate * seconds))
    mark, stuck_mark = sink.mark(), stuck.mark()
    meter = proctree.CpuMeter(service.pid)
    post = paced(service.url, rate, seconds, schedule)
    result |= delivered(sink, mark, Counter(d for d in schedule if d != STUCK), post, "hang")
    # Taken once the others' events are in: the hanging domain's retries are part of what it costs.
    result |= tree_figures(service, meter, post["accepted"])
    result["hang_stuck_sent"] = schedule.count(STUCK)
    stuck.poll()
    result["hang_stuck_received"] = stuck.received - stuck_mark.received
    result["consumers_after_hang"] = service.consumers()

    stop(service.process)
    for process in (sink.process, stuck.process):
        stop(process)
    return result
