"""Commands for looking at data: ``send``, ``tail``, ``state`` and ``normalise``.

``send`` and ``tail`` talk to Kafka; ``normalise`` runs the pipeline on a file with no
Kafka at all, so users can check their own data before deploying.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka import KafkaError as ClientError

from worker import codec
from worker.config import Config
from worker.errors import FatalError, TopicError, WorkerError
from worker.events import DeadLetter, Enriched, Record, Skipped
from worker.kafka import (
    Interrupted,
    client_config,
    list_topics,
    produce_all,
    producer_max_bytes,
    translate,
)
from worker.pipeline import Settings, process_record
from worker.restore import KafkaRestorer

__all__ = ["add_commands", "read_calls"]

_UNKNOWN_TOPIC = ClientError.UNKNOWN_TOPIC_OR_PART
# How long a topic may be unknown before a command says there is none (seconds).
_TOPIC_WAIT = 5.0
# How long tail --last may take to find each partition's latest records (seconds).
_LAST_WAIT = 30.0
# The longest line read whole: past it, the rest is the next line (a value that long is
# a too_large dead letter either way).
_MAX_LINE = 64 << 20


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register the data commands on the ``group-worker`` subparsers, each with the
    ``common`` options."""
    send = commands.add_parser(
        "send", help="produce JSON calls to the input topic", parents=[common]
    )
    send.add_argument("file", help="JSON lines, or one JSON array; - for standard input")
    send.add_argument("--topic", type=_not_empty, help="topic to send to (default: topics.input)")
    send.add_argument(
        "--key-field",
        default="userId",
        help="call field used as the record key, falling back to anonymousId (default: userId)",
    )
    send.set_defaults(command=_send)

    tail = commands.add_parser(
        "tail", help="print a topic's records as JSON lines", parents=[common]
    )
    tail.add_argument("topic")
    start = tail.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest record (default: only new records)",
    )
    start.add_argument(
        "--last",
        type=_at_least(1, int),
        metavar="N",
        help="start at each partition's latest N records (transaction markers not counted)",
    )
    tail.add_argument("--max", type=_at_least(1, int), metavar="N", help="stop after N records")
    tail.add_argument(
        "--timeout",
        # 0 stopped before the first poll, printing nothing even with records there.
        type=_at_least(0.1, float),
        metavar="S",
        help="stop after S seconds without a new record (at least 0.1)",
    )
    tail.set_defaults(command=_tail)

    state = commands.add_parser("state", help="print group profiles from the state topic")
    state_commands = state.add_subparsers(required=True, metavar="ACTION")
    get = state_commands.add_parser(
        "get", help="print one group's current profile", parents=[common]
    )
    get.add_argument("group_id", help="exit 1 when the state topic has no such group")
    get.set_defaults(command=_state_get)
    dump = state_commands.add_parser(
        "dump", help="print every group's profile as JSON lines", parents=[common]
    )
    dump.set_defaults(command=_state_dump)

    for name in ("normalise", "normalize"):
        normalise = commands.add_parser(
            name,
            help="print what the worker would produce for JSON-lines calls (no Kafka)",
            parents=[common],
        )
        normalise.add_argument("file", nargs="?", default="-", help="JSON lines; - for stdin")
        normalise.add_argument(
            "--summary",
            action="store_true",
            help="print counts by outcome, reason and warning code instead",
        )
        normalise.set_defaults(command=_normalise, uses_kafka=False)


def _not_empty(text: str) -> str:
    """An argparse type: ``text``, refused when empty (an unset variable)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _at_least(low: float, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused below ``low`` with one line naming both."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value

    return parse


def read_calls(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """The raw values in ``f``: each element of one JSON array, else each non-blank line
    (ended by ``\n``, ``\r\n`` or ``\r``), read as they come, each with its number:
    its line's in the file, or its place in the array (1 for the first). ``send`` and
    ``normalise`` read a file alike.

    Lines are kept verbatim, as bytes, even when they are not UTF-8 (so invalid input can
    be sent on purpose to test dead letters). A line is read ``_MAX_LINE`` bytes at most
    at a time: an endless one (``/dev/zero``) never fills the memory.
    """
    chunks = iter(lambda: f.readline(_MAX_LINE), b"")
    number = 0  # of the lines before the chunk at hand
    for first in chunks:
        if first.strip():
            break
        number += len(first.splitlines())
    else:
        return
    if first.lstrip().startswith(b"["):
        data = first + f.read()
        try:
            calls = codec.decode_repaired(data)  # as the worker reads a call
        except codec.DecodeError:
            calls = None
        if isinstance(calls, list):
            yield from ((n + 1, _reencoded(call, n)) for n, call in enumerate(calls))
            return
        chunks = iter([data])
    else:
        chunks = itertools.chain([first], chunks)
    for chunk in chunks:
        for line in chunk.splitlines():
            number += 1
            if line.strip():
                yield number, line


def _reencoded(call: Any, index: int) -> bytes:
    try:
        return codec.encode(call)
    except TypeError:  # nested past what JSON is written to (254 levels)
        raise WorkerError(f"element {index} of the array nests too deeply to send") from None


def _open(path: str) -> BinaryIO:
    """``path`` (``-``: standard input) for reading bytes: input need not be UTF-8.
    Raises ``WorkerError`` naming the file when it cannot be opened."""
    if path == "-":
        if sys.stdin is None:  # closed by the caller (`<&-`)
            raise WorkerError("cannot read standard input: it is closed")
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as e:
        raise WorkerError(f"cannot read {path}: {e.strerror or e}") from None


def _send(config: Config, args: argparse.Namespace) -> int:
    topic = args.topic or config.topics.input
    settings = {"enable.idempotence": True, "partitioner": "murmur2_random"}
    kafka = config.kafka
    producer_config = client_config(kafka.bootstrap_servers, kafka.properties, "producer", settings)
    read = 0

    def records(f: BinaryIO) -> Iterator[tuple[bytes | None, bytes]]:
        nonlocal read
        for _, value in read_calls(f):  # sent as they are read: `send -` may be a stream
            read += 1
            yield _key(value, args.key_field), value

    with _open(args.file) as f:
        producer = Producer(producer_config)
        try:
            _topic(producer, topic, "send")
            delivered, failures = produce_all(
                producer, topic, records(f), max_bytes=producer_max_bytes(producer_config)
            )
        except KeyboardInterrupt as e:  # what got there, so a retry knows what it repeats
            confirmed = e.delivered if isinstance(e, Interrupted) else 0
            print(
                f"group-worker: send: interrupted: {confirmed} of the {read} records read so "
                f"far confirmed delivered to {topic}; the rest may or may not have been",
                file=sys.stderr,
            )
            raise
    if failures:
        raise WorkerError(
            f"send: {read - delivered} of {read} records not sent to {topic}: {failures[0]}"
        )
    print(f"sent {read} records to {topic}", file=sys.stderr)
    return 0


def _key(value: bytes, field: str) -> bytes | None:
    try:
        call = codec.decode(value)
    except codec.DecodeError:
        return None
    if not isinstance(call, dict):
        return None
    for name in (field, "anonymousId"):  # the first that is an ID, as the worker reads one
        key = call.get(name)
        if (isinstance(key, str) and key.strip()) or type(key) is int:
            return str(key).encode()
    return None


def _tail(config: Config, args: argparse.Namespace) -> int:
    settings = {
        "group.id": f"group-worker-tail-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,  # where --last stops counting
        "fetch.wait.max.ms": 100,  # the end event comes a fetch's wait after the end
    }
    consumer = Consumer(
        client_config(config.kafka.bootstrap_servers, config.kafka.properties, "consumer", settings)
    )
    topic = _topic(consumer, args.topic, "tail")
    start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
    seen, last = 0, time.monotonic()
    try:
        partitions = sorted(topic.partitions)
        if args.last is None:
            consumer.assign([TopicPartition(args.topic, p, start) for p in partitions])
        else:
            consumer.assign(_latest(consumer, args.topic, partitions, args.last))
            last = time.monotonic()  # --timeout counts from here
        while args.max is None or seen < args.max:
            if args.timeout is not None and time.monotonic() - last > args.timeout:
                break
            message = consumer.poll(0.2)
            if message is None:
                continue
            if (error := message.error()) is not None:
                if isinstance(refused := translate(error), FatalError):  # an ACL: say so
                    what = f"topic {args.topic}"
                    if error.code() == ClientError.GROUP_AUTHORIZATION_FAILED:
                        what = f"consumer group {settings['group.id']} (prefix group-worker-tail-)"
                    raise FatalError(f"tail: {what}: {refused}")
                continue
            last = time.monotonic()
            seen += 1
            sys.stdout.buffer.write(codec.encode(_printable(message)) + b"\n")
            sys.stdout.flush()
    finally:
        consumer.close()
    return 0


def _latest(consumer: Consumer, topic: str, partitions: list[int], n: int) -> list[TopicPartition]:
    """Where each partition's latest ``n`` committed records begin. Transaction markers
    and aborted records take offsets too (on a transactional topic the last offset is a
    marker), so the records of each partition's last ``n`` offsets are counted, and of 4
    times as many where they are fewer, until there are ``n`` or its first offset is
    reached. For ``_LAST_WAIT`` seconds at most (the broker away): a partition not
    counted by then starts where its count did."""
    bounds = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions
    }
    deadline = time.monotonic() + _LAST_WAIT
    starts: dict[int, int] = {}
    window = n
    while len(starts) < len(partitions):
        begin = {p: max(low, high - window) for p, (low, high) in bounds.items() if p not in starts}
        found = _offsets(consumer, topic, begin, {p: bounds[p][1] for p in begin}, deadline)
        for p, offsets in found.items():
            if len(offsets) >= n or begin[p] == bounds[p][0] or time.monotonic() > deadline:
                starts[p] = offsets[-n] if len(offsets) >= n else begin[p]
        window *= 4
    return [TopicPartition(topic, p, starts[p]) for p in partitions]


def _offsets(
    consumer: Consumer, topic: str, begin: dict[int, int], end: dict[int, int], deadline: float
) -> dict[int, list[int]]:
    """The offsets of each partition's committed records from ``begin`` up to ``end``
    (records written since are not counted), all partitions read at once: a partition
    is done at its end event (its end, or an open transaction's start) or at a record
    from ``end`` on (the topic is busy), all of them at ``deadline``."""
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in begin.items()])
    found: dict[int, list[int]] = {p: [] for p in begin}
    reading = {p for p in begin if begin[p] < end[p]}
    while reading and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            continue
        partition, offset = message.partition() or 0, message.offset() or 0
        if (error := message.error()) is None and offset < end[partition]:
            found[partition].append(offset)
        elif error is None or error.code() == ClientError._PARTITION_EOF:
            reading.discard(partition)
        elif isinstance(refused := translate(error), FatalError):
            raise FatalError(f"tail: topic {topic}: {refused}")
    return found


def _topic(client: Any, name: str, command: str) -> Any:
    """The metadata of topic ``name``; ``TopicError`` when there is none (for
    ``_TOPIC_WAIT`` seconds: a topic just created may not be known to every broker yet),
    ``WorkerError`` when ``client`` may not see it (an ACL)."""
    deadline = time.monotonic() + _TOPIC_WAIT
    while True:
        topic = list_topics(client, name, timeout=10).topics.get(name)
        missing = topic is None or (
            topic.error is not None and topic.error.code() == _UNKNOWN_TOPIC
        )
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TopicError(f"{command}: no topic {name}")
        time.sleep(0.5)
    # Not authorized: say so. Others pass (a topic just created has no leader yet).
    if topic.error is not None and isinstance(refused := translate(topic.error), FatalError):
        raise WorkerError(f"{command}: topic {name}: {refused}")
    return topic


def _printable(message: Any) -> dict[str, Any]:
    """A record as ``tail`` prints it: its value parsed when it is JSON, else as text
    (``""`` when empty, null when there is none); its headers by name, as text or null,
    a name the record has more than once with the list of its values."""
    value = message.value()
    shown = _text(value)
    if value:
        with contextlib.suppress(codec.DecodeError):
            shown = codec.decode(value)
    headers: dict[str, list[str | None]] = {}
    for name, raw in message.headers() or []:
        headers.setdefault(name, []).append(_text(raw))
    return {
        "partition": message.partition(),
        "offset": message.offset(),
        "key": _text(message.key()),
        "headers": {name: v[0] if len(v) == 1 else v for name, v in headers.items()},
        "value": shown,
    }


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode(errors="replace")


def _profiles(config: Config) -> dict[bytes, bytes]:
    """The newest committed state record per groupId (what compaction will keep)."""
    restorer = KafkaRestorer(
        config.kafka.bootstrap_servers, f"{config.worker.group_id}-cli", config.kafka.properties
    )
    latest: dict[bytes, bytes] = {}
    try:
        for partition in restorer.partitions(config.topics.state):
            for _, key, value, _ in restorer.read(config.topics.state, partition):
                if key is None:
                    continue
                if value is None:
                    latest.pop(key, None)
                else:
                    latest[key] = value
    finally:
        restorer.close()
    return latest


def _state_get(config: Config, args: argparse.Namespace) -> int:
    key = args.group_id.encode()
    profile = _profiles(config).get(key)
    if profile is None:
        group = codec.encode(args.group_id).decode()  # quoted: "" and " " show
        print(f"group-worker: no group {group} in {config.topics.state}", file=sys.stderr)
        return 1
    return 0 if _print_profile(config, key, profile) else 1


def _state_dump(config: Config, _: argparse.Namespace) -> int:
    """Every profile as a JSON line; one that is not JSON (not the worker's: anyone with
    write access can produce to the topic) is named on stderr instead, and exits 1."""
    printed = [_print_profile(config, key, profile) for key, profile in _profiles(config).items()]
    return 0 if all(printed) else 1


def _print_profile(config: Config, key: bytes, profile: bytes) -> bool:
    """Print ``profile`` as a line, if it is JSON (re-encoded when a line break in it
    would make it more than one); else say which group's is not."""
    try:
        document = codec.decode(profile)
    except codec.DecodeError as e:
        group = codec.encode(key.decode(errors="replace")).decode()
        print(
            f"group-worker: group {group} in {config.topics.state}: its latest record is "
            f"not JSON ({codec.decode_error(profile, e)}); not printed",
            file=sys.stderr,
        )
        return False
    if b"\n" in profile or b"\r" in profile:
        profile = codec.encode(document)
    sys.stdout.buffer.write(profile + b"\n")
    return True


def _normalise(config: Config, args: argparse.Namespace) -> int:
    settings = Settings.from_config(config.worker)
    source = "stdin" if args.file == "-" else args.file
    counts: Counter[str] = Counter()
    now_ms = time.time_ns() // 1_000_000
    out = sys.stdout.buffer
    with _open(args.file) as f:
        for number, value in read_calls(f):
            record = Record(source, 0, number, value, timestamp_ms=now_ms)
            for outcome in process_record(record, settings, now_ms):
                counts[f"outcome {outcome.kind}"] += 1
                if isinstance(outcome, Enriched):
                    counts.update(f"warning {code}" for code in outcome.warnings)
                    if outcome.invalid_timestamp is not None:
                        counts["timestamp invalid"] += 1
                    shown = {
                        "topic": config.topics.enriched,
                        "key": outcome.group_id,
                        "value": outcome.call,
                    }
                elif isinstance(outcome, DeadLetter):
                    counts[f"reason {outcome.reason}"] += 1
                    shown = {
                        "topic": config.topics.dlq,
                        "key": outcome.letter["source"]["key"],
                        "value": outcome.letter,
                    }
                elif isinstance(outcome, Skipped):
                    counts[f"skipped {outcome.call_type}"] += 1
                    continue
                else:  # pragma: no cover - the stateless stage never finds duplicates
                    continue
                if not args.summary:
                    out.write(codec.encode(shown) + b"\n")
    if args.summary:
        for name, n in sorted(counts.items()):
            print(f"{name}\t{n}")
    return 0
