"""Helpers for tests against the secured local broker (``KAFKA_SECURITY=sasl_ssl``).

``conftest.secure_broker`` starts it (or reuses one running on ``KAFKA_TEST_SECURE_PORT``,
default 19192) and stops what it started; these give its clients, users, ACLs (README
"Security"'s, for a test's names), the worker's TOML and the commands run against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Message
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from tests.integration.harness import PARTITIONS, ROOT, Topics, read_topic, wait_until

__all__ = [
    "CREATE",
    "DESCRIBE",
    "DESCRIBE_CONFIGS",
    "KAFKA_SH",
    "READ",
    "SECURE_PORT",
    "WRITE",
    "L",
    "P",
    "SecureBroker",
    "add_user",
    "cause_line",
    "config_file",
    "grant",
    "group_worker",
    "log_events",
    "read_all",
    "revoke",
    "secure_topics",
    "worker_acls",
]

SECURE_PORT = int(os.environ.get("KAFKA_TEST_SECURE_PORT", "19192"))
KAFKA_SH = ROOT / "deploy" / "local-kafka" / "kafka.sh"

L, P = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
READ, WRITE, CREATE = AclOperation.READ, AclOperation.WRITE, AclOperation.CREATE
DESCRIBE, DESCRIBE_CONFIGS = AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS


@dataclass(frozen=True)
class SecureBroker:
    """The secured broker: its address, the CA that signed it, its users' passwords."""

    bootstrap: str
    state_dir: Path

    @property
    def ca(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def password_file(self, user: str) -> Path:
        return self.state_dir / "secrets" / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    def client(self, user: str, **settings: Any) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": self.password(user),
            "ssl.ca.location": str(self.ca),
            **settings,
        }

    def admin(self) -> AdminClient:
        return AdminClient(self.client("admin"))


def secure_topics() -> Topics:
    """Fresh names, the outputs outside the group's prefix (an ACL on the prefix
    ``<group_id>.`` covers only the internal topics)."""
    # The repartition topic is derived from the group id: gw-<tag>.repartition.
    return Topics.unique(name_repartition=False, prefix="sec", group_prefix="gw")


def worker_acls(t: Topics) -> list[tuple[ResourceType, str, ResourcePatternType, AclOperation]]:
    """README "Security"'s ACLs for User:group-worker, for the names of ``t``."""
    output = (WRITE, DESCRIBE_CONFIGS, CREATE)
    read_back = (READ, WRITE, DESCRIBE_CONFIGS, CREATE)
    rows = [
        (ResourceType.TOPIC, t.input, L, (READ, CREATE)),
        (ResourceType.TOPIC, t.enriched, L, output),
        (ResourceType.TOPIC, t.dlq, L, output),
        (ResourceType.TOPIC, t.state, L, read_back),
        (ResourceType.TOPIC, t.members, L, read_back),
        (ResourceType.TOPIC, f"{t.group_id}.", P, read_back),
        (ResourceType.GROUP, t.group_id, L, (READ,)),
        (ResourceType.GROUP, f"{t.group_id}-restore", L, (DESCRIBE,)),
        (ResourceType.TRANSACTIONAL_ID, f"{t.group_id}-", P, (WRITE, DESCRIBE)),
    ]
    return [(kind, name, pattern, op) for kind, name, pattern, ops in rows for op in ops]


def grant(
    broker: SecureBroker,
    principal: str,
    acls: list[tuple[ResourceType, str, ResourcePatternType, AclOperation]],
) -> None:
    bindings = [
        AclBinding(kind, name, pattern, principal, "*", op, AclPermissionType.ALLOW)
        for kind, name, pattern, op in acls
    ]
    admin = broker.admin()  # kept: its futures fail if it is destroyed first
    for future in admin.create_acls(bindings).values():
        future.result(30)

    # The broker authorizes from its copy of the metadata: wait until it lists them all.
    def listed() -> bool:
        futures = [
            admin.describe_acls(
                AclBindingFilter(
                    b.restype,
                    b.name,
                    b.resource_pattern_type,
                    principal,
                    "*",
                    b.operation,
                    AclPermissionType.ALLOW,
                )
            )
            for b in bindings
        ]
        return all(f.result(30) for f in futures)

    wait_until(listed, 30, f"the broker to list the ACLs of {principal}")


def revoke(broker: SecureBroker, principal: str, kind: ResourceType, name: str) -> None:
    binding = AclBindingFilter(
        kind, name, ResourcePatternType.ANY, principal, "*", AclOperation.ANY, AclPermissionType.ANY
    )
    admin = broker.admin()
    for future in admin.delete_acls([binding]).values():
        future.result(30)


def add_user(broker: SecureBroker, user: str, password: str) -> None:
    credential = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upsert = UserScramCredentialUpsertion(user, credential, password.encode())
    admin = broker.admin()
    admin.alter_user_scram_credentials([upsert])[user].result(30)


def config_file(path: Path, broker: SecureBroker, user: str, ca: Path | None = None) -> Path:
    """The worker's TOML: TLS and SASL settings, debug logs (librdkafka's security and
    configuration debug lines too); never the password."""
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{broker.bootstrap}"
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{user}"
"ssl.ca.location" = "{ca or broker.ca}"
debug = "security,conf"

[log]
level = "debug"
"""
    )
    return path


def group_worker(
    config: Path, t: Topics, *args: str, **environ: str
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run ``group-worker ARGS`` with ``config`` and ``t`` (at most 120 s); the result
    and its seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
    env.update(t.environ(), GROUP_WORKER_TOPICS_PARTITIONS=str(PARTITIONS))
    env.update({f"GROUP_WORKER_{k}": v for k, v in environ.items()})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(config), *args],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
        check=False,
        env=env,
    )
    return result, time.monotonic() - started


def read_all(broker: SecureBroker, topic: str, expect: int = 0, idle: float = 3.0) -> list[Message]:
    """Every committed record of ``topic``, read as the admin (read_committed)."""
    return read_topic(topic, expect, idle, timeout=90, client=broker.client("admin"))


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``text``."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def cause_line(output: str) -> str:
    """The one line that says why the worker stopped: the command's error line, or the
    service's fatal log event."""
    lines = [
        line
        for line in output.splitlines()
        if line.startswith("group-worker: ")
        or '"event": "fatal_kafka_error"' in line
        or '"event":"fatal_kafka_error"' in line
    ]
    assert len(lines) == 1, output[-4000:]
    return lines[0]
