"""A deterministic stream of realistic raw Segment calls for the benchmark.

``generate_calls(n, seed)`` yields ``(key, value)`` pairs as a raw topic would carry
them: about 1 KB of JSON each, keyed by the sender's ``userId`` (else
``anonymousId``). The same ``n`` and ``seed`` always give the same bytes.

The mix, by share of calls:

- ~92% group calls for 50,000 groups of Zipf-like popularity (exponent 1: the busiest
  group gets ~9% of the calls), each with 1 to 15 traits drawn from a per-group profile
  with mixed key spellings (``created_at``, ``CreatedAt``, ``Created At``, ``createdAt``);
- 5% calls of other types (``identify``, ``track``, ``page``), skipped by the worker;
- 1% bad calls (invalid JSON, no ``groupId``, no identity, ``traits`` not an object),
  dead-lettered;
- 2% redeliveries: the exact bytes of an earlier group call, so the same messageId,
  counted as duplicates. Most repeat one of the last 5,000 group calls; a quarter of
  those sent once the stream is past the dedupe window (24 h of event time) are late:
  they repeat one of the stream's first 5,000 group calls, more than the window earlier
  in event time (a phone retrying after a day offline), so only dedupe by arrival
  catches them (``worker.dedupe``).

Event times start at ``BASE_MS`` and advance so that ``n`` calls span ``EVENT_SPAN_MS``
(36 h: longer than the 24 h dedupe window, so recent messageIds are pruned), with up to
a few seconds of disorder, as mobile clients deliver late.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from worker.times import format_time as _iso

__all__ = [
    "BASE_MS",
    "EVENT_SPAN_MS",
    "GROUPS",
    "Kind",
    "Mix",
    "generate_calls",
    "group_id_of",
    "group_profile",
]

GROUPS = 50_000
BASE_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
EVENT_SPAN_MS = 36 * 3_600_000
_ZIPF_EXPONENT = 1.0
_OTHER_SHARE = 0.05
_BAD_SHARE = 0.01
_DUPLICATE_SHARE = 0.02
_DUPLICATE_LOOKBACK = 5_000
# Redeliveries of the stream's first group calls, once they are older than this.
_LATE_SHARE = 0.25
_LATE_AFTER_MS = 24 * 3_600_000

_CREATED_AT = ("createdAt", "created_at", "CreatedAt", "Created At")
_INDUSTRIES = ("Technology", "Retail", "Finance", "Healthcare", "Education", "Media")
_PLANS = ("free", "starter", "pro", "enterprise")
_EMPLOYEES: tuple[Any, ...] = (12, 329, "1,200", "51-200", "1 200", 5000, "10")
_CITIES = ("Berlin", "San Francisco", "London", "Paris", "Tokyo", "Lagos", "Lima")
_BROWSERS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
)


@dataclass(frozen=True, slots=True)
class Mix:
    """How many calls of each kind a generated stream holds."""

    group: int = 0
    other: int = 0
    bad: int = 0
    duplicate: int = 0
    late_duplicate: int = 0

    @property
    def redeliveries(self) -> int:
        """Every call that repeats an earlier one: the worker's duplicates."""
        return self.duplicate + self.late_duplicate

    @property
    def total(self) -> int:
        """Every call generated."""
        return self.group + self.other + self.bad + self.redeliveries


def group_profile(index: int, seed: int) -> dict[str, Any]:
    """The traits group ``index`` may send, spelled as that group's sender spells them."""
    rng = random.Random(seed * 1_000_003 + index)
    name = f"Company {index:05d}"
    slug = f"company-{index:05d}"
    created = BASE_MS - rng.randrange(5 * 365) * 86_400_000
    created_value: Any = (
        created // 1000 if rng.random() < 0.3 else f"2019-0{1 + index % 9}-1{index % 10}T10:00:00Z"
    )
    traits: dict[str, Any] = {
        rng.choice(("name", "Name")): name,
        rng.choice(_CREATED_AT): created_value,
        rng.choice(("industry", "Industry")): rng.choice(_INDUSTRIES),
        rng.choice(("employees", "Employees")): rng.choice(_EMPLOYEES),
        "plan": rng.choice(_PLANS),
        "website": f"https://{slug}.example.com",
        rng.choice(("email", "Email", "E-mail")): f"Billing@{slug}.example.com ",
        "phone": f"+1 415 555 {rng.randrange(10_000):04d}",
        "address": {
            "city": rng.choice(_CITIES),
            rng.choice(("zip", "postalCode", "postal_code")): f"{rng.randrange(100_000):05d}",
            "street": f"{rng.randrange(1, 999)} Market St",
        },
        "description": f"{name} makes things for other companies.",
        "avatar": f"https://cdn.example.com/logos/{slug}.png",
        "id": str(index),
        "total billed": rng.randrange(100_000),
        "seats": rng.randrange(1, 500),
        "region": rng.choice(("emea", "amer", "apac")),
    }
    return traits


def _zipf_cumulative(groups: int) -> list[float]:
    total = 0.0
    cumulative = []
    for rank in range(1, groups + 1):
        total += 1.0 / rank**_ZIPF_EXPONENT
        cumulative.append(total)
    return [c / total for c in cumulative]


def _context(rng: random.Random, user: int) -> dict[str, Any]:
    return {
        "ip": f"10.{user % 256}.{(user >> 8) % 256}.{rng.randrange(1, 255)}",
        "library": {"name": "analytics.js", "version": "4.1.0"},
        "locale": "en-US",
        "page": {
            "path": "/settings/billing",
            "referrer": "https://www.example.com/",
            "title": "Billing - Example App",
            "url": "https://app.example.com/settings/billing",
        },
        "userAgent": rng.choice(_BROWSERS),
        "timezone": "Europe/Berlin",
    }


Kind = Literal["group", "other", "bad", "duplicate", "late_duplicate"]


def generate_calls(
    n: int, seed: int = 1, *, groups: int = GROUPS
) -> Iterator[tuple[bytes, bytes, Kind]]:
    """``n`` raw calls to ``groups`` groups as ``(key, value, kind)``; deterministic for
    ``(n, seed, groups)``."""
    rng = random.Random(seed)
    cumulative = _zipf_cumulative(groups)
    profiles: dict[int, list[tuple[str, Any]]] = {}
    recent_group_calls: list[tuple[bytes, bytes]] = []
    # The stream's first group calls, and their event times (ascending, but for the
    # few seconds of disorder).
    first_group_calls: list[tuple[bytes, bytes]] = []
    first_event_ms: list[int] = []
    step = EVENT_SPAN_MS / max(n, 1)
    for i in range(n):
        now = BASE_MS + int(i * step)
        roll = rng.random()
        if roll < _DUPLICATE_SHARE and recent_group_calls:
            late = bisect.bisect_left(first_event_ms, now - _LATE_AFTER_MS)
            if late and rng.random() < _LATE_SHARE:
                yield *first_group_calls[rng.randrange(late)], "late_duplicate"
            else:
                yield *rng.choice(recent_group_calls), "duplicate"
            continue
        roll -= _DUPLICATE_SHARE
        user = rng.randrange(1_000_000)
        event_ms = now - rng.randrange(3000)
        call: dict[str, Any] = {
            "messageId": f"{seed:x}-{i:08x}-{rng.getrandbits(64):016x}",
            "userId": f"user-{user:07d}",
            "anonymousId": f"anon-{rng.getrandbits(48):012x}",
            "timestamp": _iso(event_ms),
            "originalTimestamp": _iso(event_ms),
            "sentAt": _iso(event_ms + 40),
            "receivedAt": _iso(event_ms + 95),
            "context": _context(rng, user),
            "integrations": {"All": True, "Salesforce": False},
            "version": 2,
        }
        if roll < _OTHER_SHARE:
            call["type"] = rng.choice(("identify", "track", "page"))
            call["event"] = "Plan Upgraded"
            call["properties"] = {"plan": rng.choice(_PLANS), "seats": rng.randrange(500)}
            yield call["userId"].encode(), orjson.dumps(call), "other"
            continue
        roll -= _OTHER_SHARE
        index = bisect.bisect_left(cumulative, rng.random())
        group_id = f"group-{index:05d}"
        profile = profiles.get(index)
        if profile is None:
            profile = profiles[index] = list(group_profile(index, seed).items())
        traits = dict(rng.sample(profile, rng.randint(1, 15)))
        call.update(type="group", groupId=group_id, traits=traits)
        if roll < _BAD_SHARE:
            yield call["userId"].encode(), _spoil(call, rng), "bad"
            continue
        value = orjson.dumps(call)
        key = call["userId"].encode()
        if len(first_group_calls) < _DUPLICATE_LOOKBACK:
            first_group_calls.append((key, value))
            first_event_ms.append(event_ms)
        if len(recent_group_calls) < _DUPLICATE_LOOKBACK:
            recent_group_calls.append((key, value))
        else:
            recent_group_calls[i % _DUPLICATE_LOOKBACK] = (key, value)
        yield key, value, "group"


def _spoil(call: dict[str, Any], rng: random.Random) -> bytes:
    """A call the worker must dead-letter, one of several ways."""
    kind = rng.randrange(4)
    if kind == 0:
        return orjson.dumps(call)[:-40]  # truncated: invalid JSON
    if kind == 1:
        del call["groupId"]
    elif kind == 2:
        del call["userId"], call["anonymousId"]
    else:
        call["traits"] = list(call["traits"])
    return orjson.dumps(call)


def group_id_of(value: bytes) -> bytes:
    """The groupId's text in a generated call's bytes, found without parsing it (the
    generator writes it plainly, near the end); b"" when there is none (a bad call)."""
    at = value.rfind(b'"groupId":"')
    if at < 0:
        return b""
    start = at + len(b'"groupId":"')
    end = value.find(b'"', start)
    return value[start:end] if end >= 0 else b""  # a truncated (bad) call
