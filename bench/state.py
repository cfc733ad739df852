"""Restore speed and the memory a group takes in state.

``measure_restore`` fills a compacted state topic with one record per group and times
``worker.restore.KafkaRestorer`` + ``restore_partition`` loading every partition into a
``RocksDBStateStore`` (as the worker does), in a fresh process (``python -m bench.state
restore ...``) so its resident-set growth is the store's alone; then a bare consumer
reads the same topics in that process, the rate to compare with.

``measure_group_memory`` builds groups the way the worker does (``merge_call`` of a
normalised call with 10 traits) and counts the bytes they hold with ``tracemalloc``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.generator import BASE_MS, group_profile
from bench.process import ROOT, Topics
from bench.runs import bare_read, create_topic, delete_topics, fast_producer, produce_all
from worker import codec
from worker.members import membership_key, merge_membership
from worker.normalise import normalise_traits
from worker.profile import state_record
from worker.restore import Changelogs, KafkaRestorer, restore_partition
from worker.state import Applied, GroupState, merge_call
from worker.store import InMemoryStateStore, RocksDBStateStore

__all__ = [
    "GroupMemory",
    "Restore",
    "measure_group_memory",
    "measure_restore",
    "state_records",
]

_TRAITS = 10
_COMPACT = {"cleanup.policy": "compact"}
# The worker's default state.cache_mb.
_CACHE_BYTES = 32 << 20


def _ten_traits(index: int) -> dict[str, Any]:
    """Group ``index``'s first ten profile traits, as sent (mixed spellings)."""
    return dict(list(group_profile(index, 1).items())[:_TRAITS])


def _state(index: int, calls: int = 1) -> GroupState:
    """Group ``index`` after ``calls`` calls carrying its ten traits."""
    state: GroupState | None = None
    for call in range(calls):
        # A fresh decode per call, as the worker has: no string shared between groups.
        traits = codec.decode(codec.encode(_ten_traits(index)))
        normalised, _ = normalise_traits(traits)
        applied = Applied(
            f"group-{index:07d}",
            f"ajs-next-{index:07d}-{call:04d}-0f1e2d3c4b5a69788796a5b4c3d2",
            BASE_MS + index + call * 1000,
            "userId",
            f"user-{index:07d}-{call}",
            normalised,
        )
        state = merge_call(state, applied, new_member=True, now_ms=BASE_MS)
    assert state is not None
    return state


@dataclass(frozen=True, slots=True)
class GroupMemory:
    """Bytes a group takes in state, by ``tracemalloc``."""

    groups: int
    bytes_per_group: float
    bytes_per_membership: float


def measure_group_memory(groups: int) -> GroupMemory:
    """Build ``groups`` states with 10 traits each; count bytes.

    Counted: everything the store holds for the group (state object, traits and their
    values, stamps, address registers, the store's dict entry); dedupe ids, kept in
    their own table, are not.
    Also one membership per group, counted apart.
    """
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = InMemoryStateStore()
    for index in range(groups):
        store.restore(0, _state(index))
    middle = tracemalloc.get_traced_memory()[0]
    for index in range(groups):
        state = store.get(0, f"group-{index:07d}")
        assert state is not None
        applied = Applied(state.group_id, "m", state.last_seen_ms, "userId", f"u-{index}", {})
        key = membership_key(state.group_id, "userId", applied.member_id)
        membership = merge_membership(None, applied)
        assert membership is not None
        store.restore_member(0, key, membership)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return GroupMemory(groups, (middle - before) / groups, (after - middle) / groups)


@dataclass(frozen=True, slots=True)
class Restore:
    """Restoring a state topic of ``records`` groups into a ``RocksDBStateStore``."""

    records: int
    fill_seconds: float
    seconds: float
    rss_growth_bytes: int
    peak_rss_bytes: int
    record_bytes: float
    bare_seconds: float  # a bare consumer reading the same topics, in the same process

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    @property
    def bare_per_second(self) -> float:
        return self.records / self.bare_seconds if self.bare_seconds else 0.0


def _group_id(index: int) -> str:
    return f"group-{index:07d}"


def state_records(
    groups: int, group_id: Callable[[int], str] = _group_id
) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` state-topic records of ``groups`` groups, in the worker's format
    (``state_record``): 1,000 distinct profiles (1 to 3 calls each, 10 traits), renamed
    for each group (``group_id`` of its index)."""
    templates = [state_record(_state(i, 1 + i % 3)) for i in range(1000)]
    for index in range(groups):
        record = dict(templates[index % 1000])
        name = group_id(index)
        record["groupId"] = name
        yield name.encode(), codec.encode(record)


def measure_restore(bootstrap: str, groups: int) -> Restore:
    """Fill a state topic with ``groups`` records and time restoring it in a fresh process."""
    topics = Topics.fresh("restore")
    state, members, dedupe = topics.name("state"), topics.name("members"), topics.name("dedupe")
    try:
        for name in (state, members, dedupe):
            create_topic(bootstrap, name, config=_COMPACT)
        size = 0

        def sized() -> Iterator[tuple[bytes, bytes]]:
            nonlocal size
            for key, value in state_records(groups):
                size += len(value)
                yield key, value

        started = time.perf_counter()
        produce_all(fast_producer(bootstrap), state, sized())
        fill = time.perf_counter() - started
        done = subprocess.run(
            [sys.executable, "-m", "bench.state", "restore", bootstrap, state, members, dedupe],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["groups"] != groups or result["bare_records"] != groups:
            raise RuntimeError(f"restored {result['groups']} groups of {groups}")
        return Restore(
            groups,
            fill,
            result["seconds"],
            result["rss_growth_bytes"],
            result["peak_rss_bytes"],
            size / max(groups, 1),
            result["bare_seconds"],
        )
    finally:
        delete_topics(bootstrap, [state, members, dedupe])


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _restore_main(bootstrap: str, state: str, members: str, dedupe: str) -> None:
    """Restore every partition as the worker does on assignment, into a RocksDB store in
    a temporary directory (the worker's default cache); then a bare consumer reads the
    same topics. Prints one JSON line."""
    restorer = KafkaRestorer(bootstrap, "bench-restore", {})
    partitions = restorer.partitions(state)
    gc.collect()
    rss = _status_bytes("VmRSS")
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as directory:
        store = RocksDBStateStore(Path(directory), _CACHE_BYTES)
        started = time.perf_counter()
        for partition in partitions:
            restore_partition(restorer, store, Changelogs(state, members, dedupe), partition)
        seconds = time.perf_counter() - started
        growth = _status_bytes("VmRSS") - rss
        peak = _status_bytes("VmHWM")
        groups = store.group_count()
        store.close()
    restorer.close()
    bare_records, bare_seconds = bare_read(bootstrap, [state, members, dedupe])
    out = {
        "groups": groups,
        "seconds": seconds,
        "rss_growth_bytes": growth,
        "peak_rss_bytes": peak,
        "bare_records": bare_records,
        "bare_seconds": bare_seconds,
    }
    print(json.dumps(out))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    restore = commands.add_parser("restore", help="restore a state topic, print JSON")
    restore.add_argument("bootstrap")
    restore.add_argument("state")
    restore.add_argument("members")
    restore.add_argument("dedupe")
    memory = commands.add_parser("memory", help="bytes per group with 10 traits")
    memory.add_argument("--groups", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.command == "restore":
        _restore_main(args.bootstrap, args.state, args.members, args.dedupe)
    else:
        print(measure_group_memory(args.groups))


if __name__ == "__main__":
    main()
