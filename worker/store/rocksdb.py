"""``RocksDBStateStore``: the ``StateStore`` in an embedded RocksDB per partition.

Each partition has its database (``partition.PartitionDB``, which says how it lays out
its keys and writes) at ``directory / "partition-<n>"``, opened on first use or by
``open_partition`` and closed by ``drop``: a revoked partition's files stay, for its
return.

Durability. The files hold committed changes only: the change set stays in memory until
``commit``, called once the Kafka transaction has committed, writes each partition's
changes with the changelog offsets the transaction reached, in one write batch. The
files may lag (a crash between the two commits; a killed process loses its write
buffers): their offsets lag with them, and replaying the changelogs from there catches
up, since a record holds its key's whole value. A partition whose files cannot be used
is deleted, to rebuild from the changelogs (``open_partition``).

Reads look in the change set, then in a cache of parsed states and memberships bounded
by ``cache_bytes`` (least recently used out first), then in the database, parsing the
record and caching the result. A commit caches the states it writes, but a membership
only when one is cached already (it is replaced, never left stale): most memberships
are written once, at a member's first call to a group, and never read again, and
caching them pushed out the states every call reads (bench: 3-5 µs a call). Dedupe ids
are not cached: each is looked up about once per call and is mostly absent, which a
bloom filter answers in about a µs.

Counts are exact: kept in each database and updated with every write (a put or a
replayed record looks up whether its key existed: a bloom-filter miss when it did not).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog
from rocksdict import WriteBatch

from worker import codec
from worker.errors import StoreCorrupt
from worker.members import Membership, membership_from_record, membership_record
from worker.profile import FORMAT, StateFormatError, check_format, state_from_record, state_record
from worker.state import GroupState
from worker.store.cache import LRUCache
from worker.store.partition import (
    CHANGELOGS,
    KIND,
    MEMBERS,
    SEEN,
    STATES,
    PartitionDB,
    SharedMemory,
    new_batch,
    remove_files,
    seen_value,
)

if TYPE_CHECKING:
    from worker.store import (
        Changelog,
        ChangelogEntry,
        ChangelogOffsets,
        ChangelogRecord,
        SeenKey,
    )

__all__ = ["RocksDBStateStore"]

log = structlog.get_logger("worker.store")
_E = TypeVar("_E", GroupState, Membership)
_K = TypeVar("_K")
_V = TypeVar("_V")
# A change-set entry: the value, its database key, whether that key is new, and its
# record once ``changes`` or ``commit`` encoded it (once, for changelog and database).
_Change = tuple[_E, bytes, bool, bytes | None]

# What a parsed entry keeps alive, from its record's length (tracemalloc: a state takes
# about 1.4 times its record, a membership 2 times its 130 bytes), plus the cache's own.
_ENTRY_BYTES: Final = 200
# RocksDB's block cache (uncompressed blocks) and write buffers, shared by the partitions.
_BLOCK_CACHE_BYTES: Final = 32 << 20
_WRITE_BUFFERS_BYTES: Final = 32 << 20


class RocksDBStateStore:
    """A ``StateStore`` in RocksDB databases under ``directory``, one per partition.

    ``cache_bytes`` bounds the parsed states and memberships kept (approximately: costs
    are estimated from the records' lengths). RocksDB's own memory comes on top: a
    32 MiB block cache and 32 MiB of write buffers, both shared by the partitions.
    ``directory`` is created when missing. Two stores must not share a directory (a
    partition's files are locked while open). ``deployment`` (``worker.group_id``) is
    named in the state records it writes, and a state record naming another raises
    ``StateFormatError`` when applied.
    """

    def __init__(self, directory: Path, cache_bytes: int, deployment: str = "") -> None:
        self._directory = directory
        self._deployment = deployment
        self._state_record = functools.partial(state_record, deployment=deployment)
        # Every state record this worker writes has its merge start so (``_plainly_ours``).
        self._written = _MERGE + b':{"format":%d,' % FORMAT
        if deployment:
            self._written += b'"deployment":' + codec.encode(deployment) + b","
        self._cache: LRUCache[tuple[int, bytes], GroupState | Membership] = LRUCache(cache_bytes)
        self._memory = SharedMemory(_BLOCK_CACHE_BYTES, _WRITE_BUFFERS_BYTES)
        self._partitions: dict[int, PartitionDB] = {}
        # The change set (``_Change``); a dedupe id's: arrival, written, key, whether new.
        self._groups: dict[tuple[int, str], _Change[GroupState]] = {}
        self._members: dict[tuple[int, str], _Change[Membership]] = {}
        self._seen: dict[tuple[int, SeenKey], tuple[int, int, bytes, bool]] = {}
        # Keys the database was just found to lack, so the put that usually follows a
        # read that missed need not look again; forgotten whenever the database changes.
        self._absent: set[tuple[int, bytes]] = set()
        # The change set's write batches by partition, once ``prepare`` built them; None
        # before, and again after any change to the change set.
        self._prepared: defaultdict[int, WriteBatch] | None = None
        # An expiry scan under way (``expire_seen``): the partitions it has yet to finish,
        # the key it resumes from in the first of them, and those it finished.
        self._sweep: list[int] = []
        self._sweep_from = KIND[SEEN]
        self._swept: set[int] = set()

    @property
    def cached_bytes(self) -> int:
        """The estimated bytes of the parsed entries cached, at most ``cache_bytes``."""
        return self._cache.bytes

    def path(self, partition: int) -> Path:
        """Where the partition's database lives."""
        return self._directory / f"partition-{partition}"

    # Reads and the change set.

    def get(self, partition: int, group_id: str) -> GroupState | None:
        pending = self._groups.get((partition, group_id))
        if pending is not None:
            return pending[0]
        key = b"s" + group_id.encode()
        cached = self._cache.get((partition, key))
        if isinstance(cached, GroupState):
            return cached
        return self._read(partition, key, _read_state)

    def put(self, partition: int, state: GroupState) -> None:
        self._prepared = None
        log_key = (partition, state.group_id)
        pending = self._groups.get(log_key)
        if pending is None:
            key = b"s" + state.group_id.encode()
            self._groups[log_key] = (state, key, self._is_new(partition, STATES, key), None)
        else:
            self._groups[log_key] = (state, pending[1], pending[2], None)

    def get_member(self, partition: int, key: str) -> Membership | None:
        pending = self._members.get((partition, key))
        if pending is not None:
            return pending[0]
        db_key = b"m" + key.encode()
        cached = self._cache.get((partition, db_key))
        if isinstance(cached, Membership):
            return cached
        return self._read(partition, db_key, _read_membership)

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        self._prepared = None
        log_key = (partition, key)
        pending = self._members.get(log_key)
        if pending is None:
            db_key = b"m" + key.encode()
            self._members[log_key] = (m, db_key, self._is_new(partition, MEMBERS, db_key), None)
        else:
            self._members[log_key] = (m, pending[1], pending[2], None)

    def seen(self, partition: int, key: SeenKey) -> int | None:
        pending = self._seen.get((partition, key))
        if pending is not None:
            return pending[0]
        db_key = _seen_key(key)
        part = self._partitions.get(partition) or self._part(partition)  # once per call
        raw = part.get(db_key)
        if raw is None:
            self._absent.add((partition, db_key))
            return None
        applied = seen_value(raw)
        if applied is None:
            log.warning("store_record_skipped", kind="dedupe", partition=partition)
            return None
        return applied[0]

    def put_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        self._prepared = None
        log_key = (partition, key)
        pending = self._seen.get(log_key)
        if pending is None:
            db_key = _seen_key(key)
            new = self._is_new(partition, SEEN, db_key)
            self._seen[log_key] = (arrival_ms, written_ms, db_key, new)
        else:
            self._seen[log_key] = (arrival_ms, written_ms, pending[2], pending[3])

    def changes(self) -> list[ChangelogRecord]:
        """The change set as changelog records (``StateStore.changes``); each record is
        encoded once, kept for ``commit``. A changelog key is its database key without
        the kind byte."""
        records: list[ChangelogRecord] = [
            (changelog, p, key[1:], value, 0) for changelog, p, key, value, _ in self._encoded()
        ]
        records += [
            ("dedupe", p, key[1:], b"%d" % arrival, arrival)
            for (p, _), (arrival, _, key, _) in self._seen.items()
        ]
        return records

    def prepare(self) -> None:
        """Build each partition's write batch from the change set, encoding what
        ``changes`` did not, and move its states (and memberships already cached) into
        the cache (``StateStore.prepare``). The files are not touched; a change made
        after this outdates it (``commit`` prepares again), and ``rollback`` undoes it.
        """
        self._prepared = self._batches()

    def commit(self, offsets: ChangelogOffsets | None = None) -> None:
        """Write the change set with ``offsets``, then close it (``StateStore.commit``).

        Steps: (1) ``prepare``, unless done since the last change; (2) for each
        partition changed or given offsets, one write of its batch, counts and offsets;
        (3) the change set closes. Blocks on the disk. A partition whose write fails
        (``StoreCorrupt``) does not stop the others: the change set closes all the same,
        then one ``StoreCorrupt`` names every partition that failed, whose copies now lag
        the changelogs (and the cache): the caller rebuilds them (``wipe``, then a replay).
        """
        batches = self._batches() if self._prepared is None else self._prepared  # (1)
        reached: dict[int, dict[Changelog, int]] = {}
        for (changelog, partition), offset in (offsets or {}).items():
            reached.setdefault(partition, {})[changelog] = offset
        failed: list[StoreCorrupt] = []
        for partition in batches.keys() | reached.keys():  # (2)
            try:
                self._part(partition).write(batches[partition], reached.get(partition, {}))
            except StoreCorrupt as e:
                failed.append(e)
        self._clear_changes()  # (3)
        if failed:
            partitions = tuple(p for e in failed for p in e.partitions)
            raise StoreCorrupt(partitions, "; ".join(map(str, failed)))

    def rollback(self) -> None:
        """Forget the change set: the database never saw it. Its states and memberships
        leave the cache too (a state may have been updated in place, and ``prepare``
        caches them), to be read again."""
        for table in (self._groups, self._members):
            for (partition, _), (_, key, _, _) in table.items():
                self._cache.discard((partition, key))
        self._clear_changes()

    # Restoring, expiring and forgetting: outside the change set.

    def restore(self, partition: int, state: GroupState) -> None:
        key, value = b"s" + state.group_id.encode(), codec.encode(self._state_record(state))
        self._write_one(partition, STATES, key, value)
        self._cache.put((partition, key), state, _cost(value))

    def restore_member(self, partition: int, key: str, m: Membership) -> None:
        db_key, value = b"m" + key.encode(), codec.encode(membership_record(m))
        self._write_one(partition, MEMBERS, db_key, value)
        self._cache.put((partition, db_key), m, _cost(value))

    def restore_seen(self, partition: int, key: SeenKey, arrival_ms: int, written_ms: int) -> None:
        self._write_one(partition, SEEN, _seen_key(key), b"%d %d" % (arrival_ms, written_ms))

    def open_partition(self, partition: int, source: bytes = b"") -> str | None:
        """Open the partition's database (``StateStore.open_partition``).

        Files that RocksDB cannot open (but for a lock), without this store's layout
        version, with unreadable counts or from another ``source`` are deleted, and the
        partition starts empty; the reason is logged (``store_partition_discarded``)
        and returned.
        """
        if partition in self._partitions:
            return None
        return self._open(partition, source)

    def stored_offsets(self, partition: int) -> dict[Changelog, int]:
        return self._part(partition).offsets()

    def apply_changelog(
        self,
        partition: int,
        changelog: Changelog,
        entries: Iterable[ChangelogEntry],
        next_offset: int,
    ) -> int:
        """Write the records as they are (``StateStore.apply_changelog``); returns 0.

        ``partition.APPLY_BATCH`` records to a write batch, each batch with its count
        and offset. Malformed records are found on reading them (``get``); a state record
        in a format this worker does not read, or of another deployment, raises
        ``StateFormatError`` here, so the worker stops at the restore, not at the group's
        next call.
        """
        if changelog not in CHANGELOGS:
            raise ValueError(f"unknown changelog {changelog!r}")
        part = self._part(partition)
        if changelog == "state":
            entries = self._checked(entries)
        self._absent.clear()
        # What the records replace is read again (a partition coming back has nothing
        # cached: it was dropped; this is a scan of the cache, not a step per record).
        self._cache.discard_where(lambda cache_key: cache_key[0] == partition)
        part.apply(changelog, entries, next_offset)
        return 0

    def compact(self, partition: int) -> None:
        """Compact the partition's files fully; blocks (seconds per million entries).

        Reads then look in as few files as can be, which RocksDB otherwise reaches in
        the background, later: worth it after a rebuild from the changelogs.
        """
        self._part(partition).compact()

    def wipe(self, partition: int) -> None:
        self.drop(partition)
        remove_files(self.path(partition))

    def expire_seen(
        self, before_ms: Mapping[int, int], written_before_ms: int, limit: int = 0
    ) -> tuple[int, bool]:
        """Forget ids that arrived before their partition's ``before_ms`` and were written
        before ``written_before_ms`` (``StateStore.expire_seen``).

        Scans the partitions' ids in key order, at most ``limit`` of them a call (0:
        all), resuming where the last call stopped, and deletes the expired ones (and
        unreadable ones) in one write batch per partition and call. Pending ids that old
        leave the change set.
        """
        self._prepared = None  # pending ids may go
        removed = 0
        for log_key, (arrival, written, _, new) in list(self._seen.items()):
            before = before_ms.get(log_key[0])
            if before is not None and arrival < before and written < written_before_ms:
                del self._seen[log_key]
                if new:  # else the database holds the id: expired below, or kept
                    self._partitions[log_key[0]].new[SEEN] -= 1
                    removed += 1
        if not self._sweep:  # a new scan, from the first id (_sweep_from)
            self._sweep, self._swept = sorted(self._partitions), set()
        left = limit  # ids this call may still scan (0: no bound)
        while self._sweep:
            part = self._partitions.get(self._sweep[0])
            before = before_ms.get(self._sweep[0])
            resume = None
            if part is not None and before is not None:  # else dropped, or none expire
                gone, scanned, resume = part.expire(
                    before, written_before_ms, self._sweep_from, left
                )
                removed += gone
                left -= scanned if limit else 0
            if resume is None:
                self._swept.add(self._sweep.pop(0))
                resume = KIND[SEEN]
                if not self._sweep:  # partitions opened since it began (restores) too
                    self._sweep = sorted(self._partitions.keys() - self._swept)
            self._sweep_from = resume
            if limit and left <= 0:
                break
        for log_key, (arrival, written, key, new) in list(self._seen.items()):
            part = self._partitions[log_key[0]]
            if not new and not part.has(key):  # expired from under the change set
                self._seen[log_key] = (arrival, written, key, True)
                part.new[SEEN] += 1
        return removed, not self._sweep

    def drop(self, partition: int) -> None:
        """Forget the partition and close its database; its files stay, unless closing
        them fails (``store_partition_discarded``): the next restore rebuilds them."""
        part = self._partitions.pop(partition, None)
        self._prepared = None
        self._absent.clear()
        _forget(self._groups, partition)
        _forget(self._members, partition)
        _forget(self._seen, partition)
        self._cache.discard_where(lambda cache_key: cache_key[0] == partition)
        if part is not None:
            try:
                part.close()
            except StoreCorrupt as e:
                log.warning(
                    "store_partition_discarded", path=str(self.path(partition)), reason=str(e)
                )
                remove_files(self.path(partition))

    def close(self) -> None:
        for partition in list(self._partitions):
            self.drop(partition)

    def group_count(self) -> int:
        return self._count(STATES)

    def member_count(self) -> int:
        return self._count(MEMBERS)

    def seen_count(self) -> int:
        return self._count(SEEN)

    # Internals.

    def _count(self, kind: int) -> int:
        return sum(part.counts[kind] + part.new[kind] for part in self._partitions.values())

    def _part(self, partition: int) -> PartitionDB:
        part = self._partitions.get(partition)
        if part is None:
            self._open(partition)
            part = self._partitions[partition]
        return part

    def _open(self, partition: int, source: bytes = b"") -> str | None:
        part, reason = PartitionDB.open(partition, self.path(partition), self._memory, source)
        self._partitions[partition] = part
        return reason

    def _read(self, partition: int, key: bytes, read: Callable[[bytes, bytes], _E]) -> _E | None:
        """Parse and cache the record under ``key``; ``None`` when absent or malformed
        (``read`` raises ``ValueError`` for a record of another group or member than
        its key)."""
        raw = self._part(partition).get(key)
        if raw is None:
            self._absent.add((partition, key))
            return None
        try:
            entry = read(key, raw)
        except StateFormatError:
            raise
        except (ValueError, TypeError, AttributeError) as e:
            log.warning(
                "store_record_skipped", kind=key[:1].decode(), partition=partition, error=str(e)
            )
            return None
        self._cache.put((partition, key), entry, _cost(raw))
        return entry

    def _checked(self, entries: Iterable[ChangelogEntry]) -> Iterator[ChangelogEntry]:
        """``entries``, raising ``StateFormatError`` at a state record in a format this
        worker does not read or of another deployment; a parse only for records whose
        bytes do not show they are this worker's and this deployment's."""
        for entry in entries:
            value = entry[2]
            if value is not None and not self._plainly_ours(value):
                try:
                    record = codec.decode(value)
                except codec.DecodeError:
                    pass  # malformed: skipped when read
                else:
                    check_format(record, self._deployment)
            yield entry

    def _plainly_ours(self, value: bytes) -> bool:
        """Whether a state record's bytes alone show its merge is in this worker's format
        and names this deployment, so a parse would find nothing to refuse. Anyone can
        write the topic: without an escape (a key spelled with one reads the same), each
        key the check rests on appears once, so no other ``merge``, ``format`` or
        ``deployment`` at any level can be the one a parser takes. A trait or a value of
        those names, or any escape, sends the record to a parse (0.5 against 3 µs)."""
        return (
            b"\\" not in value
            and value.count(_MERGE) == 1
            and value.count(b'"format"') == 1
            and (not self._deployment or value.count(b'"deployment"') == 1)
            and self._written in value
        )

    def _encoded(
        self,
    ) -> Iterator[tuple[Changelog, int, bytes, bytes, GroupState | Membership]]:
        """The changed states, then memberships: changelog, partition, database key,
        record, value."""
        for partition, key, record, state in _encode_once(self._groups, self._state_record):
            yield "state", partition, key, record, state
        for partition, key, record, m in _encode_once(self._members, membership_record):
            yield "members", partition, key, record, m

    def _batches(self) -> defaultdict[int, WriteBatch]:
        """The change set's write batches by partition (an empty one for any other), its
        states, and the memberships the cache holds an older copy of, put in the cache
        on the way (the module docstring says why not every membership)."""
        batches: defaultdict[int, WriteBatch] = defaultdict(new_batch)
        cache = self._cache
        for changelog, partition, key, value, entry in self._encoded():
            batches[partition].put(key, value)
            cache_key = (partition, key)
            if changelog == "state" or cache_key in cache:
                cache.put(cache_key, entry, _cost(value))
        for (partition, _), (arrival, written, key, _) in self._seen.items():
            batches[partition].put(key, b"%d %d" % (arrival, written))
        return batches

    def _is_new(self, partition: int, kind: int, key: bytes) -> bool:
        """Whether the database lacks ``key``; counts it as new to the change set if so."""
        part = self._part(partition)
        cache_key = (partition, key)
        if cache_key not in self._absent and (cache_key in self._cache or part.has(key)):
            return False
        part.new[kind] += 1
        return True

    def _write_one(self, partition: int, kind: int, key: bytes, value: bytes) -> None:
        self._absent.discard((partition, key))
        self._part(partition).write_one(kind, key, value)

    def _clear_changes(self) -> None:
        self._prepared = None
        self._absent.clear()
        self._groups.clear()
        self._members.clear()
        self._seen.clear()
        for part in self._partitions.values():
            part.new = [0, 0, 0]


def _encode_once(
    changes: dict[tuple[int, str], _Change[_E]], record_of: Callable[[_E], dict[str, Any]]
) -> Iterator[tuple[int, bytes, bytes, _E]]:
    """Each change's partition, database key, record and value; a record not encoded yet
    is encoded (``record_of``) and kept in its change."""
    for log_key, (entry, key, new, record) in changes.items():
        if record is None:
            record = codec.encode(record_of(entry))
            changes[log_key] = (entry, key, new, record)
        yield log_key[0], key, record, entry


def _forget(changes: dict[tuple[int, _K], _V], partition: int) -> None:
    for log_key in [k for k in changes if k[0] == partition]:
        del changes[log_key]


def _read_state(key: bytes, raw: bytes) -> GroupState:
    return state_from_record(codec.decode_writable(raw), group_id=key[1:].decode())


def _read_membership(key: bytes, raw: bytes) -> Membership:
    return membership_from_record(codec.decode(raw), key=key[1:].decode())


def _seen_key(key: SeenKey) -> bytes:
    # ``seen_record_key(*key).encode()``, without the text in between.
    return b"d" + codec.encode(key)


def _cost(record: bytes) -> int:
    """The bytes a parsed entry keeps alive, estimated from its record."""
    return len(record) * 3 // 2 + _ENTRY_BYTES


_MERGE: Final = b'"merge"'
