#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller) without Docker.
# Jars come from Maven Central via deploy/local-kafka/pom.xml.
#
# Usage: kafka.sh fetch|up|down|status|reset|acls
# See deploy/local-kafka/README.md for the environment variables.
# KAFKA_SECURITY=sasl_ssl: a secured broker (SASL/SCRAM-SHA-512 over TLS, ACLs enforced)
# with its own default port and state dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
POM="$HERE/pom.xml"

KAFKA_SECURITY="${KAFKA_SECURITY:-plaintext}"
case "$KAFKA_SECURITY" in
    plaintext) default_port=9092; state_name="kafka-state" ;;
    sasl_ssl)  default_port=9192; state_name="kafka-sasl_ssl-state" ;;
    *) printf 'kafka.sh: error: KAFKA_SECURITY must be plaintext or sasl_ssl, got %s\n' \
           "$KAFKA_SECURITY" >&2; exit 2 ;;
esac
KAFKA_PORT="${KAFKA_PORT:-$default_port}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-$REPO_ROOT/.cache/kafka}"
KAFKA_STATE_DIR="${KAFKA_STATE_DIR:-$REPO_ROOT/.cache/$state_name-$KAFKA_PORT}"
# The secured broker's users, created when its storage is formatted; the first is its
# only super user. Passwords are generated once into $SECRETS_DIR/<user>.password.
KAFKA_SASL_USERS="${KAFKA_SASL_USERS:-admin group-worker}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"
KAFKA_LOG_LEVEL="${KAFKA_LOG_LEVEL:-INFO}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"

LIBS_DIR="$KAFKA_CACHE_DIR/libs"
STAMP="$LIBS_DIR/.fetched"
DATA_DIR="$KAFKA_STATE_DIR/data"
CONF="$KAFKA_STATE_DIR/server.properties"
LOG4J_BROKER="$KAFKA_STATE_DIR/log4j2-broker.properties"
LOG4J_TOOLS="$KAFKA_STATE_DIR/log4j2-tools.properties"
CLUSTER_ID_FILE="$KAFKA_STATE_DIR/cluster.id"
PID_FILE="$KAFKA_STATE_DIR/broker.pid"
LOG_FILE="$KAFKA_STATE_DIR/broker.log"
TLS_DIR="$KAFKA_STATE_DIR/tls"
SECRETS_DIR="$KAFKA_STATE_DIR/secrets"
# Java client settings of the admin user (kafka-acls, the readiness check), sasl_ssl only.
ADMIN_PROPS="$KAFKA_STATE_DIR/admin.properties"

# Short-lived tool JVMs: favour startup time over peak performance.
TOOL_JVM_OPTS=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1)

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { local code="$1"; shift; printf 'kafka.sh: error: %s\n' "$*" >&2; exit "$code"; }

JAVA_BIN=""

require_java() {
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
        JAVA_BIN="$JAVA_HOME/bin/java"
    elif command -v java >/dev/null 2>&1; then
        JAVA_BIN="$(command -v java)"
    else
        die 2 "java not found (need Java 17+ on PATH or in JAVA_HOME)"
    fi
    local ver major
    ver="$("$JAVA_BIN" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
    [[ -n "$ver" ]] || die 2 "cannot determine the version of $JAVA_BIN"
    if [[ "$ver" == 1.* ]]; then major="${ver#1.}"; major="${major%%.*}"; else major="${ver%%[.+-]*}"; fi
    [[ "$major" =~ ^[0-9]+$ ]] || die 2 "cannot parse java version '$ver'"
    (( major >= 17 )) || die 2 "java $ver is too old: Kafka 4.x brokers need Java 17+"
}

require_mvn() {
    command -v mvn >/dev/null 2>&1 || die 2 "mvn not found (needed once to fetch the Kafka jars from Maven Central)"
}

pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

jars_cached() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(pom_sum)" ]] && compgen -G "$LIBS_DIR/kafka_2.13-*.jar" >/dev/null
}

cmd_fetch() {
    require_java
    if jars_cached; then
        return 0
    fi
    require_mvn
    mkdir -p "$KAFKA_CACHE_DIR"
    # Serialise concurrent fetches (e.g. two brokers on different ports starting at once).
    exec 8>"$KAFKA_CACHE_DIR/.fetch.lock"
    flock 8
    if jars_cached; then exec 8>&-; return 0; fi
    local tmp="$KAFKA_CACHE_DIR/libs.tmp.$$"
    rm -rf "$tmp"
    log "fetching Kafka jars with Maven into $LIBS_DIR (first run only)..."
    # Output is kept aside (Debian's Maven 3.8 prints stray ANSI resets even with -q)
    # and shown, de-coloured, only on failure.
    local mlog="$KAFKA_CACHE_DIR/fetch.log"
    if ! mvn -q -B -Dstyle.color=never -f "$POM" -Dkafka.libs.dir="$tmp" \
            dependency:copy-dependencies >"$mlog" 2>&1 </dev/null; then
        sed 's/\x1b\[[0-9;]*m//g' "$mlog" | grep -v '^[[:space:]]*$' | tail -n 40 >&2 || true
        rm -rf "$tmp"
        die 1 "maven failed to fetch the Kafka jars (full output: $mlog)"
    fi
    compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die 1 "maven ran but no kafka_2.13 jar was copied"; }
    pom_sum >"$tmp/.fetched"
    rm -rf "$LIBS_DIR"
    mv "$tmp" "$LIBS_DIR"
    exec 8>&-
    log "jars ready: $(find "$LIBS_DIR" -name '*.jar' | wc -l) files in $LIBS_DIR"
}

# PID of the broker started from this state dir, or empty.
broker_pid() {
    local pid=""
    if [[ -f "$PID_FILE" ]]; then
        pid="$(tr -dc '0-9' <"$PID_FILE")"
        if [[ -n "$pid" ]] && is_our_broker "$pid"; then
            echo "$pid"; return 0
        fi
    fi
    # PID file missing or stale: look for a broker using exactly our config file.
    local d p
    for d in /proc/[0-9]*; do
        p="${d#/proc/}"
        if is_our_broker "$p"; then echo "$p"; return 0; fi
    done
    return 0
}

is_our_broker() {
    local pid="$1" cmdline
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *" kafka.Kafka $CONF"* ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

secured() { [[ "$KAFKA_SECURITY" == sasl_ssl ]]; }

admin_user() { local users; read -r -a users <<<"$KAFKA_SASL_USERS"; echo "${users[0]}"; }

password_of() { cat "$SECRETS_DIR/$1.password"; }

# A random password, once per user (and one for the broker's key store), kept in
# $SECRETS_DIR: readable by this user only.
make_secrets() {
    mkdir -p "$SECRETS_DIR"
    chmod 700 "$SECRETS_DIR"
    local name
    for name in $KAFKA_SASL_USERS tls-store; do
        [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "KAFKA_SASL_USERS: '$name' is not a plain user name"
        if [[ ! -s "$SECRETS_DIR/$name.password" ]]; then
            (umask 077; od -An -tx1 -N18 /dev/urandom | tr -d ' \n' >"$SECRETS_DIR/$name.password")
        fi
    done
}

# A throwaway CA and a broker certificate for 127.0.0.1/localhost it signed, made once
# with the JDK's keytool: $TLS_DIR/ca.pem (what clients trust) and broker.p12.
make_tls() {
    [[ -s "$TLS_DIR/broker.p12" && -s "$TLS_DIR/ca.pem" ]] && return 0
    local keytool pass="$SECRETS_DIR/tls-store.password"
    keytool="$(dirname "$(readlink -f "$JAVA_BIN")")/keytool"
    [[ -x "$keytool" ]] || die 2 "keytool not found next to $JAVA_BIN (it comes with the JDK)"
    log "making a throwaway CA and broker certificate in $TLS_DIR"
    rm -rf "$TLS_DIR"
    mkdir -p "$TLS_DIR"
    local kt=("$keytool" -storetype PKCS12 -storepass:file "$pass" -keypass:file "$pass")
    {
        "${kt[@]}" -genkeypair -keystore "$TLS_DIR/ca.p12" -alias ca -keyalg EC \
            -groupname secp256r1 -validity 3650 -dname "CN=group-worker local CA" -ext bc:c &&
        "${kt[@]}" -exportcert -keystore "$TLS_DIR/ca.p12" -alias ca -rfc -file "$TLS_DIR/ca.pem" &&
        "${kt[@]}" -genkeypair -keystore "$TLS_DIR/broker.p12" -alias broker -keyalg EC \
            -groupname secp256r1 -validity 3650 -dname "CN=broker" &&
        "${kt[@]}" -certreq -keystore "$TLS_DIR/broker.p12" -alias broker -file "$TLS_DIR/broker.csr" &&
        "${kt[@]}" -gencert -keystore "$TLS_DIR/ca.p12" -alias ca -infile "$TLS_DIR/broker.csr" \
            -outfile "$TLS_DIR/broker.pem" -rfc -validity 3650 \
            -ext san=ip:127.0.0.1,dns:localhost -ext eku=serverAuth,clientAuth &&
        "${kt[@]}" -importcert -keystore "$TLS_DIR/broker.p12" -alias ca -file "$TLS_DIR/ca.pem" -noprompt &&
        "${kt[@]}" -importcert -keystore "$TLS_DIR/broker.p12" -alias broker -file "$TLS_DIR/broker.pem"
    } >>"$LOG_FILE" 2>&1 || { tail -n 20 "$LOG_FILE" >&2; rm -rf "$TLS_DIR"; die 1 "keytool failed"; }
    rm -f "$TLS_DIR/broker.csr"
}

scram_jaas() {
    printf 'org.apache.kafka.common.security.scram.ScramLoginModule required username="%s" password="%s";' \
        "$1" "$(password_of "$1")"
}

write_configs() {
    mkdir -p "$DATA_DIR"
    local client="PLAINTEXT" controller="PLAINTEXT"
    if secured; then client="SASL_SSL"; controller="SSL"; fi
    cat >"$CONF" <<EOF
# Generated by deploy/local-kafka/kafka.sh on every 'up'; edits are overwritten.
node.id=1
process.roles=broker,controller
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=$client://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=$client://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=$client
controller.listener.names=CONTROLLER
listener.security.protocol.map=$client:$client,CONTROLLER:$controller
log.dirs=$DATA_DIR

# Single node: every internal topic has replication factor 1.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1

# Fast for tests: few internal partitions, no rebalance delay.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
# Kafka's default session (9 s), with a heartbeat every second. A shorter session
# let a busy machine's slow metadata-log writes (3-4 s) fence the broker from its own
# controller, taking every partition's leader away; the cost of 9 s is the restart
# after an unclean stop (SIGKILL, crash), which waits for the old session to expire.
broker.session.timeout.ms=9000
broker.heartbeat.interval.ms=1000
num.partitions=1
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=67108864
EOF
    if secured; then
        local admin tls_pass
        admin="$(admin_user)"
        tls_pass="$(cat "$SECRETS_DIR/tls-store.password")"
        chmod 600 "$CONF"
        cat >>"$CONF" <<EOF

# Secured (KAFKA_SECURITY=sasl_ssl): SCRAM-SHA-512 over TLS for clients and between
# brokers, ACLs enforced; only $admin is a super user, besides the broker itself on the
# controller listener (TLS with its certificate: the controller authorizes its
# registration, and SCRAM cannot serve there).
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$(scram_jaas "$admin")
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/broker.p12
ssl.keystore.password=$tls_pass
ssl.key.password=$tls_pass
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
listener.name.controller.ssl.client.auth=required
super.users=User:$admin;User:CN=broker
allow.everyone.if.no.acl.found=false
EOF
        (umask 077; cat >"$ADMIN_PROPS" <<EOF
# The admin user's client settings (kafka.sh acls; kafka-*.sh --command-config).
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=$(scram_jaas "$admin")
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
EOF
        )
    fi
    cat >"$LOG4J_BROKER" <<EOF
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $KAFKA_LOG_LEVEL
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
    cat >"$LOG4J_TOOLS" <<EOF
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

run_tool() {
    "$JAVA_BIN" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J_TOOLS" \
        -cp "$LIBS_DIR/*" "$@"
}

format_storage() {
    if [[ -f "$DATA_DIR/meta.properties" ]]; then
        return 0
    fi
    local cid
    if [[ -s "$CLUSTER_ID_FILE" ]]; then
        cid="$(cat "$CLUSTER_ID_FILE")"
    else
        cid="$(run_tool kafka.tools.StorageTool random-uuid | tail -n1)"
        echo "$cid" >"$CLUSTER_ID_FILE"
    fi
    log "formatting storage in $DATA_DIR (cluster id $cid)"
    local scram=() name
    if secured; then
        for name in $KAFKA_SASL_USERS; do
            scram+=(--add-scram "SCRAM-SHA-512=[name=$name,password=$(password_of "$name")]")
        done
    fi
    run_tool kafka.tools.StorageTool format --ignore-formatted \
        -t "$cid" -c "$CONF" "${scram[@]}" >>"$LOG_FILE" 2>&1 \
        || { tail -n 30 "$LOG_FILE" >&2; die 1 "storage format failed"; }
}

fail_start() {
    local pid="$1" why="$2"
    log "broker failed to start: $why"
    echo "----- last 30 lines of $LOG_FILE -----" >&2
    tail -n 30 "$LOG_FILE" >&2 || true
    echo "--------------------------------------" >&2
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    exit 1
}

cmd_up() {
    cmd_fetch
    mkdir -p "$KAFKA_STATE_DIR"
    exec 9>"$KAFKA_STATE_DIR/.lock"
    flock 9

    local pid
    pid="$(broker_pid)"
    if [[ -n "$pid" ]]; then
        echo "$pid" >"$PID_FILE"
        echo "kafka already running on 127.0.0.1:$KAFKA_PORT (pid $pid, logs: $LOG_FILE)"
        return 0
    fi
    rm -f "$PID_FILE"
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        if port_open "$p"; then
            die 1 "port 127.0.0.1:$p is already in use by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT)"
        fi
    done

    [[ -f "$LOG_FILE" ]] && mv -f "$LOG_FILE" "$LOG_FILE.prev"
    : >"$LOG_FILE"
    if secured; then
        make_secrets
        make_tls
    fi
    write_configs
    format_storage

    local t0=$SECONDS
    # shellcheck disable=SC2086  # heap/JVM opts are intentionally word-split
    setsid "$JAVA_BIN" $KAFKA_HEAP_OPTS \
        -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$LOG4J_BROKER" \
        -Dkafka.logs.dir="$KAFKA_STATE_DIR" \
        $KAFKA_JVM_OPTS \
        -cp "$LIBS_DIR/*" kafka.Kafka "$CONF" \
        </dev/null >>"$LOG_FILE" 2>&1 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"

    # 1) port open and the broker logged that it finished starting (it waits for
    #    unfencing first), 2) a real Kafka request answers with our cluster id.
    local deadline=$((SECONDS + KAFKA_START_TIMEOUT)) started=0
    while (( SECONDS < deadline )); do
        kill -0 "$pid" 2>/dev/null || fail_start "" "process $pid exited"
        if grep -q "Kafka Server started" "$LOG_FILE" && port_open "$KAFKA_PORT"; then
            started=1; break
        fi
        sleep 0.2
    done
    (( started )) || fail_start "$pid" "not ready after ${KAFKA_START_TIMEOUT}s"

    local want got="" admin_config=()
    secured && admin_config=(--command-config "$ADMIN_PROPS")
    want="$(cat "$CLUSTER_ID_FILE" 2>/dev/null || true)"
    while (( SECONDS < deadline )); do
        kill -0 "$pid" 2>/dev/null || fail_start "" "process $pid exited"
        got="$(run_tool org.apache.kafka.tools.ClusterTool cluster-id \
                 --bootstrap-server "127.0.0.1:$KAFKA_PORT" "${admin_config[@]}" 2>>"$LOG_FILE" \
               | sed -n 's/^Cluster ID: //p')" || true
        if [[ -n "$got" && ( -z "$want" || "$got" == "$want" ) ]]; then
            break
        fi
        got=""
        sleep 0.5
    done
    [[ -n "$got" ]] || fail_start "$pid" "broker did not answer a DescribeCluster request (cluster id '$want')"

    log "broker ready in $((SECONDS - t0))s (pid $pid, cluster id $got)"
    if secured; then
        echo "kafka up on 127.0.0.1:$KAFKA_PORT, SASL_SSL (CA: $TLS_DIR/ca.pem," \
             "passwords: $SECRETS_DIR/<user>.password, logs: $LOG_FILE)"
    else
        echo "kafka up on 127.0.0.1:$KAFKA_PORT (logs: $LOG_FILE)"
    fi
}

cmd_down() {
    mkdir -p "$KAFKA_STATE_DIR"
    exec 9>"$KAFKA_STATE_DIR/.lock"
    flock 9
    local pid
    pid="$(broker_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$PID_FILE"
        echo "kafka not running (port $KAFKA_PORT)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "broker pid $pid ignored SIGTERM for ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$PID_FILE"
    echo "kafka stopped (pid $pid)"
}

cmd_status() {
    local pid
    pid="$(broker_pid)"
    if [[ -n "$pid" ]]; then
        echo "kafka running on 127.0.0.1:$KAFKA_PORT (pid $pid, logs: $LOG_FILE)"
    else
        echo "kafka not running (port $KAFKA_PORT, state: $KAFKA_STATE_DIR)"
        return 3  # as LSB init scripts do: callers can branch on it
    fi
}

cmd_reset() {
    cmd_down
    rm -rf "$DATA_DIR"
    rm -f "$CLUSTER_ID_FILE" "$CONF" "$LOG4J_BROKER" "$LOG4J_TOOLS"
    echo "kafka data removed ($DATA_DIR)"
}

# kafka-acls (AclCommand) against this broker as its admin user, with ARGS.
cmd_acls() {
    secured || die 2 "acls needs KAFKA_SECURITY=sasl_ssl (the plain broker has no authorizer)"
    require_java
    [[ -s "$ADMIN_PROPS" ]] || die 1 "no $ADMIN_PROPS: start the broker first (KAFKA_SECURITY=sasl_ssl kafka.sh up)"
    run_tool org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
        --command-config "$ADMIN_PROPS" "$@"
}

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") fetch|up|down|status|reset|acls
  fetch   download the Kafka jars with Maven (only if not cached)
  up      start a single-node broker on 127.0.0.1:\$KAFKA_PORT (default 9092)
  down    stop it
  status  say whether it runs
  reset   stop it and delete its data
  acls    (KAFKA_SECURITY=sasl_ssl) run kafka-acls as the admin user: acls --add ...
EOF
}

case "${1:-}" in
    fetch)  cmd_fetch; echo "kafka jars cached in $LIBS_DIR" ;;
    up)     cmd_up ;;
    down)   cmd_down ;;
    status) cmd_status ;;
    reset)  cmd_reset ;;
    acls)   shift; cmd_acls "$@" ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
