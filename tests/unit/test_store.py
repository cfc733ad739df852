"""Tests for worker.store: the in-memory state store and its change-set semantics."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.members import Membership
from worker.state import GroupState
from worker.store import InMemoryStateStore, StateStore


def state(group_id: str, version: int = 1) -> GroupState:
    """A state told apart from others of its group by ``version`` (its event count)."""
    return GroupState(group_id, {"v": version}, {"v": (version, "m")}, None, 1, version, 0, 0, 0)


def member(member_id: str, last_seen_ms: int = 1) -> Membership:
    return Membership("g1", "userId", member_id, 0, last_seen_ms)


def committed(*states: tuple[int, GroupState]) -> InMemoryStateStore:
    """A store holding the given states as committed data."""
    store = InMemoryStateStore()
    for partition, s in states:
        store.put(partition, s)
    store.commit()
    return store


def test_satisfies_the_protocol() -> None:
    """InMemoryStateStore is a StateStore (checked by mypy)."""
    store: StateStore = InMemoryStateStore()
    assert store.group_count() == 0


def test_get_returns_what_was_put_per_partition() -> None:
    """States are kept per partition; unknown partitions and groups read as None."""
    store = InMemoryStateStore()
    store.put(0, state("g1", 1))
    store.put(1, state("g1", 2))
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get(1, "g1") == state("g1", 2)
    assert store.get(0, "g2") is None
    assert store.get(7, "g1") is None


def test_changed_coalesces_to_the_newest_state_per_group() -> None:
    """changed() lists each changed group once, with its newest state, in first-change order."""
    store = InMemoryStateStore()
    store.put(0, state("g1", 1))
    store.put(0, state("g2", 1))
    store.put(0, state("g1", 2))
    store.put(1, state("g1", 3))
    assert store.changed() == [(0, state("g1", 2)), (0, state("g2", 1)), (1, state("g1", 3))]


def test_changed_members_coalesce_to_the_newest_per_key() -> None:
    """changed_members() lists each changed membership once, newest, until commit or rollback."""
    store = InMemoryStateStore()
    store.put_member(0, "k1", member("u1", 1))
    store.put_member(0, "k2", member("u2", 1))
    store.put_member(0, "k1", member("u1", 5))
    assert store.changed_members() == [(0, "k1", member("u1", 5)), (0, "k2", member("u2", 1))]
    store.commit()
    assert store.changed_members() == []
    store.put_member(1, "k3", member("u3"))
    store.rollback()
    assert store.changed_members() == []
    assert store.get_member(1, "k3") is None


def test_commit_clears_the_change_set_and_keeps_values() -> None:
    """After commit() nothing is changed and every value stays readable."""
    store = committed((0, state("g1", 1)))
    store.put_member(0, "k1", member("u1"))
    store.commit()
    assert store.changed() == []
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get_member(0, "k1") == member("u1")


def test_rollback_restores_earlier_values_and_removes_new_keys() -> None:
    """rollback() puts back every value as of the last commit, across partitions."""
    store = committed((0, state("g1", 1)), (1, state("g9", 1)))
    store.put_member(0, "k1", member("u1"))
    store.commit()
    store.put(0, state("g1", 2))
    store.put(0, state("g1", 3))
    store.put(0, state("g2", 1))
    store.put(2, state("g3", 1))
    store.put_member(0, "k1", member("u1", 5))
    store.put_member(0, "k2", member("u2"))
    store.rollback()
    assert store.changed() == []
    assert store.get(0, "g1") == state("g1", 1)
    assert store.get(0, "g2") is None
    assert store.get(2, "g3") is None
    assert store.get(1, "g9") == state("g9", 1)
    assert store.get_member(0, "k1") == member("u1")
    assert store.get_member(0, "k2") is None
    assert (store.group_count(), store.member_count()) == (2, 1)


def test_rollback_does_not_undo_committed_writes() -> None:
    """A rollback right after a commit changes nothing."""
    store = committed((0, state("g1", 2)))
    store.rollback()
    assert store.get(0, "g1") == state("g1", 2)


def test_drop_forgets_a_partition_and_its_pending_changes() -> None:
    """drop() removes a partition's states, memberships and change set, and nothing else."""
    store = committed((0, state("g1", 1)), (1, state("g1", 1)))
    store.put(0, state("g1", 2))
    store.put(1, state("g1", 2))
    store.put_member(0, "k1", member("u1"))
    store.drop(0)
    assert store.changed() == [(1, state("g1", 2))]
    assert store.get(0, "g1") is None
    assert store.get_member(0, "k1") is None
    store.rollback()
    assert store.get(0, "g1") is None
    assert store.get(1, "g1") == state("g1", 1)


def test_restore_does_not_mark_changed() -> None:
    """Restored states and memberships are readable, not in changed(), and survive rollback."""
    store = InMemoryStateStore()
    store.restore(3, state("g1"))
    store.restore_member(3, "k1", member("u1"))
    assert store.changed() == []
    store.rollback()
    assert store.get(3, "g1") == state("g1")
    assert store.get_member(3, "k1") == member("u1")


def test_counts_cover_every_partition() -> None:
    """group_count() and member_count() sum over partitions."""
    store = InMemoryStateStore()
    store.put(0, state("g1"))
    store.put(0, state("g1", 2))
    store.restore(1, state("g1"))
    store.put_member(0, "k1", member("u1"))
    store.restore_member(1, "k1", member("u1"))
    store.restore_member(1, "k2", member("u2"))
    assert (store.group_count(), store.member_count()) == (2, 3)


_WRITES = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(["g1", "g2", "g3"]), st.integers(1, 9)),
    max_size=12,
)


@given(_WRITES, _WRITES)
def test_rollback_returns_to_the_last_commit(
    before: list[tuple[int, str, int]], after: list[tuple[int, str, int]]
) -> None:
    """Whatever is put after a commit, rollback() leaves exactly the committed contents."""
    store = InMemoryStateStore()
    for partition, group, version in before:
        store.put(partition, state(group, version))
        store.put_member(partition, group, member(group, version))
    store.commit()
    keys = [(p, g) for p in range(3) for g in ("g1", "g2", "g3")]
    snapshot = [(store.get(p, g), store.get_member(p, g)) for p, g in keys]
    for partition, group, version in after:
        store.put(partition, state(group, version + 10))
        store.put_member(partition, group, member(group, version + 10))
    store.rollback()
    assert [(store.get(p, g), store.get_member(p, g)) for p, g in keys] == snapshot
    assert store.changed() == []


def test_dedupe_ids_roll_back_and_expire_by_arrival() -> None:
    """Seen ids follow the change set; expire_seen forgets those that arrived too long ago."""
    store = InMemoryStateStore()
    store.put_seen(0, ("g1", "m1"), 100)
    store.commit()
    store.put_seen(0, ("g1", "m2"), 200)
    assert store.changed_seen() == [(0, ("g1", "m2"), 200)]
    store.rollback()
    assert (store.seen(0, ("g1", "m1")), store.seen(0, ("g1", "m2"))) == (100, None)
    store.restore_seen(1, ("g2", "m3"), 300)
    assert store.expire_seen(before_ms=250) == 1
    assert (store.seen(0, ("g1", "m1")), store.seen(1, ("g2", "m3"))) == (None, 300)
    assert store.seen_count() == 1
