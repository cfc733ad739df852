"""One partition's RocksDB database: its files, its key layout, its counts and offsets.

The database lives at a directory of its own (``RocksDBStateStore.path``) and is opened
through rocksdict, the binding Quix Streams uses. A key is a kind byte then the
changelog record's key; a value is the changelog record's value, byte for byte, so a
replay writes records as it reads them (a dedupe id's with the record's timestamp
appended)::

    b"s" + groupId          the state record (JSON of ``state.state_record``)
    b"m" + membership key   the membership record (JSON of ``members.membership_record``)
    b"d" + dedupe key       the arrival ms and the ms it was written, in ASCII digits
                            with a space between (key: ``dedupe.seen_record_key``); the
                            arrival alone when restored from a record without a timestamp
    b"o" + changelog name   where to replay that changelog from, ASCII digits
    b"c" + kind byte        how many entries of that kind the database holds
    b"v"                    the layout version (``LAYOUT``)
    b"t"                    what the data is a copy of (the changelog topics' names)

Every write is one atomic write batch carrying the counts it changes (and offsets, when
it has them), so counts and offsets always agree with the entries. Commits go through
RocksDB's write-ahead log, unsynced: a killed process loses none of them (the file is
the kernel's by then), so a restart replays only what came after; a machine that loses
power may lose the latest, and recovers to an earlier write batch. Replays skip the
log (about 20% faster, ``bench/store.py``) and flush the database when done: killed
mid-replay, a database keeps what it had flushed, up to some write batch, offsets
included, since it flushes its buffers in the order they were written. The store is a
cache of its changelogs, so a lag only means more to replay.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import structlog
from rocksdict import (
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from worker.errors import StoreCorrupt, StoreError

if TYPE_CHECKING:
    from worker.store import Changelog, ChangelogEntry

__all__ = [
    "APPLY_BATCH",
    "CHANGELOGS",
    "KIND",
    "LAYOUT",
    "MEMBERS",
    "SEEN",
    "STATES",
    "WRITE_BUFFER_BYTES",
    "PartitionDB",
    "SharedMemory",
    "new_batch",
    "remove_files",
]

log = structlog.get_logger("worker.store")

# Kinds of entry, by index: their key bytes, and their changelogs.
STATES, MEMBERS, SEEN = 0, 1, 2
KIND: Final = (b"s", b"m", b"d")
CHANGELOGS: Final[tuple[Changelog, ...]] = ("state", "members", "dedupe")
_OFFSET: Final = b"o"
_COUNT: Final = b"c"
_LAYOUT_KEY: Final = b"v"
_SOURCE_KEY: Final = b"t"
# The most digits of a time in ms a dedupe value may hold (MAX_MS, year 9999, has 15).
_MS_DIGITS: Final = 15
# 2: a dedupe id's value holds when it was written. An older worker reads such a value as
# unreadable, and would apply every retry again: told by the layout, it rebuilds instead.
LAYOUT: Final = b"2"
# Records per write batch when applying a changelog: a few MB, and what a kill loses.
APPLY_BATCH = 10_000
WRITE_BUFFER_BYTES: Final = 16 << 20
# Replays skip the write-ahead log (module docstring); everything else goes through it.
_REPLAY: Final = WriteOptions()
_REPLAY.disable_wal = True  # type: ignore[method-assign,assignment]  # a property


class SharedMemory:
    """RocksDB's memory, shared by every partition database of a store, so it does not
    grow with the partitions assigned: a block cache (uncompressed blocks read) and a
    bound on the write buffers of all of them (past it, the fullest one flushes)."""

    def __init__(self, block_cache_bytes: int, write_buffer_bytes: int) -> None:
        self.block_cache = Cache(block_cache_bytes)
        self.write_buffers = WriteBufferManager(write_buffer_bytes, False)


class _Unusable(Exception):
    """A partition's files cannot be used: corrupt, or of another layout."""


class PartitionDB:
    """An open partition database, and how many entries of each kind it holds.

    ``new`` counts, per kind, the keys that the store's open change set adds: the next
    ``write`` adds them to ``counts``. Any read or write that RocksDB fails raises
    ``StoreCorrupt``: a block's checksum, an unreadable file (damage that opening the
    files does not see, found by a read or by a compaction, after which every write
    fails), an I/O error. Not thread-safe.
    """

    __slots__ = ("counts", "db", "new", "partition")

    def __init__(self, partition: int, db: Rdict, counts: list[int]) -> None:
        self.partition = partition
        self.db = db
        self.counts = counts
        self.new = [0, 0, 0]

    @classmethod
    def open(
        cls, partition: int, path: Path, memory: SharedMemory, source: bytes = b""
    ) -> tuple[PartitionDB, str | None]:
        """The database at ``path``, created when missing; blocks on the disk.

        Files that RocksDB cannot open (but for a lock), without this layout version,
        with unreadable counts, or copied from another ``source`` (when one is given)
        are deleted and the database starts empty: the second value says why (logged as
        ``store_partition_discarded``), else it is ``None``. A database without a
        source takes ``source``.
        Raises ``StoreError`` when the files are locked (another store has them open),
        or a database cannot be created there (a full disk, a read-only one).
        """
        try:
            return cls(partition, *_open(path, memory, source)), None
        except _Unusable as e:
            reason = str(e)
        log.warning("store_partition_discarded", path=str(path), reason=reason)
        remove_files(path)
        try:
            return cls(partition, *_open(path, memory, source)), reason
        except _Unusable as e:
            raise StoreError(f"worker.state_dir: cannot create {path}: {e}") from None

    def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or ``None``."""
        try:
            value: bytes | None = self.db.get(key)
        except Exception as e:  # rocksdict raises plain Exception, naming RocksDB's status
            raise self._failed(e) from None
        return value

    def has(self, key: bytes) -> bool:
        """Whether the database holds ``key`` (a bloom-filter miss when it does not)."""
        try:
            return key in self.db
        except Exception as e:
            raise self._failed(e) from None

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """RocksDB's errors in the block as ``StoreCorrupt`` (``get`` and ``has``, called
        per record, catch them themselves)."""
        try:
            yield
        except Exception as e:  # rocksdict raises plain Exception, naming RocksDB's status
            raise self._failed(e) from None

    def _failed(self, error: Exception) -> StoreCorrupt:
        return StoreCorrupt((self.partition,), f"partition {self.partition}'s store: {error}")

    def offsets(self) -> dict[Changelog, int]:
        """Where to replay each changelog from; a changelog never written is missing."""
        offsets: dict[Changelog, int] = {}
        for changelog in CHANGELOGS:
            raw = self.get(_OFFSET + changelog.encode())
            if raw is not None:
                offsets[changelog] = int(raw)
        return offsets

    def write(self, batch: WriteBatch, offsets: Mapping[Changelog, int]) -> None:
        """Write ``batch`` (``new_batch``: each key's whole value) with the counts that
        ``new`` adds to and ``offsets``, atomically; ``new`` then goes into ``counts``."""
        for changelog, offset in offsets.items():
            batch.put(_OFFSET + changelog.encode(), b"%d" % offset)
        counts = [held + new for held, new in zip(self.counts, self.new, strict=True)]
        for kind, count in enumerate(counts):
            if self.new[kind]:
                batch.put(_COUNT + KIND[kind], b"%d" % count)
        with self._guarded():
            self.db.write(batch)
        self.counts, self.new = counts, [0, 0, 0]

    def write_one(self, kind: int, key: bytes, value: bytes) -> None:
        """Write one entry of ``kind`` and its count, outside any change set."""
        count = self.counts[kind] + (not self.has(key))
        batch = new_batch()
        batch.put(key, value)
        batch.put(_COUNT + KIND[kind], b"%d" % count)
        with self._guarded():
            self.db.write(batch)
        self.counts[kind] = count

    def apply(self, changelog: Changelog, entries: Iterable[ChangelogEntry], end: int) -> None:
        """Write changelog records as they are, ``APPLY_BATCH`` to a write batch, each
        batch with the count and the offset after its last record; the last batch
        stores ``end`` instead if that is later. A ``None`` value deletes its key; a dedupe
        id's value gets its record's timestamp (when it was written) appended."""
        kind = CHANGELOGS.index(changelog)
        stamped = kind == SEEN
        prefix, count = KIND[kind], self.counts[kind]
        reached = end
        batch = new_batch()
        # Keys in the batch, and whether they exist once it is written (the database
        # does not see the batch yet).
        exists: dict[bytes, bool] = {}
        for offset, key, value, timestamp in entries:
            db_key = prefix + key
            existed = exists.get(db_key)
            if existed is None:
                existed = self.has(db_key)
            if value is None:
                batch.delete(db_key)
                count -= existed
            else:
                if stamped and timestamp > 0:
                    value += b" %d" % timestamp
                batch.put(db_key, value)
                count += not existed
            exists[db_key] = value is not None
            reached = offset + 1
            if len(exists) >= APPLY_BATCH:
                self._write_applied(changelog, kind, count, batch, reached)
                batch = new_batch()
                exists.clear()
        self._write_applied(changelog, kind, count, batch, max(end, reached))
        with self._guarded():
            self.db.flush()  # replayed records skip the log: make them as durable as commits

    def _write_applied(
        self, changelog: Changelog, kind: int, count: int, batch: WriteBatch, offset: int
    ) -> None:
        batch.put(_COUNT + KIND[kind], b"%d" % count)
        batch.put(_OFFSET + changelog.encode(), b"%d" % offset)
        with self._guarded():
            self.db.write(batch, _REPLAY)
        self.counts[kind] = count

    def expire(
        self, before_ms: int, written_before_ms: int, start: bytes = KIND[SEEN], limit: int = 0
    ) -> tuple[int, int, bytes | None]:
        """Delete the dedupe ids that arrived before ``before_ms`` and were written
        before ``written_before_ms`` (and unreadable ones) in one write batch, scanning
        at most ``limit`` ids (0: all) from the key ``start``; returns how many went, how
        many were scanned, and the key to resume from (``None`` when the scan reached the
        last id)."""
        bound = ReadOptions()
        bound.set_iterate_upper_bound(bytes([KIND[SEEN][0] + 1]))
        batch = new_batch()
        gone = scanned = 0
        resume: bytes | None = None
        with self._guarded():
            for key, raw in self.db.items(from_key=start, read_opt=bound):
                if limit and scanned == limit:
                    resume = cast(bytes, key)  # raw mode: keys are bytes
                    break
                scanned += 1
                applied = seen_value(raw)
                if applied is None or (applied[0] < before_ms and applied[1] < written_before_ms):
                    batch.delete(key)
                    gone += 1
            if gone:
                count = self.counts[SEEN] - gone
                batch.put(_COUNT + KIND[SEEN], b"%d" % count)
                self.db.write(batch)
                self.counts[SEEN] = count
        return gone, scanned, resume

    def compact(self) -> None:
        """Compact every file into the last level; blocks."""
        with self._guarded():
            self.db.compact_range(None, None)

    def close(self) -> None:
        """Flush the write buffers and close; the files stay."""
        with self._guarded():
            self.db.close()


def seen_value(raw: bytes) -> tuple[int, int] | None:
    """A dedupe id's arrival and write ms, or ``None`` when the value is not ASCII digits
    (with a space between the two; the arrival alone was written at 0), or more of them
    than a time in ms takes (a record not written by a worker: Python refuses to read
    more than 4,300 digits, and a refusal here failed every expiry pass)."""
    arrival, _, written = raw.partition(b" ")
    if not _is_ms(arrival):
        return None
    if not written:
        return int(arrival), 0
    return (int(arrival), int(written)) if _is_ms(written) else None


def _is_ms(digits: bytes) -> bool:
    return digits.isdigit() and len(digits) <= _MS_DIGITS


def new_batch() -> WriteBatch:
    """An empty write batch of raw keys and values, for ``PartitionDB.write``."""
    return WriteBatch(raw_mode=True)


def remove_files(path: Path) -> None:
    """Delete a partition's files, whatever is there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _open(path: Path, memory: SharedMemory, source: bytes) -> tuple[Rdict, list[int]]:
    """Open or create the database, with its counts by kind; raises ``_Unusable`` when
    its files cannot be used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = Rdict(str(path), _options(memory))
    except Exception as e:  # rocksdict raises plain Exception, naming RocksDB's status
        if str(path / "LOCK") in str(e):
            raise StoreError(f"{path} is in use by another process: {e}") from None
        raise _Unusable(str(e)) from None
    try:
        layout, stored = db.get(_LAYOUT_KEY), db.get(_SOURCE_KEY)
        if layout is None and next(iter(db.keys()), None) is None:
            db.put(_LAYOUT_KEY, LAYOUT)
            layout = LAYOUT
        if layout != LAYOUT:
            problem = "no layout version" if layout is None else f"layout version {layout!r}"
        elif source and stored not in (None, source):
            problem = "copied from other topics: " + stored.decode(errors="replace")
            problem = problem.replace("\n", ", ")
        else:
            if source and stored is None:
                db.put(_SOURCE_KEY, source)
            return db, [int(db.get(_COUNT + kind) or 0) for kind in KIND]
    except Exception as e:  # a read of corrupt files, or a count that is not a number
        problem = str(e)
    db.close()
    raise _Unusable(problem)


def _options(memory: SharedMemory) -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_compression_type(DBCompressionType.lz4())
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    options.set_write_buffer_manager(memory.write_buffers)
    options.set_keep_log_file_num(2)  # RocksDB's own log of what it did
    # Most lookups are of keys that are absent (a new dedupe id, a new member), and the
    # newest keys are in the write buffers: a bloom filter there too (2% of a buffer,
    # about 13 bits a key) answers those in 0.2 against 1-2 µs (150,000 ids buffered).
    options.set_memtable_prefix_bloom_ratio(0.02)
    options.set_memtable_whole_key_filtering(True)
    table = BlockBasedOptions()
    table.set_block_cache(memory.block_cache)
    # In the files too.
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    return options
