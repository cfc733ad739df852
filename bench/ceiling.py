"""The ceiling: the worker's own loop and Kafka clients, copying records without parsing.

It is the real ``Runner`` with the real ``KafkaSource`` and ``KafkaSink`` (the client
settings, batch size and commit pacing of ``config/worker.toml``, and the guarantee: a
transaction per commit at ``exactly_once``), but its processor copies each input
record's key and value to one output topic. Whatever the worker does beyond this is the
cost of its own work.

``python -m bench.ceiling --bootstrap B --input T --output O --guarantee G --expect N``
drains ``N`` records and prints ``{"records": N, "seconds": s}`` as JSON: ``seconds`` runs
from the first record consumed to the ``N``-th processed.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from worker.clock import SystemClock
from worker.config import load_config
from worker.events import SourceRecord
from worker.metrics import Metrics
from worker.pipeline import Settings
from worker.processor import Processor, Routes, Tally
from worker.restore import Entry
from worker.runner import Runner, RunnerSettings
from worker.sink import KafkaSink, Sink
from worker.source import KafkaSource
from worker.store import InMemoryStateStore

__all__ = ["PassThrough", "main"]

ROOT = Path(__file__).resolve().parents[1]


class PassThrough(Processor):
    """A ``Processor`` that copies records to ``output`` and stops the runner after ``expect``."""

    def __init__(self, routes: Routes, sink: Sink, output: str, expect: int) -> None:
        super().__init__(
            routes, Settings(), InMemoryStateStore(), sink, SystemClock(), dedupe_window_ms=0
        )
        self._out_sink = sink
        self._output = output
        self._expect = expect
        self.count = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.runner: Runner | None = None

    def process(self, records: list[SourceRecord]) -> Tally:
        if self.started is None:
            self.started = time.perf_counter()
        produce, output = self._out_sink.produce, self._output
        for record in records:
            value = record.value()
            key = record.key()
            produce(
                output,
                key.encode() if isinstance(key, str) else key,
                value.encode() if isinstance(value, str) else (value or b""),
            )
        self.count += len(records)
        if self.count >= self._expect and self.finished is None:
            self.finished = time.perf_counter()
            if self.runner is not None:
                self.runner.stop()
        return Tally(records=len(records), calls=len(records))

    def write_changelog(self) -> int:
        return 0


class _NoRestore:
    """A ``Restorer`` with nothing to restore: the pass-through keeps no state."""

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        return iter(())

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        return 0, 0

    def topic_ids(self, topics: Sequence[str]) -> list[str]:
        return ["" for _ in topics]

    def close(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--guarantee", choices=("exactly_once", "at_least_once"), default="exactly_once"
    )
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    # The worker's own defaults: client properties, batch size, commit pacing.
    config = load_config(ROOT / "config" / "worker.toml", environ={})
    w, properties = config.worker, config.kafka.properties
    clock = SystemClock()
    group = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    source = KafkaSource(args.bootstrap, group, properties)
    sink = KafkaSink(args.bootstrap, properties, args.guarantee, group, clock)
    routes = Routes(args.input, args.output, args.output, args.output, args.output)
    processor = PassThrough(routes, sink, args.output, args.expect)
    settings = RunnerSettings(
        routes, w.batch_size, w.commit_interval_ms / 1000, w.commit_max_records
    )
    runner = Runner(
        settings, source, sink, processor, InMemoryStateStore(), _NoRestore(), Metrics(), clock
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
