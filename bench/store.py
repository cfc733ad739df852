"""The RocksDB state store beside the in-memory one: replay, reads, calls, memory.

``python -m bench.store`` runs each step in a fresh process, so its resident set is its
own, and prints one JSON line per step, then a table:

1. ``rocksdb-write``: ``--records`` state records of about ``--record-bytes`` bytes,
   one group each, applied to partition 0 with ``apply_changelog`` in replays of
   10,000 (making the records is not timed); then, unless ``--no-compact``, the files
   compacted (``RocksDBStateStore.compact``, timed apart), as after a rebuild.
2. ``rocksdb-read``: a new store on that directory (``--drop-caches`` empties the
   kernel's page cache first, when allowed) gets ``--gets`` random groups: cold (read
   from the files and parsed), then the same again, warm (from the cache); then
   ``--calls`` calls' worth of store operations on those groups (``seen``,
   ``get_member``, ``get``, ``put``, ``put_seen``, ``put_member``, a commit with
   offsets every 1,000 calls), as ``worker.processor`` makes them.
3. ``memory``: the same records applied to an ``InMemoryStateStore`` (which parses them
   all), the same gets and calls, in one process (nothing outlives it).

RSS is the process's resident set after the step (``VmRSS``); ``rss_base_mb`` before
the store was made.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from worker import codec
from worker.members import Membership, membership_key
from worker.profile import state_record
from worker.state import GroupState
from worker.store import ChangelogEntry, InMemoryStateStore, RocksDBStateStore, StateStore

__all__ = ["main"]

_BASE_MS = 1_700_000_000_000
_REPLAY = 10_000
_COMMIT_EVERY = 1_000


def group_id(index: int) -> str:
    return f"group-{index:07d}"


def group_state(index: int, pad: int = 0) -> GroupState:
    """Group ``index`` with three traits, each stamped by one call, and ``pad`` bytes more
    in a fourth when ``pad`` is positive."""
    traits: dict[str, Any] = {
        "name": f"Company {index:07d}",
        "plan": ("free", "starter", "enterprise")[index % 3],
        "employees": 10 + index % 5_000,
    }
    if pad > 0:
        traits["description"] = "x" * pad
    stamp = (_BASE_MS + index, f"ajs-next-{index:07d}-0f1e2d3c4b5a69788796a5b4c3d2")
    stamps = dict.fromkeys(traits, stamp)
    last = _BASE_MS + index
    return GroupState(group_id(index), traits, stamps, None, 1, 1, _BASE_MS, last, last)


def _record(index: int, pad: int) -> bytes:
    return codec.encode(state_record(group_state(index, pad)))


def _pad_for(record_bytes: int) -> int:
    """The padding that makes records about ``record_bytes`` long (a fourth trait costs
    ``len('"description":"",')`` plus its stamp beside its value)."""
    extra = len(_record(0, 1)) - len(_record(0, 0)) - 1
    return max(record_bytes - len(_record(0, 0)) - extra, 0)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _replay(store: StateStore, records: int, pad: int) -> dict[str, float]:
    """Apply ``records`` state records to partition 0; returns records/s and bytes/record."""
    seconds = 0.0
    size = 0
    for start in range(0, records, _REPLAY):
        entries: list[ChangelogEntry] = []
        for index in range(start, min(start + _REPLAY, records)):
            value = _record(index, pad)
            size += len(value)
            entries.append((index, group_id(index).encode(), value, 0))
        started = time.perf_counter()
        store.apply_changelog(0, "state", entries, next_offset=start + len(entries))
        seconds += time.perf_counter() - started
    return {"records_per_s": records / seconds, "record_bytes": size / records}


def _reads_and_calls(
    store: StateStore, records: int, gets: int, calls: int, seed: int
) -> dict[str, float]:
    """Cold and warm µs per get of random groups, then µs per call on those groups."""
    rng = random.Random(seed)
    ids = [group_id(rng.randrange(records)) for _ in range(gets)]
    out: dict[str, float] = {}
    for name in ("cold_get_us", "warm_get_us"):
        started = time.perf_counter()
        found = [store.get(0, g) for g in ids]
        out[name] = (time.perf_counter() - started) / gets * 1e6
        if any(s is None or s.group_id != g for s, g in zip(found, ids, strict=True)):
            raise RuntimeError("a get returned the wrong state")
    started = time.perf_counter()
    for call in range(calls):
        g = ids[call % gets]
        seen = (g, f"ajs-bench-{call:09d}")
        key = membership_key(g, "userId", f"user-{call}")
        if store.seen(0, seen) is not None or store.get_member(0, key) is not None:
            raise RuntimeError("a new id or member was found")
        state = store.get(0, g)
        if state is None:
            raise RuntimeError("a group vanished")
        arrival = _BASE_MS + 10**9 + call
        store.put(0, replace(state, event_count=state.event_count + 1, updated_ms=arrival))
        store.put_seen(0, seen, arrival, arrival)
        store.put_member(0, key, Membership(g, "userId", f"user-{call}", arrival, arrival))
        if call % _COMMIT_EVERY == _COMMIT_EVERY - 1:
            store.commit({("state", 0): records + call, ("dedupe", 0): call})
    store.commit()
    out["call_us"] = (time.perf_counter() - started) / max(calls, 1) * 1e6
    return out


def _disk_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20


def _step(args: argparse.Namespace) -> dict[str, Any]:
    """Run one step in this process."""
    pad = _pad_for(args.record_bytes)
    base = _rss_mb()
    out: dict[str, Any] = {"step": args.step, "rss_base_mb": base}
    if args.step == "memory":
        memory = InMemoryStateStore()
        out |= _replay(memory, args.records, pad)
        gc.freeze()  # as the runner does once a partition is restored
        out |= _reads_and_calls(memory, args.records, args.gets, args.calls, args.seed)
    elif args.step == "rocksdb-write":
        store = RocksDBStateStore(args.dir, args.cache_mb << 20)
        out |= _replay(store, args.records, pad)
        out["rss_mb"] = _rss_mb()
        if args.compact:
            started = time.perf_counter()
            store.compact(0)
            out["compact_s"] = time.perf_counter() - started
        store.close()
        out["disk_mb"] = _disk_mb(args.dir)
        return out
    else:
        store = RocksDBStateStore(args.dir, args.cache_mb << 20)
        started = time.perf_counter()
        store.open_partition(0)
        out["open_ms"] = (time.perf_counter() - started) * 1e3
        gc.freeze()
        out |= _reads_and_calls(store, args.records, args.gets, args.calls, args.seed)
        out["cached_mb"] = store.cached_bytes / 2**20
        out["groups"] = store.group_count()
        out["rss_mb"] = _rss_mb()
        store.close()
        return out
    out["groups"] = memory.group_count()
    out["rss_mb"] = _rss_mb()
    return out


def _drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root); returns whether it could."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _run(args: argparse.Namespace, step: str, directory: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.store", "--step", step, "--dir", str(directory)]
    for flag in ("records", "record_bytes", "gets", "calls", "cache_mb", "seed"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if not args.compact:
        command.append("--no-compact")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def _table(results: Sequence[dict[str, Any]]) -> str:
    write, read, memory = results
    rows = [
        ("replay, records/s", write["records_per_s"], memory["records_per_s"], "{:,.0f}"),
        ("get, cold, µs", read["cold_get_us"], memory["cold_get_us"], "{:.1f}"),
        ("get, warm, µs", read["warm_get_us"], memory["warm_get_us"], "{:.2f}"),
        ("store operations per call, µs", read["call_us"], memory["call_us"], "{:.1f}"),
        ("RSS after the reads, MB", read["rss_mb"], memory["rss_mb"], "{:,.0f}"),
    ]
    lines = ["| | RocksDBStateStore | InMemoryStateStore |", "| --- | --- | --- |"]
    lines += [f"| {name} | {fmt.format(a)} | {fmt.format(b)} |" for name, a, b, fmt in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--record-bytes", type=int, default=500)
    parser.add_argument("--gets", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument(
        "--no-compact", dest="compact", action="store_false", help="leave compaction to RocksDB"
    )
    parser.add_argument("--step", choices=["rocksdb-write", "rocksdb-read", "memory"])
    parser.add_argument("--dir", type=Path, help="the RocksDB store's directory (a step's)")
    args = parser.parse_args(argv)
    if args.step is not None:
        print(json.dumps(_step(args)))
        return
    directory = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        write = _run(args, "rocksdb-write", directory)
        dropped = args.drop_caches and _drop_page_cache()
        read = _run(args, "rocksdb-read", directory)
        memory = _run(args, "memory", directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n{args.records:,} records of {write['record_bytes']:.0f} bytes; ", end="")
    print(f"disk {write['disk_mb']:,.0f} MB; page cache dropped before the reads: {dropped}")
    print(_table([write, read, memory]))


if __name__ == "__main__":
    main()
