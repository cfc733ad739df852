"""A commit's own work, without Kafka: ``python -m bench.commit``.

Each round changes ``--calls`` groups, memberships and dedupe ids over 6 partitions of a
``RocksDBStateStore`` (default cache) in a temporary directory, as that many merged
calls would, then times the three steps of a commit: ``Processor.write_changelog``
(encoding the change set and producing it to a sink that only counts),
``RocksDBStateStore.prepare`` (run while the transaction commits) and
``RocksDBStateStore.commit`` (the disk write, after it). Prints each step's median over
``--rounds`` rounds, the first five not counted. The states are small (one trait), so
encoding costs less here than in the hot path.

To compare two checkouts, run it with each one's ``worker`` on the path (``PYTHONPATH=
<checkout> python bench/commit.py`` from a directory without a ``worker/``); a checkout
without ``prepare`` times nothing for it and does that work in ``commit``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.hotpath import CountingSink, FixedClock
from worker.members import Membership
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.state import GroupState
from worker.store import RocksDBStateStore

_ROUTES = Routes("in", "enriched", "dlq", "state", "members", dedupe="dedupe")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="changes per commit")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    store = RocksDBStateStore(Path(tempfile.mkdtemp()), 32 << 20)
    processor = Processor(
        _ROUTES, Settings(), store, CountingSink(), FixedClock(), dedupe_window_ms=86_400_000
    )
    prepare = getattr(store, "prepare", lambda: None)
    steps: dict[str, list[float]] = {"write_changelog": [], "prepare": [], "commit": []}
    for n in range(args.rounds):
        for i in range(args.calls):
            partition, group = i % 6, f"g{(i * 7919 + n * 13) % 50_000}"
            store.put(partition, GroupState(group, {"v": n}, {"v": (n, "m")}, None, 1, n, 0, 0, 0))
            store.put_member(partition, f"{group}|u{i}", Membership(group, "userId", f"u{i}", 0, n))
            store.put_seen(partition, (group, f"m{n}-{i}"), 1_000 + i, 1_000 + i)
        for step, run in (
            ("write_changelog", processor.write_changelog),
            ("prepare", prepare),
            ("commit", store.commit),
        ):
            started = time.perf_counter()
            run()
            steps[step].append(time.perf_counter() - started)
    store.close()
    print(
        f"per commit of {args.calls:,} calls' changes: "
        + ", ".join(f"{s} {1e3 * statistics.median(t[5:]):.2f} ms" for s, t in steps.items())
    )


if __name__ == "__main__":
    main()
