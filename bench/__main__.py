"""``python -m bench``: the whole benchmark against one broker; ``make bench`` runs it.

Steps, each timed (the table says which target each figure answers):

1. generate ``--calls`` calls (seeded) into a fresh input topic;
2. the ceiling (``bench.ceiling``) and the worker (``group-worker run``) drain that same
   topic, at ``exactly_once`` then ``at_least_once``; exactly once, the ceiling also
   copies it into the worker's records through two stages (``--shape worker``); with
   ``--keyed`` also a worker on a copy of the input keyed by groupId, the ceiling in the
   worker's records in one stage, and the peer (``bench.peer``: the same job in Quix
   Streams, in its own interpreter) on that copy;
3. latency: a fresh worker fed at half the exactly-once worker's measured rate;
4. restore: a state topic of ``--restore-groups`` groups, read back into a RocksDB store
   in a fresh process, and by a bare consumer;
5. restart (``bench.restart``): a worker rebuilding ``--restart-groups`` groups and their
   dedupe ids from the changelogs, draining calls, then restarted on its ``state_dir``;
6. memory: bytes per group with 10 traits (tracemalloc);
   (with ``--variants``, steps 2 and 3 also run ``bench.variants``: proposed runner changes);
7. the hot path in this process (``bench.hotpath``), one and two stages.

``--skip`` leaves out steps (``raw``: the worker drains of the unkeyed input, the
ceiling in the worker's records through two stages, and so the latency step;
``latency``, ``restore``, ``memory``, ``hot-path``), for a quick look at the others.
Writes ``latest.json``, ``latest.png`` and ``README-table.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench import report
from bench.hotpath import make_records, measure_hot_path
from bench.latency import measure_latency
from bench.process import ROOT, Topics
from bench.report import TARGETS
from bench.restart import measure_restart
from bench.runs import PEER_PYTHON, delete_topics, drain_worker, fill_topic, run_ceiling, run_peer
from bench.state import measure_group_memory, measure_restore

_T = TypeVar("_T")
# Proposed runner changes, applied by bench.variants (the worker's code is unchanged).
VARIANT = ("--gc-freeze", "--poll-timeout", "0.01")
SKIPPABLE = ("raw", "latency", "restore", "memory", "hot-path")


def _machine() -> dict[str, Any]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), ""
        )
    except OSError:
        pass
    memory = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) * 1024
    cores = os.cpu_count() or 0
    return {
        "cores": cores,
        "cpu": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "summary": f"{cores} cores, {model or platform.machine()}, {memory / 2**30:.0f} GiB",
    }


class Steps:
    """Runs named steps, printing and recording how long each took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, step: Callable[[], _T]) -> _T:
        print(f"bench: {name}...", flush=True)
        started = time.perf_counter()
        try:
            return step()
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 1)
            print(f"bench: {name} took {self.seconds[name]:.1f} s", flush=True)


def _drain_rate(steps: Steps, label: str, calls: int, drain: Callable[[], float]) -> dict[str, Any]:
    """``drain``'s seconds and rate over ``calls``, or the error it failed with."""
    try:
        seconds = steps.run(label, drain)
    except Exception as e:
        return {"error": _error(e)}
    return {"seconds": seconds, "rate": calls / seconds}


def _error(e: BaseException) -> str:
    traceback.print_exception(e)
    return f"{type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:39092")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--restore-groups", type=int, default=1_000_000)
    parser.add_argument("--memory-groups", type=int, default=50_000)
    parser.add_argument(
        "--restart-groups", type=int, default=1_000_000, help="0 skips the restart step"
    )
    parser.add_argument("--restart-seen-per-group", type=int, default=5)
    parser.add_argument("--restart-members-per-group", type=int, default=1)
    parser.add_argument(
        "--restart-calls", type=int, default=100_000, help="calls drained, half before it"
    )
    parser.add_argument("--hot-path-calls", type=int, default=200_000)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--keyed", action="store_true", help="also drain input keyed by groupId")
    parser.add_argument("--no-keyed", dest="keyed", action="store_false")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run the worker with the changes bench.variants applies (for experiments)",
    )
    parser.add_argument(
        "--peer-python",
        type=Path,
        default=PEER_PYTHON,
        help="the interpreter with Quix Streams for the peer (with --keyed)",
    )
    parser.add_argument(
        "--peer-commit-interval",
        type=float,
        default=None,
        help="the peer's commit_interval in seconds (default: Quix Streams' own)",
    )
    parser.add_argument(
        "--skip",
        type=lambda text: [x for x in text.split(",") if x],
        default=[],
        help=f"comma-separated steps to leave out: {', '.join(SKIPPABLE)}",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="latest", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    unknown = set(args.skip) - set(SKIPPABLE)
    if unknown:
        parser.error(f"--skip: unknown steps {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs.tmp"
    steps = Steps()
    b = args.bootstrap
    results: dict[str, Any] = {
        # Paths inside the checkout as ``make bench`` gives them: relative to it.
        "command": "python -m bench "
        + " ".join(sys.argv[1:] if argv is None else argv).replace(f"{ROOT}/", ""),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "calls": args.calls,
        "seed": args.seed,
        "machine": _machine(),
        "targets": TARGETS,
        "ceiling": {},
        "drains": {},
        "hot_path": {},
    }

    inputs = Topics.fresh("input")
    raw, keyed = inputs.name("raw"), inputs.name("keyed")
    try:
        fill = steps.run(
            f"fill {args.calls:,} calls",
            lambda: fill_topic(b, raw, args.calls, args.seed, by_group=False),
        )
        results["input"] = {
            "mix": {
                "group": fill.mix.group,
                "other": fill.mix.other,
                "bad": fill.mix.bad,
                "duplicate": fill.mix.duplicate,
                "late_duplicate": fill.mix.late_duplicate,
            },
            "bytes_per_call": fill.bytes / args.calls,
            "fill_seconds": fill.seconds,
        }
        for guarantee in ("exactly_once", "at_least_once"):
            seconds = steps.run(
                f"ceiling {guarantee}", partial(run_ceiling, b, raw, guarantee, args.calls)
            )
            results["ceiling"][guarantee] = {"seconds": seconds, "rate": args.calls / seconds}
            if "raw" in args.skip:
                continue
            if guarantee == "exactly_once":
                results["records_ceiling"] = {
                    "two_stages": _drain_rate(
                        steps,
                        "ceiling in the worker's records, two stages",
                        args.calls,
                        partial(run_ceiling, b, raw, guarantee, args.calls, shape="worker"),
                    )
                }
            try:
                drain = steps.run(
                    f"worker {guarantee}",
                    partial(drain_worker, b, raw, args.calls, guarantee, log_dir),
                )
                results["drains"][f"{guarantee}"] = {
                    "guarantee": guarantee,
                    "keyed": False,
                    "seconds": drain.seconds,
                    "rate": drain.calls_per_second,
                    "peak_rss_bytes": drain.peak_rss_bytes,
                    "outcomes": drain.outcomes,
                }
            except Exception as e:
                results["drains"][guarantee] = {
                    "guarantee": guarantee,
                    "keyed": False,
                    "error": _error(e),
                }
        if args.keyed:
            steps.run(
                "fill keyed copy",
                lambda: fill_topic(b, keyed, args.calls, args.seed, by_group=True),
            )
            results.setdefault("records_ceiling", {})["keyed"] = _drain_rate(
                steps,
                "ceiling in the worker's records, keyed input",
                args.calls,
                partial(
                    run_ceiling, b, keyed, "exactly_once", args.calls, shape="worker", stages=1
                ),
            )
            try:
                drain = steps.run(
                    "worker exactly_once, keyed input",
                    lambda: drain_worker(b, keyed, args.calls, "exactly_once", log_dir, keyed=True),
                )
                results["drains"]["keyed"] = {
                    "guarantee": "exactly_once",
                    "keyed": True,
                    "seconds": drain.seconds,
                    "rate": drain.calls_per_second,
                    "peak_rss_bytes": drain.peak_rss_bytes,
                    "outcomes": drain.outcomes,
                }
            except Exception as e:
                results["drains"]["keyed"] = {
                    "guarantee": "exactly_once",
                    "keyed": True,
                    "error": _error(e),
                }
            try:
                peer = steps.run(
                    "peer (Quix Streams) exactly_once, keyed input",
                    lambda: run_peer(
                        b,
                        keyed,
                        args.calls,
                        log_dir,
                        python=args.peer_python,
                        commit_interval=args.peer_commit_interval,
                    ),
                )
                results["peer"] = {
                    "library": peer.library,
                    "guarantee": "exactly_once",
                    "keyed": True,
                    "commit_interval": args.peer_commit_interval,
                    "seconds": peer.seconds,
                    "rate": peer.calls_per_second,
                    "committed_seconds": peer.committed_seconds,
                    "peak_rss_bytes": peer.peak_rss_bytes,
                    "outputs": peer.outputs,
                }
            except Exception as e:
                results["peer"] = {"guarantee": "exactly_once", "keyed": True, "error": _error(e)}
        if args.variants:
            try:
                drain = steps.run(
                    "worker exactly_once, proposed runner changes",
                    partial(
                        drain_worker, b, raw, args.calls, "exactly_once", log_dir, variant=VARIANT
                    ),
                )
                results["variant"] = {
                    "args": list(VARIANT),
                    "seconds": drain.seconds,
                    "rate": drain.calls_per_second,
                    "peak_rss_bytes": drain.peak_rss_bytes,
                }
            except Exception as e:
                results["variant"] = {"args": list(VARIANT), "error": _error(e)}
    finally:
        delete_topics(b, [raw, keyed])

    eos = results["drains"].get("exactly_once", {})
    if "rate" in eos and "latency" not in args.skip:
        rate = eos["rate"] / 2
        try:
            latency = steps.run(
                "latency", lambda: measure_latency(b, rate, args.latency_seconds, log_dir)
            )
            results["latency"] = {
                "rate": rate,
                "seconds": args.latency_seconds,
                "calls": latency.calls,
                "measured": len(latency.produce_ms),
                "produce": latency.percentiles("produce"),
                "visible": latency.percentiles("visible"),
                "produce_p99_by_part": latency.p99_by_part(),
            }
        except Exception as e:
            results["latency"] = {"rate": rate, "error": _error(e)}
        if args.variants and "variant" in results:
            try:
                latency = steps.run(
                    "latency, proposed runner changes",
                    partial(
                        measure_latency, b, rate, args.latency_seconds, log_dir, variant=VARIANT
                    ),
                )
                results["variant"]["latency"] = {
                    "rate": rate,
                    "produce": latency.percentiles("produce"),
                    "visible": latency.percentiles("visible"),
                }
            except Exception as e:
                results["variant"]["latency"] = {"error": _error(e)}

    if "restore" not in args.skip:
        restore = steps.run(
            f"restore {args.restore_groups:,} groups",
            lambda: measure_restore(b, args.restore_groups),
        )
        results["restore"] = {
            "store": "rocksdb",
            "records": restore.records,
            "seconds": restore.seconds,
            "rate": restore.records_per_second,
            "fill_seconds": restore.fill_seconds,
            "rss_growth_bytes": restore.rss_growth_bytes,
            "peak_rss_bytes": restore.peak_rss_bytes,
            "record_bytes": restore.record_bytes,
            "bare_rate": restore.bare_per_second,
        }
    if args.restart_groups:
        try:
            restart = steps.run(
                f"restart, {args.restart_groups:,} groups",
                partial(
                    measure_restart,
                    b,
                    args.restart_groups,
                    args.restart_seen_per_group,
                    args.restart_members_per_group,
                    args.restart_calls,
                    log_dir,
                    args.seed,
                ),
            )
            results["restart"] = restart.to_json()
        except Exception as e:
            results["restart"] = {"groups": args.restart_groups, "error": _error(e)}
    if "memory" not in args.skip:
        memory = steps.run("memory", lambda: measure_group_memory(args.memory_groups))
        results["memory"] = {
            "groups": memory.groups,
            "bytes_per_group": memory.bytes_per_group,
            "bytes_per_membership": memory.bytes_per_membership,
        }

    if "hot-path" not in args.skip:
        records = steps.run("generate hot-path records", lambda: make_records(args.hot_path_calls))
        for stages, name in ((1, "1 stage (keyed input)"), (2, "2 stages (default)")):
            hot = steps.run(f"hot path {name}", partial(measure_hot_path, records, stages=stages))
            results["hot_path"][name] = {
                "calls": hot.calls,
                "cpu_seconds": hot.cpu_seconds,
                "wall_seconds": hot.wall_seconds,
                "rate": hot.calls_per_second,
                "bytes_out_per_call": {t: n / hot.calls for t, n in hot.bytes_out.items()},
                "largest_record_bytes": hot.largest_out,
                "step_cpu_seconds": hot.step_seconds,
            }

    results["step_seconds"] = steps.seconds
    results["wall_seconds"] = round(time.perf_counter() - steps.started, 1)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    rows = report.rows_from_results(results)
    table = report.write_table(rows)
    print()
    print(table)
    print(f"\nwall time {results['wall_seconds']:.0f} s; machine: {results['machine']['summary']}")
    report.write_json(results, args.out / f"{args.name}.json")
    preamble = (
        f"`{results['command']}` on {results['machine']['summary']}, "
        f"{results['started_at']}, wall time {results['wall_seconds']:.0f} s."
    )
    report.write_markdown(
        rows,
        args.out / f"README-table{'' if args.name == 'latest' else '-' + args.name}.md",
        preamble,
    )
    report.write_chart(results, args.out / f"{args.name}.png")
    print(f"bench: wrote {args.out}/{args.name}.json, .png and the markdown table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
