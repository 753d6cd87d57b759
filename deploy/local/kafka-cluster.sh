#!/usr/bin/env bash
# Three-broker Apache Kafka cluster (KRaft, each JVM broker+controller) on 127.0.0.1, from the
# jars of deploy/local/kafka.sh: no Docker. For failover tests: kill and restart brokers by id.
#
#   kafka-cluster.sh start     --data-dir D [--base-port P] [--initial-rebalance-delay-ms M]
#   kafka-cluster.sh stop      --data-dir D
#   kafka-cluster.sh status    --data-dir D     exit 0 when all three run, 3 otherwise
#   kafka-cluster.sh bootstrap --data-dir D     print the bootstrap string (all three brokers)
#   kafka-cluster.sh kill      --data-dir D --id N [--signal KILL|TERM|STOP|CONT]   (default KILL)
#   kafka-cluster.sh restart   --data-dir D --id N   (stops node N if it runs, starts it again
#                                                     on its existing data, waits until started)
#
# Ports: node N listens on P+N-1 (clients) and P+N+2 (controller); without --base-port six free
# ports are chosen; either way they are kept in D/ports and reused by later starts from D.
# start also brings back nodes of D that are down. Defaults: --initial-rebalance-delay-ms 3000.
# Replication: default.replication.factor=3, min.insync.replicas=2, internal topics RF 3 (min ISR 2).
# Heap per JVM: KAFKA_HEAP_OPTS (default "-Xmx400m"). Node N keeps its files in D/node-N
# (server.properties, server.log, data/).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KAFKA_SH=$SCRIPT_DIR/kafka.sh
NODES=(1 2 3)
START_TIMEOUT_S=${KAFKA_CLUSTER_START_TIMEOUT_S:-180}
STOP_TIMEOUT_S=30
LONE_GRACE_S=5
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

die() {
    echo "kafka-cluster: $*" >&2
    exit 1
}

usage() {
    sed -n '3,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- helpers ----------------------------------------------------------------------------------

alive() { # pid -> 0 when the process exists and is not a zombie
    kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

suspended() { # pid -> 0 when the process is stopped (SIGSTOP)
    [[ $(ps -o stat= -p "$1" 2>/dev/null) == T* ]]
}

port_accepts() { # port -> 0 when something on 127.0.0.1:port accepts a TCP connection
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

port_bound() { # port -> 0 when a TCP socket of this host uses the port (any state)
    local hex
    hex=$(printf ':%04X ' "$1")
    port_accepts "$1" || grep -qs -- "$hex" /proc/net/tcp /proc/net/tcp6
}

prop() { # key file -> value of key in a .properties file (empty when absent)
    [[ -f $2 ]] || return 0
    sed -n "s/^$1=//p" "$2" | tail -n 1
}

node_dir() { echo "$DATA_DIR/node-$1"; }
node_port() { prop "node.$1.port" "$DATA_DIR/ports"; }
node_cport() { prop "node.$1.controller.port" "$DATA_DIR/ports"; }

node_pid() { # id -> pid of node id of $DATA_DIR, if alive; stale pid files go
    local dir pid cmd
    dir=$(node_dir "$1")
    [[ -f $dir/broker.pid ]] || return 1
    pid=$(<"$dir/broker.pid")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
        cmd=$(ps -ww -o args= -p "$pid" 2>/dev/null || true)
        if [[ $cmd == *kafka.Kafka*"$dir/server.properties"* ]]; then
            echo "$pid"
            return 0
        fi
    fi
    rm -f "$dir/broker.pid"
    return 1
}

node_ready() { # id -> 0 when node id logged its start and its client port accepts
    grep -qs 'Kafka Server started' "$(node_dir "$1")/server.log" && port_accepts "$(node_port "$1")"
}

print_logs() { # id...
    local n f
    for n in "$@"; do
        for f in "$(node_dir "$n")"/{server.log,stdout.log,format.log}; do
            if [[ -s $f ]]; then
                echo "---- last 20 lines of $f ----" >&2
                tail -n 20 "$f" >&2
            fi
        done
    done
}

bootstrap_string() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("127.0.0.1:$(node_port "$n")"); done
    local IFS=,
    echo "${out[*]}"
}

parse_args() { # sets DATA_DIR, BASE_PORT, REBALANCE_DELAY_MS, NODE_ID, SIGNAL
    DATA_DIR='' BASE_PORT='' REBALANCE_DELAY_MS=3000 NODE_ID='' SIGNAL=KILL
    while (($#)); do
        case $1 in
        --data-dir) DATA_DIR=${2:?--data-dir needs a value} && shift 2 ;;
        --data-dir=*) DATA_DIR=${1#*=} && shift ;;
        --base-port) BASE_PORT=${2:?--base-port needs a value} && shift 2 ;;
        --base-port=*) BASE_PORT=${1#*=} && shift ;;
        --initial-rebalance-delay-ms) REBALANCE_DELAY_MS=${2:?--initial-rebalance-delay-ms needs a value} && shift 2 ;;
        --initial-rebalance-delay-ms=*) REBALANCE_DELAY_MS=${1#*=} && shift ;;
        --id) NODE_ID=${2:?--id needs a value} && shift 2 ;;
        --id=*) NODE_ID=${1#*=} && shift ;;
        --signal) SIGNAL=${2:?--signal needs a value} && shift 2 ;;
        --signal=*) SIGNAL=${1#*=} && shift ;;
        -h | --help) usage ;;
        *) die "unknown argument: $1 (try --help)" ;;
        esac
    done
    [[ -n $DATA_DIR ]] || die "--data-dir is required"
    [[ -z $BASE_PORT || ($BASE_PORT =~ ^[0-9]+$ && BASE_PORT -ge 1024 && BASE_PORT -le 65530) ]] ||
        die "--base-port must be a number in 1024..65530"
    [[ $REBALANCE_DELAY_MS =~ ^[0-9]+$ ]] || die "--initial-rebalance-delay-ms must be a number"
    SIGNAL=${SIGNAL#SIG}
    SIGNAL=${SIGNAL^^}
    case $SIGNAL in KILL | TERM | STOP | CONT) ;; *) die "--signal must be KILL, TERM, STOP or CONT" ;; esac
    case $CMD in
    kill | restart) [[ $NODE_ID =~ ^[123]$ ]] || die "$CMD needs --id 1, 2 or 3" ;;
    *) [[ -z $NODE_ID ]] || die "--id is only for kill and restart" ;;
    esac
    [[ $CMD != start ]] || mkdir -p "$DATA_DIR"
    if [[ -d $DATA_DIR ]]; then
        DATA_DIR=$(cd "$DATA_DIR" && pwd)
    elif [[ $DATA_DIR != /* ]]; then
        DATA_DIR=$PWD/$DATA_DIR
    fi
}

lock_data_dir() { # serialise commands on one data dir, where flock exists
    if command -v flock >/dev/null; then
        exec 9>"$DATA_DIR/.kafka-cluster.sh.lock"
        flock 9
    fi
}

require_cluster() {
    [[ -f $DATA_DIR/ports ]] || die "no cluster in $DATA_DIR (run start first)"
}

choose_ports() { # -> writes D/ports: the recorded ports, --base-port, or six free ones
    local recorded n base
    recorded=$(prop node.1.port "$DATA_DIR/ports")
    if [[ -n $recorded ]]; then
        [[ -z $BASE_PORT || $BASE_PORT == "$recorded" ]] ||
            die "the cluster in $DATA_DIR uses base port $recorded (its quorum is on those ports); drop --base-port or use another --data-dir"
        return 0
    fi
    if [[ -n $BASE_PORT ]]; then
        base=$BASE_PORT
        for ((n = 0; n < 6; n++)); do
            ! port_bound $((base + n)) || die "port 127.0.0.1:$((base + n)) is in use; choose another --base-port"
        done
    else
        # Six consecutive free ports below Linux's ephemeral range (32768+), so no outgoing
        # connection takes one between this check and the brokers' bind.
        local tries
        for ((tries = 0; tries < 200; tries++)); do
            base=$((20000 + (RANDOM % 2000) * 6))
            for ((n = 0; n < 6; n++)); do
                ! port_bound $((base + n)) || continue 2
            done
            break
        done
        ((tries < 200)) || die "found no six free consecutive ports"
    fi
    {
        for n in "${NODES[@]}"; do
            printf 'node.%s.port=%s\nnode.%s.controller.port=%s\n' "$n" $((base + n - 1)) "$n" $((base + n + 2))
        done
    } >"$DATA_DIR/ports.tmp"
    mv -f "$DATA_DIR/ports.tmp" "$DATA_DIR/ports"
    printf 'bootstrap=%s\n' "$(bootstrap_string)" >>"$DATA_DIR/ports"
}

write_config() { # id
    local n=$1 dir voters="" m
    dir=$(node_dir "$n")
    for m in "${NODES[@]}"; do voters+="${voters:+,}$m@127.0.0.1:$(node_cport "$m")"; done
    mkdir -p "$dir"
    cat >"$dir/server.properties" <<EOF
# Written by deploy/local/kafka-cluster.sh on each start of this node; edits are overwritten.
process.roles=broker,controller
node.id=$n
listeners=PLAINTEXT://127.0.0.1:$(node_port "$n"),CONTROLLER://127.0.0.1:$(node_cport "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$n")
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.voters=$voters
log.dirs=$dir/data
num.partitions=1
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=true
offsets.topic.replication.factor=3
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=$REBALANCE_DELAY_MS
log.cleaner.dedupe.buffer.size=33554432
EOF
    cat >"$dir/log4j2.properties" <<EOF
# Written by deploy/local/kafka-cluster.sh on each start of this node; edits are overwritten.
status = warn
name = mmstream-local-kafka-cluster-$n
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $dir/server.log
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

format_node() { # id: format its storage with the cluster's id (static quorum: no --standalone)
    local dir cluster_id
    dir=$(node_dir "$1")
    [[ ! -f $dir/data/meta.properties ]] || return 0
    cluster_id=$(<"$DATA_DIR/cluster.id")
    rm -rf "$dir/data"
    if ! "$JAVA" "-Dlog4j2.configurationFile=$dir/log4j2.properties" -cp "$JAR_DIR/*" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
        >"$dir/format.log" 2>&1 9>&-; then
        print_logs "$1"
        die "formatting storage of node $1 in $dir/data failed"
    fi
}

launch_node() { # id: start its JVM in the background (not waiting)
    local n=$1 dir pid
    dir=$(node_dir "$n")
    local p
    for p in "$(node_port "$n")" "$(node_cport "$n")"; do
        ! port_accepts "$p" || die "port 127.0.0.1:$p of node $n is in use by another process"
    done
    write_config "$n"
    format_node "$n"
    [[ ! -f $dir/server.log ]] || mv -f "$dir/server.log" "$dir/server.log.prev"
    local -a heap detach=()
    read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xmx400m}"
    ! command -v setsid >/dev/null || detach=(setsid)
    ${detach[@]+"${detach[@]}"} nohup "$JAVA" "${heap[@]}" -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$dir/log4j2.properties" \
        -cp "$JAR_DIR/*" kafka.Kafka "$dir/server.properties" \
        >"$dir/stdout.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$dir/broker.pid"
}

wait_started() { # id... : wait until every node given is ready; die (and TERM them) on timeout
    local t0=$SECONDS n pending=("$@") left
    while ((${#pending[@]})); do
        left=()
        for n in "${pending[@]}"; do
            if ! node_pid "$n" >/dev/null; then
                print_logs "$n"
                die "node $n exited during start (data: $(node_dir "$n"))"
            fi
            node_ready "$n" || left+=("$n")
        done
        pending=(${left[@]+"${left[@]}"})
        ((${#pending[@]})) || break
        if ((SECONDS - t0 >= START_TIMEOUT_S)); then
            print_logs "${pending[@]}"
            for n in "${pending[@]}"; do
                kill -TERM "$(node_pid "$n")" 2>/dev/null || true
            done
            die "node(s) ${pending[*]} not started after ${START_TIMEOUT_S} s (a node needs a majority of the three controllers up); sent them SIGTERM"
        fi
        sleep 0.3
    done
}

nodes_alive() { # -> how many nodes of $DATA_DIR have a live JVM
    local n count=0
    for n in "${NODES[@]}"; do ! node_pid "$n" >/dev/null || count=$((count + 1)); done
    echo "$count"
}

stop_pids() { # pid...: CONT + TERM them all, wait, SIGKILL what is left after STOP_TIMEOUT_S
    # A node left without a controller quorum (fewer than two alive) cannot finish its
    # controlled shutdown and would wait out STOP_TIMEOUT_S: it gets SIGKILL after
    # LONE_GRACE_S instead.
    local pid i left t0=$SECONDS
    for pid in "$@"; do kill -CONT "$pid" 2>/dev/null || true; done
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < STOP_TIMEOUT_S * 5; i++)); do
        left=0
        for pid in "$@"; do ! alive "$pid" || left=1; done
        ((left)) || return 0
        if ((SECONDS - t0 >= LONE_GRACE_S)) && (($(nodes_alive) < 2)); then
            echo "kafka-cluster: no controller quorum left for a controlled shutdown; sending SIGKILL" >&2
            break
        fi
        sleep 0.2
    done
    for pid in "$@"; do
        if alive "$pid"; then
            ((SECONDS - t0 < STOP_TIMEOUT_S)) ||
                echo "kafka-cluster: pid $pid still alive after ${STOP_TIMEOUT_S} s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "$@"; do while alive "$pid"; do sleep 0.1; done; done
}

ensure_runtime() {
    JAR_DIR=$(bash "$KAFKA_SH" jars) || die "could not get the Kafka jars (deploy/local/kafka.sh jars)"
    command -v "$JAVA" >/dev/null || die "java not found (install Java 17+ or set JAVA_HOME)"
}

# --- commands ---------------------------------------------------------------------------------

cmd_start() {
    lock_data_dir
    choose_ports
    [[ -f $DATA_DIR/cluster.id ]] || random_cluster_id >"$DATA_DIR/cluster.id"
    local n down=() t0=$SECONDS
    for n in "${NODES[@]}"; do
        node_pid "$n" >/dev/null || down+=("$n")
    done
    if ((${#down[@]})); then
        ensure_runtime
        for n in "${down[@]}"; do launch_node "$n"; done
    fi
    wait_started "${NODES[@]}"
    echo "kafka-cluster: ready, nodes 1-3 (started: ${down[*]:-none}; $((SECONDS - t0)) s; data: $DATA_DIR)" >&2
    bootstrap_string
}

cmd_stop() {
    [[ -d $DATA_DIR ]] || {
        echo "kafka-cluster: not running (data: $DATA_DIR)"
        return 0
    }
    lock_data_dir
    local n pid pids=()
    for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n"); then pids+=("$pid"); fi
    done
    if ((${#pids[@]} == 0)); then
        echo "kafka-cluster: not running (data: $DATA_DIR)"
        return 0
    fi
    stop_pids "${pids[@]}"
    for n in "${NODES[@]}"; do rm -f "$(node_dir "$n")/broker.pid"; done
    echo "kafka-cluster: stopped (pids ${pids[*]}, data: $DATA_DIR)"
}

cmd_status() {
    [[ -f $DATA_DIR/ports ]] || {
        echo "kafka-cluster: no cluster in $DATA_DIR"
        return 3
    }
    local n pid up=0
    for n in "${NODES[@]}"; do
        if ! pid=$(node_pid "$n"); then
            echo "node $n: down (127.0.0.1:$(node_port "$n"))"
        elif suspended "$pid"; then
            echo "node $n: suspended by SIGSTOP (pid $pid, 127.0.0.1:$(node_port "$n"))"
        elif node_ready "$n"; then
            echo "node $n: running (pid $pid, 127.0.0.1:$(node_port "$n"))"
            up=$((up + 1))
        else
            echo "node $n: starting or not answering (pid $pid, 127.0.0.1:$(node_port "$n"))"
        fi
    done
    echo "bootstrap: $(bootstrap_string)"
    ((up == ${#NODES[@]})) || return 3
}

cmd_kill() {
    require_cluster
    lock_data_dir
    local pid
    if ! pid=$(node_pid "$NODE_ID"); then
        echo "kafka-cluster: node $NODE_ID is not running" >&2
        return 0
    fi
    case $SIGNAL in
    KILL)
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.05; done
        rm -f "$(node_dir "$NODE_ID")/broker.pid"
        ;;
    TERM)
        stop_pids "$pid"
        rm -f "$(node_dir "$NODE_ID")/broker.pid"
        ;;
    STOP | CONT) kill "-$SIGNAL" "$pid" ;;
    esac
    echo "kafka-cluster: node $NODE_ID (pid $pid): SIG$SIGNAL" >&2
}

cmd_restart() {
    require_cluster
    lock_data_dir
    local pid t0=$SECONDS
    if pid=$(node_pid "$NODE_ID"); then
        stop_pids "$pid"
        rm -f "$(node_dir "$NODE_ID")/broker.pid"
    fi
    ensure_runtime
    launch_node "$NODE_ID"
    wait_started "$NODE_ID"
    echo "kafka-cluster: node $NODE_ID started (pid $(node_pid "$NODE_ID"), $((SECONDS - t0)) s)" >&2
}

CMD=${1:-}
case $CMD in
start | stop | status | bootstrap | kill | restart) shift && parse_args "$@" ;;
*) usage ;;
esac
case $CMD in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
bootstrap) require_cluster && bootstrap_string ;;
kill) cmd_kill ;;
restart) cmd_restart ;;
esac
