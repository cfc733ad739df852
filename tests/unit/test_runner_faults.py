"""Exactly once under faults (worker.runner over the fakes): what a run commits through
random aborts, retries, failed produces, rebalances, failed restores and restarts equals
what a run without them commits."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock, FakeSink, FakeSource, FlakyRestorer
from tests.unit.test_runner import build
from worker import codec
from worker.errors import AbortableError, FatalClientError, FatalError, KafkaError, RetriableError
from worker.store import InMemoryStateStore, RocksDBStateStore, StateStore

PARTITIONS = 3
Committed = tuple[list[Any], list[Any], dict[bytes, Any], dict[bytes, Any]]


def calls(rng: random.Random, n: int = 150) -> list[tuple[int, bytes]]:
    """Group calls keyed by group (its partition), with redeliveries, times out of
    order, nulls, other types and broken records among them."""
    out: list[tuple[int, bytes]] = []
    for i in range(n):
        group = rng.randrange(6)
        kind = rng.random()
        if kind < 0.05:
            value = b'{"type": "group", "traits": '
        elif kind < 0.1:
            value = codec.encode({"type": "track", "userId": "u", "event": "e"})
        elif kind < 0.25 and out:
            out.append(rng.choice(out))  # a redelivery
            continue
        else:
            call = {
                "type": "group",
                "groupId": f"g{group}",
                "userId": f"u{rng.randrange(4)}",
                "messageId": f"m{i}",
                "timestamp": f"2020-09-13T12:{rng.randrange(60):02d}:00.000Z",
                "traits": {"plan": rng.choice(["free", "pro", None]), f"t{i % 3}": i},
            }
            value = codec.encode(call)
        out.append((group % PARTITIONS, value))
    return out


def committed(sink: FakeSink) -> Committed:
    """What read_committed readers see: enriched ids, dead letters' positions, and the
    newest state (without its processing time) and membership per key."""
    enriched = sorted(
        (c["groupId"], c["messageId"]) for c in map(codec.decode, _values(sink, "out"))
    )
    letters = sorted(
        (d["reason"], d["source"]["partition"], d["source"]["offset"])
        for d in map(codec.decode, _values(sink, "dlq"))
    )
    states = {p.key: codec.decode(p.value) for p in sink.topic("state") if p.key}
    for state in states.values():
        del state["updatedAt"]
    members = {p.key: codec.decode(p.value) for p in sink.topic("members") if p.key}
    return enriched, letters, states, members


def _values(sink: FakeSink, topic: str) -> list[bytes]:
    return [p.value for p in sink.topic(topic)]


def drain(
    inputs: list[tuple[int, bytes]], new_store: Callable[[bool], StateStore], faults: int | None
) -> FakeSink:
    """Run loops until every input record is committed; with ``faults`` (a seed), inject
    them at random consumes. ``new_store(wiped)`` gives each loop its store."""
    rng = random.Random(faults)
    source, sink = FakeSource(FakeClock(), PARTITIONS), FakeSink()
    for partition, value in inputs:
        source.append(value, partition=partition)
    ends = {tp: len(records) for tp, records in source.log.items()}
    for _ in range(50):  # loops: each ends on a restart, or when everything committed
        store = new_store(faults is not None and rng.random() < 0.2)
        # A restore that fails (the broker away) ends the loop: the service builds another.
        restorer = FlakyRestorer(sink, fail=faults is not None and rng.random() < 0.2)
        runner, _ = build(source, sink, store=store, restorer=restorer)

        def step(n: int, runner: Any = runner, source: FakeSource = source) -> None:
            if all(source.committed_offsets.get(tp, 0) == end for tp, end in ends.items()):
                runner.stop()
            elif faults is None or n > 400:
                return
            roll = rng.random()
            if roll < 0.05:
                sink.fail_next_commit = AbortableError("aborted")
            elif roll < 0.08:
                sink.fail_next_commit = RetriableError("coordinator away")
            elif roll < 0.11 and sink.in_transaction:
                sink.fail_produce = (len(sink.open) + rng.randrange(3), AbortableError("lost"))
            elif roll < 0.15:
                tp = ("in", rng.randrange(PARTITIONS))
                source.rebalance(revoke=[tp], assign=[tp])
            elif roll < 0.21:
                runner.stop()  # SIGTERM; the next loop is a restart
            elif roll < 0.23:  # the process was paused past its transaction's timeout
                sink.fenced = FatalClientError("fenced")

        source.on_consume = step
        try:
            runner.run()
        except FatalClientError:  # the service builds a new loop: its producer aborts this one's
            sink.abort()
            sink.fenced = None
        except FatalError:
            raise
        except KafkaError:  # a failed restore: the service builds a new loop
            pass
        if all(source.committed_offsets.get(tp, 0) == end for tp, end in ends.items()):
            return sink
        source = source.restarted()
    raise AssertionError("the input was never all committed")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["memory", "rocksdb", "rocksdb-no-cache"])
def test_faults_change_nothing_that_commits(seed: int, kind: str, tmp_path: Path) -> None:
    """Aborts, retries, failed produces, revokes, failed restores and restarts (with the
    state directory sometimes wiped) commit the same enriched calls, dead letters,
    states and memberships as a run without them: each call once, none lost. Also with a
    cache too small to hold a group, so every read goes to the files and each state
    updated in place is evicted at once."""

    volumes = [tmp_path / "0"]

    def new_store(wiped: bool) -> StateStore:
        if kind == "memory":  # a restart restores it from the changelogs
            return InMemoryStateStore()
        if wiped:  # a new, empty volume: rebuilt from the changelogs
            volumes.append(tmp_path / str(len(volumes)))
        return RocksDBStateStore(
            volumes[-1], cache_bytes=1 if kind.endswith("no-cache") else 1 << 16
        )

    inputs = calls(random.Random(seed))
    expected = committed(drain(inputs, lambda _: InMemoryStateStore(), None))
    assert committed(drain(inputs, new_store, seed)) == expected
