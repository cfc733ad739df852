"""Where group states, memberships and dedupe ids live between calls, per input partition.

The runner's transaction maps onto the store: it ``put``s while processing a batch,
writes the ``changed`` entries to their changelog topics in the Kafka transaction, then
``commit()``s when the transaction commits or ``rollback()``s when it aborts.
Partitions come and go with rebalances: ``restore_*`` loads an assigned partition from
its topics, ``drop`` forgets a revoked one.

Three tables, each keyed per partition: group states by groupId, memberships by their
key (``members.membership_key``), and dedupe ids, ``(groupId, messageId)`` -> the
arrival time (ms) of the call that applied it.

A store is used from the runner's thread only; it is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from worker.members import Membership
from worker.state import GroupState

__all__ = ["InMemoryStateStore", "SeenKey", "StateStore"]

SeenKey = tuple[str, str]
"""``(groupId, messageId)``: a dedupe id."""

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class StateStore(Protocol):
    """Group states, memberships and dedupe ids by partition, with one open change set.

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
        """The membership under ``key`` (``members.membership_key``), or ``None``."""
        ...

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        """Store a membership and mark it changed; rollback undoes it."""
        ...

    def seen(self, partition: int, key: SeenKey) -> int | None:
        """When the call with this dedupe id was applied (its arrival ms), or ``None``."""
        ...

    def put_seen(self, partition: int, key: SeenKey, arrival_ms: int) -> None:
        """Record that the call with this dedupe id was applied; rollback undoes it."""
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

    def changed_seen(self) -> list[tuple[int, SeenKey, int]]:
        """The dedupe ids put since the last commit or rollback, with their arrival ms."""
        ...

    def commit(self) -> None:
        """Close the change set: its writes are durable (the transaction committed)."""
        ...

    def rollback(self) -> None:
        """Undo every write of the change set (the transaction aborted)."""
        ...

    def restore(self, partition: int, state: GroupState) -> None:
        """Load a state read from the state topic, outside the change set.

        Meant for a partition being restored after assignment, with no pending writes.
        """
        ...

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        """Load a membership read from the members topic, outside the change set."""
        ...

    def restore_seen(self, partition: int, key: SeenKey, arrival_ms: int) -> None:
        """Load a dedupe id read from the dedupe topic, outside the change set."""
        ...

    def expire_seen(self, before_ms: int) -> int:
        """Forget dedupe ids that arrived before ``before_ms``; returns how many.

        Outside the change set: an expired id is expired whatever the transaction does.
        """
        ...

    def drop(self, partition: int) -> None:
        """Forget a revoked partition: its entries and pending changes."""
        ...

    def group_count(self) -> int:
        """How many group states are held, over every partition."""
        ...

    def member_count(self) -> int:
        """How many memberships are held, over every partition."""
        ...

    def seen_count(self) -> int:
        """How many dedupe ids are held, over every partition."""
        ...


class _Table(Generic[_K, _V]):
    """One kind of entry in dicts per partition, with the open change set's log.

    Rollback keeps, for each key, its value before the first write of the change set
    (``None`` when the key was new), and puts those back.
    """

    def __init__(self) -> None:
        self._data: dict[int, dict[_K, _V]] = {}
        self._changed: dict[tuple[int, _K], _V] = {}
        self._undo: dict[tuple[int, _K], _V | None] = {}

    def get(self, partition: int, key: _K) -> _V | None:
        entries = self._data.get(partition)
        return None if entries is None else entries.get(key)

    def put(self, partition: int, key: _K, value: _V) -> None:
        entries = self._data.setdefault(partition, {})
        log_key = (partition, key)
        if log_key not in self._undo:
            self._undo[log_key] = entries.get(key)
        entries[key] = value
        self._changed[log_key] = value

    def restore(self, partition: int, key: _K, value: _V) -> None:
        self._data.setdefault(partition, {})[key] = value

    def changed(self) -> list[tuple[int, _K, _V]]:
        return [(partition, key, value) for (partition, key), value in self._changed.items()]

    def commit(self) -> None:
        self._changed.clear()
        self._undo.clear()

    def rollback(self) -> None:
        for (partition, key), old in self._undo.items():
            if old is None:
                self._data.get(partition, {}).pop(key, None)
            else:
                self._data.setdefault(partition, {})[key] = old
        self.commit()

    def drop(self, partition: int) -> None:
        self._data.pop(partition, None)
        for log in (self._changed, self._undo):
            for log_key in [k for k in log if k[0] == partition]:
                del log[log_key]

    def count(self) -> int:
        return sum(len(entries) for entries in self._data.values())

    def remove_if(self, old: Callable[[_V], bool]) -> int:
        removed = 0
        for entries in self._data.values():
            gone = [key for key, value in entries.items() if old(value)]
            for key in gone:
                del entries[key]
            removed += len(gone)
        return removed


class InMemoryStateStore:
    """A ``StateStore`` in dicts: a ``_Table`` each for states, memberships and ids."""

    def __init__(self) -> None:
        self._groups: _Table[str, GroupState] = _Table()
        self._members: _Table[str, Membership] = _Table()
        self._seen: _Table[SeenKey, int] = _Table()
        self._tables = (self._groups, self._members, self._seen)

    def get(self, partition: int, group_id: str) -> GroupState | None:
        return self._groups.get(partition, group_id)

    def put(self, partition: int, state: GroupState) -> None:
        self._groups.put(partition, state.group_id, state)

    def get_member(self, partition: int, key: str) -> Membership | None:
        return self._members.get(partition, key)

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        self._members.put(partition, key, m)

    def seen(self, partition: int, key: SeenKey) -> int | None:
        return self._seen.get(partition, key)

    def put_seen(self, partition: int, key: SeenKey, arrival_ms: int) -> None:
        self._seen.put(partition, key, arrival_ms)

    def changed(self) -> list[tuple[int, GroupState]]:
        return [(partition, state) for partition, _, state in self._groups.changed()]

    def changed_members(self) -> list[tuple[int, str, Membership]]:
        return self._members.changed()

    def changed_seen(self) -> list[tuple[int, SeenKey, int]]:
        return self._seen.changed()

    def commit(self) -> None:
        for table in self._tables:
            table.commit()

    def rollback(self) -> None:
        for table in self._tables:
            table.rollback()

    def restore(self, partition: int, state: GroupState) -> None:
        self._groups.restore(partition, state.group_id, state)

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        self._members.restore(partition, key, m)

    def restore_seen(self, partition: int, key: SeenKey, arrival_ms: int) -> None:
        self._seen.restore(partition, key, arrival_ms)

    def expire_seen(self, before_ms: int) -> int:
        return self._seen.remove_if(lambda arrival: arrival < before_ms)

    def drop(self, partition: int) -> None:
        for table in self._tables:
            table.drop(partition)

    def group_count(self) -> int:
        return self._groups.count()

    def member_count(self) -> int:
        return self._members.count()

    def seen_count(self) -> int:
        return self._seen.count()
