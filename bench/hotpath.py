"""The hot path without Kafka: decode, normalise, merge, encode, in this process.

``measure_hot_path`` runs the worker's own ``Processor`` over generated records with a
sink that only counts what it is given and the worker's store (``RocksDBStateStore`` in
a temporary directory, default cache), committing (and so writing the coalesced
changelog, then the store) after every batch as the runner does. It measures
one core: the calling thread, and CPU time as well as wall time.

``python -m bench.hotpath --calls 200000 [--stages 1|2] [--repeat N] [--profile]
[--in-memory]`` runs it alone and prints the CPU time per call of each step of the loop
(processing, changelog, the store's prepare and commit); ``--repeat`` prints the median
of N runs (on a shared machine one run can be 20% off; each has a fresh store, but the
normaliser's memos stay warm after the first), ``--profile`` a pyinstrument profile
(``pip install '.[bench]'``), ``--in-memory`` the same over ``InMemoryStateStore``, to
see what the RocksDB store costs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.generator import generate_calls
from worker.events import Record, SourceRecord
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.service import tune_allocator, tune_collector
from worker.sink import Headers, Refusal
from worker.source import NO_CUTS, Cuts, Offsets, Source
from worker.store import InMemoryStateStore, RocksDBStateStore, StateStore

__all__ = ["CountingSink", "FixedClock", "HotPathResult", "make_records", "measure_hot_path"]

_TOPIC = "segment.raw"
_REPARTITION = "group-worker.repartition"
_BATCH = 1000
_DEDUPE_WINDOW_MS = 86_400_000
_CACHE_BYTES = 32 << 20  # worker.state_cache_mb's default


class CountingSink:
    """A ``Sink`` that keeps only the repartition records and counts the rest."""

    def __init__(self) -> None:
        self.records = 0
        self.bytes: Counter[str] = Counter()
        self.largest: Counter[str] = Counter()
        self.forwarded: list[tuple[bytes | None, bytes]] = []

    def begin(self) -> None:
        pass

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None:
        self.records += 1
        self.bytes[topic] += len(value)
        if len(value) > self.largest[topic]:
            self.largest[topic] = len(value)
        if topic == _REPARTITION:
            self.forwarded.append((key, value))

    def commit(
        self,
        offsets: Offsets,
        source: Source,
        last_records: Callable[[], None] = lambda: None,
        meanwhile: Callable[[], None] = lambda: None,
        cuts: Cuts = NO_CUTS,
    ) -> Offsets:
        last_records()
        meanwhile()
        return {}

    def abort(self) -> None:
        pass

    def renew(self) -> None:
        pass

    def poll(self) -> None:
        pass

    def backlog(self) -> int:
        return 0

    def take_refused(self) -> list[Refusal]:
        return []

    def close(self) -> None:
        pass


class FixedClock:
    """A clock that never moves: the hot path reads it once per batch."""

    def monotonic(self) -> float:
        return 0.0

    def now_ms(self) -> int:
        return 1_704_067_200_000

    def sleep(self, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class HotPathResult:
    """One hot-path measurement."""

    stages: int
    calls: int
    wall_seconds: float
    cpu_seconds: float
    records_out: int
    groups: int
    bytes_out: dict[str, int]
    largest_out: dict[str, int]
    # CPU seconds of each step of the loop: processing, changelog, prepare, commit.
    step_seconds: dict[str, float]

    @property
    def calls_per_second(self) -> float:
        """Calls per second of CPU time of the one thread that ran them."""
        return self.calls / self.cpu_seconds if self.cpu_seconds else 0.0


def make_records(n: int, seed: int = 1) -> list[Record]:
    """The generated calls as consumed records of one input partition."""
    ts = 1_704_067_200_000
    return [
        Record(_TOPIC, 0, offset, value, key, ts)
        for offset, (key, value, _) in enumerate(generate_calls(n, seed))
    ]


def measure_hot_path(
    records: Sequence[Record], *, stages: int = 1, in_memory: bool = False
) -> HotPathResult:
    """Process ``records`` in batches of 1,000 and time it.

    ``stages=1`` is the input keyed by groupId (one stateful stage); ``stages=2`` is the
    default layout, where stage one re-encodes each group call for the repartition topic
    and stage two decodes it again before merging. ``in_memory``: over
    ``InMemoryStateStore`` instead of the worker's RocksDB store.
    """
    sink = CountingSink()
    directory = tempfile.TemporaryDirectory(prefix="bench-hotpath-")
    store: StateStore = (
        InMemoryStateStore() if in_memory else RocksDBStateStore(Path(directory.name), _CACHE_BYTES)
    )
    routes = Routes(
        _TOPIC, "enriched", "dlq", "state", "members", _REPARTITION if stages == 2 else None
    )
    processor = Processor(
        routes, Settings(), store, sink, FixedClock(), dedupe_window_ms=_DEDUPE_WINDOW_MS
    )
    # The input records are the benchmark's, not the worker's: keep the collector from
    # rescanning them (a worker holds one batch at a time, not the whole input).
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    tune_allocator()  # as the worker runs
    tune_collector()
    steps = dict.fromkeys(("processing", "changelog", "prepare", "commit"), 0.0)
    clock = time.thread_time
    wall, cpu = time.perf_counter(), clock()
    offset = 0
    for start in range(0, len(records), _BATCH):
        t0 = clock()
        batch: list[SourceRecord] = list(records[start : start + _BATCH])
        processor.process(batch)
        if sink.forwarded:
            forwarded: list[SourceRecord] = [
                Record(_REPARTITION, 0, offset + i, value, key, 0)
                for i, (key, value) in enumerate(sink.forwarded)
            ]
            offset += len(forwarded)
            sink.forwarded.clear()
            processor.process(forwarded)
        t1 = clock()
        processor.write_changelog()
        t2 = clock()
        store.prepare()  # as the runner, while the transaction commits
        t3 = clock()
        store.commit()
        t4 = clock()
        steps["processing"] += t1 - t0
        steps["changelog"] += t2 - t1
        steps["prepare"] += t3 - t2
        steps["commit"] += t4 - t3
    cpu = clock() - cpu
    wall = time.perf_counter() - wall
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    groups = store.group_count()
    store.close()
    directory.cleanup()
    return HotPathResult(
        stages,
        len(records),
        wall,
        cpu,
        sink.records,
        groups,
        dict(sink.bytes),
        dict(sink.largest),
        steps,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stages", type=int, choices=(1, 2), default=1)
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs (each with a fresh store); prints the median"
    )
    parser.add_argument(
        "--in-memory", action="store_true", help="InMemoryStateStore instead of RocksDB"
    )
    args = parser.parse_args(argv)
    records = make_records(args.calls, args.seed)
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        results = [measure_hot_path(records, stages=args.stages, in_memory=args.in_memory)]
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
    else:
        results = [
            measure_hot_path(records, stages=args.stages, in_memory=args.in_memory)
            for _ in range(args.repeat)
        ]
    for result in results:
        print(
            f"hot path, {result.stages} stage(s): {result.calls:,} calls in "
            f"{result.cpu_seconds:.2f} s CPU ({result.wall_seconds:.2f} s wall): "
            f"{result.calls_per_second:,.0f} calls/s; {result.groups:,} groups"
        )
        steps = result.step_seconds.items()
        per_call = ", ".join(f"{step} {t / result.calls * 1e6:.1f}" for step, t in steps)
        print(f"  µs of CPU per call: {per_call}")
    if len(results) > 1:
        rates = [r.calls_per_second for r in results]
        print(
            f"median of {len(rates)}: {statistics.median(rates):,.0f} calls/s "
            f"(range {min(rates):,.0f}-{max(rates):,.0f})"
        )
    for topic, size in sorted(result.bytes_out.items()):
        print(
            f"  {topic}: {size / result.calls:,.0f} bytes per input call, "
            f"largest record {result.largest_out[topic]:,} bytes"
        )


if __name__ == "__main__":
    main()
