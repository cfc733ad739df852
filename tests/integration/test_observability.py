"""The dashboard and the alert rules against a real Prometheus scraping a real worker.

A misspelt metric or label makes a PromQL query return nothing, not an error, so every
dashboard query and every alert expression is run through Prometheus' HTTP API and must
return data. Prometheus is the Debian package's binary (``deploy/tools.sh prometheus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    ROOT,
    Topics,
    WorkerProcess,
    free_port,
    produce,
    wait_until,
)
from worker import codec

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "deploy" / "grafana" / "group-worker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
JOB = "group-worker"  # the PodMonitor's jobLabel value, which the alert rules select
NAMESPACE = "observability-test"  # what the Prometheus Operator would add
# Grafana's variables as Prometheus sees them with "All" selected.
VARIABLES = {"namespace": ".*", "job": ".*", "instance": ".*", "topic": ".*"}
INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
Call = tuple[bytes | None, bytes | None]


def find_binary(name: str) -> str:
    """The path of ``name`` (PATH, else /usr/bin); fails the test saying how to install it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else "")
    if not found:
        pytest.fail(
            f"{name} not found on PATH or in /usr/bin: install it with "
            f"`bash deploy/tools.sh prometheus` (Debian package prometheus)",
            pytrace=False,
        )
    return found


class Prometheus:
    """``prometheus`` on loopback in a child process, scraping every second."""

    def __init__(self, binary: str, target_port: int, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML: no YAML library needed
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "static_configs": [
                                {
                                    "targets": [f"127.0.0.1:{target_port}"],
                                    "labels": {"namespace": NAMESPACE},
                                }
                            ],
                        }
                    ],
                }
            )
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.ready, 30, f"Prometheus to be ready (log: {self.log_path})")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a Prometheus API answer; fails the test on an API error."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            answer = json.load(e)
        assert answer["status"] == "success", f"{path} {params}: {answer.get('error')}"
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@dataclass
class Stack:
    worker: WorkerProcess
    prometheus: Prometheus
    promtool: str


def group_call(wave: int, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "group",
        "messageId": f"w{wave}-m{n}",
        "userId": f"u{n % 7}",
        "groupId": f"g{n % 5}",
        "traits": {"name": f"Group {n % 5}", "Employees": "1,200", "email": "not an email"},
        **extra,
    }


def wave(n: int) -> tuple[list[Call], int]:
    """Calls of every kind (good, duplicate, other types, bad) and how many calls they are."""
    good = [group_call(n, i) for i in range(20)]
    records: list[Call] = [(f"u{i}".encode(), codec.encode(call)) for i, call in enumerate(good)]
    records.append((b"again", codec.encode(good[0])))  # a duplicate messageId
    for kind in ("identify", "track", "page"):
        records.append((None, codec.encode({"type": kind, "userId": "u", "messageId": kind})))
    batch = {"batch": [group_call(n, 100), {"type": "track", "userId": "u"}]}
    records.append((b"batch", codec.encode(batch)))
    records += [
        (b"bad", b"{not json"),
        (b"bad", codec.encode(group_call(n, 200, groupId="  "))),
        (b"bad", codec.encode(group_call(n, 201, userId=None))),
    ]
    return records, len(records) + 1  # the batch envelope holds two calls


def caught_up(worker: WorkerProcess, calls: int) -> bool:
    """Whether ``calls`` calls have reached their outcome."""
    finished = sum(
        v for (name, _), v in worker.metrics().items() if name == "group_worker_outcomes_total"
    )
    return finished == calls


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker that processed two waves of calls while Prometheus scraped it every second."""
    prometheus_binary = find_binary("prometheus")
    promtool = find_binary("promtool")
    workdir = tmp_path_factory.mktemp("observability")
    topics = Topics.unique()
    worker = WorkerProcess(topics, workdir, name="observability")
    prometheus: Prometheus | None = None
    try:
        worker.start()
        prometheus = Prometheus(prometheus_binary, worker.port, workdir)
        scraped = f'up{{job="{JOB}"}} == 1'
        wait_until(lambda: bool(prometheus.query(scraped)), 30, "the first scrape")
        total = 0
        for n in (1, 2):  # two waves a few scrapes apart, so rates and quantiles move
            records, calls = wave(n)
            produce(topics.input, records)
            total += calls
            wait_until(partial(caught_up, worker, total), 60, f"{total} outcomes")
            time.sleep(3)
        yield Stack(worker, prometheus, promtool)
    finally:
        if prometheus is not None:
            prometheus.stop()
        worker.kill()


def substitute(expr: str) -> str:
    """Grafana's template variables replaced as Grafana would with "All" selected."""
    values = {**VARIABLES, **INTERVALS}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown template variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                queries.append((f"panel {inner['title']!r}", substitute(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: not label_values(metric, label): {query}"
        metric, label = match.groups()
        promql = f'count by ({label}) ({substitute(metric)}{{{label}!=""}})'
        if "{" in metric:  # label_values(metric{...}, label): join the matchers
            promql = f'count by ({label}) ({substitute(metric)[:-1]}, {label}!=""}})'
        queries.append((f"variable {variable['name']}", promql))
    return queries


# Binary operators whose result depends on a threshold or on another side's labels.
_OPERATOR = re.compile(r"(==|!=|>=|<=|>|<|\b(?:and|or|unless)\b)\s*(bool\b)?\s*")
_MATCHING = re.compile(
    r"((?:on|ignoring)\s*\([^)]*\))?\s*((?:group_left|group_right)\s*(?:\([^)]*\))?)?\s*"
)
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_ABSENT = re.compile(r"absent(?:_over_time)?\((.*)\)", re.S)


@dataclass(frozen=True)
class Part:
    """One operand of a top-level binary operator; ``operator`` is the one before it."""

    operator: str  # "" for the first part; ">", "and", "unless"...
    matching: str  # on(...) / ignoring(...), or ""
    text: str


def split_top_level(expr: str) -> list[Part]:
    """``expr`` cut at its top-level comparison and set operators (outside any brackets)."""
    parts: list[Part] = []
    operator, matching = "", ""
    depth, start, i, quote = 0, 0, 0, ""
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (op := _OPERATOR.match(expr, i)):
            parts.append(Part(operator, matching, expr[start:i].strip()))
            modifiers = _MATCHING.match(expr, op.end())
            assert modifiers is not None  # every part of it is optional
            operator, matching = op.group(1), modifiers.group(1) or ""
            start = i = modifiers.end()
            continue
        i += 1
    parts.append(Part(operator, matching, expr[start:].strip()))
    return parts


def _enclosed(text: str) -> bool:
    """Whether ``text`` is one parenthesised expression: ``(a > 1)``, not ``(a) + (b)``."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return text.startswith("(") and i == len(text) - 1
    return False


def operands(expr: str) -> list[str]:
    """The parts of an alert expression that select data: each side of its top-level
    comparisons and set operators (thresholds dropped), and the argument of absent()."""
    result: list[str] = []
    for part in split_top_level(expr):
        if _NUMBER.fullmatch(part.text):
            continue
        if absent := _ABSENT.fullmatch(part.text):
            result.append(re.sub(r"\[[^\]]*\]$", "", absent.group(1).strip()))
        elif _enclosed(part.text):
            result += operands(part.text[1:-1])
        else:
            result.append(part.text)
    return result


def skeleton(expr: str) -> str:
    """``expr`` without its thresholds, its conditions joined by ``and``: it returns data
    exactly when every condition has data and their label sets match each other."""
    pieces: list[str] = []
    for part in split_top_level(expr):
        if _NUMBER.fullmatch(part.text):
            continue
        text = part.text
        if absent := _ABSENT.fullmatch(text):
            text = re.sub(r"\[[^\]]*\]$", "", absent.group(1).strip())
        elif _enclosed(text):
            text = f"({skeleton(text[1:-1])})"
        if pieces:
            joined = "or" if part.operator == "or" else "and"
            pieces.append(f"{joined} {part.matching}".strip())
        pieces.append(text)
    return " ".join(pieces)


def test_alert_expressions_split_at_their_conditions() -> None:
    """Thresholds are dropped, both sides of and/unless kept, absent() unwrapped."""
    expr = 'sum by (a) (rate(x{b=~"c"}[5m])) / sum(y) > 0.05 and sum(x) > bool 1'
    assert operands(expr) == ['sum by (a) (rate(x{b=~"c"}[5m])) / sum(y)', "sum(x)"]
    assert skeleton(expr) == 'sum by (a) (rate(x{b=~"c"}[5m])) / sum(y) and sum(x)'
    assert operands('absent(up{job="w"})') == ['up{job="w"}']
    assert skeleton('absent(up{job="w"})') == 'up{job="w"}'
    assert operands("a > on (i) group_left b") == ["a", "b"]
    assert skeleton("a > on (i) group_left b") == "a and on (i) b"
    assert operands("(a > 1) unless ignoring (x) (b == 0)") == ["a", "b"]
    assert skeleton("(a > 1) unless ignoring (x) (b == 0)") == "(a) and ignoring (x) (b)"
    assert operands("(a) + (b) > 1") == ["(a) + (b)"]


def test_worker_exposition_is_lint_clean(stack: Stack) -> None:
    """promtool check metrics finds nothing to say about a busy worker's /metrics."""
    status, text = stack.worker.get("/metrics")
    assert status == 200
    lint = subprocess.run(
        [stack.promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Each panel query and each variable query of the dashboard returns at least one series."""
    queries = dashboard_queries()
    assert len(queries) > 30
    empty: list[str] = []

    def all_return_data() -> bool:
        empty[:] = [f"{w}: {q}" for w, q in queries if not stack.prometheus.query(q)]
        return not empty

    try:
        wait_until(all_return_data, 30, "every dashboard query to return data")
    except AssertionError:
        raise AssertionError("queries with no data:\n" + "\n".join(empty)) from None


def test_every_alert_expression_returns_data(stack: Stack) -> None:
    """Each alert loads and evaluates without error; each side of its conditions returns
    data, and so does the whole expression with its thresholds taken out."""
    declared = re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M)
    probes: list[tuple[str, str]] = []

    def evaluated() -> bool:
        rules = [r for g in stack.prometheus.api("rules")["groups"] for r in g["rules"]]
        if any(r.get("lastEvaluation", "").startswith("0001") for r in rules):
            return False  # not evaluated yet
        assert sorted(r["name"] for r in rules) == sorted(declared)
        for rule in rules:
            assert (rule["health"], rule.get("lastError", "")) == ("ok", ""), rule["name"]
        probes[:] = [
            (r["name"], p) for r in rules for p in {*operands(r["query"]), skeleton(r["query"])}
        ]
        return True

    wait_until(evaluated, 30, "every alert rule to be evaluated")
    assert len(probes) >= len(declared)
    empty: list[str] = []

    def all_return_data() -> bool:
        empty[:] = [f"{n}: {q}" for n, q in probes if not stack.prometheus.query(q)]
        return not empty

    try:
        wait_until(all_return_data, 30, "every alert operand to return data")
    except AssertionError:
        raise AssertionError("alert operands with no data:\n" + "\n".join(empty)) from None


def test_no_alert_condition_holds_for_a_healthy_worker(stack: Stack) -> None:
    """Once the worker has caught up, no alert expression returns anything."""
    rules = [r for g in stack.prometheus.api("rules")["groups"] for r in g["rules"]]
    holding: list[str] = []

    def none_hold() -> bool:
        # Pending is normal for a moment (a lag above zero before the next lag export).
        holding[:] = [r["name"] for r in rules if stack.prometheus.query(r["query"])]
        return not holding

    try:
        wait_until(none_hold, 30, "no alert condition to hold")
    except AssertionError:
        raise AssertionError(f"alert conditions holding: {holding}") from None
