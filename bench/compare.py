"""Two checkouts side by side: ``python -m bench.compare BEFORE AFTER``.

Runs ``python -m bench.hotpath`` in each checkout (a directory with its own ``worker/``
and ``bench/``, e.g. ``git worktree add /tmp/before <commit>``), alternating which goes
first, ``--pairs`` times, and prints each side's median and the ratio. On a shared
machine one run can be 20% off; alternating pairs keep a drift in load from favouring
either side. Same interpreter for both (this one).

``--drain BOOTSTRAP`` compares end to end instead: one input topic of ``--calls``
generated calls is filled on that broker (keyed by groupId at ``--stages 1``), and a
real worker process from each checkout drains it exactly once (``bench.runs.
drain_worker``), in the same alternating pairs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench import runs


def hot_path_rate(checkout: Path, calls: int, stages: int) -> float:
    """One ``bench.hotpath`` run in ``checkout``: its calls per second of CPU time."""
    command = [sys.executable, "-m", "bench.hotpath", "--calls", str(calls)]
    done = subprocess.run(
        [*command, "--stages", str(stages)], cwd=checkout, capture_output=True, text=True
    )
    found = re.search(r"([\d,]+) calls/s", done.stdout)
    if done.returncode or found is None:
        raise RuntimeError(f"bench.hotpath failed in {checkout}:\n{done.stderr[-2000:]}")
    return float(found.group(1).replace(",", ""))


def drain_rate(checkout: Path, bootstrap: str, topic: str, calls: int, keyed: bool) -> float:
    """A worker from ``checkout`` drains ``topic`` (``calls`` calls) exactly once: its
    calls per second (``bench.runs.drain_worker``)."""
    logs = Path(tempfile.gettempdir()) / "bench-compare-logs"
    drain = runs.drain_worker(
        bootstrap, topic, calls, "exactly_once", logs, keyed=keyed, root=checkout
    )
    return drain.calls_per_second


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--stages", type=int, choices=(1, 2), default=1)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--drain", metavar="BOOTSTRAP", help="end to end, on this broker")
    args = parser.parse_args(argv)
    rates: dict[Path, list[float]] = {args.before: [], args.after: []}
    rate: Callable[[Path], float] = partial(hot_path_rate, calls=args.calls, stages=args.stages)
    topic = f"bench-compare-{uuid.uuid4().hex[:6]}.raw"
    if args.drain:
        keyed = args.stages == 1
        runs.fill_topic(args.drain, topic, args.calls, seed=1, by_group=keyed)
        rate = partial(drain_rate, bootstrap=args.drain, topic=topic, calls=args.calls, keyed=keyed)
    try:
        for pair in range(args.pairs):
            order = (args.before, args.after) if pair % 2 == 0 else (args.after, args.before)
            for checkout in order:
                rates[checkout].append(rate(checkout))
    finally:
        if args.drain:
            runs.delete_topics(args.drain, [topic])
    medians = {checkout: statistics.median(r) for checkout, r in rates.items()}
    for name, checkout in (("before", args.before), ("after", args.after)):
        observed = ", ".join(f"{r:,.0f}" for r in rates[checkout])
        print(f"{name}: median {medians[checkout]:,.0f} calls/s ({observed})")
    print(f"after / before: {medians[args.after] / medians[args.before]:.2f}x")


if __name__ == "__main__":
    main()
