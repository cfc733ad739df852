"""Hostile senders on the real broker: one huge group, records the broker refuses."""

from __future__ import annotations

import base64
import random
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.harness import (
    Topics,
    WorkerProcess,
    create_topic,
    produce,
    read_topic,
    set_topic_config,
    values,
    wait_until,
)
from worker import codec

pytestmark = pytest.mark.integration

# The broker's default max.message.bytes: what the worker's topics take unless configured.
BROKER_LIMIT = 1_048_588


def group_call(message_id: str, group: str, traits: dict[str, str]) -> bytes:
    return codec.encode(
        {
            "type": "group",
            "messageId": message_id,
            "userId": f"u-{message_id}",
            "groupId": group,
            "timestamp": "2026-01-02T03:04:05.678Z",
            "traits": traits,
        }
    )


def test_one_huge_group_cannot_stall_the_others(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A group fed 4 MB of new trait keys is bounded; every other group's call is enriched."""
    rng = random.Random(7)
    hostile = [
        (
            b"attacker",
            group_call(
                f"h{n}", "huge", {f"k{n}_{i}": f"{rng.getrandbits(496):0124x}" for i in range(150)}
            ),
        )
        for n in range(200)
    ]
    assert all(20_000 < len(v) < 32_768 for _, v in hostile)
    ordinary = [
        (f"u{n}".encode(), group_call(f"o{n}", f"g{n % 300}", {"plan": "pro", "seats": str(n)}))
        for n in range(2_000)
    ]
    workers.append(WorkerProcess(topics, tmp_path).start())
    produce(topics.input, hostile)
    produce(topics.input, ordinary)

    enriched = values(read_topic(topics.enriched, expect=2_200, idle=5, timeout=240))
    ids = {c["messageId"] for c in enriched}
    assert {f"o{n}" for n in range(2_000)} <= ids
    assert {f"h{n}" for n in range(200)} <= ids  # valid calls: enriched, their keys dropped
    last = max(
        (c for c in enriched if c["groupId"] == "huge"), key=lambda c: c["group"]["eventCount"]
    )
    assert last["group"]["eventCount"] == 200
    assert any(w["code"] == "group_state_full" for w in last["enrichment"]["warnings"])

    for topic in (topics.enriched, topics.state, topics.members, topics.repartition, topics.dlq):
        sizes = [len(m.value() or b"") + len(m.key() or b"") for m in read_topic(topic, idle=2)]
        assert max(sizes, default=0) < BROKER_LIMIT, topic
    worker = workers[0]
    assert worker.sample("group_worker_trait_warnings_total", code="group_state_full") > 0
    assert worker.sample("group_worker_transaction_aborts_total") == 0


def test_a_hot_groups_batch_envelopes_do_not_hold_other_groups_behind_them(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A backlog of one group in envelopes of 500 calls (keyed input: all on one
    partition) fills the consumer's prefetch, one record per 500 calls, ahead of other
    partitions' records. Calls of other groups sent while it drains are enriched long
    before it is: the hot partition is read again behind them at each commit."""
    hot = [
        (
            b"hot",
            codec.encode(
                {"batch": [codec.decode(group_call(f"h{n}-{i}", "hot", {})) for i in range(500)]}
            ),
        )
        for n in range(200)
    ]
    others = [(f"g{n}".encode(), group_call(f"o{n}", f"g{n}", {"plan": "pro"})) for n in range(30)]
    worker = WorkerProcess(topics, tmp_path, WORKER_INPUT_KEYED_BY_GROUP_ID="true")
    workers.append(worker.start())
    produce(topics.input, hot)
    wait_until(lambda: worker.progress() >= 10_000, 120, "the hot backlog to start draining")
    produce(topics.input, others)

    enriched = read_topic(topics.enriched, expect=100_030, idle=3, timeout=300)
    hot_partition = next(r.partition() for r in enriched if r.key() == b"hot")
    elsewhere = [r for r in enriched if r.key() != b"hot" and r.partition() != hot_partition]
    assert len(elsewhere) >= 10  # 30 groups over 3 partitions
    last_other = max(r.timestamp()[1] for r in elsewhere)
    after = sum(1 for r in enriched if r.key() == b"hot" and r.timestamp()[1] > last_other)
    # Before the hot partition was read again, they all came after the whole backlog; now
    # within a commit or two (10,000 calls each) of their sending, which took a second.
    assert after >= 20_000, f"{after} hot calls enriched after the last other group's"


def test_an_envelope_to_a_large_group_commits_in_parts_and_a_kill_redoes_none(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """One envelope of 1,000 calls to a group of 100 KB: each enriched call carries the
    profile, 100 MB for the envelope, in transactions of about commit_max_bytes (1 MiB)
    cut between its calls. SIGKILLed part way, the next worker goes on from the last
    cut committed (the offset's metadata): every call enriched exactly once, none of
    the committed part done again."""
    rng = random.Random(11)
    profile = [
        group_call(
            f"p{n}", "big", {f"k{n}_{i}": f"{rng.getrandbits(496):0124x}" for i in range(180)}
        )
        for n in range(4)
    ]
    batch = [codec.decode(group_call(f"e{n}", "big", {"seats": str(n)})) for n in range(1_000)]
    settings = {
        "WORKER_INPUT_KEYED_BY_GROUP_ID": "true",
        "WORKER_COMMIT_MAX_BYTES": "1048576",
        "WORKER_INSTANCE_ID": "w",  # static membership: the restart takes over at once
    }
    first = WorkerProcess(topics, tmp_path, "w0", **settings)
    workers.append(first.start())
    produce(topics.input, [(b"big", v) for v in profile])
    wait_until(
        lambda: first.sample("group_worker_outcomes_total", outcome="enriched") == 4,
        60,
        "the profile's calls",
    )
    produce(topics.input, [(b"big", codec.encode({"batch": batch}))])
    wait_until(
        lambda: first.sample("group_worker_outcomes_total", outcome="enriched") >= 204,
        120,
        "a part of the envelope to commit",
    )
    first.stop(signal.SIGKILL)

    second = WorkerProcess(topics, tmp_path, "w1", **settings)
    workers.append(second.start())
    enriched = values(read_topic(topics.enriched, expect=1_004, idle=5, timeout=240))
    ids = Counter(c["messageId"] for c in enriched)
    assert set(ids) == {f"p{n}" for n in range(4)} | {f"e{n}" for n in range(1_000)}
    assert max(ids.values()) == 1, "a call enriched twice"
    assert max(c["group"]["eventCount"] for c in enriched) == 1_004
    assert second.logged("record_cut_resumed"), second.log()
    redone = second.sample("group_worker_calls_consumed_total")
    assert 0 < redone <= 800, f"the second worker handled {redone} calls of 1,000"
    assert second.sample("group_worker_outcomes_total", outcome="duplicate") == 0
    assert second.stop() == 0


def test_an_envelope_of_thousands_of_small_calls_is_enriched_exactly_once(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Libraries batch by bytes: 7,000 calls of ~65 bytes in one 450 KB record (past the
    2,000 calls a batch held before) are each enriched once, in the default layout."""
    batch = [
        {"type": "group", "messageId": f"b{n}", "userId": f"u{n % 50}", "groupId": f"g{n % 20}"}
        for n in range(7_000)
    ]
    record = codec.encode({"batch": batch, "context": {"library": {"name": "analytics-go"}}})
    assert 400_000 < len(record) < 524_288
    workers.append(WorkerProcess(topics, tmp_path).start())
    produce(topics.input, [(b"sender", record)])
    enriched = values(read_topic(topics.enriched, expect=7_000, idle=5, timeout=120))
    assert Counter(c["messageId"] for c in enriched) == {f"b{n}": 1 for n in range(7_000)}
    counts = {c["groupId"]: c["group"]["eventCount"] for c in enriched}
    assert counts == {f"g{n}": 350 for n in range(20)}
    assert read_topic(topics.dlq, idle=2) == []


@pytest.mark.parametrize("later", [False, True], ids=["first-batch", "later-batch"])
def test_a_dead_letter_the_broker_refuses_does_not_loop(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path, later: bool
) -> None:
    """A compacted dead-letter topic refuses keyless letters; the worker aborts, goes on.

    In a later batch too: there a transaction asks for no delivery reports, so the worker
    learns which record failed it from the replay's.
    """
    create_topic(topics.input, 3)
    create_topic(topics.dlq, 3, **{"cleanup.policy": "compact"})
    workers.append(WorkerProcess(topics, tmp_path).start())
    calls = [
        (f"u{n}".encode(), group_call(f"m{n}", f"g{n % 10}", {"plan": "pro"})) for n in range(300)
    ]
    if later:
        produce(topics.input, calls[:100])
        read_topic(topics.enriched, expect=100, idle=3, timeout=60)
    produce(topics.input, [(None, b"not json")])
    produce(topics.input, calls[100:] if later else calls)
    enriched = values(read_topic(topics.enriched, expect=300, idle=3, timeout=120))
    assert {c["messageId"] for c in enriched} == {f"m{n}" for n in range(300)}
    worker = workers[0]
    wait_until(
        lambda: worker.sample("group_worker_unwritable_outputs_total", route="dlq") == 1,
        30,
        "the refused dead letter to be counted",
    )
    assert worker.sample("group_worker_transaction_aborts_total") <= 3
    assert worker.sample("group_worker_batch_abort_streak") == 0
    assert worker.logged("dead_letter_dropped"), worker.log()


def test_a_letter_of_stage_two_is_keyed_by_its_input_record(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A call whose enriched record the broker refuses as too large (the topic's limit
    lowered while the worker runs) is dead-lettered by stage two under its input record's
    key, with that record as its source, as in one stage."""
    create_topic(topics.input, 3)
    workers.append(WorkerProcess(topics, tmp_path).start())
    produce(topics.input, [(b"user-key-0", group_call("first", "g2", {}))])
    read_topic(topics.enriched, expect=1, idle=1, timeout=120)
    set_topic_config(topics.enriched, "max.message.bytes", "12000")
    # 24 KB of traits that lz4 cannot shrink below the new limit: the call still fits the
    # repartition topic; its enriched record is refused.
    notes = base64.b64encode(random.Random(3).randbytes(18_000)).decode()
    big = group_call("big", "g1", {"notes": notes})
    produce(topics.input, [(b"user-key-1", big), (None, group_call("small", "g2", {}))])

    enriched = values(read_topic(topics.enriched, expect=2, idle=3, timeout=120))
    assert [c["messageId"] for c in enriched] == ["first", "small"]
    [letter] = read_topic(topics.dlq, expect=1, idle=3, timeout=30)
    [raw] = [m for m in read_topic(topics.input, expect=3) if m.key() == b"user-key-1"]
    assert letter.key() == b"user-key-1"
    document = codec.decode(letter.value() or b"")
    assert document["reason"] == "output_too_large"
    source = document["source"]
    assert (source["topic"], source["partition"], source["offset"], source["key"]) == (
        topics.input,
        raw.partition(),
        raw.offset(),
        "user-key-1",
    )
