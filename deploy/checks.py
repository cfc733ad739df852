"""Checks behind ``make deploy-check`` that no off-the-shelf tool makes (see deploy/check.sh).

Run with the project's virtualenv from the repository root, after ``deploy/tools.sh``::

    python deploy/checks.py metrics                  # exposition of every metric, for promtool
    python deploy/checks.py dashboard FILE           # units, metric and label names
    python deploy/checks.py rules FILE               # annotations, metric and label names
    python deploy/checks.py dockerfile FILE          # what hadolint does not check
    python deploy/checks.py compose FILE             # what the compose schema does not check
    python deploy/checks.py crd-schema CRD OUT       # CRD openAPIV3Schema -> strict JSON schema
    python deploy/checks.py split RENDERED DIR       # core objects to DIR/core.yaml, others to JSON
    python deploy/checks.py policy RENDERED          # the manifests agree with the worker's config
    python deploy/checks.py acls KAFKAUSER README    # the ACLs the default configuration needs
    python deploy/checks.py locks PYPROJECT          # requirements/*.txt pin what pyproject asks

Each prints what it checked and exits 1 with one line per problem. ``acls`` and ``locks``
live in ``deploy/access.py``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import access  # deploy/access.py: run as a script, this directory is on the path
import yaml  # type: ignore[import-untyped]  # PyYAML comes with kubernetes-validate

__all__ = ["main"]

# Labels Prometheus attaches to every scraped series (the operator adds pod, container...).
_TARGET_LABELS = {"namespace", "job", "instance", "pod", "container", "endpoint", "service"}
# Kinds validated against CRD schemas rather than by kubernetes-validate.
_CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}
_SELECTOR = re.compile(r"\b(group_worker_\w+|up)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


class Problems:
    """Collects problems; ``exit`` reports them all at once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.found: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.found.append(message)

    def exit(self, summary: str) -> int:
        for message in self.found:
            print(f"{self.what}: {message}", file=sys.stderr)
        if self.found:
            return 1
        print(f"{self.what}: {summary}")
        return 0


def exposition() -> str:
    """Every metric of a fresh ``Metrics``, each labelled one with one child per label."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from worker.metrics import Metrics

    metrics = Metrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*["example"] * len(value._labelnames))
    return generate_latest(metrics.registry).decode()


def known_series() -> dict[str, set[str]]:
    """Series names the worker exports (with suffixes), each with its label names."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {"up": set()}
    for family in text_string_to_metric_families(exposition()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check_queries(problems: Problems, where: str, expr: str, known: dict[str, set[str]]) -> None:
    """Every metric in ``expr`` exists, and every label it names exists somewhere."""
    every_label = set().union(*known.values()) | _TARGET_LABELS
    selectors = list(_SELECTOR.finditer(expr))
    problems.check(bool(selectors), f"{where}: no group_worker_ metric in {expr!r}")
    for match in selectors:
        name, braces = match.group(1), match.group(2) or ""
        problems.check(name in known, f"{where}: unknown metric {name}")
        for label in _MATCHER.findall(braces):
            allowed = known.get(name, set()) | _TARGET_LABELS
            problems.check(label in allowed, f"{where}: {name} has no label {label}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            problems.check(label in every_label, f"{where}: no metric has a label {label}")


def cmd_metrics() -> int:
    sys.stdout.write(exposition())
    return 0


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included, rows themselves excluded."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def cmd_dashboard(path: str) -> int:
    problems = Problems(path)
    dashboard = json.loads(Path(path).read_text())
    known = known_series()
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for name in ("datasource", "namespace", "job", "instance", "topic"):
        problems.check(name in variables, f"no template variable {name}")
    panels = list(dashboard_panels(dashboard))
    count = 0
    for panel in panels:
        title = panel.get("title", "?")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        problems.check(bool(unit), f"panel {title!r} has no unit")
        problems.check(bool(panel.get("description")), f"panel {title!r} has no description")
        targets = panel.get("targets", [])
        problems.check(bool(targets), f"panel {title!r} has no query")
        for target in targets:
            count += 1
            check_queries(problems, f"panel {title!r}", target.get("expr", ""), known)
    return problems.exit(f"{len(panels)} panels, {count} queries: units set, metrics exist")


def cmd_rules(path: str) -> int:
    problems = Problems(path)
    known = known_series()
    rules = [r for g in yaml.safe_load(Path(path).read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        name = rule.get("alert") or rule.get("record", "?")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            problems.check(bool(annotations.get(key)), f"{name} has no {key} annotation")
        severity = rule.get("labels", {}).get("severity")
        problems.check(severity in ("critical", "warning"), f"{name}: severity {severity!r}")
        check_queries(problems, name, rule["expr"], known)
    return problems.exit(f"{len(rules)} rules: runbooks present, metrics exist")


def cmd_dockerfile(path: str) -> int:
    problems = Problems(path)
    text = Path(path).read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    problems.check(len(stages) >= 2, "not multi-stage")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    image = base.group(1) if base else (stages[-1] if stages else "")
    problems.check(bool(re.fullmatch(r"python:3\.11-slim\S*", image)), f"base is {image}")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    problems.check(bool(users) and bool(re.fullmatch(r"\d+(:\d+)?", users[-1])), "USER not numeric")
    problems.check(
        'ENTRYPOINT ["group-worker"]' in text, "ENTRYPOINT is not exec-form group-worker"
    )
    problems.check('CMD ["run"]' in text, 'CMD is not ["run"]')
    problems.check("GROUP_WORKER_HTTP_HOST=0.0.0.0" in text, "GROUP_WORKER_HTTP_HOST not 0.0.0.0")
    problems.check(bool(re.search(r"^EXPOSE 9464$", text, re.M)), "no EXPOSE 9464")
    problems.check("COPY config/worker.toml" in text, "config/worker.toml not copied")
    final = text[text.rfind("\nFROM ") :]
    for tool in ("gcc", "build-essential", "apt-get install"):
        problems.check(tool not in final, f"final stage installs {tool}")
    # Reproducible: the locked, hashed dependencies, then the package alone.
    problems.check("--require-hashes" in text, "dependencies not installed by hash")
    for lock in ("requirements/runtime.txt", "requirements/build.txt"):
        problems.check(f"-r {lock}" in text, f"{lock} not installed")
    package = re.search(r"pip install [^\n]*--no-deps[^\n]* \.(?: \\)?$", text, re.M)
    problems.check(package is not None, "the package is not installed alone (--no-deps)")
    problems.check(bool(users) and users[-1].split(":")[0] != "0", "USER is root")
    problems.check("PYTHONDONTWRITEBYTECODE=1" in final, "final stage writes .pyc files")
    return problems.exit(f"{len(stages)} stages, non-root, exec-form entrypoint, hashed locks")


def cmd_compose(path: str) -> int:
    problems = Problems(path)
    here = Path(path).resolve().parent
    services = yaml.safe_load(Path(path).read_text())["services"]
    mounts = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                mounts += 1
                problems.check((here / source).exists(), f"{name}: no {source} to mount")
        build = service.get("build")
        if build:
            context = here / build["context"]
            problems.check((context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile")
    problems.check(services["kafka"]["image"].startswith("apache/kafka:"), "kafka image")
    problems.check(services["worker"].get("stop_grace_period") == "20s", "worker grace period")
    return problems.exit(f"{len(services)} services, {mounts} bind mounts present")


def strict_schema(node: Any) -> Any:
    """An openAPIV3Schema as JSON Schema that, like kubeconform's strict mode, rejects
    fields the CRD does not declare (the API server would silently prune them)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "(?" in str(out.get("pattern", "")):
        # Go's inline flags ("^(?i)(abort|warn)?$") are no JSON Schema (ECMA) regex:
        # such a pattern is dropped, only on fields we do not use.
        del out["pattern"]
    return out


def cmd_crd_schema(crd_path: str, out_dir: str) -> int:
    crd = yaml.safe_load(Path(crd_path).read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        schema = strict_schema(version["schema"]["openAPIV3Schema"])
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
        schema["properties"]["kind"] = {"const": kind}
        out = Path(out_dir) / f"{kind}-{version['name']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(schema, indent=1))
        print(f"{kind} {group}/{version['name']} -> {out}")
    return 0


def rendered(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def cmd_split(path: str, out_dir: str) -> int:
    """Core objects to ``core.yaml``; each CRD object to ``KIND-VERSION-NAME.json``,
    listed on stdout as ``SCHEMA-NAME FILE`` lines."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    core = []
    for doc in rendered(path):
        kind, version = doc["kind"], doc["apiVersion"].rsplit("/", 1)[-1]
        if kind in _CRD_KINDS:
            target = out / f"{kind}-{version}-{doc['metadata']['name']}.json"
            target.write_text(json.dumps(doc, indent=1))
            print(f"{kind}-{version} {target}")
        else:
            core.append(doc)
    (out / "core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    return 0


def _one(docs: list[dict[str, Any]], kind: str, problems: Problems) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    problems.check(len(found) == 1, f"{len(found)} {kind} objects, want 1")
    return found[0] if found else {}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def container_environ(
    container: dict[str, Any], pod_name: str, scratch: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """The container's GROUP_WORKER_ variables as the pod would see them (mounted
    secrets replaced by scratch files), and how each is sourced."""
    environ: dict[str, str] = {}
    sources: dict[str, str] = {}
    for var in container.get("env", []):
        name, ref = var["name"], var.get("valueFrom", {})
        if "value" in var:
            value, sources[name] = str(var["value"]), "value"
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            value, sources[name] = pod_name, "pod-name"
        elif "secretKeyRef" in ref:
            value, sources[name] = "from-a-secret", "secret"
        else:
            value, sources[name] = "", "other"
        if name.endswith("_FILE"):
            stand_in = scratch / name
            stand_in.write_text("from-a-mounted-file")
            value = str(stand_in)
        if name.startswith("GROUP_WORKER_"):
            environ[name] = value
    return environ, sources


def cmd_policy(path: str) -> int:
    from worker.config import load_config
    from worker.errors import ConfigError

    problems = Problems(path)
    docs = rendered(path)
    sts = _one(docs, "StatefulSet", problems)
    scaled = _one(docs, "ScaledObject", problems)
    if not sts or not scaled:
        return problems.exit("")
    name, spec = sts["metadata"]["name"], sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    worker = next((c for c in pod["containers"] if c["name"] == "worker"), None)
    if worker is None:
        problems.check(False, "no container named worker")
        return problems.exit("")

    # The configuration the pod starts with, loaded by the worker's own loader.
    args = worker.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else ""
    toml = ""
    for mount in worker.get("volumeMounts", []):
        volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
        config_map = volume.get("configMap", {}).get("name")
        if config_map and config_path.startswith(mount["mountPath"] + "/"):
            key = config_path[len(mount["mountPath"]) + 1 :]
            cm = next(d for d in docs if d["kind"] == "ConfigMap")
            problems.check(cm["metadata"]["name"] == config_map, f"no ConfigMap {config_map}")
            toml = cm.get("data", {}).get(key, "")
    problems.check(bool(toml), f"--config {config_path} is not a mounted ConfigMap key")
    with tempfile.TemporaryDirectory() as scratch:
        environ, sources = container_environ(worker, f"{name}-0", Path(scratch))
        (Path(scratch) / "worker.toml").write_text(toml)
        try:
            config = load_config(Path(scratch) / "worker.toml", environ)
        except ConfigError as e:
            problems.check(False, f"the worker would not start: {e}")
            return problems.exit("")

    # The local state store on the pod's own claim, so a restart finds it.
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    state_dir = config.worker.state_dir
    problems.check(
        any(
            m["name"] in claims and (state_dir + "/").startswith(m["mountPath"].rstrip("/") + "/")
            for m in worker.get("volumeMounts", [])
        ),
        f"worker.state_dir {state_dir} is not on a volumeClaimTemplates volume",
    )

    # Scaling: never more workers than input partitions.
    s = scaled["spec"]
    partitions = config.topics.partitions
    most = s.get("maxReplicaCount")
    problems.check(most == partitions, f"maxReplicaCount {most} != topics.partitions {partitions}")
    problems.check(1 <= s.get("minReplicaCount", 0) <= partitions, "minReplicaCount out of range")
    problems.check("replicas" not in spec, "StatefulSet sets replicas: KEDA owns the count")
    ref = s["scaleTargetRef"]
    target = (ref.get("kind"), ref.get("name"))
    problems.check(target == ("StatefulSet", name), f"scaleTargetRef is {target}")
    container = ref.get("envSourceContainerName")
    problems.check(container == "worker", f"envSourceContainerName is {container}")
    for trigger in s["triggers"]:
        for key, value in trigger["metadata"].items():
            if key.endswith("FromEnv"):
                problems.check(value in sources, f"trigger {key}: no variable {value}")

    # Identity: stable pod names feed static membership and the transactional.id.
    for var in ("GROUP_WORKER_WORKER_GROUP_INSTANCE_ID", "GROUP_WORKER_WORKER_INSTANCE_ID"):
        problems.check(sources.get(var) == "pod-name", f"{var} is not the pod name")
    problems.check(config.worker.group_instance_id == f"{name}-0", "group_instance_id")

    # Shutdown: the grace period covers the worker's own shutdown budget plus margin.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    budget = config.worker.shutdown_timeout_seconds
    problems.check(grace >= budget + 10, f"grace {grace}s < shutdown_timeout {budget}s + 10s")

    # Probes and scraping on the port the worker listens on, from outside the pod.
    ports = {p["name"]: p["containerPort"] for p in worker.get("ports", [])}
    port = ports.get("metrics")
    problems.check(port == config.http.port, f"port metrics {port} != http.port")
    problems.check(config.http.host == "0.0.0.0", f"http.host is {config.http.host}")  # noqa: S104
    for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = worker.get(probe, {}).get("httpGet", {})
        ok = (got.get("path"), got.get("port")) == (want, "metrics")
        problems.check(ok, f"{probe} is not GET {want} on the metrics port")

    # Secrets only by reference: a secret-looking variable is a file path or a secretKeyRef.
    for var, source in sources.items():
        name = var.lower().removesuffix("_file").removesuffix("_location")
        secret_like = any(m in name for m in ("password", "secret", "token", "key"))
        literal = source == "value" and not var.endswith(("_FILE", "_LOCATION"))
        problems.check(not (secret_like and literal), f"{var} is a literal secret")

    check_hardening(problems, sts, Path(__file__).with_name("Dockerfile"))

    monitor = _one(docs, "PodMonitor", problems)
    pdb = _one(docs, "PodDisruptionBudget", problems)
    monitor_spec, pdb_spec = monitor.get("spec", {}), pdb.get("spec", {})
    problems.check(_matches(monitor_spec.get("selector", {}), labels), "PodMonitor misses pods")
    endpoints = monitor_spec.get("podMetricsEndpoints", [])
    problems.check(all(e.get("port") in ports for e in endpoints), "PodMonitor port unknown")
    problems.check(_matches(pdb_spec.get("selector", {}), labels), "PDB misses the pods")
    return problems.exit(
        f"max replicas {most} = partitions {partitions}, "
        f"grace {grace}s >= {budget}s + 10s, ids from the pod name, config loads, "
        "state on a claim, read-only non-root pods"
    )


def check_hardening(problems: Problems, sts: dict[str, Any], dockerfile: Path) -> None:
    """What the restricted Pod Security Standard (pss-check) leaves to us: a non-root
    group, the image's own user, a read-only root file system, and writable mounts only
    on pod-local or claimed volumes."""
    pod = sts["spec"]["template"]["spec"]
    context = pod.get("securityContext", {})
    user, group = context.get("runAsUser"), context.get("runAsGroup")
    image_users = re.findall(r"^USER\s+(\d+):(\d+)", dockerfile.read_text(), re.M)
    image = tuple(int(i) for i in image_users[-1]) if image_users else None
    problems.check((user, group) == image, f"pod runs as {user}:{group}, the image as {image}")
    problems.check(isinstance(group, int) and group > 0, f"runAsGroup {group} is root or unset")
    # A volume the pod writes to (the state directory's claim) must be its group's.
    problems.check(context.get("fsGroup") == group, f"fsGroup {context.get('fsGroup')} != {group}")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    for container in pod.get("initContainers", []) + pod["containers"]:
        name, c = container["name"], container.get("securityContext", {})
        problems.check(
            c.get("readOnlyRootFilesystem") is True, f"{name}: root file system writable"
        )
        problems.check(c.get("runAsUser", user) == user, f"{name}: runAsUser differs from the pod")
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            writable_kind = "emptyDir" in volume or mount["name"] in claims
            problems.check(
                mount.get("readOnly") is True or writable_kind,
                f"{name}: {mount['mountPath']} is writable but not an emptyDir or a claim",
            )


def cmd_acls(kafkauser: str, readme: str) -> int:
    problems = Problems(kafkauser)
    wanted = access.check_acls(problems, kafkauser, readme)
    return problems.exit(
        f"{wanted} ACLs for User:group-worker, the same in the KafkaUser and the README"
    )


def cmd_locks(pyproject: str) -> int:
    problems = Problems("requirements/")
    locks, pins = access.check_locks(problems, pyproject)
    return problems.exit(
        f"{locks} locks, {pins} hashed pins, each meets pyproject.toml (peer.txt: peer.in)"
    )


_COMMANDS: dict[str, tuple[int, Callable[..., int]]] = {
    "metrics": (0, cmd_metrics),
    "dashboard": (1, cmd_dashboard),
    "rules": (1, cmd_rules),
    "dockerfile": (1, cmd_dockerfile),
    "compose": (1, cmd_compose),
    "crd-schema": (2, cmd_crd_schema),
    "split": (2, cmd_split),
    "policy": (1, cmd_policy),
    "acls": (2, cmd_acls),
    "locks": (1, cmd_locks),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in _COMMANDS or len(argv) - 1 != _COMMANDS[argv[0]][0]:
        print(__doc__, file=sys.stderr)
        return 2
    arity, command = _COMMANDS[argv[0]]
    return command(*argv[1 : 1 + arity])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
