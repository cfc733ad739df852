"""Group state on the real broker: many workers, kills and rebalances end in the exact fold."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.fakes import FakeClock, FakeSink
from tests.integration.harness import (
    BOOTSTRAP,
    PARTITIONS,
    Topics,
    WorkerProcess,
    cli,
    free_port,
    produce,
    read_topic,
    values,
    wait_until,
)
from worker import codec
from worker.events import Record
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.store import InMemoryStateStore

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
T0 = 1_764_000_000_000


def calls(n: int, seed: int) -> list[dict[str, Any]]:
    """Seeded group calls over 30 groups and 80 members, with repeated messageIds."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        if out and rng.random() < 0.05:
            out.append(rng.choice(out))  # a redelivery: same messageId, same content
            continue
        traits: dict[str, Any] = {
            rng.choice(["name", "Plan", "industry", "employees"]): rng.choice(
                ["a", "b", "c", None, 10]
            )
        }
        if rng.random() < 0.2:
            traits["address"] = {"city": rng.choice(["Paris", "Oslo", None])}
        out.append(
            {
                "type": "group",
                "messageId": f"m{seed}-{i}",
                "userId": f"u{rng.randrange(80)}",
                "groupId": f"g{rng.randrange(30)}",
                "timestamp": _iso(T0 + rng.randrange(DAY_MS // 2)),
                "traits": traits,
            }
        )
    return out


def _iso(ms: int) -> str:
    from worker.times import format_time

    return format_time(ms)


def fold(all_calls: list[dict[str, Any]], topics: Topics) -> tuple[dict[str, Any], dict[str, Any]]:
    """Group profiles and memberships from folding every call in one process, as the
    deployment of ``topics`` writes them (its state records name it)."""
    sink = FakeSink(transactional=False)
    store = InMemoryStateStore(topics.group_id)
    routes = Routes("in", "out", "dlq", "state", "members")
    processor = Processor(
        routes,
        Settings(),
        store,
        sink,
        FakeClock(),
        dedupe_window_ms=DAY_MS,
    )
    processor.process([Record("in", 0, n, codec.encode(c)) for n, c in enumerate(all_calls)])
    processor.write_changelog()
    return latest(sink.open, "state"), latest(sink.open, "members")


def latest(records: list[Any], topic: str | None = None) -> dict[str, Any]:
    """The newest value per key, without processing time, as compaction keeps it."""
    out: dict[str, Any] = {}
    for r in records:
        if topic is not None and r.topic != topic:
            continue
        key = r.key if topic is not None else r.key()
        value = codec.decode(r.value if topic is not None else r.value())
        value.pop("updatedAt", None)
        out[key.decode()] = value
    return out


def topic_state(topics: Topics) -> tuple[dict[str, Any], dict[str, Any]]:
    return latest(read_topic(topics.state, idle=2)), latest(read_topic(topics.members, idle=2))


def assert_converges(topics: Topics, expected: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Wait until the state and members topics hold exactly the fold, then compare."""
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def matches() -> bool:
        seen.append(topic_state(topics))
        return seen[-1] == expected

    try:
        wait_until(matches, 180, "the state topic to equal the fold")
    except AssertionError:
        states, members = seen[-1]
        wrong = [g for g in expected[0] if states.get(g) != expected[0][g]]
        raise AssertionError(
            f"{len(wrong)} groups differ, e.g. {wrong[:3]}; "
            f"members {len(members)} vs {len(expected[1])}"
        ) from None


def keyed_by_user(batch: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes | None]]:
    return [(c["userId"].encode(), codec.encode(c)) for c in batch]


def test_workers_killed_joining_and_leaving_end_with_the_fold(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Workers SIGKILLed, joining, leaving and rejoining on their own local stores, so
    partitions move back and forth onto stale copies: state is the fold."""
    all_calls = calls(6000, seed=1)
    quarters = [all_calls[n : n + 1500] for n in range(0, 6000, 1500)]
    settings = {"TOPICS_PARTITIONS": "6", "WORKER_BATCH_SIZE": "200"}

    def worker(name: str) -> WorkerProcess:
        started = WorkerProcess(topics, tmp_path, name, WORKER_INSTANCE_ID=name, **settings)
        workers.append(started.start())
        return started

    a, b = worker("a"), worker("b")
    produce(topics.input, keyed_by_user(quarters[0]))
    wait_until(lambda: a.progress() > 0, 60, "a to work")
    a.stop(signal.SIGKILL)

    produce(topics.input, keyed_by_user(quarters[1]))
    a = worker("a")  # back on its files, which b's writes have since made stale
    c = worker("c")
    produce(topics.input, keyed_by_user(quarters[2]))
    wait_until(lambda: c.progress() > 0, 60, "c to work")
    assert c.stop(signal.SIGTERM) == 0
    c = worker("c")  # rejoins on its files
    produce(topics.input, keyed_by_user(quarters[3]))
    wait_until(lambda: c.progress() > 0, 60, "c to work again")
    assert c.stop(signal.SIGTERM) == 0

    assert_converges(topics, fold(all_calls, topics))
    assert a.stop() == 0
    assert b.stop() == 0
    assert any(w.logged("partition_restored") for w in (a, b, c))
    stale = [w for w in (a, b, c) if w.logged("store_partition_stale")]
    assert not stale, "a copy was rebuilt, not replayed from"


def test_input_keyed_by_group_id_and_restart_without_re_emitting_memberships(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Input keyed by groupId needs no repartition; a restart restores and re-sends nothing."""
    first_calls = calls(1500, seed=2)
    settings = {"WORKER_INPUT_KEYED_BY_GROUP_ID": "true"}
    first = WorkerProcess(topics, tmp_path, "first", **settings)
    workers.append(first.start())
    produce(topics.input, [(c["groupId"].encode(), codec.encode(c)) for c in first_calls])
    assert_converges(topics, fold(first_calls, topics))
    assert first.sample("group_worker_repartitioned_calls_total") == 0
    # Produced with murmur2_random: each call on the partition the worker computes for it.
    assert first.sample("group_worker_unkeyed_calls_total") == 0
    assert first.stop() == 0
    members_before = len(read_topic(topics.members, idle=2))

    # The same members again, within the times already seen: no membership moves.
    again = [dict(c, messageId=f"again-{n}") for n, c in enumerate(first_calls[:300])]
    second = WorkerProcess(topics, tmp_path, "second", **settings)
    workers.append(second.start())
    assert second.sample("group_worker_restored_records_total") > 0
    produce(topics.input, [(c["groupId"].encode(), codec.encode(c)) for c in again])
    expected_states, _ = fold(first_calls + again, topics)
    assert_converges(topics, fold(first_calls + again, topics))
    assert len(read_topic(topics.members, idle=2)) == members_before
    assert second.stop() == 0

    dumped = cli(topics, "state", "dump")
    assert dumped.returncode == 0, dumped.stderr
    profiles = [codec.decode(line) for line in dumped.stdout.splitlines()]
    for profile in profiles:
        profile.pop("updatedAt")
    assert {profile["groupId"]: profile for profile in profiles} == expected_states
    one = codec.decode(cli(topics, "state", "get", "g7").stdout)
    one.pop("updatedAt")
    assert one == expected_states["g7"]
    assert cli(topics, "state", "get", "no-such-group").returncode == 1


def test_a_switch_to_keyed_input_refuses_calls_left_in_the_repartition_topic(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Switched to input_keyed_by_group_id = true, a deployment no longer reads its
    repartition topic. After a clean drain in two stages, the keyed worker starts (the
    topic's transaction markers are no calls); with a call its first stage left there (a
    worker killed between the stages) a start stops, exit 2, naming the topic, as the
    call would be lost unseen; once its group has read past it, it starts."""
    keyed = {"WORKER_INPUT_KEYED_BY_GROUP_ID": "true"}
    two_stages = WorkerProcess(topics, tmp_path, "two-stages")
    workers.append(two_stages.start())
    sent = calls(300, seed=4)
    produce(topics.input, [(c["userId"].encode(), codec.encode(c)) for c in sent])
    assert_converges(topics, fold(sent, topics))
    assert two_stages.stop() == 0
    switched = WorkerProcess(topics, tmp_path, "keyed", **keyed)
    workers.append(switched.start())
    assert switched.stop() == 0

    produce(topics.repartition, [(b"g1", codec.encode(sent[0]))])
    settings = {"WORKER_STATE_DIR": str(tmp_path / "state"), "HTTP_PORT": str(free_port())}
    result = cli(topics, "run", **keyed, **settings)
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert f"topic {topics.repartition} holds calls" in lines[0], lines

    reader = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": topics.group_id})
    ends = [TopicPartition(topics.repartition, p) for p in range(PARTITIONS)]
    for end in ends:
        end.offset = reader.get_watermark_offsets(end, timeout=10)[1]
    reader.commit(offsets=ends, asynchronous=False)
    reader.close()
    workers.append(switched.start())
    assert switched.stop() == 0


def test_a_state_record_of_a_newer_format_stops_the_worker_at_restore(tmp_path: Path) -> None:
    """A state record this worker cannot read stops it when its partition is restored,
    with the local store: exit 2 and one line naming the topic, partition and format."""
    topics = Topics.unique()
    settings = {
        "TOPICS_PARTITIONS": str(PARTITIONS),
        "WORKER_STATE_DIR": str(tmp_path / "state"),
        "HTTP_PORT": str(free_port()),
    }
    assert cli(topics, "topics", "create", **settings).returncode == 0
    record = {"groupId": "g1", "traits": {}, "merge": {"format": 99, "calls": []}}
    produce(topics.state, [(b"g1", codec.encode(record))])
    result = cli(topics, "run", **settings)
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert f"topic {topics.state} partition " in lines[0], lines
    assert "state record format 99" in lines[0], lines


def test_the_worker_goes_on_with_stage_one_while_a_long_restore_runs(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A stateful partition restoring for seconds holds up neither stage one nor the
    consumer: calls are read and repartitioned while it restores (the restore ran in
    the rebalance callback, and the worker did nothing else meanwhile), and every call
    is enriched once after it."""
    assert cli(topics, "topics", "create").returncode == 0
    producer = Producer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "linger.ms": 50,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    for n in range(600_000):  # seconds of restore: memberships are replayed unparsed
        producer.produce(topics.members, b"{}", b"fill-%d" % n, partition=0)
        if n % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    sent = [{**c, "messageId": f"m{n}"} for n, c in enumerate(calls(300, seed=5))]
    produce(topics.input, [(None, codec.encode(c)) for c in sent])
    worker = WorkerProcess(topics, tmp_path)
    workers.append(worker.start(wait=False))
    both: dict[str, float] = {}  # a moment of stage one committed while restoring
    deadline = time.monotonic() + 90
    while not worker.ready() and time.monotonic() < deadline:
        if worker.get("/metrics")[0] == 200:
            restoring = worker.sample("group_worker_restoring_partitions")
            forwarded = worker.sample("group_worker_repartitioned_calls_total")
            if restoring and forwarded and not both:
                both = {"restoring": restoring, "repartitioned": forwarded}
        time.sleep(0.05)
    assert worker.ready(), worker.log()
    assert both, f"nothing repartitioned while restoring:\n{worker.log()}"
    enriched = values(read_topic(topics.enriched, expect=300))
    assert Counter(c["messageId"] for c in enriched) == Counter(c["messageId"] for c in sent)
    assert not worker.logged("partitions_lost")
