"""Two checkouts measured at the same time: the CPU an event of each, and their ratio round by round.

Run from the project root, with two checkouts side by side (``git worktree add``):

    git worktree add /tmp/before e75d989
    python bench/together.py /tmp/before .                 # isolation, 4 rounds at 150 events/s, 20 s
    python bench/together.py /tmp/before . --rounds 6 --only fixed_rate

On this shared machine the speed changes from minute to minute: single runs of
the same code, one after the other, differ by a third, more than most changes
make. Here each round starts ``bench/run.py --runs 1`` of both checkouts at
once (each with its own service, nats-server, sinks and load; the one started
first alternates), so both see the same machine, and the round's figure is the
ratio of the two. Their absolute figures are higher than a lone run's (two of
everything on two cores, hence half the usual rate each); only the ratios mean
something. Each checkout runs its own bench/run.py with its own code on
PYTHONPATH, and keeps its JSON in its own bench/results/; this prints the
ratios (B / A), their median and spread, and writes them to bench/results/ of
the checkout it runs from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROCESSES = ("service", "nats", "total")


def run_both(checkouts: list[Path], first: int, arguments: list[str]) -> list[dict]:
    """One round: bench/run.py of every checkout at once; each one's results of its single run."""
    order = checkouts[first:] + checkouts[:first]
    started = {}
    for checkout in order:
        before = set((checkout / "bench" / "results").glob("*.json"))
        process = subprocess.Popen(
            [sys.executable, "bench/run.py", "--runs", "1", *arguments],
            cwd=checkout,
            env={**os.environ, "PYTHONPATH": str(checkout)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[checkout] = (process, before)
    results = []
    for checkout in checkouts:
        process, before = started[checkout]
        _, errors = process.communicate()
        if process.returncode:
            raise SystemExit(f"{checkout}: bench/run.py failed: {errors.strip().splitlines()[-1:]}")
        (written,) = set((checkout / "bench" / "results").glob("*.json")) - before
        results.append(json.loads(written.read_text())["variants"][0]["results"])
    return results


def cpu_an_event(result: dict) -> dict[str, dict[str, float]]:
    """Scenario → process → CPU-s per 1,000 events, for the scenarios that measure it."""
    return {
        scenario: {process: runs[0][f"cpu_s_per_1000_events_{process}"] for process in PROCESSES}
        for scenario, runs in result.items()
        if runs[0].get("cpu_s_per_1000_events_service") is not None
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout A (the before)")
    parser.add_argument("b", type=Path, help="checkout B (the after)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=float, default=150)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--only", nargs="*", default=["isolation"], help="bench/run.py scenarios")
    args = parser.parse_args()
    checkouts = [args.a.resolve(), args.b.resolve()]
    arguments = ["--rate", f"{args.rate:g}", "--seconds", f"{args.seconds:g}", "--only", *args.only]
    rounds = []
    for number in range(args.rounds):
        a, b = (cpu_an_event(result) for result in run_both(checkouts, number % 2, arguments))
        rounds.append({"a": a, "b": b})
        print(f"round {number + 1}: " + "; ".join(f"{s} service {a[s]['service']} → {b[s]['service']}" for s in a))
    print(f"\nCPU an event, B / A, each round, then the median (B = {checkouts[1]}, A = {checkouts[0]}):\n")
    print("| scenario | process | each round | median |")
    print("|---|---|---|---|")
    summary = {}
    for scenario in rounds[0]["a"]:
        for process in PROCESSES:
            ratios = [r["b"][scenario][process] / r["a"][scenario][process] for r in rounds]
            summary[f"{scenario} {process}"] = ratios
            each = " · ".join(f"{ratio:.3f}" for ratio in ratios)
            print(f"| {scenario} | {process} | {each} | {statistics.median(ratios):.3f} |")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = HERE / "results" / f"{stamp}-together.json"
    out.write_text(
        json.dumps(
            {
                "a": str(checkouts[0]),
                "b": str(checkouts[1]),
                "arguments": arguments,
                "rounds": rounds,
                "ratios": summary,
            },
            indent=1,
        )
    )
    print(f"\nJSON: {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
