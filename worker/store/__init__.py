"""Where group states, memberships and dedupe ids live between calls, per input partition.

The runner's transaction maps onto the store: it ``put``s while processing a batch,
writes its ``changes`` to their changelog topics in the Kafka transaction, then
``commit()``s once the transaction has committed, or ``rollback()``s when it aborts.
Partitions come and go with rebalances: an assigned partition is brought up to date from
its changelogs (``open_partition``, ``stored_offsets``, then ``apply_changelog`` from
those offsets, or ``restore_*`` of parsed records), and ``drop`` forgets a revoked one.

Three tables, each keyed per partition: group states by groupId, memberships by their
key (``members.membership_key``), and dedupe ids, ``(groupId, messageId)`` -> the
arrival time (ms) of the call that applied it. Each has its changelog topic (``state``,
``members``, ``dedupe``), co-partitioned with the stateful input.

Two implementations:

- ``InMemoryStateStore`` (``memory.py``): dicts. Nothing outlives the process or a
  ``drop``, so every assignment replays the changelogs from their beginning.
- ``RocksDBStateStore`` (``rocksdb.py``): an embedded RocksDB per partition under a
  directory (``partition.py``), with a bounded cache of parsed entries (``cache.py``).
  Each commit writes the change set with the changelog offsets it reached, so an
  assignment replays only what came after.

A store is used from the runner's thread only; it is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

from worker.members import Membership
from worker.state import GroupState
from worker.store.memory import InMemoryStateStore
from worker.store.rocksdb import RocksDBStateStore

__all__ = [
    "Changelog",
    "ChangelogEntry",
    "ChangelogOffsets",
    "ChangelogRecord",
    "InMemoryStateStore",
    "RocksDBStateStore",
    "SeenKey",
    "StateStore",
]

SeenKey = tuple[str, str]
"""``(groupId, messageId)``: a dedupe id."""

Changelog = Literal["state", "members", "dedupe"]
"""A changelog topic by its role (the fields of ``restore.Changelogs``)."""

ChangelogEntry = tuple[int, bytes, bytes | None, int]
"""``(offset, key, value, timestamp ms)`` of a changelog record as read; ``None`` is a
tombstone. The timestamp is when the record was written (0 or less when unknown)."""

ChangelogRecord = tuple[Changelog, int, bytes, bytes, int]
"""``(changelog, partition, key, value, arrival ms)`` of a record the change set adds to a
changelog (``StateStore.changes``): a dedupe id's arrival, 0 for the others."""

ChangelogOffsets = Mapping[tuple[Changelog, int], int]
"""By ``(changelog, partition)``: the offset to replay that changelog partition from, i.e.
one past the last record the store holds (or the partition's end offset)."""


class StateStore(Protocol):
    """Group states, memberships and dedupe ids by partition, with one open change set.

    Every ``put*`` since the last ``commit()`` or ``rollback()`` belongs to the open
    change set, which a durable store keeps in memory: its files only ever hold committed
    changes. No method raises for an unknown partition (it is simply empty). The
    in-memory store never blocks on I/O; RocksDB's reads, commits and replays do (local
    disk), and its RocksDB errors (I/O, corruption found on a read) propagate.
    """

    def get(self, partition: int, group_id: str) -> GroupState | None:
        """The group's state, or ``None`` when the partition holds none for it.

        The caller may update the state in place (``state.merge_call``), then ``put``s
        it: a rollback undoes that as well.

        Raises ``state.StateFormatError`` when RocksDB holds the group's record in a
        format this worker does not read (it parses records on first read); a malformed
        record (another group's included) reads as ``None``, with a warning (as a
        restore skips it).
        """
        ...

    def put(self, partition: int, state: GroupState) -> None:
        """Store ``state`` as its group's state and mark the group changed."""
        ...

    def get_member(self, partition: int, key: str) -> Membership | None:
        """The membership under ``key`` (``members.membership_key``), or ``None``: also
        for a malformed record, or one of another member than its key names."""
        ...

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        """Store ``m`` under ``key``, its ``members.membership_key``, and mark it
        changed; rollback undoes it."""
        ...

    def seen(self, partition: int, key: SeenKey) -> int | None:
        """When the call with this dedupe id was applied (its arrival ms), or ``None``."""
        ...

    def put_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        """Record that the call with this dedupe id was applied, at ``written_ms`` by the
        worker's clock; rollback undoes it."""
        ...

    def changes(self) -> list[ChangelogRecord]:
        """The change set as changelog records: the newest state of each group put since
        the last commit or rollback, then the newest membership of each key, then each
        dedupe id, each kind in the order first changed.

        Keys: a state's groupId, a membership's key, a dedupe id's
        ``dedupe.seen_record_key``; values: ``codec.encode`` of ``state.state_record``
        and ``members.membership_record``, a dedupe id's arrival ms in ASCII digits,
        which its record's last field repeats (0 for the others). A durable store keeps
        what it made here, to write the same bytes at ``commit``.
        """
        ...

    def prepare(self) -> None:
        """Do the part of ``commit`` that needs neither the transaction's outcome nor the
        disk (a durable store builds its write batches from the change set): called
        while the transaction commits, so the wait for the broker is not idle.

        Optional: ``commit`` does it when it was not called, or when the change set
        changed since; ``rollback`` undoes it.
        """
        ...

    def commit(self, offsets: ChangelogOffsets | None = None) -> None:
        """Close the change set: called once the Kafka transaction has committed.

        ``offsets`` are where the committed transaction left the changelogs, for the
        partitions it wrote to (the offset after its last record in each). A durable
        store writes each partition's changes and offsets in one atomic write, so its
        offsets never claim a change it does not hold; the in-memory store ignores them.
        Raises when a durable store cannot write: it then lags its changelogs, and the
        caller must not go on processing (a restart replays them).
        """
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

    def restore_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        """Load a dedupe id read from the dedupe topic, outside the change set."""
        ...

    def open_partition(self, partition: int, source: bytes = b"") -> str | None:
        """Open an assigned partition's store, before ``stored_offsets``; blocks on disk.

        ``source`` names what the data is a copy of (``restore.Changelogs.source``).
        Returns why the partition's files were discarded (unreadable, corrupt, of
        another layout, or copied from another ``source``), or ``None`` when they opened
        as they were, or there were none: a discarded partition is empty, to rebuild
        from the beginning of its changelogs. Raises when the files are locked by
        another process. Other methods open a partition on first use too (discarding it
        silently, with a warning logged, and without checking its source).
        """
        ...

    def stored_offsets(self, partition: int) -> dict[Changelog, int]:
        """Where to replay each changelog from: ``{}`` for a fresh or in-memory store.

        A changelog missing from the result is replayed from its beginning.
        """
        ...

    def apply_changelog(
        self,
        partition: int,
        changelog: Changelog,
        entries: Iterable[ChangelogEntry],
        next_offset: int,
    ) -> int:
        """Apply changelog records, oldest first, outside the change set; blocks.

        Each value replaces its key's entry, a tombstone deletes it. The next replay
        starts after the last record applied, or at ``next_offset`` if that is later (or
        there were none). RocksDB writes the records as they
        are, in batches, each with the offset after its last record, so a replay cut
        short (a crash, an error from ``entries``) resumes where it stopped; it parses
        them on ``get``. The in-memory store parses each record: it raises
        ``state.StateFormatError`` for a state record in a format this worker does not
        read, and skips a malformed one (a record of another group or member than its
        key included) with a warning. Returns how many were skipped.
        Meant for an assigned partition with no pending writes.
        """
        ...

    def wipe(self, partition: int) -> None:
        """Forget a partition and delete its files, to rebuild it from the beginning."""
        ...

    def expire_seen(
        self, before_ms: Mapping[int, int], written_before_ms: int, limit: int = 0
    ) -> tuple[int, bool]:
        """Forget the dedupe ids of each partition of ``before_ms`` that arrived before
        its time there (a partition not in it keeps all) and were written before
        ``written_before_ms`` (an id restored from a record without a timestamp counts
        as written at 0), scanning at most about ``limit`` of those held (0: all) and
        resuming where the last call stopped.

        Returns how many were forgotten, and whether the scan has been through every
        id (the next call starts another). Outside the change set: an expired id is
        expired whatever the transaction does.
        """
        ...

    def drop(self, partition: int) -> None:
        """Forget a revoked partition: its entries and pending changes (files stay)."""
        ...

    def close(self) -> None:
        """Drop every partition: a durable store closes its files and keeps them."""
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
