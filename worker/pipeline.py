"""The pure core of a stage: one consumed record in, one outcome per call out.

``process_record`` decodes the record, splits a ``{"batch": [...]}`` envelope, validates
each call, normalises its traits and event time, and returns an ``Enriched``, ``Skipped``
or ``DeadLetter`` for every call. No Kafka, no clock, no globals: the ``normalise``
command runs exactly this code on a file.

Dead-letter reason codes (stable; also sent as the ``reason`` header):

==================== ==========================================================
``invalid_json``     the value is empty, not UTF-8, or not valid JSON
``not_an_object``    the value (or a call in a batch) is not a JSON object
``too_large``        a group call over ``max_event_bytes``, a record over ``max_batch_bytes``,
                     or a batch of more calls than ``_batch_call_limit`` allows
``invalid_batch``    ``batch`` is present but not a list, or a call in a batch is a batch
``missing_type``     no ``type`` string, so the call cannot be routed
``missing_group_id`` no usable ``groupId`` (absent, null, blank, or not a string/number)
``missing_identity`` neither a usable ``userId`` nor ``anonymousId``
``invalid_traits``   ``traits`` present but not an object
``invalid_message_id`` ``messageId`` not a string or number, or over 100 characters
``output_too_large`` the call is valid, but a record it leads to (its enriched call with
                     the group snapshot, a changelog record) is over its topic's limit
``output_refused``   the call is valid, but the broker refused a record it leads to for
                     good (an invalid record): it was dead-lettered on replay
==================== ==========================================================

A dead letter always fits the dead-letter topic: a value too large for it is cut
(``fit_letter``) and marked ``"truncated": true``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from worker import codec
from worker.config import WorkerConfig
from worker.dedupe import arrival_or_now, record_timestamp
from worker.events import DeadLetter, Enriched, Outcome, Position, Skipped, SourceRecord
from worker.limits import ENVELOPE_ROOM, add_warnings
from worker.normalise import normalise_traits
from worker.times import MAX_MS, event_time, format_time, parse_iso_time

__all__ = [
    "KNOWN_CALL_TYPES",
    "MAX_BATCH_CALLS",
    "REASONS",
    "Settings",
    "fit_letter",
    "forward_headers",
    "forwarded_arrival",
    "header",
    "json_type",
    "output_dead_letter",
    "process_forwarded",
    "process_record",
]

REASONS = (
    "invalid_json",
    "not_an_object",
    "too_large",
    "invalid_batch",
    "missing_type",
    "missing_group_id",
    "missing_identity",
    "invalid_traits",
    "invalid_message_id",
    "output_too_large",
    "output_refused",
)
# Skipped calls are counted by type; anything else is "other", to bound label cardinality.
KNOWN_CALL_TYPES = frozenset({"identify", "track", "page", "screen", "alias", "group"})
_MAX_MESSAGE_ID = 100
_EXACT_FLOAT = 2**53
# How deep a re-keyed call may nest: a warning holds a trait's value as sent two levels
# deeper than the call held it (``enrichment.warnings[i].value``).
_FORWARDED_DEPTH: Final = codec.MAX_DEPTH + 2
# Fields of a batch envelope that are not defaults for its calls: its own identity, and
# what a library writes about the request (analytics-java's batch sequence, and the
# sender's write key, which must not spread into every enriched call: early Analytics.NET
# called it secret).
_ENVELOPE_ONLY = frozenset({"batch", "type", "messageId", "sequence", "writeKey", "secret"})
# Envelope objects merged key by key into a call's own (analytics-java and analytics-go
# put the library in the envelope's context and the call's IP in the call's).
_MERGED_OBJECTS = frozenset({"context", "integrations"})
# Fields a delivery may change: left out of a derived messageId, so replays dedupe.
_DELIVERY_FIELDS = frozenset({"messageId", "receivedAt", "sentAt"})
# A re-keyed call carries what stage two needs of its input record in headers: its
# arrival (epoch ms, ASCII digits), and its key, so that a dead letter of stage two is
# keyed like one of stage one; a key over the bound is not carried (a batch envelope
# would repeat it in each of its calls).
_ARRIVAL_HEADER: Final = "arrival"
_INPUT_KEY_HEADER: Final = "input-key"
_MAX_CARRIED_KEY: Final = 1_024
# Most calls one batch envelope may hold (_batch_call_limit); past it the envelope is a
# too_large dead letter whole.
MAX_BATCH_CALLS: Final = 16_384
_ANY_BATCH_CALLS: Final = 2_000  # whatever its size
_MIN_CALL_BYTES: Final = 32  # per call, past those


@dataclass(frozen=True, slots=True)
class Settings:
    """What the pipeline needs from the configuration."""

    max_event_bytes: int = 32_768
    max_batch_bytes: int = 524_288
    phone_region: str | None = None

    @classmethod
    def from_config(cls, worker: WorkerConfig) -> Settings:
        """The pipeline's share of the ``[worker]`` configuration."""
        return cls(
            worker.max_event_bytes, worker.max_batch_bytes, worker.phone_default_region or None
        )


class _Invalid(Exception):
    """Control signal inside this module: the call is a dead letter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def process_record(
    record: SourceRecord, settings: Settings, arrival_ms: int, skip: int = 0
) -> list[Outcome]:
    """Turn one consumed record into the outcomes of the calls it carries.

    ``arrival_ms`` is when the record arrived (``worker.dedupe.arrival_ms``): the event
    time of a call without a usable time of its own. ``skip``: the calls of an envelope
    already done (a commit cut it), whose outcomes are left out; a record that is not
    an envelope of calls has one outcome, never skipped. Pure and total: never raises
    for any record value or timestamp; every call in the record yields exactly one
    outcome, in order.
    """
    source = Position(record.topic() or "", record.partition() or 0, record.offset() or 0)
    raw = _as_bytes(record.value())
    try:
        if not raw:
            raise _Invalid("invalid_json", "the record has an empty value")
        if len(raw) > settings.max_batch_bytes:
            # Not parsed, but carried whole when the dead-letter topic takes it, so the
            # batch can be replayed; the letter is cut to that topic's limit, not this one.
            raise _Invalid(
                "too_large",
                f"the record is {len(raw)} bytes, over the limit of "
                f"{settings.max_batch_bytes} (worker.max_batch_bytes)",
            )
        try:
            document = codec.decode(raw)
        except codec.DecodeError as e:
            try:  # a byte order mark, or half an emoji, is no reason to lose a call or batch
                document = codec.decode_repaired(raw)
            except codec.DecodeError:
                raise _Invalid("invalid_json", codec.decode_error(raw, e)) from None
        if codec.too_deep(document, raw):
            raise _Invalid("invalid_json", f"nested deeper than {codec.MAX_DEPTH} levels")
        if not isinstance(document, dict):
            raise _Invalid("not_an_object", f"the value is a JSON {json_type(document)}")
    except _Invalid as e:
        return [_dead_letter(e, record, source, raw)]

    if not _is_envelope(document):
        return [_process_call(document, record, source, raw, settings, arrival_ms, document)]

    calls = document["batch"]
    if not isinstance(calls, list):
        invalid = _Invalid("invalid_batch", f"batch is a JSON {json_type(calls)}")
        return [_dead_letter(invalid, record, source, raw)]
    if len(calls) > (limit := _batch_call_limit(len(raw))):
        invalid = _Invalid(
            "too_large",
            f"the batch holds {len(calls)} calls, over the limit of {limit} for its "
            f"{len(raw)} bytes ({_ANY_BATCH_CALLS}, or one call per {_MIN_CALL_BYTES} "
            f"bytes, at most {MAX_BATCH_CALLS})",
        )
        return [_dead_letter(invalid, record, source, raw)]
    # Envelope fields (context, sentAt...) apply to every call that lacks them; its own
    # type and messageId are the envelope's, not its calls'.
    defaults = {k: v for k, v in document.items() if k not in _ENVELOPE_ONLY}
    merged = [k for k in _MERGED_OBJECTS & defaults.keys() if isinstance(defaults[k], dict)]
    outcomes: list[Outcome] = []
    for index, sent in enumerate(calls[skip:], skip):
        position = Position(source.topic, source.partition, source.offset, index)
        if isinstance(sent, dict) and _is_envelope(sent):
            # Not split again: its calls would be lost as a skipped "other" call.
            invalid = _Invalid("invalid_batch", "a batch inside a batch")
            outcomes.append(_dead_letter(invalid, record, position, _reencode(sent)))
            continue
        call = _with_defaults(sent, defaults, merged)
        outcomes.append(_process_call(call, record, position, None, settings, arrival_ms, sent))
    return outcomes


def _batch_call_limit(size: int) -> int:
    """The most calls a batch envelope of ``size`` bytes may hold: 2,000, or one per 32
    bytes when that is more, at most 16,384 (the 512 KB default ``max_batch_bytes``
    over 32; a larger limit does not raise it, as a record's outcomes are held at once).
    Libraries batch by bytes (Segment's API takes 500 KB), so a batch of small calls can
    pass 2,000 (analytics-go: 2,500 in 440 KB); no library's call is near 32 bytes,
    while 262,000 calls of ``1``, each a dead letter, fit in 512 KB."""
    return min(MAX_BATCH_CALLS, max(_ANY_BATCH_CALLS, size // _MIN_CALL_BYTES))


def _with_defaults(sent: Any, defaults: dict[str, Any], merged: list[str]) -> Any:
    """A call of an envelope with the envelope's fields it lacks; the envelope's objects
    in ``merged`` fill in the keys the call's own objects lack."""
    if not (isinstance(sent, dict) and defaults):
        return sent
    call = defaults | sent
    for name in merged:
        own = sent.get(name)
        if isinstance(own, dict):
            call[name] = defaults[name] | own
    return call


def _is_envelope(document: dict[str, Any]) -> bool:
    """A ``{"batch": [...]}`` envelope: ``batch`` and no ``type``, or ``type`` ``batch``
    (as analytics-go's batches say)."""
    if "batch" not in document:
        return False
    kind = document.get("type")
    return kind is None or (isinstance(kind, str) and kind.strip().lower() == "batch")


def process_forwarded(record: SourceRecord) -> Enriched | DeadLetter:
    """Read back a call the first stage wrote to the repartition topic.

    The value is an enriched call already validated and normalised, so nothing is done
    twice; a value that is not one (never written by a worker) is a dead letter.
    """
    raw = _as_bytes(record.value())
    try:
        call = codec.decode_writable(raw or b"", _FORWARDED_DEPTH)
        group_id, when = call["groupId"], parse_iso_time(call["timestamp"])
        message_id, traits = call["messageId"], call["traits"]
        user_id = _identifier(call.get("userId"))
        anonymous_id = _identifier(call.get("anonymousId"))
        if not (
            isinstance(group_id, str)
            and when is not None
            and (user_id or anonymous_id)
            and isinstance(message_id, str)
            and type(traits) is dict
            and (traits.get("address") is None or type(traits["address"]) is dict)
            and _warnings_list(call["enrichment"]["warnings"])  # the merge may add to it
            and _position(call["enrichment"]["source"])  # its dead letter's source
        ):
            raise TypeError
    except (ValueError, TypeError, KeyError, AttributeError):
        invalid = _Invalid("invalid_json", "not a call written by the first stage")
        source = Position(record.topic() or "", record.partition() or 0, record.offset() or 0)
        return _dead_letter(invalid, record, source, raw)
    # Without a group of its own (stage one keeps a sender's), the merge only appends one.
    encoded = raw if raw and raw.endswith(b"}") and "group" not in call else None
    if user_id is not None:
        return Enriched(group_id, call, when, "userId", user_id, (), encoded)
    return Enriched(group_id, call, when, "anonymousId", anonymous_id or "", (), encoded)


def _position(source: Any) -> bool:
    """Whether ``source`` is an enriched call's ``enrichment.source`` as stage one writes it."""
    return (
        type(source) is dict
        and type(source.get("topic")) is str
        and type(source.get("partition")) is int
        and type(source.get("offset")) is int
        and type(source.get("index", 0)) is int
    )


def _warnings_list(warnings: Any) -> bool:
    """Whether ``warnings`` is a list of warnings as stage one writes them."""
    return type(warnings) is list and all(
        type(w) is dict and isinstance(w.get("code"), str) for w in warnings
    )


def _process_call(
    call: Any,
    record: SourceRecord,
    source: Position,
    raw: bytes | None,
    settings: Settings,
    arrival_ms: int,
    sent: Any,
) -> Outcome:
    """One call's outcome. ``raw`` is the record's value when the call is all of it;
    ``sent`` the call as its sender wrote it (before an envelope's fields), which its dead
    letter carries. ``max_event_bytes`` bounds a group call's size (other types are
    skipped at any size): a call from a batch as its sender wrote it, as libraries hold
    it to the limit, and with the envelope's fields it takes within ``ENVELOPE_ROOM``
    more. Neither can one small envelope fan out into many large calls, nor into many
    large dead letters."""
    try:
        if not isinstance(call, dict):
            raise _Invalid("not_an_object", f"the call is a JSON {json_type(call)}")
        call_type = call.get("type")
        if not isinstance(call_type, str) or not call_type.strip():
            raise _Invalid("missing_type", "the call has no type")
        call_type = call_type.strip().lower()
        if call_type != "group":
            return Skipped(call_type if call_type in KNOWN_CALL_TYPES else "other")
        _check_size(call, raw, sent, settings.max_event_bytes)
        return _enrich(call, source, settings, arrival_ms)
    except _Invalid as e:
        return _dead_letter(e, record, source, raw if raw is not None else _reencode(sent))


def _enrich(
    call: dict[str, Any], source: Position, settings: Settings, arrival_ms: int
) -> Enriched:
    group_id = _identifier(call.get("groupId"))
    if group_id is None:
        raise _Invalid("missing_group_id", "the call has no usable groupId")
    user_id = _identifier(call.get("userId"))
    anonymous_id = _identifier(call.get("anonymousId"))
    if user_id is None and anonymous_id is None:
        raise _Invalid("missing_identity", "the call has neither userId nor anonymousId")
    traits = call.get("traits")
    if traits is None:
        traits = {}
    elif not isinstance(traits, dict):
        raise _Invalid("invalid_traits", f"traits is a JSON {json_type(traits)}")
    message_id = call.get("messageId")
    if message_id is None or (isinstance(message_id, str) and not message_id.strip()):
        message_id = _derive_message_id(call)
    elif not isinstance(message_id, str):  # a number becomes a string, like every ID
        message_id = _identifier(message_id) if isinstance(message_id, int | float) else None
    if message_id is None or len(message_id) > _MAX_MESSAGE_ID:
        raise _Invalid(
            "invalid_message_id",
            f"messageId must be a string or number of at most {_MAX_MESSAGE_ID} characters "
            "(a float from 2^53 on is no usable ID)",
        )

    normalised, warnings = normalise_traits(traits, phone_region=settings.phone_region)
    stamp = call.get("timestamp")  # event_time's first choice; reported when unusable
    when = parse_iso_time(stamp)
    if when is not None or stamp is None or (isinstance(stamp, str) and not stamp.strip()):
        stamp = None  # usable, or not there (a blank one is none)
    if when is None:
        when = event_time(call, arrival_ms)
    listed: list[dict[str, Any]] = []
    if warnings:
        new = ({"code": w.code, "trait": w.trait, "value": w.value} for w in warnings)
        add_warnings(listed, new, settings.max_event_bytes)
    enriched = dict(call)
    enriched.update(
        type="group",
        groupId=group_id,
        messageId=message_id,
        traits=normalised,
        timestamp=format_time(when),
        enrichment={
            "warnings": listed,
            "source": source.as_dict(),
        },
    )
    # Identities become strings. One unusable beside the other is kept when a string
    # (blank) or null, and becomes null otherwise (an object, a boolean, a float past
    # 2^53): an identity in the output is a string or null.
    if user_id is not None:
        enriched["userId"] = user_id
    elif not isinstance(call.get("userId", ""), str):
        enriched["userId"] = None
    if anonymous_id is not None:
        enriched["anonymousId"] = anonymous_id
    elif not isinstance(call.get("anonymousId", ""), str):
        enriched["anonymousId"] = None
    codes = tuple(w.code for w in warnings)  # every warning, listed or not
    if user_id is not None:
        return Enriched(group_id, enriched, when, "userId", user_id, codes, invalid_timestamp=stamp)
    member = anonymous_id or ""
    return Enriched(group_id, enriched, when, "anonymousId", member, codes, invalid_timestamp=stamp)


def _check_size(call: dict[str, Any], raw: bytes | None, sent: Any, limit: int) -> None:
    """Raise ``too_large`` for a group call over ``limit`` bytes (``_process_call``)."""
    size = len(raw) if raw is not None else len(codec.encode(call))
    if size <= limit:
        return
    where = room = ""
    if raw is None and size > limit + ENVELOPE_ROOM:
        where, room = " with its batch's fields", f" and {ENVELOPE_ROOM} for those fields"
    elif raw is None:  # the envelope's fields took it over: measured as sent
        size = len(codec.encode(sent))
        if size <= limit:
            return
    raise _Invalid(
        "too_large",
        f"the call is {size} bytes{where}, over the limit of {limit}{room} "
        "(worker.max_event_bytes)",
    )


def output_dead_letter(
    reason: str, message: str, record: SourceRecord, call: Mapping[str, Any]
) -> DeadLetter:
    """The dead letter of a valid call whose output cannot be produced (``reason``).

    ``call`` is its enriched call; the letter carries it without the group snapshot,
    and its ``source`` is where the call entered the worker.
    """
    origin = call["enrichment"]["source"]
    position = Position(origin["topic"], origin["partition"], origin["offset"], origin.get("index"))
    raw = codec.encode({k: v for k, v in call.items() if k != "group"})
    return _dead_letter(_Invalid(reason, message), record, position, raw)


def fit_letter(letter: dict[str, Any], max_bytes: int) -> bytes:
    """``letter`` encoded in at most ``max_bytes`` (when it can be): the longer of its
    ``value`` and its source ``key`` is cut first, then the other, as needed (base64 to
    whole groups of four characters, so it still decodes), and the letter is marked
    ``"truncated": true``. Longer first: a huge key does not empty a small value, which
    is what a replay needs."""
    encoded = codec.encode(letter)
    source = letter["source"]
    fields = [(letter, "value", letter.get("encoding")), (source, "key", source.get("keyEncoding"))]
    fields.sort(key=lambda field: -len(field[0].get(field[1]) or ""))
    for holder, name, encoding in fields:
        while len(encoded) > max_bytes and holder.get(name):
            text: str = holder[name]
            # Cutting n characters saves at least n bytes (more when they were escaped).
            keep = max(len(text) - (len(encoded) - max_bytes) - 16, 0)
            if encoding == "base64":
                keep -= keep % 4
            holder[name] = text[:keep]
            letter["truncated"] = True
            encoded = codec.encode(letter)
    return encoded


def _identifier(value: Any) -> str | None:
    """An ID as a string: numbers are converted; blank, null and other types are missing."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        # Past 2**53 a float is not the number that was written (the JSON parser reads
        # integers beyond 64 bits as floats): two ids would become one.
        return str(int(value)) if abs(value) < _EXACT_FLOAT else None
    if isinstance(value, float):
        return repr(value)
    return None


def _derive_message_id(call: Mapping[str, Any]) -> str:
    content = {k: v for k, v in call.items() if k not in _DELIVERY_FIELDS}
    return "gw-" + hashlib.blake2b(codec.encode_sorted(content), digest_size=16).hexdigest()


def forward_headers(record: SourceRecord, arrival: int) -> list[tuple[str, bytes]]:
    """The headers stage one adds to a call it re-keys: the call's ``arrival``, and the
    input record's key when it has one of at most 1 KiB (a longer one is not carried:
    stage two's letter then has none).

    The re-keyed record itself is stamped when written, not with the arrival: stamped
    with it, a backlog older than the repartition topic's retention could be deleted by
    Kafka before stage two read it.
    """
    headers = [(_ARRIVAL_HEADER, b"%d" % arrival)]
    key = _as_bytes(record.key())
    if key is not None and len(key) <= _MAX_CARRIED_KEY:
        headers.append((_INPUT_KEY_HEADER, key))
    return headers


def forwarded_arrival(record: SourceRecord, now_ms: int) -> int:
    """When a call stage two reads from the repartition topic arrived: the arrival stage
    one carried, else (a record of a version before that header) its own timestamp, as
    ``dedupe.arrival_ms`` reads it."""
    carried = _carried_arrival(record)
    return arrival_or_now(record_timestamp(record) if carried is None else carried, now_ms)


def _carried_arrival(record: SourceRecord) -> int | None:
    arrival = header(record, _ARRIVAL_HEADER)
    if arrival is None or not arrival.isdigit() or len(arrival) > 15:
        return None
    ms = int(arrival)
    return ms if 0 < ms <= MAX_MS else None


def header(record: SourceRecord, name: str) -> bytes | None:
    """The value of ``record``'s first header called ``name``; None without one."""
    headers = record.headers() or ()
    # The client's stubs allow a dict; a consumed message always has a list.
    for header, value in headers.items() if isinstance(headers, dict) else headers:
        if header == name:
            return _as_bytes(value)
    return None


def _input_record(record: SourceRecord, source: Position) -> tuple[bytes | None, int | None]:
    """The key and timestamp of the input record that brought a call: ``record``'s own,
    or for a call stage two read from the repartition topic, what stage one carried."""
    if (record.topic() or "") == source.topic:
        return _as_bytes(record.key()), record_timestamp(record)
    carried = _carried_arrival(record)
    return header(record, _INPUT_KEY_HEADER), carried or record_timestamp(record)


def _as_bytes(data: str | bytes | None) -> bytes | None:
    """A record's key, value or header value as bytes (the client gives str or bytes)."""
    return data.encode() if isinstance(data, str) else data


def _dead_letter(
    error: _Invalid,
    record: SourceRecord,
    source: Position,
    raw: bytes | None,
) -> DeadLetter:
    key_bytes, ms = _input_record(record, source)
    if source.index is not None and key_bytes is not None and len(key_bytes) > _MAX_CARRIED_KEY:
        # Not in each of up to 16,384 letters of one envelope (its record has it).
        key_bytes = None
    origin = source.as_dict()
    origin["key"], key_encoding = _text(key_bytes)
    if key_encoding:
        origin["keyEncoding"] = key_encoding
    origin["timestamp"] = None if ms is None else format_time(ms)
    letter: dict[str, Any] = {"reason": error.reason, "message": str(error), "source": origin}
    letter["value"], encoding = _text(raw)
    if encoding:
        letter["encoding"] = encoding
    return DeadLetter(error.reason, key_bytes, letter)


def _text(data: bytes | None) -> tuple[str | None, str | None]:
    """Bytes as text, or as base64 with its encoding named when they are not UTF-8."""
    if data is None:
        return None, None
    try:
        return data.decode(), None
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _reencode(call: Any) -> bytes | None:
    try:
        return codec.encode(call)
    except TypeError:
        return None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type: object, array, string, number..."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
