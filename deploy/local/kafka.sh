#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller in one JVM) run from Maven jars: no Docker.
#
#   kafka.sh start  [--port P] [--controller-port C] [--data-dir D] [--initial-rebalance-delay-ms M]
#   kafka.sh stop   [--data-dir D]
#   kafka.sh status [--data-dir D]     exit 0 when running, 3 when not
#   kafka.sh jars                      fetch the jars (once) and print their folder
#
# Defaults: --port 9092, --controller-port 9093 (or the ports of the last start from D),
# --data-dir <repo>/.cache/kafka, --initial-rebalance-delay-ms 3000 (Kafka's default; tests use 0).
# Listens on 127.0.0.1 only.
# Jars: ${MMSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmstream}/kafka-jars-<version>,
# fetched with Maven from deploy/local/pom.xml when absent. Needs java (17+) and, the first
# time, mvn. Heap: KAFKA_HEAP_OPTS (default "-Xmx512m -Xms256m").
set -euo pipefail

KAFKA_VERSION=4.1.1 # keep in step with <kafka.version> in pom.xml
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE_ROOT=${MMSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmstream}
JAR_DIR=$CACHE_ROOT/kafka-jars-$KAFKA_VERSION
START_TIMEOUT_S=60
STOP_TIMEOUT_S=20
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

die() {
    echo "kafka: $*" >&2
    exit 1
}

usage() {
    sed -n '3,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- jars -------------------------------------------------------------------------------------

ensure_jars() {
    if [[ -f $JAR_DIR/kafka_2.13-$KAFKA_VERSION.jar ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found; it is needed once to fetch the Kafka jars into $JAR_DIR"
    mkdir -p "$CACHE_ROOT"
    local tmp
    tmp=$(mktemp -d "$CACHE_ROOT/.kafka-jars-$KAFKA_VERSION.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    echo "kafka: fetching Kafka $KAFKA_VERSION jars with Maven into $JAR_DIR ..." >&2
    if ! mvn -q -B -f "$SCRIPT_DIR/pom.xml" dependency:copy-dependencies \
        -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$tmp/jars" \
        >"$tmp/mvn.log" 2>&1; then
        tail -n 30 "$tmp/mvn.log" >&2
        die "mvn failed to fetch the Kafka jars (output above)"
    fi
    [[ -f $tmp/jars/kafka_2.13-$KAFKA_VERSION.jar ]] || die "mvn ran but kafka_2.13-$KAFKA_VERSION.jar is missing"
    # Atomic publish; if another fetch won the race, keep its copy.
    if [[ -e $JAR_DIR ]]; then
        [[ -f $JAR_DIR/kafka_2.13-$KAFKA_VERSION.jar ]] || die "$JAR_DIR exists but holds no kafka jar; delete it"
    else
        mv "$tmp/jars" "$JAR_DIR"
    fi
    rm -rf "$tmp"
    trap - EXIT INT TERM
}

# --- helpers ----------------------------------------------------------------------------------

alive() { # pid -> 0 when the process exists and is not a zombie
    kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

port_accepts() { # port -> 0 when something on 127.0.0.1:port accepts a TCP connection
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

prop() { # key file -> value of key in a .properties file (empty when absent)
    [[ -f $2 ]] || return 0
    sed -n "s/^$1=//p" "$2" | tail -n 1
}

broker_pid() { # -> pid of the broker started from $DATA_DIR, if it is alive; stale pid files go
    local pid_file=$DATA_DIR/broker.pid pid cmd
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
        cmd=$(ps -ww -o args= -p "$pid" 2>/dev/null || true)
        if [[ $cmd == *kafka.Kafka*"$DATA_DIR/server.properties"* ]]; then
            echo "$pid"
            return 0
        fi
    fi
    rm -f "$pid_file"
    return 1
}

print_logs() {
    local f
    for f in "$DATA_DIR/server.log" "$DATA_DIR/stdout.log" "$DATA_DIR/format.log"; do
        if [[ -s $f ]]; then
            echo "---- last 30 lines of $f ----" >&2
            tail -n 30 "$f" >&2
        fi
    done
}

parse_args() { # sets PORT, CONTROLLER_PORT, DATA_DIR, PORT_SET, CONTROLLER_PORT_SET
    PORT=9092 CONTROLLER_PORT=9093 PORT_SET= CONTROLLER_PORT_SET= REBALANCE_DELAY_MS=3000
    DATA_DIR=$REPO_ROOT/.cache/kafka
    while (($#)); do
        case $1 in
        --port) PORT=${2:?--port needs a value} PORT_SET=1 && shift 2 ;;
        --port=*) PORT=${1#*=} PORT_SET=1 && shift ;;
        --controller-port) CONTROLLER_PORT=${2:?--controller-port needs a value} CONTROLLER_PORT_SET=1 && shift 2 ;;
        --controller-port=*) CONTROLLER_PORT=${1#*=} CONTROLLER_PORT_SET=1 && shift ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a value} && shift 2 ;;
        --data-dir=*) DATA_DIR=${1#*=} && shift ;;
        --initial-rebalance-delay-ms) REBALANCE_DELAY_MS=${2:?--initial-rebalance-delay-ms needs a value} && shift 2 ;;
        --initial-rebalance-delay-ms=*) REBALANCE_DELAY_MS=${1#*=} && shift ;;
        -h | --help) usage ;;
        *) die "unknown argument: $1 (try --help)" ;;
        esac
    done
    [[ $PORT =~ ^[0-9]+$ && $CONTROLLER_PORT =~ ^[0-9]+$ ]] || die "ports must be numbers"
    [[ $REBALANCE_DELAY_MS =~ ^[0-9]+$ ]] || die "--initial-rebalance-delay-ms must be a number"
    [[ $PORT != "$CONTROLLER_PORT" ]] || die "--port and --controller-port must differ"
    [[ $CMD != start ]] || mkdir -p "$DATA_DIR"
    if [[ -d $DATA_DIR ]]; then
        DATA_DIR=$(cd "$DATA_DIR" && pwd)
    elif [[ $DATA_DIR != /* ]]; then
        DATA_DIR=$PWD/$DATA_DIR
    fi
}

lock_data_dir() { # serialise start/stop on one data dir, where flock exists
    if command -v flock >/dev/null; then
        exec 9>"$DATA_DIR/.kafka.sh.lock"
        flock 9
    fi
}

write_config() {
    cat >"$DATA_DIR/server.properties" <<EOF
# Written by deploy/local/kafka.sh on each start; edits are overwritten.
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
log.dirs=$DATA_DIR/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=$REBALANCE_DELAY_MS
log.cleaner.dedupe.buffer.size=33554432
EOF
    cat >"$DATA_DIR/log4j2.properties" <<EOF
# Written by deploy/local/kafka.sh on each start; edits are overwritten.
status = warn
name = mmstream-local-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $DATA_DIR/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.config.name = org.apache.kafka.common.config
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = WARN
logger.logmanager.name = kafka.log.LogManager
logger.logmanager.level = WARN
logger.metadata.name = org.apache.kafka.image.loader
logger.metadata.level = WARN
EOF
}

random_cluster_id() { # a Kafka Uuid: 16 random bytes, base64url without padding, not starting with '-'
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ $id == -* || ${#id} -ne 22 ]] || break
    done
    echo "$id"
}

# --- commands ---------------------------------------------------------------------------------

cmd_start() {
    parse_args "$@"
    lock_data_dir
    # Without explicit ports, reuse the ones of the last start from this data dir.
    local last_port last_cport
    last_port=$(prop port "$DATA_DIR/ports")
    last_cport=$(prop controller.port "$DATA_DIR/ports")
    [[ -n $PORT_SET || -z $last_port ]] || PORT=$last_port
    [[ -n $CONTROLLER_PORT_SET || -z $last_cport ]] || CONTROLLER_PORT=$last_cport

    local pid
    if pid=$(broker_pid); then
        local running_port running_cport
        running_port=$(prop port "$DATA_DIR/ports")
        running_cport=$(prop controller.port "$DATA_DIR/ports")
        if [[ $running_port != "$PORT" || $running_cport != "$CONTROLLER_PORT" ]]; then
            die "a broker from $DATA_DIR is already running on ports $running_port/$running_cport (pid $pid); stop it first"
        fi
        if port_accepts "$PORT"; then
            echo "kafka: ready on 127.0.0.1:$PORT (data: $DATA_DIR, pid $pid, already running)"
            return 0
        fi
        die "a broker from $DATA_DIR (pid $pid) is alive but 127.0.0.1:$PORT does not answer; see $DATA_DIR/server.log or run stop"
    fi

    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_accepts "$p"; then
            die "port 127.0.0.1:$p is already in use by another process (not the mmstream broker of $DATA_DIR); choose other ports with --port/--controller-port"
        fi
    done

    ensure_jars
    command -v "$JAVA" >/dev/null || die "java not found (install Java 17+ or set JAVA_HOME)"

    write_config
    local -a jvm_log=("-Dlog4j2.configurationFile=$DATA_DIR/log4j2.properties")
    if [[ ! -f $DATA_DIR/data/meta.properties ]]; then
        rm -rf "$DATA_DIR/data"
        if ! "$JAVA" "${jvm_log[@]}" -cp "$JAR_DIR/*" kafka.tools.StorageTool format --standalone \
            -t "$(random_cluster_id)" -c "$DATA_DIR/server.properties" >"$DATA_DIR/format.log" 2>&1 9>&-; then
            print_logs
            die "formatting storage in $DATA_DIR/data failed"
        fi
    fi

    [[ ! -f $DATA_DIR/server.log ]] || mv -f "$DATA_DIR/server.log" "$DATA_DIR/server.log.prev"
    local -a heap
    read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
    local -a detach=()
    ! command -v setsid >/dev/null || detach=(setsid)
    local t0=$SECONDS
    ${detach[@]+"${detach[@]}"} nohup "$JAVA" "${heap[@]}" -Djava.awt.headless=true "${jvm_log[@]}" \
        -cp "$JAR_DIR/*" kafka.Kafka "$DATA_DIR/server.properties" \
        >"$DATA_DIR/stdout.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$DATA_DIR/broker.pid"
    printf 'port=%s\ncontroller.port=%s\n' "$PORT" "$CONTROLLER_PORT" >"$DATA_DIR/ports"

    # Ready = port accepts and the server logged its start (the port is bound a bit earlier).
    while ((SECONDS - t0 < START_TIMEOUT_S)); do
        if ! alive "$pid"; then
            rm -f "$DATA_DIR/broker.pid"
            print_logs
            die "broker exited during start (data: $DATA_DIR)"
        fi
        if port_accepts "$PORT" && grep -q 'Kafka Server started' "$DATA_DIR/server.log" 2>/dev/null; then
            echo "kafka: ready on 127.0.0.1:$PORT (data: $DATA_DIR, pid $pid, $((SECONDS - t0)) s)"
            return 0
        fi
        sleep 0.2
    done
    print_logs
    kill -TERM "$pid" 2>/dev/null || true
    die "broker not ready on 127.0.0.1:$PORT after ${START_TIMEOUT_S} s; sent it SIGTERM (pid $pid)"
}

cmd_stop() {
    parse_args "$@"
    [[ -d $DATA_DIR ]] || {
        echo "kafka: not running (data: $DATA_DIR)"
        return 0
    }
    lock_data_dir
    local pid
    if ! pid=$(broker_pid); then
        echo "kafka: not running (data: $DATA_DIR)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < STOP_TIMEOUT_S * 5; i++)); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        echo "kafka: pid $pid still alive after ${STOP_TIMEOUT_S} s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.1; done
    fi
    rm -f "$DATA_DIR/broker.pid"
    echo "kafka: stopped (pid $pid, data: $DATA_DIR)"
}

cmd_status() {
    parse_args "$@"
    local pid port
    if pid=$(broker_pid); then
        port=$(prop port "$DATA_DIR/ports")
        if port_accepts "$port"; then
            echo "kafka: running on 127.0.0.1:$port (pid $pid, data: $DATA_DIR)"
            return 0
        fi
        echo "kafka: pid $pid alive but 127.0.0.1:$port not answering (data: $DATA_DIR)"
        return 3
    fi
    echo "kafka: not running (data: $DATA_DIR)"
    return 3
}

CMD=${1:-}
case $CMD in
start) shift && cmd_start "$@" ;;
stop) shift && cmd_stop "$@" ;;
status) shift && cmd_status "$@" ;;
jars)
    (($# == 1)) || die "jars takes no arguments"
    ensure_jars
    echo "$JAR_DIR"
    ;;
*) usage ;;
esac
