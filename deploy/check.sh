#!/usr/bin/env bash
# `make deploy-check`: render and validate everything under deploy/ with real tools.
# Installs what is missing first (deploy/tools.sh). Rendered manifests and generated
# schemas are left in .cache/deploy-check/ to look at. Exits non-zero on any problem.
#
#   metrics     the worker's exposition              promtool check metrics
#   container   deploy/Dockerfile                    hadolint + checks.py dockerfile
#   locks       requirements/*.txt                   checks.py locks (hashed pins meet pyproject)
#   compose     deploy/compose.yaml                  check-jsonschema (compose-spec) + checks.py
#   prometheus  alerts.yaml, prometheus.yml          promtool check/test rules, check config
#   grafana     the dashboard, its provisioning      checks.py dashboard (metrics exist, units)
#   kubernetes  base and overlays dev, prod          kustomize build, kubernetes-validate
#                                                    --strict, CRD schemas, checks.py policy,
#                                                    pss-check (Pod Security "restricted")
#   kafka acls  deploy/strimzi/kafkauser.yaml        Strimzi's KafkaUser CRD schema, checks.py
#               README "Security"                    acls (the ACLs the configuration needs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
BIN="$VENV/bin"
OUT="$ROOT/.cache/deploy-check"
KUSTOMIZE="$ROOT/.cache/bin/kustomize"
PSS_CHECK="$ROOT/.cache/bin/pss-check"
# Validate against the oldest and the newest Kubernetes we expect to meet.
KUBERNETES_VERSIONS=(1.31.0 1.37.0)
OVERLAYS=(base overlays/dev overlays/prod)
# The same versions as Pod Security policy versions (1.31.0 -> v1.31).
PSS_VERSIONS="$(printf 'v%s,' "${KUBERNETES_VERSIONS[@]%.*}")"
PSS_VERSIONS="${PSS_VERSIONS%,}"

started=$SECONDS
failures=0

# step NAME COMMAND...: run it; print "ok NAME" or its output and "FAIL NAME".
step() {
    local name="$1" log
    shift
    log="$(mktemp)"
    if "$@" >"$log" 2>&1; then
        printf '  ok    %s\n' "$name"
    else
        printf '  FAIL  %s\n' "$name"
        sed 's/^/        /' "$log"
        failures=$((failures + 1))
    fi
    rm -f "$log"
}

checks() { "$BIN/python" deploy/checks.py "$@"; }

promtool_check_metrics() {
    # promtool prints lint problems on stdout and exits 3: both must be empty / zero.
    local problems
    problems="$(checks metrics | promtool check metrics 2>&1)" || { echo "$problems"; return 1; }
    [[ -z $problems ]] || { echo "$problems"; return 1; }
}

# validate_crd_objects DIR: each object DIR/crd-objects.txt lists against its schema.
validate_crd_objects() {
    local schema file
    [[ -s $1/crd-objects.txt ]] || { echo "no ScaledObject or PodMonitor rendered"; return 1; }
    while read -r schema file; do
        [[ -s $OUT/schemas/$schema.json ]] || { echo "no schema $schema for $file"; return 1; }
        "$BIN/check-jsonschema" --schemafile "$OUT/schemas/$schema.json" "$file"
    done <"$1/crd-objects.txt"
}

# The rules as a PrometheusRule for the Prometheus Operator, made exactly as the README
# says: alerts.yaml's `groups` indented under `spec`.
prometheus_rule() {
    printf 'apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: group-worker\nspec:\n'
    sed 's/^/  /' deploy/prometheus/alerts.yaml
}

validate_prometheus_rule() {
    prometheus_rule >"$OUT/prometheusrule.yaml"
    "$BIN/check-jsonschema" --schemafile "$OUT/schemas/PrometheusRule-v1.json" \
        "$OUT/prometheusrule.yaml"
}

kubernetes_validate() {
    local core="$1" version output
    for version in "${KUBERNETES_VERSIONS[@]}"; do
        output="$("$BIN/kubernetes-validate" --strict --quiet -k "$version" "$core" 2>&1)" \
            || { echo "$output"; return 1; }
        # A kind it has no schema for is only a warning there: here it is a failure.
        if [[ -n $output ]]; then echo "$output"; return 1; fi
        echo "kubernetes $version: valid"
    done
}

echo "deploy-check: tools"
bash deploy/tools.sh all
rm -rf "$OUT" && mkdir -p "$OUT/schemas"

echo "deploy-check: metrics"
step "promtool check metrics (every metric of worker/metrics.py)" promtool_check_metrics

echo "deploy-check: container"
step "hadolint deploy/Dockerfile" "$BIN/hadolint" deploy/Dockerfile
step "Dockerfile: slim 3.11, multi-stage, numeric user, exec form, hashed locks" \
    checks dockerfile deploy/Dockerfile

echo "deploy-check: locks"
step "requirements/*.txt: hashed pins that meet pyproject.toml" checks locks pyproject.toml

echo "deploy-check: compose"
step "compose.yaml against the compose-spec schema" \
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
step "compose.yaml: mounted files and build context exist" checks compose deploy/compose.yaml
step "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml

echo "deploy-check: prometheus rules"
step "promtool check rules deploy/prometheus/alerts.yaml" \
    promtool check rules deploy/prometheus/alerts.yaml
step "promtool test rules deploy/prometheus/alerts_test.yaml" \
    promtool test rules deploy/prometheus/alerts_test.yaml
step "alerts: runbooks, metric and label names exist" checks rules deploy/prometheus/alerts.yaml

echo "deploy-check: grafana"
step "dashboard: units, metric and label names exist" \
    checks dashboard deploy/grafana/group-worker.json

echo "deploy-check: kubernetes"
for crd in .cache/crds/*/*.yaml; do
    step "schema from $(basename "$crd")" checks crd-schema "$crd" "$OUT/schemas"
done
step "alerts.yaml wrapped as a PrometheusRule, against its CRD" validate_prometheus_rule
for overlay in "${OVERLAYS[@]}"; do
    dir="$OUT/${overlay//\//-}"
    mkdir -p "$dir"
    if ! "$KUSTOMIZE" build "deploy/k8s/$overlay" >"$dir/all.yaml" 2>"$dir/kustomize.err"; then
        printf '  FAIL  kustomize build deploy/k8s/%s\n' "$overlay"
        sed 's/^/        /' "$dir/kustomize.err"
        failures=$((failures + 1))
        continue
    fi
    printf '  ok    kustomize build deploy/k8s/%s (%s objects)\n' "$overlay" \
        "$(grep -c '^kind:' "$dir/all.yaml")"
    # Built-in kinds to core.yaml; CRD objects to JSON files listed in crd-objects.txt.
    checks split "$dir/all.yaml" "$dir" >"$dir/crd-objects.txt"
    step "$overlay: kubernetes-validate --strict (${KUBERNETES_VERSIONS[*]})" \
        kubernetes_validate "$dir/core.yaml"
    step "$overlay: ScaledObject, TriggerAuthentication, PodMonitor against their CRDs" \
        validate_crd_objects "$dir"
    step "$overlay: max replicas = partitions, grace period, ids, probes, secrets, read-only" \
        checks policy "$dir/all.yaml"
    step "$overlay: Pod Security Standard restricted ($PSS_VERSIONS), upstream checks" \
        "$PSS_CHECK" -level restricted -versions "$PSS_VERSIONS" "$dir/all.yaml"
done

echo "deploy-check: kafka acls"
step "deploy/strimzi/kafkauser.yaml against Strimzi's KafkaUser CRD" \
    "$BIN/check-jsonschema" --schemafile "$OUT/schemas/KafkaUser-v1.json" \
    deploy/strimzi/kafkauser.yaml
step "KafkaUser and README: the ACLs of config/worker.toml, no more" \
    checks acls deploy/strimzi/kafkauser.yaml README.md

elapsed=$((SECONDS - started))
if ((failures)); then
    echo "deploy-check: $failures check(s) failed (${elapsed}s)"
    exit 1
fi
echo "deploy-check: all checks passed (${elapsed}s)"
