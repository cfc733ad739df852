"""Tests for worker.normalise: reserved-trait matching, per-trait rules and warnings."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.normalise import (
    _PLAIN_HTTP_URL,
    ADDRESS_FIELDS,
    RESERVED_TRAITS,
    WARNING_CODES,
    TraitWarning,
    _is_http_url,
    _is_parsed_http_url,
    normalise_traits,
)

SPEC_TRAITS = {
    "name": "Initech",
    "industry": "Technology",
    "employees": 329,
    "plan": "enterprise",
    "total billed": 830,
}


def _single(key: str, value: Any, region: str | None = None) -> tuple[Any, list[TraitWarning]]:
    """Normalise one trait; return its output value (or a marker when dropped)."""
    out, warnings = normalise_traits({key: value}, phone_region=region)
    assert len(out) <= 1
    return next(iter(out.values()), "<dropped>"), warnings


def test_spec_example_traits_pass_unchanged() -> None:
    """The spec's example traits are already normal: same output, custom trait untouched."""
    out, warnings = normalise_traits(SPEC_TRAITS)
    assert out == SPEC_TRAITS
    assert list(out) == list(SPEC_TRAITS)
    assert warnings == []


def test_repeated_calls_give_the_same_result() -> None:
    """Normalising the same traits again (answered from the memos) gives the same result."""
    traits = {
        "created_at": "2015-02-23T22:28:55.111000+00:00",
        "Email": " A@B.CO ",
        "website": "initech.com",
        "avatar": "ftp://x",
        "employees": "1,200",
        "phone": "+1 415-555-2671",
        "Address": {"Zip": 1},
    }
    first = normalise_traits(traits, phone_region="US")
    assert normalise_traits(traits, phone_region="US") == first
    assert normalise_traits(dict(reversed(traits.items())), phone_region="US")[0] == first[0]


def test_input_is_not_modified() -> None:
    """normalise_traits leaves its argument as it was."""
    traits = {"Created At": 1424730535, "address": {"zip": 94107}, "x": [1]}
    before = copy.deepcopy(traits)
    normalise_traits(traits)
    assert traits == before


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param("createdAt", "createdAt", id="canonical"),
        pytest.param("created_at", "createdAt", id="snake"),
        pytest.param("CreatedAt", "createdAt", id="pascal"),
        pytest.param("Created At", "createdAt", id="words"),
        pytest.param("created-at", "createdAt", id="kebab"),
        pytest.param("CREATED.AT!", "createdAt", id="punctuation"),
        pytest.param("NAME", "name", id="upper"),
        pytest.param(" e-mail ", "email", id="padded-hyphen"),
        pytest.param("Web Site", "website", id="split-word"),
        pytest.param("ID", "id", id="id"),
        pytest.param("\u00e9mail", "\u00e9mail", id="non-ascii-letter-dropped-so-no-match"),
        pytest.param("\u212aname", "name", id="non-ascii-dropped-before-lowercase"),
        pytest.param("names", "names", id="near-miss-is-custom"),
        pytest.param("", "", id="empty-is-custom"),
        pytest.param("total billed", "total billed", id="custom-kept"),
    ],
)
def test_keys_match_reserved_traits_ignoring_case_and_punctuation(key: str, expected: str) -> None:
    """A key matches a reserved trait on its lower-cased ASCII letters and digits only."""
    out, warnings = normalise_traits({key: None})
    assert out == {expected: None}
    assert warnings == []


@pytest.mark.parametrize(
    ("traits", "expected", "losers"),
    [
        pytest.param(
            {"created_at": 0, "createdAt": 1424730535},
            {"createdAt": "2015-02-23T22:28:55.000Z"},
            [("created_at", 0)],
            id="canonical-wins-even-when-later",
        ),
        pytest.param(
            {"Name": "a", "NAME": "b", "name_": "c"},
            {"name": "a"},
            [("NAME", "b"), ("name_", "c")],
            id="else-first-wins",
        ),
        pytest.param(
            {"email": "not an email", "Email": "a@b.co"},
            {},
            [("Email", "a@b.co")],
            id="invalid-winner-does-not-revive-loser",
        ),
        pytest.param(
            {"plan": "pro", "Plan": None},
            {"plan": "pro"},
            [("Plan", None)],
            id="null-loser-reported",
        ),
    ],
)
def test_duplicate_keys_keep_one_winner(
    traits: dict[str, Any], expected: dict[str, Any], losers: list[tuple[str, Any]]
) -> None:
    """Among keys matching one trait the canonical spelling wins, else the first; the rest
    are reported as duplicate_trait."""
    out, warnings = normalise_traits(traits)
    assert out == expected
    assert [(w.trait, w.value) for w in warnings if w.code == "duplicate_trait"] == losers


def test_output_keeps_payload_order() -> None:
    """Output keys follow the payload order of the winning keys, custom traits included."""
    out, _ = normalise_traits({"z": 1, "Plan": "a", "a": 2, "created_at": 0, "Name": "n"})
    assert list(out) == ["z", "plan", "a", "createdAt", "name"]


@pytest.mark.parametrize("trait", RESERVED_TRAITS)
def test_null_passes_through_for_every_reserved_trait(trait: str) -> None:
    """An explicit null for any reserved trait, in any spelling, stays null."""
    out, warnings = normalise_traits({trait.upper(): None})
    assert out == {trait: None}
    assert warnings == []


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"Created At": "garbage", "nested": [1, {"a": None}]}, id="dict"),
        pytest.param([" spaced ", 1.5, None], id="list"),
        pytest.param("  untrimmed  ", id="str"),
        pytest.param(True, id="bool"),
    ],
)
def test_custom_traits_are_untouched(value: Any) -> None:
    """A trait that is not reserved keeps its key and its value exactly."""
    out, warnings = normalise_traits({"Total Billed": value})
    assert out == {"Total Billed": value}
    assert out["Total Billed"] is value
    assert warnings == []


VALID = [
    # createdAt
    ("createdAt", "2015-02-23T22:28:55.111000+00:00", "2015-02-23T22:28:55.111Z", "py-iso"),
    ("createdAt", "2015-02-23T22:28:55.111Z", "2015-02-23T22:28:55.111Z", "node-iso"),
    ("createdAt", "2015-02-24T03:58:55.111+05:30", "2015-02-23T22:28:55.111Z", "iso-offset"),
    ("createdAt", "2015-02-23", "2015-02-23T00:00:00.000Z", "iso-date"),
    ("createdAt", 1424730535, "2015-02-23T22:28:55.000Z", "epoch-seconds"),
    ("createdAt", 1424730535111, "2015-02-23T22:28:55.111Z", "epoch-millis"),
    ("createdAt", 1424730535.111, "2015-02-23T22:28:55.111Z", "epoch-float"),
    ("createdAt", "1424730535", "2015-02-23T22:28:55.000Z", "epoch-digit-string"),
    # employees
    ("employees", 329, 329, "int"),
    ("employees", 0, 0, "zero"),
    ("employees", 329.0, 329, "whole-float"),
    ("employees", "329", 329, "digit-string"),
    ("employees", " 42 ", 42, "padded-digit-string"),
    ("employees", "1,200", 1200, "comma-grouped"),
    ("employees", "1 200", 1200, "space-grouped"),
    ("employees", "1\u202f200\u202f000", 1200000, "narrow-nbsp-grouped"),
    ("employees", "51-200", "51-200", "range-kept"),
    ("employees", " 10k+ ", "10k+", "text-trimmed"),
    ("employees", "12,00", "12,00", "bad-grouping-kept-as-text"),
    ("employees", 12.5, "12.5", "fraction-becomes-text"),
    ("employees", "12.5", "12.5", "decimal-text-kept"),
    ("employees", "329.0", 329, "zero-fraction-text"),
    ("employees", " 1,200.00 ", 1200, "grouped-zero-fraction-text"),
    ("employees", "1.000", "1.000", "dot-grouped-thousand-kept-as-text"),
    ("employees", "51-200.0", "51-200.0", "range-with-fraction-kept"),
    ("employees", "  ", "", "blank-text-trimmed-like-name"),
    ("employees", 2**53 - 1, 2**53 - 1, "max-safe-integer"),
    # email
    ("email", " Peter@Initech.COM ", "peter@initech.com", "trimmed-lowered"),
    ("email", "first.last+tag@mail.example.co.uk", "first.last+tag@mail.example.co.uk", "tags"),
    # website
    ("website", "https://initech.com", "https://initech.com", "https"),
    ("website", " http://www.initech.com/about?x=1 ", "http://www.initech.com/about?x=1", "http"),
    ("website", "HTTPS://Initech.com", "HTTPS://Initech.com", "not-rewritten"),
    ("website", "initech.com", "initech.com", "bare-domain"),
    ("website", "www.initech.com/path", "www.initech.com/path", "bare-domain-path"),
    ("website", "initech.com:8080", "initech.com:8080", "bare-domain-port"),
    ("website", "http://localhost:3000/", "http://localhost:3000/", "url-any-host"),
    ("website", "x.io/?ref=https://y.io", "x.io/?ref=https://y.io", "bare-url-in-query"),
    # avatar
    ("avatar", " https://cdn.initech.com/a.png ", "https://cdn.initech.com/a.png", "url"),
    (
        "avatar",
        "https://cdn.initech.com/" + "a" * 300,
        "https://cdn.initech.com/" + "a" * 300,
        "long",
    ),
    ("avatar", "http://[::1]/a.png", "http://[::1]/a.png", "ipv6-host"),
    # text traits
    ("name", " Initech ", "Initech", "str-trimmed"),
    ("id", 42, "42", "int-to-str"),
    ("id", 2.0, "2", "whole-float-to-int-str"),
    ("plan", 2.5, "2.5", "fraction-to-str"),
    ("industry", "", "", "empty-kept"),
    ("description", "Line 1\nLine 2", "Line 1\nLine 2", "inner-newline-kept"),
]


@pytest.mark.parametrize(
    ("trait", "value", "expected"),
    [pytest.param(t, v, e, id=f"{t}-{i}") for t, v, e, i in VALID],
)
def test_valid_values_are_normalised(trait: str, value: Any, expected: Any) -> None:
    """A valid value comes out in the trait's normal form, with no warning."""
    out, warnings = _single(trait, value)
    assert (out, type(out)) == (expected, type(expected))
    assert warnings == []


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        pytest.param("+1 (415) 555-2671", None, "+14155552671", id="international"),
        pytest.param(" +44 20 7946 0958 ", None, "+442079460958", id="international-gb"),
        pytest.param("(415) 555-2671", "US", "+14155552671", id="national-with-region"),
        pytest.param("020 7946 0958", "GB", "+442079460958", id="national-gb"),
        pytest.param(4155552671, "US", "+14155552671", id="int-with-region"),
        pytest.param(4155552671.0, "US", "+14155552671", id="whole-float"),
        pytest.param(" (415) 555-2671 ", None, "(415) 555-2671", id="national-no-region"),
        pytest.param(4155552671, None, "4155552671", id="int-no-region-is-text"),
        pytest.param("555-0100", "US", "555-0100", id="local-only-kept"),
        pytest.param("+1 555-555-5555", None, "+15555555555", id="parses-not-assigned"),
        pytest.param("+44 7700 900123", None, "+447700900123", id="parses-drama-range"),
        pytest.param("12", "US", "12", id="impossible-length-kept"),
        pytest.param("+1 415-555-2671 ext. 12", None, "+1 415-555-2671 ext. 12", id="ext-kept"),
        pytest.param("call us", "US", "call us", id="not-a-number-kept"),
        pytest.param("+1" + "5" * 300, None, "+1" + "5" * 300, id="too-long-kept"),
        # A doubled trunk prefix: libphonenumber drops one 0 per reading, so its E.164
        # form would read back as another number.
        pytest.param("+49 0030 1234567", None, "+49 0030 1234567", id="doubled-trunk-kept"),
        pytest.param("0009801", "AU", "0009801", id="doubled-trunk-national-kept"),
    ],
)
def test_phone_becomes_e164_when_it_parses(value: Any, region: str | None, expected: str) -> None:
    """A number that parses, at a length its country's numbers have, becomes E.164 (assigned
    or not); anything else string-like is kept trimmed."""
    assert _single("Phone", value, region) == (expected, [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            {"Street": " 1 Main St ", "City": "Austin", "State": "TX", "Country": "US"},
            {"street": "1 Main St", "city": "Austin", "state": "TX", "country": "US"},
            id="case-insensitive",
        ),
        pytest.param({"zip": 78701}, {"postalCode": "78701"}, id="zip-number"),
        pytest.param({"Zip Code": " 78701 "}, {"postalCode": "78701"}, id="zip-code"),
        pytest.param({"post_code": "SW1A"}, {"postalCode": "SW1A"}, id="postcode"),
        pytest.param({"postal_code": "SW1A"}, {"postalCode": "SW1A"}, id="postal-code"),
        pytest.param({"city": None}, {"city": None}, id="null-sub-field"),
        pytest.param({}, {}, id="empty"),
        pytest.param(
            {"line2": [" Suite 5 "], "street": "1 Main St"},
            {"line2": [" Suite 5 "], "street": "1 Main St"},
            id="other-sub-keys-untouched",
        ),
    ],
)
def test_address_sub_fields_are_matched_and_trimmed(
    value: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Address sub-fields are matched like traits, zip aliases become postalCode, values
    become trimmed strings, and other sub-keys stay as sent."""
    assert _single("Address", value) == (expected, [])


INVALID = [
    # (key, value, trait in the warning, code, output, id)
    ("Created At", "next tuesday", "Created At", "invalid_date", {}, "date-garbage"),
    ("createdAt", 10**30, "createdAt", "invalid_date", {}, "date-out-of-range"),
    ("createdAt", True, "createdAt", "invalid_type", {}, "date-bool"),
    ("createdAt", ["2015-02-23"], "createdAt", "invalid_type", {}, "date-list"),
    ("employees", -5, "employees", "invalid_employees", {}, "employees-negative"),
    ("employees", -0.5, "employees", "invalid_employees", {}, "employees-negative-float"),
    ("employees", "-1,200", "employees", "invalid_employees", {}, "employees-negative-text"),
    ("employees", "- 2.5", "employees", "invalid_employees", {}, "employees-negative-decimal"),
    ("employees", 2**53, "employees", "invalid_employees", {}, "employees-too-large"),
    ("employees", "9" * 5000, "employees", "invalid_employees", {}, "employees-huge-text"),
    ("employees", False, "employees", "invalid_type", {}, "employees-bool"),
    ("employees", {"n": 1}, "employees", "invalid_type", {}, "employees-dict"),
    ("employees", [329], "employees", "invalid_type", {}, "employees-list"),
    ("email", "peter@initech", "email", "invalid_email", {}, "email-no-tld"),
    ("email", "peter.initech.com", "email", "invalid_email", {}, "email-no-at"),
    ("email", "a@b@c.com", "email", "invalid_email", {}, "email-two-ats"),
    ("email", "@initech.com", "email", "invalid_email", {}, "email-no-local"),
    ("email", "peter @initech.com", "email", "invalid_email", {}, "email-space"),
    ("email", "peter@initech.", "email", "invalid_email", {}, "email-empty-tld"),
    ("email", "peter@initech..com", "email", "invalid_email", {}, "email-empty-label"),
    ("email", 42, "email", "invalid_type", {}, "email-number"),
    ("website", "not a url", "website", "invalid_url", {}, "website-words"),
    ("website", "ftp://initech.com", "website", "invalid_url", {}, "website-ftp"),
    ("website", "https://", "website", "invalid_url", {}, "website-no-host"),
    ("website", "localhost", "website", "invalid_url", {}, "website-bare-no-dot"),
    ("website", "javascript:alert(1)", "website", "invalid_url", {}, "website-js"),
    ("website", "mailto:a@initech.com", "website", "invalid_url", {}, "website-mailto"),
    ("website", "", "website", "invalid_url", {}, "website-empty"),
    ("website", 7, "website", "invalid_type", {}, "website-number"),
    ("website", ["initech.com"], "website", "invalid_type", {}, "website-list"),
    ("website", "initech.com/" + "a b" * 200, "website", "invalid_url", {}, "website-long"),
    ("Avatar", "cdn.initech.com/a.png", "Avatar", "invalid_url", {}, "avatar-bare-domain"),
    ("avatar", "https://x.com:99999/a", "avatar", "invalid_url", {}, "avatar-bad-port"),
    ("avatar", "data:image/png;base64,AA", "avatar", "invalid_url", {}, "avatar-data-uri"),
    ("avatar", "\x00https://x.com/a.png", "avatar", "invalid_url", {}, "avatar-leading-nul"),
    ("avatar", "https://x.com/a\x00.png", "avatar", "invalid_url", {}, "avatar-nul-in-path"),
    ("avatar", "https://x.com\x7f/a.png", "avatar", "invalid_url", {}, "avatar-del-in-host"),
    ("website", "initech.com/\x01", "website", "invalid_url", {}, "website-bare-control"),
    ("website", "https://x.com/a\x81b", "website", "invalid_url", {}, "website-c1-control"),
    ("avatar", "https://x.com/a\x9bb.png", "avatar", "invalid_url", {}, "avatar-c1-control"),
    ("website", "initech.com/\x90", "website", "invalid_url", {}, "website-bare-c1-control"),
    ("website", "ftp://x.com/?u=http://y", "website", "invalid_url", {}, "website-ftp-http-query"),
    ("website", "http://.", "website", "invalid_url", {}, "website-host-a-dot"),
    ("avatar", "https://-./a.png", "avatar", "invalid_url", {}, "avatar-host-no-label"),
    ("phone", True, "phone", "invalid_type", {}, "phone-bool"),
    ("phone", 4155552671.5, "phone", "invalid_type", {}, "phone-fraction"),
    ("phone", ["+14155552671"], "phone", "invalid_type", {}, "phone-list"),
    ("name", True, "name", "invalid_type", {}, "name-bool"),
    ("industry", ["Tech"], "industry", "invalid_type", {}, "industry-list"),
    ("description", {"a": 1}, "description", "invalid_type", {}, "description-dict"),
    ("id", float("nan"), "id", "invalid_type", {}, "id-nan"),
    ("address", "1 Main St", "address", "invalid_type", {}, "address-string"),
    ("address", ["1 Main St"], "address", "invalid_type", {}, "address-list"),
    (
        "Address",
        {"City": True, "line2": True},
        "Address.City",
        "invalid_type",
        {"address": {"line2": True}},
        "address-sub-field-bool",
    ),
    (
        "address",
        {"zip": "1", "postalCode": "2", "Post Code": "3"},
        "address.zip",
        "duplicate_trait",
        {"address": {"postalCode": "2"}},
        "address-sub-field-duplicate",
    ),
]


@pytest.mark.parametrize(
    ("key", "value", "trait", "code", "expected"),
    [pytest.param(k, v, t, c, o, id=i) for k, v, t, c, o, i in INVALID],
)
def test_invalid_values_are_dropped_with_a_warning(
    key: str, value: Any, trait: str, code: str, expected: dict[str, Any]
) -> None:
    """A bad value is left out of the output and its first warning names the code, the
    key as sent and the original value."""
    out, warnings = normalise_traits({key: value, "kept": 1})
    assert out == {**expected, "kept": 1}
    sent = value[trait.partition(".")[2]] if "." in trait else value
    assert (warnings[0].code, warnings[0].trait, warnings[0].value) == (code, trait, sent)


def test_every_warning_code_is_exercised() -> None:
    """The invalid-value table reaches every warning code the module declares."""
    assert {row[3] for row in INVALID} == set(WARNING_CODES)


# --- Properties -------------------------------------------------------------------------

_SEPARATORS = st.sampled_from(["", "", "_", "-", " ", ".", "  "])


@st.composite
def _spelling(draw: st.DrawFn, name: str) -> str:
    """A spelling of name: case changed per letter, separators inserted anywhere."""
    chars = [draw(_SEPARATORS)]
    for char in name:
        chars.append(char.upper() if draw(st.booleans()) else char.lower())
        chars.append(draw(_SEPARATORS))
    return "".join(chars)


_RESERVED_SPELLINGS = st.sampled_from(RESERVED_TRAITS).flatmap(
    lambda name: st.tuples(st.just(name), _spelling(name))
)

_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values shaped like what reserved traits receive, so properties exercise the happy paths.
_PLAUSIBLE = st.sampled_from(
    [
        "2015-02-23T22:28:55.111000+00:00",
        "2015-02-24T03:58:55.111+05:30",
        "2015-02-23",
        1424730535,
        1424730535111.5,
        " Peter@Initech.COM ",
        "initech.com",
        " https://initech.com/a.png ",
        "+1 (415) 555-2671",
        "(415) 555-2671",
        "020 7946 0958",
        4155552671,
        "1,200",
        " 51-200 ",
        12.5,
        329.0,
        "-3",
        {"Zip": 78701, "City": " Austin ", "zip code": "x", "line2": None, "state": []},
    ]
)
_VALUES = _PLAUSIBLE | _JSON
_KEYS = _RESERVED_SPELLINGS.map(lambda pair: pair[1]) | st.text(max_size=12)
_TRAITS = st.dictionaries(_KEYS, _VALUES, max_size=10)
_REGIONS = st.sampled_from([None, "US", "GB", "DE"])


@given(_TRAITS, _REGIONS)
def test_normalising_twice_changes_nothing(traits: dict[str, Any], region: str | None) -> None:
    """Normalising normalised traits gives identical traits and no warnings."""
    once, _ = normalise_traits(traits, phone_region=region)
    twice, warnings = normalise_traits(once, phone_region=region)
    # repr() also compares types (1 vs 1.0) and key order, which == does not.
    assert repr(twice) == repr(once)
    assert warnings == []


_TRAIT_TEXT = st.text(alphabet="0123456789+-.,:/@ ()extTZabcwhtps\u00a0\u0130_[]?#%", max_size=40)


@given(
    st.sampled_from(RESERVED_TRAITS),
    _TRAIT_TEXT | st.text() | st.integers() | st.floats(),
    _REGIONS,
)
def test_each_trait_is_idempotent_on_scalars(name: str, value: Any, region: str | None) -> None:
    """Normalising one reserved trait twice gives what normalising it once gave, silently."""
    once, _ = normalise_traits({name: value}, phone_region=region)
    twice, warnings = normalise_traits(once, phone_region=region)
    assert repr(twice) == repr(once)
    assert warnings == []


@given(
    st.from_regex(r"\+?[1-9][0-9]{0,2} ?0{1,3}[0-9]{4,11}", fullmatch=True) | st.integers(0),
    st.sampled_from([None, "US", "GB", "DE", "AU", "FR", "IN"]),
)
def test_phone_numbers_are_idempotent(value: Any, region: str | None) -> None:
    """Phone-like text, national prefixes included, normalises to a fixed point at once."""
    once, _ = normalise_traits({"phone": value}, phone_region=region)
    assert normalise_traits(once, phone_region=region) == (once, [])


@given(st.dictionaries(st.text(), _JSON), _REGIONS)
def test_never_raises_for_json_values(traits: dict[str, Any], region: str | None) -> None:
    """Any JSON object of traits normalises without raising, and every warning quotes a
    sent key."""
    out, warnings = normalise_traits(traits, phone_region=region)
    assert isinstance(out, dict)
    for warning in warnings:
        assert any(warning.trait == k or warning.trait.startswith(k + ".") for k in traits)


@given(st.sampled_from(RESERVED_TRAITS).flatmap(lambda n: st.tuples(st.just(n), _spelling(n))))
def test_spellings_map_to_the_canonical_key(pair: tuple[str, str]) -> None:
    """Any mix of case, spaces, underscores, hyphens and dots in a reserved name matches it."""
    canonical, spelling = pair
    out, warnings = normalise_traits({spelling: None})
    assert out == {canonical: None}
    assert warnings == []


@given(
    st.sampled_from(ADDRESS_FIELDS).flatmap(lambda n: st.tuples(st.just(n), _spelling(n))),
    st.text(),
)
def test_address_spellings_map_to_the_canonical_sub_key(pair: tuple[str, str], text: str) -> None:
    """Address sub-keys match their canonical names in any spelling, values trimmed."""
    canonical, spelling = pair
    out, warnings = normalise_traits({"address": {spelling: text}})
    assert out == {"address": {canonical: text.strip()}}
    assert warnings == []


@given(st.from_regex(_PLAIN_HTTP_URL, fullmatch=True))
def test_a_url_the_quick_check_accepts_the_full_check_accepts(url: str) -> None:
    """The quick check of plain http(s) URLs never accepts what the full check refuses."""
    assert _is_parsed_http_url(url)


@given(st.text())
def test_the_quick_and_full_url_checks_agree_on_any_text(text: str) -> None:
    """avatar and website read the same whether or not the quick check is taken."""
    for url in (text, "https://" + text, "http://a.b/" + text):
        assert _is_http_url(url) == _is_parsed_http_url(url)
