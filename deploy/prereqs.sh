#!/usr/bin/env bash
# Checks that this machine has what a make target needs, before the target starts, and
# names the first thing missing, with how to get it, in one line. Cheap (well under a
# second), so the Makefile runs it at every `make run`, `test`, `deploy-check` and `bench`.
#
# Usage: deploy/prereqs.sh TARGET...      TARGET: run, test, deploy-check or bench
#
#   run, bench    python3 3.11+ (with its venv module while .venv does not exist),
#                 java 17+ (the local Kafka broker), mvn while the Kafka jars are not
#                 cached in .cache/kafka, flock, setsid and sha256sum (kafka.sh)
#   test          what run needs, plus /usr/bin/prometheus and /usr/bin/promtool, or
#                 apt-get with root or sudo so `deploy/tools.sh prometheus` installs them
#   deploy-check  python3 3.11+, go (1.26+ while kustomize is not built yet), and
#                 prometheus/promtool as for test
#
# Silent on success (exit 0). Otherwise exactly one line on standard error, exit 2:
#   prereqs: java 17+ not found (needed by the local Kafka broker): install OpenJDK 17 ...
# Reads PYTHON (default python3) and VENV (default .venv) as the Makefile sets them, and
# JAVA_HOME and KAFKA_CACHE_DIR as deploy/local-kafka/kafka.sh does.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# tools.sh is made to be sourced (its main only runs when executed): its pinned
# KUSTOMIZE_VERSION, BIN_DIR and VENV are the ones it will use.
# shellcheck source=deploy/tools.sh
source "$ROOT/deploy/tools.sh"
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-$ROOT/.cache/kafka}"
POM="$ROOT/deploy/local-kafka/pom.xml"
# The `go` directive of kustomize's go.mod at KUSTOMIZE_VERSION (v5.8.2: go 1.26.0).
GO_FOR_KUSTOMIZE=1.26

missing() {
    printf 'prereqs: %s\n' "$*" >&2
    exit 2
}

has() { command -v "$1" >/dev/null 2>&1; }

check_python() {
    local version rc=0
    has "$PYTHON" || missing "$PYTHON (Python 3.11+) not found (needed to create .venv and" \
        "run the worker): install Python 3.11 or newer, or run make PYTHON=/path/to/python3.11"
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])
sys.exit(sys.version_info < (3, 11))' 2>/dev/null)" || rc=$?
    case $rc in
        0) ;;
        1) missing "$PYTHON is Python $version, too old (the worker needs 3.11+): install" \
            "Python 3.11 or newer, or run make PYTHON=/path/to/python3.11" ;;
        *) missing "$PYTHON does not run (needed to create .venv and run the worker): install" \
            "Python 3.11 or newer, or run make PYTHON=/path/to/python3.11" ;;
    esac
    # Only creating .venv needs venv and ensurepip (Debian ships them apart from python3).
    if [[ ! -x $VENV/bin/python ]] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        missing "$PYTHON has no venv module (needed once, to create $VENV): install it" \
            "(Debian/Ubuntu: apt-get install python$version-venv)"
    fi
}

check_java() {
    local java version major
    local how="install OpenJDK 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
    # The same java deploy/local-kafka/kafka.sh picks.
    if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        java="$JAVA_HOME/bin/java"
    elif has java; then
        java="$(command -v java)"
    else
        missing "java 17+ not found (needed by the local Kafka broker): $how, or set JAVA_HOME"
    fi
    version="$("$java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p')" || true
    version="${version%%$'\n'*}"
    if [[ $version == 1.* ]]; then major="${version#1.}"; else major="$version"; fi
    major="${major%%[.+-]*}"
    [[ $major =~ ^[0-9]+$ ]] \
        || missing "java 17+ not found: $java reports no version (needed by the local Kafka" \
            "broker): $how, or set JAVA_HOME"
    ((major >= 17)) \
        || missing "java $version is too old, 17+ needed (by the local Kafka broker): $how," \
            "or set JAVA_HOME"
}

# What deploy/local-kafka/kafka.sh runs besides java.
check_kafka_tools() {
    local tool
    for tool in flock setsid; do
        has "$tool" || missing "$tool not found (deploy/local-kafka/kafka.sh needs it to run" \
            "the broker): install util-linux"
    done
    has sha256sum || missing "sha256sum not found (deploy/local-kafka/kafka.sh keys its jar" \
        "cache with it): install coreutils"
}

# kafka.sh's jars_cached: the jars of this pom.xml are in the cache.
jars_cached() {
    local stamp="$KAFKA_CACHE_DIR/libs/.fetched"
    [[ -f $stamp && "$(cat "$stamp")" == "$(sha256sum "$POM" | cut -d' ' -f1)" ]] \
        && compgen -G "$KAFKA_CACHE_DIR/libs/kafka_2.13-*.jar" >/dev/null
}

check_mvn() {
    jars_cached || has mvn || missing "mvn not found (needed once, to fetch the Kafka jars" \
        "into ${KAFKA_CACHE_DIR#"$ROOT"/}): install Maven (Debian/Ubuntu: apt-get install maven)"
}

# deploy/tools.sh prometheus: the Debian package's binaries in /usr/bin, or what installs them.
check_prometheus() {
    local why="$1"
    [[ -x /usr/bin/prometheus && -x /usr/bin/promtool ]] && return 0
    has apt-get || missing "prometheus and promtool not found in /usr/bin (needed by $why)," \
        "and no apt-get to install them: install Prometheus 2.x so that /usr/bin/prometheus" \
        "and /usr/bin/promtool exist"
    ((EUID == 0)) || has sudo || missing "prometheus not installed (needed by $why), and" \
        "installing it needs root: run 'apt-get install prometheus' as root once, or install sudo"
}

check_go() {
    local how="install Go $GO_FOR_KUSTOMIZE or newer (https://go.dev/dl)" version minor
    has go || missing "go not found (deploy/tools.sh builds kustomize and fetches the KEDA and" \
        "Prometheus Operator CRDs with it): $how"
    local kustomize="$BIN_DIR/kustomize"
    if [[ -x $kustomize && "$("$kustomize" version 2>/dev/null)" == *"$KUSTOMIZE_VERSION"* ]]; then
        return 0
    fi
    version="$(go env GOVERSION 2>/dev/null)" || true
    version="${version#go}"
    minor="${version#*.}"
    minor="${minor%%[!0-9]*}"
    # Anything unparsable (a development build) is given the benefit of the doubt.
    [[ ${version%%.*} == 1 && -n $minor ]] || return 0
    ((minor >= ${GO_FOR_KUSTOMIZE#1.})) || missing "go $version is too old (kustomize" \
        "$KUSTOMIZE_VERSION, which deploy/tools.sh builds, needs Go $GO_FOR_KUSTOMIZE+): $how"
}

# deploy/tools.sh's Strimzi CRD: generated once with mvn and a Java 21+ (any JDK it finds).
check_strimzi_tools() {
    [[ -s "$CRD_DIR/strimzi-$STRIMZI_VERSION/044-Crd-kafkauser.yaml" ]] && return 0
    has mvn || missing "mvn not found (needed once, to fetch Strimzi $STRIMZI_VERSION's API" \
        "model for the KafkaUser schema): install Maven (Debian/Ubuntu: apt-get install maven)"
    find_java 21 >/dev/null || missing "no Java 21+ found in JAVA_HOME, on PATH or under" \
        "/usr/lib/jvm (needed once, to generate Strimzi $STRIMZI_VERSION's KafkaUser schema):" \
        "install a JDK 21 or newer"
}

# check FUNCTION [ARG]: run it once, however many targets ask (bash 3.2 has no dict).
checked=" "
check() {
    [[ $checked == *" $1 "* ]] && return 0
    "$@"
    checked+="$1 "
}

main() {
    (($#)) || missing "usage: deploy/prereqs.sh run|test|deploy-check|bench..."
    local target
    for target in "$@"; do
        case "$target" in
            run | bench | test)
                check check_python
                check check_java
                check check_kafka_tools
                check check_mvn
                if [[ $target == test ]]; then
                    check check_prometheus "tests/integration/test_observability.py"
                fi
                ;;
            deploy-check)
                check check_python
                check check_go
                check check_strimzi_tools
                check check_prometheus "make deploy-check's promtool steps"
                ;;
            *) missing "unknown target '$target' (run, test, deploy-check, bench)" ;;
        esac
    done
}

main "$@"
