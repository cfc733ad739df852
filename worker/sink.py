"""The output edge: a Kafka producer behind the ``Sink`` protocol.

With ``exactly_once`` every output and the input offsets of a commit go into one
transaction; with ``at_least_once`` the offsets are committed through the source only
after every output is delivered.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException, Message, Producer

from worker.clock import Clock
from worker.config import ProcessingGuarantee
from worker.errors import (
    AbortableError,
    FatalError,
    KafkaError,
    ProducerHungError,
    RetriableError,
)
from worker.kafka import client_config, raise_for, translate
from worker.source import NO_CUTS, Cuts, Offsets, Source, topic_partitions

__all__ = ["Headers", "KafkaSink", "Refusal", "Sink"]

Headers = Sequence[tuple[str, bytes]]
# Waits between retries of a transactional operation (each also waits up to its timeout).
_RETRY_BACKOFF = (0.1, 0.5, 1.0, 2.0, 4.0)

# How long past its own timeout a transactional call may block before it is abandoned.
_DEADLINE_MARGIN = 5.0

log = structlog.get_logger("worker.sink")


def _nothing() -> None:
    pass


# Errors that refuse one record for good: producing it again can only fail again.
_TOO_LARGE = frozenset(
    {
        ClientError.MSG_SIZE_TOO_LARGE,  # the broker's, and the producer's own check
        ClientError.RECORD_LIST_TOO_LARGE,
    }
)
_REFUSED = _TOO_LARGE | {
    ClientError.INVALID_RECORD,
    ClientError.INVALID_MSG,  # CORRUPT_MESSAGE
    ClientError.INVALID_MSG_SIZE,
    ClientError.INVALID_TIMESTAMP,
    ClientError.POLICY_VIOLATION,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A record the broker or the producer refused for good; its batch must be aborted."""

    topic: str
    key: bytes | None
    value: bytes | None
    size: int  # key and value, in bytes
    error: str
    too_large: bool


class Sink(Protocol):
    """Where outputs go, and how a batch of them is committed with its input offsets."""

    def begin(self) -> None: ...
    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None: ...
    def commit(
        self,
        offsets: Offsets,
        source: Source,
        last_records: Callable[[], None] = ...,
        meanwhile: Callable[[], None] = ...,
        cuts: Cuts = ...,
    ) -> Offsets: ...
    def abort(self) -> None: ...
    def renew(self) -> None: ...
    def poll(self) -> None: ...
    def backlog(self) -> int: ...
    def take_refused(self) -> list[Refusal]: ...
    def close(self) -> None: ...


class KafkaSink:
    """A ``Sink`` over ``confluent_kafka.Producer``: idempotent, optionally transactional."""

    def __init__(
        self,
        bootstrap_servers: str,
        properties: Mapping[str, str],
        guarantee: ProcessingGuarantee,
        transactional_id: str,
        clock: Clock,
        *,
        commit_timeout: float = 10.0,
        on_delivery_error: Callable[[], None] | None = None,
        batch_bytes: int = 1_000_000,
    ) -> None:
        settings: dict[str, Any] = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # A batch larger than a topic's max.message.bytes is refused whole.
            "batch.size": batch_bytes,
            "compression.type": "lz4",
            # The Java client's default partitioner, so other tools agree on placement.
            "partitioner": "murmur2_random",
            # Bounded queue: the runner pauses consumption long before it fills.
            "queue.buffering.max.kbytes": 262_144,
        }
        if guarantee == "exactly_once":
            settings["transactional.id"] = transactional_id
            # A killed worker's open transaction blocks read_committed readers until it
            # times out: keep that short, as Kafka Streams does.
            settings["transaction.timeout.ms"] = 10_000
        self._config = client_config(bootstrap_servers, properties, "producer", settings)
        self._transactional = guarantee == "exactly_once"
        self._clock = clock
        self._commit_timeout = commit_timeout
        self._on_delivery_error = on_delivery_error
        # Producers given up on (``renew``), each maybe still inside a call on its thread.
        self._abandoned: list[tuple[Producer, _Caller]] = []
        self._generation = 0
        self._start()

    def _start(self) -> None:
        """Start a producer, with the sink's state afresh. Raises ``KafkaError`` when
        its ``init_transactions`` fails (the broker away), leaving the sink as it was."""
        producer = Producer(self._config)
        if self._transactional:
            try:
                producer.init_transactions(self._commit_timeout)
            except KafkaException as e:
                error = translate(e.args[0])
                if e.args[0].code() == ClientError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
                    transactional_id = self._config["transactional.id"]
                    error = FatalError(
                        f"transactional id {transactional_id} (needs Write, Describe): {error}"
                    )
                # Destroyed now, not when a collection finds the exception's cycle: alive,
                # it goes on asking for the transactional id, and once the broker is back
                # fences the producer the service built after it.
                del producer
                raise error from None
        self._producer = producer
        # Reports of an abandoned producer's records (its hung call may still serve
        # them) name an older generation, and are ignored.
        self._generation += 1
        self._report = functools.partial(self._delivered, self._generation)
        self._in_transaction = False
        # Whether every record gets a delivery report (``produce``): at least once,
        # always; exactly once, in the first transaction and from an abort until the
        # next commit (a producer rebuilt after a failure learns what failed it).
        self._careful = True
        self._failed: list[str] = []
        # Per topic partition, the offset after the last record delivered since the
        # last commit or abort: where the outputs of the batch being committed end.
        self._reached: dict[tuple[str, int], int] = {}
        self._refused: list[Refusal] = []
        # A delivery the broker refused for want of an ACL: fatal at the next commit.
        self._denied: FatalError | None = None
        self._caller = _Caller()
        # Set once a transactional call hung or timed out: every later one fails at
        # once, for the caller's thread is still held, or the producer is stuck
        # (``_retry``), until ``renew``.
        self._hung: ProducerHungError | None = None

    def renew(self) -> None:
        """Give up on a producer that hung (``ProducerHungError``) for a new one with the
        same transactional.id: its ``init_transactions`` fences the old one and ends its
        transaction, committed or aborted, before it returns. Outputs not committed are
        dropped. Blocks up to the commit timeout; raises ``KafkaError`` when the new
        producer cannot start (the broker still away), the sink left as it was."""
        old, caller = self._producer, self._caller
        self._start()
        caller.stop()
        # Kept: a producer destroyed while its thread is inside a call of it would crash.
        self._abandoned.append((old, caller))

    def begin(self) -> None:
        """Open a transaction if none is open (no-op at least once).

        Raises ``KafkaError`` when the producer cannot start one (it needs rebuilding).
        """
        if self._transactional and not self._in_transaction:
            try:
                self._producer.begin_transaction()
            except KafkaException as e:
                raise_for(e.args[0])
            self._in_transaction = True

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None:
        """Queue one record; blocks, serving deliveries, while the local queue is full.

        ``timestamp`` (epoch ms) is the record's timestamp; 0 takes the current time.
        ``report``: the caller needs the record's offset (in ``commit``'s result).
        Exactly once, a record gets a delivery report (a Python call each) only when
        asked, or in the producer's first transaction, or in a batch replayed after an
        abort: the transaction's commit vouches for the others, and a record refused
        for good fails it, to be learned from its report (``take_refused``) on the
        replay. At least once, every record gets one: a failed delivery is found by
        its report only.
        """
        on_delivery = self._report if report or self._careful else None
        while True:
            try:
                # Positional: (topic, value, key, partition, callback, on_delivery,
                # timestamp, headers), the callback slot taking ours (on_delivery is its
                # alias, read only when the callback is not passed at all). Keywords
                # cost 0.65 µs more a record (median 1.9 against 1.3 µs), and a call
                # leads to four or five records.
                self._producer.produce(
                    topic,
                    value,
                    key,
                    -1 if partition is None else partition,
                    on_delivery,
                    None,
                    timestamp,
                    list(headers) if headers else None,
                )
                return
            except BufferError:
                # Backpressure: the queue is full, so wait for deliveries to drain it.
                self._producer.poll(0.05)
            except KafkaException as e:
                # The transaction failed under us (e.g. the broker went away), or the
                # producer refused the record itself: replay (after learning of it).
                # Unless the broker refused an ACL: replaying cannot help.
                cause = self._transaction_failure(e.args[0])
                if isinstance(error := translate(cause), FatalError):
                    raise error from None
                self._note_refusal(e.args[0], topic, key, value)
                raise AbortableError(f"produce refused: {e.args[0].str()}") from None

    def commit(
        self,
        offsets: Offsets,
        source: Source,
        last_records: Callable[[], None] = _nothing,
        meanwhile: Callable[[], None] = _nothing,
        cuts: Cuts = NO_CUTS,
    ) -> Offsets:
        """Make every output produced since the last commit durable, with ``offsets``
        (and the ``cuts`` of the records there).

        ``last_records`` produces the batch's last records (the changelog);
        ``meanwhile`` is other work that may run before the commit is known to have
        succeeded (the store's ``prepare``). Steps: (1) exactly once: send the offsets
        to the transaction, running ``last_records`` meanwhile (it is Python work, the
        send a round trip to the broker: about a tenth of the worker's time, waited for
        alone before), then commit the transaction, running ``meanwhile`` as it does
        (about a twentieth, idle before), retrying retriable errors; at least once:
        ``last_records`` and ``meanwhile``, then flush every output and check each was
        delivered; (2) at least once: commit the offsets through the source; (3) serve
        the last delivery reports. Returns, per
        topic partition written to, the offset after the batch's last record there
        (what a changelog reached).
        Raises ``RetriableError`` (nothing committed, try again), ``AbortableError``
        (abort and rewind: an output was not delivered, or retries ran out) or
        ``FatalError`` (the producer was fenced, or the broker refused a topic: an ACL).
        """
        if self._denied is not None:
            raise self._denied
        if self._transactional:
            if not self._in_transaction:
                return {}
            positions = topic_partitions(offsets, cuts)
            if positions:  # (1)
                # Read on this thread: a revoke commits from inside consume(), and the
                # client lets no other thread call the consumer until consume() returns,
                # which waits for this commit (a deadlock until the deadline, and a
                # rebuild, at about one join in three).
                metadata = source.group_metadata()
                self._retry(
                    lambda: self._producer.send_offsets_to_transaction(
                        positions, metadata, self._commit_timeout
                    ),
                    meanwhile=last_records,
                )
            else:
                last_records()
            self._retry(
                lambda: self._producer.commit_transaction(self._commit_timeout),
                meanwhile=meanwhile,
            )
            self._in_transaction = False
            self._careful = False
            self._failed.clear()  # the transaction commit already vouched for delivery
            return self._take_reached()
        last_records()  # (1)
        meanwhile()
        remaining = self._producer.flush(self._commit_timeout)
        if remaining:
            raise RetriableError(
                f"{remaining} outputs still undelivered after {self._commit_timeout:.0f}s"
            )
        failed, self._failed = self._failed, []
        if failed:  # replaying the batch re-sends them: duplicates, never loss
            raise AbortableError(f"{len(failed)} outputs undelivered: {failed[0]}")
        source.commit(offsets, cuts)  # (2)
        return self._take_reached()

    def abort(self) -> None:
        """Abort the open transaction (its outputs are never seen by read_committed readers)."""
        if self._transactional and self._in_transaction:
            try:
                self._retry(lambda: self._producer.abort_transaction(self._commit_timeout))
            except AbortableError as e:  # an abort that cannot abort: rebuild the producer
                raise KafkaError(f"abort failed: {e}") from None
            self._in_transaction = False
            self._careful = True  # the replay learns which record failed the batch
        self._failed.clear()
        self._reached.clear()

    def poll(self) -> None:
        """Serve delivery reports without blocking."""
        self._producer.poll(0)

    def backlog(self) -> int:
        """Outputs queued or in flight, not yet delivered."""
        return len(self._producer)

    def take_refused(self) -> list[Refusal]:
        """The records refused for good since the last call (each failed its batch)."""
        refused, self._refused = self._refused, []
        return refused

    def close(self) -> None:
        """Deliver what is queued, waiting up to the commit timeout."""
        self._caller.stop()
        self._producer.flush(self._commit_timeout)

    def _take_reached(self) -> Offsets:
        # Every record was delivered, but librdkafka may hold reports not yet served.
        self._producer.poll(0)  # (3)
        reached, self._reached = self._reached, {}
        return reached

    def _delivered(self, generation: int, error: ClientError | None, message: Message) -> None:
        if generation != self._generation:
            return
        if error is None:
            position = (message.topic() or "", message.partition() or 0)
            end = (message.offset() or 0) + 1
            if end > self._reached.get(position, 0):
                self._reached[position] = end
        else:
            # Delivery reports run on the thread that polls: no lock needed.
            self._failed.append(f"{message.topic()}: {error.str()}")
            if error.code() == ClientError.TOPIC_AUTHORIZATION_FAILED and self._denied is None:
                self._denied = FatalError(
                    f"topic {message.topic()} (needs Write): {translate(error)}"
                )
            topic = message.topic() or ""
            self._note_refusal(error, topic, message.key(), message.value())
            if self._on_delivery_error is not None:
                self._on_delivery_error()

    def _transaction_failure(self, error: ClientError) -> ClientError:
        """Why the open transaction failed, when ``produce`` says only that its state is
        wrong (``_STATE``): an earlier request of the transaction failed (a topic that
        refused Write, say). In that state librdkafka answers any transactional call with
        the transaction's own error; ``begin_transaction`` is asked, as it changes nothing
        whatever the state (a transaction is open, so it cannot begin another).
        """
        if not (self._in_transaction and error.code() == ClientError._STATE):
            return error
        try:
            self._producer.begin_transaction()
        except KafkaException as e:
            return e.args[0]  # type: ignore[no-any-return]
        return error

    def _note_refusal(
        self,
        error: ClientError,
        topic: str,
        key: bytes | None,
        value: bytes | None,
    ) -> None:
        if error.code() not in _REFUSED:
            return
        size = len(key or b"") + len(value or b"")  # headers: a few bytes, left out
        too_large = error.code() in _TOO_LARGE
        self._refused.append(Refusal(topic, key, value, size, error.str(), too_large))

    def _retry(
        self, operation: Callable[[], None], meanwhile: Callable[[], None] = _nothing
    ) -> None:
        """Run a transactional ``operation``, retrying retriable errors for a while;
        ``meanwhile`` runs on this thread during its first attempt.

        A fatal error (a fenced producer) raises ``FatalError``. When retries run out,
        or the operation fails otherwise, the transaction cannot be trusted to commit:
        ``AbortableError``, so the caller aborts and replays.

        An operation that times out breaks the sink as a hung one does
        (``_with_deadline``): after a broker restart librdkafka can keep a request to
        the transaction coordinator queued for a connection it never makes again
        (librdkafka issue 5511). In broker-restart fault runs no retry after a timeout
        led to a commit (40 times): the retries timed out or hung until the loop was
        rebuilt, or at best an abort went through 25-35 s later, where a new producer
        finds the coordinator at once.
        """
        for backoff in (*_RETRY_BACKOFF, None):
            try:
                self._with_deadline(operation, meanwhile)
                return
            except KafkaException as e:
                error = translate(e.args[0])
                if isinstance(error, FatalError):
                    raise error from None
                if e.args[0].code() == ClientError._TIMED_OUT:
                    self._hung = ProducerHungError(f"a transactional call timed out: {error}")
                    raise self._hung from None
                if not isinstance(error, RetriableError) or backoff is None:
                    raise AbortableError(str(error)) from None
                log.warning("transaction_retrying", error=str(error), backoff=backoff)
                self._clock.sleep(backoff)
            meanwhile = _nothing

    def _with_deadline(self, operation: Callable[[], None], meanwhile: Callable[[], None]) -> None:
        """Run a transactional call, giving up on it shortly after its own timeout, and
        ``meanwhile`` on this thread as it runs (an error of either raises, once the
        call has returned).

        After a broker restart librdkafka can block in ``send_offsets_to_transaction``
        past its timeout, for good (librdkafka issues 5456 and 5511). The call runs on
        the sink's daemon thread (``_Caller``); if it has not returned in time the
        producer is declared broken (``KafkaError``), and every later call fails at once
        (the revoke as the loop closes waited the same again, behind the hung one): the
        service builds a new one, whose ``init_transactions`` fences this one and aborts
        its transaction.
        """
        if self._hung is not None:
            raise self._hung
        deadline = self._commit_timeout + _DEADLINE_MARGIN
        call = self._caller.start(operation)
        try:
            meanwhile()
        except BaseException:
            call.done.wait(deadline)
            raise
        if not call.done.wait(deadline):
            self._hung = ProducerHungError(
                f"a transactional call hung past {self._commit_timeout:.0f}s"
            )
            raise self._hung
        if call.failure is not None:
            raise call.failure


class _Call:
    """A call handed to a ``_Caller``: wait for ``done``, then read ``failure``."""

    __slots__ = ("done", "failure", "operation")

    def __init__(self, operation: Callable[[], None]) -> None:
        self.operation = operation
        self.done = threading.Event()
        self.failure: BaseException | None = None


class _Caller:
    """One daemon thread, started on first use, that runs the calls handed to it in turn.

    Long-lived, so a transactional call costs a hand-over, not a thread start (two per
    commit, about 2% of the worker's loop, mostly waiting for the new thread to be
    scheduled). A call that never returns holds the thread for good: its sink is
    abandoned with it (``_with_deadline``).
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, operation: Callable[[], None]) -> _Call:
        """Hand ``operation`` to the thread; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name="transaction-call", daemon=True
            )
            self._thread.start()
        call = _Call(operation)
        self._calls.put(call)
        return call

    def stop(self) -> None:
        """Let the thread end once the calls handed to it have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call.operation()
            except BaseException as e:  # handed to the waiting thread
                call.failure = e
            finally:
                call.done.set()
