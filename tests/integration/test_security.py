"""Secure by default, against a secured broker: SASL/SCRAM-SHA-512 over TLS, ACLs enforced.

The ``secure_broker`` fixture (conftest) starts that broker (``kafka.sh up`` with
``KAFKA_SECURITY=sasl_ssl`` on ``KAFKA_TEST_SECURE_PORT``, default 19192), or reuses one
already running there, and stops what it started, whatever the tests did. The worker's
principal gets exactly the ACLs README "Security" lists (``secure.worker_acls``).
The metric-cardinality test runs on the plain test broker (``KAFKA_TEST_BOOTSTRAP``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer
from confluent_kafka.admin import (
    AclBindingFilter,
    AclPermissionType,
    NewTopic,
    ResourceType,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import PARTITIONS, ROOT, Topics, WorkerProcess, produce, wait_until
from tests.integration.secure import (
    CREATE,
    DESCRIBE,
    DESCRIBE_CONFIGS,
    READ,
    WRITE,
    L,
    P,
    SecureBroker,
    add_user,
    cause_line,
    config_file,
    grant,
    group_worker,
    log_events,
    read_all,
    revoke,
    secure_topics,
    worker_acls,
)
from worker import codec
from worker.kafka import produce_all
from worker.metrics import Metrics
from worker.normalise import WARNING_CODES
from worker.pipeline import KNOWN_CALL_TYPES, REASONS
from worker.state import GROUP_STATE_FULL

pytestmark = pytest.mark.integration


# What a refused start may take, at most, from launch to exit.
EXIT_WITHIN = 30.0


# Personal data no log line may show: each appears in a call below.
PII = (
    "quillon.vexmoor.83@example.net",
    "Quillon Vexmoor",
    "+1 415 555 0142",
    "not-an-email-zyxwvu-Orsolya",
    "htp:/bad-url-brightwater",
    "dl.person.4471@example.org",
    "Orsolya Brightwater",
    "broken.json.9921@example.com",
    "identify.only.5531@example.com",
)
TS = "2026-01-02T03:04:05.678Z"


def corpus() -> list[bytes]:
    """Enriched calls (one with trait warnings), a duplicate, dead letters, a skipped call."""
    calls: list[dict[str, Any]] = [
        {
            "type": "group",
            "messageId": "m1",
            "userId": "u1",
            "groupId": "g-a",
            "timestamp": TS,
            "traits": {"name": PII[1], "email": PII[0], "phone": PII[2]},
        },
        {
            "type": "group",
            "messageId": "m2",
            "userId": "u2",
            "groupId": "g-a",
            "timestamp": TS,
            "traits": {"email": PII[3], "website": PII[4], "plan": "pro"},
        },
        {
            "type": "group",
            "messageId": "m1",
            "userId": "u1",
            "groupId": "g-a",
            "timestamp": TS,
            "traits": {"name": PII[1]},
        },
        {"type": "group", "messageId": "m3", "userId": "u3", "timestamp": TS, "traits": {}},
        {"type": "identify", "userId": "u4", "traits": {"email": PII[8]}},
        {
            "type": "group",
            "messageId": "m4",
            "userId": "u5",
            "groupId": "g-b",
            "timestamp": TS,
            "traits": {"name": "Beta"},
        },
    ]
    calls[3]["traits"] = {"email": PII[5], "name": PII[6]}  # missing groupId: dead letter
    lines = [codec.encode(c) for c in calls]
    lines.append(b'{"type": "group", "traits": {"email": "' + PII[7].encode() + b'"')
    return lines


@dataclass
class SecureRun:
    """What one worker run over TLS with the minimal ACLs left behind."""

    broker: SecureBroker
    topics: Topics
    oncall_password: str
    worker_log: str
    exit_code: int
    metrics: str
    probes: list[tuple[int, str]]
    cli: dict[str, subprocess.CompletedProcess[bytes]]
    outputs: dict[str, list[Message]]
    commits: float
    aborts: float


@pytest.fixture(scope="module")
def secure_run(secure_broker: SecureBroker, tmp_path_factory: pytest.TempPathFactory) -> SecureRun:
    """The corpus through ``group-worker run`` as User:group-worker with only the
    documented ACLs, at exactly once and debug level, its password read from a file;
    the commands as User:oncall with README's grants for people, the password by env."""
    broker, t = secure_broker, secure_topics()
    tmp = tmp_path_factory.mktemp("secure-run")
    grant(broker, "User:group-worker", worker_acls(t))
    oncall_password = f"oncall-{uuid.uuid4().hex}"
    add_user(broker, "oncall", oncall_password)
    cli_group = (ResourceType.GROUP, f"{t.group_id}-cli-restore", L, DESCRIBE)
    grant(
        broker,
        "User:oncall",
        [
            (ResourceType.TOPIC, t.input, L, WRITE),
            *((ResourceType.TOPIC, n, L, READ) for n in (t.enriched, t.state, t.dlq)),
            cli_group,
            (ResourceType.GROUP, "group-worker-tail-", P, DESCRIBE),
        ],
    )
    worker_config = config_file(tmp / "worker.toml", broker, "group-worker")
    oncall_config = config_file(tmp / "oncall.toml", broker, "oncall")
    as_worker = {"KAFKA_SASL_PASSWORD": broker.password("group-worker")}
    as_oncall = {"KAFKA_SASL_PASSWORD": oncall_password}
    cli: dict[str, subprocess.CompletedProcess[bytes]] = {}
    cli["topics create"], _ = group_worker(worker_config, t, "topics", "create", **as_worker)
    assert cli["topics create"].returncode == 0, cli["topics create"].stderr.decode()
    (tmp / "calls.jsonl").write_bytes(b"\n".join(corpus()) + b"\n")
    cli["send"], _ = group_worker(oncall_config, t, "send", str(tmp / "calls.jsonl"), **as_oncall)
    # Oncall may read the enriched topic (so it sees it) but not write it.
    cli["send to enriched"], _ = group_worker(
        oncall_config, t, "send", "--topic", t.enriched, str(tmp / "calls.jsonl"), **as_oncall
    )
    assert cli["send"].returncode == 0, cli["send"].stderr.decode()

    worker = WorkerProcess(
        t,
        tmp,
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_sasl_password_file=str(broker.password_file("group-worker")),
    )
    worker.config = worker_config
    try:
        worker.start()
        enriched = read_all(broker, t.enriched, expect=3)
        wait_until(
            lambda: worker.sample("group_worker_calls_consumed_total") == 7, 60, "7 calls consumed"
        )
        status, metrics = worker.get("/metrics")
        assert status == 200
        probes = [worker.get("/healthz"), worker.get("/readyz")]
        commits = worker.sample("group_worker_commit_duration_seconds_count")
        aborts = worker.sample("group_worker_transaction_aborts_total")
        for name, args in {
            "tail enriched": ("tail", t.enriched, "--from-beginning", "--timeout", "5"),
            "tail dlq": ("tail", t.dlq, "--from-beginning", "--timeout", "5"),
            "tail members": ("tail", t.members, "--from-beginning", "--timeout", "5"),
            "state get": ("state", "get", "g-a"),
            "state dump": ("state", "dump"),
        }.items():
            cli[name], _ = group_worker(oncall_config, t, *args, **as_oncall)
        # The worker's principal reads the state topic (its restores), in no tail group.
        tail_state = ("tail", t.state, "--from-beginning", "--timeout", "5")
        cli["tail state as the worker"], _ = group_worker(
            worker_config, t, *tail_state, **as_worker
        )
        exit_code = worker.stop(timeout=60)
    finally:
        worker.kill()
    outputs = {"enriched": enriched}
    for route, topic in {
        "dlq": t.dlq,
        "state": t.state,
        "members": t.members,
        "dedupe": f"{t.group_id}.dedupe",
        "repartition": f"{t.group_id}.repartition",
    }.items():
        outputs[route] = read_all(broker, topic)
    return SecureRun(
        broker,
        t,
        oncall_password,
        worker.log_path.read_text(errors="replace"),
        exit_code,
        metrics,
        probes,
        cli,
        outputs,
        commits,
        aborts,
    )


def test_the_worker_runs_exactly_once_over_tls_with_only_the_documented_acls(
    secure_run: SecureRun,
) -> None:
    """With README's ACLs alone, every output is written in committed transactions, and
    topics create, send, tail and state work with the same settings."""
    run = secure_run
    assert run.exit_code == 0, run.worker_log[-3000:]
    assert "SASL_SSL" in run.worker_log  # config_loaded: it did talk TLS and SASL
    enriched = [codec.decode(m.value() or b"") for m in run.outputs["enriched"]]
    assert sorted(c["messageId"] for c in enriched) == ["m1", "m2", "m4"]  # m1 once
    dead = [codec.decode(m.value() or b"") for m in run.outputs["dlq"]]
    assert sorted(d["reason"] for d in dead) == ["invalid_json", "missing_group_id"]
    states = {m.key(): codec.decode(m.value() or b"") for m in run.outputs["state"]}
    assert set(states) == {b"g-a", b"g-b"}
    assert states[b"g-a"]["memberCount"] == 2
    assert len(run.outputs["members"]) == 3
    assert len(run.outputs["dedupe"]) == 3
    assert len(run.outputs["repartition"]) == 4  # valid group calls, m1 twice
    assert run.commits > 0
    assert run.aborts == 0

    for name in ("topics create", "send", "tail enriched", "tail dlq", "state get", "state dump"):
        assert run.cli[name].returncode == 0, (name, run.cli[name].stderr.decode())
    assert b"partitions" in run.cli["topics create"].stdout
    assert len(run.cli["tail enriched"].stdout.splitlines()) == 3
    assert len(run.cli["tail dlq"].stdout.splitlines()) == 2
    assert json.loads(run.cli["state get"].stdout)["memberCount"] == 2
    assert len(run.cli["state dump"].stdout.splitlines()) == 2
    # User:oncall has no Read on the members topic: one line saying so, not a hang.
    denied = run.cli["tail members"]
    assert denied.returncode == 1
    assert f"topic {run.topics.members}" in denied.stderr.decode()
    assert "TOPIC_AUTHORIZATION_FAILED" in denied.stderr.decode()
    # A delivery refused for an ACL ends send at once (a stream's input may never end).
    unwritable = run.cli["send to enriched"]
    assert unwritable.returncode == 1
    assert unwritable.stderr.decode().splitlines()[-1] == (
        f"group-worker: topic {run.topics.enriched}: not authorized (check the ACLs): "
        "TOPIC_AUTHORIZATION_FAILED: Broker: Topic authorization failed"
    )
    # A topic it may read, in a group it may not use: the group is named, not the topic.
    no_group = run.cli["tail state as the worker"]
    assert no_group.returncode == 1
    assert "tail: consumer group group-worker-tail-" in no_group.stderr.decode()
    assert "GROUP_AUTHORIZATION_FAILED" in no_group.stderr.decode()


def test_the_password_is_in_no_log_metric_or_probe(secure_run: SecureRun) -> None:
    """Neither the worker's password (read from a file) nor oncall's (from the
    environment) is in any log line, metric or probe body, at debug level."""
    run = secure_run
    passwords = [run.broker.password("group-worker"), run.oncall_password]
    assert all(len(p) >= 20 for p in passwords)
    events = log_events(run.worker_log)
    loaded = next(e for e in events if e["event"] == "config_loaded")
    assert loaded["kafka"]["sasl.password"] == "***"
    assert any(e["level"] == "debug" for e in events)  # librdkafka's debug lines, shown
    texts = [run.worker_log, run.metrics, *(body for _, body in run.probes)]
    for result in run.cli.values():
        texts += [result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")]
    for text in texts:
        for password in passwords:
            assert password not in text


def test_trait_values_are_in_no_log_line(secure_run: SecureRun) -> None:
    """Emails, phone numbers and names of enriched, warned, skipped and dead-lettered
    calls reach the outputs but no line of the worker's debug log."""
    run = secure_run
    written = b"".join(m.value() or b"" for ms in run.outputs.values() for m in ms)
    for value in (*PII[:2], PII[3], PII[5], PII[6], PII[7]):
        assert value.encode() in written  # it went through the worker
    assert any(e["level"] == "debug" for e in log_events(run.worker_log))
    for value in PII:
        assert value not in run.worker_log
        assert value not in run.metrics


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that did not sign the broker's (keytool, from the JDK)."""
    keytool = shutil.which("keytool")
    assert keytool, "keytool (from the JDK) is needed"
    tmp = tmp_path_factory.mktemp("other-ca")
    store = ["-keystore", str(tmp / "ca.p12"), "-storepass", "changeit", "-alias", "ca"]
    for args in (
        ["-genkeypair", "-keyalg", "EC", "-dname", "CN=someone else's CA", "-ext", "bc:c"],
        ["-exportcert", "-rfc", "-file", str(tmp / "ca.pem")],
    ):
        subprocess.run([keytool, *args, *store], check=True, capture_output=True, timeout=60)
    return tmp / "ca.pem"


# (case, what the line must name)
REFUSALS = [
    ("wrong_password", ["refused the login", "invalid credentials"]),
    ("unknown_user", ["refused the login", "invalid credentials"]),
    ("untrusted_ca", ["refused the TLS handshake", "certificate verify failed"]),
    ("no_write_on_an_output", ["lacks Write on topic", ".enriched"]),
    ("no_transactional_id", ["transactional id gw-", "Write", "TRANSACTIONAL_ID_AUTHORIZATION"]),
    ("no_group", ["consumer group gw-", "Read", "GROUP_AUTHORIZATION_FAILED"]),
]


@pytest.mark.parametrize(("case", "names"), REFUSALS, ids=[c for c, _ in REFUSALS])
def test_a_refusal_ends_the_worker_within_seconds_with_one_line(
    secure_broker: SecureBroker,
    tmp_path: Path,
    other_ca: Path,
    case: str,
    names: list[str],
) -> None:
    """Bad credentials, an untrusted CA or a missing ACL: exit 1 in under 30 s with one
    line naming it, the password nowhere, and nothing visible to read_committed readers."""
    broker, t = secure_broker, secure_topics()
    grant(broker, "User:group-worker", worker_acls(t))
    admin = broker.admin()
    admin.create_topics([NewTopic(t.input, PARTITIONS, 1)])[t.input].result(30)
    calls = corpus()
    producer = Producer(broker.client("admin", **{"enable.idempotence": True}))
    assert produce_all(producer, t.input, ((None, c) for c in calls)) == (len(calls), [])
    user, password, ca = "group-worker", broker.password("group-worker"), None
    if case == "wrong_password":
        password = f"wrong-{uuid.uuid4().hex}"
    elif case == "unknown_user":
        user = f"nobody-{uuid.uuid4().hex[:6]}"
    elif case == "untrusted_ca":
        ca = other_ca
    elif case == "no_write_on_an_output":
        revoke(broker, "User:group-worker", ResourceType.TOPIC, t.enriched)
        grant(
            broker,
            "User:group-worker",
            [
                (ResourceType.TOPIC, t.enriched, L, op)
                for op in (DESCRIBE, DESCRIBE_CONFIGS, CREATE)
            ],
        )
    elif case == "no_transactional_id":
        revoke(broker, "User:group-worker", ResourceType.TRANSACTIONAL_ID, f"{t.group_id}-")
    elif case == "no_group":
        revoke(broker, "User:group-worker", ResourceType.GROUP, t.group_id)
    config = config_file(tmp_path / "worker.toml", broker, user, ca)

    result, seconds = group_worker(config, t, "run", KAFKA_SASL_PASSWORD=password, HTTP_PORT="0")
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    print(f"{case}: exit {result.returncode} after {seconds:.1f}s")
    assert result.returncode == 1, output[-4000:]
    assert seconds < EXIT_WITHIN, output[-4000:]
    line = cause_line(output)
    for name in names:
        assert name in line, line
    assert password not in output
    assert "Traceback" not in output

    existing = admin.list_topics(timeout=10).topics
    for topic in (t.enriched, t.state, t.members, t.dlq, f"{t.group_id}.dedupe"):
        if topic in existing:
            assert read_all(broker, topic, idle=1) == [], topic


COMMANDS = [
    ("state", "get", "g-a"),
    ("state", "dump"),
    ("tail", "enriched"),
    ("send", "calls.jsonl"),
    ("topics", "create"),
]


@pytest.mark.parametrize("case", ["wrong_password", "untrusted_ca"])
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_refusal_ends_each_command_within_seconds_with_one_line(
    secure_broker: SecureBroker, tmp_path: Path, other_ca: Path, args: tuple[str, ...], case: str
) -> None:
    """Each command, given a wrong password or a CA that did not sign the broker, exits 1
    within seconds with the line naming the refusal that ``run`` prints (``state`` used
    to wait 10 s, then name a transport failure)."""
    (tmp_path / "calls.jsonl").write_bytes(corpus()[0] + b"\n")
    ca = other_ca if case == "untrusted_ca" else None
    config = config_file(tmp_path / "worker.toml", secure_broker, "group-worker", ca)
    password = secure_broker.password("group-worker")
    if case == "wrong_password":
        password = f"wrong-{uuid.uuid4().hex}"
    args = tuple(str(tmp_path / a) if a.endswith(".jsonl") else a for a in args)
    result, seconds = group_worker(config, secure_topics(), *args, KAFKA_SASL_PASSWORD=password)
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 1, output[-4000:]
    assert seconds < EXIT_WITHIN, output[-4000:]
    line = cause_line(output)
    for name in dict(REFUSALS)[case]:
        assert name in line, line
    assert password not in output


def test_metric_series_stay_within_the_fixed_label_sets(
    topics: Topics, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """10,000 hostile calls (made-up types, trait keys, bad values, broken JSON) leave
    the exported series within the bound the code's closed label sets give."""
    rng = uuid.uuid4().hex
    calls: list[bytes] = []
    for n in range(10_000):
        kind = n % 5
        if kind == 0:
            calls.append(codec.encode({"type": f"t{n}-{rng}", "userId": "u", "groupId": "g"}))
        elif kind == 1:
            traits = {
                f"k{n}-{rng}": "x",
                "email": f"no-email-{n}",
                "website": f"htp:/{n}",
                "createdAt": f"day {n}",
                "employees": f"{n} people",
            }
            call = {"type": "group", "userId": f"u{n}", "groupId": f"g{n % 50}", "traits": traits}
            calls.append(codec.encode({**call, "messageId": f"m{n}", "timestamp": TS}))
        elif kind == 2:
            calls.append(codec.encode({"type": "group", "userId": f"u{n}", "traits": {}}))
        elif kind == 3:
            calls.append(f'{{"type": "group{n}", '.encode())
        else:
            calls.append(codec.encode({f"type{n}": "group", "groupId": "g"}))
    worker = WorkerProcess(topics, tmp_path)
    workers.append(worker.start())
    produce(topics.input, ((f"k{n % 97}".encode(), c) for n, c in enumerate(calls)))
    wait_until(
        lambda: worker.sample("group_worker_calls_consumed_total") == 10_000,
        240,
        "10,000 calls consumed",
    )
    status, text = worker.get("/metrics")
    assert status == 200
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    labels: dict[str, set[str]] = {}
    for sample in samples:
        for key, value in sample.labels.items():
            labels.setdefault(key, set()).add(value)

    skipped_types = (KNOWN_CALL_TYPES - {"group"}) | {"other"}
    assert labels["type"] <= skipped_types
    assert "other" in labels["type"]
    assert labels["reason"] <= set(REASONS)
    assert labels["code"] <= {*WARNING_CODES, GROUP_STATE_FULL}
    assert {"invalid_email", "invalid_url"} <= labels["code"]
    assert labels["topic"] <= {topics.input, topics.repartition}
    assert labels.get("partition", set()) <= {str(p) for p in range(PARTITIONS)}
    print(f"{len(samples)} series after 10,000 hostile calls; bound {series_bound(PARTITIONS)}")
    assert len(samples) <= series_bound(PARTITIONS)


def series_bound(partitions: int) -> int:
    """The most series one worker exports, from the code's closed label sets: the
    unlabelled metrics and pre-exported zeros of a fresh registry (every outcome, route,
    skipped type, dead-letter reason, warning code and rebalance kind), plus one series
    per stage's input topic (assigned partitions) and per assigned partition of each
    (lag)."""
    fresh = sum(len(family.samples) for family in Metrics().registry.collect())
    stage_inputs = 2  # the input and the repartition topic
    return fresh + stage_inputs + stage_inputs * partitions


def test_the_series_bound_is_the_one_readme_states() -> None:
    """README states the bound the code gives: N + 2 x partitions series per worker."""
    readme = (ROOT / "README.md").read_text()
    assert f"**{series_bound(0)} + 2 x partitions** series" in readme
    assert f"{series_bound(6)} with the default 6" in readme


def test_an_acl_revoked_mid_run_ends_the_worker_and_its_open_transaction(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """Write on the enriched topic revoked while the worker runs: exit 1 within 30 s,
    one line naming it, and none of the next batch's outputs committed anywhere."""
    broker, t = secure_broker, secure_topics()
    grant(broker, "User:group-worker", worker_acls(t))
    worker = WorkerProcess(
        t,
        tmp_path,
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_sasl_password_file=str(broker.password_file("group-worker")),
    )
    worker.config = config_file(tmp_path / "worker.toml", broker, "group-worker")
    producer = Producer(broker.client("admin", **{"enable.idempotence": True}))

    def batch(name: str) -> list[tuple[bytes | None, bytes | None]]:
        return [
            (
                f"u{n}".encode(),
                codec.encode(
                    {
                        "type": "group",
                        "messageId": f"{name}{n}",
                        "userId": f"u{n}",
                        "groupId": f"{name}-g{n % 7}",
                        "timestamp": TS,
                        "traits": {"plan": name},
                    }
                ),
            )
            for n in range(50)
        ]

    try:
        worker.start()
        assert produce_all(producer, t.input, batch("first")) == (50, [])
        assert len(read_all(broker, t.enriched, expect=50)) == 50
        binding = AclBindingFilter(
            ResourceType.TOPIC, t.enriched, L, "User:group-worker", "*", WRITE,
            AclPermissionType.ALLOW,
        )  # fmt: skip
        admin = broker.admin()
        assert len(admin.delete_acls([binding])[binding].result(30)) == 1
        time.sleep(1)  # the authorizer applies it from the metadata log
        assert produce_all(producer, t.input, batch("second")) == (50, [])
        assert worker.process is not None
        started = time.monotonic()
        code = worker.process.wait(120)
        seconds = time.monotonic() - started
    finally:
        worker.kill()
    output = worker.log_path.read_text(errors="replace")
    print(f"revoked mid-run: exit {code} {seconds:.1f}s after the second batch")
    assert code == 1, output[-4000:]
    assert seconds < EXIT_WITHIN
    line = cause_line(output)
    assert "not authorized" in line
    assert "TOPIC_AUTHORIZATION_FAILED" in line
    for topic in (t.enriched, t.state, t.members, f"{t.group_id}.dedupe"):
        records = read_all(broker, topic, idle=2)
        written = b"".join((m.key() or b"") + (m.value() or b"") for m in records)
        assert b"second" not in written, topic
        assert b"first" in written, topic
