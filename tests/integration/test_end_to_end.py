"""The worker end to end on the real local broker: every call lands in exactly one place."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Producer
from confluent_kafka.admin import AdminClient, NewTopic

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
from worker import codec

pytestmark = pytest.mark.integration


def group_call(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "group",
        "messageId": f"m{n}",
        "userId": f"u{n % 7}",
        "groupId": f"g{n % 5}",
        "traits": {"name": f"Group {n % 5}", "Employees": "1,200"},
        **extra,
    }


def mixed_stream() -> tuple[list[tuple[bytes | None, bytes | None]], set[str], Counter[str], int]:
    """Records of every kind; returns them with the expected enriched ids, dead-letter
    reasons and skipped count."""
    records: list[tuple[bytes | None, bytes | None]] = []
    good: set[str] = set()
    for n in range(30):
        records.append((f"u{n}".encode(), codec.encode(group_call(n))))
        good.add(f"m{n}")
    skipped = 0
    for n, kind in enumerate(["identify", "track", "page", "screen", "alias", "track"]):
        records.append((None, codec.encode({"type": kind, "userId": "u", "messageId": f"o{n}"})))
        skipped += 1
    reasons: Counter[str] = Counter()
    for n in range(3):
        batch = [
            group_call(100 + n),
            group_call(200 + n),
            {"type": "track", "userId": "u"},
            {"type": "group", "userId": "u", "messageId": f"nogroup{n}"},
        ]
        records.append((b"batch", codec.encode({"batch": batch, "context": {"ip": "1.2.3.4"}})))
        good.update({f"m{100 + n}", f"m{200 + n}"})
        skipped += 1
        reasons["missing_group_id"] += 1
    bad: list[tuple[str, bytes | None]] = [
        ("invalid_json", b"{not json"),
        ("invalid_json", b"\xff\xfe\x00"),
        ("invalid_json", b""),
        ("invalid_json", None),
        ("not_an_object", b"[1, 2, 3]"),
        ("too_large", codec.encode(group_call(900, traits={"description": "x" * 40_000}))),
        ("invalid_batch", b'{"batch": "nope"}'),
        ("missing_type", codec.encode({"groupId": "g", "userId": "u"})),
        ("missing_group_id", codec.encode(group_call(901, groupId="   "))),
        ("missing_identity", codec.encode(group_call(902, userId=None))),
        ("invalid_traits", codec.encode(group_call(903, traits=["a"]))),
        ("invalid_message_id", codec.encode(group_call(904, messageId="x" * 101))),
    ]
    for reason, value in bad:
        records.append((b"bad-" + reason.encode(), value))
        reasons[reason] += 1
    return records, good, reasons, skipped


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_every_consumed_call_lands_in_exactly_one_place(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path, guarantee: str
) -> None:
    """Good calls are enriched once, bad ones dead-lettered once, others counted as skipped."""
    records, good, reasons, skipped = mixed_stream()
    total = len(good) + sum(reasons.values()) + skipped
    worker = WorkerProcess(topics, tmp_path, WORKER_PROCESSING_GUARANTEE=guarantee)
    workers.append(worker.start())
    worker.wait_assigned(topics.input, topics.repartition)
    produce(topics.input, records)

    wait_until(
        lambda: worker.sample("group_worker_calls_consumed_total") == total,
        60,
        f"{total} calls consumed",
    )
    enriched = values(read_topic(topics.enriched, expect=len(good)))
    letters = values(read_topic(topics.dlq, expect=sum(reasons.values())))

    assert Counter(call["messageId"] for call in enriched) == Counter(good)
    assert Counter(letter["reason"] for letter in letters) == reasons
    sample = worker.sample
    assert sample("group_worker_outcomes_total", outcome="enriched") == len(good)
    assert sample("group_worker_outcomes_total", outcome="dead_letter") == sum(reasons.values())
    assert sample("group_worker_outcomes_total", outcome="skipped") == skipped
    for reason, n in reasons.items():
        assert sample("group_worker_dead_letters_total", reason=reason) == n
    assert sample("group_worker_skipped_calls_total", type="track") == 2 + 3
    first = next(c for c in enriched if c["messageId"] == "m0")
    assert first["traits"] == {"name": "Group 0", "employees": 1200}
    assert first["enrichment"]["source"]["topic"] == topics.input
    assert worker.stop() == 0


def test_dead_letters_carry_source_position_and_reason_header(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A dead letter keeps the input key, its position, the raw value and a reason header."""
    workers.append(WorkerProcess(topics, tmp_path).start())
    produce(topics.input, [(b"the-key", b"\xffnot utf8")])
    [record] = read_topic(topics.dlq, expect=1)
    letter = codec.decode(record.value() or b"")
    assert record.key() == b"the-key"
    assert record.headers() == [("reason", b"invalid_json")]
    assert letter["source"]["topic"] == topics.input
    assert letter["source"]["key"] == "the-key"
    assert letter["encoding"] == "base64"


def test_a_call_keeps_its_arrival_through_the_repartition_topic_to_its_dedupe_record(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """The input record's timestamp is the call's arrival, whatever the event time: the
    repartitioned call carries it in a header, the dedupe record as its value. Both
    records are stamped when written, so a backlog eight days old (past the topics'
    retention, and past segment.ms, so Kafka rolls a segment at each write) is not
    deleted before it is read: stamped with the arrival, the dedupe ids were gone at once."""
    arrival = int(time.time() * 1000) - 8 * 86_400_000
    create_topic(topics.input, 1, **{"retention.ms": "-1"})
    written = int(time.time() * 1000)
    workers.append(WorkerProcess(topics, tmp_path).start())
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    call = group_call(1, timestamp="2015-02-23T22:28:55.111Z")
    producer.produce(topics.input, codec.encode(call), b"u1", timestamp=arrival)
    assert producer.flush(10) == 0
    [forwarded] = read_topic(topics.repartition, expect=1)
    [seen] = read_topic(topics.dedupe, expect=1)
    assert ("arrival", b"%d" % arrival) in (forwarded.headers() or [])
    for record in (forwarded, seen):
        kind, stamp = record.timestamp()
        assert kind == TIMESTAMP_CREATE_TIME
        assert stamp >= written
    assert seen.value() == b"%d" % arrival


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_restarted_worker_resumes_from_committed_offsets(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path, guarantee: str
) -> None:
    """After SIGTERM a new worker reads on from the committed offsets: nothing lost or repeated."""
    first = WorkerProcess(topics, tmp_path, "first", WORKER_PROCESSING_GUARANTEE=guarantee)
    workers.append(first.start())
    produce(topics.input, [(None, codec.encode(group_call(n))) for n in range(50)])
    wait_until(lambda: first.sample("group_worker_calls_consumed_total") == 50, 60, "50 calls")
    assert first.stop(signal.SIGTERM) == 0

    produce(topics.input, [(None, codec.encode(group_call(n))) for n in range(50, 120)])
    second = WorkerProcess(topics, tmp_path, "second", WORKER_PROCESSING_GUARANTEE=guarantee)
    workers.append(second.start())
    wait_until(lambda: second.sample("group_worker_calls_consumed_total") >= 70, 60, "70 calls")
    enriched = values(read_topic(topics.enriched, expect=120))
    assert second.sample("group_worker_calls_consumed_total") == 70
    assert Counter(c["messageId"] for c in enriched) == Counter(f"m{n}" for n in range(120))


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_killed_worker_loses_nothing(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path, guarantee: str
) -> None:
    """After SIGKILL mid-stream a new worker delivers every call: once each at exactly_once."""
    first = WorkerProcess(
        topics, tmp_path, "first", WORKER_PROCESSING_GUARANTEE=guarantee, WORKER_BATCH_SIZE="20"
    )
    workers.append(first.start())
    produce(topics.input, [(None, codec.encode(group_call(n))) for n in range(3000)])
    wait_until(lambda: first.sample("group_worker_calls_consumed_total") >= 200, 60, "progress")
    first.stop(signal.SIGKILL)

    second = WorkerProcess(topics, tmp_path, "second", WORKER_PROCESSING_GUARANTEE=guarantee)
    workers.append(second.start())
    enriched = values(read_topic(topics.enriched, expect=3000, idle=5))
    counts = Counter(c["messageId"] for c in enriched)
    assert set(counts) == {f"m{n}" for n in range(3000)}
    if guarantee == "exactly_once":
        assert max(counts.values()) == 1
    assert second.stop() == 0


def test_probes_and_metrics_are_served(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """/healthz and /readyz answer 200 on a running worker; /metrics exports build info."""
    worker = WorkerProcess(topics, tmp_path)
    workers.append(worker.start())
    assert worker.get("/healthz")[0] == 200
    assert worker.get("/readyz")[0] == 200
    assert worker.get("/nope")[0] == 404
    assert worker.sample("group_worker_assigned_partitions", topic=topics.input) == 3
    assert worker.sample("group_worker_assigned_partitions", topic=topics.repartition) == 3
    assert any(name == "group_worker_build_info" for name, _ in worker.metrics())


def test_send_and_tail_round_trip(topics: Topics) -> None:
    """`send` produces each line of a file; `tail --from-beginning` prints each as JSON,
    `tail --last 1` the latest record of each partition."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topics.input, 2, 1)])[topics.input].result(30)
    sent = cli(topics, "send", str(ROOT / "examples" / "group.json"))
    assert sent.returncode == 0, sent.stderr
    tailed = cli(topics, "tail", topics.input, "--from-beginning", "--max", "6", "--timeout", "20")
    assert tailed.returncode == 0, tailed.stderr
    lines = [codec.decode(line) for line in tailed.stdout.splitlines()]
    assert len(lines) == 6
    assert {
        line["value"]["messageId"]
        for line in lines
        if isinstance(line["value"], dict) and "messageId" in line["value"]
    } >= {"ex-1", "ex-2", "ex-3", "ex-6"}
    latest = cli(topics, "tail", topics.input, "--last", "1", "--timeout", "5")
    assert latest.returncode == 0, latest.stderr
    ends = {(p, max(line["offset"] for line in lines if line["partition"] == p)) for p in (0, 1)}
    assert {
        (line["partition"], line["offset"])
        for line in map(codec.decode, latest.stdout.splitlines())
    } == ends


def transactions(topic: str, name: str) -> Producer:
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": f"{topic}-{name}"})
    producer.init_transactions(30)
    return producer


def write(
    producer: Producer, topic: str, partition: int, values: list[bytes], commit: bool
) -> None:
    producer.begin_transaction()
    for value in values:
        producer.produce(topic, value, partition=partition)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def tailed(topics: Topics, *args: str) -> list[tuple[int, Any]]:
    result = cli(topics, "tail", *args)
    assert result.returncode == 0, result.stderr
    return [
        (line["partition"], line["value"]) for line in map(codec.decode, result.stdout.splitlines())
    ]


def test_tail_last_counts_records_not_offsets(topics: Topics) -> None:
    """On a transactional topic each commit's marker takes an offset and an aborted
    transaction's records are not read: `--last 2` prints each partition's two latest
    committed records all the same (it printed none with a marker at the end), with a
    transaction open meanwhile, and none of an empty partition or of one whose records
    all aborted."""
    create_topic(topics.enriched, 3)
    producer = transactions(topics.enriched, "tail")
    write(producer, topics.enriched, 0, [b"a", b"b", b"c"], True)
    write(producer, topics.enriched, 0, [b"d"], True)
    write(producer, topics.enriched, 0, [b"x", b"y"], False)
    write(producer, topics.enriched, 2, [b"p", b"q"], False)
    producer.begin_transaction()  # open while the tails run
    producer.produce(topics.enriched, b"open", partition=0)
    producer.flush(10)
    assert tailed(topics, topics.enriched, "--last", "2", "--timeout", "2") == [(0, "c"), (0, "d")]
    everything = tailed(topics, topics.enriched, "--last", "50", "--timeout", "2")
    assert everything == [(0, "a"), (0, "b"), (0, "c"), (0, "d")]
    producer.abort_transaction(30)


def test_tail_last_ends_its_count_on_a_busy_topic(topics: Topics) -> None:
    """A partition that gets a transaction every 20 ms never shows its end, so the count
    stops at the end it had when asked (it waited for the end for ever)."""
    create_topic(topics.enriched, 1)
    producer = transactions(topics.enriched, "busy")
    stop = threading.Event()

    def busy() -> None:
        n = 0
        while not stop.is_set():
            write(producer, topics.enriched, 0, [b"%d" % n], True)
            n += 1
            time.sleep(0.02)

    writer = threading.Thread(target=busy)
    writer.start()
    try:
        time.sleep(1)
        latest = [v for _, v in tailed(topics, topics.enriched, "--last", "3", "--max", "3")]
    finally:
        stop.set()
        writer.join()
    assert len(latest) == 3
    assert latest == list(range(latest[0], latest[0] + 3))  # consecutive: none skipped


def test_topics_create_refuses_a_mismatched_state_topic(topics: Topics) -> None:
    """A state topic partitioned unlike the input stops the worker with one line."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    futures = admin.create_topics(
        [
            NewTopic(topics.input, 3, 1),
            NewTopic(topics.state, 2, 1, config={"cleanup.policy": "compact"}),
        ]
    )
    for future in futures.values():
        future.result(30)
    result = cli(topics, "topics", "create")
    assert result.returncode == 2
    message = result.stderr.decode().strip()
    assert message.count("\n") == 0
    assert f"topic {topics.state} has 2 partitions but input {topics.input} has 3" in message


def test_topics_create_makes_outputs_with_the_input_partition_count(topics: Topics) -> None:
    """`topics create` creates every output with the input's partitions and shows its limit;
    it logs what it created, the input with a warning (a mistyped name makes a new one)."""
    result = cli(topics, "topics", "create", TOPICS_PARTITIONS="4")
    assert result.returncode == 0, result.stderr
    logged = [codec.decode(line) for line in result.stderr.splitlines()]
    [warning] = [e for e in logged if e["event"] == "input_topic_created"]
    assert (warning["level"], warning["topic"], warning["partitions"]) == (
        "warning",
        topics.input,
        4,
    )
    [created] = [e for e in logged if e["event"] == "topics_created"]
    assert len(created["topics"]) == 6
    again = cli(topics, "topics", "create")
    assert b"_created" not in again.stderr
    lines = result.stdout.decode().splitlines()
    dedupe = f"{topics.group_id}.dedupe"
    outputs = (
        topics.enriched,
        topics.dlq,
        topics.state,
        topics.members,
        dedupe,
        topics.repartition,
    )
    assert lines == [f"{topics.input}: 4 partitions"] + [
        f"{name}: 4 partitions, max.message.bytes=1048588" for name in outputs
    ]


def test_workers_on_the_consumer_group_protocol_share_the_calls_exactly_once(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """With KIP-848 (group.protocol=consumer) two workers join, split the partitions and
    enrich every call once (the worker set a client-side assignor librdkafka refuses
    with it, so it could not start). Each works in both stages: the broker's default
    assignor gave one all the input's partitions and the other all the repartition
    topic's, so the stateful stage ran on one."""
    # The broker keeps the session timeout under this protocol; the client may not set it.
    protocol = {
        "KAFKA_CONSUMER_GROUP_PROTOCOL": "consumer",
        "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": None,
    }
    first = WorkerProcess(topics, tmp_path, "first", **protocol)
    workers.append(first.start())
    produce(topics.input, [(None, codec.encode(group_call(n))) for n in range(100)])
    second = WorkerProcess(topics, tmp_path, "second", **protocol)
    workers.append(second.start())
    produce(topics.input, [(None, codec.encode(group_call(n))) for n in range(100, 200)])
    enriched = values(read_topic(topics.enriched, expect=200))
    assert Counter(c["messageId"] for c in enriched) == Counter(f"m{n}" for n in range(200))
    stages = (topics.input, topics.repartition)
    wait_until(
        lambda: all(
            w.sample("group_worker_assigned_partitions", topic=t) >= 1
            for w in (first, second)
            for t in stages
        ),
        60,
        "each worker to hold partitions of both stages",
    )
    assert first.stop() == 0
    assert second.stop() == 0
