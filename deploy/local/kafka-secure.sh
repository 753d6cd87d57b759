#!/usr/bin/env bash
# Single-node secured Apache Kafka (KRaft, broker+controller in one JVM) from the Maven jars of
# kafka.sh: SASL_SSL (SCRAM-SHA-512) and mTLS listeners, ACLs enforced. No Docker.
#
#   kafka-secure.sh start  [--data-dir D] [--port P] [--mtls-port M] [--controller-port C]
#                          [--users "U1 U2 ..."] [--initial-rebalance-delay-ms MS]
#   kafka-secure.sh stop   [--data-dir D]
#   kafka-secure.sh status [--data-dir D]  exit 0 when running, 3 when not
#   kafka-secure.sh env    [--data-dir D]  KEY=VALUE lines (ports, files): eval "$(... env)"
#
# Defaults: --data-dir <repo>/.cache/kafka-secure, --port 9192 (SASL_SSL), --mtls-port 9193
# (SSL with client certificates), --controller-port 9194 (PLAINTEXT, controller only), or the
# ports of the last start from D; --users "mmstream mmstream-replay mmstream-archive".
# Listens on 127.0.0.1 only. Heap: KAFKA_HEAP_OPTS (default "-Xmx400m -Xms128m").
#
# The first start of D generates, with openssl, into D/tls: a CA, a server certificate for
# 127.0.0.1/localhost, a client certificate per user (CN=<user>: its mTLS principal) and a
# "rogue" CA with a client certificate (CN=mmstream) the broker must refuse; and into
# D/secrets a SCRAM-SHA-512 password per user and for the super user admin (files 0600).
# Authorizer: StandardAuthorizer, allow.everyone.if.no.acl.found=false, super users admin and
# ANONYMOUS (the PLAINTEXT controller listener's principal); every other user needs ACLs.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
START_TIMEOUT_S=90
STOP_TIMEOUT_S=20
CERT_DAYS=825
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
DEFAULT_USERS="mmstream mmstream-replay mmstream-archive"

die() {
    echo "kafka-secure: $*" >&2
    exit 1
}

usage() {
    sed -n '3,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- helpers (as in kafka.sh) -------------------------------------------------------------------

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
    for f in "$DATA_DIR/server.log" "$DATA_DIR/stdout.log" "$DATA_DIR/format.log" "$DATA_DIR/tls/openssl.log"; do
        if [[ -s $f ]]; then
            echo "---- last 30 lines of $f ----" >&2
            tail -n 30 "$f" >&2
        fi
    done
}

parse_args() { # sets PORT, MTLS_PORT, CONTROLLER_PORT, *_SET, DATA_DIR, USERS, REBALANCE_DELAY_MS
    PORT=9192 MTLS_PORT=9193 CONTROLLER_PORT=9194 PORT_SET='' MTLS_PORT_SET='' CONTROLLER_PORT_SET=''
    REBALANCE_DELAY_MS=3000 USERS=$DEFAULT_USERS USERS_SET=''
    DATA_DIR=$REPO_ROOT/.cache/kafka-secure
    while (($#)); do
        case $1 in
        --port) PORT=${2:?--port needs a value} PORT_SET=1 && shift 2 ;;
        --port=*) PORT=${1#*=} PORT_SET=1 && shift ;;
        --mtls-port) MTLS_PORT=${2:?--mtls-port needs a value} MTLS_PORT_SET=1 && shift 2 ;;
        --mtls-port=*) MTLS_PORT=${1#*=} MTLS_PORT_SET=1 && shift ;;
        --controller-port) CONTROLLER_PORT=${2:?--controller-port needs a value} CONTROLLER_PORT_SET=1 && shift 2 ;;
        --controller-port=*) CONTROLLER_PORT=${1#*=} CONTROLLER_PORT_SET=1 && shift ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a value} && shift 2 ;;
        --data-dir=*) DATA_DIR=${1#*=} && shift ;;
        --users) USERS=${2?--users needs a value} USERS_SET=1 && shift 2 ;;
        --users=*) USERS=${1#*=} USERS_SET=1 && shift ;;
        --initial-rebalance-delay-ms) REBALANCE_DELAY_MS=${2:?--initial-rebalance-delay-ms needs a value} && shift 2 ;;
        --initial-rebalance-delay-ms=*) REBALANCE_DELAY_MS=${1#*=} && shift ;;
        -h | --help) usage ;;
        *) die "unknown argument: $1 (try --help)" ;;
        esac
    done
    [[ $PORT =~ ^[0-9]+$ && $MTLS_PORT =~ ^[0-9]+$ && $CONTROLLER_PORT =~ ^[0-9]+$ ]] || die "ports must be numbers"
    [[ $REBALANCE_DELAY_MS =~ ^[0-9]+$ ]] || die "--initial-rebalance-delay-ms must be a number"
    [[ $PORT != "$MTLS_PORT" && $PORT != "$CONTROLLER_PORT" && $MTLS_PORT != "$CONTROLLER_PORT" ]] ||
        die "--port, --mtls-port and --controller-port must all differ"
    local u
    for u in $USERS; do
        [[ $u =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--users: bad user name '$u' (letters, digits, . _ -)"
        [[ $u != admin && $u != rogue ]] || die "--users: '$u' is reserved"
    done
    [[ $CMD != start ]] || mkdir -p "$DATA_DIR"
    if [[ -d $DATA_DIR ]]; then
        DATA_DIR=$(cd "$DATA_DIR" && pwd)
    elif [[ $DATA_DIR != /* ]]; then
        DATA_DIR=$PWD/$DATA_DIR
    fi
    TLS_DIR=$DATA_DIR/tls
    SECRETS_DIR=$DATA_DIR/secrets
}

lock_data_dir() { # serialise start/stop on one data dir, where flock exists
    if command -v flock >/dev/null; then
        exec 9>"$DATA_DIR/.kafka-secure.sh.lock"
        flock 9
    fi
}

new_password() { # 32 random letters and digits (safe inside --add-scram and JAAS quotes)
    local pw=
    while ((${#pw} < 32)); do
        pw+=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    done
    echo "${pw:0:32}"
}

# --- certificates and secrets -------------------------------------------------------------------

ossl() { # openssl with its chatter in tls/openssl.log
    openssl "$@" >>"$TLS_DIR/openssl.log" 2>&1 || {
        print_logs
        die "openssl $1 failed"
    }
}

new_ca() { # name cn -> tls/<name>.pem + tls/<name>.key (self-signed CA)
    ossl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$CERT_DAYS" \
        -subj "/O=mmstream local/CN=$2" -keyout "$TLS_DIR/$1.key" -out "$TLS_DIR/$1.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

new_cert() { # name cn ca usage [san] -> tls/<name>.pem + tls/<name>.key signed by tls/<ca>
    local ext=$TLS_DIR/$1.ext
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$4"
        [[ -z ${5:-} ]] || echo "subjectAltName=$5"
    } >"$ext"
    # genpkey writes PKCS#8 ("BEGIN PRIVATE KEY"), the form Kafka's PEM keystore reads.
    ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TLS_DIR/$1.key"
    ossl req -new -key "$TLS_DIR/$1.key" -subj "/CN=$2" -out "$TLS_DIR/$1.csr"
    ossl x509 -req -in "$TLS_DIR/$1.csr" -CA "$TLS_DIR/$3.pem" -CAkey "$TLS_DIR/$3.key" \
        -CAcreateserial -days "$CERT_DAYS" -sha256 -extfile "$ext" -out "$TLS_DIR/$1.pem"
    rm -f "$TLS_DIR/$1.csr" "$ext"
}

ensure_tls() { # once per data dir; a user added later (--users) gets its certificate then
    command -v openssl >/dev/null || die "openssl not found (needed to make the certificates)"
    (umask 077 && mkdir -p "$TLS_DIR")
    local old_umask
    old_umask=$(umask)
    umask 077
    if [[ ! -f $TLS_DIR/ca.pem ]]; then
        new_ca ca "mmstream local CA"
        new_cert server localhost ca serverAuth,clientAuth "IP:127.0.0.1,DNS:localhost"
        # The broker's PEM keystore: its key, then its certificate chain.
        cat "$TLS_DIR/server.key" "$TLS_DIR/server.pem" "$TLS_DIR/ca.pem" >"$TLS_DIR/server-keystore.pem"
        new_ca rogue-ca "rogue CA"
        # Same CN as a real user: only the signature tells them apart.
        new_cert rogue-client mmstream rogue-ca clientAuth
    fi
    local u
    for u in admin $USERS; do
        [[ -f $TLS_DIR/$u.pem ]] || new_cert "$u" "$u" ca clientAuth
    done
    umask "$old_umask"
}

ensure_secrets() { # a password file per user (0600) in a 0700 folder; never overwritten
    (umask 077 && mkdir -p "$SECRETS_DIR")
    chmod 700 "$SECRETS_DIR"
    local u
    for u in admin $USERS; do
        if [[ ! -s $SECRETS_DIR/$u.password ]]; then
            (umask 077 && new_password >"$SECRETS_DIR/$u.password")
        fi
        chmod 600 "$SECRETS_DIR/$u.password"
    done
}

password_of() { tr -d '\n' <"$SECRETS_DIR/$1.password"; }

# --- config -----------------------------------------------------------------------------------

write_config() {
    local admin_pw
    admin_pw=$(password_of admin)
    (umask 077 && : >"$DATA_DIR/server.properties")
    cat >"$DATA_DIR/server.properties" <<EOF
# Written by deploy/local/kafka-secure.sh on each start; edits are overwritten. Holds the
# inter-broker password of admin: keep it 0600.
process.roles=broker,controller
node.id=1
listeners=SASL_SSL://127.0.0.1:$PORT,MTLS://127.0.0.1:$MTLS_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$PORT,MTLS://127.0.0.1:$MTLS_PORT
listener.security.protocol.map=SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT

# SASL: SCRAM-SHA-512 only; the broker itself talks to itself as admin.
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_pw";

# TLS: PEM key store and trust store (the local CA). Clients verify 127.0.0.1/localhost.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
ssl.endpoint.identification.algorithm=https
ssl.enabled.protocols=TLSv1.3,TLSv1.2
# mTLS listener: a client certificate of the local CA is required; its CN is the principal.
listener.name.mtls.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+).*\$/\$1/,DEFAULT

# ACLs: nothing is allowed unless an ACL says so (super users excepted).
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:ANONYMOUS

log.dirs=$DATA_DIR/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
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
    chmod 600 "$DATA_DIR/server.properties"
    cat >"$DATA_DIR/log4j2.properties" <<EOF
# Written by deploy/local/kafka-secure.sh on each start; edits are overwritten.
status = warn
name = mmstream-local-kafka-secure
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
# Denied requests: INFO in kafka.authorizer.logger (one line each).
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = INFO
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
    # Without explicit ports (or users), reuse the ones of the last start from this data dir.
    local f=$DATA_DIR/ports last
    last=$(prop port "$f") && [[ -n $PORT_SET || -z $last ]] || PORT=$last
    last=$(prop mtls.port "$f") && [[ -n $MTLS_PORT_SET || -z $last ]] || MTLS_PORT=$last
    last=$(prop controller.port "$f") && [[ -n $CONTROLLER_PORT_SET || -z $last ]] || CONTROLLER_PORT=$last
    last=$(prop users "$f") && [[ -n $USERS_SET || -z $last ]] || USERS=$last

    local pid
    if pid=$(broker_pid); then
        if [[ $(prop port "$f") != "$PORT" || $(prop mtls.port "$f") != "$MTLS_PORT" ||
            $(prop controller.port "$f") != "$CONTROLLER_PORT" ]]; then
            die "a broker from $DATA_DIR is already running on other ports (pid $pid, see $f); stop it first"
        fi
        if port_accepts "$PORT"; then
            echo "kafka-secure: ready on 127.0.0.1:$PORT (SASL_SSL) and 127.0.0.1:$MTLS_PORT (mTLS) (data: $DATA_DIR, pid $pid, already running)"
            return 0
        fi
        die "a broker from $DATA_DIR (pid $pid) is alive but 127.0.0.1:$PORT does not answer; see $DATA_DIR/server.log or run stop"
    fi

    local p
    for p in "$PORT" "$MTLS_PORT" "$CONTROLLER_PORT"; do
        if port_accepts "$p"; then
            die "port 127.0.0.1:$p is already in use by another process; choose other ports with --port/--mtls-port/--controller-port"
        fi
    done

    local jar_dir
    jar_dir=$(bash "$SCRIPT_DIR/kafka.sh" jars 9>&-) || die "cannot fetch the Kafka jars (deploy/local/kafka.sh jars)"
    command -v "$JAVA" >/dev/null || die "java not found (install Java 17+ or set JAVA_HOME)"

    ensure_tls
    ensure_secrets
    write_config
    local -a jvm_log=("-Dlog4j2.configurationFile=$DATA_DIR/log4j2.properties")
    if [[ ! -f $DATA_DIR/data/meta.properties ]]; then
        rm -rf "$DATA_DIR/data"
        local -a scram=()
        local u
        for u in admin $USERS; do
            scram+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(password_of "$u")]")
        done
        if ! "$JAVA" "${jvm_log[@]}" -cp "$jar_dir/*" kafka.tools.StorageTool format --standalone \
            -t "$(random_cluster_id)" -c "$DATA_DIR/server.properties" "${scram[@]}" \
            >"$DATA_DIR/format.log" 2>&1 9>&-; then
            print_logs
            die "formatting storage in $DATA_DIR/data failed"
        fi
        printf '%s\n' "$USERS" >"$DATA_DIR/scram-users"
    elif [[ -f $DATA_DIR/scram-users ]]; then
        for u in $USERS; do
            [[ " $(<"$DATA_DIR/scram-users") " == *" $u "* ]] ||
                echo "kafka-secure: user '$u' has a certificate but no SCRAM password: SCRAM users are made when D is formatted (new --data-dir)" >&2
        done
    fi

    [[ ! -f $DATA_DIR/server.log ]] || mv -f "$DATA_DIR/server.log" "$DATA_DIR/server.log.prev"
    local -a heap
    read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xmx400m -Xms128m}"
    local -a detach=()
    ! command -v setsid >/dev/null || detach=(setsid)
    local t0=$SECONDS
    ${detach[@]+"${detach[@]}"} nohup "$JAVA" "${heap[@]}" -Djava.awt.headless=true "${jvm_log[@]}" \
        -cp "$jar_dir/*" kafka.Kafka "$DATA_DIR/server.properties" \
        >"$DATA_DIR/stdout.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$DATA_DIR/broker.pid"
    printf 'port=%s\nmtls.port=%s\ncontroller.port=%s\nusers=%s\n' \
        "$PORT" "$MTLS_PORT" "$CONTROLLER_PORT" "$USERS" >"$DATA_DIR/ports"

    while ((SECONDS - t0 < START_TIMEOUT_S)); do
        if ! alive "$pid"; then
            rm -f "$DATA_DIR/broker.pid"
            print_logs
            die "broker exited during start (data: $DATA_DIR)"
        fi
        if port_accepts "$PORT" && port_accepts "$MTLS_PORT" &&
            grep -q 'Kafka Server started' "$DATA_DIR/server.log" 2>/dev/null; then
            echo "kafka-secure: ready on 127.0.0.1:$PORT (SASL_SSL) and 127.0.0.1:$MTLS_PORT (mTLS) (data: $DATA_DIR, pid $pid, $((SECONDS - t0)) s)"
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
        echo "kafka-secure: not running (data: $DATA_DIR)"
        return 0
    }
    lock_data_dir
    local pid
    if ! pid=$(broker_pid); then
        echo "kafka-secure: not running (data: $DATA_DIR)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < STOP_TIMEOUT_S * 5; i++)); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        echo "kafka-secure: pid $pid still alive after ${STOP_TIMEOUT_S} s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.1; done
    fi
    rm -f "$DATA_DIR/broker.pid"
    echo "kafka-secure: stopped (pid $pid, data: $DATA_DIR)"
}

cmd_status() {
    parse_args "$@"
    local pid port
    if pid=$(broker_pid); then
        port=$(prop port "$DATA_DIR/ports")
        if port_accepts "$port"; then
            echo "kafka-secure: running on 127.0.0.1:$port (SASL_SSL) and 127.0.0.1:$(prop mtls.port "$DATA_DIR/ports") (mTLS) (pid $pid, data: $DATA_DIR)"
            return 0
        fi
        echo "kafka-secure: pid $pid alive but 127.0.0.1:$port not answering (data: $DATA_DIR)"
        return 3
    fi
    echo "kafka-secure: not running (data: $DATA_DIR)"
    return 3
}

cmd_env() { # what a client needs, as shell-quoted KEY=VALUE lines (no secret values)
    parse_args "$@"
    [[ -f $DATA_DIR/ports ]] || die "no broker was started from $DATA_DIR (run start first)"
    local f=$DATA_DIR/ports u
    local -a lines=(
        "KAFKA_SECURE_DATA_DIR=$DATA_DIR"
        "KAFKA_SECURE_SASL_BOOTSTRAP=127.0.0.1:$(prop port "$f")"
        "KAFKA_SECURE_MTLS_BOOTSTRAP=127.0.0.1:$(prop mtls.port "$f")"
        "KAFKA_SECURE_CONTROLLER_PORT=$(prop controller.port "$f")"
        "KAFKA_SECURE_SASL_MECHANISM=SCRAM-SHA-512"
        "KAFKA_SECURE_USERS=$(prop users "$f")"
        "KAFKA_SECURE_CA=$TLS_DIR/ca.pem"
        "KAFKA_SECURE_TLS_DIR=$TLS_DIR"
        "KAFKA_SECURE_SECRETS_DIR=$SECRETS_DIR"
        "KAFKA_SECURE_ROGUE_CA=$TLS_DIR/rogue-ca.pem"
        "KAFKA_SECURE_ROGUE_CERT=$TLS_DIR/rogue-client.pem"
        "KAFKA_SECURE_ROGUE_KEY=$TLS_DIR/rogue-client.key"
    )
    for u in admin $(prop users "$f"); do
        local v=${u//[^A-Za-z0-9]/_}
        v=${v^^}
        lines+=("KAFKA_SECURE_${v}_PASSWORD_FILE=$SECRETS_DIR/$u.password"
            "KAFKA_SECURE_${v}_CERT=$TLS_DIR/$u.pem" "KAFKA_SECURE_${v}_KEY=$TLS_DIR/$u.key")
    done
    local line
    for line in "${lines[@]}"; do
        printf '%s=%q\n' "${line%%=*}" "${line#*=}"
    done
}

CMD=${1:-}
case $CMD in
start) shift && cmd_start "$@" ;;
stop) shift && cmd_stop "$@" ;;
status) shift && cmd_status "$@" ;;
env | info) shift && cmd_env "$@" ;;
*) usage ;;
esac
