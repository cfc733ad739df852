"""Two checkouts' hot paths side by side: ``python -m bench.compare BEFORE AFTER``.

Runs ``python -m bench.hotpath`` in each checkout (a directory with its own ``worker/``
and ``bench/``, e.g. ``git worktree add /tmp/before <commit>``), alternating which goes
first, ``--pairs`` times, and prints each side's median and the ratio. On a shared
machine one run can be 20% off; alternating pairs keep a drift in load from favouring
either side. Same interpreter for both (this one).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--stages", type=int, choices=(1, 2), default=1)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args(argv)
    rates: dict[Path, list[float]] = {args.before: [], args.after: []}
    for pair in range(args.pairs):
        order = (args.before, args.after) if pair % 2 == 0 else (args.after, args.before)
        for checkout in order:
            rates[checkout].append(hot_path_rate(checkout, args.calls, args.stages))
    medians = {checkout: statistics.median(r) for checkout, r in rates.items()}
    for name, checkout in (("before", args.before), ("after", args.after)):
        runs = ", ".join(f"{r:,.0f}" for r in rates[checkout])
        print(f"{name}: median {medians[checkout]:,.0f} calls/s ({runs})")
    print(f"after / before: {medians[args.after] / medians[args.before]:.2f}x")


if __name__ == "__main__":
    main()
