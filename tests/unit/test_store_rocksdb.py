"""What only RocksDBStateStore does: files that outlive it, offsets, corruption, its cache.

The StateStore contract it shares with the in-memory store is tested in test_store.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict
from structlog.testing import capture_logs

from tests.unit.test_store import EXPIRE_BEFORE_250, member, member_key, state, state_entry
from worker import codec
from worker.dedupe import seen_record_key
from worker.errors import StoreCorrupt, StoreError
from worker.members import membership_record
from worker.profile import state_record
from worker.store import ChangelogEntry, RocksDBStateStore
from worker.store import partition as partition_module


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(directory: Path) -> Iterator[RocksDBStateStore]:
    store = RocksDBStateStore(directory, cache_bytes=1 << 20)
    yield store
    store.close()


def reopened(store: RocksDBStateStore, directory: Path) -> RocksDBStateStore:
    """A new store on ``store``'s directory, once ``store`` is closed."""
    store.close()
    return RocksDBStateStore(directory, cache_bytes=1 << 20)


def on_disk(store: RocksDBStateStore, partition: int) -> dict[bytes, bytes]:
    """Everything the partition's files hold once flushed, read beside the open store."""
    store.compact(partition)  # flushes the write buffers first
    db = Rdict(
        str(store.path(partition)),
        Options(raw_mode=True),
        access_type=AccessType.read_only(False),
    )
    try:
        return {k: v for k, v in db.items() if isinstance(k, bytes)}
    finally:
        db.close()


def test_committed_entries_and_offsets_survive_a_new_store(
    store: RocksDBStateStore, directory: Path
) -> None:
    """A new store on the same directory reads what was committed, its offsets and counts."""
    store.put(0, state("g1", 2))
    store.put_member(0, member_key("u1"), member("u1"))
    store.put_seen(0, ("g1", "m1"), 100, 0)
    store.put(3, state("g9"))
    store.commit({("state", 0): 10, ("members", 0): 4, ("dedupe", 0): 7, ("state", 3): 1})
    store.commit({("state", 0): 12})
    again = reopened(store, directory)
    try:
        assert again.open_partition(0) is None
        assert again.stored_offsets(0) == {"state": 12, "members": 4, "dedupe": 7}
        assert again.stored_offsets(3) == {"state": 1}
        assert again.get(0, "g1") == state("g1", 2)
        assert again.get_member(0, member_key("u1")) == member("u1")
        assert again.seen(0, ("g1", "m1")) == 100
        assert (again.group_count(), again.member_count(), again.seen_count()) == (2, 1, 1)
    finally:
        again.close()


def test_the_files_hold_the_changelog_records_byte_for_byte(store: RocksDBStateStore) -> None:
    """Each entry is its kind byte and changelog key, to the changelog value (a dedupe
    id's followed by when it was written)."""
    store.put(0, state("g1"))
    store.put_member(0, member_key("u1"), member("u1"))
    store.put_seen(0, ("g1", "m1"), 100, 7)
    store.commit({("state", 0): 5})
    held = on_disk(store, 0)
    assert held[b"sg1"] == codec.encode(state_record(state("g1")))
    assert held[b"m" + member_key("u1").encode()] == codec.encode(membership_record(member("u1")))
    assert held[b"d" + seen_record_key("g1", "m1").encode()] == b"100 7"
    assert held[b"ostate"] == b"5"


def test_the_files_hold_the_records_changes_made_and_what_came_after(
    store: RocksDBStateStore,
) -> None:
    """commit() writes the bytes changes() gave the changelog, and a change made after
    changes() as well (then made again)."""
    store.put(0, state("g1"))
    store.put_seen(0, ("g1", "m1"), 100, 7)
    records = store.changes()
    store.commit()
    held = on_disk(store, 0)
    written = {"state": b"", "dedupe": b" 7"}
    assert all(held[c[0].encode() + k] == v + written[c] for c, _, k, v, _ in records)
    store.put(0, state("g1", 2))
    store.changes()
    store.put(0, state("g1", 3))
    store.put_member(0, member_key("u1"), member("u1"))
    store.commit()
    held = on_disk(store, 0)
    assert held[b"sg1"] == codec.encode(state_record(state("g1", 3)))
    assert held[b"m" + member_key("u1").encode()] == codec.encode(membership_record(member("u1")))


def test_an_uncommitted_or_rolled_back_change_is_never_on_disk(
    store: RocksDBStateStore, directory: Path
) -> None:
    """Puts stay in memory until commit: the files never see them, nor a rolled-back one."""
    store.put(0, state("g1", 1))
    store.commit()
    store.put(0, state("g1", 2))
    store.put(0, state("g2"))
    store.put_member(0, member_key("u1"), member("u1"))
    store.put_seen(0, ("g1", "m1"), 100, 0)
    assert store.get(0, "g2") == state("g2")
    held = on_disk(store, 0)
    assert held[b"sg1"] == codec.encode(state_record(state("g1", 1)))
    assert {k[:1] for k in held} - {b"s", b"c", b"v"} == set()
    assert b"sg2" not in held
    store.rollback()
    assert on_disk(store, 0) == held
    store.put(0, state("g3"))
    again = reopened(store, directory)  # closed without a commit
    try:
        assert (again.get(0, "g1"), again.get(0, "g3")) == (state("g1", 1), None)
        assert again.group_count() == 1
    finally:
        again.close()


def test_prepare_leaves_the_files_to_commit_and_rollback_undoes_it(
    store: RocksDBStateStore,
) -> None:
    """prepare() (run while the transaction commits) writes nothing; a rollback after it
    reads the committed state and membership again, though prepare cached the new ones
    (a membership is cached by prepare once it was read: the get below);
    a change made after it commits all the same."""
    store.put(0, state("g1", 1))
    store.put_member(0, member_key("u1"), member("u1"))
    store.commit()
    assert store.get_member(0, member_key("u1")) == member("u1")
    held = on_disk(store, 0)
    store.put(0, state("g1", 2))
    store.put_member(0, member_key("u1"), member("u1", 5))
    store.prepare()
    assert on_disk(store, 0) == held
    store.rollback()
    assert (store.get(0, "g1"), store.get_member(0, member_key("u1"))) == (
        state("g1", 1),
        member("u1"),
    )
    assert on_disk(store, 0) == held
    store.put(0, state("g1", 3))
    store.prepare()
    store.put_seen(0, ("g1", "m1"), 100, 0)
    store.commit()
    held = on_disk(store, 0)
    assert held[b"sg1"] == codec.encode(state_record(state("g1", 3)))
    assert held[b"d" + seen_record_key("g1", "m1").encode()] == b"100 0"
    assert store.seen_count() == 1


def test_applied_records_are_parsed_on_read_and_tombstones_delete(
    store: RocksDBStateStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records applied in many batches read back parsed, with exact counts and the offset."""
    monkeypatch.setattr(partition_module, "APPLY_BATCH", 2)
    entries: list[ChangelogEntry] = [state_entry(i, state(f"g{i % 4}", i)) for i in range(9)]
    entries += [(9, b"g1", None, 0), (10, b"g1", None, 0), (11, b"g7", None, 0)]
    store.apply_changelog(0, "state", entries, next_offset=15)
    assert store.stored_offsets(0) == {"state": 15}
    again = reopened(store, directory)
    try:
        assert [again.get(0, f"g{i}") for i in range(4)] == [
            state("g0", 8),
            None,
            state("g2", 6),
            state("g3", 7),
        ]
        assert again.group_count() == 3
        assert on_disk(again, 0)[b"sg2"] == entries[6][2]
    finally:
        again.close()


def test_a_replay_cut_short_resumes_after_its_last_batch(
    store: RocksDBStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error from the records read keeps the batches written, with their offset."""
    monkeypatch.setattr(partition_module, "APPLY_BATCH", 3)

    def entries() -> Iterator[ChangelogEntry]:
        for i in range(7):
            yield state_entry(100 + i, state(f"g{i}"))
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        store.apply_changelog(0, "state", entries(), next_offset=200)
    assert store.stored_offsets(0) == {"state": 106}
    assert [store.get(0, f"g{i}") is not None for i in range(7)] == [True] * 6 + [False]
    assert store.group_count() == 6


def test_a_corrupt_partition_is_discarded_and_starts_empty(
    store: RocksDBStateStore, directory: Path
) -> None:
    """Files RocksDB cannot open are deleted, the reason is returned, and the partition works."""
    store.put(0, state("g1"))
    store.put(1, state("g1"))
    store.commit({("state", 0): 3, ("state", 1): 3})
    store.close()
    for file in store.path(0).iterdir():
        file.write_bytes(b"garbage" * 100)
    again = RocksDBStateStore(directory, cache_bytes=1 << 20)
    try:
        with capture_logs() as logs:
            reason = again.open_partition(0)
        assert reason is not None
        assert [e["event"] for e in logs] == ["store_partition_discarded"]
        assert (again.stored_offsets(0), again.get(0, "g1"), again.group_count()) == ({}, None, 0)
        assert again.get(1, "g1") == state("g1")
        again.put(0, state("g2"))
        again.commit({("state", 0): 1})
    finally:
        again.close()
    last = RocksDBStateStore(directory, cache_bytes=1 << 20)
    try:
        assert last.open_partition(0) is None
        assert (last.get(0, "g2"), last.stored_offsets(0)) == (state("g2"), {"state": 1})
    finally:
        last.close()


def flip_bytes(table: Path, low: int, high: int) -> None:
    """Invert bytes ``low`` to ``high`` of a table file. Short of its end (its index and
    footer), RocksDB still opens it, and a read of a damaged block fails."""
    data = bytearray(table.read_bytes())
    data[low:high] = bytes(b ^ 0xFF for b in data[low:high])
    table.write_bytes(bytes(data))


def corrupt_blocks(path: Path) -> None:
    """Flip 4 KiB a quarter into the largest table file under ``path``."""
    table = max(path.glob("*.sst"), key=lambda f: f.stat().st_size)
    start = table.stat().st_size // 4
    flip_bytes(table, start, start + 4096)


def dedupe_entries(ids: int, arrival: int = 1) -> list[tuple[int, bytes, bytes, int]]:
    """Dedupe changelog records of ``ids`` ids of 100 groups, as the worker writes them."""
    key = seen_record_key
    return [(i, key(f"g{i % 100}", f"m{i}").encode(), b"%d" % arrival, 0) for i in range(ids)]


def test_a_read_of_corrupt_blocks_raises_store_corrupt(directory: Path) -> None:
    """Damage that opening the files does not see fails the read that meets it, with
    StoreCorrupt naming the partition (the runner rebuilds it), not a bare error."""
    store = RocksDBStateStore(directory, cache_bytes=1 << 20)
    store.apply_changelog(3, "dedupe", dedupe_entries(20_000), 0)
    store.close()  # flushes the write buffers into a table file
    corrupt_blocks(store.path(3))
    again = RocksDBStateStore(directory, cache_bytes=1 << 20)
    try:
        assert again.open_partition(3) is None

        def read_every_id() -> None:
            for i in range(20_000):
                again.seen(3, (f"g{i % 100}", f"m{i}"))

        with pytest.raises(StoreCorrupt, match="partition 3's store: Corruption") as e:
            read_every_id()
        assert e.value.partitions == (3,)
    finally:
        again.close()


def test_a_failed_write_does_not_stop_the_other_partitions(store: RocksDBStateStore) -> None:
    """A commit writes every partition it can, closes the change set, then names the
    ones that failed (to be rebuilt); dropping a failed one discards its files."""
    store.put(0, state("a"))
    store.put(1, state("b"))
    store.commit({("state", 0): 1, ("state", 1): 1})
    store.put(0, state("a", 2))
    store.put(1, state("b", 2))
    store._part(1).db.close()  # RocksDB now fails every call on partition 1
    with pytest.raises(StoreCorrupt, match="partition 1's store") as e:
        store.commit({("state", 0): 2, ("state", 1): 2})
    assert e.value.partitions == (1,)
    assert store.changes() == []
    assert store.stored_offsets(0) == {"state": 2}
    assert on_disk(store, 0)[b"sa"] == codec.encode(state_record(state("a", 2)))
    with capture_logs() as logs:
        store.drop(1)
    assert [e["event"] for e in logs] == ["store_partition_discarded"]
    assert not store.path(1).exists()


def test_files_of_another_layout_are_discarded(directory: Path) -> None:
    """A database without this store's layout version is not read: it is rebuilt."""
    path = directory / "partition-0"
    directory.mkdir()
    db = Rdict(str(path), Options(raw_mode=True))
    db[b"sg1"] = b"{}"
    db.close()
    store = RocksDBStateStore(directory, cache_bytes=0)
    try:
        assert store.open_partition(0) == "no layout version"
        assert store.get(0, "g1") is None
    finally:
        store.close()


def test_files_locked_by_another_store_are_not_discarded(
    store: RocksDBStateStore, directory: Path
) -> None:
    """Opening a partition another store has open raises, and deletes nothing."""
    store.put(0, state("g1"))
    store.commit()
    other = RocksDBStateStore(directory, cache_bytes=0)
    with pytest.raises(Exception, match="LOCK"):
        other.open_partition(0)
    assert store.get(0, "g1") == state("g1")
    assert on_disk(store, 0)[b"sg1"] == codec.encode(state_record(state("g1")))


@pytest.mark.parametrize("cache_bytes", [0, 3_000])
def test_the_cache_stays_within_its_bound(directory: Path, cache_bytes: int) -> None:
    """However many groups pass through, the cache holds at most cache_bytes, reads stay right."""
    store = RocksDBStateStore(directory, cache_bytes=cache_bytes)
    try:
        for i in range(300):
            store.put(i % 2, state(f"g{i}", i))
            store.put_member(i % 2, member_key(f"u{i}"), member(f"u{i}", i))
            if i % 50 == 49:
                assert store.cached_bytes <= cache_bytes
                store.commit()
        assert store.cached_bytes <= cache_bytes
        for i in reversed(range(300)):
            assert store.get(i % 2, f"g{i}") == state(f"g{i}", i)
            assert store.get_member(i % 2, member_key(f"u{i}")) == member(f"u{i}", i)
            assert store.cached_bytes <= cache_bytes
        assert (store.cached_bytes > 0) == (cache_bytes > 0)
    finally:
        store.close()


def test_a_membership_is_cached_once_read_and_never_left_stale(
    store: RocksDBStateStore,
) -> None:
    """A commit caches the states it writes, and a membership only to replace one the
    cache holds: written and never read, it stays on disk alone; read, it is cached;
    written again, the cache holds the new one."""
    store.put_member(0, member_key("u1"), member("u1", 1))
    store.commit()
    assert store.cached_bytes == 0
    assert store.get_member(0, member_key("u1")) == member("u1", 1)
    cached = store.cached_bytes
    assert cached > 0
    store.put_member(0, member_key("u1"), member("u1", 2))
    store.commit()
    assert store.get_member(0, member_key("u1")) == member("u1", 2)
    assert store.cached_bytes == cached  # replaced, not added beside
    store.put(0, state("g1"))
    store.commit()
    assert store.cached_bytes > cached


def test_pending_changes_stay_readable_whatever_the_cache_does(directory: Path) -> None:
    """With no cache at all, what the change set holds reads back until commit or rollback."""
    store = RocksDBStateStore(directory, cache_bytes=0)
    try:
        store.put(0, state("g1"))
        store.put(0, state("g2"))
        store.commit()
        store.put(0, state("g1", 5))
        assert (store.get(0, "g1"), store.get(0, "g2")) == (state("g1", 5), state("g2"))
        store.rollback()
        assert store.get(0, "g1") == state("g1")
    finally:
        store.close()


def test_a_dropped_partition_keeps_its_files_for_its_return(
    store: RocksDBStateStore, directory: Path
) -> None:
    """drop() closes a partition and keeps its files: reopened, it holds what was committed."""
    store.put(0, state("g1"))
    store.commit({("state", 0): 1})
    store.put(0, state("g1", 2))
    store.drop(0)
    assert store.changes() == []
    assert store.path(0).is_dir()
    assert store.open_partition(0) is None
    assert (store.get(0, "g1"), store.stored_offsets(0)) == (state("g1"), {"state": 1})
    assert store.group_count() == 1
    again = reopened(store, directory)
    try:
        assert again.get(0, "g1") == state("g1")
    finally:
        again.close()


def test_wipe_deletes_the_files(store: RocksDBStateStore) -> None:
    """wipe() deletes a partition's directory; the partition reopens empty."""
    store.put(0, state("g1"))
    store.commit({("state", 0): 1})
    store.wipe(0)
    assert not store.path(0).exists()
    assert (store.get(0, "g1"), store.stored_offsets(0)) == (None, {})


def test_expired_ids_leave_the_files(store: RocksDBStateStore, directory: Path) -> None:
    """expire_seen deletes old ids from disk with their count; a pending id re-put is kept."""
    for i in range(5):
        store.put_seen(0, ("g1", f"m{i}"), 100 * i, 0)
    store.commit()
    store.put_seen(0, ("g1", "m1"), 1_000, 0)  # applied again, under the change set
    store.put_seen(0, ("g1", "m9"), 50, 0)
    assert store.expire_seen(EXPIRE_BEFORE_250, 1) == (4, True)  # m0-m2 on disk, m9 pending
    assert [(c, p, ts) for c, p, _, _, ts in store.changes()] == [("dedupe", 0, 1_000)]
    assert store.seen_count() == 3
    store.commit()
    again = reopened(store, directory)
    try:
        assert [again.seen(0, ("g1", f"m{i}")) for i in range(5)] == [None, 1_000, None, 300, 400]
        assert again.seen_count() == 3
    finally:
        again.close()


def test_expiry_scans_a_slice_at_a_time_and_resumes(store: RocksDBStateStore) -> None:
    """With a limit, each call scans that many ids, resuming after the last one, across
    partitions and past a partition dropped meanwhile; the pass ends once every id was
    scanned, and the next call starts another."""
    for partition in (0, 1, 2):
        for i in range(4):
            store.put_seen(partition, ("g1", f"m{i}"), 100 * i, 0)
    store.commit()
    results = [store.expire_seen(EXPIRE_BEFORE_250, 1, limit=3) for _ in range(2)]
    assert results == [(3, False), (2, False)]  # 0: m0-m2 (3 gone), then 0: m3, 1: m0, m1
    store.drop(2)
    assert store.expire_seen(EXPIRE_BEFORE_250, 1, limit=3) == (
        1,
        True,
    )  # 1: m2, m3; 2 dropped
    assert [store.seen(p, ("g1", f"m{i}")) for p in (0, 1) for i in range(4)] == [
        None, None, None, 300, None, None, None, 300,
    ]  # fmt: skip
    assert store.seen_count() == 2
    store.put_seen(0, ("g1", "m9"), 100, 0)
    store.commit()
    assert store.expire_seen(EXPIRE_BEFORE_250, 1, limit=2) == (
        1,
        False,
    )  # a new pass: 0 done
    assert store.expire_seen(EXPIRE_BEFORE_250, 1, limit=2) == (
        0,
        True,
    )  # 1: m3, the last id


def test_an_expiry_pass_goes_on_to_partitions_opened_while_it_ran(
    store: RocksDBStateStore,
) -> None:
    """A pass also scans the partitions opened after it began (restored one after
    another on assignment): it ended with those open at its start, and the others kept
    their expired ids until a later pass began with them open, a quarter window later
    at the earliest, or never while rebalances came in step with the passes."""
    for partition in (0, 1):
        for i in range(4):
            store.put_seen(partition, ("g1", f"m{i}"), 100 * i, 0)
    store.commit()
    store.drop(1)  # revoked and given back: its restore has not come round yet
    assert store.expire_seen(EXPIRE_BEFORE_250, 1, limit=2) == (2, False)  # 0: m0, m1
    assert store.open_partition(1) is None
    passes = [store.expire_seen(EXPIRE_BEFORE_250, 1, limit=2) for _ in range(3)]
    assert passes == [(1, False), (2, False), (1, True)]  # 0: m2, m3; 1: m0, m1; 1: m2, m3
    assert [store.seen(p, ("g1", f"m{i}")) for p in (0, 1) for i in range(4)] == [
        None, None, None, 300, None, None, None, 300,
    ]  # fmt: skip


def test_a_malformed_record_is_skipped_with_a_warning(store: RocksDBStateStore) -> None:
    """A record that does not parse reads as absent and says so; a put replaces it."""
    store.apply_changelog(
        0, "members", [(0, member_key("u1").encode(), b"not json", 0)], next_offset=1
    )
    store.apply_changelog(0, "dedupe", [(0, seen_record_key("g", "m").encode(), b"x", 0)], 1)
    with capture_logs() as logs:
        assert store.get_member(0, member_key("u1")) is None
        assert store.seen(0, ("g", "m")) is None
    assert [e["event"] for e in logs] == ["store_record_skipped"] * 2
    store.put_member(0, member_key("u1"), member("u1"))
    store.commit()
    assert (store.get_member(0, member_key("u1")), store.member_count()) == (member("u1"), 1)
    assert store.expire_seen({0: 0}, 0) == (1, True)


@pytest.mark.parametrize("value", [b"9" * 5_000, b"1 " + b"9" * 5_000, b"9" * 16])
def test_a_dedupe_value_of_more_digits_than_a_time_is_malformed(
    store: RocksDBStateStore, value: bytes
) -> None:
    """A dedupe value of more digits than a time in ms (not written by a worker) reads as
    absent and expires: Python refused to read 5,000 digits, which failed every expiry
    pass (the partition rebuilt at each commit) and the id's next call."""
    store.apply_changelog(0, "dedupe", [(0, seen_record_key("g", "m").encode(), value, 0)], 1)
    with capture_logs():
        assert store.seen(0, ("g", "m")) is None
    assert store.expire_seen({0: 0}, 0) == (1, True)


_KILLED = """
import os, signal, sys
from pathlib import Path
from tests.unit.test_store import state
from worker.store import RocksDBStateStore
store = RocksDBStateStore(Path(sys.argv[1]), cache_bytes=0)
store.put(0, state("g1"))
store.commit({("state", 0): 1})
store.apply_changelog(0, "state", [(1, b"g2", sys.stdin.buffer.read(), 0)], next_offset=2)
store.put(0, state("g3"))
store.commit({("state", 0): 3})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_leaves_a_consistent_store(directory: Path) -> None:
    """Killed, a store keeps every commit and every finished replay, with their offsets."""
    root = Path(__file__).resolve().parents[2]
    g2 = codec.encode(state_record(state("g2")))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED, str(directory)], cwd=root, check=False, input=g2
    )
    assert killed.returncode == -signal.SIGKILL
    store = RocksDBStateStore(directory, cache_bytes=0)
    try:
        assert store.open_partition(0) is None
        assert [store.get(0, g) for g in ("g1", "g2", "g3")] == [
            state(g) for g in ("g1", "g2", "g3")
        ]
        assert (store.stored_offsets(0), store.group_count()) == ({"state": 3}, 3)
    finally:
        store.close()


def test_a_partition_that_cannot_be_created_is_a_store_error(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files RocksDB cannot open are wiped and the database made again; when that fails
    too (a full disk), the error names the state_dir (it was a traceback of an internal
    exception)."""

    def unusable(*_: object) -> None:
        raise partition_module._Unusable("IO error: No space left on device")

    monkeypatch.setattr(partition_module, "_open", unusable)
    store = RocksDBStateStore(directory, cache_bytes=1 << 20)
    try:
        with pytest.raises(StoreError, match=r"worker\.state_dir: cannot create .*No space left"):
            store.get(0, "g1")
    finally:
        store.close()
