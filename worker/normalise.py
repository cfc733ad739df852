"""Normalise the reserved traits of a group call (docs/design.md).

``normalise_traits`` is a pure function from the traits as sent to the traits we emit,
plus a list of ``TraitWarning`` for every value it had to drop. A bad trait never loses
the call: it is left out of the output and reported with its original value.

Warning codes (``WarningCode``):

- ``duplicate_trait``: another key matched the same reserved trait (or address
  sub-field) and won; this key and its value were dropped.
- ``invalid_type``: the value's JSON type is not accepted for this trait (a list, an
  object or a boolean where a string or number is expected, anything but an object for
  ``address``, a number for ``email``/``website``/``avatar``, a fractional number for
  ``phone``).
- ``invalid_date``: ``createdAt`` is neither an ISO-8601 date/date-time nor an epoch
  number within years 1 to 9999.
- ``invalid_email``: ``email`` does not look like ``local@domain.tld``.
- ``invalid_url``: ``website`` is not an http(s) URL with a host nor a bare domain, or
  ``avatar`` is not an http(s) URL with a host.
- ``invalid_employees``: ``employees`` is negative, or above 2**53 - 1.

Warnings for an address sub-field name the trait as ``<address key>.<sub-key>``, both
as sent (``Address.Zip``).

A ``TraitWarning`` is made per call, so it is a plain dataclass, not a frozen one
(``worker.events`` says why). Nothing mutates one once made.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import phonenumbers

from worker.times import format_time, parse_created_at

__all__ = [
    "ADDRESS_FIELDS",
    "DUPLICATE_TRAIT",
    "INVALID_DATE",
    "INVALID_EMAIL",
    "INVALID_EMPLOYEES",
    "INVALID_TYPE",
    "INVALID_URL",
    "RESERVED_TRAITS",
    "WARNING_CODES",
    "TraitWarning",
    "WarningCode",
    "normalise_traits",
]

WarningCode = Literal[
    "duplicate_trait",
    "invalid_type",
    "invalid_date",
    "invalid_email",
    "invalid_url",
    "invalid_employees",
]
WARNING_CODES: Final[tuple[WarningCode, ...]] = get_args(WarningCode)
DUPLICATE_TRAIT: Final = "duplicate_trait"
INVALID_TYPE: Final = "invalid_type"
INVALID_DATE: Final = "invalid_date"
INVALID_EMAIL: Final = "invalid_email"
INVALID_URL: Final = "invalid_url"
INVALID_EMPLOYEES: Final = "invalid_employees"

RESERVED_TRAITS: Final = (
    "address",
    "avatar",
    "createdAt",
    "description",
    "email",
    "employees",
    "id",
    "industry",
    "name",
    "phone",
    "plan",
    "website",
)
ADDRESS_FIELDS: Final = ("city", "country", "postalCode", "state", "street")


@dataclass(slots=True)  # per call: not frozen (module docstring)
class TraitWarning:
    """A trait value that was dropped during normalisation.

    ``trait`` is the key as the user sent it (``Created At``; ``address.zip`` for an
    address sub-field) and ``value`` the original value.
    """

    code: WarningCode
    trait: str
    value: Any


# Folded key (ASCII letters and digits, lower-cased) -> canonical name.
_TRAIT_BY_FOLDED: Final = {name.lower(): name for name in RESERVED_TRAITS}
_ADDRESS_BY_FOLDED: Final = {name.lower(): name for name in ADDRESS_FIELDS} | {
    "zip": "postalCode",
    "zipcode": "postalCode",
    "postcode": "postalCode",
}
_DELETE_ASCII_NON_ALNUM: Final = str.maketrans(
    "", "", "".join(chr(c) for c in range(128) if not chr(c).isalnum())
)

# JavaScript's Number.MAX_SAFE_INTEGER: above it a count would not survive a JS reader.
_MAX_EMPLOYEES: Final = 2**53 - 1
_MAX_EMPLOYEES_DIGITS: Final = len(str(_MAX_EMPLOYEES))
# Thousands grouped with commas or spaces (incl. the no-break spaces some locales use).
_GROUPED_INTEGER: Final = re.compile(r"[0-9]{1,3}(?:[, \u00a0\u202f][0-9]{3})+")
_DELETE_SEPARATORS: Final = str.maketrans("", "", ", \u00a0\u202f")
_HTTP_SCHEMES: Final = frozenset({"http", "https"})
# The plainest http(s) URLs, most of those sent, which the full check (``urlsplit``)
# accepts too: a host of ASCII letters, digits, dots and hyphens, no port, no user, no
# whitespace or control character. 0.3 against 2 µs; anything else takes the full check.
_PLAIN_HTTP_URL: Final = re.compile(
    r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9][A-Za-z0-9.-]*(?:[/?#][^\s\x00-\x1f\x7f-\x9f]*)?"
)
# A URL's scheme, at its start only: "initech.com/?ref=https://x" is a bare domain.
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Whitespace (which ``str.split`` knows) and the control characters it does not:
# ``urlsplit`` skips some of them silently, so a URL with any is refused.
_SPACE_OR_CONTROL: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")

# Memo bounds: entries per cache, and the longest string worth remembering. A cache
# holds the distinct values of about as many groups (a group repeats its traits).
_MEMO_SIZE: Final = 16_384
_MEMO_MAX_LEN: Final = 256
# Key as sent -> canonical name, "" for a key that matches none.
_TRAIT_NAME_CACHE: dict[str, str] = {}
_ADDRESS_NAME_CACHE: dict[str, str] = {}

_R = TypeVar("_R")
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class _Invalid:
    code: WarningCode


_WRONG_TYPE: Final = _Invalid(INVALID_TYPE)
_BAD_DATE: Final = _Invalid(INVALID_DATE)
_BAD_EMAIL: Final = _Invalid(INVALID_EMAIL)
_BAD_URL: Final = _Invalid(INVALID_URL)
_BAD_EMPLOYEES: Final = _Invalid(INVALID_EMPLOYEES)


def normalise_traits(
    traits: Mapping[str, Any], *, phone_region: str | None = None
) -> tuple[dict[str, Any], list[TraitWarning]]:
    """Normalise reserved traits; return the new traits and the warnings.

    A key matches a reserved trait when its ASCII letters and digits, lower-cased, equal
    the trait's name lower-cased (``Created At``, ``created_at`` -> ``createdAt``). When
    several keys match one trait the canonical spelling wins, else the first in payload
    order; the others are dropped with ``duplicate_trait`` (even when the winner's own
    value turns out invalid). Output keys are canonical, in payload order; custom traits
    keep key and value untouched; ``None`` passes through for every trait. A value that
    cannot be normalised is dropped and reported.

    ``phone_region`` (ISO 3166 code such as ``"US"``) is the region assumed for phone
    numbers without a ``+country`` prefix; with ``None`` only those numbers become E.164.

    Pure, idempotent (normalising the output changes nothing and warns about nothing),
    and never raises for JSON values. ``traits`` is not modified. Results of key
    matching and of the costlier parsers are memoised process-wide, which changes no
    result: a group sends the same traits call after call.
    """
    out: dict[str, Any] = {}
    warnings: list[TraitWarning] = []
    claimed: set[str] = set()  # reserved names already won by a non-canonical key
    for key, value in traits.items():
        name = _TRAIT_NAME_CACHE.get(key)
        if name is None:
            name = _match_key(key, _TRAIT_BY_FOLDED, _TRAIT_NAME_CACHE)
        if not name:
            out[key] = value
            continue
        if key != name:
            # The canonical spelling wins wherever it is; otherwise the first key does.
            if name in traits or name in claimed:
                warnings.append(TraitWarning(DUPLICATE_TRAIT, key, value))
                continue
            claimed.add(name)
        if value is None:
            out[name] = None
            continue
        result: object
        if name == "address":
            result = _address(value, key, warnings)
        elif name == "phone":
            result = _phone(value, phone_region)
        else:
            result = _NORMALISERS[name](value)
        if isinstance(result, _Invalid):
            warnings.append(TraitWarning(result.code, key, value))
        else:
            out[name] = result
    return out, warnings


def _match_key(key: str, names: Mapping[str, str], cache: dict[str, str]) -> str:
    """The canonical name ``key`` matches in ``names``, or "" for none; remembered."""
    name = names.get(_fold(key), "")
    if len(key) <= _MEMO_MAX_LEN:
        if len(cache) >= _MEMO_SIZE:
            cache.clear()
        cache[key] = name
    return name


def _fold(key: str) -> str:
    """The key's ASCII letters and digits, lower-cased: what reserved names match on."""
    if key.isascii():
        if key.isalnum():
            return key.lower()
    else:
        # Drop non-ASCII first: lower() turns some into ASCII (Kelvin sign -> "k").
        key = key.encode("ascii", "ignore").decode("ascii")
    return key.translate(_DELETE_ASCII_NON_ALNUM).lower()


def _memoise(fn: Callable[[Any], _R]) -> Callable[[Any], _R]:
    """Memoise a pure one-argument normaliser on short strings.

    A plain dict, emptied when full: a hit costs one lookup, where ``lru_cache`` also
    keeps an order. Only ``str`` values are remembered, so ``1``, ``1.0`` and ``True``
    (equal as dict keys) never share an entry; numbers are cheap to normalise anyway.
    """
    memo: dict[str, _R] = {}

    def lookup(value: Any) -> _R:
        if type(value) is not str:
            return fn(value)
        hit = memo.get(value, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        result = fn(value)
        if len(value) <= _MEMO_MAX_LEN:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[value] = result
        return result

    return lookup


def _text(value: Any) -> str | _Invalid:
    """``id``, ``name``, ``industry``, ``plan``, ``description`` and address fields."""
    if isinstance(value, str):
        return value.strip()
    return _number_text(value)


def _number_text(value: Any) -> str | _Invalid:
    """A number as the string a JSON reader would expect: ``2.0`` -> ``"2"``."""
    if isinstance(value, bool):
        return _WRONG_TYPE
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # beyond sys.get_int_max_str_digits(); not from JSON
            return _WRONG_TYPE
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return _WRONG_TYPE


@_memoise
def _created_at(value: Any) -> str | _Invalid:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return _WRONG_TYPE
    ms = parse_created_at(value)
    return _BAD_DATE if ms is None else format_time(ms)


def _employees(value: Any) -> int | str | _Invalid:
    """A whole count as ``int``; other text ("51-200") kept; a fraction as its text."""
    if isinstance(value, str):
        return _employees_text(value)
    if isinstance(value, bool):
        return _WRONG_TYPE
    if isinstance(value, int):
        return _count(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            return _BAD_EMPLOYEES
        # A fraction is not a count we can trust, but it is what the user sent: keep
        # its text, as for "51-200", rather than round it.
        return _count(int(value)) if value.is_integer() else repr(value)
    return _WRONG_TYPE


@_memoise
def _employees_text(value: str) -> int | str | _Invalid:
    text = value.strip()
    # A whole number written with a zero fraction ("329.0", "1,200.00": str() of a
    # float) is that number; "1.000" stays text (a thousand where "." groups digits).
    whole, dot, fraction = text.rpartition(".")
    if not (dot and fraction in ("0", "00")):
        whole = text
    if whole.isdigit() and whole.isascii():
        return _count_text(whole)
    if _GROUPED_INTEGER.fullmatch(whole):
        return _count_text(whole.translate(_DELETE_SEPARATORS))
    if text[:1] == "-" and _is_number(text[1:].lstrip()):
        return _BAD_EMPLOYEES
    return text  # "" too: text, as for name or plan


def _count(number: int) -> int | _Invalid:
    return number if 0 <= number <= _MAX_EMPLOYEES else _BAD_EMPLOYEES


def _count_text(digits: str) -> int | _Invalid:
    # Checking the length first keeps int() away from huge digit strings.
    if len(digits.lstrip("0")) > _MAX_EMPLOYEES_DIGITS:
        return _BAD_EMPLOYEES
    return _count(int(digits))


def _is_number(text: str) -> bool:
    """Whether text is a plain or grouped integer or a decimal ("12", "1,200", "2.5")."""
    whole, _, fraction = text.partition(".")
    if fraction and not (fraction.isdigit() and fraction.isascii()):
        return False
    return (whole.isdigit() and whole.isascii()) or bool(_GROUPED_INTEGER.fullmatch(whole))


@_memoise
def _email(value: Any) -> str | _Invalid:
    if not isinstance(value, str):
        return _WRONG_TYPE
    email = value.strip().lower()
    local, at, domain = email.partition("@")
    if not local or not at or "@" in domain or len(email.split()) != 1:
        return _BAD_EMAIL
    return email if _is_domain(domain) else _BAD_EMAIL


@_memoise
def _website(value: Any) -> str | _Invalid:
    if not isinstance(value, str):
        return _WRONG_TYPE
    url = value.strip()
    if _SCHEME.match(url):
        return url if _is_http_url(url) else _BAD_URL
    if not url or _SPACE_OR_CONTROL.search(url):
        return _BAD_URL
    # A bare domain, maybe with a port and a path: read it as if it had a scheme.
    try:
        parts = urlsplit("http://" + url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return _BAD_URL
    hostname = parts.hostname
    if parts.username is not None or hostname is None or not _is_domain(hostname):
        return _BAD_URL
    return url


@_memoise
def _avatar(value: Any) -> str | _Invalid:
    if not isinstance(value, str):
        return _WRONG_TYPE
    url = value.strip()
    return url if _is_http_url(url) else _BAD_URL


def _is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host, no whitespace and no control character; the
    port must be valid."""
    return bool(_PLAIN_HTTP_URL.fullmatch(url)) or _is_parsed_http_url(url)


def _is_parsed_http_url(url: str) -> bool:
    if _SPACE_OR_CONTROL.search(url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    # A host of dots and hyphens only ("http://.") names nothing.
    host = parts.hostname or ""
    return parts.scheme.lower() in _HTTP_SCHEMES and host.strip(".-") != ""


def _is_domain(domain: str) -> bool:
    """Two or more dot-separated labels of letters, digits and hyphens, the last one not
    all digits.

    Letters may be non-ASCII (internationalised domains); a trailing dot is refused.
    """
    labels = domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit() or "" in labels:
        return False
    return domain.replace(".", "").replace("-", "").isalnum()


def _phone(value: Any, region: str | None) -> str | _Invalid:
    """E.164 when the text parses as a number of a possible length, else the trimmed text."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, float) and not value.is_integer():
        # A fraction cannot be a phone number; its text would only mislead.
        return _WRONG_TYPE
    else:
        number = _number_text(value)
        if isinstance(number, _Invalid):
            return number
        text = number
    if len(text) > _MEMO_MAX_LEN:
        return _phone_text.__wrapped__(text, region)
    return _phone_text(text, region)


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _phone_text(text: str, region: str | None) -> str:
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return text
    # E.164 has no place for an extension: keep the text rather than lose it.
    # "When it parses" (the contract), not only when libphonenumber knows the number
    # as assigned ("+1 555-555-5555" is E.164 too), but never a length no number of its
    # country has, or a local number without its area code ("555-0100").
    possible = phonenumbers.is_possible_number_with_reason(parsed)
    if parsed.extension or possible != phonenumbers.ValidationResult.IS_POSSIBLE:
        return text
    e164 = _e164(parsed)
    # A doubled trunk prefix ("+49 0030 1234567") leaves one 0 in the number, and its
    # E.164 form reads back as another number: neither is sure to be the sender's, and
    # normalising must change nothing the second time, so the text stays.
    try:
        again = _e164(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:  # never seen; a call must not fail on it
        return text
    return e164 if again == e164 else text


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _address(value: Any, key: str, warnings: list[TraitWarning]) -> dict[str, Any] | _Invalid:
    """Sub-fields matched like traits (plus zip/zipcode/postcode); others kept as sent."""
    if not isinstance(value, dict):
        return _WRONG_TYPE
    out: dict[str, Any] = {}
    claimed: set[str] = set()
    for sub, item in value.items():
        name = _ADDRESS_NAME_CACHE.get(sub)
        if name is None:
            name = _match_key(sub, _ADDRESS_BY_FOLDED, _ADDRESS_NAME_CACHE)
        if not name:
            out[sub] = item
            continue
        if sub != name:
            if name in value or name in claimed:
                warnings.append(TraitWarning(DUPLICATE_TRAIT, f"{key}.{sub}", item))
                continue
            claimed.add(name)
        text = None if item is None else _text(item)
        if isinstance(text, _Invalid):
            warnings.append(TraitWarning(text.code, f"{key}.{sub}", item))
        else:
            out[name] = text
    return out


_NORMALISERS: Final[dict[str, Callable[[Any], Any]]] = {
    "avatar": _avatar,
    "createdAt": _created_at,
    "description": _text,
    "email": _email,
    "employees": _employees,
    "id": _text,
    "industry": _text,
    "name": _text,
    "plan": _text,
    "website": _website,
}
