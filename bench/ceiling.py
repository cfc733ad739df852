"""The ceiling: the worker's own loop and Kafka clients, copying records without parsing.

It is the real ``Runner`` with the real ``KafkaSource`` and ``KafkaSink`` (the client
settings, batch size and commit pacing of ``config/worker.toml``, and the guarantee: a
transaction per commit at ``exactly_once``), but its processor copies each input
record's key and value to one output topic. Whatever the worker does beyond this is the
cost of its own work.

``--shape worker`` copies instead into the records the worker writes for a group call
(``WorkerShaped``): through the repartition topic (``--stages 2``, the default layout)
or not (``--stages 1``, input keyed by groupId), then an enriched call, a membership
record and a dedupe id per call and a state record per group changed in a commit, the
changelogs written at the commit as the worker writes them. Its rate is what the Kafka
clients and the loop allow the worker's layout with no work per call at all.

``python -m bench.ceiling --bootstrap B --input T --output O --guarantee G --expect N``
drains ``N`` records and prints ``{"records": N, "seconds": s}`` as JSON: ``seconds`` runs
from the first record consumed to the ``N``-th processed (by the last stage). The worker
shape writes to ``O`` and to ``O.state``, ``O.members``, ``O.dedupe`` and
``O.repartition``, which must exist.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.generator import group_id_of
from worker.clock import SystemClock
from worker.config import load_config
from worker.events import SourceRecord
from worker.metrics import Metrics
from worker.pipeline import Settings, forward_headers, forwarded_arrival
from worker.processor import Processor, Routes, Tally
from worker.restore import Entry
from worker.runner import Runner, RunnerSettings
from worker.sink import KafkaSink, Sink
from worker.source import KafkaSource
from worker.store import Changelog, ChangelogOffsets, ChangelogRecord, InMemoryStateStore

__all__ = ["PassThrough", "WorkerShaped", "main"]

ROOT = Path(__file__).resolve().parents[1]
# A membership record as the worker writes one (``membership_record``: ~130 bytes).
_MEMBERSHIP = (
    b'{"groupId":"group-000000001234","userId":"user-00000000000000001234",'
    b'"firstSeenAt":"2024-01-01T00:00:00.000Z","lastSeenAt":"2024-01-01T00:00:00.000Z"}'
)


class PassThrough(Processor):
    """A ``Processor`` that copies records to ``output`` and stops the runner after ``expect``.

    ``store`` is the one the runner commits (default: an empty ``InMemoryStateStore``).
    """

    def __init__(
        self,
        routes: Routes,
        sink: Sink,
        output: str,
        expect: int,
        store: InMemoryStateStore | None = None,
    ) -> None:
        self.store = store if store is not None else InMemoryStateStore()
        super().__init__(routes, Settings(), self.store, sink, SystemClock(), dedupe_window_ms=0)
        self._out_sink = sink
        self._output = output
        self._expect = expect
        self.count = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.runner: Runner | None = None

    def process_some(
        self, records: list[SourceRecord], tally: Tally, *_: Any, **__: Any
    ) -> tuple[int, int, int]:
        self._started()
        produce, output = self._out_sink.produce, self._output
        for record in records:
            value = record.value()
            key = record.key()
            produce(
                output,
                key.encode() if isinstance(key, str) else key,
                value.encode() if isinstance(value, str) else (value or b""),
            )
        self._counted(len(records))
        return _tallied(tally, len(records))

    def _started(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def _counted(self, records: int) -> None:
        self.count += records
        if self.count >= self._expect and self.finished is None:
            self.finished = time.perf_counter()
            if self.runner is not None:
                self.runner.stop()


class _ChangeSet(InMemoryStateStore):
    """Changelog records as a store's change set gives them (``changes``), one per key,
    with no state behind them; the runner's commit and rollback close the set."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[Changelog, int, bytes], tuple[bytes, int]] = {}

    def changes(self) -> list[ChangelogRecord]:
        return [(c, p, key, value, ts) for (c, p, key), (value, ts) in self.records.items()]

    def commit(self, offsets: ChangelogOffsets | None = None) -> None:
        self.records.clear()

    def rollback(self) -> None:
        self.records.clear()


class WorkerShaped(PassThrough):
    """The worker's records for each input record, with none of its work.

    Stage one (when ``routes.repartition`` is set) copies a record to the repartition
    topic, keyed by its groupId (found by a byte search, not parsed: the benchmark's
    calls write it plainly). The last stage copies it to ``routes.enriched`` and puts a
    membership record, a dedupe id (its arrival as value) and the record as its
    group's state (one per group and commit) in its store's change set, which the
    worker's own ``write_changelog`` produces at the commit. Every record counts as a
    group call (the benchmark's input has 8% others), and the enriched and state records
    are the input's size (the worker's are ~1.3 and ~1 KB): if anything, more than the
    worker writes. Counts the last stage's records.
    """

    def __init__(self, routes: Routes, sink: Sink, expect: int) -> None:
        self._changes = _ChangeSet()
        super().__init__(routes, sink, routes.enriched, expect, self._changes)

    def process_some(
        self, records: list[SourceRecord], tally: Tally, *_: Any, **__: Any
    ) -> tuple[int, int, int]:
        self._started()
        produce, routes, changes = self._out_sink.produce, self._routes, self._changes.records
        now_ms = int(time.time() * 1000)  # the worker's clock, as the worker reads it
        last = 0
        repartition = routes.repartition
        for record in records:
            value = record.value()
            value = value.encode() if isinstance(value, str) else (value or b"")
            if repartition is not None and record.topic() != repartition:  # stage one
                arrival = record.timestamp()[1]
                produce(repartition, group_id_of(value), value, forward_headers(record, arrival))
                continue
            arrival = forwarded_arrival(record, now_ms) if repartition else record.timestamp()[1]
            partition, offset = record.partition() or 0, record.offset() or 0
            group = group_id_of(value)
            produce(routes.enriched, group, value)
            changes["state", partition, group] = (value, 0)
            member = b'["%s","userId","user-%020d"]' % (group, offset)
            changes["members", partition, member] = (_MEMBERSHIP, 0)
            seen = b'["%s","%036d"]' % (group, offset)
            changes["dedupe", partition, seen] = (b"%d" % arrival, arrival)
            last += 1
        self._counted(last)
        return _tallied(tally, len(records))


class _NoRestore:
    """A ``Restorer`` with nothing to restore: the pass-through keeps no state."""

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        return iter(())

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        return 0, 0

    def topic_ids(self, topics: Sequence[str]) -> list[str]:
        return ["" for _ in topics]

    def release(self, partition: int) -> None:
        pass

    def close(self) -> None:
        pass


def _tallied(tally: Tally, records: int) -> tuple[int, int, int]:
    """``process_some``'s answer for ``records`` records of a call each, counted into
    ``tally``: every record is passed through, whatever the budget."""
    tally.records += records
    tally.calls += records
    return records, records, 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--guarantee", choices=("exactly_once", "at_least_once"), default="exactly_once"
    )
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--shape", choices=("copy", "worker"), default="copy")
    parser.add_argument("--stages", type=int, choices=(1, 2), default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    # The worker's own defaults: client properties, batch size, commit pacing.
    config = load_config(ROOT / "config" / "worker.toml", environ={})
    w, properties = config.worker, config.kafka.properties
    clock = SystemClock()
    group = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    source = KafkaSource(args.bootstrap, group, properties)
    sink = KafkaSink(args.bootstrap, properties, args.guarantee, group, clock)
    processor: PassThrough
    if args.shape == "worker":
        o = args.output
        repartition = f"{o}.repartition" if args.stages == 2 else None
        routes = Routes(args.input, o, o, f"{o}.state", f"{o}.members", repartition, f"{o}.dedupe")
        processor = WorkerShaped(routes, sink, args.expect)
    else:
        routes = Routes(args.input, args.output, args.output, args.output, args.output)
        processor = PassThrough(routes, sink, args.output, args.expect)
    settings = RunnerSettings(
        routes, w.batch_size, w.commit_interval_ms / 1000, w.commit_max_records
    )
    runner = Runner(
        settings, source, sink, processor, processor.store, _NoRestore(), Metrics(), clock
    )
    processor.runner = runner
    timer = threading.Timer(args.timeout, runner.stop)
    timer.daemon = True
    timer.start()
    runner.run()
    timer.cancel()
    started, finished = processor.started, processor.finished
    seconds = (finished - started) if started is not None and finished is not None else None
    print(json.dumps({"records": processor.count, "seconds": seconds}))


if __name__ == "__main__":
    main()
