"""The StateStore contract, run against every store: in memory, and RocksDB (cached or not).

What only RocksDB does (files, offsets, corruption, its cache) is in test_store_rocksdb.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from worker import codec
from worker.dedupe import seen_record_key
from worker.members import Membership, membership_key, membership_record
from worker.profile import FORMAT, StateFormatError, state_record
from worker.state import Applied, GroupState, merge_call
from worker.store import (
    ChangelogEntry,
    ChangelogRecord,
    InMemoryStateStore,
    RocksDBStateStore,
    StateStore,
)

MakeStore = Callable[..., StateStore]


def state(group_id: str, version: int = 1) -> GroupState:
    """A state told apart from others of its group by ``version`` (its event count)."""
    return GroupState(group_id, {"v": version}, {"v": (version, "m")}, None, 1, version, 0, 0, 0)


def member(member_id: str, last_seen_ms: int = 1) -> Membership:
    return Membership("g1", "userId", member_id, 0, last_seen_ms)


def member_key(member_id: str) -> str:
    """The key of ``member(member_id)``."""
    return membership_key("g1", "userId", member_id)


def state_entry(offset: int, s: GroupState) -> ChangelogEntry:
    """The state changelog record of ``s``, as read at ``offset``."""
    return offset, s.group_id.encode(), codec.encode(state_record(s)), 0


def new_store(kind: str, directory: Path, deployment: str = "") -> StateStore:
    if kind == "memory":
        return InMemoryStateStore(deployment)
    # Uncached, every read parses the record from the database.
    cache_bytes = 0 if kind == "rocksdb-uncached" else 1 << 20
    return RocksDBStateStore(directory, cache_bytes, deployment)


@pytest.fixture(params=["memory", "rocksdb", "rocksdb-uncached"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Makes empty stores of one kind, each in a directory of its own; closes them after."""
    stores: list[StateStore] = []

    def make(deployment: str = "") -> StateStore:
        stores.append(new_store(request.param, tmp_path / f"store-{len(stores)}", deployment))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> StateStore:
    return make_store()


def committed(store: StateStore, *states: tuple[int, GroupState]) -> StateStore:
    """``store`` holding the given states as committed data."""
    for partition, s in states:
        store.put(partition, s)
    store.commit()
    return store


def test_get_returns_what_was_put_per_partition(store: StateStore) -> None:
    """States are kept per partition; unknown partitions and groups read as None."""
    store.put(0, state("g1", 1))
    store.put(1, state("g1", 2))
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get(1, "g1") == state("g1", 2)
    assert store.get(0, "g2") is None
    assert store.get(7, "g1") is None


def state_record_of(partition: int, s: GroupState) -> ChangelogRecord:
    return ("state", partition, s.group_id.encode(), codec.encode(state_record(s)), 0)


def test_changes_coalesce_to_the_newest_state_per_group(store: StateStore) -> None:
    """changes() lists each changed group once, with its newest state, in first-change order."""
    store.put(0, state("g1", 1))
    store.put(0, state("g2", 1))
    store.put(0, state("g1", 2))
    store.put(1, state("g1", 3))
    newest = [(0, state("g1", 2)), (0, state("g2", 1)), (1, state("g1", 3))]
    assert store.changes() == [state_record_of(p, s) for p, s in newest]
    store.put(0, state("g2", 4))  # after changes(): its record is made again
    assert store.changes()[1] == state_record_of(0, state("g2", 4))
    store.commit()
    assert store.get(0, "g2") == state("g2", 4)


def test_changes_coalesce_to_the_newest_membership_per_key(store: StateStore) -> None:
    """changes() lists each changed membership once, newest, until commit or rollback."""
    store.put_member(0, member_key("u1"), member("u1", 1))
    store.put_member(0, member_key("u2"), member("u2", 1))
    store.put_member(0, member_key("u1"), member("u1", 5))
    newest = [(0, member_key("u1"), member("u1", 5)), (0, member_key("u2"), member("u2", 1))]
    assert store.changes() == [
        ("members", p, k.encode(), codec.encode(membership_record(m)), 0) for p, k, m in newest
    ]
    store.commit()
    assert store.changes() == []
    store.put_member(1, member_key("u3"), member("u3"))
    store.rollback()
    assert store.changes() == []
    assert store.get_member(1, member_key("u3")) is None


def test_changes_list_states_then_memberships_then_dedupe_ids(store: StateStore) -> None:
    """A dedupe id's record is keyed like the dedupe topic and stamped with its arrival."""
    store.put_seen(2, ("g1", "m1"), 1_000, 0)
    store.put_member(0, member_key("u1"), member("u1"))
    store.put(1, state("g1"))
    store.put_seen(2, ("g1", "m1"), 2_000, 0)
    changes = store.changes()
    assert [(c, p) for c, p, *_ in changes] == [("state", 1), ("members", 0), ("dedupe", 2)]
    assert changes[2] == ("dedupe", 2, seen_record_key("g1", "m1").encode(), b"2000", 2_000)
    store.commit()
    assert store.seen(2, ("g1", "m1")) == 2_000


def test_commit_clears_the_change_set_and_keeps_values(store: StateStore) -> None:
    """After commit() nothing is changed and every value stays readable."""
    committed(store, (0, state("g1", 1)))
    store.put_member(0, member_key("u1"), member("u1"))
    store.put_seen(0, ("g1", "m1"), 100, 0)
    store.commit()
    assert store.changes() == []
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get_member(0, member_key("u1")) == member("u1")
    assert store.seen(0, ("g1", "m1")) == 100


def test_commit_takes_the_changelog_offsets_reached(store: StateStore) -> None:
    """commit() accepts offsets per (changelog, partition), with or without changes."""
    store.put(0, state("g1"))
    store.commit({("state", 0): 7, ("dedupe", 0): 3, ("members", 2): 1})
    store.commit({("state", 0): 8})
    assert store.get(0, "g1") == state("g1")


def test_rollback_restores_earlier_values_and_removes_new_keys(store: StateStore) -> None:
    """rollback() puts back every value as of the last commit, across partitions."""
    committed(store, (0, state("g1", 1)), (1, state("g9", 1)))
    store.put_member(0, member_key("u1"), member("u1"))
    store.commit()
    store.put(0, state("g1", 2))
    store.put(0, state("g1", 3))
    store.put(0, state("g2", 1))
    store.put(2, state("g3", 1))
    store.put_member(0, member_key("u1"), member("u1", 5))
    store.put_member(0, member_key("u2"), member("u2"))
    store.rollback()
    assert store.changes() == []
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get(0, "g2") is None
    assert store.get(2, "g3") is None
    assert store.get(1, "g9") == state("g9", 1)
    assert store.get_member(0, member_key("u1")) == member("u1")
    assert store.get_member(0, member_key("u2")) is None
    assert (store.group_count(), store.member_count()) == (2, 1)


def test_rollback_undoes_a_state_updated_in_place(store: StateStore) -> None:
    """A state got, merged in place and put (as the processor does) reads as committed
    after a rollback, and as merged after a commit."""
    committed(store, (0, state("g1", 1)))
    for _ in range(2):  # the first rollback must not leave the cache holding the merge
        got = store.get(0, "g1")
        assert got is not None
        applied = Applied("g1", "m9", 5, "userId", "u1", {"name": "N"})
        store.put(0, merge_call(got, applied, new_member=True, now_ms=9, in_place=True))
        store.rollback()
        assert store.get(0, "g1") == state("g1", 1)
    got = store.get(0, "g1")
    assert got is not None
    merged = merge_call(got, applied, new_member=True, now_ms=9, in_place=True)
    store.put(0, merged)
    store.commit()
    assert store.get(0, "g1") == merged
    assert merged.traits == {"v": 1, "name": "N"}


def test_rollback_does_not_undo_committed_writes(store: StateStore) -> None:
    """A rollback right after a commit changes nothing."""
    committed(store, (0, state("g1", 2)))
    store.rollback()
    assert store.get(0, "g1") == state("g1", 2)


def test_drop_forgets_a_partition_and_its_pending_changes(store: StateStore) -> None:
    """drop() removes a partition's change set and counts, and nothing of other partitions."""
    committed(store, (0, state("g1", 1)), (1, state("g1", 1)))
    store.put(0, state("g1", 2))
    store.put(1, state("g1", 2))
    store.put_member(0, member_key("u1"), member("u1"))
    store.drop(0)
    assert store.changes() == [state_record_of(1, state("g1", 2))]
    assert (store.group_count(), store.member_count()) == (1, 0)
    store.rollback()
    assert store.get(1, "g1") == state("g1", 1)
    # RocksDB keeps the committed files for the partition's return (test_store_rocksdb.py).
    assert store.get(0, "g1") in (None, state("g1", 1))
    assert store.get_member(0, member_key("u1")) is None


def test_restore_does_not_mark_changed(store: StateStore) -> None:
    """Restored states and memberships are readable, not in changes(), and survive rollback."""
    store.restore(3, state("g1"))
    store.restore_member(3, member_key("u1"), member("u1"))
    store.restore_seen(3, ("g1", "m1"), 5, 0)
    assert store.changes() == []
    store.rollback()
    assert store.get(3, "g1") == state("g1")
    assert store.get_member(3, member_key("u1")) == member("u1")
    assert store.seen(3, ("g1", "m1")) == 5


def test_counts_cover_every_partition(store: StateStore) -> None:
    """group_count() and member_count() sum over partitions."""
    store.put(0, state("g1"))
    store.put(0, state("g1", 2))
    store.restore(1, state("g1"))
    store.put_member(0, member_key("u1"), member("u1"))
    store.restore_member(1, member_key("u1"), member("u1"))
    store.restore_member(1, member_key("u2"), member("u2"))
    assert (store.group_count(), store.member_count()) == (2, 3)
    store.commit()
    store.put(1, state("g1", 3))
    store.put(1, state("g2"))
    assert (store.group_count(), store.member_count()) == (3, 3)


def test_a_fresh_partition_opens_with_no_offsets(store: StateStore) -> None:
    """A partition never written opens as it is, to replay every changelog from the start."""
    assert store.open_partition(4) is None
    assert store.stored_offsets(4) == {}
    assert store.group_count() == 0


def test_apply_changelog_loads_records_and_tombstones_delete(store: StateStore) -> None:
    """Applied records read back parsed, the newest per key; tombstones delete; not changed."""
    states: list[ChangelogEntry] = [state_entry(0, state("g1", 1)), state_entry(1, state("g2"))]
    states += [state_entry(2, state("g1", 2)), (3, b"g2", None, 0), (4, b"g3", None, 0)]
    assert store.apply_changelog(0, "state", states, next_offset=5) == 0
    key = '["g1","userId","u1"]'
    members = [(0, key.encode(), codec.encode(membership_record(member("u1"))), 0)]
    store.apply_changelog(0, "members", members, next_offset=1)
    ids: list[ChangelogEntry] = [(0, seen_record_key("g1", "m1").encode(), b"100", 0)]
    ids += [(1, seen_record_key("g1", "m2").encode(), b"200", 0)]
    ids += [(2, seen_record_key("g1", "m1").encode(), None, 0)]
    store.apply_changelog(0, "dedupe", ids, next_offset=3)
    assert store.get(0, "g1") == state("g1", 2)
    assert store.get(0, "g2") is None
    assert store.get_member(0, key) == member("u1")
    assert (store.seen(0, ("g1", "m1")), store.seen(0, ("g1", "m2"))) == (None, 200)
    assert store.changes() == []
    assert (store.group_count(), store.member_count(), store.seen_count()) == (1, 1, 1)
    store.rollback()
    assert store.get(0, "g1") == state("g1", 2)


def test_applied_records_replace_what_was_read_before(store: StateStore) -> None:
    """A record applied after a read (a catch-up replay) is what the next read returns."""
    committed(store, (0, state("g1", 1)), (0, state("g2", 1)))
    assert (store.get(0, "g1"), store.get(0, "g2")) == (state("g1", 1), state("g2", 1))
    store.apply_changelog(0, "state", [state_entry(5, state("g1", 2)), (6, b"g2", None, 0)], 7)
    assert (store.get(0, "g1"), store.get(0, "g2")) == (state("g1", 2), None)
    assert store.group_count() == 1


def test_a_malformed_record_reads_as_absent(store: StateStore) -> None:
    """A malformed changelog record is skipped (on apply or on read) and can be replaced."""
    store.apply_changelog(0, "state", [(0, b"g1", b'{"groupId": "g1"}', 0)], next_offset=1)
    assert store.get(0, "g1") is None
    store.put(0, state("g1"))
    store.commit()
    assert store.get(0, "g1") == state("g1")
    assert store.group_count() == 1


def test_a_state_record_nested_too_deep_to_write_again_reads_as_absent(store: StateStore) -> None:
    """A state record with a trait nested deeper than could be written again (not
    written by a worker) is skipped: read, its group's next call crash-looped the worker
    as its state record could not be encoded."""
    readable = state_record(state("g1"))
    readable["traits"]["deep"] = "DEEP"
    readable["merge"]["stamps"]["deep"] = 0
    store.apply_changelog(0, "state", [(0, b"g1", codec.encode(readable), 0)], next_offset=1)
    assert store.get(0, "g1") is not None
    store.drop(0)
    record = codec.encode(readable).replace(b'"DEEP"', b"[" * 300 + b"]" * 300)
    with capture_logs() as logs:
        store.apply_changelog(0, "state", [(0, b"g1", record, 0)], next_offset=1)
        assert store.get(0, "g1") is None
    assert [log["event"] for log in logs] == ["store_record_skipped"]


def test_a_record_of_another_group_or_member_than_its_key_reads_as_absent(
    store: StateStore,
) -> None:
    """A record whose content is another group's or member's than its key is malformed."""
    other_group = codec.encode(state_record(state("other")))
    key = '["g1","userId","u1"]'
    members: list[ChangelogEntry] = [
        (
            0,
            key.encode(),
            codec.encode(membership_record(Membership("g2", "userId", "u1", 0, 1))),
            0,
        ),
        (1, b'["g1","userId","u2"]', codec.encode(membership_record(member("u1"))), 0),
    ]
    with capture_logs() as logs:
        store.apply_changelog(0, "state", [(0, b"g1", other_group, 0)], next_offset=1)
        store.apply_changelog(0, "members", members, next_offset=2)
        assert store.get(0, "g1") is None
        assert store.get_member(0, key) is None
        assert store.get_member(0, '["g1","userId","u2"]') is None
    assert [log["event"] for log in logs] == ["store_record_skipped"] * 3
    assert not any("other" in str(log) or "u1" in str(log) for log in logs)


@pytest.mark.parametrize("spaced", [False, True])
def test_a_state_record_of_a_newer_format_raises_on_apply(store: StateStore, spaced: bool) -> None:
    """A state record in a format this worker does not read raises when it is applied
    (a restore stops there), however it is spelled, even beside a trait that looks like
    this worker's ``merge``."""
    record = state_record(state("g1"))
    record["traits"]["merge"] = {"format": FORMAT, "x": 1}
    record["merge"]["format"] = 99
    value = json.dumps(record).encode() if spaced else codec.encode(record)
    entries = [(0, b"g0", codec.encode(state_record(state("g0"))), 0), (1, b"g1", value, 0)]
    with pytest.raises(StateFormatError, match="format 99"):
        store.apply_changelog(0, "state", entries, next_offset=2)


def test_a_state_record_whose_format_is_no_format_reads_as_absent(store: StateStore) -> None:
    """A ``merge.format`` that is no whole number (a forged or broken record) is a
    malformed record, skipped, not a newer format: that stopped every restore of the
    partition for good, as replays read every record, a tombstone after it too."""
    record = state_record(state("g1"))
    record["merge"]["format"] = {"a": 1}
    entries = [(0, b"g0", codec.encode(state_record(state("g0"))), 0)]
    entries.append((1, b"g1", codec.encode(record), 0))
    with capture_logs() as logs:
        store.apply_changelog(0, "state", entries, next_offset=2)
        assert (store.get(0, "g0"), store.get(0, "g1")) == (state("g0"), None)
    assert [log["event"] for log in logs] == ["store_record_skipped"]


def test_a_state_record_of_another_deployment_raises_on_apply(make_store: MakeStore) -> None:
    """A store of deployment "a" writes its name into its state records, takes records
    naming it or none (older workers), and raises at one naming "b": two deployments
    sharing a state topic would apply each other's calls again."""
    store = make_store("a")
    store.put(0, state("g9"))
    [written] = [r for r in store.changes() if r[0] == "state"]
    assert codec.decode(written[3])["merge"]["deployment"] == "a"
    store.commit()

    def entry(offset: int, group_id: str, deployment: str) -> ChangelogEntry:
        value = codec.encode(state_record(state(group_id), deployment))
        return offset, group_id.encode(), value, 0

    store.apply_changelog(1, "state", [entry(0, "g0", "a"), entry(1, "g1", "")], 2)
    assert (store.get(1, "g0"), store.get(1, "g1")) == (state("g0"), state("g1"))
    with pytest.raises(StateFormatError, match="deployment 'b'"):
        store.apply_changelog(1, "state", [entry(2, "g2", "b")], 3)


def _forged(merge: bytes, trait_merge: bytes) -> bytes:
    """A state record of "g1" whose own ``merge`` is ``merge``, before a trait named
    merge holding ``trait_merge``."""
    record = state_record(state("g1"), "a")
    rest = codec.encode({k: v for k, v in record.items() if k != "merge"})
    trait = b'"merge":' + trait_merge + b","
    return b'{"merge":' + merge + b"," + rest[1:].replace(b'"traits":{', b'"traits":{' + trait)


_OURS = codec.encode(state_record(state("g1"), "a")["merge"])


@pytest.mark.parametrize(
    ("merge", "refused"),
    [
        pytest.param(_OURS.replace(b'"a"', b'"b"'), "deployment 'b'", id="another-deployment"),
        pytest.param(_OURS.replace(b'"format":3', b'"format":99'), "format 99", id="newer-format"),
        pytest.param(
            _OURS.replace(b'"a",', b'"a","deployment":"b",'), "deployment 'b'", id="key-twice"
        ),
        pytest.param(
            _OURS.replace(b'"format":3,', b'"format":3,"format":99,'),
            "format 99",
            id="format-twice",
        ),
    ],
)
@pytest.mark.parametrize("spelling", [b'"merge":', b'"merge" :', b'"m\\u0065rge":'])
def test_a_forged_state_record_that_shows_this_deployments_merge_elsewhere_raises(
    make_store: MakeStore, merge: bytes, refused: str, spelling: bytes
) -> None:
    """Anyone can write the state topic: a record whose merge names another deployment or
    a newer format raises on apply however its key is spelled, beside a trait that holds
    this deployment's merge as written, or with a key of its merge given twice."""
    store = make_store("a")
    value = _forged(merge, _OURS).replace(b'{"merge":', b"{" + spelling, 1)
    assert codec.decode(value)["traits"]["merge"] == codec.decode(_OURS)
    with pytest.raises(StateFormatError, match=refused):
        store.apply_changelog(0, "state", [(0, b"g1", value, 0)], next_offset=1)


def test_wipe_forgets_a_partition(store: StateStore) -> None:
    """wipe() leaves the partition empty, with no offsets, and other partitions as they were."""
    committed(store, (0, state("g1")), (1, state("g1")))
    store.commit({("state", 0): 1})
    store.wipe(0)
    assert (store.get(0, "g1"), store.get(1, "g1")) == (None, state("g1"))
    assert store.stored_offsets(0) == {}
    assert store.group_count() == 1


# expire_seen's horizon for every partition the tests use: ids that arrived before 250.
EXPIRE_BEFORE_250 = dict.fromkeys(range(3), 250)

_WRITES = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(["g1", "g2", "g3"]), st.integers(1, 9)),
    max_size=12,
)


# Each example makes a store of its own.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(_WRITES, _WRITES)
def test_rollback_returns_to_the_last_commit(
    make_store: MakeStore, before: list[tuple[int, str, int]], after: list[tuple[int, str, int]]
) -> None:
    """Whatever is put after a commit, rollback() leaves exactly the committed contents."""
    store = make_store()
    for partition, group, version in before:
        store.put(partition, state(group, version))
        store.put_member(partition, group, member(group, version))
        store.put_seen(partition, (group, "m"), version, 0)
    store.commit()
    keys = [(p, g) for p in range(3) for g in ("g1", "g2", "g3")]

    def contents() -> list[object]:
        return [(store.get(p, g), store.get_member(p, g), store.seen(p, (g, "m"))) for p, g in keys]

    counts = (store.group_count(), store.member_count(), store.seen_count())
    snapshot = contents()
    for partition, group, version in after:
        store.put(partition, state(group, version + 10))
        store.put_member(partition, group, member(group, version + 10))
        store.put_seen(partition, (group, "m"), version + 10, 0)
    store.rollback()
    assert contents() == snapshot
    assert (store.group_count(), store.member_count(), store.seen_count()) == counts
    assert store.changes() == []
    store.close()


def test_dedupe_ids_roll_back_and_expire_by_arrival(store: StateStore) -> None:
    """Seen ids follow the change set; expire_seen forgets those that arrived too long ago."""
    store.put_seen(0, ("g1", "m1"), 100, 0)
    store.commit()
    store.put_seen(0, ("g1", "m2"), 200, 0)
    assert [(c, p, ts) for c, p, _, _, ts in store.changes()] == [("dedupe", 0, 200)]
    store.rollback()
    assert (store.seen(0, ("g1", "m1")), store.seen(0, ("g1", "m2"))) == (100, None)
    store.restore_seen(1, ("g2", "m3"), 300, 0)
    assert store.expire_seen(EXPIRE_BEFORE_250, written_before_ms=1) == (1, True)
    assert (store.seen(0, ("g1", "m1")), store.seen(1, ("g2", "m3"))) == (None, 300)
    assert store.seen_count() == 1


def test_an_id_expired_with_a_change_set_open_is_gone_for_good(store: StateStore) -> None:
    """Expiry is outside the change set: an expired id, committed or pending, is neither
    written by the change set nor brought back by its rollback, in either store."""
    store.put_seen(0, ("g", "old"), 10, 10)
    store.commit()
    store.put_seen(0, ("g", "new"), 20, 20)
    store.put_seen(0, ("g", "old"), 30, 30)
    assert store.expire_seen({0: 100}, written_before_ms=100) == (2, True)
    assert [c for c in store.changes() if c[0] == "dedupe"] == []
    store.rollback()
    assert (store.seen(0, ("g", "old")), store.seen(0, ("g", "new"))) == (None, None)
    assert store.seen_count() == 0


def test_ids_expire_by_their_own_partition_horizon(store: StateStore) -> None:
    """expire_seen takes a horizon per partition; a partition without one keeps its ids."""
    for partition in (0, 1, 2):
        store.restore_seen(partition, ("g", "m"), 100, 0)
    assert store.expire_seen({0: 200, 1: 50}, written_before_ms=1) == (1, True)
    assert [store.seen(p, ("g", "m")) for p in (0, 1, 2)] == [None, 100, 100]


def test_an_id_written_within_the_window_is_kept_however_old_its_arrival(
    store: StateStore,
) -> None:
    """An id expires only once both its arrival and its writing are past their horizons,
    whether it was committed or restored with its record's timestamp; an id restored
    from a record without one expires by its arrival alone."""
    store.put_seen(0, ("g", "old"), 100, 5_000)
    store.put_seen(0, ("g", "new"), 100, 9_000)
    store.commit()
    dedupe = [
        (0, seen_record_key("g", "kept").encode(), b"100", 9_000),
        (1, seen_record_key("g", "stamped").encode(), b"100", 5_000),
        (2, seen_record_key("g", "unstamped").encode(), b"100", -1),
    ]
    store.apply_changelog(0, "dedupe", dedupe, next_offset=3)
    assert store.expire_seen({0: 200}, written_before_ms=8_000) == (3, True)
    kept = [m for m in ("old", "new", "kept", "stamped", "unstamped") if store.seen(0, ("g", m))]
    assert kept == ["new", "kept"]


def test_close_forgets_everything(store: StateStore) -> None:
    """After close() the store holds no pending change, and counts nothing."""
    committed(store, (0, state("g1")))
    store.put(1, state("g2"))
    store.close()
    assert (store.changes(), store.group_count()) == ([], 0)
