"""Tests for worker.times: parsing what Segment libraries send, formatting, event time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import times
from worker.times import (
    MAX_MS,
    MIN_MS,
    SECONDS_THRESHOLD,
    event_time,
    format_time,
    parse_created_at,
    parse_iso_time,
)

# 2015-02-23T22:28:55.111Z, the spec example's timestamp.
SPEC_MS = 1_424_730_535_111
SPEC_SECONDS_MS = 1_424_730_535_000
SPEC_MIDNIGHT_MS = 1_424_649_600_000


def _ms(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> int:
    """Epoch milliseconds of a whole-second UTC date-time."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()) * 1000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2015-02-23T22:28:55.111Z", SPEC_MS, id="node-z"),
        pytest.param("2015-02-23T22:28:55.111000+00:00", SPEC_MS, id="python-micro"),
        pytest.param("2015-02-23T22:28:55.111999Z", SPEC_MS, id="micro-truncated"),
        pytest.param("2015-02-23T22:28:55.111999999Z", SPEC_MS, id="nanos-truncated"),
        pytest.param("2015-02-23T22:28:55.1Z", SPEC_MS - 11, id="one-digit-fraction"),
        pytest.param("2015-02-23T22:28:55Z", SPEC_SECONDS_MS, id="no-fraction"),
        pytest.param("2015-02-23T22:28:55", SPEC_SECONDS_MS, id="naive-is-utc"),
        pytest.param("2015-02-24T03:58:55.111+05:30", SPEC_MS, id="offset-plus-0530"),
        pytest.param("2015-02-23T14:28:55.111-08:00", SPEC_MS, id="offset-minus-0800"),
        pytest.param("2015-02-23T14:28:55.111-0800", SPEC_MS, id="offset-no-colon"),
        pytest.param("2015-02-23T22:28:55.111-00:00", SPEC_MS, id="offset-minus-zero"),
        pytest.param("2015-02-23 22:28:55.111Z", SPEC_MS, id="space-separator"),
        pytest.param("2015-02-23t22:28:55.111z", SPEC_MS, id="lower-case-designators"),
        pytest.param("20150223T222855Z", SPEC_SECONDS_MS, id="basic-format"),
        pytest.param("2015-02-23", SPEC_MIDNIGHT_MS, id="date-is-utc-midnight"),
        pytest.param("2015-W09-1", SPEC_MIDNIGHT_MS, id="week-date"),
        pytest.param("  2015-02-23T22:28:55.111Z\n", SPEC_MS, id="surrounding-whitespace"),
        pytest.param("1969-12-31T23:59:59.9995Z", -1, id="before-epoch-truncates-down"),
        pytest.param("0001-01-01T00:00:00Z", MIN_MS, id="earliest"),
        pytest.param("9999-12-31T23:59:59.999999Z", MAX_MS, id="latest"),
    ],
)
def test_parse_iso_time_reads_iso_8601(text: str, expected: int) -> None:
    """An ISO-8601 date or date-time becomes UTC epoch milliseconds, truncated."""
    assert parse_iso_time(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(True, id="bool"),
        pytest.param(SPEC_MS, id="int"),
        pytest.param(1424730535.111, id="float"),
        pytest.param(["2015-02-23"], id="list"),
        pytest.param({"t": "2015-02-23"}, id="dict"),
        pytest.param("", id="empty"),
        pytest.param("yesterday", id="garbage"),
        pytest.param("1424730535", id="digit-string"),
        pytest.param("2015-02-30", id="impossible-date"),
        pytest.param("2015-02-23T25:00:00Z", id="impossible-hour"),
        pytest.param("2015-02", id="month-only"),
        pytest.param("2015-02-23x22:28:55Z", id="odd-separator"),
        pytest.param("2015-02-23Z22:28:55Z", id="designator-as-separator"),
        pytest.param("2015-02-23T22:28:55.111Z\x00", id="trailing-nul"),
        pytest.param("2015-02-23T22:28:55.111 UTC", id="zone-name"),
        pytest.param("Mon, 23 Feb 2015 22:28:55 GMT", id="rfc-2822"),
        pytest.param("2015-02-23T22:28:55+00:60", id="offset-minute-60"),
        pytest.param("2015-02-23T22:28:55+01:00:30", id="offset-seconds"),
        pytest.param("2015-02-23T22:28:55.Z", id="empty-fraction"),
        pytest.param("2015-02-23T22:28.5Z", id="fraction-of-a-minute"),
        pytest.param("2015-02-23T22.5Z", id="fraction-of-an-hour"),
        pytest.param("20150223T2228,5", id="basic-fraction-of-a-minute"),
        pytest.param("2015-02-23T22:28:55 +01:00", id="space-before-offset"),
        pytest.param("2015-02-23T22:28:55 Z", id="space-before-z"),
        pytest.param("\uff12\uff10\uff11\uff15-02-23", id="full-width-digits"),
        pytest.param("0001-01-01T00:00:00+01:00", id="before-year-1-in-utc"),
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999-in-utc"),
    ],
)
def test_parse_iso_time_rejects_other_values(value: object) -> None:
    """Anything but an in-range ISO-8601 string parses to None."""
    assert parse_iso_time(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(1424730535, SPEC_SECONDS_MS, id="int-seconds"),
        pytest.param(SPEC_MS, SPEC_MS, id="int-millis"),
        pytest.param(1424730535.111, SPEC_MS, id="float-seconds"),
        pytest.param(1424730535.1119, SPEC_MS, id="float-seconds-truncated"),
        pytest.param(1424730535111.9, SPEC_MS, id="float-millis-truncated"),
        pytest.param("1424730535", SPEC_SECONDS_MS, id="digit-string-seconds"),
        pytest.param("1424730535111", SPEC_MS, id="digit-string-millis"),
        pytest.param(" 1424730535 ", SPEC_SECONDS_MS, id="digit-string-whitespace"),
        pytest.param(0, 0, id="zero"),
        pytest.param(-1, -1000, id="negative-seconds"),
        pytest.param(-62135596800, MIN_MS, id="negative-below-threshold-is-seconds"),
        pytest.param(SECONDS_THRESHOLD - 1, (SECONDS_THRESHOLD - 1) * 1000, id="below-threshold"),
        pytest.param(SECONDS_THRESHOLD, SECONDS_THRESHOLD, id="at-threshold-is-millis"),
        pytest.param("2015-02-23T22:28:55.111000+00:00", SPEC_MS, id="iso-python"),
        pytest.param("2015-02-24T03:58:55.111+05:30", SPEC_MS, id="iso-offset"),
        pytest.param("2015-02-23", SPEC_MIDNIGHT_MS, id="iso-date"),
    ],
)
def test_parse_created_at_reads_iso_and_epoch_numbers(value: object, expected: int) -> None:
    """createdAt accepts ISO-8601 and epoch seconds or milliseconds, numeric or digit text."""
    assert parse_created_at(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param([1424730535], id="list"),
        pytest.param({}, id="dict"),
        pytest.param("", id="empty"),
        pytest.param("-1424730535", id="signed-digit-string"),
        pytest.param("1424730535.111", id="decimal-string"),
        pytest.param("soon", id="garbage"),
        pytest.param(10**30, id="huge-int"),
        pytest.param(-(10**30), id="huge-negative-int"),
        pytest.param(-1_000_000_000_000, id="negative-milliseconds-read-as-seconds"),
        pytest.param(-62135596801, id="before-year-1"),
        pytest.param("9" * 5000, id="huge-digit-string"),
        pytest.param(1e300, id="huge-float"),
        pytest.param(float("inf"), id="infinity"),
        pytest.param(float("nan"), id="nan"),
    ],
)
def test_parse_created_at_rejects_other_values(value: object) -> None:
    """Booleans, containers, non-numeric text and out-of-range numbers parse to None."""
    assert parse_created_at(value) is None


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        pytest.param(SPEC_MS, "2015-02-23T22:28:55.111Z", id="spec"),
        pytest.param(SPEC_SECONDS_MS, "2015-02-23T22:28:55.000Z", id="whole-second"),
        pytest.param(0, "1970-01-01T00:00:00.000Z", id="epoch"),
        pytest.param(-1, "1969-12-31T23:59:59.999Z", id="before-epoch"),
        pytest.param(MIN_MS, "0001-01-01T00:00:00.000Z", id="earliest-year-padded"),
        pytest.param(MAX_MS, "9999-12-31T23:59:59.999Z", id="latest"),
    ],
)
def test_format_time_writes_rfc_3339_utc_millis(ms: int, expected: str) -> None:
    """Epoch milliseconds format as RFC 3339 UTC with three fractional digits and Z."""
    assert format_time(ms) == expected


@pytest.mark.parametrize("ms", [MIN_MS - 1, MAX_MS + 1], ids=["before-min", "after-max"])
def test_format_time_refuses_out_of_range(ms: int) -> None:
    """Instants outside years 1 to 9999 raise OverflowError."""
    with pytest.raises(OverflowError):
        format_time(ms)


FALLBACK = 1_000_000_000_000  # the Kafka record timestamp the caller passes

# A device whose clock runs 5.111 s behind: it recorded the event at 22:28:50.000 by its
# clock, sent it at 22:28:55.111 by its clock, and Segment received it at 22:30:00.000.
SKEWED = {
    "originalTimestamp": "2015-02-23T22:28:50.000Z",
    "sentAt": "2015-02-23T22:28:55.111Z",
    "receivedAt": "2015-02-23T22:30:00.000Z",
}
SKEW_CORRECTED = _ms(2015, 2, 23, 22, 29, 54) + 889


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(
            {
                "timestamp": "2015-02-23T22:28:55.111Z",
                "sentAt": "2015-02-23T22:28:55.111Z",
                "receivedAt": "2015-02-23T22:28:55.387Z",
            },
            SPEC_MS,
            id="spec-example-timestamp",
        ),
        pytest.param(
            {"timestamp": "2015-02-23T22:28:55.111000+00:00", **SKEWED},
            SPEC_MS,
            id="timestamp-beats-skew-correction",
        ),
        pytest.param(SKEWED, SKEW_CORRECTED, id="clock-skew-corrected"),
        pytest.param({"timestamp": "garbage", **SKEWED}, SKEW_CORRECTED, id="bad-timestamp"),
        pytest.param({"timestamp": SPEC_MS, **SKEWED}, SKEW_CORRECTED, id="numeric-timestamp"),
        pytest.param(
            {**SKEWED, "originalTimestamp": "2015-02-24T03:58:50+05:30"},
            SKEW_CORRECTED,
            id="skew-corrected-across-offsets",
        ),
        pytest.param(
            {**SKEWED, "sentAt": None}, _ms(2015, 2, 23, 22, 30), id="no-sent-at-uses-received"
        ),
        pytest.param(
            {**SKEWED, "originalTimestamp": "nope"},
            _ms(2015, 2, 23, 22, 30),
            id="bad-original-uses-received",
        ),
        pytest.param(
            {**SKEWED, "originalTimestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-01-01"},
            _ms(2015, 2, 23, 22, 30),
            id="out-of-range-correction-uses-received",
        ),
        pytest.param({"sentAt": SKEWED["sentAt"]}, FALLBACK, id="no-received-at-uses-fallback"),
        pytest.param({}, FALLBACK, id="nothing-uses-fallback"),
    ],
)
def test_event_time_prefers_timestamp_then_skew_correction(
    call: dict[str, Any], expected: int
) -> None:
    """Event time is timestamp, else receivedAt - (sentAt - originalTimestamp), else
    receivedAt, else the fallback."""
    assert event_time(call, FALLBACK) == expected


# Ways to write one instant; the first is format_time's.
_SPELLINGS = (
    "{day}T{clock}Z",
    "{day}t{clock}Z",
    "{day}T{clock}z",
    "{day} {clock}Z",
    "{day}T{clock}+00:00",
    "{day}T{clock}000Z",
    " {day}T{clock}Z",
)


@given(st.integers(min_value=MIN_MS, max_value=MAX_MS))
def test_format_then_parse_round_trips(ms: int) -> None:
    """Parsing a formatted instant, as a time or as a createdAt, gives back the instant:
    from the memo of instants formatted lately, and from the text itself."""
    text = format_time(ms)
    assert parse_iso_time(text) == ms
    assert parse_created_at(text) == ms
    assert times._parse_iso_time(text) == ms


@given(st.integers(min_value=MIN_MS, max_value=MAX_MS), st.text())
def test_the_memo_of_recent_instants_agrees_with_the_parser(ms: int, other: str) -> None:
    """Whatever the memo holds, parse_iso_time answers as the parser would."""
    text = format_time(ms)
    for value in (text, f" {text}", text.lower(), other):
        assert parse_iso_time(value) == times._parse_iso_time(value)


_FORMAT_TIME_SHAPE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"


@given(st.from_regex(_FORMAT_TIME_SHAPE, fullmatch=True))
def test_text_in_format_times_form_is_read_as_the_parser_reads_it(text: str) -> None:
    """Text shaped as format_time writes it, an impossible date or not, parses as the
    full parser parses it (it is read by a shorter path)."""
    times._PARSED.clear()
    assert parse_iso_time(text) == times._parse_iso_time(text)


@given(st.integers(min_value=MIN_MS, max_value=MAX_MS), st.sampled_from(_SPELLINGS))
def test_a_parsed_text_is_formatted_as_format_time_writes_it(ms: int, spelling: str) -> None:
    """Parsing remembers text in format_time's own form for the instant; any other
    spelling of it leaves format_time writing its own (the memos emptied first)."""
    times._FORMATTED.clear()
    canonical = format_time(ms)
    text = spelling.format(day=canonical[:10], clock=canonical[11:23])
    times._FORMATTED.clear()
    times._PARSED.clear()
    assert parse_iso_time(text) == ms
    assert format_time(ms) == canonical
    assert parse_iso_time(canonical) == ms


@given(st.integers(min_value=SECONDS_THRESHOLD, max_value=MAX_MS))
def test_epoch_millis_digit_strings_round_trip(ms: int) -> None:
    """An epoch-milliseconds digit string parses to the same number."""
    assert parse_created_at(str(ms)) == ms


_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()


@given(_JSON_SCALARS | st.lists(_JSON_SCALARS) | st.dictionaries(st.text(), _JSON_SCALARS))
def test_parsers_never_raise_and_stay_in_range(value: object) -> None:
    """The parsers return None or an instant format_time can write, whatever they get."""
    for parsed in (parse_iso_time(value), parse_created_at(value)):
        assert parsed is None or format_time(parsed).endswith("Z")


_TIME_FIELDS = st.sampled_from(["timestamp", "originalTimestamp", "sentAt", "receivedAt"])
_TIME_VALUES = _JSON_SCALARS | st.integers(MIN_MS, MAX_MS).map(format_time)


@given(st.dictionaries(_TIME_FIELDS, _TIME_VALUES))
def test_event_time_is_always_formattable(call: dict[str, Any]) -> None:
    """event_time never raises and returns the fallback or an instant format_time can write."""
    when = event_time(call, FALLBACK)
    assert when == FALLBACK or format_time(when).endswith("Z")
