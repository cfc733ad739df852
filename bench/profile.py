"""Where a real worker's time goes end to end: ``python -m bench.profile``.

Fills a fresh input topic with ``--calls`` generated calls keyed by groupId, starts a
``group-worker run`` on it (exactly once), and while it drains records it with py-spy
(``--py-spy``: the path of a ``py-spy`` binary, which is not a dependency: ``pip install
py-spy`` anywhere), idle samples included, for ``--seconds``. Prints the drain rate, the
worker's own commit and processing times (from ``/metrics``) and, with py-spy, each
function's share of the main loop's samples (inclusive). Needs a broker (``make
kafka-up``, or the benchmark's); deletes its topics.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.runs import Topics, WorkerProcess, delete_topics, fill_topic, outcome_total

_POLL = 0.25


def main_loop_shares(raw: Path, top: int) -> list[tuple[float, str]]:
    """The inclusive share of each function in the samples of the runner's loop."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        if "Runner.run" not in frames:
            continue
        total += int(n)
        for name in set(frames):
            counts[name] += int(n)
    return [(100 * n / total, name) for name, n in counts.most_common(top)] if total else []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:39092")
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--py-spy", type=Path, help="a py-spy binary: also profile")
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy records")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results/logs.tmp"))
    args = parser.parse_args(argv)
    inputs, topics = Topics.fresh("input"), Topics.fresh("eos")
    keyed = inputs.name("keyed")
    raw = args.out / "profile.raw"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        fill_topic(args.bootstrap, keyed, args.calls, 1, by_group=True)
        worker = WorkerProcess(
            args.bootstrap,
            topics,
            keyed,
            args.out,
            settings={
                "worker_processing_guarantee": "exactly_once",
                "worker_input_keyed_by_group_id": "true",
            },
        )
        spy: subprocess.Popen[bytes] | None = None
        started: float | None = None
        try:
            while True:
                worker.check_alive()
                samples, now = worker.samples(), time.perf_counter()
                if started is None and samples.get("group_worker_calls_consumed_total", 0):
                    started = now
                    if args.py_spy:
                        command = [str(args.py_spy), "record", "-p", str(worker.process.pid)]
                        command += ["-d", str(args.seconds), "-r", "200", "-f", "raw"]
                        command += ["-o", str(raw), "--nonblocking", "--idle"]
                        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL)
                if started is not None and outcome_total(samples) >= args.calls:
                    break
                time.sleep(_POLL)
            seconds = now - started
            print(f"drained {args.calls:,} calls in {seconds:.1f} s: {args.calls / seconds:,.0f}/s")
            for name in ("processing", "commit"):
                total = samples.get(f"group_worker_{name}_duration_seconds_sum", 0.0)
                print(f"  {name}: {total:.1f} s in the worker's own histogram")
        finally:
            if spy is not None:
                spy.wait()
            worker.stop()
    finally:
        delete_topics(args.bootstrap, inputs.all + topics.all)
    if args.py_spy:
        print("share of the main loop's samples (inclusive, idle included):")
        for share, name in main_loop_shares(raw, args.top):
            print(f"  {share:5.1f}% {name}")


if __name__ == "__main__":
    main()
