"""What a compiled core would buy: the Python hot path and the Rust prototype, side by side.

``python -m bench.compiled.measure [--calls 100000] [--runs 3]`` builds the extension when
it is missing or older than its sources (``maturin develop --release`` into this venv:
needs cargo). Each run times the worker's ``Processor`` (``run_python``: one stage, as
``bench.hotpath.measure_hot_path`` does, but over ``InMemoryStateStore``) and the
prototype over the same generated calls (``bench.hotpath.make_records``), each in a
fresh process, in turn, on the CPU clock of the thread that runs them. It prints the
median µs per call of each and of their ratio, then checks the prototype's outputs
against the worker's on the same calls (bench/compiled/README.md).

The prototype (``group_worker_core.Core``) does a call's whole stateful step in Rust; its
store is a dict of record bytes, as a database would hold them. A call the prototype
does not handle comes back as ``FALLBACK`` with nothing written, and ``_PythonFallback``
runs the worker's own code for it over the same dicts, inside the timing. Like for like,
the Python side keeps its state in dicts too (the in-memory store, decoded states), not
in ``measure_hot_path``'s RocksDB store, and both sides run with the worker's collector
settings (``tune_collector``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from bench.hotpath import CountingSink, FixedClock, make_records
from worker import codec
from worker.dedupe import arrival_ms, is_duplicate, seen_record_key
from worker.events import DeadLetter, Enriched, Record, SourceRecord
from worker.members import membership_from_record, membership_key, membership_record
from worker.members import merge_membership as merge_member
from worker.normalise import normalise_traits
from worker.pipeline import Settings, fit_letter, process_record
from worker.processor import Processor, Routes
from worker.profile import group_snapshot, state_from_record, state_record
from worker.service import tune_collector
from worker.state import Applied, merge_call
from worker.store import InMemoryStateStore

__all__ = ["CompiledRun", "main", "run_compiled", "run_python"]

_CRATE = Path(__file__).resolve().parent
_TOPIC = "segment.raw"
_BATCH = 1000  # as bench.hotpath: a commit, so a changelog write, every 1,000 records
_WINDOW_MS = 86_400_000
_DLQ_BYTES = 1_048_576


class _Core(Protocol):
    def process(
        self, value: bytes, partition: int, offset: int, arrival_ms: int, now_ms: int
    ) -> tuple[int, bytes | None, bytes | None]: ...


class _Sink(Protocol):
    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Any = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None: ...


class RecordingSink(CountingSink):
    """A ``CountingSink`` that also keeps every record, for comparing outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[str, bytes | None, bytes]] = []

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Any = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None:
        super().produce(topic, key, value, headers, partition, timestamp, report=report)
        self.kept.append((topic, key, value))


def load_core(*, rebuild: bool = False) -> ModuleType:
    """The extension module, built first when missing, older than its sources, or when
    ``rebuild`` is set (blocks for the build; needs cargo and maturin)."""
    spec = importlib.util.find_spec("group_worker_core")
    sources = [_CRATE / "Cargo.toml", *(_CRATE / "src").glob("*.rs")]
    built = Path(spec.origin).stat().st_mtime if spec and spec.origin else 0.0
    if rebuild or any(p.stat().st_mtime > built for p in sources):
        maturin = Path(sys.executable).parent / "maturin"
        if not maturin.exists():
            sys.exit("maturin is missing: .venv/bin/pip install 'maturin>=1.16,<2'")
        env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
        command = [str(maturin), "develop", "--release", "--manifest-path", "Cargo.toml"]
        subprocess.run(command, cwd=_CRATE, env=env, check=True)
        importlib.invalidate_caches()
    return importlib.import_module("group_worker_core")


class _Phone:
    """One phone number as the worker normalises it, timed: the prototype asks once per
    number (it remembers the answer), and Python's ``phonenumbers`` does the work."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, text: str) -> str:
        start = time.thread_time()
        traits, _ = normalise_traits({"phone": text})
        self.seconds += time.thread_time() - start
        self.calls += 1
        return str(traits["phone"])


@dataclass(slots=True)
class _Store:
    """The dicts standing in for a partition's store, and their change set."""

    states: dict[str, bytes] = field(default_factory=dict)
    members: dict[str, bytes] = field(default_factory=dict)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    changed_states: dict[str, bytes] = field(default_factory=dict)
    changed_members: dict[str, bytes] = field(default_factory=dict)
    changed_seen: dict[str, int] = field(default_factory=dict)


class _PythonFallback:
    """The worker's own code for a call the prototype does not handle, over ``_Store``."""

    def __init__(self, store: _Store, sink: _Sink) -> None:
        self._store, self._sink = store, sink
        self._settings = Settings()

    def __call__(self, record: SourceRecord, now_ms: int) -> str:
        """Process one record; returns its last outcome's kind."""
        kind, arrival = "skipped", arrival_ms(record, now_ms)
        for outcome in process_record(record, self._settings, arrival):
            kind = outcome.kind
            if isinstance(outcome, Enriched):
                kind = self._merge(outcome, arrival, now_ms)
            elif isinstance(outcome, DeadLetter):
                self._sink.produce("dlq", outcome.key, fit_letter(outcome.letter, _DLQ_BYTES))
        return kind

    def _merge(self, enriched: Enriched, arrival: int, now_ms: int) -> str:
        s, call = self._store, enriched.call
        seen = (enriched.group_id, call["messageId"])
        if is_duplicate(s.seen.get(seen), arrival, _WINDOW_MS):
            return "duplicate"
        applied = Applied(
            enriched.group_id,
            call["messageId"],
            enriched.event_time_ms,
            enriched.member_kind,
            enriched.member_id,
            call["traits"],
        )
        key = membership_key(applied.group_id, applied.member_kind, applied.member_id)
        raw_member = s.members.get(key)
        member = None if raw_member is None else membership_from_record(codec.decode(raw_member))
        raw_state = s.states.get(applied.group_id)
        state = None if raw_state is None else state_from_record(codec.decode(raw_state))
        merged = merge_call(state, applied, new_member=member is None, now_ms=now_ms)
        s.states[applied.group_id] = s.changed_states[applied.group_id] = codec.encode(
            state_record(merged)
        )
        s.seen[seen] = s.changed_seen[seen_record_key(*seen)] = arrival
        moved = merge_member(member, applied)
        if moved is not None:
            s.members[key] = s.changed_members[key] = codec.encode(membership_record(moved))
        call["group"] = group_snapshot(merged)
        self._sink.produce("enriched", enriched.group_id.encode(), codec.encode(call))
        return "enriched"


@dataclass(slots=True)
class CompiledRun:
    """One run of the prototype: its CPU time and what the Python path had to do."""

    cpu_seconds: float
    fallbacks: dict[int, str]  # offset -> outcome kind, for the records Python did
    store: _Store
    phone_seconds: float  # of cpu_seconds, in Python's phonenumbers
    phone_calls: int


def _collector_as_worker() -> tuple[int, ...]:
    """As ``measure_hot_path``: the input is the benchmark's, not the worker's (frozen),
    and the collector runs as in the worker. Returns the thresholds to put back."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    tune_collector()
    return thresholds


def _collector_back(thresholds: tuple[int, ...]) -> None:
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def run_python(records: Sequence[Record], sink: CountingSink) -> float:
    """CPU seconds of the worker's ``Processor`` over ``records``: ``measure_hot_path``
    with one stage, over ``InMemoryStateStore`` (like the prototype's dicts) instead of
    RocksDB."""
    store = InMemoryStateStore()
    routes = Routes(_TOPIC, "enriched", "dlq", "state", "members")
    processor = Processor(
        routes, Settings(), store, sink, FixedClock(), dedupe_window_ms=_WINDOW_MS
    )
    thresholds = _collector_as_worker()
    cpu = time.thread_time()
    for start in range(0, len(records), _BATCH):
        processor.process(list(records[start : start + _BATCH]))
        processor.write_changelog()
        store.commit()
    cpu = time.thread_time() - cpu
    _collector_back(thresholds)
    return cpu


def run_compiled(records: Sequence[Record], module: ModuleType, sink: _Sink) -> CompiledRun:
    """Process ``records`` as ``measure_hot_path`` does (batches of 1,000, a changelog
    write after each), with the prototype and the Python path for what it leaves out."""
    store = _Store()
    phone = _Phone()
    core: _Core = module.Core(
        _TOPIC,
        _WINDOW_MS,
        phone,
        store.states,
        store.members,
        store.seen,
        store.changed_states,
        store.changed_members,
        store.changed_seen,
    )
    fallback = _PythonFallback(store, sink)
    enriched, fallen = module.ENRICHED, module.FALLBACK
    clock, produce = FixedClock(), sink.produce
    fallbacks: dict[int, str] = {}
    thresholds = _collector_as_worker()
    cpu = time.thread_time()
    for start in range(0, len(records), _BATCH):
        now_ms = clock.now_ms()
        for record in records[start : start + _BATCH]:
            kind, group_key, value = core.process(
                record.value_ or b"",
                record.partition_,
                record.offset_,
                arrival_ms(record, now_ms),
                now_ms,
            )
            if kind == enriched:
                produce("enriched", group_key, value or b"")
            elif kind == fallen:
                fallbacks[record.offset_] = fallback(record, now_ms)
        for group_id, state in store.changed_states.items():
            produce("state", group_id.encode(), state, partition=0)
        for member, record_value in store.changed_members.items():
            produce("members", member.encode(), record_value, partition=0)
        for seen, arrival in store.changed_seen.items():
            produce("dedupe", seen.encode(), b"%d" % arrival, partition=0, timestamp=arrival)
        store.changed_states.clear()
        store.changed_members.clear()
        store.changed_seen.clear()
    cpu = time.thread_time() - cpu
    _collector_back(thresholds)
    return CompiledRun(cpu, fallbacks, store, phone.seconds, phone.calls)


def _python_outputs(records: Sequence[Record]) -> RecordingSink:
    """Every record the worker's ``Processor`` produces for ``records`` (one stage)."""
    sink = RecordingSink()
    run_python(records, sink)
    return sink


def _latest(sink: RecordingSink, topic: str, key_of: Callable[[Any], Any]) -> dict[Any, bytes]:
    out: dict[Any, bytes] = {}
    for t, key, value in sink.kept:
        if t == topic:
            out[key_of((key, value))] = value
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two decoded JSON values differ, as paths (``traits.phone``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b) and a.keys() == b.keys():
            return [f"{path or '.'} (key order)"]
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b and type(a) is type(b) else [path or "."]


def _compare(name: str, python: dict[Any, bytes], compiled: dict[Any, bytes]) -> None:
    same = sum(1 for k, v in python.items() if compiled.get(k) == v)
    where: dict[str, int] = {}
    for k, v in python.items():
        if k in compiled and compiled[k] != v:
            for d in _differences(codec.decode(v), codec.decode(compiled[k])) or ["bytes only"]:
                where[d] = where.get(d, 0) + 1
    missing, extra = len(python.keys() - compiled.keys()), len(compiled.keys() - python.keys())
    share = 100 * same / len(python) if python else 100.0
    print(f"  {name}: {same:,} of {len(python):,} byte-identical ({share:.2f}%)", end="")
    print(f"; {missing:,} missing, {extra:,} extra" if missing or extra else "")
    for path, n in sorted(where.items(), key=lambda item: -item[1])[:8]:
        print(f"    differs at {path}: {n:,}")


def check(records: Sequence[Record], module: ModuleType) -> None:
    """Print how the prototype's outputs agree with the worker's on ``records``."""
    python = _python_outputs(records)
    sink = RecordingSink()
    run = run_compiled(records, module, sink)

    def by_offset(kv: tuple[bytes, bytes]) -> int:
        return int(codec.decode(kv[1])["enrichment"]["source"]["offset"])

    py_enriched = _latest(python, "enriched", by_offset)
    rust_enriched = {k: v for k, v in _latest(sink, "enriched", by_offset).items()}
    handled = {k: v for k, v in rust_enriched.items() if k not in run.fallbacks}
    kinds: dict[str, int] = {}
    for kind in run.fallbacks.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"agreement with the worker on {len(records):,} calls:")
    print(
        f"  the prototype handled {len(records) - len(run.fallbacks):,} calls in Rust; "
        f"the Python path took {len(run.fallbacks):,} "
        f"({', '.join(f'{n:,} {k}' for k, n in sorted(kinds.items()))})"
    )
    _compare("enriched calls handled in Rust", {k: py_enriched[k] for k in handled}, handled)
    _compare("enriched calls, all", py_enriched, rust_enriched)
    _compare(
        "final state records",
        _latest(python, "state", lambda kv: kv[0]),
        {k.encode(): v for k, v in run.store.states.items()},
    )
    _compare(
        "final membership records",
        _latest(python, "members", lambda kv: kv[0]),
        {k.encode(): v for k, v in run.store.members.items()},
    )
    py_dlq, rust_dlq = (sum(t == "dlq" for t, _, _ in s.kept) for s in (python, sink))
    print(f"  dead letters: worker {py_dlq:,}, prototype run {rust_dlq:,}")


def _measure_one(path: str, calls: int, seed: int) -> dict[str, float]:
    """Time one path in this process: µs per call, and for the prototype the share of it
    spent in Python's phonenumbers."""
    records = make_records(calls, seed)
    if path == "python":
        return {"us": run_python(records, CountingSink()) * 1e6 / calls}
    run = run_compiled(records, load_core(), CountingSink())
    return {
        "us": run.cpu_seconds * 1e6 / calls,
        "phone_us": run.phone_seconds * 1e6 / calls,
        "phones": run.phone_calls,
    }


def _in_child(path: str, calls: int, seed: int) -> dict[str, float]:
    """``_measure_one`` in a fresh process: the worker's memos (phone numbers, URLs,
    emails, formatted times) start empty for each path and run, as in a fresh worker."""
    command = [sys.executable, "-m", "bench.compiled.measure", "--only", path]
    command += ["--calls", str(calls), "--seed", str(seed)]
    done = subprocess.run(command, cwd=_CRATE.parents[1], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{path} run failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="build the extension again")
    parser.add_argument("--no-check", action="store_true", help="skip the output comparison")
    parser.add_argument("--only", choices=("python", "compiled"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(_measure_one(args.only, args.calls, args.seed)))
        return
    module = load_core(rebuild=args.rebuild)
    python_us, compiled_us, phone_us, ratios = [], [], [], []
    for run in range(args.runs):
        # Each run in fresh processes, the two paths in turn, the first one alternating.
        order = ("python", "compiled") if run % 2 == 0 else ("compiled", "python")
        results = {path: _in_child(path, args.calls, args.seed) for path in order}
        py, rust = results["python"]["us"], results["compiled"]["us"]
        python_us.append(py)
        compiled_us.append(rust)
        phone_us.append(results["compiled"]["phone_us"])
        ratios.append(py / rust)
        print(
            f"run {run + 1} ({' then '.join(order)}): Python {py:.2f} µs/call, compiled "
            f"{rust:.2f} µs/call (phonenumbers {phone_us[-1]:.2f}), {py / rust:.2f}x"
        )
    print(
        f"median of {args.runs} ({args.calls:,} calls, one stage, CPU time of one thread): "
        f"Python {statistics.median(python_us):.2f} µs/call, "
        f"compiled {statistics.median(compiled_us):.2f} µs/call "
        f"(of which Python's phonenumbers {statistics.median(phone_us):.2f}), "
        f"ratio {statistics.median(ratios):.2f}x"
    )
    if not args.no_check:
        check(make_records(args.calls, args.seed), module)


if __name__ == "__main__":
    main()
