"""``InMemoryStateStore``: the ``StateStore`` in dicts, one ``_Table`` per kind of entry.

Nothing outlives the process or a ``drop``: it stores no changelog offsets, so each
assignment replays the changelogs from their beginning, parsing every record.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from worker import codec
from worker.dedupe import arrival_value, seen_key, seen_record_key
from worker.members import Membership, membership_from_record, membership_record
from worker.profile import StateFormatError, check_format, state_from_record, state_record
from worker.state import GroupState, copy_state

if TYPE_CHECKING:
    from worker.store import (
        Changelog,
        ChangelogEntry,
        ChangelogOffsets,
        ChangelogRecord,
        SeenKey,
    )

__all__ = ["InMemoryStateStore"]

log = structlog.get_logger("worker.store")
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
_CHANGELOGS = ("state", "members", "dedupe")


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

    def pending(self, partition: int, key: _K) -> bool:
        """Whether the open change set wrote ``key``."""
        return (partition, key) in self._undo

    def restore(self, partition: int, key: _K, value: _V) -> None:
        self._data.setdefault(partition, {})[key] = value

    def remove(self, partition: int, key: _K) -> None:
        self._data.get(partition, {}).pop(key, None)

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

    def clear(self) -> None:
        self._data.clear()
        self.commit()

    def count(self) -> int:
        return sum(len(entries) for entries in self._data.values())

    def remove_if(self, partition: int, old: Callable[[_V], bool]) -> int:
        """Remove the partition's entries ``old`` selects for good: out of the change set
        too, so that neither a commit writes them nor a rollback brings them back."""
        entries = self._data.get(partition, {})
        gone = [key for key, value in entries.items() if old(value)]
        for key in gone:
            del entries[key]
            self._changed.pop((partition, key), None)
            self._undo.pop((partition, key), None)
        return len(gone)


class InMemoryStateStore:
    """A ``StateStore`` in dicts: a ``_Table`` each for states, memberships and ids.

    ``deployment`` (``worker.group_id``) is named in the state records it writes, and a
    state record naming another raises ``StateFormatError`` when applied.
    """

    def __init__(self, deployment: str = "") -> None:
        self._deployment = deployment
        self._groups: _Table[str, GroupState] = _Table()
        self._members: _Table[str, Membership] = _Table()
        self._seen: _Table[SeenKey, tuple[int, int]] = _Table()  # (arrival, written)
        self._tables = (self._groups, self._members, self._seen)
        # Per partition, the offsets its changelogs were replayed to since it was loaded:
        # a restore cut short goes on from there.
        self._replayed: dict[int, dict[Changelog, int]] = {}

    def get(self, partition: int, group_id: str) -> GroupState | None:
        state = self._groups.get(partition, group_id)
        if state is None or self._groups.pending(partition, group_id):
            return state
        # A copy: the caller may update it in place, and the undo log keeps the original.
        return copy_state(state)

    def put(self, partition: int, state: GroupState) -> None:
        self._groups.put(partition, state.group_id, state)

    def get_member(self, partition: int, key: str) -> Membership | None:
        return self._members.get(partition, key)

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        self._members.put(partition, key, m)

    def seen(self, partition: int, key: SeenKey) -> int | None:
        applied = self._seen.get(partition, key)
        return None if applied is None else applied[0]

    def put_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        self._seen.put(partition, key, (arrival_ms, written_ms))

    def changes(self) -> list[ChangelogRecord]:
        records: list[ChangelogRecord] = [
            ("state", p, group_id.encode(), codec.encode(state_record(state, self._deployment)), 0)
            for p, group_id, state in self._groups.changed()
        ]
        records += [
            ("members", p, key.encode(), codec.encode(membership_record(m)), 0)
            for p, key, m in self._members.changed()
        ]
        records += [
            ("dedupe", p, seen_record_key(*key).encode(), b"%d" % arrival, arrival)
            for p, key, (arrival, _) in self._seen.changed()
        ]
        return records

    def prepare(self) -> None:
        """Nothing to prepare: ``commit`` only forgets the undo entries."""

    def commit(self, offsets: ChangelogOffsets | None = None) -> None:
        """Close the change set; ``offsets`` are ignored (nothing outlives the process)."""
        for table in self._tables:
            table.commit()

    def rollback(self) -> None:
        for table in self._tables:
            table.rollback()

    def restore(self, partition: int, state: GroupState) -> None:
        self._groups.restore(partition, state.group_id, state)

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        self._members.restore(partition, key, m)

    def restore_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        self._seen.restore(partition, key, (arrival_ms, written_ms))

    def open_partition(self, partition: int, source: bytes = b"") -> str | None:
        """Nothing to open: always ``None``."""
        return None

    def stored_offsets(self, partition: int) -> dict[Changelog, int]:
        """The offsets replayed to since the partition was dropped (``{}`` then: every
        changelog is replayed from its beginning)."""
        return dict(self._replayed.get(partition, {}))

    def apply_changelog(
        self,
        partition: int,
        changelog: Changelog,
        entries: Iterable[ChangelogEntry],
        next_offset: int,
    ) -> int:
        """Parse and load each record (``StateStore.apply_changelog``)."""
        if changelog not in _CHANGELOGS:
            raise ValueError(f"unknown changelog {changelog!r}")
        skipped = 0
        reached = next_offset
        for offset, key, value, timestamp in entries:
            reached = offset + 1
            try:
                self._apply(partition, changelog, key, value, timestamp)
            except StateFormatError:
                raise
            except (ValueError, TypeError, AttributeError) as e:
                skipped += 1
                log.warning(
                    "store_record_skipped", changelog=changelog, partition=partition, error=str(e)
                )
        replayed = self._replayed.setdefault(partition, {})
        replayed[changelog] = max(replayed.get(changelog, 0), reached)
        return skipped

    def _apply(
        self, partition: int, changelog: str, key: bytes, value: bytes | None, timestamp: int
    ) -> None:
        """Load one changelog record; raises ``ValueError`` when it is malformed, as is
        a record whose content names another group or member than its key."""
        name = key.decode()
        if changelog == "state":
            if value is None:
                self._groups.remove(partition, name)
            else:
                record = codec.decode_writable(value)
                check_format(record, self._deployment)
                self._groups.restore(partition, name, state_from_record(record, group_id=name))
        elif changelog == "members":
            if value is None:
                self._members.remove(partition, name)
            else:
                m = membership_from_record(codec.decode(value), key=name)
                self._members.restore(partition, name, m)
        elif value is None:
            self._seen.remove(partition, seen_key(name))
        else:
            arrival = arrival_value(codec.decode(value))
            self._seen.restore(partition, seen_key(name), (arrival, max(timestamp, 0)))

    def wipe(self, partition: int) -> None:
        self.drop(partition)

    def expire_seen(
        self, before_ms: Mapping[int, int], written_before_ms: int, limit: int = 0
    ) -> tuple[int, bool]:
        # Every id at once, whatever the limit (tests and benchmarks hold few).
        removed = 0
        for partition, before in before_ms.items():

            def old(applied: tuple[int, int], before: int = before) -> bool:
                return applied[0] < before and applied[1] < written_before_ms

            removed += self._seen.remove_if(partition, old)
        return removed, True

    def drop(self, partition: int) -> None:
        self._replayed.pop(partition, None)
        for table in self._tables:
            table.drop(partition)

    def close(self) -> None:
        """Forget everything."""
        self._replayed.clear()
        for table in self._tables:
            table.clear()

    def group_count(self) -> int:
        return self._groups.count()

    def member_count(self) -> int:
        return self._members.count()

    def seen_count(self) -> int:
        return self._seen.count()
