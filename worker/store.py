"""Where group states and memberships live between calls, per input partition.

The runner's transaction maps onto the store: it ``put``s while processing a batch,
writes ``changed()`` to the state topic in the Kafka transaction, then ``commit()``s
when the transaction commits or ``rollback()``s when it aborts. Partitions come and go
with rebalances: ``restore`` loads an assigned partition from its topics, ``drop``
forgets a revoked one.

A store is used from the runner's thread only; it is not thread-safe.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from worker.members import Membership
from worker.state import GroupState

__all__ = ["InMemoryStateStore", "StateStore"]

_V = TypeVar("_V")


class StateStore(Protocol):
    """Group states and memberships by partition, with one open change set at a time.

    Every write since the last ``commit()`` or ``rollback()`` belongs to the open change
    set. No method blocks on I/O in the in-memory store; none raises for an unknown
    partition (it is simply empty).
    """

    def get(self, partition: int, group_id: str) -> GroupState | None:
        """The group's state, or ``None`` when the partition holds none for it."""
        ...

    def put(self, partition: int, state: GroupState) -> None:
        """Store ``state`` as its group's state and mark the group changed."""
        ...

    def get_member(self, partition: int, key: str) -> Membership | None:
        """The membership under ``key`` (``state.membership_key``), or ``None``."""
        ...

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        """Store a membership and mark it changed; rollback undoes it."""
        ...

    def changed(self) -> list[tuple[int, GroupState]]:
        """The newest state of each group put since the last commit or rollback.

        One entry per group (changelog writes are coalesced), in the order the groups
        were first changed.
        """
        ...

    def changed_members(self) -> list[tuple[int, str, Membership]]:
        """The newest membership of each key put since the last commit or rollback."""
        ...

    def commit(self) -> None:
        """Close the change set: its writes are durable (the transaction committed)."""
        ...

    def rollback(self) -> None:
        """Undo every ``put`` and ``put_member`` of the change set (the transaction aborted)."""
        ...

    def restore(self, partition: int, state: GroupState) -> None:
        """Load a state read from the state topic, outside the change set.

        Meant for a partition being restored after assignment, with no pending writes.
        """
        ...

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        """Load a membership read from the members topic, outside the change set."""
        ...

    def drop(self, partition: int) -> None:
        """Forget a revoked partition: its states, memberships and pending changes."""
        ...

    def group_count(self) -> int:
        """How many group states are held, over every partition."""
        ...

    def member_count(self) -> int:
        """How many memberships are held, over every partition."""
        ...


class InMemoryStateStore:
    """A ``StateStore`` in dicts: one per partition for states, one for memberships.

    Rollback keeps, for each key, its value before the first write of the change set
    (``None`` when the key was new), and puts those back.
    """

    def __init__(self) -> None:
        self._groups: dict[int, dict[str, GroupState]] = {}
        self._members: dict[int, dict[str, Membership]] = {}
        self._changed: dict[tuple[int, str], GroupState] = {}
        self._changed_members: dict[tuple[int, str], Membership] = {}
        self._undo_groups: dict[tuple[int, str], GroupState | None] = {}
        self._undo_members: dict[tuple[int, str], Membership | None] = {}

    def get(self, partition: int, group_id: str) -> GroupState | None:
        groups = self._groups.get(partition)
        return None if groups is None else groups.get(group_id)

    def put(self, partition: int, state: GroupState) -> None:
        groups = self._groups.setdefault(partition, {})
        key = (partition, state.group_id)
        if key not in self._undo_groups:
            self._undo_groups[key] = groups.get(state.group_id)
        groups[state.group_id] = state
        self._changed[key] = state

    def get_member(self, partition: int, key: str) -> Membership | None:
        members = self._members.get(partition)
        return None if members is None else members.get(key)

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        members = self._members.setdefault(partition, {})
        undo_key = (partition, key)
        if undo_key not in self._undo_members:
            self._undo_members[undo_key] = members.get(key)
        members[key] = m
        self._changed_members[undo_key] = m

    def changed(self) -> list[tuple[int, GroupState]]:
        return [(partition, state) for (partition, _), state in self._changed.items()]

    def changed_members(self) -> list[tuple[int, str, Membership]]:
        return [(partition, key, m) for (partition, key), m in self._changed_members.items()]

    def commit(self) -> None:
        self._changed.clear()
        self._changed_members.clear()
        self._undo_groups.clear()
        self._undo_members.clear()

    def rollback(self) -> None:
        for (partition, group_id), state in self._undo_groups.items():
            _put_back(self._groups, partition, group_id, state)
        for (partition, key), m in self._undo_members.items():
            _put_back(self._members, partition, key, m)
        self.commit()

    def restore(self, partition: int, state: GroupState) -> None:
        self._groups.setdefault(partition, {})[state.group_id] = state

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        self._members.setdefault(partition, {})[key] = m

    def drop(self, partition: int) -> None:
        self._groups.pop(partition, None)
        self._members.pop(partition, None)
        _forget(self._changed, partition)
        _forget(self._changed_members, partition)
        _forget(self._undo_groups, partition)
        _forget(self._undo_members, partition)

    def group_count(self) -> int:
        return sum(len(groups) for groups in self._groups.values())

    def member_count(self) -> int:
        return sum(len(members) for members in self._members.values())


def _put_back(
    by_partition: dict[int, dict[str, _V]], partition: int, key: str, old: _V | None
) -> None:
    """Restore one key to its value before the change set (removing it when it was new)."""
    if old is None:
        by_partition.get(partition, {}).pop(key, None)
    else:
        by_partition.setdefault(partition, {})[key] = old


def _forget(log: dict[tuple[int, str], _V], partition: int) -> None:
    for key in [k for k in log if k[0] == partition]:
        del log[key]
