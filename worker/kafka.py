"""What every Kafka client shares: base configuration, and error translation.

confluent-kafka reports failures as ``KafkaError`` values (inside ``KafkaException``);
this is the one place they become the worker's error tree (``worker.errors``).

A refusal by the broker (credentials, TLS, an ACL) is a ``FatalError``: retrying cannot
help, so the process ends with one line naming it. librdkafka reports refused logins and
TLS handshakes only to the client's ``error_cb`` and keeps reconnecting; every client gets
a ``RefusalWatch`` as its ``error_cb``, which raises once they persist (confluent-kafka
re-raises it from the ``poll``, ``consume`` or ``flush`` that served the callback).
"""

from __future__ import annotations

import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal, NoReturn

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka import KafkaError as ClientError
from confluent_kafka.admin import AdminClient

from worker.errors import (
    AbortableError,
    ConfigError,
    FatalClientError,
    FatalError,
    KafkaError,
    RetriableError,
)
from worker.limits import PRODUCER_MAX_DEFAULT
from worker.logs import kafka_client_logger

__all__ = [
    "Interrupted",
    "RefusalWatch",
    "check_properties",
    "client_config",
    "list_topics",
    "produce_all",
    "producer_max_bytes",
    "raise_for",
    "release_frames",
    "translate",
]

# Prefixes that scope a librdkafka property to one client kind.
_SCOPES = ("consumer.", "producer.", "admin.")
# The broker refused this client's login or TLS handshake.
_CONNECTION_REFUSED = frozenset(
    {ClientError._AUTHENTICATION, ClientError.SASL_AUTHENTICATION_FAILED, ClientError._SSL}
)
# The broker refused an operation for want of an ACL.
_NOT_AUTHORIZED = frozenset(
    {
        ClientError.TOPIC_AUTHORIZATION_FAILED,
        ClientError.GROUP_AUTHORIZATION_FAILED,
        ClientError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ClientError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
# message.max.bytes as the worker reads it (``producer_max_bytes``).
_DECIMAL = re.compile(r"[1-9][0-9]{0,9}").fullmatch
# A refused login is fatal once refusals have gone on this long (seconds): a broker that
# is starting may refuse briefly. Refusals further apart than the reset start afresh.
_REFUSAL_GRACE = 5.0
_REFUSAL_RESET = 60.0
# Slices of a metadata wait, between which the client is polled (see list_topics).
_METADATA_SLICE = 0.5
# produce_all serves delivery reports at least this often (seconds) while records come.
_POLL_EVERY = 0.5


def client_config(
    bootstrap_servers: str,
    properties: Mapping[str, str],
    role: Literal["consumer", "producer", "admin"],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka configuration for one client of kind ``role``.

    In order, later winning: the servers and every unscoped property (SASL, SSL...),
    the client's own ``settings``, then the properties scoped to ``role``
    (``consumer.fetch.max.bytes``), which a user sets on purpose for that client.
    librdkafka's own log lines go to ``logs.kafka_client_logger`` (JSON, not raw lines
    on standard error); confluent-kafka delivers them when the client is polled.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "logger": kafka_client_logger(),
        "error_cb": RefusalWatch(),
    }
    config.update({k: v for k, v in properties.items() if not k.startswith(_SCOPES)})
    config.update(settings or {})
    scope = f"{role}."
    config.update({k.removeprefix(scope): v for k, v in properties.items() if k.startswith(scope)})
    return config


def check_properties(bootstrap_servers: str, properties: Mapping[str, str]) -> None:
    """Raise ``ConfigError`` when librdkafka refuses ``properties`` for one of the
    worker's clients: an unknown property, a value it does not take, key material that
    does not parse. Builds each kind of client once, and closes it; connects to nothing
    on purpose, but the clients may start to."""
    kinds: tuple[tuple[Literal["consumer", "producer", "admin"], Any], ...] = (
        ("admin", AdminClient),
        ("producer", Producer),
        ("consumer", Consumer),
    )
    for role, kind in kinds:
        settings: dict[str, Any] = {"log_level": 0}  # its connection attempts are no news
        if role == "consumer":
            settings["group.id"] = "group-worker-check"
        if role == "producer":  # as the worker's are: acks=0 is refused here, not at run
            settings["enable.idempotence"] = True
        config = client_config(bootstrap_servers, properties, role, settings)
        if role == "producer":  # read by the worker only once the brokers answer
            producer_max_bytes(config)
        try:
            client = kind(config)
        except KafkaException as e:
            error = " ".join(e.args[0].str().split())  # one line: librdkafka's may be two
            raise ConfigError(f"config: kafka: {error} (librdkafka, for the {role})") from None
        if role == "consumer":
            client.close()


def producer_max_bytes(config: Mapping[str, Any]) -> int:
    """The largest record a producer with ``config`` (``client_config``) accepts itself:
    its ``message.max.bytes``. Raises ``ConfigError`` unless that is a plain decimal
    integer: librdkafka reads "01000000" as octal and "0x100000" as hexadecimal, so the
    worker would bound records by another number than its producer."""
    value = str(config.get("message.max.bytes", PRODUCER_MAX_DEFAULT)).strip()
    if not _DECIMAL(value):
        raise ConfigError(
            f"config: kafka.message.max.bytes must be a decimal integer, got {value[:40]!r}"
        )
    return int(value)


class RefusalWatch:
    """A client's ``error_cb``: raises ``FatalError`` when the broker keeps refusing its
    login or TLS handshake for ``grace`` seconds.

    Runs on the thread that polls the client. Other errors are left to the client's own
    log lines and to the calls that fail.
    """

    def __init__(
        self,
        grace: float = _REFUSAL_GRACE,
        reset: float = _REFUSAL_RESET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grace, self._reset, self._clock = grace, reset, clock
        self._first: float | None = None
        self._last = 0.0

    def __call__(self, error: ClientError) -> None:
        if error.code() not in _CONNECTION_REFUSED:
            return
        now = self._clock()
        if self._first is None or now - self._last > self._reset:
            self._first = now
        self._last = now
        if now - self._first >= self._grace:
            raise translate(error)


def release_frames(error: BaseException) -> None:
    """Drop the local variables of the frames ``error`` and the errors it chains went
    through (but those still running), so that the clients they held go now.

    confluent-kafka (2.16) keeps a reference to an exception raised in a client's
    callback (a ``RefusalWatch``, a rebalance or delivery callback) for good. Its
    traceback then keeps every frame it passed through alive, and the clients in them
    with librdkafka's threads: a replaced producer would go on with its transactional
    id, and a command that ended on a refused login crashed at exit (SIGSEGV) about
    once in 80 runs, while those threads ran on as the process ended.
    """
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


def translate(error: ClientError | Any) -> KafkaError:
    """The worker error for a confluent-kafka ``KafkaError`` (or anything else)."""
    if not isinstance(error, ClientError):
        return KafkaError(str(error))
    text = f"{error.name()}: {error.str()}"
    if error.code() in _CONNECTION_REFUSED:
        what = "TLS handshake" if error.code() == ClientError._SSL else "login (SASL)"
        return FatalError(f"Kafka refused the {what}: {text}")
    if error.code() in _NOT_AUTHORIZED:
        return FatalError(f"not authorized (check the ACLs): {text}")
    # A consumer learns of its own fatal error from a message whose code is _FATAL, not
    # flagged fatal (a static member fenced by a newer one with its group.instance.id):
    # the client is dead all the same, and a new one rejoins.
    if error.fatal() or error.code() == ClientError._FATAL:
        return FatalClientError(text)
    if error.txn_requires_abort():
        return AbortableError(text)
    if error.retriable() or error.code() in (
        ClientError._TIMED_OUT,
        ClientError._TRANSPORT,
        ClientError._ALL_BROKERS_DOWN,
        ClientError.REQUEST_TIMED_OUT,
        ClientError.NOT_COORDINATOR,
        ClientError.COORDINATOR_NOT_AVAILABLE,
        ClientError.COORDINATOR_LOAD_IN_PROGRESS,
        # Metadata not settled yet: a topic just created, or a broker just restarted.
        ClientError.NOT_LEADER_FOR_PARTITION,
        ClientError.LEADER_NOT_AVAILABLE,
        ClientError.UNKNOWN_TOPIC_OR_PART,
    ):
        return RetriableError(text)
    return KafkaError(text)


def raise_for(error: ClientError | Any) -> NoReturn:
    """Raise the translated error for ``error``."""
    raise translate(error)


def list_topics(client: Any, topic: str | None = None, timeout: float = 30.0) -> Any:
    """``client.list_topics(topic)``, waiting up to ``timeout`` seconds. Blocks.

    A metadata call serves no callbacks, so the wait is cut into slices with the client
    polled between them: a refused login or TLS handshake then ends it with
    ``FatalError`` (``RefusalWatch``) instead of a vague transport error at the timeout.
    Raises ``KafkaException`` as ``list_topics`` does. A consumer must not have
    partitions assigned yet: its poll would take a record.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return client.list_topics(topic, timeout=max(min(left, _METADATA_SLICE), 0.01))
        except KafkaException:
            if left <= _METADATA_SLICE:
                raise
            client.poll(0)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``produce_all``: ``delivered`` records were confirmed by then."""

    def __init__(self, delivered: int) -> None:
        super().__init__(delivered)
        self.delivered = delivered


class HeldInterrupts:
    """Ctrl-C (SIGINT) held while a client call runs Python callbacks, and raised as
    ``KeyboardInterrupt`` once it returns: raised inside a callback, confluent-kafka
    loses it (``SystemError``: a traceback, exit 1). Elsewhere (reading the input) it is
    raised at once. A context manager; it holds nothing on a thread other than the main
    one, which takes no signals, nor when SIGINT is not Python's (ignored: ``nohup``)."""

    def __init__(self) -> None:
        self._holding = self._pending = False
        self._previous: Any = None
        self._main = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )

    def __enter__(self) -> HeldInterrupts:
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *_: object) -> None:
        if self._main:
            signal.signal(signal.SIGINT, self._previous)

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """``method(*args)`` with Ctrl-C held until it returns."""
        self._holding = True
        try:
            return method(*args)
        finally:
            self._holding = False
            if self._pending:
                self._pending = False
                raise KeyboardInterrupt  # the interrupt wins over an error

    def _on_sigint(self, *_: object) -> None:
        if not self._holding:
            raise KeyboardInterrupt
        self._pending = True


def produce_all(
    producer: Producer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    timeout: float = 60.0,
    max_bytes: int = PRODUCER_MAX_DEFAULT,
) -> tuple[int, list[str]]:
    """Produce every ``(key, value)`` to ``topic`` and wait for them all to be delivered.
    Call from the main thread (it takes Ctrl-C: ``HeldInterrupts``).

    Blocks, serving deliveries, while the local queue is full, then flushes for up to
    ``timeout`` seconds. Returns how many were delivered and one line per failure,
    naming the record by its position (from 1): a record the producer refuses outright
    (e.g. larger than ``max_bytes``, the producer's ``message.max.bytes``), which does
    not stop the others, or one whose delivery failed; records still queued at the
    timeout make one line together. Raises ``FatalError`` at the first delivery refused
    for want of an ACL (every other record would be), and ``Interrupted`` on Ctrl-C.
    """
    errors: list[str] = []
    delivered = 0

    def on_delivery(index: int, error: ClientError | None, _: object) -> None:
        nonlocal delivered
        if error is None:
            delivered += 1
        elif error.code() in _NOT_AUTHORIZED:  # a stream's input may never end: say it now
            raise FatalError(f"topic {topic}: {translate(error)}")
        else:
            errors.append(f"record {index}: {error.str()}")

    with HeldInterrupts() as held:
        try:
            polled = time.monotonic()
            for index, (key, value) in enumerate(records, start=1):
                try:
                    held.call(_produce, producer, topic, key, value, partial(on_delivery, index))
                except KafkaException as e:
                    errors.append(f"record {index}: {_refusal(e.args[0], value, max_bytes)}")
                if index % 1000 == 0 or time.monotonic() - polled > _POLL_EVERY:
                    held.call(producer.poll, 0)
                    polled = time.monotonic()
            # Flushed in slices: a refusal raised by the error_cb (RefusalWatch) surfaces
            # only when a flush call returns.
            deadline = time.monotonic() + timeout
            remaining = len(producer)
            while remaining and time.monotonic() < deadline:
                left = max(deadline - time.monotonic(), 0.0)
                remaining = held.call(producer.flush, min(1.0, left))
        except KeyboardInterrupt:
            held.call(producer.poll, 0)  # the delivery reports already in
            raise Interrupted(delivered) from None
    if remaining:
        errors.append(f"{remaining} records still undelivered after {timeout:.0f}s")
    return delivered, errors


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Callable[[ClientError | None, object], None],
) -> None:
    """Queue one record, serving deliveries while the queue is full; raises
    ``KafkaException`` when the producer refuses the record itself."""
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:  # the queue is full: let deliveries drain it
            producer.poll(0.05)


def _refusal(error: ClientError, value: bytes | None, max_bytes: int) -> str:
    if error.code() == ClientError.MSG_SIZE_TOO_LARGE:
        return (
            f"{error.str()} ({len(value or b'')} bytes; "
            f"the producer's limit is message.max.bytes={max_bytes})"
        )
    return error.str()
