"""The one error tree of group-worker.

::

    WorkerError
    ├── ConfigError          bad configuration: fatal at start, one line naming the key
    ├── TopicError           topic layout wrong (missing and not creatable, mismatched
    │                        partition counts): fatal at start
    ├── StoreError           the local state store cannot be used (its directory is
    │                        another process's, a disk error): fatal; a restart replays
    │                        the changelogs
    │   └── StoreCorrupt     RocksDB failed a read or write of a partition's files
    │                        (corruption, an I/O error): the partition is rebuilt from
    │                        its changelogs
    └── KafkaError           a Kafka failure, translated from confluent-kafka in one place
        ├── RetriableError   transient (broker away, timeouts): retried with backoff,
        │                    nothing committed meanwhile
        ├── ProducerHungError  a transactional call hung or timed out (after a broker
        │                    restart): the sink takes a new producer, the consumer stays
        ├── AbortableError   the open transaction must be aborted: the worker aborts it
        │                    and rewinds to the committed offsets
        └── FatalError       cannot continue (refused login or ACL, undeliverable
            │                output): the process exits non-zero so the orchestrator
            │                restarts it
            └── FatalClientError   a client's own fatal error (a producer fenced when its
                                   transaction outlived its timeout while the process
                                   was paused): new clients can go on, so the loop is
                                   rebuilt

An *invalid event* is not an exception: it becomes a dead letter (``events.DeadLetter``),
is committed like any other outcome, and is never retried.
"""

from __future__ import annotations

__all__ = [
    "AbortableError",
    "ConfigError",
    "FatalClientError",
    "FatalError",
    "KafkaError",
    "ProducerHungError",
    "RetriableError",
    "StoreCorrupt",
    "StoreError",
    "TopicError",
    "WorkerError",
]


class WorkerError(Exception):
    """Base of every error group-worker raises on purpose."""


class ConfigError(WorkerError):
    """The configuration is invalid; the message names the key."""


class TopicError(WorkerError):
    """The topics cannot be used as configured."""


class StoreError(WorkerError):
    """The local state store cannot be opened, read or written."""


class StoreCorrupt(StoreError):
    """RocksDB failed a read or write of these partitions' files (corruption, an I/O
    error): their copies cannot be trusted, and are rebuilt from the changelogs."""

    def __init__(self, partitions: tuple[int, ...], message: str) -> None:
        super().__init__(message)
        self.partitions = partitions


class KafkaError(WorkerError):
    """A Kafka operation failed."""


class RetriableError(KafkaError):
    """A transient Kafka failure; the operation may succeed if retried."""


class ProducerHungError(KafkaError):
    """A transactional call hung past its timeout, or timed out: whether the transaction
    committed is unknown until a new producer with the same transactional.id ends it."""


class AbortableError(KafkaError):
    """The open transaction cannot commit; abort it and replay from committed offsets."""


class FatalError(KafkaError):
    """A Kafka failure the worker cannot recover from in-process."""


class FatalClientError(FatalError):
    """A Kafka client's own fatal error: that client can do nothing more, a new one can.

    Mostly a producer whose transaction outlived ``transaction.timeout.ms`` while the
    process was paused (a stop, a long stall): the broker aborted the transaction and
    bumped the producer's epoch, and its next call fails (fenced, or an invalid
    transaction state). Also a producer fenced by another with its ``transactional.id``.
    """
