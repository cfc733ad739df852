"""Instants as epoch milliseconds: parsing what Segment libraries send, formatting output.

Every instant in the worker is an ``int`` of milliseconds since 1970-01-01T00:00:00Z.
Integers are cheap to compare and to store in state, and our output precision is
milliseconds anyway. Parsers never raise: a value they cannot read is ``None``, and the
caller decides what a missing time means.

The range is the one RFC 3339 can write, ``0001-01-01T00:00:00.000Z`` to
``9999-12-31T23:59:59.999Z`` (``MIN_MS`` .. ``MAX_MS``). The parsers only return
instants inside it, so ``format_time`` never fails on what they return.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "MAX_MS",
    "MIN_MS",
    "SECONDS_THRESHOLD",
    "event_time",
    "format_time",
    "parse_created_at",
    "parse_iso_time",
]

_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_DATE: Final = date(1970, 1, 1)
_EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

MIN_MS: Final[int] = (datetime(1, 1, 1) - _EPOCH) // _ONE_MS
"""``0001-01-01T00:00:00.000Z``, the earliest instant the parsers return."""

MAX_MS: Final[int] = (datetime(9999, 12, 31, 23, 59, 59, 999000) - _EPOCH) // _ONE_MS
"""``9999-12-31T23:59:59.999Z``, the latest instant the parsers return."""

SECONDS_THRESHOLD: Final[int] = 31_557_600_000
"""Epoch numbers below this are seconds (negative ones too), others milliseconds.

31,557,600,000 seconds is about the year 2970, and as milliseconds it is mid-1971: no
real timestamp is ambiguous between the two readings.
"""

# Digit strings longer than this are out of range anyway; the cap also keeps int()
# away from Python's limit on very long digit strings.
_MAX_EPOCH_DIGITS: Final = 20

# Characters an ISO-8601 date or date-time may contain. We check them ourselves because
# fromisoformat() takes any character as the date/time separator ("2015-02-23x22:28")
# and stops reading at a NUL ("...55Z\x00" parses).
_ISO_CHARS: Final = "0123456789-:.,+TtWZ "
# The time of day after the separator, as ISO 8601 writes it: fromisoformat() also takes
# an empty fraction ("55.Z"), a space before the offset ("55 +01:00"), offset minutes
# past 59 ("+00:60"), offset seconds, and a fraction of an hour or a minute ("22:28.5"),
# which it reads as a fraction of a second (22:28:00.5, not ISO's 22:28:30).
_ISO_TIME: Final = re.compile(
    r"[0-9]{2}(?::?[0-9]{2}(?::?[0-9]{2}(?:[.,][0-9]+)?)?)?(?:Z|[+-][0-9]{2}(?::?[0-5][0-9])?)?"
).fullmatch

# Instants formatted lately: a call's event time is formatted again for its group
# snapshot, state and membership records, and a group's first seen time at every call.
# A plain dict, emptied when full, is cheaper than lru_cache's bookkeeping.
_FORMATTED_SIZE: Final = 16_384
_FORMATTED: dict[int, str] = {}
# The same instants by their text, for ``parse_iso_time``: stage two reads back the
# event times stage one wrote moments before (timeit: a parse 1.3 µs, a hit 0.08).
_PARSED: dict[str, int] = {}
_FORMAT_TIME_TEXT: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"
).fullmatch


def parse_iso_time(value: object) -> int | None:
    """Read an ISO-8601 date or date-time string as epoch milliseconds.

    Accepts what Segment's libraries send (``2015-02-23T22:28:55.111Z`` from Node,
    ``2015-02-23T22:28:55.111000+00:00`` from Python), any UTC offset (``+05:30``,
    ``-0800``, ``Z``, ``z``), fractional seconds of any length (truncated to the
    millisecond), a space or ``T`` between date and time, the basic format
    (``20150223T222855Z``) and ISO week dates. A date-time without an offset and a bare
    date (``2015-02-23``, midnight) are taken as UTC. Surrounding whitespace is ignored.

    Returns ``None`` for anything else: non-strings, garbage, impossible dates, and
    instants outside ``MIN_MS`` .. ``MAX_MS`` after applying the offset. Never raises.
    """
    if not isinstance(value, str):
        return None
    ms = _PARSED.get(value)
    if ms is not None:
        return ms
    if not _FORMAT_TIME_TEXT(value):
        return _parse_iso_time(value)
    # Text format_time would write (what JavaScript's toISOString() sends): read without
    # the checks for other forms (2.6 -> 0.7 µs), and its output is formatted already.
    # Always in range: years 1 to 9999, in UTC.
    try:
        ms = (datetime.fromisoformat(value) - _EPOCH_UTC) // _ONE_MS
    except ValueError:  # an impossible date
        return None
    _remember(ms, value)
    return ms


def _parse_iso_time(value: str) -> int | None:
    """``parse_iso_time`` of a string, without the memo of recent instants."""
    text = value.strip()
    if text[-1:] == "z":  # RFC 3339 allows it; fromisoformat() does not
        text = text[:-1] + "Z"
    # strip(chars) returns "" exactly when every character is one of them.
    if not text.isascii() or text.strip(_ISO_CHARS):
        return None
    # The separator follows the date: 10 characters in extended format, 8 in basic.
    at = 10 if text[4:5] == "-" else 8
    separator = text[at : at + 1]
    if separator not in "Tt ":  # "" (a bare date) is in every string
        return None
    if separator and not _ISO_TIME(text, at + 1):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    epoch = _EPOCH if parsed.tzinfo is None else _EPOCH_UTC
    ms = (parsed - epoch) // _ONE_MS
    return ms if MIN_MS <= ms <= MAX_MS else None


def parse_created_at(value: object) -> int | None:
    """Read a ``createdAt``-style value as epoch milliseconds.

    Accepts everything ``parse_iso_time`` does, plus epoch numbers: an ``int`` or
    ``float``, or a string of ASCII digits (surrounding whitespace ignored). A number
    below ``SECONDS_THRESHOLD`` is seconds (any negative one too), otherwise milliseconds;
    fractions below a millisecond are truncated towards the past. A digit string is
    always an epoch number, never an ISO basic-format date. ``bool`` is not a number.

    Returns ``None`` when the value is none of these or falls outside
    ``MIN_MS`` .. ``MAX_MS``. Never raises.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            if len(text) > _MAX_EPOCH_DIGITS:
                return None
            return _epoch_to_ms(int(text))
        return parse_iso_time(text)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _epoch_to_ms(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        # repr() gives the shortest decimal that reads back as this float, i.e. the
        # digits the sender wrote; multiplying the binary float by 1000 would turn
        # 1424730535.111 into ...110.99999 on some values.
        exact = Decimal(repr(value))
        if exact < SECONDS_THRESHOLD:
            exact *= 1000
        return _in_range(math.floor(exact))
    return None


def format_time(ms: int) -> str:
    """Format epoch milliseconds as RFC 3339 UTC, e.g. ``2015-02-23T22:28:55.111Z``.

    Always exactly three fractional digits and a ``Z``; years are zero-padded to four
    digits. Raises ``OverflowError`` when ``ms`` is outside ``MIN_MS`` .. ``MAX_MS``
    (the parsers in this module never return such values).
    """
    text = _FORMATTED.get(ms)
    if text is None:
        days, in_day = divmod(ms, 86_400_000)
        text = "%sT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 - twice as fast as an f-string
            _format_day(days),
            in_day // 3_600_000,
            in_day // 60_000 % 60,
            in_day // 1000 % 60,
            in_day % 1000,
        )
        _remember(ms, text)
    return text


def _remember(ms: int, text: str) -> None:
    if len(_FORMATTED) >= _FORMATTED_SIZE:
        _FORMATTED.clear()
        _PARSED.clear()
    _FORMATTED[ms] = text
    _PARSED[text] = ms


def event_time(call: Mapping[str, Any], fallback_ms: int) -> int:
    """Pick the event time of a Segment call, in epoch milliseconds.

    In order of preference (docs/design.md, "Event time"):

    1. ``timestamp``, when it is a valid ISO-8601 time;
    2. the clock-skew corrected time ``receivedAt - (sentAt - originalTimestamp)``,
       when all three are valid and the result is in range;
    3. ``receivedAt``, when valid;
    4. ``fallback_ms``: the caller passes the Kafka record timestamp.

    Pure and never raises; ``fallback_ms`` is returned as given.
    """
    timestamp = parse_iso_time(call.get("timestamp"))
    if timestamp is not None:
        return timestamp
    received_at = parse_iso_time(call.get("receivedAt"))
    if received_at is None:
        return fallback_ms
    sent_at = parse_iso_time(call.get("sentAt"))
    original = parse_iso_time(call.get("originalTimestamp"))
    if sent_at is not None and original is not None:
        corrected = _in_range(received_at - (sent_at - original))
        if corrected is not None:
            return corrected
    return received_at


@functools.lru_cache(maxsize=4096)
def _format_day(days: int) -> str:
    # Cached because a stream's instants crowd into few days; date arithmetic and
    # isoformat() are most of format_time's cost.
    return (_EPOCH_DATE + timedelta(days=days)).isoformat()


def _epoch_to_ms(number: int) -> int | None:
    if number < SECONDS_THRESHOLD:
        number *= 1000
    return _in_range(number)


def _in_range(ms: int) -> int | None:
    return ms if MIN_MS <= ms <= MAX_MS else None
