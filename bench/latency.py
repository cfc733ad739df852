"""Latency of the worker at a fixed input rate (``measure_latency``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message

from bench.generator import generate_calls
from bench.process import Topics, WorkerProcess, outcome_total
from bench.runs import create_topic, delete_topics, fast_producer

__all__ = ["Latency", "measure_latency", "percentiles", "watch_committed"]

# Latencies of calls sent in the first seconds (worker warming up) are left out.
WARM_UP_SECONDS = 3.0


@dataclass(slots=True)
class Latency:
    """Latency of enriched records at a fixed input rate."""

    rate: float
    seconds: float
    calls: int
    produce_ms: list[float] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)

    def p99_by_part(self, parts: int = 10) -> list[float]:
        """The produced latency's p99 in each of ``parts`` equal runs of the records, in
        the order they were read (about the order they were sent): shows whether the tail
        is the start or the whole run."""
        size = len(self.produce_ms) // parts
        if not size:
            return []
        slices = (sorted(self.produce_ms[i * size : (i + 1) * size]) for i in range(parts))
        return [part[int(len(part) * 0.99)] for part in slices]

    def percentiles(self, which: str) -> dict[str, float]:
        return percentiles(self.produce_ms if which == "produce" else self.visible_ms)


def watch_committed(
    bootstrap: str, group: str, topic: str, stop: threading.Event, seen: Callable[[Any], None]
) -> None:
    """Hand ``seen`` each record of ``topic`` as soon as a ``read_committed`` consumer
    receives it, from the beginning, until ``stop`` is set. Blocks: run it on a thread."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            for m in consumer.consume(1000, 0.05):
                if m.error() is None:
                    seen(m)
    finally:
        consumer.close()


def percentiles(measured: Sequence[float]) -> dict[str, float]:
    """The p50, p99 and max of ``measured`` (NaN when there is none)."""
    values = sorted(measured)
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "p50": values[len(values) // 2],
        "p99": values[min(len(values) - 1, int(len(values) * 0.99))],
        "max": values[-1],
    }


def measure_latency(
    bootstrap: str,
    rate: float,
    seconds: float,
    log_dir: Path,
    seed: int = 2,
    variant: Sequence[str] = (),
) -> Latency:
    """Feed a running exactly-once worker ``rate`` calls/s for ``seconds``; time each.

    Calls sent in the first ``WARM_UP_SECONDS`` are sent but not counted, and the
    producer is warmed up before the first: its own start (connecting, getting a
    producer id) held the first calls back by about 0.5 s, stamped with the time they
    were produced, and the burst that followed took the worker seconds to absorb at half
    its rate: the p99 measured that, not the worker.

    Two latencies per enriched record, both from the input record's timestamp (its
    producer's clock, this process): ``produce_ms`` to the enriched record's timestamp
    (when the worker produced it), and ``visible_ms`` to when a ``read_committed``
    consumer here received it (after the worker's transaction committed).
    """
    topics = Topics.fresh("latency")
    input_topic = topics.name("raw")
    create_topic(bootstrap, input_topic)
    calls = int(rate * seconds)
    pending = [(key, value) for key, value, _ in generate_calls(calls, seed)]
    worker = WorkerProcess(bootstrap, topics, input_topic, log_dir, variant)
    result = Latency(rate, seconds, calls)
    arrivals: list[tuple[int, int, bytes]] = []  # (arrival ms, enriched record ts, value)
    stop = threading.Event()

    def arrived(m: Message) -> None:
        now = time.time_ns() // 1_000_000
        arrivals.append((now, m.timestamp()[1], m.value() or b""))

    try:
        worker.wait_ready()
        enriched, group = topics.name("enriched"), f"{topics.tag}-watch"
        watcher = threading.Thread(
            target=watch_committed, args=(bootstrap, group, enriched, stop, arrived), daemon=True
        )
        watcher.start()
        producer = fast_producer(bootstrap, **{"linger.ms": 1, "batch.size": 65536})
        warm_up = topics.name("out")
        create_topic(bootstrap, warm_up)
        producer.produce(warm_up, b"warm-up")
        if producer.flush(30):
            raise RuntimeError("the latency producer could not deliver its warm-up record")
        sent: dict[tuple[int, int], int] = {}

        def delivered(error: Any, message: Any) -> None:
            if error is None:
                sent[(message.partition(), message.offset())] = message.timestamp()[1]

        tick = 0.005
        first_sent_ms = [time.time_ns() // 1_000_000]
        started = time.perf_counter()
        index = 0
        while index < calls:
            due = min(calls, int((time.perf_counter() - started) * rate) + 1)
            while index < due:
                key, value = pending[index]
                producer.produce(input_topic, value, key, on_delivery=delivered)
                index += 1
            producer.poll(0)
            time.sleep(tick)
        producer.flush(60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            worker.check_alive()
            if outcome_total(worker.samples()) >= calls:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # the last transaction commits, the watcher reads it
        stop.set()
        watcher.join(10)
        warm = first_sent_ms[0] + WARM_UP_SECONDS * 1000
        for arrival, produced, value in arrivals:
            source = json.loads(value)["enrichment"]["source"]
            sent_ms = sent.get((source["partition"], source["offset"]))
            if sent_ms is not None and sent_ms >= warm:
                result.produce_ms.append(produced - sent_ms)
                result.visible_ms.append(arrival - sent_ms)
        return result
    finally:
        stop.set()
        worker.stop()
        delete_topics(bootstrap, topics.all)
