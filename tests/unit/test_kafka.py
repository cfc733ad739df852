"""Client configuration and error translation (worker.kafka)."""

from __future__ import annotations

import gc
import os
import signal
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException, Producer

from worker.errors import (
    AbortableError,
    ConfigError,
    FatalClientError,
    FatalError,
    KafkaError,
    RetriableError,
)
from worker.kafka import (
    HeldInterrupts,
    Interrupted,
    RefusalWatch,
    check_properties,
    client_config,
    produce_all,
    producer_max_bytes,
    release_frames,
    translate,
)
from worker.logs import kafka_client_logger

PROPERTIES = {
    "security.protocol": "SASL_SSL",
    "enable.auto.commit": "true",
    "consumer.fetch.max.bytes": "1048576",
    "consumer.isolation.level": "read_uncommitted",
    "producer.linger.ms": "50",
    "admin.request.timeout.ms": "9000",
}


def test_scoped_properties_reach_only_their_client_and_win() -> None:
    """Unscoped properties reach every client; scoped ones only theirs, over its settings."""
    settings = {"isolation.level": "read_committed", "enable.auto.commit": False}
    consumer = client_config("b:9092", PROPERTIES, "consumer", settings)
    assert isinstance(consumer.pop("error_cb"), RefusalWatch)  # a refused login ends it
    assert consumer == {
        "bootstrap.servers": "b:9092",
        "logger": kafka_client_logger(),  # librdkafka's lines become JSON log events
        "security.protocol": "SASL_SSL",
        "enable.auto.commit": False,  # the client's own setting beats an unscoped one
        "isolation.level": "read_uncommitted",  # a scoped one beats the client's
        "fetch.max.bytes": "1048576",
    }
    producer = client_config("b:9092", PROPERTIES, "producer")
    assert producer["linger.ms"] == "50"
    assert "fetch.max.bytes" not in producer
    assert client_config("b:9092", PROPERTIES, "admin")["request.timeout.ms"] == "9000"


def test_errors_translate_by_class() -> None:
    """Fatal, abortable and retriable client errors map onto the worker's error tree."""
    assert isinstance(translate(ClientError(ClientError._FENCED, fatal=True)), FatalClientError)
    fenced = ClientError(ClientError._FATAL, "Fatal error: Broker: Static consumer fenced")
    assert isinstance(translate(fenced), FatalClientError)  # a consumer's, not flagged fatal
    assert isinstance(
        translate(ClientError(ClientError.INVALID_TXN_STATE, fatal=True)), FatalClientError
    )
    assert isinstance(
        translate(ClientError(ClientError._STATE, txn_requires_abort=True)), AbortableError
    )
    assert isinstance(translate(ClientError(ClientError._TRANSPORT)), RetriableError)
    assert isinstance(translate(ClientError(ClientError.NOT_LEADER_FOR_PARTITION)), RetriableError)
    other = translate(ClientError(ClientError.INVALID_CONFIG))
    assert type(other) is KafkaError


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (ClientError._AUTHENTICATION, "Kafka refused the login (SASL)"),
        (ClientError.SASL_AUTHENTICATION_FAILED, "Kafka refused the login (SASL)"),
        (ClientError._SSL, "Kafka refused the TLS handshake"),
        (ClientError.TOPIC_AUTHORIZATION_FAILED, "not authorized (check the ACLs)"),
        (ClientError.GROUP_AUTHORIZATION_FAILED, "not authorized (check the ACLs)"),
        (ClientError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "not authorized (check the ACLs)"),
        (ClientError.CLUSTER_AUTHORIZATION_FAILED, "not authorized (check the ACLs)"),
    ],
)
def test_refusals_are_fatal_even_inside_a_transaction(code: int, says: str) -> None:
    """A refused login, TLS handshake or ACL is fatal, never aborted and retried."""
    error = translate(ClientError(code, txn_requires_abort=True))
    assert type(error) is FatalError
    assert str(error).startswith(says)


def test_a_refused_login_is_fatal_once_it_persists() -> None:
    """The error_cb raises when refusals go on for the grace period, not at the first."""
    now = [0.0]
    watch = RefusalWatch(grace=5.0, reset=60.0, clock=lambda: now[0])
    refused = ClientError(ClientError._AUTHENTICATION, "SASL authentication error")
    watch(refused)
    watch(ClientError(ClientError._TRANSPORT))  # other errors: left to the client
    now[0] = 4.9
    watch(refused)
    now[0] = 70.0  # long after: a new streak
    watch(refused)
    now[0] = 75.0
    with pytest.raises(FatalError, match="refused the login"):
        watch(refused)


class _Client(Producer):  # a subclass: a weak reference can watch it go
    pass


def _fail_in_a_callback(clients: list[weakref.ref[_Client]]) -> None:
    """Poll a producer whose error_cb raises (its broker: a closed port)."""

    def refused(error: ClientError) -> None:
        raise FatalError(error.str())

    client = _Client({"bootstrap.servers": "127.0.0.1:1", "error_cb": refused})
    clients.append(weakref.ref(client))
    for _ in range(100):
        client.poll(0.1)
    raise AssertionError("the error_cb was never served")


def test_a_client_whose_callback_raised_goes_once_its_frames_are_released() -> None:
    """confluent-kafka keeps the exception an error_cb raised: its traceback keeps the
    client's frame, and so the client, alive until the process ends. (The first assert
    fails once a confluent-kafka no longer leaks it: the release is then not needed.)"""
    clients: list[weakref.ref[_Client]] = []
    try:
        _fail_in_a_callback(clients)
    except FatalError as e:
        error = e
    gc.collect()
    assert clients[0]() is not None
    release_frames(error)
    assert clients[0]() is None


class FakeProducer:
    """Refuses values over ``max_bytes`` as librdkafka does; delivers the rest on flush."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending: list[tuple[bytes, Callable[[ClientError | None, Any], None]]] = []
        self.delivered: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
        if len(value) > self.max_bytes:
            raise KafkaException(ClientError(ClientError.MSG_SIZE_TOO_LARGE))
        self.pending.append((value, on_delivery))

    def poll(self, timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.pending)

    def flush(self, timeout: float) -> int:
        for value, on_delivery in self.pending:
            self.delivered.append(value)
            on_delivery(None, value)
        self.pending.clear()
        return 0


def test_a_record_the_producer_refuses_is_reported_and_the_others_are_sent() -> None:
    """A record refused at produce time is named with its size and limit; the rest go."""
    producer = FakeProducer(max_bytes=1_000_000)
    records = [(None, b"a"), (b"k", b"x" * 2_000_123), (None, b"c")]
    delivered, errors = produce_all(cast(Producer, producer), "t", records)
    assert (delivered, producer.delivered) == (2, [b"a", b"c"])
    assert len(errors) == 1
    assert errors[0].startswith("record 2: ")
    assert errors[0].endswith("(2000123 bytes; the producer's limit is message.max.bytes=1000000)")


def test_the_size_limit_named_is_the_one_given() -> None:
    """A producer configured with another message.max.bytes is named with that limit."""
    producer = cast(Producer, FakeProducer(max_bytes=1000))
    _, errors = produce_all(producer, "t", [(None, b"x" * 2000)], max_bytes=1000)
    assert errors == [
        "record 1: Broker: Message size too large "
        "(2000 bytes; the producer's limit is message.max.bytes=1000)"
    ]


@pytest.mark.parametrize("value", ["01000000", "0x100000", "1e6", "1_000_000"])
def test_a_message_max_bytes_librdkafka_could_read_otherwise_is_refused(value: str) -> None:
    """librdkafka reads "01000000" as octal and "0x100000" as hexadecimal: only a plain
    decimal is taken, so the worker bounds records by its producer's own number."""
    assert producer_max_bytes({"message.max.bytes": "1000000"}) == 1_000_000
    with pytest.raises(ConfigError, match=r"kafka\.message\.max\.bytes must be a decimal integer"):
        producer_max_bytes({"message.max.bytes": value})


@pytest.mark.parametrize(
    ("properties", "refused"),
    [
        ({"bogus.prop": "1"}, 'No such configuration property: "bogus.prop" (librdkafka, for the'),
        # What idempotence forbids: it passed the check, and run rebuilt its clients for
        # 80 s before it exited 1, a configuration error read as a Kafka fault.
        ({"producer.acks": "0"}, "`acks` must be set to `all` when `enable.idempotence`"),
        ({"producer.max.in.flight": "10"}, "`max.in.flight` must be set <= 5"),
        # librdkafka's range errors end in a newline: the line stays one.
        ({"producer.linger.ms": "-5"}, "outside allowed range 0..900000 (librdkafka, for the"),
        # Read by the worker once the brokers answered: it waited for them with this.
        ({"message.max.bytes": "01000000"}, "kafka.message.max.bytes must be a decimal"),
    ],
)
def test_properties_librdkafka_refuses_are_a_one_line_config_error(
    properties: dict[str, str], refused: str
) -> None:
    """Properties a worker's client would refuse are refused before any command runs."""
    with pytest.raises(ConfigError) as raised:
        check_properties("127.0.0.1:1", properties)
    assert refused in str(raised.value)
    assert "\n" not in str(raised.value)


def test_properties_librdkafka_takes_pass_the_check() -> None:
    """The check builds the worker's clients, refusing nothing they take."""
    check_properties(
        "127.0.0.1:1", {"producer.linger.ms": "5", "consumer.fetch.max.bytes": "1048576"}
    )


def test_ctrl_c_while_producing_says_how_many_were_delivered() -> None:
    """Interrupted, produce_all raises Interrupted (a KeyboardInterrupt: still exit 130)
    with the records confirmed so far, which ``send`` prints (it said nothing)."""
    producer = Producer({"test.mock.num.brokers": "1"})

    def records() -> Iterator[tuple[bytes | None, bytes | None]]:
        yield b"k", b"1"
        producer.flush(10)  # the first is delivered before the interrupt
        yield b"k", b"2"
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as raised:
        produce_all(producer, "t", records())
    assert isinstance(raised.value, KeyboardInterrupt)
    assert raised.value.delivered == 1


def test_ctrl_c_inside_a_client_call_is_raised_once_it_returns() -> None:
    """A SIGINT while a held call runs (a client's Python callbacks, where confluent-kafka
    loses the KeyboardInterrupt: SystemError, a traceback and exit 1 for `send`) lets the
    call finish, then raises; outside a call it raises at once; the handler is put back."""
    finished = []

    def interrupted_call() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)
        return "done"

    # Python's own handler, as in a terminal (a run in the background ignores SIGINT).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with HeldInterrupts() as held:
            with pytest.raises(KeyboardInterrupt):
                held.call(interrupted_call)
            assert finished == [True]
            assert held.call(lambda: "again") == "again"  # nothing left pending
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """Under ``nohup`` (SIGINT ignored) nothing is installed: the signal stays ignored."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with HeldInterrupts() as held:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert held.call(lambda: "ran") == "ran"
    finally:
        signal.signal(signal.SIGINT, before)
