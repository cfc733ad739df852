"""The loop: consume a batch, process it, and commit on an interval.

The runner owns no Kafka client: it drives a ``Source``, a ``Sink``, a ``Processor``
and a ``StateStore`` and is tested with fakes. It is its source's
``RebalanceListener``: it commits (or aborts) before partitions are revoked, and holds
assigned stateful partitions paused until their state is restored. Restores run in the
loop, a slice at a time between batches, not in the rebalance callback: the worker's
other partitions go on meanwhile, and the consumer keeps taking part in rebalances.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from worker.clock import Clock
from worker.errors import (
    AbortableError,
    FatalError,
    KafkaError,
    ProducerHungError,
    RetriableError,
    StoreCorrupt,
    StoreError,
    TopicError,
)
from worker.events import SourceRecord
from worker.metrics import Metrics
from worker.processor import Processor, Routes, Tally
from worker.restore import Changelogs, Restorer, restore_partition
from worker.sink import Sink
from worker.source import Cut, Partition, Source, fingerprint
from worker.store import Changelog, StateStore

__all__ = ["Runner", "RunnerSettings"]

log = structlog.get_logger("worker.runner")
_LAG_INTERVAL = 5.0
# Longest wait for a previous owner's open transaction before a restore: the worker's
# transaction timeout (10 s) plus the broker's check for timed-out ones (10 s), and some.
_SETTLE_TIMEOUT = 30.0
# A wait for settled offsets this long (seconds) is logged.
_SETTLE_LOGGED = 1.0
_RESTORE_LOG_INTERVAL = 10.0
# A restore reads this long (seconds) before the loop serves its other partitions.
_RESTORE_SLICE = 0.5
# glibc's malloc_trim (returns the allocator's free memory to the system); None elsewhere.
_MALLOC_TRIM: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
_ERROR_BACKOFF = 0.5
# Between tries of a new producer while the broker is away (each waits up to the commit
# timeout for it), the consumer is polled this long.
_RENEW_WAIT = 1.0
# Backpressure: pause every partition when this many outputs wait for delivery, and
# resume below the low mark, so a slow broker never grows memory without bound.
_BACKLOG_HIGH = 50_000
_BACKLOG_LOW = 10_000
# Pause after the same batch aborted again: doubles from the first, up to the last.
_ABORT_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(slots=True)
class _Restore:
    """An assigned stateful partition waiting for its state, paused, and its progress."""

    started: float  # when it was assigned (or held for a rebuild)
    wiped: str | None = None  # why its files were deleted before (a rebuild), if they were
    logged: float = 0.0  # when its progress was last logged
    rebuilt: str | None = None
    failed: bool = False
    states: int = 0
    members: int = 0
    seen: int = 0
    skipped: int = 0
    read: int = 0  # records read, for the progress log
    took: float = 0.0  # seconds its restore ran, its slices' time (waits excluded)
    settled: bool = False  # its committed offsets are stable (``Runner._settle``)
    # The changelog its last slice stopped in, once one did: the next goes on there.
    resume: Changelog | None = None
    # Where to read from once restored: the first record of it consumed meanwhile.
    rewind: int | None = None


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Topics and pacing of the loop."""

    routes: Routes
    batch_size: int = 1_000
    commit_interval: float = 0.1
    commit_max_records: int = 10_000
    commit_max_bytes: int = 33_554_432
    # Once consume() finds less than a full batch (the input is caught up), a batch this
    # old, and at least as old as the last commit took, commits without waiting for
    # commit_interval: latency at moderate rates, with commits never more than half the
    # loop's time; a loop behind its input still commits by the interval.
    commit_min_interval: float = 0.02
    # The input's partition count when the process started (its changelogs and the
    # repartition topic have the same): a partition beyond it stops the worker. 0: any.
    partitions: int = 0
    # consume() waits this long for a full batch: short, for latency (bench: p99 537 ->
    # 246 ms at half the maximum rate); an idle loop costs microseconds per round.
    poll_timeout: float = 0.01


class Runner:
    """Runs one worker's loop until ``stop()``; see ``run``."""

    def __init__(
        self,
        settings: RunnerSettings,
        source: Source,
        sink: Sink,
        processor: Processor,
        store: StateStore,
        restorer: Restorer,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        self._processor = processor
        self._store = store
        self._restorer = restorer
        self._metrics = metrics
        self._clock = clock
        self._stopping = False
        # Next offset to commit per partition, and where the uncommitted batch started.
        self._pending: dict[Partition, int] = {}
        self._batch_start: dict[Partition, int] = {}
        # Per partition, the record a commit cut (``Processor.process_some``), as
        # processed and as committed (what an abort goes back to); and assigned input
        # partitions whose committed cut is not read yet.
        self._cuts: dict[Partition, Cut] = {}
        self._committed_cuts: dict[Partition, Cut] = {}
        self._cuts_unread: set[Partition] = set()
        self._batch_opened: float | None = None
        self._uncommitted = 0  # records consumed since the last commit
        self._tally = Tally()  # what they did, counted when they commit
        self._caught_up = False  # the last consume() found less than a full batch
        self._commit_took = 0.0  # seconds the last commit took
        self._assigned: set[Partition] = set()
        # Stateful partitions assigned and not restored yet, in the order they came.
        self._unrestored: dict[Partition, _Restore] = {}
        self._paused = False
        self._lag_checked = 0.0
        # Batches aborted since the last commit: the same records, tried again and again.
        self._abort_streak = 0
        self._renewing = False  # the producer hung, and no new one has started yet
        routes = settings.routes
        self._changelogs = Changelogs(routes.state, routes.members, routes.dedupe)
        # Each changelog's role, by its topic.
        self._roles: dict[str, Changelog] = {t: r for r, t in self._changelogs.by_role()}
        self.joined = False
        self.last_progress = clock.monotonic()

    @property
    def ready(self) -> bool:
        """Joined the group with every assigned partition restored, a producer that
        works, and not stopping."""
        return self.joined and not self._unrestored and not self._renewing and not self._stopping

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler. Returns at once."""
        self._stopping = True

    def run(self) -> None:
        """Consume, process and commit until ``stop()``, then commit and leave the group.

        Blocks. Retriable Kafka errors are logged and retried; an abortable commit is
        aborted and the uncommitted records are read again; ``FatalError`` propagates.
        """
        routes = self._settings.routes
        topics = [routes.input] + ([routes.repartition] if routes.repartition else [])
        try:
            self._source.subscribe(topics, self)
            log.info("worker_started", topics=topics)
            while not self._stopping:
                self.last_progress = self._clock.monotonic()
                try:
                    records = self._source.consume(
                        self._settings.batch_size, self._settings.poll_timeout
                    )
                    self._caught_up = len(records) < self._settings.batch_size
                    if records:
                        self._process(records)
                    self._sink.poll()
                    self._apply_backpressure()
                    if self._commit_due():
                        self._commit()
                    if self._unrestored and self._batch_opened is None:
                        self._restore_slice()
                    self._export_lag()
                except RetriableError as e:
                    log.warning("kafka_retriable_error", error=str(e))
                    self._clock.sleep(_ERROR_BACKOFF)
                except ProducerHungError as e:
                    self._renew_producer(e)
                except AbortableError as e:
                    log.warning("transaction_aborted", error=str(e))
                    try:
                        self._abort_and_rewind(set())
                    except ProducerHungError as hung:  # the abort's call hung
                        self._renew_producer(hung)
                        continue
                    if self._abort_streak > 1:
                        step = min(self._abort_streak - 2, len(_ABORT_BACKOFF) - 1)
                        self._clock.sleep(_ABORT_BACKOFF[step])
                except StoreCorrupt as e:  # a read while processing: the batch is replayed
                    self._abort_and_rewind(set())
                    self._rebuild(e)
            self._commit_final()
        except BaseException:
            self._discard_open_batch()
            raise
        finally:
            self.joined = False  # not ready while the service builds the next loop, if any
            closes = (self._source.close, self._sink.close, self._restorer.close, self._store.close)
            for close in closes:
                try:
                    close()
                except Exception as e:  # closing must not hide why the loop ended
                    log.warning("close_failed", error=str(e))
            # Partitions no revoke reached (the loop failed; a close that could not leave
            # the group): their lag series go, or an alert watches a partition not held.
            self._forget(list(self._assigned))
        log.info("worker_stopped")

    # RebalanceListener: called from inside Source.consume.

    def on_assign(self, partitions: Sequence[Partition]) -> None:
        self._metrics.rebalances.labels("assign").inc()
        log.info("partitions_assigned", partitions=_names(partitions))
        self._check_partition_count(partitions)
        self._take(partitions)
        self.joined = True

    def _take(self, partitions: Sequence[Partition]) -> None:
        """Take ``partitions`` up as assigned: read from where they are, the stateful
        ones paused until their restore."""
        self._assigned.update(partitions)
        # Only the input's records hold many calls (the repartition topic's, one each).
        self._cuts_unread.update(p for p in partitions if p[0] == self._settings.routes.input)
        stateful = [p for p in partitions if p[0] == self._settings.routes.stateful_input]
        self._hold(stateful)
        if self._paused:
            self._source.pause(partitions)
        self._export_assignment()

    def _check_partition_count(self, partitions: Sequence[Partition]) -> None:
        """Raise ``TopicError`` for a partition beyond the count the topics had at start.

        Partitions added while the worker runs move groups: calls keyed by groupId hash to
        other partitions than their state, and a group's state splits in two. The first
        worker given a new partition stops, and so does each one given it after (the
        topics' counts then differ, or differ from the state's, and none starts again).
        """
        count = self._settings.partitions
        beyond = sorted(p for p in partitions if count and p[1] >= count)
        if beyond:
            topic, partition = beyond[0]
            raise TopicError(
                f"topic {topic} has partition {partition}, beyond the {count} its "
                "topics had when the worker started: partitions added to a running "
                "deployment move groups away from their state; its partition count "
                'cannot change in place (README, "Changing the partition count")'
            )

    def on_revoke(self, partitions: Sequence[Partition]) -> None:
        self._metrics.rebalances.labels("revoke").inc()
        try:
            self._commit()
        except (AbortableError, RetriableError, ProducerHungError) as e:
            # The new owner reads from the committed offsets; rewind what we keep.
            log.warning("commit_failed_on_revoke", error=str(e))
            try:
                self._abort_and_rewind(set(partitions))
            except (AbortableError, RetriableError, ProducerHungError) as again:
                raise _callback_failed("aborting on revoke", again) from again
        finally:  # a fatal error too: the partitions are gone, and so are their series
            self._forget(partitions)
        log.info("partitions_revoked", partitions=_names(partitions))

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        self._metrics.rebalances.labels("lost").inc()
        # Out of the group (its session expired) until it joins again, when on_assign
        # is called, with no partitions too: not ready meanwhile.
        self.joined = False
        # Offsets of lost partitions can no longer be committed by this member.
        try:
            if not self._renewing:  # else no batch is open, and the producer is stuck
                self._abort_and_rewind(set(partitions))
        except (AbortableError, RetriableError, ProducerHungError) as e:
            raise _callback_failed("aborting on lost partitions", e) from e
        finally:
            self._forget(partitions)
        log.warning("partitions_lost", partitions=_names(partitions))

    def _hold(self, partitions: Sequence[Partition], wiped: str | None = None) -> None:
        """Pause stateful ``partitions`` until the loop has restored their state;
        ``wiped`` says why their files were deleted before, if they were."""
        if not partitions:
            return
        self._source.pause(partitions)
        now = self._clock.monotonic()
        for partition in partitions:
            if wiped is not None or partition not in self._unrestored:
                self._unrestored[partition] = _Restore(now, wiped, logged=now)
        self._metrics.restoring_partitions.set(len(self._unrestored))

    def _restore_slice(self) -> None:
        """Restore waiting partitions, in the order they came, for up to
        ``_RESTORE_SLICE`` seconds, and fetch each again once restored; the next slice
        goes on where this one stopped (the restorer's read with it). A failure leaves
        them waiting: the loop retries."""
        self._settle()
        deadline = self._clock.monotonic() + _RESTORE_SLICE

        def cut() -> bool:
            return self._stopping or self._clock.monotonic() >= deadline

        while self._unrestored and not cut():
            (topic, partition), restore = next(iter(self._unrestored.items()))
            began = self._clock.monotonic()
            try:
                restored = restore_partition(
                    self._restorer,
                    self._store,
                    self._changelogs,
                    partition,
                    functools.partial(self._restore_progress, restore, partition),
                    cut,
                    restore.resume,
                )
            except StoreCorrupt as e:  # the files failed again after a wipe: not retried
                raise StoreError(f"restoring {topic}[{partition}]: {e}") from e
            restore.rebuilt = restore.rebuilt or restored.rebuilt
            restore.failed |= restored.failed
            restore.states += restored.states
            restore.members += restored.members
            restore.seen += restored.seen
            restore.skipped += restored.skipped
            if restored.finished:
                self._restored((topic, partition), restore, began)
                continue
            restore.took += self._clock.monotonic() - began
            restore.resume = restored.cut_in
            if self._stopping:  # the store keeps what it replayed: the next start goes on
                log.info("restore_interrupted", topic=topic, partition=partition)

    def _settle(self) -> None:
        """Wait for the offsets of waiting partitions not settled yet to be stable: a
        paused previous owner's last transaction may still commit changelog records with
        them, which their restore must read. Their committed cuts come with them."""
        unsettled = [p for p, restore in self._unrestored.items() if not restore.settled]
        if not unsettled:
            return
        started = self._clock.monotonic()
        self._learn_cuts(self._source.committed_cuts(unsettled, _SETTLE_TIMEOUT), unsettled)
        for partition in unsettled:
            self._unrestored[partition].settled = True
        waited = self._clock.monotonic() - started
        if waited >= _SETTLE_LOGGED:  # a gap in the log (and /readyz 503) explained
            log.info(
                "offsets_settled",
                partitions=_names(unsettled),
                seconds=round(waited, 1),
                why="a transaction that sent offsets for them was open",
            )

    def _restored(self, position: Partition, restore: _Restore, began: float) -> None:
        """Fetch a restored partition again; ``began``: when its last slice did."""
        del self._unrestored[position]
        m = self._metrics
        m.restoring_partitions.set(len(self._unrestored))
        # A restore churns through memory that glibc keeps (bench: 377 -> 179 MB RSS
        # after a rebuild of 1,000,000 groups): give it back before the next partition's.
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        # What lives until now lives long (clients, caches): keep it out of the cyclic
        # collector's scans (reference counting still frees it).
        gc.freeze()
        restore.took += self._clock.monotonic() - began
        m.restore_duration.observe(restore.took)
        rebuilt = restore.rebuilt or restore.wiped
        if rebuilt is not None:
            m.store_rebuilds.inc()
        if restore.failed:
            m.store_failures.inc()
        self._export_state_size()
        log.info(
            "partition_restored",
            topic=position[0],
            partition=position[1],
            state_records=restore.states,
            member_records=restore.members,
            dedupe_records=restore.seen,
            skipped=restore.skipped,
            rebuilt=rebuilt,
            seconds=round(restore.took, 3),
            since_assigned=round(self._clock.monotonic() - restore.started, 3),
        )
        if restore.rewind is not None:  # records consumed while it waited: read again
            self._source.seek({position: restore.rewind})
        if not self._paused:
            self._source.resume([position])

    def _renew_producer(self, hung: ProducerHungError) -> None:
        """Go on after the producer hung (a broker restart), keeping the consumer: one
        closed while the broker is away cannot leave the group, and holds its partitions
        until its session ends (45 s by default, afresh at each restart of the broker).
        The sink takes a new producer, tried again every few seconds while the broker is
        away (the consumer polled meanwhile, what it returns dropped); the new one ends
        the open transaction, committed or not, so every assigned partition is then
        taken up again as on assignment: read from its committed offset, its state
        caught up from its changelogs. A stop meanwhile returns at once. Raises
        ``FatalError`` from the new producer, and what ``Source.committed`` raises."""
        log.warning("producer_renewing", error=str(hung))
        self._store.rollback()
        self._close_batch()
        self._renewing = True
        while True:
            try:
                self._sink.renew()
                self._renewing = False
                break
            except FatalError:
                raise
            except KafkaError as e:  # the broker still away; this is no hung loop
                log.warning("producer_renew_failed", error=str(e))
            with contextlib.suppress(RetriableError):
                self._source.consume(self._settings.batch_size, _RENEW_WAIT)
            self.last_progress = self._clock.monotonic()
            if self._stopping:
                return
        partitions = sorted(self._assigned)
        if partitions:
            self._forget(partitions)
            self._source.seek(self._source.committed(partitions, _SETTLE_TIMEOUT))
            self._take(partitions)
        self._metrics.producer_renewals.inc()
        log.info("producer_renewed", partitions=_names(partitions))

    def _rebuild(self, failure: StoreCorrupt) -> None:
        """RocksDB failed on these partitions' files: wipe them and restore each from its
        changelogs, as on assignment (paused meanwhile)."""
        log.error("store_partition_failed", partitions=failure.partitions, error=str(failure))
        self._metrics.store_failures.inc(len(failure.partitions))
        topic = self._settings.routes.stateful_input
        for partition in failure.partitions:
            self._store.wipe(partition)
        self._hold([(topic, p) for p in failure.partitions], str(failure))

    def _restore_progress(self, restore: _Restore, partition: int, records: int) -> None:
        """A restore reading on is progress: it keeps liveness and shows on the metrics,
        and in a log line every ``_RESTORE_LOG_INTERVAL`` seconds."""
        self._metrics.restored_records.inc(records)
        now = self.last_progress = self._clock.monotonic()
        restore.read += records
        if now - restore.logged >= _RESTORE_LOG_INTERVAL:
            restore.logged = now
            log.info("partition_restoring", partition=partition, records=restore.read)

    def _process(self, records: list[SourceRecord]) -> None:
        started = self._clock.monotonic()
        while True:
            if self._cuts_unread:  # (it may commit: before the next line)
                records = self._read_cuts(records)
            if self._unrestored:  # (a commit can hold a partition for a rebuild)
                records = self._without_unrestored(records)
            if not records:
                break
            if self._batch_opened is None:
                self._sink.begin()
                self._batch_opened = self._clock.monotonic()
            # Before processing: a produce that fails half-way through the records aborts
            # the batch, and the rewind must cover every record consumed, processed or not.
            for record in records:
                self._batch_start.setdefault(_position(record), record.offset() or 0)
            # A batch holds about commit_max_records calls, however many a record holds
            # (an envelope can hold thousands): past that, commit and go on.
            # And about commit_max_bytes of calls: those of a large group are large.
            s = self._settings
            budget = max(s.commit_max_records - self._uncommitted, 1)
            done, calls, cut = self._processor.process_some(
                records, self._tally, budget, s.commit_max_bytes, self._cuts
            )
            for record in records[:done]:
                self._pending[_position(record)] = (record.offset() or 0) + 1
            if self._cuts:
                for record in records[:done]:
                    self._cuts.pop(_position(record), None)
            if cut:  # the offset stays at the record cut, whose calls done it names
                record = records[done]
                offset = record.offset() or 0
                self._pending[_position(record)] = offset
                self._cuts[_position(record)] = Cut(offset, fingerprint(record.value()), cut)
            self._uncommitted += calls
            if done == len(records):
                break
            turn = {_position(r) for r in records[: done + bool(cut)]}
            records = records[done:]
            try:
                self._commit()
            except RetriableError:
                # The commit is tried again later; the rest, consumed but not
                # processed, must be read again (an abort rewinds them anyway).
                self._read_again(records)
                raise
            # A run of commits inside one consume (a large group's envelopes) is
            # progress, and SIGTERM ends it: the rest is read again by the next start.
            self.last_progress = self._clock.monotonic()
            if self._stopping:
                break
            records = self._next_turn(records, turn)
        self._metrics.processing_duration.observe(self._clock.monotonic() - started)

    def _read_cuts(self, records: list[SourceRecord]) -> list[SourceRecord]:
        """``records``, once the committed cut of their partitions that have none known
        yet (input partitions not settled before a restore: stage one's, in two stages)
        is read. The open batch commits first: the read waits for any transaction that
        holds offsets for them (a previous owner's, until it ends), and one of ours left
        open meanwhile would outlive its timeout. When the read fails, those partitions'
        records are read again later; the others go on."""
        unread = sorted(
            {_position(r) for r in records} & self._cuts_unread - self._unrestored.keys()
        )
        if not unread:
            return records
        try:
            self._commit()
        except (AbortableError, RetriableError):
            self._read_again(records)  # consumed, not processed
            raise
        try:
            self._learn_cuts(self._source.committed_cuts(unread, _SETTLE_TIMEOUT), unread)
        except RetriableError as e:
            log.warning("cut_read_failed", partitions=_names(unread), error=str(e))
            held = set(unread)
            self._read_again([r for r in records if _position(r) in held])
            return [r for r in records if _position(r) not in held]
        return records

    def _learn_cuts(self, cuts: Mapping[Partition, Cut], partitions: Iterable[Partition]) -> None:
        """Take the committed ``cuts`` of ``partitions`` read for the first time since
        their assignment: calls an earlier owner (or this worker, before a restart) did
        of the record at the committed offset."""
        for partition in partitions:
            cut = cuts.get(partition)
            if cut is not None and partition in self._cuts_unread:
                self._cuts[partition] = self._committed_cuts[partition] = cut
                log.info(
                    "record_cut_resumed",
                    partition=_names([partition])[0],
                    offset=cut.offset,
                    calls_done=cut.calls,
                )
            self._cuts_unread.discard(partition)

    def _next_turn(self, records: list[SourceRecord], turn: set[Partition]) -> list[SourceRecord]:
        """What to process after a commit cut a consumed batch, the partitions of
        ``turn`` having had theirs: one hot partition's records (envelopes of hundreds
        of calls, a large group's calls) must not hold every other partition's behind
        them. The consumer's one queue holds about 2,000 records of each partition, in
        the order fetched. The rest's records of other partitions come first; when none
        is left and another partition has records to read, the rest is read again: its
        prefetch is dropped and fetched anew, behind the others' (which slows the hot
        partition: README, Scaling by partitions). A partition nothing was read from
        since its assignment has no known lag: it counts as waiting, as its first
        records may well be queued behind the rest."""
        waiting = [r for r in records if _position(r) not in turn]
        if waiting:
            return waiting + [r for r in records if _position(r) in turn]
        if self._paused:  # backpressure: no partition is read meanwhile
            return records
        others = (p for p in self._assigned - turn if p not in self._unrestored)
        if any(self._source.lag(p) != 0 for p in others):
            self._read_again(records)
            return []
        return records

    def _read_again(self, records: list[SourceRecord]) -> None:
        """Move the read position back to the first of ``records`` in each partition."""
        rest: dict[Partition, int] = {}
        for record in records:
            rest.setdefault(_position(record), record.offset() or 0)
        self._source.seek(rest)

    def _without_unrestored(self, records: list[SourceRecord]) -> list[SourceRecord]:
        """``records`` but those of partitions waiting for their state (fetched before
        the pause took hold), which are read again once it is restored."""
        kept = []
        for record in records:
            restore = self._unrestored.get(_position(record))
            if restore is None:
                kept.append(record)
            elif restore.rewind is None:
                restore.rewind = record.offset() or 0
        return kept

    def _count(self, tally: Tally) -> None:
        """Count what a committed batch did: an aborted batch counts nothing, and its
        replay counts once, so the outcomes add up to the calls consumed exactly."""
        m = self._metrics
        m.records_consumed.inc(tally.records)
        m.calls_consumed.inc(tally.calls)
        m.repartitioned_calls.inc(tally.forwarded)
        m.unkeyed_calls.inc(tally.unkeyed)
        m.invalid_timestamps.inc(tally.invalid_timestamps)
        m.changelog_records.inc(tally.changelog)
        for labels, counter in (
            (tally.outcomes, m.outcomes),
            (tally.reasons, m.dead_letters),
            (tally.changelog_letters, m.dead_letters),
            (tally.skipped, m.skipped),
            (tally.warnings, m.trait_warnings),
        ):
            for label, n in labels.items():
                counter.labels(label).inc(n)
        now_ms = self._clock.now_ms()
        for event_ms in tally.event_times_ms:
            m.event_age.observe(max(now_ms - event_ms, 0) / 1000)

    def _commit_due(self) -> bool:
        opened = self._batch_opened
        if opened is None:
            return False
        s, age = self._settings, self._clock.monotonic() - opened
        return (
            age >= s.commit_interval
            or self._uncommitted >= s.commit_max_records
            or self._tally.produced_bytes >= s.commit_max_bytes
            or (self._caught_up and age >= max(s.commit_min_interval, self._commit_took))
        )

    def _commit(self) -> None:
        """Commit every output, changelog record and input offset since the last commit.

        Steps: (1) write the coalesced state, membership and dedupe changes (2) as the
        sink makes every output durable and commits the offsets with them (it runs (1)
        while the offsets are sent, and the store's ``prepare`` for (3) while the
        transaction commits); (3) the store writes the change set with the
        changelog offsets it reached, and the batch is closed. On an
        error before (3) nothing is closed, so a retry commits the same batch, and an
        abort rolls the store back and rewinds to the batch's start. A partition whose
        files fail at (3) (``StoreCorrupt``) is rebuilt from its changelogs, which hold
        the batch. No-op when nothing was consumed since the last commit.
        """
        if self._batch_opened is None:
            return
        started = self._clock.monotonic()
        try:
            reached = self._sink.commit(  # (1), (2)
                self._pending,
                self._source,
                self._write_changelog,
                self._prepare_store,
                self._cuts,
            )
        except Exception:
            self._metrics.commit_failures.inc()
            raise
        failure = None
        try:
            self._store.commit(  # (3)
                {(role, p): o for (t, p), o in reached.items() if (role := self._roles.get(t))}
            )
            self._processor.expire_seen()
        except StoreCorrupt as e:  # the batch is committed: the changelogs have it
            failure = e
        self._abort_streak = 0
        self._metrics.abort_streak.set(0)
        self._committed_cuts = dict(self._cuts)
        self._count(self._tally)
        self._close_batch()
        self._commit_took = self._clock.monotonic() - started
        self._metrics.commit_duration.observe(self._commit_took)
        if failure is not None:
            self._rebuild(failure)
        self._export_state_size()

    def _write_changelog(self) -> None:
        self._processor.write_changelog(self._tally)

    def _prepare_store(self) -> None:
        # Runs while the transaction commits: an error here must not pass for the
        # commit's, which may well succeed. The store's commit prepares again.
        try:
            self._store.prepare()
        except Exception as e:
            log.warning("store_prepare_failed", error=str(e))

    def _commit_final(self) -> None:
        try:
            self._commit()
        except (AbortableError, RetriableError) as e:
            log.warning("final_commit_failed", error=str(e))
            self._sink.abort()
            self._store.rollback()
            # Nothing of the batch may commit when the consumer closes (its revoke
            # commits what is open): the next start reads it again.
            self._close_batch()

    def _apply_backpressure(self) -> None:
        backlog = self._sink.backlog()
        if not self._paused and backlog >= _BACKLOG_HIGH:
            self._paused = True
            self._source.pause(list(self._assigned))
            log.warning("backpressure_paused", backlog=backlog)
        elif self._paused and backlog <= _BACKLOG_LOW:
            self._paused = False
            self._source.resume([p for p in self._assigned if p not in self._unrestored])
            log.info("backpressure_resumed", backlog=backlog)
        self._metrics.paused_partitions.set(len(self._assigned) if self._paused else 0)

    def _abort_and_rewind(self, gone: set[Partition]) -> None:
        """Abort the open batch and read its records again, except those of ``gone``.

        Records the sink says were refused for good are handed to the processor first,
        so the replay dead-letters them instead of failing again. Aborting again before
        any commit shows in the abort streak and a log line naming the batch's offsets.
        """
        self._metrics.aborts.inc()
        self._sink.abort()
        self._store.rollback()
        self._cuts = dict(self._committed_cuts)
        self._count_abort()
        rewind = {p: o for p, o in self._batch_start.items() if p not in gone}
        # Closed before anything below can raise: a batch left open would be committed,
        # offsets and counts, by the revoke that closing the consumer runs.
        self._close_batch()
        if rewind:
            self._source.seek(rewind)
            log.info("partitions_rewound", partitions=_names(rewind))
        self._processor.learn(self._sink.take_refused())

    def _discard_open_batch(self) -> None:
        """Abort the open batch after an error the loop does not handle, maybe raised
        half way through a record: closing the consumer revokes its partitions, and the
        revoke commits what is open, which would commit that record's state and dedupe
        id but not its offset (a call lost). Nothing of the batch may commit, even when
        the abort fails (the broker aborts a transaction left open)."""
        if self._batch_opened is None:
            return
        try:
            self._abort_and_rewind(set())
        except Exception as e:
            log.warning("abort_failed", error=str(e))
            self._store.rollback()
            self._close_batch()

    def _close_batch(self) -> None:
        """Forget the batch's offsets: committed, or aborted and rewound."""
        self._pending.clear()
        self._batch_start.clear()
        self._batch_opened = None
        self._uncommitted = 0
        self._tally = Tally()

    def _count_abort(self) -> None:
        # Counted by commits, not by exact offsets: a stuck batch picks up records of
        # other partitions as they arrive, but its first offsets never get committed.
        start = self._batch_start
        if not start:  # nothing was consumed since the last commit: nothing retried
            return
        self._abort_streak += 1
        self._metrics.abort_streak.set(self._abort_streak)
        if self._abort_streak > 1:
            log.error(
                "batch_aborted_again",
                streak=self._abort_streak,
                offsets=[f"{t}[{p}]@{o}" for (t, p), o in sorted(start.items())],
            )

    def _forget(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._assigned.discard(partition)
            self._pending.pop(partition, None)
            self._batch_start.pop(partition, None)
            self._cuts.pop(partition, None)
            self._committed_cuts.pop(partition, None)
            self._cuts_unread.discard(partition)
            restoring = self._unrestored.pop(partition, None) is not None
            if partition[0] == self._settings.routes.stateful_input:
                if restoring:  # a read it left parked holds a fetch of up to 12 MiB
                    self._restorer.release(partition[1])
                self._store.drop(partition[1])
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(*map(str, partition))
        if not self._batch_start:  # the aborted batch went with them: nothing is replayed
            self._abort_streak = 0
            self._metrics.abort_streak.set(0)
        self._metrics.restoring_partitions.set(len(self._unrestored))
        self._export_assignment()
        self._export_state_size()

    def _export_assignment(self) -> None:
        routes = self._settings.routes
        for topic in {routes.input, routes.stateful_input}:
            count = sum(1 for t, _ in self._assigned if t == topic)
            self._metrics.assigned_partitions.labels(topic).set(count)

    def _export_state_size(self) -> None:
        self._metrics.groups_in_state.set(self._store.group_count())
        self._metrics.members_in_state.set(self._store.member_count())
        self._metrics.dedupe_ids_in_state.set(self._store.seen_count())

    def _export_lag(self) -> None:
        now = self._clock.monotonic()
        if now - self._lag_checked < _LAG_INTERVAL:
            return
        self._lag_checked = now
        for partition in self._assigned:
            lag = self._source.lag(partition)
            if lag is not None:
                self._metrics.consumer_lag.labels(*map(str, partition)).set(lag)


def _callback_failed(what: str, error: KafkaError) -> KafkaError:
    """A rebalance callback's failure, which ends the loop (the service builds a new one).

    Not retried in this loop: the callback runs inside ``consume()``, whose records are
    lost with the exception while the consumer's position has moved past them, so this
    loop would go on and commit beyond them. A new loop reads from the committed offsets.
    """
    return KafkaError(f"{what} failed in a rebalance: {error}")


def _names(partitions: Iterable[Partition]) -> list[str]:
    return [f"{t}[{p}]" for t, p in partitions]


def _position(record: SourceRecord) -> Partition:
    return record.topic() or "", record.partition() or 0
