"""Where a real worker's time goes end to end: ``python -m bench.profile``.

Fills a fresh input topic with ``--calls`` generated calls keyed by groupId (``--stages
1``, the default) or not (``--stages 2``: the default layout, through the repartition
topic), starts a ``group-worker run`` on it (exactly once), and while it drains records
it with py-spy (``--py-spy``: the path of a ``py-spy`` binary, which is not a
dependency: ``pip install py-spy`` anywhere), idle samples included, for ``--seconds``.
Prints the drain rate, the worker's own commit and processing times (from
``/metrics``) and, with py-spy, each function's share of the main loop's samples
(inclusive). Needs a broker (``make kafka-up``, or the benchmark's); deletes its topics.

``--peer`` profiles the peer instead (``bench.peer``, the same job in Quix Streams, in
its own interpreter: ``make bench`` builds it) on a keyed copy of the same calls, under
py-spy for its whole run; the shares are of its ``Application.run``.
"""

from __future__ import annotations

import argparse
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.process import Topics, WorkerProcess
from bench.runs import delete_topics, drain_worker, fill_topic, run_peer


def main_loop_shares(raw: Path, top: int, loop: str = "Runner.run") -> list[tuple[float, str]]:
    """The inclusive share of each function in the samples of ``loop``."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        if loop not in frames:
            continue
        total += int(n)
        for name in set(frames):
            counts[name] += int(n)
    return [(100 * n / total, name) for name, n in counts.most_common(top)] if total else []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:39092")
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--stages", type=int, choices=(1, 2), default=1)
    parser.add_argument("--py-spy", type=Path, help="a py-spy binary: also profile")
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy records")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results/logs.tmp"))
    parser.add_argument("--peer", action="store_true", help="profile the peer (keyed)")
    args = parser.parse_args(argv)
    if args.peer:
        profile_peer(args.bootstrap, args.calls, args.py_spy, args.out, args.top)
        return
    inputs = Topics.fresh("input")
    keyed = args.stages == 1
    topic = inputs.name("keyed" if keyed else "raw")
    raw = args.out / "profile.raw"
    spies: list[subprocess.Popen[bytes]] = []

    def spy(worker: WorkerProcess) -> None:
        command = [str(args.py_spy), "record", "-p", str(worker.process.pid), "-r", "200"]
        command += ["-d", str(args.seconds), "-f", "raw", "-o", str(raw), "--nonblocking"]
        spies.append(subprocess.Popen([*command, "--idle"], stdout=subprocess.DEVNULL))

    try:
        fill_topic(args.bootstrap, topic, args.calls, 1, by_group=keyed)
        drain = drain_worker(
            args.bootstrap,
            topic,
            args.calls,
            "exactly_once",
            args.out,
            keyed=keyed,
            on_start=spy if args.py_spy else None,
        )
    finally:
        for process in spies:
            process.wait()
        delete_topics(args.bootstrap, [*inputs.all, topic])
    print(f"drained {args.calls:,} calls in {drain.seconds:.1f} s: {drain.calls_per_second:,.0f}/s")
    print(f"  processing: {drain.processing_seconds:.1f} s in the worker's own histogram")
    print(f"  commit: {drain.commit_seconds:.1f} s in the worker's own histogram")
    if args.py_spy:
        print("share of the main loop's samples (inclusive, idle included):")
        for share, name in main_loop_shares(raw, args.top):
            print(f"  {share:5.1f}% {name}")


def profile_peer(bootstrap: str, calls: int, py_spy: Path, out: Path, top: int) -> None:
    """Run the peer on ``calls`` keyed calls under ``py_spy``; print its rate and shares."""
    topic = Topics.fresh("input").name("keyed")
    raw = out / "peer.raw"
    spy = [str(py_spy), "record", "-r", "200", "-f", "raw", "-o", str(raw), "--"]
    try:
        fill_topic(bootstrap, topic, calls, 1, by_group=True)
        peer = run_peer(bootstrap, topic, calls, out, wrapper=spy)
    finally:
        delete_topics(bootstrap, [topic])
    print(f"peer: {calls:,} calls in {peer.seconds:.1f} s: {peer.calls_per_second:,.0f}/s")
    print("share of Application.run's samples (inclusive):")
    for share, name in main_loop_shares(raw, top, "Application.run"):
        print(f"  {share:5.1f}% {name}")


if __name__ == "__main__":
    main()
