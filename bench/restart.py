"""A worker holding many groups: its rebuild from the changelogs, its restart, its memory.

``measure_restart`` runs the real worker (``bench.runs.WorkerProcess``) on changelog
topics filled directly, as a worker's config names them (``Topics.worker_environ``):

1. fill: ``groups`` state records (``worker.profile.state_record``, format 2) in the state
   topic, ``members_per_group`` memberships each in the members topic and
   ``seen_per_group`` dedupe ids each in the dedupe topic (key ``seen_record_key``,
   value and timestamp the arrival ms, within the last hour so none has expired). Each
   group's records go to the partition the worker's producer puts it on (murmur2 of the
   groupId, read back from the state records' delivery reports);
2. bare: a bare consumer (``read_committed``, every partition assigned, read to the end,
   nothing else) reads the three topics: the rate a rebuild is compared with;
3. rebuild: a worker with an empty ``state_dir``, timed from its launch to ``/readyz``
   200; its restore time and records come from its metrics. Then the first half of
   ``calls`` generated calls (``bench.generator``: their groups are among the filled
   ones) is drained, and the worker's peak RSS (``VmHWM``) read after each;
4. restart: SIGTERM, then a worker on the same ``state_dir``, timed from its launch to
   ``/readyz`` 200, with the records it replayed (``restored_records_total``); then the
   second half of the calls is drained, its redeliveries of the first half's calls
   included;
5. bare again: the rate compared with is the better of the two reads.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from bench import report
from bench.generator import Mix, generate_calls
from bench.process import Topics, WorkerProcess, outcome_total
from bench.runs import PARTITIONS, bare_read, create_topic, delete_topics, fast_producer
from bench.state import state_records
from worker import codec
from worker.dedupe import seen_record_key
from worker.members import Membership, membership_key, membership_record

__all__ = ["Restart", "WorkerStart", "measure_restart"]

_COMPACT = {"cleanup.policy": "compact"}
# As ``worker.topics`` creates the dedupe topic: the window (24 h) plus its margin.
_DEDUPE = {"cleanup.policy": "compact,delete", "retention.ms": str(25 * 3_600_000)}
_ARRIVAL_SPREAD_MS = 3_600_000
_POLL = 0.05
_DRAIN_TIMEOUT = 900.0


@dataclass(frozen=True, slots=True)
class WorkerStart:
    """One start of the worker: to ready, what it replayed, its peak RSS, its drain."""

    ready_seconds: float
    restored_records: float
    restore_seconds: float
    store_rebuilds: float
    groups: float
    seen: float
    members: float
    peak_rss_ready_bytes: int
    calls: int = 0
    drain_seconds: float = 0.0
    duplicates: float = 0.0
    peak_rss_calls_bytes: int = 0
    exit_code: int | None = None


@dataclass(slots=True)
class Restart:
    """The whole step's figures (``bench.__main__`` puts them in the results)."""

    groups: int
    seen: int
    members: int
    fill_seconds: float
    bare: list[tuple[int, float]] = field(default_factory=list)  # (records, seconds)
    starts: list[WorkerStart] = field(default_factory=list)
    mixes: list[Mix] = field(default_factory=list)
    changelog_records: int = 0  # in the three topics when the restart began

    @property
    def records(self) -> int:
        return self.groups + self.seen + self.members

    def to_json(self) -> dict[str, Any]:
        rebuild = self.starts[0] if self.starts else None
        bare_rate = max((n / s for n, s in self.bare if s), default=0.0)
        out: dict[str, Any] = {
            "groups": self.groups,
            "dedupe_ids": self.seen,
            "memberships": self.members,
            "records": self.records,
            "fill_seconds": self.fill_seconds,
            "bare": [{"records": n, "seconds": s, "rate": n / s} for n, s in self.bare if s],
            "bare_rate": bare_rate,
            "changelog_records_at_restart": self.changelog_records,
            "redeliveries": sum(m.redeliveries for m in self.mixes),
            "late_redeliveries": sum(m.late_duplicate for m in self.mixes),
            "starts": [
                {k: getattr(s, k) for k in WorkerStart.__dataclass_fields__} for s in self.starts
            ],
        }
        if rebuild is not None and rebuild.restore_seconds:
            out["rebuild_rate"] = rebuild.restored_records / rebuild.restore_seconds
            out["rebuild_rate_to_ready"] = rebuild.restored_records / rebuild.ready_seconds
        return out


def _produce(producer: Producer, topic: str, value: bytes, **kwargs: Any) -> None:
    while True:
        try:
            producer.produce(topic, value, **kwargs)
            return
        except BufferError:  # the local queue is full: serve deliveries, then again
            producer.poll(0.05)


def _finish(producer: Producer, topic: str, errors: list[str]) -> None:
    remaining = producer.flush(120)
    if remaining or errors:
        raise RuntimeError(f"producing to {topic} failed: {remaining} left, {errors[:3]}")


def _group_id(index: int) -> str:
    # The generator's spelling (``group-00042``), so its calls land on filled groups.
    return f"group-{index:05d}"


def _fill_states(bootstrap: str, topic: str, groups: int) -> array[int]:
    """Produce the state records; returns each group's partition, as delivered."""
    partitions = array("b", bytes(groups))
    errors: list[str] = []

    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            errors.append(error.str())
        else:
            partitions[int((message.key() or b"")[6:])] = message.partition() or 0

    producer = fast_producer(bootstrap, on_delivery=delivered)
    for key, value in state_records(groups, _group_id):
        _produce(producer, topic, value, key=key)
    _finish(producer, topic, errors)
    return partitions


def _fill_by_group(
    bootstrap: str,
    topic: str,
    partitions: array[int],
    records: Iterable[tuple[int, bytes, bytes, int]],
) -> int:
    """Produce ``(group index, key, value, timestamp)`` records to their group's partition."""
    errors: list[str] = []

    def delivered(error: KafkaError | None, _: Message) -> None:
        if error is not None:
            errors.append(error.str())

    producer = fast_producer(bootstrap, on_delivery=delivered)
    count = 0
    for index, key, value, timestamp in records:
        _produce(producer, topic, value, key=key, partition=partitions[index], timestamp=timestamp)
        count += 1
    _finish(producer, topic, errors)
    return count


def _memberships(
    groups: int, per_group: int, now_ms: int
) -> Iterator[tuple[int, bytes, bytes, int]]:
    for index in range(groups):
        group_id = _group_id(index)
        for member in range(per_group):
            user = f"user-{index:07d}-{member}"
            m = Membership(group_id, "userId", user, now_ms - 86_400_000, now_ms)
            key = membership_key(group_id, "userId", user).encode()
            yield index, key, codec.encode(membership_record(m)), 0


def _seen_ids(groups: int, per_group: int, now_ms: int) -> Iterator[tuple[int, bytes, bytes, int]]:
    rng = random.Random(11)
    for index in range(groups):
        group_id = _group_id(index)
        for call in range(per_group):
            message_id = f"ajs-next-{index:07d}-{call:03d}-{rng.getrandbits(64):016x}"
            arrival = now_ms - rng.randrange(_ARRIVAL_SPREAD_MS)
            key = seen_record_key(group_id, message_id).encode()
            yield index, key, b"%d" % arrival, arrival


def _topic_records(bootstrap: str, topics: Iterable[str]) -> int:
    """Offsets held by ``topics`` (high minus low watermarks, every partition)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    total = 0
    for topic in topics:
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
    consumer.close()
    return total


def _metric(samples: dict[str, float], name: str) -> float:
    return samples.get(name, 0.0)


def _drain(
    worker: WorkerProcess, bootstrap: str, topic: str, calls: list[tuple[bytes, bytes]]
) -> tuple[float, float]:
    """Produce ``calls`` and wait until each has an outcome; returns the seconds since
    producing began and the duplicates counted so far."""
    before = outcome_total(worker.samples())
    started = time.perf_counter()
    producer = fast_producer(bootstrap)
    for key, value in calls:
        _produce(producer, topic, value, key=key)
    _finish(producer, topic, [])
    deadline = time.monotonic() + _DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        worker.check_alive()
        samples = worker.samples()
        if outcome_total(samples) - before >= len(calls):
            seconds = time.perf_counter() - started
            return seconds, samples.get('group_worker_outcomes_total{outcome="duplicate"}', 0.0)
        time.sleep(0.25)
    raise RuntimeError(f"the worker did not drain {len(calls)} calls in {_DRAIN_TIMEOUT:.0f}s")


def _start(
    bootstrap: str,
    topics: Topics,
    log_dir: Path,
    state_dir: Path,
    name: str,
    calls: list[tuple[bytes, bytes]],
) -> WorkerStart:
    """Start a worker on ``state_dir``, wait for ready, drain ``calls``, stop it."""
    worker = WorkerProcess(
        bootstrap, topics, topics.name("raw"), log_dir, state_dir=state_dir, log_name=name
    )
    try:
        ready = worker.wait_ready(timeout=_DRAIN_TIMEOUT, poll=_POLL)
        samples = worker.samples()
        peak_ready = worker.peak_rss_bytes()
        drain_seconds, duplicates = (
            _drain(worker, bootstrap, topics.name("raw"), calls) if calls else (0.0, 0.0)
        )
        peak_calls = worker.peak_rss_bytes()
    finally:
        code = worker.stop()
    return WorkerStart(
        ready,
        _metric(samples, "group_worker_restored_records_total"),
        _metric(samples, "group_worker_restore_duration_seconds_sum"),
        _metric(samples, "group_worker_store_rebuilds_total"),
        _metric(samples, "group_worker_groups_in_state"),
        _metric(samples, "group_worker_dedupe_ids_in_state"),
        _metric(samples, "group_worker_members_in_state"),
        peak_ready,
        len(calls),
        drain_seconds,
        duplicates,
        peak_calls,
        code,
    )


def measure_restart(
    bootstrap: str,
    groups: int,
    seen_per_group: int,
    members_per_group: int,
    calls: int,
    log_dir: Path,
    seed: int = 1,
) -> Restart:
    """Fill, rebuild, restart (module docstring); blocks for minutes at 1,000,000 groups."""
    topics = Topics.fresh("restart")
    state, members, dedupe = topics.name("state"), topics.name("members"), topics.name("dedupe")
    changelogs = (state, members, dedupe)
    try:
        create_topic(bootstrap, topics.name("raw"), PARTITIONS)
        create_topic(bootstrap, state, config=_COMPACT)
        create_topic(bootstrap, members, config=_COMPACT)
        create_topic(bootstrap, dedupe, config=_DEDUPE)
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        partitions = _fill_states(bootstrap, state, groups)
        held = _fill_by_group(
            bootstrap, members, partitions, _memberships(groups, members_per_group, now_ms)
        )
        seen = _fill_by_group(
            bootstrap, dedupe, partitions, _seen_ids(groups, seen_per_group, now_ms)
        )
        result = Restart(groups, seen, held, time.perf_counter() - started)
        print(f"bench: filled {result.records:,} records in {result.fill_seconds:.1f} s")
        result.bare.append(bare_read(bootstrap, changelogs))
        generated = list(generate_calls(calls, seed))
        halves = (generated[: calls // 2], generated[calls // 2 :])
        for half in halves:
            counts = {k: 0 for k in ("group", "other", "bad", "duplicate", "late_duplicate")}
            for _, _, kind in half:
                counts[kind] += 1
            result.mixes.append(Mix(**counts))
        with tempfile.TemporaryDirectory(prefix="bench-restart-") as state_dir:
            for name, half in zip(("-rebuild", "-restart"), halves, strict=True):
                if name == "-restart":
                    result.changelog_records = _topic_records(bootstrap, changelogs)
                start = _start(
                    bootstrap,
                    topics,
                    log_dir,
                    Path(state_dir),
                    name,
                    [(key, value) for key, value, _ in half],
                )
                result.starts.append(start)
                print(
                    f"bench: worker{name}: ready in {start.ready_seconds:.1f} s, "
                    f"{start.restored_records:,.0f} records restored in "
                    f"{start.restore_seconds:.1f} s, peak RSS "
                    f"{max(start.peak_rss_ready_bytes, start.peak_rss_calls_bytes) / 1e6:,.0f} MB"
                )
        result.bare.append(bare_read(bootstrap, changelogs))
        return result
    finally:
        delete_topics(bootstrap, topics.all)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.restart --groups N``: this step alone; prints its rows and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:39092")
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--seen-per-group", type=int, default=5)
    parser.add_argument("--members-per-group", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/results/logs.tmp"))
    args = parser.parse_args(argv)
    result = measure_restart(
        args.bootstrap,
        args.groups,
        args.seen_per_group,
        args.members_per_group,
        args.calls,
        args.log_dir,
    )
    out = result.to_json()
    print(report.write_table(report.restart_rows(out, report.TARGETS)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
