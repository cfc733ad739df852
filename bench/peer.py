"""The peer: the worker's keyed job written in Quix Streams, as a user of it would.

One process, one stage, exactly once: read calls keyed by groupId (JSON), keep the valid
``group`` calls, normalise their traits with the worker's own ``normalise_traits`` (same
rules, same cost), merge each into its group's state in Quix's state store (the newest
event time wins per trait; memberCount, eventCount, first and last seen; a messageId the
group already applied is dropped), and write the call with its group snapshot to one
output topic (JSON). What it leaves out next to the worker: README.md, "Performance".

``python -m bench.peer --bootstrap B --input T --output O --group G --state-dir D
--expect N`` runs it with an ``on_message_processed`` callback that stops it after ``N``
input records, then prints ``{"library": ..., "records": N, "seconds": s,
"committed_seconds": c, "peak_rss_bytes": b}`` as JSON: ``s`` runs from the first record
processed to the ``N``-th (the worker drain's clock), ``c`` to the end of ``app.run()``,
after its final commit.

It runs in its own interpreter (``make bench`` builds ``.cache/peer-quixstreams`` from
``requirements/peer.txt``): Quix Streams pins confluent-kafka below the version the
worker is locked to. The job's functions below need only the worker's ``normalise``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from worker.normalise import normalise_traits
from worker.times import event_time, format_time

__all__ = ["State", "enrich", "is_group_call", "lenient_loads", "main", "merge"]


class State(Protocol):
    """What the job uses of ``quixstreams.State``: one group's keys."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...

    def exists(self, key: str) -> bool: ...


def lenient_loads(raw: bytes) -> Any:
    """JSON for ``JSONDeserializer(loads=...)``: ``None`` for a value that is not JSON, so
    a bad record is filtered out like any other (and its offset committed)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _id(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def is_group_call(call: Any) -> bool:
    """A ``group`` call the job can merge: a groupId, a userId or anonymousId, and traits
    that are an object when present. Everything else is dropped, uncounted."""
    if not isinstance(call, dict):
        return False
    kind = call.get("type")
    return (
        isinstance(kind, str)
        and kind.strip().lower() == "group"
        and _id(call.get("groupId"))
        and (_id(call.get("userId")) or _id(call.get("anonymousId")))
        and isinstance(call.get("traits", {}), dict)
        and isinstance(call.get("messageId"), str)
    )


def enrich(call: dict[str, Any], key: Any, timestamp: int, headers: Any) -> dict[str, Any]:
    """Normalise the traits and the event time (``apply(..., metadata=True)``)."""
    traits, warnings = normalise_traits(call.get("traits") or {})
    call["type"] = "group"
    call["groupId"] = str(call["groupId"])
    call["traits"] = traits
    call["timestamp"] = format_time(event_time(call, timestamp))
    call["enrichment"] = {
        "warnings": [{"code": w.code, "trait": w.trait, "value": w.value} for w in warnings]
    }
    return call


def merge(call: dict[str, Any], state: State) -> dict[str, Any] | None:
    """Merge a call into its group's state (``apply(..., stateful=True)``); ``None`` for a
    messageId the group already applied. The state keys: ``profile``, ``seen:<messageId>``
    (never expired) and ``member:<userId or anonymousId>``."""
    seen = "seen:" + call["messageId"]
    if state.exists(seen):
        return None
    state.set(seen, 1)
    # format_time's fixed-width UTC text sorts as the instants do.
    when = call["timestamp"]
    stamp = [when, call["messageId"]]
    profile: dict[str, Any] = state.get("profile") or {
        "traits": {},
        "stamps": {},
        "memberCount": 0,
        "eventCount": 0,
        "firstSeen": when,
        "lastSeen": when,
    }
    traits, stamps = profile["traits"], profile["stamps"]
    for name, value in call["traits"].items():
        old = stamps.get(name)
        if old is None or stamp > old:
            traits[name] = value
            stamps[name] = stamp
    user = call.get("userId")
    member = "member:" + (f"u:{user}" if _id(user) else f"a:{call['anonymousId']}")
    if not state.exists(member):
        state.set(member, 1)
        profile["memberCount"] += 1
    profile["eventCount"] += 1
    profile["firstSeen"] = min(profile["firstSeen"], when)
    profile["lastSeen"] = max(profile["lastSeen"], when)
    state.set("profile", profile)
    call["group"] = {
        "id": call["groupId"],
        "traits": traits,
        "memberCount": profile["memberCount"],
        "eventCount": profile["eventCount"],
        "firstSeenAt": profile["firstSeen"],
        "lastSeenAt": profile["lastSeen"],
    }
    return call


def build(
    bootstrap: str, input_topic: str, output_topic: str, group: str, state_dir: str, **extra: Any
) -> Any:
    """The ``Application``, its dataframe wired: what a user of Quix Streams writes."""
    from quixstreams import Application
    from quixstreams.models.serializers.json import JSONDeserializer

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=state_dir,
        loglevel="WARNING",
        **extra,
    )
    calls = app.topic(input_topic, value_deserializer=JSONDeserializer(loads=lenient_loads))
    enriched = app.topic(output_topic, value_serializer="json")
    sdf = app.dataframe(calls)
    sdf = sdf.filter(is_group_call)
    sdf = sdf.apply(enrich, metadata=True)
    sdf = sdf.apply(merge, stateful=True)
    sdf = sdf.filter(lambda call: call is not None)
    sdf.to_topic(enriched)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True, help="consumer group")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--expect", type=int, required=True, help="input records to process")
    parser.add_argument(
        "--commit-interval", type=float, default=None, help="seconds; Quix's default if unset"
    )
    args = parser.parse_args(argv)
    extra: Mapping[str, Any] = (
        {} if args.commit_interval is None else {"commit_interval": args.commit_interval}
    )
    count = 0
    first: float | None = None
    last: float | None = None
    app: Any = None

    def processed(topic: str, partition: int, offset: int) -> None:
        nonlocal count, first, last
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == args.expect:
            last = time.perf_counter()
            app.stop()

    app = build(
        args.bootstrap,
        args.input,
        args.output,
        args.group,
        args.state_dir,
        on_message_processed=processed,
        **extra,
    )
    app.run()
    ended = time.perf_counter()
    import quixstreams

    result: dict[str, Any] = {
        "library": f"quixstreams {quixstreams.__version__}",
        "records": count,
        "seconds": None,
        "committed_seconds": None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if first is not None and last is not None:
        result["seconds"] = last - first
        result["committed_seconds"] = ended - first
    print(json.dumps(result))


if __name__ == "__main__":
    main()
