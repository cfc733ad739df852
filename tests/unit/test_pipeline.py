"""Decoding, validation and enrichment of consumed records (worker.pipeline)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import codec
from worker.events import DeadLetter, Enriched, Outcome, Record, Skipped
from worker.limits import ENVELOPE_ROOM, MAX_WARNINGS
from worker.pipeline import REASONS, Settings, process_record

SETTINGS = Settings()
RECORD_MS = 1_424_730_535_000  # 2015-02-23T22:28:55.000Z


def run(
    value: bytes | None, settings: Settings = SETTINGS, key: bytes | None = b"k"
) -> list[Outcome]:
    return process_record(Record("raw", 3, 42, value, key, RECORD_MS), settings, RECORD_MS)


def call(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": "group", "messageId": "m1", "userId": "u1", "groupId": "g1"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def one(value: bytes | None, settings: Settings = SETTINGS) -> Outcome:
    outcomes = run(value, settings)
    assert len(outcomes) == 1
    return outcomes[0]


def enriched(fields: dict[str, Any]) -> Enriched:
    outcome = one(codec.encode(fields))
    assert isinstance(outcome, Enriched), outcome
    return outcome


def dead(value: bytes | None, settings: Settings = SETTINGS) -> DeadLetter:
    outcome = one(value, settings)
    assert isinstance(outcome, DeadLetter), outcome
    return outcome


SPEC_EXAMPLE = {
    "anonymousId": "507f191e810c19729de860ea",
    "channel": "browser",
    "context": {"ip": "8.8.8.8", "userAgent": "Mozilla/5.0"},
    "integrations": {"All": True, "Mixpanel": False, "Salesforce": False},
    "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
    "receivedAt": "2015-02-23T22:28:55.387Z",
    "sentAt": "2015-02-23T22:28:55.111Z",
    "timestamp": "2015-02-23T22:28:55.111Z",
    "traits": {
        "name": "Initech",
        "industry": "Technology",
        "employees": 329,
        "plan": "enterprise",
        "total billed": 830,
    },
    "type": "group",
    "userId": "97980cfea0067",
    "groupId": "0e8c78ea9d97a7b8185e8632",
    "version": "1.1",
}


def test_spec_example_is_enriched_with_its_fields_kept() -> None:
    """The complete example of the spec passes through with every field kept and a source."""
    out = enriched(SPEC_EXAMPLE)
    assert out.group_id == "0e8c78ea9d97a7b8185e8632"
    for key in (
        "anonymousId",
        "channel",
        "context",
        "integrations",
        "messageId",
        "userId",
        "receivedAt",
        "sentAt",
        "version",
    ):
        assert out.call[key] == SPEC_EXAMPLE[key]
    assert out.call["traits"] == SPEC_EXAMPLE["traits"]
    assert out.call["timestamp"] == "2015-02-23T22:28:55.111Z"
    assert out.call["enrichment"] == {
        "warnings": [],
        "source": {"topic": "raw", "partition": 3, "offset": 42},
    }


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(None, "invalid_json", id="null-value"),
        pytest.param(b"", "invalid_json", id="empty-value"),
        pytest.param(b"{", "invalid_json", id="truncated"),
        pytest.param(b"\xff\xfe{}", "invalid_json", id="not-utf8"),
        pytest.param(b'{"a": NaN}', "invalid_json", id="nan"),
        pytest.param(b"[" * 2000 + b"]" * 2000, "invalid_json", id="too-deep"),
        pytest.param(b"[1, 2]", "not_an_object", id="array"),
        pytest.param(b'"group"', "not_an_object", id="string"),
        pytest.param(b"null", "not_an_object", id="json-null"),
        pytest.param(b'{"batch": {"type": "group"}}', "invalid_batch", id="batch-not-list"),
        pytest.param(codec.encode(call(type=...)), "missing_type", id="no-type"),
        pytest.param(codec.encode(call(type=7)), "missing_type", id="type-not-string"),
        pytest.param(codec.encode(call(groupId=...)), "missing_group_id", id="no-group-id"),
        pytest.param(codec.encode(call(groupId="  ")), "missing_group_id", id="blank-group-id"),
        pytest.param(codec.encode(call(groupId=None)), "missing_group_id", id="null-group-id"),
        pytest.param(codec.encode(call(groupId=True)), "missing_group_id", id="bool-group-id"),
        pytest.param(codec.encode(call(groupId={"id": 1})), "missing_group_id", id="obj-group-id"),
        pytest.param(codec.encode(call(userId=...)), "missing_identity", id="no-identity"),
        pytest.param(
            codec.encode(call(userId=" ", anonymousId="")),
            "missing_identity",
            id="blank-identities",
        ),
        pytest.param(codec.encode(call(traits=[1])), "invalid_traits", id="traits-list"),
        pytest.param(codec.encode(call(traits="x")), "invalid_traits", id="traits-string"),
        pytest.param(
            codec.encode(call(messageId="m" * 101)), "invalid_message_id", id="message-id-too-long"
        ),
        pytest.param(
            codec.encode(call(messageId=["m"])), "invalid_message_id", id="message-id-list"
        ),
        pytest.param(
            codec.encode(call(messageId=True)), "invalid_message_id", id="message-id-bool"
        ),
    ],
)
def test_bad_input_is_a_dead_letter_with_its_reason(value: bytes | None, reason: str) -> None:
    """Each kind of bad input becomes one dead letter with a stable reason code."""
    letter = dead(value)
    assert letter.reason == reason
    assert letter.reason in REASONS
    assert letter.letter["reason"] == reason
    assert letter.letter["message"]
    assert letter.letter["source"] == {
        "topic": "raw",
        "partition": 3,
        "offset": 42,
        "key": "k",
        "timestamp": "2015-02-23T22:28:55.000Z",
    }
    assert letter.key == b"k"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b'{"groupId": "a\xff"}', "byte 0xff at offset 14 (invalid start byte)"),
        (b'{"a": "\xc0\xaf"}', "byte 0xc0 at offset 7 (invalid start byte)"),
        (b'{"a": "\xed\xa0\x80"}', "byte 0xed at offset 7 (invalid continuation byte)"),
        (b'{"a": 1', "unexpected end of data"),
    ],
)
def test_an_invalid_json_letter_says_where(value: bytes, message: str) -> None:
    """Bytes that are not UTF-8 are named, with their offset, in the letter's message."""
    letter = dead(value)
    assert letter.reason == "invalid_json"
    assert message in letter.letter["message"]


def test_dead_letter_keeps_raw_text() -> None:
    """A dead letter carries the raw value as text when it is UTF-8."""
    assert dead(b"not json").letter["value"] == "not json"
    assert "encoding" not in dead(b"not json").letter


def test_dead_letter_keeps_non_utf8_bytes_as_base64() -> None:
    """A value that is not UTF-8 is kept as base64, with its encoding named."""
    letter = dead(b"\xff\x00\x80").letter
    assert letter["encoding"] == "base64"
    assert base64.b64decode(letter["value"]) == b"\xff\x00\x80"


def test_call_over_the_size_limit_is_too_large() -> None:
    """A single call over max_event_bytes is dead-lettered as too_large."""
    value = codec.encode(call(traits={"description": "x" * 200}))
    letter = dead(value, Settings(max_event_bytes=100))
    assert letter.reason == "too_large"
    assert letter.letter["message"] == (
        f"the call is {len(value)} bytes, over the limit of 100 (worker.max_event_bytes)"
    )
    assert isinstance(one(value, Settings(max_event_bytes=len(value))), Enriched)


def test_record_over_the_batch_limit_is_too_large_and_kept_whole() -> None:
    """A record over max_batch_bytes is too_large without being parsed; its letter carries
    the whole value, so the batch can be replayed (only the dead-letter topic's own limit
    cuts it, when it is produced). Older analytics-java batches run past 512 KB by a call."""
    value = codec.encode(
        {"batch": [call(messageId=str(n), traits={"name": "é" * 40}) for n in range(30)]}
    )
    letter = dead(value, Settings(max_event_bytes=100, max_batch_bytes=1000))
    assert letter.reason == "too_large"
    assert letter.letter["message"] == (
        f"the record is {len(value)} bytes, over the limit of 1000 (worker.max_batch_bytes)"
    )
    assert letter.letter["value"].encode() == value
    assert "truncated" not in letter.letter


@pytest.mark.parametrize("call_type", ["identify", "track", "page", "screen", "alias"])
def test_other_call_types_are_skipped_by_type(call_type: str) -> None:
    """Calls that are not group calls are skipped and named by their type."""
    assert one(codec.encode(call(type=call_type))) == Skipped(call_type)


def test_unknown_call_types_are_skipped_as_other() -> None:
    """An unknown type is skipped as "other", so metric labels stay bounded."""
    assert one(codec.encode(call(type="Custom-Thing"))) == Skipped("other")


def test_type_is_case_insensitive() -> None:
    """`Group` and ` group ` are group calls."""
    assert isinstance(one(codec.encode(call(type=" Group "))), Enriched)


def test_batch_envelope_is_split_into_one_outcome_per_call() -> None:
    """Each call in a batch envelope gets its own outcome, in order, with its index."""
    envelope = {
        "batch": [
            call(messageId="a"),
            call(type="track"),
            "oops",
            call(messageId="b", groupId=None),
        ],
        "context": {"library": {"name": "analytics-python"}},
    }
    outcomes = run(codec.encode(envelope))
    assert [o.kind for o in outcomes] == ["enriched", "skipped", "dead_letter", "dead_letter"]
    first = outcomes[0]
    assert isinstance(first, Enriched)
    assert first.call["enrichment"]["source"]["index"] == 0
    assert first.call["context"] == {"library": {"name": "analytics-python"}}
    third, fourth = outcomes[2], outcomes[3]
    assert isinstance(third, DeadLetter)
    assert third.reason == "not_an_object"
    assert third.letter["value"] == '"oops"'
    assert third.letter["source"]["index"] == 2
    assert isinstance(fourth, DeadLetter)
    assert fourth.reason == "missing_group_id"


@pytest.mark.parametrize("kind", [..., "batch", " Batch "])
def test_a_batch_inside_a_batch_is_an_invalid_batch_letter(kind: Any) -> None:
    """An envelope inside an envelope is dead-lettered whole, its calls kept in the letter."""
    inner = {"batch": [call(messageId="a"), call(messageId="b")], "type": kind}
    inner = {k: v for k, v in inner.items() if v is not ...}
    outcomes = run(codec.encode({"batch": [call(messageId="c"), inner], "sentAt": "x"}))
    assert [o.kind for o in outcomes] == ["enriched", "dead_letter"]
    letter = outcomes[1]
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, letter.letter["message"]) == ("invalid_batch", "a batch inside a batch")
    assert letter.letter["source"]["index"] == 1
    assert codec.decode(letter.letter["value"]) == inner


def test_envelope_context_and_integrations_fill_in_the_calls_own() -> None:
    """The envelope's context and integrations (analytics-java puts the library there) add
    the keys a call's own objects lack, the call's winning; other fields only fill in
    absent ones, and a call's field that is not an object is kept as sent."""
    envelope = {
        "batch": [
            call(context={"ip": "1.2.3.4", "locale": "fr"}, integrations={"Mixpanel": False}),
            call(context=None, sentAt="2020-01-01T00:00:00Z"),
        ],
        "context": {"library": {"name": "analytics-java"}, "locale": "en"},
        "integrations": {"All": True},
        "sentAt": "2021-01-01T00:00:00Z",
    }
    first, second = run(codec.encode(envelope))
    assert isinstance(first, Enriched)
    assert isinstance(second, Enriched)
    assert first.call["context"] == {
        "library": {"name": "analytics-java"},
        "locale": "fr",
        "ip": "1.2.3.4",
    }
    assert first.call["integrations"] == {"All": True, "Mixpanel": False}
    assert first.call["sentAt"] == "2021-01-01T00:00:00Z"
    assert second.call["context"] is None
    assert second.call["integrations"] == {"All": True}
    assert second.call["sentAt"] == "2020-01-01T00:00:00Z"


def test_empty_batch_has_no_outcomes() -> None:
    """An empty batch envelope carries no calls, so it has no outcomes."""
    assert run(b'{"batch": []}') == []


def test_call_in_batch_over_the_size_limit_is_too_large() -> None:
    """Each call in an envelope is held to max_event_bytes on its own, and with the
    envelope's fields it takes to ENVELOPE_ROOM more: a small envelope cannot fan out
    into many large calls."""
    small, big = call(messageId="s"), call(messageId="b", traits={"d": "x" * 500})
    envelope = {"batch": [small, big], "context": {"library": {"name": "analytics-node"}}}
    outcomes = run(codec.encode(envelope), Settings(max_event_bytes=300))
    assert [o.kind for o in outcomes] == ["enriched", "dead_letter"]
    envelope["context"] = {"blob": "x" * 2 * ENVELOPE_ROOM}  # its own calls are small
    outcomes = run(codec.encode(envelope), Settings(max_event_bytes=300))
    assert [o.kind for o in outcomes] == ["dead_letter", "dead_letter"]
    assert all(isinstance(o, DeadLetter) and o.reason == "too_large" for o in outcomes)
    assert isinstance(outcomes[0], DeadLetter)
    assert "with its batch's fields" in outcomes[0].letter["message"]


def test_call_at_the_size_limit_as_sent_is_not_too_large_with_its_envelopes_fields() -> None:
    """Libraries hold each call to the limit as they send it, then wrap the batch in
    fields of its own (analytics-java: sentAt, context.library): a call of exactly
    max_event_bytes is enriched with them, and one byte more is too large."""
    base = len(codec.encode(call(messageId="j", traits={"d": ""})))
    limit = base + 1_000
    at_limit = call(messageId="j", traits={"d": "x" * 1_000})
    assert len(codec.encode(at_limit)) == limit
    envelope = {
        "batch": [at_limit, call(messageId="k", traits={"d": "x" * 1_001})],
        "sentAt": "2015-02-23T22:28:55.111Z",
        "context": {"library": {"name": "analytics-java", "version": "3.5.1"}},
    }
    outcomes = run(codec.encode(envelope), Settings(max_event_bytes=limit))
    assert [o.kind for o in outcomes] == ["enriched", "dead_letter"]
    assert isinstance(outcomes[0], Enriched)
    assert outcomes[0].call["context"]["library"]["name"] == "analytics-java"
    letter = outcomes[1]
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "too_large"
    assert letter.letter["message"] == (
        f"the call is {limit + 1} bytes, over the limit of {limit} (worker.max_event_bytes)"
    )


def nested(depth: int) -> Any:
    """An empty list ``depth`` levels deep."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [201, 300, 1_000])
@pytest.mark.parametrize("where", ["traits", "context", "no-message-id", "in-a-batch"])
def test_json_nested_deeper_than_can_be_written_again_is_invalid_json(
    depth: int, where: str
) -> None:
    """A record nested deeper than 200 levels is an invalid_json dead letter with its raw
    bytes: orjson reads 1024 levels but writes 254, so such a call could not be written
    out again (the worker crashed on it, and again after each restart)."""
    document = {
        "traits": call(traits={"a": "DEEP"}),
        "context": call(context={"a": "DEEP"}),
        "no-message-id": call(messageId=..., traits={"a": "DEEP"}),
        "in-a-batch": {"batch": [call(), call(messageId="m2", traits={"a": "DEEP"})]},
    }[where]
    # Written out by hand: orjson cannot write it.
    raw = codec.encode(document).replace(b'"DEEP"', b"[" * depth + b"]" * depth)
    letter = dead(raw)
    assert letter.reason == "invalid_json"
    assert letter.letter["message"] == "nested deeper than 200 levels"
    assert letter.letter["value"] == raw.decode()


def test_json_nested_200_levels_is_taken_and_written_out() -> None:
    """200 levels deep (the call itself the first) is a call like any other."""
    outcome = enriched(call(traits={"a": nested(198)}))
    assert outcome.call["traits"]["a"] == nested(198)
    codec.encode({**outcome.call, "group": {"traits": outcome.call["traits"]}})


def test_a_batch_of_more_calls_than_the_limit_is_one_too_large_letter() -> None:
    """A batch of more than 2,000 calls and more than one per 32 bytes, or of more than
    MAX_BATCH_CALLS (16,384), is dead-lettered whole, as too_large: 262,000 calls of `1`
    fit in 512 KB, each a dead letter of its own. Libraries batch by bytes, so more
    small calls pass (analytics-go: 2,500 calls in 440 KB)."""
    assert (
        len(run(codec.encode({"batch": [call(messageId=f"m{n}") for n in range(2_000)]}))) == 2_000
    )
    raw = codec.encode({"batch": [1] * 2_001})
    letter = dead(raw)
    assert (letter.reason, letter.letter["value"]) == ("too_large", raw.decode())
    assert letter.letter["message"] == (
        f"the batch holds 2001 calls, over the limit of 2000 for its {len(raw)} bytes "
        "(2000, or one call per 32 bytes, at most 16384)"
    )
    small_calls = [{"type": "group", "userId": "u", "groupId": f"{n}"} for n in range(2_500)]
    outcomes = run(codec.encode({"batch": small_calls}))
    assert [o.kind for o in outcomes] == ["enriched"] * 2_500
    tiny = codec.encode({"batch": [{}] * 20_000})  # 60,011 bytes: 1,875 per 32 bytes
    assert (
        dead(tiny)
        .letter["message"]
        .startswith("the batch holds 20000 calls, over the limit of 2000")
    )
    at_limit = codec.encode({"batch": [{"pad": "x" * 21}] * 10_000})  # 32 bytes a call
    assert len(run(at_limit)) == 10_000
    assert dead(codec.encode({"batch": [{"pad": "x" * 20}] * 10_000})).reason == "too_large"
    # A larger max_batch_bytes does not raise the most calls past 16,384.
    wide = Settings(max_batch_bytes=2 << 20)
    assert len(run(codec.encode({"batch": [{}] * 16_384, "pad": "x" * 600_000}), wide)) == 16_384
    over = dead(codec.encode({"batch": [{}] * 16_385, "pad": "x" * 600_000}), wide)
    assert over.letter["message"].startswith("the batch holds 16385 calls, over the limit of 16384")


def test_dead_letters_of_batch_calls_carry_the_call_as_sent() -> None:
    """A batch call's dead letter holds the call as its sender wrote it, not with the
    envelope's fields: one envelope with a large context and thousands of bad calls made
    as many letters of its context's size (gigabytes from one record)."""
    bad: dict[str, Any] = {}
    small = call(messageId="s")
    envelope = {"batch": [bad, small, bad], "context": {"pad": "x" * 5_000}}
    outcomes = run(codec.encode(envelope), Settings(max_event_bytes=1_000))
    letters = [o for o in outcomes if isinstance(o, DeadLetter)]
    assert [(o.reason, o.letter["source"]["index"]) for o in letters] == [
        ("missing_type", 0),
        ("too_large", 1),
        ("missing_type", 2),
    ]
    assert [codec.decode(o.letter["value"]) for o in letters] == [bad, small, bad]


def test_other_call_types_are_skipped_whatever_their_size() -> None:
    """A track call over max_event_bytes is not a group call: skipped, not dead-lettered."""
    big = call(type="track", properties={"d": "x" * 500})
    settings = Settings(max_event_bytes=300)
    assert one(codec.encode(big), settings) == Skipped("track")
    assert [o.kind for o in run(codec.encode({"batch": [big]}), settings)] == ["skipped"]


def test_envelope_typed_batch_is_split_and_keeps_its_own_id_and_type() -> None:
    """An envelope that says "type": "batch" (analytics-go) is split too, and its type
    and messageId are not defaults for its calls: calls without an id get their own."""
    first, second = call(userId="u1"), call(userId="u2")
    del first["messageId"], second["messageId"]
    for kind in ({"type": "batch"}, {"type": " Batch "}, {}):
        envelope = {
            **kind,
            "messageId": "envelope",
            "writeKey": "key",
            "secret": "key",  # early Analytics.NET
            "sequence": 3,
            "batch": [first, second, {"a": 1}],
        }
        outcomes = run(codec.encode(envelope))
        assert [o.kind for o in outcomes] == ["enriched", "enriched", "dead_letter"]
        ids = {o.call["messageId"] for o in outcomes if isinstance(o, Enriched)}
        assert len(ids) == 2
        assert "envelope" not in ids
        assert not any({"writeKey", "secret", "sequence"} & o.call.keys() for o in outcomes[:2])  # type: ignore[union-attr]
        assert outcomes[2].reason == "missing_type"  # type: ignore[union-attr]


def test_a_write_key_in_the_call_itself_is_kept() -> None:
    """A call's own writeKey (analytics.js writes one into each call) stays in its
    enriched call, in an envelope or not; only the envelope's is not spread."""
    own = call(writeKey="browser-key")
    for record in (own, {"writeKey": "envelope-key", "batch": [own]}):
        (outcome,) = run(codec.encode(record))
        assert isinstance(outcome, Enriched)
        assert outcome.call["writeKey"] == "browser-key"


def test_a_number_message_id_becomes_a_string() -> None:
    """A messageId sent as a number is that number's text, as for the other IDs."""
    for sent, kept in ((12345, "12345"), (7.0, "7"), (2.5, "2.5")):
        outcome = one(codec.encode(call(messageId=sent)))
        assert isinstance(outcome, Enriched)
        assert outcome.call["messageId"] == kept


def test_a_number_id_too_large_to_read_exactly_is_not_usable() -> None:
    """A groupId or userId beyond 64 bits reaches the worker as an inexact float: it is no
    usable ID, so two such groups never become one; an exact large number still is."""
    value = b'{"type":"group","userId":"u","groupId":12345678901234567890123}'
    assert dead(value).reason == "missing_group_id"
    value = b'{"type":"group","userId":12345678901234567890123,"groupId":"g"}'
    assert dead(value).reason == "missing_identity"
    exact = one(b'{"type":"group","userId":"u","groupId":9007199254740993}')
    assert isinstance(exact, Enriched)
    assert exact.group_id == "9007199254740993"


@pytest.mark.parametrize(
    ("fields", "user", "anonymous"),
    [
        pytest.param({"userId": 42}, "42", ..., id="number-user-id"),
        pytest.param({"userId": 4.0}, "4", ..., id="whole-float-user-id"),
        pytest.param({"userId": None, "anonymousId": "a1"}, None, "a1", id="null-user-id"),
        pytest.param({"userId": "  ", "anonymousId": 7}, "  ", "7", id="blank-user-id"),
        pytest.param({"userId": {"id": 1}, "anonymousId": "a1"}, None, "a1", id="object-user-id"),
        pytest.param({"userId": True, "anonymousId": "a1"}, None, "a1", id="boolean-user-id"),
        pytest.param({"userId": 1e20, "anonymousId": "a1"}, None, "a1", id="inexact-user-id"),
        pytest.param({"userId": "u1", "anonymousId": [1]}, "u1", None, id="list-anonymous-id"),
    ],
)
def test_identities_become_strings(fields: dict[str, Any], user: Any, anonymous: Any) -> None:
    """Numeric IDs become strings; a null or blank ID beside the other identity is kept as
    sent, and any other unusable one becomes null."""
    out = enriched(call(**fields))
    assert out.call.get("userId", ...) == user
    assert out.call.get("anonymousId", ...) == anonymous


def test_numeric_group_id_becomes_a_string() -> None:
    """A numeric groupId is turned into a string for the key and the call."""
    out = enriched(call(groupId=12345))
    assert out.group_id == "12345"
    assert out.call["groupId"] == "12345"


def test_missing_message_id_is_derived_stably() -> None:
    """A call without messageId gets one derived from its content, the same on replay."""
    a = enriched(call(messageId=..., sentAt="2015-02-23T22:28:55.111Z"))
    b = enriched(call(messageId=..., sentAt="2015-02-23T22:29:00.000Z"))
    c = enriched(call(messageId=..., traits={"plan": "pro"}))
    assert a.call["messageId"] == b.call["messageId"]
    assert a.call["messageId"] != c.call["messageId"]
    assert len(a.call["messageId"]) <= 100


def test_null_traits_count_as_empty() -> None:
    """`"traits": null` is treated as no traits rather than a dead letter."""
    assert enriched(call(traits=None)).call["traits"] == {}


def test_event_time_falls_back_to_the_record_timestamp() -> None:
    """Without any usable time field the event time is the Kafka record timestamp."""
    out = enriched(call(timestamp="yesterday"))
    assert out.call["timestamp"] == "2015-02-23T22:28:55.000Z"
    assert out.event_time_ms == RECORD_MS
    assert out.invalid_timestamp == "yesterday"


@pytest.mark.parametrize(
    "stamp",
    [
        "2021-10-17T12:30:45.123:Z",  # analytics-swift before 1.1
        # analytics-kotlin's SimpleDateFormat in an Arabic locale: Arabic-Indic digits
        "2023-06-05T10:48:29.5Z".translate({48 + d: 0x660 + d for d in range(10)}),
        "2015-02-23T22:28:551110+00:00",  # an old analytics-php: no dot before the fraction
        1488371445123,  # epoch milliseconds
        {"$date": "2015-02-23T22:28:55Z"},
    ],
)
def test_a_timestamp_there_but_unusable_is_reported_beside_the_fallback(stamp: Any) -> None:
    """A sender's timestamp that is no ISO-8601 time gives way to the next source (here
    receivedAt) and is carried on the outcome, for the metrics and a log line; a valid,
    null, blank or absent one is not."""
    out = enriched(call(timestamp=stamp, receivedAt="2015-02-23T22:28:56Z"))
    assert out.call["timestamp"] == "2015-02-23T22:28:56.000Z"
    assert out.invalid_timestamp == stamp
    blank = {"timestamp": " "}
    for usable in ({"timestamp": "2015-02-23T22:28:55Z"}, {"timestamp": None}, {}, blank):
        assert enriched(call(**usable)).invalid_timestamp is None


def test_trait_warnings_are_reported_with_their_code() -> None:
    """A bad trait is dropped, the call kept, and the warning listed with its value."""
    out = enriched(call(traits={"email": "not-an-email", "name": "Initech"}))
    assert out.call["traits"] == {"name": "Initech"}
    assert out.call["enrichment"]["warnings"] == [
        {"code": "invalid_email", "trait": "email", "value": "not-an-email"}
    ]
    assert out.warnings == ("invalid_email",)


def test_warnings_past_the_most_listed_are_counted_in_one_last_warning() -> None:
    """A call lists its first 100 warnings, one more counts the rest, and all are counted."""
    spellings = {"email" + "_" * n: n for n in range(1, 151)}
    out = enriched(call(traits={"email": "a@b.io", **spellings}))
    listed = out.call["enrichment"]["warnings"]
    assert len(listed) == MAX_WARNINGS + 1
    assert listed[0] == {"code": "duplicate_trait", "trait": "email_", "value": 1}
    assert listed[-1] == {"code": "warnings_truncated", "trait": None, "value": 50}
    assert out.warnings == ("duplicate_trait",) * 150
    assert out.call["traits"] == {"email": "a@b.io"}


def test_warnings_take_no_more_room_than_a_call_may() -> None:
    """Warnings that each repeat a long key stop at max_event_bytes of JSON."""
    key = "a" + "_" * 9_000 + "ddress"
    marks = "-_.:/+*!#$%&()<=>?@[]^`{|}~,;"
    spellings = [f"z{a}i{b}p" for a in marks for b in marks][:299]
    address = {"zip": "0150", **dict.fromkeys(spellings, 1)}
    out = enriched(call(traits={key: address}))
    *listed, last = out.call["enrichment"]["warnings"]
    assert 0 < len(listed) < 10
    assert len(codec.encode(listed)) <= SETTINGS.max_event_bytes
    assert last == {"code": "warnings_truncated", "trait": None, "value": 299 - len(listed)}
    assert out.warnings == ("duplicate_trait",) * 299
    assert out.call["traits"] == {"address": {"postalCode": "0150"}}


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    [
        "type",
        "groupId",
        "userId",
        "anonymousId",
        "messageId",
        "traits",
        "timestamp",
        "sentAt",
        "receivedAt",
        "originalTimestamp",
        "batch",
    ]
)


@given(st.dictionaries(FIELDS, JSON | st.just("group"), max_size=8) | JSON)
def test_any_json_gives_outcomes_never_an_exception(document: Any) -> None:
    """Any JSON value, as a call or an envelope, yields outcomes and never raises."""
    outcomes = run(codec.encode(document))
    assert all(o.kind in ("enriched", "skipped", "dead_letter") for o in outcomes)
    kind = document.get("type") if isinstance(document, dict) else ...
    envelope = kind is None or (isinstance(kind, str) and kind.strip().lower() == "batch")
    if not (isinstance(document, dict) and "batch" in document and envelope):
        assert len(outcomes) == 1


@given(st.binary(max_size=200))
def test_any_bytes_give_outcomes_never_an_exception(value: bytes) -> None:
    """Arbitrary bytes yield outcomes and never raise."""
    assert all(o.kind in ("enriched", "skipped", "dead_letter") for o in run(value))


ANALYTICS_PYTHON = {  # as analytics-python 2.x sends it: null userId, +00:00 with microseconds
    "groupId": "acme",
    "traits": {"name": "Acme", "created_at": "2023-01-05T10:00:00.123456+00:00"},
    "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
    "timestamp": "2024-03-01T12:30:45.123456+00:00",
    "integrations": {},
    "anonymousId": "9b8f1c2e-0d6c-4a2e-9f5e-7c0e7f1d2a3b",
    "userId": None,
    "type": "group",
    "messageId": "3c4e2f3a-9b1d-4d7e-8f0a-1b2c3d4e5f60",
    "sentAt": "2024-03-01T12:30:46.000000+00:00",
}
ANALYTICS_NODE = {  # as @segment/analytics-node sends it, inside a batch envelope
    "batch": [
        {
            "type": "group",
            "groupId": "acme",
            "traits": {"Employees": "1,200", "plan": "pro"},
            "userId": "u-42",
            "messageId": "node-next-1709296245123-abc",
            "timestamp": "2024-03-01T12:30:45.123Z",
            "context": {"library": {"name": "@segment/analytics-node", "version": "2.1.0"}},
            "_metadata": {"jsRuntime": "node"},
            "integrations": {},
        }
    ],
    "sentAt": "2024-03-01T12:30:46.500Z",
}


def test_call_as_analytics_python_sends_it() -> None:
    """analytics-python's call (null userId, microsecond +00:00 times) is enriched as expected."""
    out = enriched(ANALYTICS_PYTHON)
    assert out.member_kind == "anonymousId"
    assert out.call["userId"] is None
    assert out.call["timestamp"] == "2024-03-01T12:30:45.123Z"
    assert out.call["traits"] == {"name": "Acme", "createdAt": "2023-01-05T10:00:00.123Z"}


def test_batch_as_analytics_node_sends_it() -> None:
    """analytics-node's batch is split, its sentAt applied, its traits normalised."""
    [out] = run(codec.encode(ANALYTICS_NODE))
    assert isinstance(out, Enriched)
    assert out.call["sentAt"] == "2024-03-01T12:30:46.500Z"
    assert out.call["traits"] == {"employees": 1200, "plan": "pro"}
    assert out.call["_metadata"] == {"jsRuntime": "node"}
    assert (out.member_kind, out.member_id) == ("userId", "u-42")


def test_a_string_javascript_cut_inside_an_emoji_loses_nothing() -> None:
    """A lone UTF-16 surrogate escape (Node writes one for half an emoji) is read as
    U+FFFD: the call is enriched, and the other calls of its batch are not lost."""
    raw = (
        b'{"batch": [{"type": "group", "groupId": "g", "userId": "u", "messageId": "ok1"},'
        b' {"type": "group", "groupId": "g", "userId": "u", "messageId": "bad1",'
        b' "traits": {"tagline": "Best \\ud83d", "\\udc00k": "\\ud83d\\ude00"}},'
        b' {"type": "track", "event": "x", "userId": "u", "messageId": "t1"}]}'
    )
    first, second, third = run(raw)
    assert isinstance(first, Enriched)
    assert first.call["messageId"] == "ok1"
    assert isinstance(second, Enriched)
    assert second.call["traits"] == {"tagline": "Best \ufffd", "\ufffdk": "\U0001f600"}
    assert isinstance(third, Skipped)


def test_a_leading_byte_order_mark_is_ignored() -> None:
    """A value that starts with a UTF-8 byte order mark is read past it."""
    outcome = one(b"\xef\xbb\xbf" + codec.encode(call()))
    assert isinstance(outcome, Enriched)
    assert outcome.call["groupId"] == "g1"


def test_a_lone_surrogate_does_not_excuse_other_invalid_json() -> None:
    """A value invalid for another reason as well stays invalid_json, with the parser's
    first complaint."""
    letter = dead(b'{"type": "group", "traits": {"t": "\\ud83d"}, "n": NaN}')
    assert letter.reason == "invalid_json"
    assert "surrogate" in letter.letter["message"]


@given(st.recursive(st.text('\\ud83cde0"x\U0001f600'), lambda v: st.lists(v, max_size=3)))
def test_repairing_surrogates_leaves_valid_json_as_it_was(value: Any) -> None:
    """decode_repaired reads any valid JSON exactly as decode does: escaped backslashes
    followed by text that looks like an escape are not touched."""
    assert codec.decode_repaired(codec.encode(value)) == value
