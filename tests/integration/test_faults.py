"""Faults on the real broker: kills, a broker restart, hostile input, shutdown under load."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions

from tests.fakes import FakeClock, FakeSink
from tests.integration.harness import (
    BOOTSTRAP,
    ROOT,
    Topics,
    WorkerProcess,
    cli,
    create_topic,
    produce,
    read_topic,
    values,
    wait_until,
)
from tests.integration.harness import PARTITIONS as COUNT
from tests.integration.test_state import DAY_MS, assert_converges, calls, fold
from worker import codec
from worker.events import Record
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.store import InMemoryStateStore

pytestmark = pytest.mark.integration

PARTITIONS = {"TOPICS_PARTITIONS": "6"}


def stream(n: int, seed: int) -> tuple[list[tuple[bytes | None, bytes | None]], set[str], int]:
    """Keyed records: group calls (some redelivered) with 1% bad ones mixed in.

    Returns the records, the distinct valid messageIds and the number of bad records.
    """
    rng = random.Random(seed)
    good = calls(n, seed)
    records: list[tuple[bytes | None, bytes | None]] = []
    bad = 0
    for call in good:
        records.append((call["userId"].encode(), codec.encode(call)))
        if rng.random() < 0.01:
            records.append((b"bad", b'{"type": "group", "userId": "u", "traits": {}}'))
            bad += 1
    return records, {c["messageId"] for c in good}, bad


def assert_exactly_once(topics: Topics, valid: set[str], bad: int) -> list[dict[str, Any]]:
    """Every valid call enriched once (by messageId and by source), every bad one dead once."""
    enriched = values(read_topic(topics.enriched, expect=len(valid), idle=5, timeout=240))
    by_id = Counter(c["messageId"] for c in enriched)
    by_source = Counter(tuple(c["enrichment"]["source"].values()) for c in enriched)
    assert set(by_id) == valid, f"lost: {len(valid - set(by_id))}"
    assert max(by_id.values()) == 1, f"duplicated: {sum(v > 1 for v in by_id.values())}"
    assert max(by_source.values()) == 1
    letters = values(read_topic(topics.dlq, expect=bad, idle=2))
    assert Counter(letter["reason"] for letter in letters) == {"missing_group_id": bad}
    return enriched


def message_id(record: Message) -> object:
    return codec.decode(record.value() or b"")["messageId"]


def kill_repeatedly(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path, kills: int, **settings: str
) -> WorkerProcess:
    """Start a worker, SIGKILL it ``kills`` times at random moments, return the last one.

    Static membership (as with the StatefulSet) lets each restart take over at once
    instead of waiting for the killed member's session to time out.
    """
    rng = random.Random(7)
    for n in range(kills + 1):
        worker = WorkerProcess(
            topics,
            tmp_path,
            f"w{n}",
            WORKER_INSTANCE_ID="w",
            WORKER_BATCH_SIZE="500",
            **PARTITIONS,
            **settings,
        )
        workers.append(worker.start())
        if n < kills:
            time.sleep(rng.uniform(0.5, 3.0))
            worker.stop(signal.SIGKILL)
    return worker


def test_kill_test_exactly_once(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """100,000 calls with five SIGKILLs: every call enriched once, state equal to the fold."""
    records, valid, bad = stream(100_000, seed=11)
    create_topic(topics.input, 6)
    produce(topics.input, records)
    last = kill_repeatedly(topics, workers, tmp_path, kills=5)
    assert_exactly_once(topics, valid, bad)
    assert_converges(topics, fold(calls(100_000, seed=11), topics))
    assert last.stop() == 0


def test_kill_test_at_least_once_loses_nothing(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """At least once, five SIGKILLs lose no call; repeats are allowed and counted."""
    records, valid, bad = stream(30_000, seed=12)
    create_topic(topics.input, 6)
    produce(topics.input, records)
    last = kill_repeatedly(
        topics, workers, tmp_path, kills=5, WORKER_PROCESSING_GUARANTEE="at_least_once"
    )
    # Repeats reach len(valid) records before the last calls: count distinct ones.
    enriched = values(
        read_topic(topics.enriched, expect=len(valid), idle=5, timeout=240, distinct=message_id)
    )
    by_id = Counter(c["messageId"] for c in enriched)
    assert set(by_id) == valid, f"lost: {len(valid - set(by_id))} of {len(valid)}"
    repeated = sum(n - 1 for n in by_id.values())
    print(f"at_least_once: {repeated} repeated enriched records after 5 kills")
    letters = values(read_topic(topics.dlq, expect=bad, idle=2))
    assert len(letters) >= bad
    assert last.stop() == 0


def kafka_script(action: str) -> None:
    port = BOOTSTRAP.rsplit(":", 1)[1]
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "local-kafka" / "kafka.sh"), action],
        env={"KAFKA_PORT": port, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_broker_restart_loses_and_duplicates_nothing(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """The broker stopped for 10 s mid-stream: the worker recovers alone, exactly once.

    This stops and starts the broker the tests run against.
    """
    records, valid, bad = stream(20_000, seed=13)
    worker = WorkerProcess(topics, tmp_path, WORKER_INSTANCE_ID="solo", **PARTITIONS)
    workers.append(worker.start())
    produce(topics.input, records[:10_000])
    wait_until(lambda: worker.progress() > 1_000, 60, "progress before the outage")
    kafka_script("down")
    time.sleep(10)
    kafka_script("up")
    produce(topics.input, records[10_000:])
    assert worker.process is not None
    assert worker.process.poll() is None, worker.log()
    assert_exactly_once(topics, valid, bad)
    assert worker.stop() == 0


# Over worker.max_batch_bytes (512 KiB) but within the dead-letter topic's 1 MB, with
# characters of two bytes (a cut at a byte count would split one).
OVERSIZED_BATCH = (
    b'{"batch": [' + b",".join([b'{"type": "group", "d": "\xc3\xa9"}'] * 20_000) + b"]}"
)
POISON: list[tuple[str, bytes | None]] = [
    ("invalid_json", b"\xc3\x28\xa0\xa1 invalid utf-8"),
    ("invalid_json", b'{"type": "group", "groupId": "g", "userId": "u", "traits": {"na'),
    ("invalid_json", b"[" * 100_000 + b"]" * 100_000),
    ("invalid_json", b'{"type": "group", "groupId": "g", "userId": "u", "n": NaN}'),
    ("invalid_json", b'{"type": "group", "groupId": "g", "userId": "u", "n": Infinity}'),
    (
        "invalid_json",
        b'{"type": "group", "groupId": "g", "userId": "u", "n": 1' + b"0" * 400 + b"}",
    ),
    ("invalid_json", b""),
    ("invalid_json", None),
    ("not_an_object", b"12345"),
    ("too_large", b'{"type": "group", "traits": {"d": "' + b"x" * 200_000 + b'"}}'),
    ("too_large", b'"' + b"x" * 10_000_000 + b'"'),
    ("too_large", OVERSIZED_BATCH),
    ("missing_type", b'{"type": 7, "groupId": "g", "userId": "u"}'),
    ("missing_group_id", b'{"type": "group", "groupId": {"id": "g"}, "userId": "u"}'),
    ("missing_group_id", b'{"type": "group", "groupId": "g", "groupId": null, "userId": "u"}'),
    ("missing_identity", b'{"type": "group", "groupId": "g", "userId": ["u"]}'),
    ("invalid_traits", b'{"type": "group", "groupId": "g", "userId": "u", "traits": 5}'),
    ("invalid_message_id", b'{"type": "group", "groupId": "g", "userId": "u", "messageId": {}}'),
    ("invalid_batch", b'{"batch": 1}'),
]


def test_poison_corpus_is_dead_lettered_and_the_worker_goes_on(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Each hostile input lands in the dead-letter topic with its reason; the worker never stops."""
    create_topic(topics.input, 3, **{"max.message.bytes": str(16 * 1024 * 1024)})
    worker = WorkerProcess(topics, tmp_path)
    workers.append(worker.start())
    produce(topics.input, [(None, value) for _, value in POISON], max_bytes=16 * 1024 * 1024)
    produce(topics.input, [(b"k", codec.encode(calls(1, seed=3)[0]))])

    letters = values(read_topic(topics.dlq, expect=len(POISON)))
    assert Counter(letter["reason"] for letter in letters) == Counter(r for r, _ in POISON)
    huge = next(letter for letter in letters if len(letter.get("value") or "") > 900_000)
    assert huge["truncated"] is True
    # A batch over worker.max_batch_bytes that the dead-letter topic takes is kept whole.
    [batch] = [
        letter for letter in letters if (letter.get("value") or "").startswith('{"batch": [')
    ]
    assert batch["value"].encode() == OVERSIZED_BATCH
    assert "truncated" not in batch
    assert len(values(read_topic(topics.enriched, expect=1))) == 1
    assert worker.process is not None
    assert worker.process.poll() is None


def test_partitions_added_to_a_running_deployment_stop_it_with_one_line(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Partitions added to the input while the worker runs stop it, exit 2, with one
    line naming the topic: calls keyed by groupId then hash to other partitions than
    their groups' state, and a worker that went on split each group in two."""
    worker = WorkerProcess(topics, tmp_path)
    workers.append(worker.start())
    produce(topics.input, [(b"k", codec.encode(calls(1, seed=3)[0]))])
    assert len(values(read_topic(topics.enriched, expect=1))) == 1
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_partitions([NewPartitions(topics.input, COUNT + 2)])[topics.input].result(30)

    assert worker.process is not None
    assert worker.process.wait(90) == 2, worker.log()
    lines = [line for line in worker.log().splitlines() if not line.startswith("{")]
    assert lines == [
        f"group-worker: topic {topics.input} has partition {COUNT}, beyond the "
        f"{COUNT} its topics had when the worker started: partitions added to a running "
        "deployment move groups away from their state; its partition count cannot change "
        'in place (README, "Changing the partition count")'
    ], worker.log()


def test_duplicate_keys_take_the_last_value_like_segment() -> None:
    """A JSON object with a repeated key keeps its last value, as JSON.parse does."""
    from worker.events import Enriched, Record
    from worker.pipeline import Settings, process_record

    value = b'{"type": "group", "groupId": "a", "groupId": "b", "userId": "u"}'
    [outcome] = process_record(Record("t", 0, 0, value), Settings(), 0)
    assert isinstance(outcome, Enriched)
    assert outcome.group_id == "b"


def test_sigterm_under_load_exits_promptly_and_loses_nothing(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """SIGTERM while calls flow: exit 0 within 10 s, and a successor finishes the rest once."""
    records, valid, bad = stream(40_000, seed=14)
    worker = WorkerProcess(topics, tmp_path, "first", **PARTITIONS)
    workers.append(worker.start())
    produce(topics.input, records)
    wait_until(lambda: worker.progress() > 2_000, 60, "load")
    started = time.monotonic()
    assert worker.stop(signal.SIGTERM, timeout=10) == 0
    print(f"SIGTERM to exit: {time.monotonic() - started:.2f}s")
    successor = WorkerProcess(topics, tmp_path, "second", **PARTITIONS)
    workers.append(successor.start())
    assert_exactly_once(topics, valid, bad)
    assert successor.stop() == 0


def test_sigterm_with_the_broker_away_exits_within_the_shutdown_budget(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """SIGTERM while the broker is down: the worker exits (1 when its last batch could not
    commit, 0 when it had none) within its shutdown budget plus 5 s, not at the
    orchestrator's SIGKILL, and a successor loses and duplicates nothing. This stops and
    starts the broker the tests run against.
    """
    records, valid, bad = stream(10_000, seed=15)
    settings = {"WORKER_SHUTDOWN_TIMEOUT_SECONDS": "3", **PARTITIONS}
    worker = WorkerProcess(topics, tmp_path, "first", **settings)
    workers.append(worker.start())
    produce(topics.input, records[:5_000])
    wait_until(lambda: worker.progress() > 1_000, 60, "progress before the outage")
    kafka_script("down")
    try:
        started = time.monotonic()
        code = worker.stop(signal.SIGTERM, timeout=60)
        took = time.monotonic() - started
    finally:
        kafka_script("up")
    print(f"SIGTERM to exit with the broker down: {took:.2f}s, exit code {code}")
    assert took < 3 + 5 + 4, worker.log()
    produce(topics.input, records[5_000:])
    successor = WorkerProcess(topics, tmp_path, "second", **PARTITIONS)
    workers.append(successor.start())
    assert_exactly_once(topics, valid, bad)
    assert successor.stop() == 0


def test_a_worker_paused_past_its_transaction_timeout_goes_on(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) mid-transaction for longer than the transaction's
    timeout goes on exactly once when it wakes, where it exited 1 before: it aborts and
    replays (librdkafka bumps the producer's epoch), or, with its producer fenced or in
    an invalid transaction state, builds a new loop."""
    records, valid, bad = stream(30_000, seed=16)
    worker = WorkerProcess(topics, tmp_path, WORKER_INSTANCE_ID="paused", **PARTITIONS)
    workers.append(worker.start())
    produce(topics.input, records)
    wait_until(lambda: worker.progress() > 1_000, 60, "progress before the pause")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    time.sleep(25)  # the transaction timeout (10 s), and the broker's check for it (10 s)
    worker.process.send_signal(signal.SIGCONT)
    assert_exactly_once(topics, valid, bad)
    assert worker.process.poll() is None, worker.log()
    # It noticed the pause: a 6 s session lost, and a transaction open then fails.
    noticed = ("partitions_lost", "transaction_aborted", "worker_rebuilding")
    assert any(worker.logged(event) for event in noticed), worker.log()
    assert worker.stop() == 0


def test_a_static_member_fenced_by_its_instance_id_rejoins_and_goes_on(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A consumer that joins with the worker's group.instance.id fences the worker's
    (FENCED_INSTANCE_ID; a chaos run saw it as a broker stall expired the worker's
    session). The consumer is dead then; the worker logged it and went on consuming
    nothing, 90 s until it was killed. Now it builds a new consumer, which
    takes the instance id back, and its calls are enriched again."""
    worker = WorkerProcess(topics, tmp_path, WORKER_GROUP_INSTANCE_ID="static-0", **PARTITIONS)
    workers.append(worker.start())
    intruder = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": topics.group_id,
            "group.instance.id": "static-0",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000,
        }
    )
    intruder.subscribe([topics.input])
    try:
        wait_until(lambda: bool(intruder.poll(0.2) or intruder.assignment()), 60, "a join")
    finally:
        intruder.close()
    wait_until(lambda: worker.logged("worker_rebuilding"), 60, "the worker to rebuild")
    assert "fenced" in worker.log(), worker.log()
    wait_until(worker.ready, 60, "the worker to be ready again")
    call = {"type": "group", "groupId": "g1", "userId": "u1", "messageId": "after"}
    produce(topics.input, [(b"u1", codec.encode(call))])
    enriched = values(read_topic(topics.enriched, expect=1, timeout=60))
    assert [c["messageId"] for c in enriched] == ["after"], worker.log()
    assert worker.stop() == 0


def test_a_paused_owners_last_transaction_is_in_its_successors_state(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """An owner that sent a batch's offsets to its transaction, then stalled past its
    session (a pause, not a crash), commits it when it wakes, after the rebalance: its
    successor waits for that before restoring, so its state has the batch whose offsets
    it resumes after (it restored without it, and the group lost the batch's changes)."""
    topics = Topics.unique()
    keyed = {"WORKER_INPUT_KEYED_BY_GROUP_ID": "true"}
    assert cli(topics, "topics", "create", TOPICS_PARTITIONS="3", **keyed).returncode == 0
    first = {"type": "group", "groupId": "g", "userId": "u1", "messageId": "m1"}
    second = dict(first, userId="u2", messageId="m2")
    sender = Producer({"bootstrap.servers": BOOTSTRAP})
    sender.produce(topics.input, codec.encode(first), b"g", partition=0)
    sender.flush(10)

    # The old owner: a member of the group, its transaction holding the state after the
    # first call and the offset after it, left open while it "stalls".
    member = Consumer(
        {"bootstrap.servers": BOOTSTRAP, "group.id": topics.group_id, "enable.auto.commit": False}
    )
    member.subscribe([topics.input])
    wait_until(lambda: bool(member.consume(1, 0.5) or member.assignment()), 30, "assignment")
    sink, store = FakeSink(transactional=False), InMemoryStateStore()
    routes = Routes(topics.input, "out", "dlq", "state", "members")
    processor = Processor(routes, Settings(), store, sink, FakeClock(), dedupe_window_ms=DAY_MS)
    processor.process(
        [Record(topics.input, 0, 0, codec.encode(first), b"g", int(time.time() * 1000))]
    )
    [(_, _, key, state, _)] = [c for c in store.changes() if c[0] == "state"]
    owner = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": f"{topics.group_id}-old"})
    owner.init_transactions(30)
    owner.begin_transaction()
    owner.produce(topics.state, state, key, partition=0)
    offsets = [TopicPartition(topics.input, 0, 1)]
    owner.send_offsets_to_transaction(offsets, member.consumer_group_metadata(), 30)
    member.close()  # its session is over: the partitions move

    wakes = threading.Timer(5, lambda: owner.commit_transaction(30))
    wakes.start()
    workers.append(WorkerProcess(topics, tmp_path, "successor", **keyed).start())
    wakes.join()
    sender.produce(topics.input, codec.encode(second), b"g", partition=0)
    sender.flush(10)
    [enriched] = values(read_topic(topics.enriched, expect=1))
    assert enriched["messageId"] == "m2"
    assert (enriched["group"]["eventCount"], enriched["group"]["memberCount"]) == (2, 2)
