"""What happens to consumed records, stage by stage, and the changelog they leave.

Stage one (records of the input topic) runs the pure pipeline: dead letters and skipped
calls end there. A valid group call then goes either to the repartition topic, keyed
by groupId, when the input is keyed by something else, or straight to stage two.
Stage two (records of the repartition topic, or stage one's calls) dedupes each call by
its arrival time (``worker.dedupe``), merges it into its group's state and emits the
enriched call, or counts a duplicate. A re-keyed call carries its input record's
timestamp in a header (``pipeline.forward_headers``), so both stages see the same
arrival time; the record is stamped when written, so the topic's retention counts from
then, however old the backlog.
State, membership and dedupe-id changes are written to their changelog topics at each
commit, coalesced, on the partition number of the stateful input (co-partitioning).

Nothing is handed to the sink that the broker must refuse: every output is checked
against its topic's limit (``worker.limits``) first. A call whose output does not fit,
or whose output the broker refused for good before (``learn``), becomes a dead letter
(``output_too_large``, ``output_refused``); a dead letter is cut to fit its topic. A
refused record is never produced again once learned (after one abort, or two when the
sink learns of it only from the replay's delivery reports: ``KafkaSink.produce``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker import codec
from worker.clock import Clock
from worker.dedupe import arrival_ms, is_duplicate
from worker.errors import KafkaError, TopicError
from worker.events import DeadLetter, Duplicate, Enriched, Outcome, SourceRecord
from worker.limits import GroupBound, Headers, Limits, add_warnings, group_bound
from worker.members import membership_key, merge_membership
from worker.pipeline import (
    Settings,
    fit_letter,
    forward_headers,
    forwarded_arrival,
    header,
    json_type,
    output_dead_letter,
    process_forwarded,
    process_record,
)
from worker.placement import partition_of
from worker.profile import group_snapshot
from worker.restore import DEPLOYMENT_HEADER
from worker.sink import Refusal, Sink
from worker.source import NO_CUTS, Cuts, fingerprint
from worker.state import GROUP_STATE_FULL, Applied, merge_call
from worker.store import Changelog, StateStore

__all__ = ["Processor", "Routes", "Tally"]

# Source fields a dead letter's log line leaves out (the key is an id; the record's
# timestamp is logged as record_timestamp, apart from the line's own).
_NOT_LOGGED = ("key", "keyEncoding", "timestamp")

log = structlog.get_logger("worker.processor")
# At most one dead_letter log line per reason in this many seconds (the rest are counted).
_LOG_EVERY = 10.0
_FOREIGN = " foreign"  # the foreign-call warning's key in _logged, beside dead letters' reasons
_INVALID_TIMESTAMP = " timestamp"  # likewise for calls whose own timestamp is unusable
# What a log line of a call's unusable timestamp shows: the timestamp's shape, of this
# many characters at most, and its library's name and version when they are a package's.
_SHOWN = 64
_PACKAGE = re.compile(r"(@[\w.-]{1,64}/)?[\w.+-]{1,64}", re.ASCII)
# Refused outputs remembered (by where their call came from), oldest forgotten first.
_MAX_REFUSED = 10_000
# Dedupe ids an expiry pass scans after a commit: about 10 ms (``expire_seen``).
_EXPIRE_SLICE = 20_000
# GroupIds whose partition is remembered; emptied when full.
_PLACED_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class Routes:
    """The topics records come from and go to."""

    input: str
    enriched: str
    dlq: str
    state: str
    members: str
    # None when the input is keyed by groupId: stage two then reads the input itself.
    repartition: str | None = None
    dedupe: str = "dedupe"

    @property
    def stateful_input(self) -> str:
        """The topic whose partitions own group state."""
        return self.repartition or self.input


@dataclass(slots=True)
class Tally:
    """What processing did, for the metrics."""

    records: int = 0
    calls: int = 0
    forwarded: int = 0
    produced_bytes: int = 0  # enriched and re-keyed calls' values, dead letters' records
    unkeyed: int = 0  # group calls of a keyed input whose record key is not their groupId
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    invalid_timestamps: int = 0  # group calls whose own timestamp is unusable
    event_times_ms: list[int] = field(default_factory=list)
    # The commit's changelog (``write_changelog``; set anew if the commit is retried):
    # records written, and state or membership records dead-lettered instead, by reason.
    changelog: int = 0
    changelog_letters: Counter[str] = field(default_factory=Counter)


class Processor:
    """Turns records into outputs on ``sink`` and state in ``store``; never raises for input.

    ``limits`` says what each topic accepts (shared with the service: what ``learn``
    reads again outlives a rebuilt processor); ``bound`` how large one group may grow
    (default: what fits ``limits``). ``on_unwritable`` hears of each output that could
    not be written as it was, by route (``enriched``, ``state``...). ``read_limits``
    reads the output topics' ``max.message.bytes`` again (blocking) after a refusal.
    ``expire_slice``: the dedupe ids scanned for expiry after each commit.
    """

    def __init__(
        self,
        routes: Routes,
        settings: Settings,
        store: StateStore,
        sink: Sink,
        clock: Clock,
        *,
        dedupe_window_ms: int,
        limits: Limits | None = None,
        bound: GroupBound | None = None,
        on_unwritable: Callable[[str], None] = lambda _: None,
        read_limits: Callable[[], Mapping[str, int]] = dict,
        expire_slice: int = _EXPIRE_SLICE,
        deployment: str = "",
        partitions: int = 0,
    ) -> None:
        self._routes = routes
        self._settings = settings
        self._store = store
        self._sink = sink
        self._clock = clock
        self._window_ms = dedupe_window_ms
        self._now_ms = 0  # read once per batch: a group's updatedAt
        # The latest arrival processed in each partition, and the latest of all at the
        # last expiry of dedupe ids; during an expiry pass (``expire_seen``), what it
        # expires in each partition, ids written before when, and has removed.
        self._latest_arrival: dict[int, int] = {}
        self._expired_at = 0
        self._expiring_before: dict[int, int] | None = None
        self._written_before = 0
        self._expired = 0
        self._expire_slice = expire_slice
        self._limits = limits if limits is not None else Limits({})
        self._bound = bound or group_bound(
            self._limits, routes.enriched, routes.state, settings.max_event_bytes, 0
        )
        self._on_unwritable = on_unwritable
        self._read_limits = read_limits
        self._route_of = {
            routes.enriched: "enriched",
            routes.dlq: "dlq",
            routes.state: "state",
            routes.members: "members",
            routes.dedupe: "dedupe",
        }
        if routes.repartition is not None:
            self._route_of[routes.repartition] = "repartition"
        self._changelog_topic: dict[Changelog, str] = {
            "state": routes.state,
            "members": routes.members,
            "dedupe": routes.dedupe,
        }
        # Membership, dedupe and re-keyed records name their deployment in a header (a
        # state record does in its value): a restore stops at another's (``restore``),
        # stage two passes over another's calls (``_foreign``).
        self._deployment = deployment.encode()
        writer = [(DEPLOYMENT_HEADER, self._deployment)] if deployment else None
        self._forward_writer = writer or []
        self._changelog_headers: dict[Changelog, Headers | None] = {
            "state": None,
            "members": writer,
            "dedupe": writer,
        }
        # Outputs the broker refused for good, by ``_identity``: dead-lettered on replay.
        self._refused: dict[tuple[Any, ...], str] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (last line, suppressed)
        self._unkeyed_seen = False
        # The keyed input's partition count (0: not checked), and each groupId's
        # partition, memoised: murmur2 in Python is 1.5 µs a key.
        self._partitions = partitions
        self._placed: dict[str, int] = {}
        # The outcomes of a record's calls after the last cut in it, not handled yet
        # (by its position and the calls done): the next batch goes on with them
        # instead of parsing the record and normalising its calls again. Kept until
        # used or another cut: other partitions' records may come between.
        self._rest: tuple[tuple[str | None, int, int | None, int], list[Outcome]] | None = None

    def process(self, records: list[SourceRecord]) -> Tally:
        """Produce every output of ``records`` and update the store; returns the tally."""
        tally = Tally()
        self.process_some(records, tally)
        return tally

    def process_some(
        self,
        records: list[SourceRecord],
        tally: Tally,
        budget: int = 0,
        max_bytes: int = 0,
        cuts: Cuts = NO_CUTS,
    ) -> tuple[int, int, int]:
        """``process`` the first of ``records``, as many as it takes to handle ``budget``
        calls (a record of the repartition topic is one; 0: no bound), or until
        ``tally`` counts ``max_bytes`` of calls produced (0: no bound), at least one
        call, inside a record if need be. Returns how many records were done, how many
        calls they held, and of the next record how many calls are done when it is cut
        (else 0): a transaction then holds about as many calls, and bytes, as its
        committer chooses, however many a record holds. An envelope holds up to 16,384
        calls; each call of a large group carries the group's profile, so 2,000 calls to
        a group near its bound are 1.7 GB, more than a transaction's timeout lets
        through. ``cuts``: records cut before, whose calls done it skips."""
        now_ms = self._now_ms = self._clock.now_ms()
        repartition = self._routes.repartition
        handled = 0
        for index, record in enumerate(records, 1):
            if index > 1 and (
                (budget and handled >= budget) or (max_bytes and tally.produced_bytes >= max_bytes)
            ):
                return index - 1, handled, 0
            partition = record.partition() or 0
            topic = record.topic()
            if topic == repartition:
                handled += 1
                if self._foreign(record):
                    continue
                arrival = forwarded_arrival(record, now_ms)
                forwarded = process_forwarded(record)
                if isinstance(forwarded, Enriched):
                    self._check_input(forwarded.call["enrichment"]["source"]["topic"], record)
                self._finish(forwarded, record, partition, arrival, tally)
                continue
            skip = 0
            cut = cuts.get((topic or "", partition)) if cuts else None
            if cut and cut.offset == record.offset() and cut.record == fingerprint(record.value()):
                skip = cut.calls
            else:
                tally.records += 1  # once, whatever the commits it is cut in
            arrival = arrival_ms(record, now_ms)
            rest = self._rest
            if skip and rest is not None and rest[0] == (topic, partition, record.offset(), skip):
                outcomes, self._rest = rest[1], None
            else:
                outcomes = process_record(record, self._settings, arrival, skip)
            headers = None  # the re-keyed calls' headers, once per record (1.2 µs)
            for done, outcome in enumerate(outcomes, skip):
                if done > skip and (
                    (budget and handled >= budget)
                    or (max_bytes and tally.produced_bytes >= max_bytes)
                ):
                    self._rest = (topic, partition, record.offset(), done), outcomes[done - skip :]
                    return index - 1, handled, done
                handled += 1
                tally.calls += 1
                # Counted where found, whatever becomes of the call (a duplicate's too),
                # in either layout; Counter.update costs ~0.2 µs, even empty.
                if isinstance(outcome, Enriched) and outcome.warnings:
                    tally.warnings.update(outcome.warnings)
                if isinstance(outcome, Enriched) and outcome.invalid_timestamp is not None:
                    self._invalid_timestamp(outcome, tally)
                if isinstance(outcome, Enriched) and repartition is not None:
                    key, value = outcome.group_id.encode(), codec.encode(outcome.call)
                    headers = headers or forward_headers(record, arrival) + self._forward_writer
                    reason = self._refusal(repartition, key, value, headers)
                    if reason is None:
                        tally.forwarded += 1
                        tally.produced_bytes += len(value)
                        self._sink.produce(repartition, key, value, headers)
                        continue
                    outcome = self._unwritable(reason, repartition, value, record, outcome.call)
                elif isinstance(outcome, Enriched) and not self._placed_by(
                    record, outcome.group_id
                ):
                    self._unkeyed(record, tally)
                self._finish(outcome, record, partition, arrival, tally)
        return len(records), handled, 0

    def _foreign(self, record: SourceRecord) -> bool:
        """Whether a call in the repartition topic was written by another deployment (its
        header names another ``worker.group_id``): one given this deployment's
        ``topics.repartition`` for its own, which its own stage two reads and merges.
        Passed over here, with a warning at most every 10 s; a call without the
        header (a worker before it) is taken as this deployment's."""
        writer = header(record, DEPLOYMENT_HEADER)
        if writer is None or writer == self._deployment or not self._deployment:
            return False
        if (suppressed := self._log_due(_FOREIGN)) is not None:
            log.warning(
                "repartition_call_of_another_deployment",
                topic=record.topic(),
                partition=record.partition(),
                offset=record.offset(),
                deployment=writer.decode(errors="replace"),
                suppressed=suppressed,
                fix="give each deployment a topics.repartition of its own (or leave it unset)",
            )
        return True

    def _check_input(self, topic: str, record: SourceRecord) -> None:
        """Raise ``TopicError`` for a re-keyed call read from a topic other than the
        input: another deployment with the same ``worker.group_id`` (or a shared
        ``topics.repartition``) writes the repartition topic, and each would merge half
        of the other's calls into its own state."""
        routes = self._routes
        if topic != routes.input:
            raise TopicError(
                f"topic {routes.repartition} partition {record.partition()} offset "
                f"{record.offset()} holds a call read from topic {topic}, not from "
                f"this deployment's input {routes.input}: another deployment shares it (the "
                "same worker.group_id or topics.repartition; each needs its own group id), "
                "or this one's input changed before its calls from the old one were read "
                "(run it with the old input until the topic's lag is 0)"
            )

    def _placed_by(self, record: SourceRecord, group_id: str) -> bool:
        """Whether ``record`` of the keyed input is keyed by ``group_id`` and on the
        partition the Java client puts that key on (when the partition count is known)."""
        key = record.key()
        if key != group_id.encode() and key != group_id:
            return False
        if not self._partitions:
            return True
        partition = self._placed.get(group_id)
        if partition is None:
            if len(self._placed) >= _PLACED_SIZE:
                self._placed.clear()
            partition = self._placed[group_id] = partition_of(group_id.encode(), self._partitions)
        return record.partition() == partition

    def _unkeyed(self, record: SourceRecord, tally: Tally) -> None:
        """Count a group call of the keyed input whose record is keyed otherwise (its
        group's calls may be on several partitions, each with a state of its own); the
        first one a process sees is logged."""
        if not self._unkeyed_seen:
            self._unkeyed_seen = True
            log.warning(
                "input_not_keyed_by_group_id",
                topic=record.topic(),
                partition=record.partition(),
                offset=record.offset(),
            )
        tally.unkeyed += 1

    def write_changelog(self, tally: Tally | None = None) -> int:
        """Produce the newest state, membership and dedupe id of everything changed.

        Called just before a commit, so the changelog commits with the outputs; returns
        how many records. A state or membership record too large for its topic, or
        refused before, is dead-lettered instead. Every record is stamped with the time
        it is written, a dedupe record too (its value is its call's arrival): the dedupe
        topic's retention then keeps an id a window past its writing, however far behind
        its input the worker was. Stamped with the arrival, the ids of a backlog older
        than the window were deleted by Kafka as soon as written, and a partition restored
        while the worker caught up lost them. The last record of each topic partition
        asks for its delivery report: its offset is where the store's copy of that
        changelog reaches at commit. ``tally`` is told what was written and what was
        dead-lettered (anew at each call: a retried commit writes the change set again).
        """
        letters: Counter[str] = Counter()
        records = self._store.changes()
        ends = set({(r[0], r[1]): i for i, r in enumerate(records)}.values())
        topics, produce, refused = self._changelog_topic, self._sink.produce, self._refused
        headers_of = self._changelog_headers
        room = {
            changelog: self._limits.record_bytes(topic)
            - sum(len(k) + len(v) for k, v in headers_of[changelog] or ())
            for changelog, topic in topics.items()
        }
        # A producer's clock ahead of ours would otherwise move the expiry horizon early.
        latest, now = self._latest_arrival, self._clock.now_ms()
        for i, (changelog, partition, key, value, arrival) in enumerate(records):
            topic, headers = topics[changelog], headers_of[changelog]
            if refused or len(key) + len(value) > room[changelog]:
                letter = self._write_changelog(topic, partition, key, value, headers, i in ends)
                if letter is not None:
                    letters[letter] += 1
            else:  # _write_changelog for a record that fits, inlined: ~3 records a call
                produce(topic, key, value, headers, partition, 0, report=i in ends)
            if arrival > latest.get(partition, 0):  # a dedupe id's
                latest[partition] = min(arrival, now)
        if tally is not None:
            tally.changelog = len(records) - letters.total()
            tally.changelog_letters = letters
        return len(records)

    def expire_seen(self) -> None:
        """Forget ids older than the window, four times a window of arrival time.

        An id goes once it is a window old both in arrival time and in the time it was
        written. Arrival is measured in each partition from the latest arrival processed
        there, not from the clock or other partitions, so a partition catching up on old
        records keeps the ids they need however far ahead the others are. The write time
        keeps what arrivals out of order need: a stage-two partition mixes the input
        partitions' calls, and one input partition may be a day behind another (a
        backlog), so an id from the slow one is old by the fast one's arrivals when it is
        applied, and its retry is still to come. Called after each commit, outside
        any transaction. A pass scans every id held (about 0.5 µs each on RocksDB), so
        each call scans the next ``expire_slice`` ids only: millions of ids held stall
        no commit for seconds, and a pass over 5,000,000 ends within 250 commits.
        """
        if self._expiring_before is None:
            newest = max(self._latest_arrival.values(), default=0)
            if newest - self._expired_at < self._window_ms // 4:
                return
            self._expired_at, self._expired = newest, 0
            window = self._window_ms
            self._expiring_before = {p: t - window for p, t in self._latest_arrival.items()}
            self._written_before = self._clock.now_ms() - window
        removed, done = self._store.expire_seen(
            self._expiring_before, self._written_before, self._expire_slice
        )
        self._expired += removed
        if done:
            log.info("dedupe_ids_expired", ids=self._expired)
            self._expiring_before = None

    def learn(self, refusals: Iterable[Refusal]) -> None:
        """Take in records the broker or producer refused for good (the batch was aborted).

        Any other than too large is remembered, so replaying the batch dead-letters it
        instead of producing it. After a too-large refusal the topics' limits are read
        again, and a record over its topic's new limit is dead-lettered on replay.
        Raises ``KafkaError`` when a refused record was within its topic's limit: the
        producer's batches outgrew the topic and the producer must be rebuilt.
        """
        refusals = list(refusals)
        for (topic, error), n in Counter((r.topic, r.error) for r in refusals).items():
            log.warning("output_refused", topic=topic, error=error, records=n)
        too_large = []
        for refusal in refusals:
            if refusal.too_large:
                too_large.append(refusal)
                continue
            identity = self._identity(refusal.topic, refusal.key, refusal.value)
            self._refused[identity] = refusal.error
            while len(self._refused) > _MAX_REFUSED:
                del self._refused[next(iter(self._refused))]
        if not too_large:
            return
        self._limits.update(self._read_limits())
        for refusal in too_large:
            limit = self._limits.record_bytes(refusal.topic)
            if refusal.size <= limit:
                raise KafkaError(
                    f"{refusal.topic} refused a batch of records within its limit of {limit} "
                    "bytes: its max.message.bytes is below the producer's batches"
                )

    def _finish(
        self, outcome: Outcome, record: SourceRecord, partition: int, arrival: int, tally: Tally
    ) -> None:
        if isinstance(outcome, Enriched):
            outcome = self._merge(outcome, partition, arrival)
        if isinstance(outcome, Enriched):
            enriched = self._routes.enriched
            key, call = outcome.group_id.encode(), outcome.call
            if outcome.encoded is None:
                value = codec.encode(call)
            else:  # the same bytes as encoding the call, where "group" comes last
                value = outcome.encoded[:-1] + b',"group":' + codec.encode(call["group"]) + b"}"
            reason = self._refusal(enriched, key, value)
            if reason is None:
                # The merge's own warnings (normalisation's were counted where found).
                if outcome.warnings and (full := outcome.warnings.count(GROUP_STATE_FULL)):
                    tally.warnings[GROUP_STATE_FULL] += full
                tally.event_times_ms.append(outcome.event_time_ms)
                tally.produced_bytes += len(value)
                self._sink.produce(enriched, key, value)
            else:
                outcome = self._unwritable(reason, enriched, value, record, call)
        tally.outcomes[outcome.kind] += 1
        if isinstance(outcome, DeadLetter):
            tally.reasons[outcome.reason] += 1
            tally.produced_bytes += self._dead_letter(outcome)
        elif not isinstance(outcome, Enriched | Duplicate):
            tally.skipped[outcome.call_type] += 1

    def _merge(self, enriched: Enriched, partition: int, arrival: int) -> Enriched | Duplicate:
        """Apply a call, unless its group already did, to its group's state; the enriched
        call gains the group snapshot."""
        call = enriched.call
        seen = (enriched.group_id, call["messageId"])
        if is_duplicate(self._store.seen(partition, seen), arrival, self._window_ms):
            return Duplicate(*seen)
        applied = Applied(
            enriched.group_id,
            call["messageId"],
            enriched.event_time_ms,
            enriched.member_kind,
            enriched.member_id,
            call["traits"],
        )
        key = membership_key(applied.group_id, applied.member_kind, applied.member_id)
        membership = self._store.get_member(partition, key)
        dropped: list[str] = []
        state = merge_call(
            self._store.get(partition, applied.group_id),
            applied,
            new_member=membership is None,
            now_ms=self._now_ms,
            bound=self._bound,
            dropped=dropped,
            in_place=True,  # the store undoes it on rollback
        )
        self._store.put(partition, state)
        self._store.put_seen(partition, seen, arrival, self._now_ms)
        moved = merge_membership(membership, applied)
        if moved is not None:
            self._store.put_member(partition, key, moved)
        call["group"] = group_snapshot(state)
        if dropped:
            # The call's own traits keep these keys; only the group's state could not.
            new = ({"code": GROUP_STATE_FULL, "trait": k, "value": None} for k in dropped)
            add_warnings(call["enrichment"]["warnings"], new, self._settings.max_event_bytes)
            codes = enriched.warnings + (GROUP_STATE_FULL,) * len(dropped)
            return Enriched(
                enriched.group_id,
                call,
                enriched.event_time_ms,
                enriched.member_kind,
                enriched.member_id,
                codes,
            )
        return enriched

    def _write_changelog(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes,
        headers: Headers | None,
        report: bool,
    ) -> str | None:
        """Produce one changelog record, stamped now; ``report`` asks for its offset.
        Returns the reason when it is dead-lettered instead."""
        reason = self._refusal(topic, key, value, headers)
        if reason is None:
            self._sink.produce(topic, key, value, headers, partition=partition, report=report)
            return None
        self._on_unwritable(self._route_of[topic])
        source = {"topic": topic, "partition": partition, "key": key.decode()}
        message = self._why(reason, topic, key, value)
        letter = {"reason": reason, "message": message, "source": source}
        letter["value"] = value.decode()
        self._dead_letter(DeadLetter(reason, key, letter))
        return reason

    def _unwritable(
        self, reason: str, topic: str, value: bytes, record: SourceRecord, call: dict[str, Any]
    ) -> DeadLetter:
        self._on_unwritable(self._route_of[topic])
        key = call["groupId"].encode()
        return output_dead_letter(reason, self._why(reason, topic, key, value), record, call)

    def _why(self, reason: str, topic: str, key: bytes, value: bytes) -> str:
        if reason == "output_too_large":
            return (
                f"its record for {topic} is {len(value)} bytes, over the "
                f"{self._limits.record_bytes(topic)} a record may take there (the topic's "
                "max.message.bytes less a record batch's overhead)"
            )
        return f"{topic} refused its record: {self._refused[self._identity(topic, key, value)]}"

    def _dead_letter(self, letter: DeadLetter) -> int:
        """Produce ``letter`` (cut to fit its topic); returns its record's bytes."""
        dlq, key = self._routes.dlq, letter.key
        headers = [("reason", letter.reason.encode())]
        room = self._limits.record_bytes(dlq) - len(letter.reason) - len("reason")
        if key is not None and len(key) > room // 2:
            key = None  # a huge input key would leave no room for the letter
        value = fit_letter(letter.letter, room - len(key or b""))
        self._log_dead_letter(letter)
        if self._refusal(dlq, key, value, headers) is not None:
            self._on_unwritable("dlq")
            log.error("dead_letter_dropped", reason=letter.reason, **_position(letter))
            return 0
        self._sink.produce(dlq, key, value, headers)
        return len(value) + len(key or b"")

    def _invalid_timestamp(self, outcome: Enriched, tally: Tally) -> None:
        """Count a call whose own ``timestamp`` is there but unusable (its event time fell
        back to ``receivedAt`` or the record's time); log one in ``_LOG_EVERY`` seconds,
        with the library that sent it: a library version that writes its times wrong
        (analytics-swift once wrote ``45.123:Z``) moves its calls to their delivery time."""
        tally.invalid_timestamps += 1
        if (suppressed := self._log_due(_INVALID_TIMESTAMP)) is None:
            return
        call = outcome.call
        context = call.get("context")
        library = context.get("library") if isinstance(context, dict) else None
        named = [library.get(k) for k in ("name", "version")] if isinstance(library, dict) else []
        source = call["enrichment"]["source"]
        log.warning(
            "invalid_timestamp",
            shape=_time_shape(outcome.invalid_timestamp),
            library=" ".join(_package_text(v) for v in named if v is not None) or None,
            event_time=call["timestamp"],
            suppressed=suppressed,
            **{k: v for k, v in source.items() if v is not None},
        )

    def _log_dead_letter(self, letter: DeadLetter) -> None:
        """Log a dead letter (never its value), at most one line per reason per interval."""
        if (suppressed := self._log_due(letter.reason)) is not None:
            log.warning(
                "dead_letter",
                reason=letter.reason,
                message=letter.letter["message"],
                suppressed=suppressed,
                **_position(letter),
            )

    def _log_due(self, key: str) -> int | None:
        """Whether a line about ``key`` is due (one every ``_LOG_EVERY`` seconds at most):
        the lines left out since the last one, or None when it is not due."""
        now = self._clock.monotonic()
        last, suppressed = self._logged.get(key, (-_LOG_EVERY, 0))
        if now - last < _LOG_EVERY:
            self._logged[key] = (last, suppressed + 1)
            return None
        self._logged[key] = (now, 0)
        return suppressed

    def _refusal(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> str | None:
        """Why this output must not be produced (a dead-letter reason), or ``None``."""
        if not self._limits.fits(topic, key, value, headers):
            return "output_too_large"
        if self._refused and self._identity(topic, key, value) in self._refused:
            return "output_refused"
        return None

    def _identity(self, topic: str, key: bytes | None, value: bytes | None) -> tuple[Any, ...]:
        """What stays the same when a batch is replayed: a changelog record's key, else
        where its call came from (an enriched call's, or a dead letter's, ``source``)."""
        if self._route_of.get(topic) in ("state", "members", "dedupe"):
            return (topic, key)
        try:
            document = codec.decode(value or b"")
            source: Mapping[str, Any] = (document.get("enrichment") or document)["source"]
            return (
                topic,
                source["topic"],
                source["partition"],
                source.get("offset"),
                source.get("index"),
            )
        except (codec.DecodeError, AttributeError, KeyError, TypeError):
            return (topic, key, value)


def _time_shape(value: Any) -> str:
    """What an unusable timestamp looks like, not what it says (a sender may put anything
    there): of its first 64 characters, ASCII digits as 9, other digits as #, letters
    but T and Z as a, time punctuation as it is, anything else as ?; of a number its JSON
    text so, of another type only its name."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return f"(a JSON {json_type(value)})"
    text = value if isinstance(value, str) else codec.encode(value).decode()
    return "".join(_shape(c) for c in text[:_SHOWN])


def _shape(c: str) -> str:
    if "0" <= c <= "9":
        return "9"
    if c in "TtZz:+-., /":
        return c
    return "#" if c.isdigit() else "a" if c.isalpha() else "?"


def _package_text(value: Any) -> str:
    """A library's name or version as a log line shows it: as it is when it is one
    (``@segment/analytics-node``, ``1.2.3-beta``), else not at all."""
    if isinstance(value, str) and _PACKAGE.fullmatch(value):
        return value
    return "(not shown)"


def _position(letter: DeadLetter) -> dict[str, Any]:
    """Where a dead letter's call came from, for a log line: never its key (an id); its
    record's timestamp as ``record_timestamp`` (``timestamp`` is the line's own time)."""
    position = {k: v for k, v in letter.letter["source"].items() if k not in _NOT_LOGGED}
    position["record_timestamp"] = letter.letter["source"].get("timestamp")
    return position
