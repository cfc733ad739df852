"""The benchmark's outputs: the table (terminal and markdown), the JSON and the chart."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TARGETS",
    "Row",
    "peer_rows",
    "records_ceiling_rows",
    "restart_rows",
    "rows_from_results",
    "write_chart",
    "write_json",
    "write_markdown",
    "write_table",
]


# What each figure of the table is held to.
TARGETS = {
    # Issue 13: the worker at 0.3x the pass-through ceiling, exactly once (the standing
    # goal is 0.5x; issue 11: never below 0.15x), at least twice the rate of the same job
    # in Quix Streams, and the hot path at 45,000 calls/s at one stage, 35,000 at two.
    "ratio": 0.3,
    "peer_ratio": 2.0,
    "hot_path": {"1 stage (keyed input)": 45_000, "2 stages (default)": 35_000},
    "restore": 250_000,
    "bytes_per_group": 1024,
    "p99_ms": 250,
    # Issue 11: a restart with 1,000,000 groups ready within 5 s; a rebuild at 0.7x a
    # bare consumer; peak RSS at most 400 MB; a quarter of the state bytes per call
    # measured before it (2,137 B).
    "restart_seconds": 5.0,
    "rebuild_ratio": 0.7,
    "peak_rss_bytes": 400_000_000,
    "state_bytes_per_call": 2137 / 4,
    "state_bytes_per_call_before": 2137,
}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: what, the measured figure, the target, met or not."""

    what: str
    measured: str
    target: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("yes" if self.met else "NO")


def _rate(x: float) -> str:
    return f"{x:,.0f}/s"


def rows_from_results(r: Mapping[str, Any]) -> list[Row]:
    """The table's rows from the results dict ``bench.__main__`` builds."""
    t = r["targets"]
    rows: list[Row] = []
    drains = r.get("drains", {})
    for guarantee in ("exactly_once", "at_least_once"):
        ceiling = r.get("ceiling", {}).get(guarantee)
        if ceiling is not None:
            rows.append(Row(f"ceiling, pass-through ({guarantee})", _rate(ceiling["rate"])))
        for d in drains.values():
            if d["guarantee"] != guarantee:
                continue
            label = f"worker ({guarantee}{', input keyed by groupId' if d['keyed'] else ''})"
            if "error" in d:
                rows.append(Row(label, "failed: " + d["error"].splitlines()[0][:60]))
                continue
            rows.append(Row(label, _rate(d["rate"])))
            if ceiling is not None:
                ratio = d["rate"] / ceiling["rate"]
                met = ratio >= t["ratio"] if guarantee == "exactly_once" else None
                target = f">= {t['ratio']}x" if guarantee == "exactly_once" else ""
                rows.append(
                    Row(f"  ratio to the ceiling ({guarantee})", f"{ratio:.2f}x", target, met)
                )
            if guarantee == "exactly_once":
                layout = "keyed" if d["keyed"] else "two_stages"
                rows += records_ceiling_rows(d, r.get("records_ceiling", {}).get(layout))
            rows.append(Row("  peak RSS of the worker", f"{d['peak_rss_bytes'] / 2**20:,.0f} MiB"))
            mix = r.get("input", {}).get("mix")
            if mix is not None and "outcomes" in d:
                rows.append(_redeliveries(d["outcomes"].get("duplicate", 0), mix))
        if guarantee == "exactly_once":
            rows += peer_rows(r.get("peer"), drains.get("keyed"), r.get("input", {}), t)
    variant = r.get("variant")
    if variant is not None:
        label = f"worker, proposed: {' '.join(variant['args'])}"
        if "error" in variant:
            rows.append(Row(label, "failed: " + variant["error"].splitlines()[0][:60]))
        else:
            rows.append(Row(label, _rate(variant["rate"])))
            ceiling = r.get("ceiling", {}).get("exactly_once")
            if ceiling is not None:
                ratio = variant["rate"] / ceiling["rate"]
                rows.append(Row("  ratio to the ceiling (exactly_once)", f"{ratio:.2f}x"))
            lat = variant.get("latency", {})
            if "produce" in lat:
                p = lat["produce"]
                rows.append(
                    Row(
                        "  its latency, p50 / p99 / max",
                        f"{p['p50']:.0f} / {p['p99']:.0f} / {p['max']:.0f} ms",
                    )
                )
    latency = r.get("latency")
    if latency is not None:
        if "error" in latency:
            rows.append(Row("latency", "failed: " + latency["error"].splitlines()[0][:60]))
        else:
            p = latency["produce"]
            v = latency["visible"]
            rows.append(
                Row(
                    f"latency at {latency['rate']:,.0f} calls/s, p50 / p99 / max",
                    f"{p['p50']:.0f} / {p['p99']:.0f} / {p['max']:.0f} ms",
                    f"p99 <= {t['p99_ms']} ms",
                    p["p99"] <= t["p99_ms"],
                )
            )
            rows.append(
                Row(
                    "  visible to read_committed, p50 / p99 / max",
                    f"{v['p50']:.0f} / {v['p99']:.0f} / {v['max']:.0f} ms",
                )
            )
            if parts := latency.get("produce_p99_by_part"):
                rows.append(
                    Row(
                        "  produced p99 in each tenth of the run",
                        " / ".join(f"{ms:.0f}" for ms in parts) + " ms",
                    )
                )
    restore = r.get("restore")
    if restore is not None:
        store = " into RocksDB" if restore.get("store") == "rocksdb" else ""
        rows.append(
            Row(
                f"restore, {restore['records']:,} groups{store}",
                _rate(restore["rate"]),
                f">= {t['restore']:,}/s",
                restore["rate"] >= t["restore"],
            )
        )
        if restore.get("bare_rate"):
            rows.append(Row("  bare consumer, same topics", _rate(restore["bare_rate"])))
            rows.append(
                Row("  restore / bare consumer", f"{restore['rate'] / restore['bare_rate']:.2f}x")
            )
    rows += restart_rows(r.get("restart"), t)
    memory = r.get("memory")
    if memory is not None:
        rows.append(
            Row(
                "memory per group, 10 traits (tracemalloc)",
                f"{memory['bytes_per_group']:,.0f} B",
                f"<= {t['bytes_per_group']:,} B",
                memory["bytes_per_group"] <= t["bytes_per_group"],
            )
        )
        rows.append(Row("  memory per membership", f"{memory['bytes_per_membership']:,.0f} B"))
        if restore is not None:
            per_group = restore["rss_growth_bytes"] / restore["records"]
            store = " (RocksDB)" if restore.get("store") == "rocksdb" else ""
            rows.append(Row(f"  RSS growth per restored group{store}", f"{per_group:,.0f} B"))
    hot_paths = r.get("hot_path", {})
    for name, h in hot_paths.items():
        target = t["hot_path"][name] if isinstance(t["hot_path"], dict) else t["hot_path"]
        rows.append(
            Row(
                f"hot path, {name}, one core",
                _rate(h["rate"]),
                f">= {target:,}/s",
                h["rate"] >= target,
            )
        )
    if hot_paths:
        h = next(iter(hot_paths.values()))
        state = h["bytes_out_per_call"].get("state", 0)
        largest = h.get("largest_record_bytes", {}).get("state", 0)
        calls = f"{h['calls']:,} calls"
        before = t.get("state_bytes_per_call_before")
        target = t.get("state_bytes_per_call")
        rows.append(
            Row(
                f"  state-topic bytes per input call ({calls})",
                f"{state:,.0f} B" + (f", {state / before:.2f}x of {before:,} B" if before else ""),
                f"<= {target:,.0f} B" if target else "",
                state <= target if target else None,
            )
        )
        for route in ("members", "dedupe"):
            if route in h["bytes_out_per_call"]:
                size = h["bytes_out_per_call"][route]
                rows.append(Row(f"  {route}-topic bytes per input call", f"{size:,.0f} B"))
        rows.append(
            Row(
                f"  largest state record ({calls})",
                f"{largest / 1024:,.1f} KiB",
                "Kafka default 1 MB",
            )
        )
    return rows


def peer_rows(
    peer: Mapping[str, Any] | None,
    worker: Mapping[str, Any] | None,
    inputs: Mapping[str, Any],
    t: Mapping[str, Any],
) -> list[Row]:
    """The peer's rows (``bench.peer``): its rate, and the keyed worker's against it."""
    if peer is None:
        return []
    label = f"peer, {peer.get('library', 'Quix Streams')} (exactly_once, keyed)"
    if "error" in peer:
        return [Row(label, "failed: " + peer["error"].splitlines()[0][:60])]
    rows = [Row(label, _rate(peer["rate"]))]
    if worker is not None and "rate" in worker:
        ratio = worker["rate"] / peer["rate"]
        target = t.get("peer_ratio", 2.0)
        rows.append(
            Row(
                "  worker / peer (exactly_once, keyed)",
                f"{ratio:.2f}x",
                f">= {target}x",
                ratio >= target,
            )
        )
    groups = inputs.get("mix", {}).get("group")
    rows.append(
        Row(
            "  peer, first call to its final commit",
            f"{peer['committed_seconds']:.1f} s ({peer['seconds']:.1f} s processing)",
        )
    )
    rows.append(Row("  peak RSS of the peer", f"{peer['peak_rss_bytes'] / 2**20:,.0f} MiB"))
    if groups is not None:
        rows.append(
            Row(
                "  peer's enriched calls, read_committed / valid group calls sent",
                f"{peer['outputs']:,} / {groups:,}",
            )
        )
    return rows


def records_ceiling_rows(worker: Mapping[str, Any], ceiling: Mapping[str, Any] | None) -> list[Row]:
    """The ceiling in the worker's records (``bench.ceiling --shape worker``) of the
    drain's layout, and the time per call the worker spends beyond it: its own work."""
    label = "  ceiling in the worker's records, no work per call"
    if ceiling is None:
        return []
    if "error" in ceiling:
        return [Row(label, "failed: " + ceiling["error"].splitlines()[0][:60])]
    beyond = 1e6 / worker["rate"] - 1e6 / ceiling["rate"]
    return [
        Row(label, _rate(ceiling["rate"])),
        Row("  worker / that ceiling", f"{worker['rate'] / ceiling['rate']:.2f}x"),
        Row("  the worker's own work per call (time beyond that ceiling's)", f"{beyond:.0f} µs"),
    ]


def _redeliveries(duplicates: float, mix: Mapping[str, int]) -> Row:
    """Redeliveries sent against the duplicates the worker counted: all, late ones too."""
    late = mix.get("late_duplicate", 0)
    sent = mix.get("duplicate", 0) + late
    return Row(
        "  redeliveries counted as duplicates",
        f"{duplicates:,.0f} of {sent:,} ({late:,} late)",
        "all",
        duplicates == sent,
    )


def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f} MB"


def restart_rows(restart: Mapping[str, Any] | None, t: Mapping[str, Any]) -> list[Row]:
    """The restart step's rows (``bench.restart``)."""
    if restart is None:
        return []
    label = f"restart, {restart['groups']:,} groups"
    if "error" in restart:
        return [Row(label, "failed: " + restart["error"].splitlines()[0][:60])]
    rows: list[Row] = []
    rebuild, again = restart["starts"][0], restart["starts"][-1]
    records = restart["records"]
    rows.append(
        Row(
            f"rebuild, empty state_dir: {restart['groups']:,} groups, "
            f"{restart['dedupe_ids']:,} dedupe ids, {restart['memberships']:,} memberships",
            f"{rebuild['ready_seconds']:.1f} s to ready",
        )
    )
    rows.append(
        Row(
            f"  records restored / time restoring (of {records:,})",
            f"{rebuild['restored_records']:,.0f} / {rebuild['restore_seconds']:.1f} s",
        )
    )
    rate = restart.get("rebuild_rate", 0.0)
    bare = restart.get("bare_rate", 0.0)
    rows.append(Row("  rebuild rate, worker process", _rate(rate)))
    rows.append(Row("  bare consumer, same topics (best of 2)", _rate(bare)))
    if bare:
        ratio = rate / bare
        target = t.get("rebuild_ratio", 0.7)
        rows.append(
            Row("  rebuild / bare consumer", f"{ratio:.2f}x", f">= {target}x", ratio >= target)
        )
    rows.append(
        Row(
            "restart (SIGTERM, start again), launch to /readyz 200",
            f"{again['ready_seconds']:.2f} s",
            f"<= {t.get('restart_seconds', 5.0):.0f} s",
            again["ready_seconds"] <= t.get("restart_seconds", 5.0),
        )
    )
    rows.append(
        Row(
            "  records replayed on restart / in the changelogs",
            f"{again['restored_records']:,.0f} / {restart['changelog_records_at_restart']:,}",
        )
    )
    peaks = [
        ("after the rebuild", rebuild["peak_rss_ready_bytes"]),
        (f"after {rebuild['calls']:,} calls", rebuild["peak_rss_calls_bytes"]),
        ("restarted, at ready", again["peak_rss_ready_bytes"]),
        (f"restarted, after {again['calls']:,} calls", again["peak_rss_calls_bytes"]),
    ]
    limit = t.get("peak_rss_bytes", 400_000_000)
    for what, peak in peaks:
        rows.append(Row(f"  peak RSS (VmHWM), {what}", _mb(peak)))
    highest = max(peak for _, peak in peaks)
    rows.append(
        Row(
            "  peak RSS of the worker, highest (default cache)",
            _mb(highest),
            f"<= {_mb(limit)}",
            highest <= limit,
        )
    )
    duplicates = sum(s["duplicates"] for s in restart["starts"])
    mix = {"duplicate": restart["redeliveries"] - restart["late_redeliveries"]}
    mix["late_duplicate"] = restart["late_redeliveries"]
    rows.append(_redeliveries(duplicates, mix))
    return rows


def write_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    header = ("", "measured", "target", "met")
    lines = [header, *((x.what, x.measured, x.target, x.verdict) for x in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    )


def write_markdown(rows: Sequence[Row], path: Path, preamble: str) -> None:
    """The table as markdown, after ``preamble`` (what ran, where, when)."""
    out = [preamble, "", "| | measured | target | met |", "|---|---:|---:|:---:|"]
    for x in rows:
        what = x.what.replace("  ", "&nbsp;&nbsp;", 1) if x.what.startswith("  ") else x.what
        out.append(f"| {what} | {x.measured} | {x.target} | {x.verdict} |")
    path.write_text("\n".join(out) + "\n")


def write_json(results: Mapping[str, Any], path: Path) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(results), indent=2, sort_keys=False) + "\n")


def write_chart(results: Mapping[str, Any], path: Path) -> None:
    """Throughput bars (ceiling, worker, hot path) and latency percentiles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    rates: list[float] = []
    colours: list[str] = []
    for guarantee, short in (("exactly_once", "EOS"), ("at_least_once", "ALO")):
        ceiling = results.get("ceiling", {}).get(guarantee)
        if ceiling is not None:
            names.append(f"ceiling\n{short}")
            rates.append(ceiling["rate"])
            colours.append("#9e9e9e")
        for d in results.get("drains", {}).values():
            if d["guarantee"] == guarantee and "rate" in d:
                keyed = " keyed" if d["keyed"] else ""
                names.append(f"worker\n{short}{keyed}")
                rates.append(d["rate"])
                colours.append("#1f77b4")
        peer = results.get("peer", {})
        if guarantee == "exactly_once" and "rate" in peer:
            names.append("Quix\nEOS keyed")
            rates.append(peer["rate"])
            colours.append("#d62728")
    variant = results.get("variant", {})
    if "rate" in variant:
        names.append("worker EOS\nproposed")
        rates.append(variant["rate"])
        colours.append("#aec7e8")
    for name, h in results.get("hot_path", {}).items():
        names.append("hot path\n" + name.split(" (")[0])
        rates.append(h["rate"])
        colours.append("#ff7f0e")
    restore = results.get("restore")
    if restore is not None:
        names.append("restore\n(records)")
        rates.append(restore["rate"])
        colours.append("#2ca02c")

    latency = results.get("latency")
    has_latency = latency is not None and "produce" in latency
    fig, axes = plt.subplots(
        1,
        2 if has_latency else 1,
        figsize=(13 if has_latency else 9, 4.8),
        gridspec_kw={"width_ratios": [3, 1]} if has_latency else None,
    )
    ax = axes[0] if has_latency else axes
    bars = ax.bar(range(len(names)), rates, color=colours)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("per second")
    ax.set_title(f"group-worker, {results['calls']:,} calls ({results['machine']['summary']})")
    ax.bar_label(bars, labels=[f"{x:,.0f}" for x in rates], fontsize=7)
    targets = results["targets"]
    hot_path = targets["hot_path"]  # one target, or one per stage layout
    for label, target in hot_path.items() if isinstance(hot_path, dict) else [("", hot_path)]:
        ax.axhline(target, color="#ff7f0e", linestyle=":", linewidth=1)
        ax.text(
            len(names) - 0.5,
            target,
            f"hot-path target {label}".strip(),
            fontsize=7,
            ha="right",
            va="bottom",
            color="#ff7f0e",
        )
    ax.grid(axis="y", alpha=0.3)
    if has_latency:
        assert latency is not None
        lat = axes[1]
        labels = ["p50", "p99", "max"]
        produce = [latency["produce"][k] for k in labels]
        visible = [latency["visible"][k] for k in labels]
        x = range(len(labels))
        proposed = results.get("variant", {}).get("latency", {}).get("produce")
        width = 0.27 if proposed else 0.4
        lat.bar(
            [i - width for i in x] if proposed else [i - 0.2 for i in x],
            produce,
            width=width,
            label="produced",
            color="#1f77b4",
        )
        lat.bar(
            [i for i in x] if proposed else [i + 0.2 for i in x],
            visible,
            width=width,
            label="visible",
            color="#aec7e8",
        )
        if proposed:
            lat.bar(
                [i + width for i in x],
                [proposed[k] for k in labels],
                width=width,
                label="produced, proposed",
                color="#9467bd",
            )
        lat.axhline(targets["p99_ms"], color="red", linestyle=":", linewidth=1)
        lat.set_xticks(list(x), labels)
        lat.set_ylabel("ms")
        lat.set_title(f"latency at {latency['rate']:,.0f} calls/s", fontsize=9)
        lat.legend(fontsize=7)
        lat.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
