"""The local state store on the real broker: dedupe by arrival, restarts and rebuilds."""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Topics, WorkerProcess, produce, read_topic, values, wait_until
from tests.integration.test_state import assert_converges, calls, fold, latest
from tests.unit.test_store_rocksdb import flip_bytes
from worker import codec
from worker.times import format_time

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


def by_group(batch: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes | None]]:
    return [(c["groupId"].encode(), codec.encode(c)) for c in batch]


def test_a_busy_group_dedupes_every_redelivery_whatever_its_event_time(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """5,000 calls to one group with event times over three days, then 500 of them again
    (the oldest, as a phone retrying what it queued offline, among them): each call is
    enriched once and counted once, through the repartition stage."""
    now = int(time.time() * 1000)
    busy: list[dict[str, Any]] = [
        {
            "type": "group",
            "messageId": f"busy-{i}",
            "userId": f"u{i % 50}",
            "groupId": "busy",
            "timestamp": format_time(now - 3 * DAY_MS + i * (3 * DAY_MS // 5000)),
            "traits": {"n": i},
        }
        for i in range(5000)
    ]
    again = busy[:100] + random.Random(3).sample(busy[100:], 400)
    worker = WorkerProcess(topics, tmp_path, "w").start()
    workers.append(worker)
    produce(topics.input, [(c["userId"].encode(), codec.encode(c)) for c in busy])
    wait_until(
        lambda: worker.sample("group_worker_outcomes_total", outcome="enriched") == 5000,
        120,
        "5,000 calls enriched",
    )
    produce(topics.input, [(c["userId"].encode(), codec.encode(c)) for c in again])
    wait_until(
        lambda: worker.sample("group_worker_outcomes_total", outcome="duplicate") == 500,
        60,
        "500 duplicates",
    )
    enriched = [call["messageId"] for call in values(read_topic(topics.enriched, expect=5000))]
    assert sorted(enriched) == sorted(c["messageId"] for c in busy)
    assert latest(read_topic(topics.state, idle=2))["busy"]["eventCount"] == 5000
    assert worker.sample("group_worker_outcomes_total", outcome="enriched") == 5000
    assert worker.stop() == 0


def changelog_records(topics: Topics) -> int:
    return sum(len(read_topic(t, idle=2)) for t in (topics.state, topics.members, topics.dedupe))


def test_a_killed_worker_replays_only_the_tail_and_a_wiped_one_rebuilds(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """SIGKILLed, a worker comes back on its local store and replays only what its
    changelogs gained since; with the store wiped it replays them all. Both end with
    the state of a fold of every call."""
    settings = {"WORKER_INPUT_KEYED_BY_GROUP_ID": "true"}
    batches = [calls(1500, seed=11), calls(300, seed=12), calls(300, seed=13)]

    def start() -> WorkerProcess:
        worker = WorkerProcess(topics, tmp_path, "w", **settings).start()
        workers.append(worker)
        return worker

    worker = start()
    produce(topics.input, by_group(batches[0]))
    assert_converges(topics, fold(batches[0], topics))
    worker.stop(signal.SIGKILL)
    held = changelog_records(topics)

    worker = start()
    tail = worker.sample("group_worker_restored_records_total")
    produce(topics.input, by_group(batches[1]))
    assert_converges(topics, fold(batches[0] + batches[1], topics))
    assert tail < held / 10, f"replayed {tail} of {held} changelog records"
    assert worker.sample("group_worker_store_rebuilds_total") == 0
    assert worker.stop() == 0

    held = changelog_records(topics)
    shutil.rmtree(tmp_path / "w.state")
    worker = start()
    assert worker.sample("group_worker_restored_records_total") == held
    produce(topics.input, by_group(batches[2]))
    assert_converges(topics, fold(batches[0] + batches[1] + batches[2], topics))
    assert worker.stop() == 0


def test_damaged_store_files_are_rebuilt_without_a_crash_loop(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Store files damaged while the worker was away (blocks that fail their checksum;
    the files still open): the worker rebuilds the partitions it finds damaged, at
    restore or at the first read, and goes on. Every call again, and new ones: the state
    is the fold, each call enriched once."""
    settings = {"WORKER_INPUT_KEYED_BY_GROUP_ID": "true"}
    batches = [calls(1500, seed=21), calls(300, seed=22)]
    worker = WorkerProcess(topics, tmp_path, "w", **settings).start()
    workers.append(worker)
    produce(topics.input, by_group(batches[0]))
    assert_converges(topics, fold(batches[0], topics))
    assert worker.stop() == 0
    tables = list((tmp_path / "w.state").rglob("*.sst"))
    assert tables
    for table in tables:  # the middle of each table file: its index and footer stay
        size = table.stat().st_size
        flip_bytes(table, size // 10, size * 6 // 10)

    worker = WorkerProcess(topics, tmp_path, "w", **settings).start()
    workers.append(worker)
    produce(topics.input, by_group(batches[0] + batches[1]))
    assert_converges(topics, fold(batches[0] + batches[1], topics))
    assert worker.sample("group_worker_store_rebuilds_total") >= 1
    distinct = {c["messageId"] for c in batches[0] + batches[1]}
    read = values(read_topic(topics.enriched, expect=len(distinct), idle=2))
    assert sorted(call["messageId"] for call in read) == sorted(distinct)
    assert worker.stop() == 0
