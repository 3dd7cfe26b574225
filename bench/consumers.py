"""nats-server's CPU per operation with N consumers on the event stream (issue 15's limit).

Run from the project root:

    python bench/consumers.py                      # 100, 1,000, 5,000 and 10,000 consumers, 3 runs
    python bench/consumers.py --counts 100 2500 --runs 1
    python bench/consumers.py --streams 16          # the same consumers spread over 16 event streams

For each count N, a fresh nats-server from the wheel (no service): the event
stream as the service makes it (work queue, file storage) and N domain
consumers as the service makes them, created 16 at a time. Then, on
``SAMPLE`` of those consumers one after the other: publish one event each,
fetch it, acknowledge it (waiting for the server's reply); then delete every
consumer. Each step's nats-server CPU is divided by how many it did. With
``--streams K`` the domains are spread over K such streams (each with its own
subjects), N/K consumers on each: what a sharded layout would cost.

Why it matters: every acknowledgement on a work-queue stream asks each
consumer of the stream whether it still needs the message (nats-server's
``checkForInterestWithSubject``), so an ack costs in proportion to the live
consumers, and so does creating one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
import proctree
from harness import HERE, free_port
from report import cell

from pipeline.config import NatsConfig
from pipeline.embedded_nats import server_binary
from pipeline.events import consumer_name, domain_subject
from pipeline.nats_bridge import CONSUMER_REQUESTS_AT_ONCE, domain_consumer_config
from pipeline.streams import Streams

SAMPLE = 1000
STEPS = ("create", "publish", "fetch", "ack", "delete")


async def connect(url: str) -> nats.NATS:
    async def quiet(error: Exception) -> None:
        """nats-py prints each refused connection while the server starts."""

    for _ in range(100):
        try:
            return await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0, error_cb=quiet)
        except (OSError, nats.errors.Error):
            await asyncio.sleep(0.05)
    raise SystemExit(f"nats-server at {url} did not answer")


def measure(count: int, streams: int) -> dict[str, float]:
    """nats-server CPU-ms per operation of each step, with ``count`` consumers over ``streams`` streams."""
    store = Path(tempfile.mkdtemp(prefix="tf-consumers-"))
    port = free_port()
    server = subprocess.Popen(
        [str(server_binary()), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return asyncio.run(exercise(f"nats://127.0.0.1:{port}", server.pid, count, streams))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(store, ignore_errors=True)


async def exercise(url: str, server: int, count: int, streams: int) -> dict[str, float]:
    """Create ``count`` consumers, then publish, fetch, ack a sample of them and delete them all; time each step."""
    shipped = NatsConfig()
    configs = (
        [
            NatsConfig(
                stream_name=f"{shipped.stream_name}-{n}",
                subject_pattern=shipped.subject_pattern.replace("*", f"s{n}.*"),
            )
            for n in range(streams)
        ]
        if streams > 1
        else [shipped]
    )
    client = await connect(url)
    try:
        js = client.jetstream()
        for config in configs:
            await js.add_stream(Streams(config).configs(consumer_limit=count + 1)["nats.max_bytes"])
        domains = [f"tenant-{n}.example.vn" for n in range(count)]
        home = {domain: configs[n % streams] for n, domain in enumerate(domains)}
        sample = domains[:SAMPLE]
        at_once = asyncio.Semaphore(CONSUMER_REQUESTS_AT_ONCE)
        cpu: dict[str, float] = {}
        done: dict[str, int] = {}

        async def step(name: str, operations: int, work) -> None:
            before = proctree.cpu_seconds(server)
            await work()
            cpu[name] = proctree.cpu_seconds(server) - before
            done[name] = operations

        async def create_one(domain: str) -> None:
            async with at_once:
                config = home[domain]
                await js.add_consumer(config.stream_name, domain_consumer_config(config, domain, 64))

        async def create() -> None:
            await asyncio.gather(*(create_one(domain) for domain in domains))

        await step("create", count, create)
        subscriptions = [
            await js.pull_subscribe_bind(durable=consumer_name(domain), stream=home[domain].stream_name)
            for domain in sample
        ]

        async def publish() -> None:
            for domain in sample:
                await js.publish(domain_subject(home[domain].subject_pattern, domain), b'{"domain": "x"}' * 20)

        messages = []

        async def fetch() -> None:
            for subscription in subscriptions:
                messages.extend(await subscription.fetch(1, timeout=5))

        async def ack() -> None:
            for message in messages:
                await message.ack_sync()

        async def delete_one(domain: str) -> None:
            async with at_once:
                await js.delete_consumer(home[domain].stream_name, consumer_name(domain))

        async def delete() -> None:
            await asyncio.gather(*(delete_one(domain) for domain in domains))

        await step("publish", len(sample), publish)
        await step("fetch", len(sample), fetch)
        await step("ack", len(messages), ack)
        await step("delete", count, delete)
        return {name: round(cpu[name] / done[name] * 1000, 3) for name in STEPS}
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1, help="event streams the consumers are spread over")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in args.counts}
    for run in range(1, args.runs + 1):
        for count in args.counts:
            started = time.monotonic()
            runs[count].append(measure(count, args.streams))
            print(f"run {run}, {count} consumers: {runs[count][-1]} ({time.monotonic() - started:.0f} s)", flush=True)
    output = HERE / "results" / f"consumers-{stamp}.json"
    output.write_text(
        json.dumps({"date": stamp, "runs": args.runs, "streams": args.streams, "by_consumers": runs}, indent=1) + "\n"
    )
    print(f"\nnats-server CPU-ms per operation, median (min–max) of {args.runs} runs, {args.streams} stream(s)")
    print("| consumers | " + " | ".join(STEPS) + " |")
    print("|---" * (len(STEPS) + 1) + "|")
    for count, found in runs.items():
        print(f"| {count:,} | " + " | ".join(cell([run[name] for run in found], 2) for name in STEPS) + " |")
    print(f"\nraw: {output.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
