"""A hot group's backlog against every other group: ``python -m bench.fairness``.

Fills the input with ``--calls`` calls of one group (all on one partition: keyed by the
groupId, as the repartition topic is), starts a worker, and while it drains that
backlog sends one call of each of ``--probes`` other groups every ``--interval``
seconds, on the other partitions (groups are picked whose partition differs from the
hot one's, in both stages). Prints how long the probes took until a ``read_committed``
reader saw them enriched, and how fast the hot backlog drained. ``--batch N`` sends the
backlog in batch envelopes of N calls, as a library would. ``--trait-bytes N`` gives each
of the hot group's calls a new trait of N bytes, so its state grows to its bound (256
KiB) and every enriched call carries that profile. ``--set KEY=VALUE``
passes a setting to the worker (``kafka_consumer_queued_min_messages=2000``), so
consumer settings can be compared on the same command.

Not part of ``make bench``: it measures the wait behind a backlog, not a rate. It needs a
broker at ``--bootstrap`` (``KAFKA_PORT=39092 bash deploy/local-kafka/kafka.sh up``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.latency import percentiles, watch_committed
from bench.process import ROOT, Topics, WorkerProcess, outcome_total
from bench.runs import PARTITIONS, create_topic, delete_topics, fast_producer

_random = random.Random(5)


def _call(group: str, user: str, message_id: str) -> dict[str, Any]:
    """A call of about 800 bytes, as the benchmark's; its text compresses no better than
    real calls do (the worker's records are lz4-compressed, and what a fetch brings is
    counted in compressed bytes)."""
    traits = {"name": group, "plan": "pro", "description": _random.randbytes(300).hex()}
    call = {"type": "group", "groupId": group, "userId": user, "messageId": message_id}
    return call | {"traits": traits}


def _backlog(calls: int, batch: int, trait_bytes: int) -> Iterator[bytes]:
    """The hot group's calls, alone or in batch envelopes of ``batch`` calls, each with a
    new trait of ``trait_bytes`` (0: none)."""
    for start in range(0, calls, batch):
        chunk = [
            _call("hot", f"u{i % 1000}", f"hot-{i}")
            for i in range(start, min(start + batch, calls))
        ]
        if trait_bytes:
            for i, call in enumerate(chunk, start):
                call["traits"][f"t{i}"] = _random.randbytes(trait_bytes // 2).hex()
        yield json.dumps(chunk[0] if batch == 1 else {"batch": chunk}).encode()


def _partitions_of(producer: Producer, topic: str, keys: list[str]) -> dict[str, int]:
    """The partition the producer's partitioner gives each key (the worker's: murmur2)."""
    found: dict[str, int] = {}

    def delivered(error: Any, message: Any) -> None:
        found[message.key().decode()] = message.partition()

    for key in keys:
        producer.produce(topic, b"", key, on_delivery=delivered)
    producer.flush(30)
    return found


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none seen"
    p = percentiles(values)
    return f"p50 {p['p50']:.2f} s, p99 {p['p99']:.2f} s, max {p['max']:.2f} s ({len(values)})"


def run(args: argparse.Namespace) -> None:
    topics = Topics.fresh("fairness")
    raw, scratch = topics.name("raw"), topics.name("out")
    for name in (raw, scratch):
        create_topic(args.bootstrap, name, PARTITIONS)
    producer = fast_producer(args.bootstrap)
    candidates = [f"probe-{i}" for i in range(args.probes * 4)]
    placed = _partitions_of(producer, scratch, ["hot", *candidates])
    probes = [g for g in candidates if placed[g] != placed["hot"]][: args.probes]
    for value in _backlog(args.calls, args.batch, args.trait_bytes):
        producer.produce(raw, value, b"hot")
        producer.poll(0)
    producer.flush(120)
    sent_as = f"in envelopes of {args.batch}" if args.batch > 1 else "one a record"
    print(f"{args.calls:,} calls of one group ({sent_as}) on partition {placed['hot']} of {raw}")
    settings = dict(s.split("=", 1) for s in args.set)
    settings.setdefault("worker_input_keyed_by_group_id", str(args.stages == 1).lower())
    worker = WorkerProcess(args.bootstrap, topics, raw, Path(args.out), settings=settings)
    sent: dict[str, float] = {}
    waits: list[float] = []
    stop = threading.Event()

    def seen(m: Any) -> None:
        if m.key() != b"hot":
            message_id = json.loads(m.value() or b"{}").get("messageId")
            if message_id in sent:
                waits.append(time.time() - sent[message_id])

    enriched, group = topics.name("enriched"), f"{topics.tag}-watch"
    watcher = threading.Thread(
        target=watch_committed, args=(args.bootstrap, group, enriched, stop, seen), daemon=True
    )
    try:
        worker.wait_ready()
        watcher.start()
        started = time.perf_counter()
        probes_sent = 0
        for round_ in itertools.count():
            done = outcome_total(worker.samples())
            if done >= args.calls + probes_sent or time.perf_counter() - started > args.limit:
                break
            for group in probes:
                message_id = f"{group}-{round_}"
                sent[message_id] = time.time()
                producer.produce(raw, json.dumps(_call(group, "u1", message_id)).encode(), group)
                probes_sent += 1
            producer.poll(0)
            time.sleep(args.interval)
            worker.check_alive()
        seconds = time.perf_counter() - started
        producer.flush(30)
        time.sleep(2)  # the last probes' transaction commits and is read
    finally:
        stop.set()
        worker.stop()
        watcher.join(10)
        delete_topics(args.bootstrap, topics.all)
    print(f"hot backlog drained in {seconds:.1f} s: {args.calls / seconds:,.0f} calls/s")
    print(f"probes on other partitions, sent to seen enriched: {_percentiles(waits)}")
    print(f"probes sent {probes_sent}, seen {len(waits)}; settings {settings}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:39092")
    parser.add_argument("--calls", type=int, default=300_000, help="the hot group's backlog")
    parser.add_argument(
        "--batch", type=int, default=1, help="send the backlog in envelopes of this many calls"
    )
    parser.add_argument(
        "--trait-bytes", type=int, default=0, help="a new trait of this size in each hot call"
    )
    parser.add_argument("--probes", type=int, default=10, help="other groups")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between probes")
    parser.add_argument("--stages", type=int, choices=(1, 2), default=2)
    parser.add_argument("--limit", type=float, default=600, help="seconds at most")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / ".cache" / "fairness"), help="worker logs")
    args = parser.parse_args()
    # The worker dead-letters an envelope of more calls whole (too_large).
    if not 1 <= args.batch <= 2_000:
        parser.error("--batch: from 1 to 2000 calls")
    if args.trait_bytes < 0:
        parser.error("--trait-bytes: 0 or more")
    run(args)


if __name__ == "__main__":
    main()
