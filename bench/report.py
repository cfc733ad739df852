"""The benchmark's outputs: the table (terminal and markdown), the JSON and the chart."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Row", "rows_from_results", "write_chart", "write_json", "write_markdown", "write_table"]


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
            rows.append(Row("  peak RSS of the worker", f"{d['peak_rss_bytes'] / 2**20:,.0f} MiB"))
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
    restore = r.get("restore")
    if restore is not None:
        rows.append(
            Row(
                f"restore, {restore['records']:,} groups",
                _rate(restore["rate"]),
                f">= {t['restore']:,}/s",
                restore["rate"] >= t["restore"],
            )
        )
        if "lazy_rate" in restore:
            rows.append(Row("  read only, keeping raw bytes per key", _rate(restore["lazy_rate"])))
        if "lazy_large_fetch_rate" in restore:
            rows.append(
                Row(
                    "  read only, 16 MiB partition fetches", _rate(restore["lazy_large_fetch_rate"])
                )
            )
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
            rows.append(Row("  RSS growth per restored group", f"{per_group:,.0f} B"))
    hot_paths = r.get("hot_path", {})
    for name, h in hot_paths.items():
        rows.append(
            Row(
                f"hot path, {name}, one core",
                _rate(h["rate"]),
                f">= {t['hot_path']:,}/s",
                h["rate"] >= t["hot_path"],
            )
        )
    if hot_paths:
        h = next(iter(hot_paths.values()))
        state = h["bytes_out_per_call"].get("state", 0)
        largest = h.get("largest_record_bytes", {}).get("state", 0)
        calls = f"{h['calls']:,} calls"
        rows.append(Row(f"  state-topic bytes per input call ({calls})", f"{state:,.0f} B"))
        rows.append(
            Row(
                f"  largest state record ({calls})",
                f"{largest / 2**20:,.2f} MiB",
                "Kafka default 1 MB",
            )
        )
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
    ax.axhline(targets["hot_path"], color="#ff7f0e", linestyle=":", linewidth=1)
    ax.text(
        len(names) - 0.5,
        targets["hot_path"],
        "hot-path target",
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
