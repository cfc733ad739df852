"""The access and supply-chain checks of ``deploy/checks.py``: the Kafka ACLs the worker
needs (in Strimzi's KafkaUser and README's commands), and the hashed requirement locks.

Each function reports through ``problems`` (``checks.Problems``: ``check(ok, message)``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Protocol

import yaml  # type: ignore[import-untyped]  # PyYAML comes with kubernetes-validate

__all__ = ["check_acls", "check_locks"]


class Problems(Protocol):
    def check(self, ok: bool, message: str) -> None: ...


# The operations a Kafka ACL can name (kafka-acls.sh spelling = Strimzi's).
_OPERATIONS = {
    "Read", "Write", "Create", "Delete", "Alter", "Describe", "ClusterAction",
    "DescribeConfigs", "AlterConfigs", "IdempotentWrite", "All",
}  # fmt: skip
_ACL_OPTIONS = {"--topic": "topic", "--group": "group", "--transactional-id": "transactionalId"}
Acls = dict[tuple[str, str, str], set[str]]  # (resource type, name, pattern) -> operations


def expected_acls(config: Any) -> Acls:
    """The ACLs the worker needs with ``config``, as README "Security" explains them."""
    from worker.topics import plan_topics

    t, group = config.topics, config.worker.group_id
    internal = f"{group}."  # <group_id>.repartition, <group_id>.dedupe
    read_back = {t.state, t.members, t.repartition, getattr(t, "dedupe", t.repartition)}
    acls: Acls = {("topic", t.input, "literal"): {"Read", "Create"}}
    for spec in plan_topics(config):
        ops = {"Write", "DescribeConfigs", "Create"} | (
            {"Read"} if spec.name in read_back else set()
        )
        prefixed = spec.name.startswith(internal)
        key = ("topic", internal, "prefix") if prefixed else ("topic", spec.name, "literal")
        acls.setdefault(key, set()).update(ops)
    acls[("group", group, "literal")] = {"Read"}
    acls[("group", f"{group}-restore", "literal")] = {"Describe"}
    acls[("transactionalId", f"{group}-", "prefix")] = {"Write", "Describe"}
    return acls


def compare_acls(problems: Problems, where: str, found: Acls, wanted: Acls) -> None:
    for key in sorted(wanted.keys() | found.keys()):
        name = "{}:{}({})".format(*key)
        if key not in found:
            problems.check(False, f"{where}: no ACL on {name} (wants {sorted(wanted[key])})")
        elif key not in wanted:
            problems.check(False, f"{where}: {name} is not needed ({sorted(found[key])})")
        elif found[key] != wanted[key]:
            has, wants = sorted(found[key]), sorted(wanted[key])
            problems.check(False, f"{where}: {name} has {has}, wants {wants}")


def kafkauser_acls(problems: Problems, user: dict[str, Any]) -> Acls:
    spec = user.get("spec", {})
    problems.check(user.get("metadata", {}).get("name") == "group-worker", "not user group-worker")
    problems.check(spec.get("authentication", {}).get("type") == "scram-sha-512", "not SCRAM")
    problems.check(
        spec.get("authorization", {}).get("type") == "simple", "not simple authorization"
    )
    acls: Acls = {}
    for acl in spec.get("authorization", {}).get("acls", []):
        r = acl["resource"]
        problems.check(acl.get("type", "allow") == "allow", f"{r.get('name')}: not an allow rule")
        problems.check(acl.get("host", "*") == "*", f"{r.get('name')}: host restricted")
        key = (r["type"], r.get("name", ""), r.get("patternType", "literal"))
        acls.setdefault(key, set()).update(acl["operations"])
    return acls


def readme_acls(problems: Problems, readme: str) -> dict[str, Acls]:
    """The ``kafka-acls.sh --add`` commands of README's "Security" section, by principal."""
    section = readme.partition("\n## Security\n")[2].partition("\n## ")[0]
    problems.check(bool(section), "README has no Security section")
    by_principal: dict[str, Acls] = {}
    for command in section.replace("\\\n", " ").splitlines():
        if "kafka-acls.sh" not in command or "--add" not in command:
            continue
        words = shlex.split(command)
        options: dict[str, list[str]] = {}
        for flag, value in zip(words, [*words[1:], ""], strict=True):
            if flag.startswith("--"):
                options.setdefault(flag, []).append(value)
        problems.check("--bootstrap-server" in options, f"no --bootstrap-server: {command}")
        problems.check(
            options.get("--command-config") == ["admin.properties"],
            f"no --command-config admin.properties: {command}",
        )
        resources = [
            (kind, n) for flag, kind in _ACL_OPTIONS.items() for n in options.get(flag, [])
        ]
        problems.check(bool(resources), f"no resource: {command}")
        operations = set(options.get("--operation", []))
        problems.check(bool(operations) and operations <= _OPERATIONS, f"operations: {command}")
        pattern = options.get("--resource-pattern-type", ["literal"])[0]
        pattern = {"prefixed": "prefix", "literal": "literal"}.get(pattern, pattern)
        for principal in options.get("--allow-principal", []):
            for kind, name in resources:
                acls = by_principal.setdefault(principal, {})
                acls.setdefault((kind, name, pattern), set()).update(operations)
    return by_principal


def check_acls(problems: Problems, kafkauser: str, readme: str) -> int:
    """The KafkaUser's ACLs and README's commands for User:group-worker against what the
    default configuration needs; returns how many ACLs that is."""
    from worker.config import load_config

    config = load_config(Path("config/worker.toml"), {})
    wanted = expected_acls(config)
    users = [d for d in yaml.safe_load_all(Path(kafkauser).read_text()) if d]
    problems.check([u.get("kind") for u in users] == ["KafkaUser"], "not one KafkaUser")
    compare_acls(problems, "KafkaUser", kafkauser_acls(problems, users[0]), wanted)
    commands = readme_acls(problems, Path(readme).read_text())
    worker_commands = commands.pop("User:group-worker", {})
    compare_acls(problems, "README User:group-worker", worker_commands, wanted)
    # The commands' own groups, for the people who run them (any other principal).
    group = config.worker.group_id
    tools = {
        ("group", f"{group}-cli-restore", "literal"),
        ("group", "group-worker-tail-", "prefix"),
    }
    for key in sorted(tools):
        granted = any(key in acls for acls in commands.values())
        problems.check(granted, "README grants no one {}:{}({})".format(*key))
    return len(wanted)


def lock_pins(path: Path) -> dict[str, list[tuple[str, int]]]:
    """``name -> [(version, number of hashes)]`` of a hashed requirements file."""
    from packaging.utils import canonicalize_name

    pins: dict[str, list[tuple[str, int]]] = {}
    current: list[tuple[str, int]] | None = None
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
        if match:
            current = pins.setdefault(canonicalize_name(match.group(1)), [])
            current.append((match.group(2), 0))
        elif "--hash=" in line and current:
            version, hashes = current[-1]
            current[-1] = (version, hashes + line.count("--hash="))
    return pins


def check_locks(problems: Problems, pyproject: str) -> tuple[int, int]:
    """Each lock in requirements/ pins, with hashes, what pyproject.toml (or peer.in)
    asks; returns how many locks and pins were read."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads(Path(pyproject).read_text())
    here = Path(pyproject).parent / "requirements"
    runtime = project["project"]["dependencies"]
    extras = project["project"]["optional-dependencies"]
    build = project["build-system"]["requires"]
    wants = {
        "runtime.txt": runtime,
        "build.txt": build,
        "dev.txt": runtime + extras["dev"] + build,
        "bench.txt": runtime + extras["dev"] + extras["bench"] + build,
    }
    locks = {name: lock_pins(here / name) for name in wants if (here / name).is_file()}
    for name, requirements in wants.items():
        pins = locks.get(name)
        if pins is None:
            problems.check(False, f"no {name} (make lock)")
            continue
        for entry in requirements:
            req = Requirement(entry)
            found = pins.get(canonicalize_name(req.name), [])
            problems.check(bool(found), f"{name} lacks {req.name} (make lock)")
            for version, _ in found:
                ok = req.specifier.contains(version, prereleases=True)
                problems.check(ok, f"{name}: {req.name}=={version} is not {req.specifier}")
        for package, versions in pins.items():
            problems.check(all(h for _, h in versions), f"{name}: {package} has no hash")
            # The image runs what the tests ran: one version of a package across the locks.
            shared = locks.get("dev.txt", {}).get(package)
            if shared and name != "dev.txt" and {v for v, _ in versions} - {v for v, _ in shared}:
                problems.check(False, f"{name}: {package} differs from dev.txt")
    # The benchmark's peer (bench/peer.py) has a lock of its own, made from peer.in.
    if (here / "peer.in").is_file():
        pins = lock_pins(here / "peer.txt") if (here / "peer.txt").is_file() else {}
        problems.check(bool(pins), "no peer.txt (make lock)")
        for line in (here / "peer.in").read_text().splitlines():
            entry = line.split("#")[0].strip()
            if not entry:
                continue
            req = Requirement(entry)
            found = pins.get(canonicalize_name(req.name), [])
            ok = bool(found) and all(req.specifier.contains(v, prereleases=True) for v, _ in found)
            problems.check(ok, f"peer.txt: {req.name} is not {req.specifier} (make lock)")
        for package, versions in pins.items():
            problems.check(all(h for _, h in versions), f"peer.txt: {package} has no hash")
        locks["peer.txt"] = pins
    return len(locks), sum(len(p) for p in locks.values())
