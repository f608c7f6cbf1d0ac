#!/usr/bin/env bash
# Provide the cluster engines (PostgreSQL and RabbitMQ) on this machine, for the engine tests and
# for running an organism in cluster mode locally.
#
#   scripts/engines.sh start              use what answers; else install (root) and start
#                                         throwaway instances bound to 127.0.0.1
#   scripts/engines.sh stop               stop only what `start` started
#   scripts/engines.sh status             what answers, and what `start` started
#   scripts/engines.sh restart-postgres   restart the running PostgreSQL, however it was started
#   scripts/engines.sh restart-rabbitmq   restart the running RabbitMQ, however it was started
#
# Addresses come from DATABASE_URL and AMQP_URL, defaulting to
# postgres://postgres@127.0.0.1:5432/test and amqp://guest:guest@127.0.0.1:5672/%2f.
# What `start` started is recorded in $HOMEOSTAT_ENGINES_STATE (default
# /tmp/homeostat-engines/state).
set -euo pipefail

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
STATE_FILE="${HOMEOSTAT_ENGINES_STATE:-/tmp/homeostat-engines/state}"
STATE_DIR="$(dirname "$STATE_FILE")"
WAIT_SECS="${HOMEOSTAT_ENGINES_WAIT:-90}"

die() {
    echo "engines.sh: $*" >&2
    exit 1
}
say() { echo "engines.sh: $*"; }

# host and port of a URL: "scheme://[user[:pass]@]host[:port][/...]"
url_host() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    echo "${rest%%:*}"
}
url_port() {
    local rest="${1#*://}" default="$2"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    rest="${rest%%\?*}"
    if [[ "$rest" == *:* ]]; then echo "${rest##*:}"; else echo "$default"; fi
}
url_path() {
    local rest="${1#*://}"
    if [[ "$rest" == */* ]]; then
        rest="${rest#*/}"
        echo "${rest%%\?*}"
    fi
}

PG_HOST="$(url_host "$DATABASE_URL")"
PG_PORT="$(url_port "$DATABASE_URL" 5432)"
PG_DB="$(url_path "$DATABASE_URL")"
PG_DB="${PG_DB:-test}"
MQ_HOST="$(url_host "$AMQP_URL")"
MQ_PORT="$(url_port "$AMQP_URL" 5672)"

is_loopback() { [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 ]]; }

# Does something accept TCP connections at host:port?
answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

pg_answers() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2
    else
        answers "$PG_HOST" "$PG_PORT"
    fi
}
mq_answers() { answers "$MQ_HOST" "$MQ_PORT"; }

# Wait (bounded) until a check passes.
wait_for() {
    local what="$1" check="$2" deadline=$((SECONDS + WAIT_SECS))
    until "$check"; do
        if ((SECONDS >= deadline)); then
            die "$what did not answer within ${WAIT_SECS}s"
        fi
        sleep 0.5
    done
}

state_get() {
    [[ -f "$STATE_FILE" ]] || return 0
    sed -n "s/^$1=//p" "$STATE_FILE" | tail -n 1
}
state_set() {
    mkdir -p "$STATE_DIR"
    touch "$STATE_FILE"
    sed -i "/^$1=/d" "$STATE_FILE"
    echo "$1=$2" >>"$STATE_FILE"
}
state_del() {
    [[ -f "$STATE_FILE" ]] || return 0
    sed -i "/^$1=/d" "$STATE_FILE"
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "cannot install $*: no apt-get on this machine"
    if ((APT_UPDATED == 0)); then
        apt-get update
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "$1 does not answer, and providing it needs root (apt-get install, \
service users); start it yourself or run this script as root"
}

# The newest installed PostgreSQL server binaries.
pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then
        echo "$dir"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

as_postgres() { runuser -u postgres -- "$@"; }

pg_ctl_opts() {
    echo "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $1"
}

start_postgres() {
    if pg_answers; then
        say "PostgreSQL answers at $PG_HOST:$PG_PORT; using it"
        return
    fi
    is_loopback "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT (DATABASE_URL) does not answer; \
only a local one can be started here"
    need_root "PostgreSQL at $PG_HOST:$PG_PORT"
    local bin
    bin="$(pg_bindir)"
    if [[ -z "$bin" ]]; then
        apt_install postgresql
        bin="$(pg_bindir)"
        [[ -n "$bin" ]] || die "postgresql installed but initdb not found"
    fi
    # Installing the package may have started its own cluster on our port.
    if pg_answers; then
        say "PostgreSQL answers at $PG_HOST:$PG_PORT after installation; using it"
        return
    fi
    mkdir -p "$STATE_DIR"
    local dir
    dir="$(mktemp -d "$STATE_DIR/postgres.XXXXXX")"
    chown postgres:postgres "$dir"
    chmod 700 "$dir"
    say "starting a throwaway PostgreSQL in $dir"
    as_postgres "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 ||
        die "initdb failed; see $dir/initdb.log"
    state_set postgres_dir "$dir"
    state_set postgres_bin "$bin"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t "$WAIT_SECS" \
        -o "$(pg_ctl_opts "$dir")" start >/dev/null ||
        die "PostgreSQL did not start; see $dir/server.log"
    wait_for "PostgreSQL" pg_answers
    as_postgres "$bin/psql" -q -h "$dir" -p "$PG_PORT" -U postgres -d postgres \
        -c "CREATE ROLE root SUPERUSER LOGIN" >/dev/null 2>&1 || true
    as_postgres "$bin/createdb" -h "$dir" -p "$PG_PORT" -U postgres "$PG_DB" 2>/dev/null || true
    say "PostgreSQL started at 127.0.0.1:$PG_PORT (database $PG_DB, trust auth)"
}

# RabbitMQ started by this script runs under its own node name, data and log directories.
mq_env() {
    local dir="$1"
    echo "RABBITMQ_NODENAME=$(state_get rabbitmq_node)" \
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" \
        "RABBITMQ_NODE_PORT=$MQ_PORT" \
        "RABBITMQ_MNESIA_BASE=$dir/mnesia" \
        "RABBITMQ_LOG_BASE=$dir/log" \
        "RABBITMQ_PID_FILE=$dir/rabbitmq.pid" \
        "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins" \
        "RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf" \
        "ERL_EPMD_ADDRESS=127.0.0.1"
}

start_owned_rabbitmq() {
    local dir="$1"
    # shellcheck disable=SC2046 # word splitting of the NAME=value list is intended
    env $(mq_env "$dir") rabbitmq-server -detached
    wait_for "RabbitMQ" mq_answers
}

start_rabbitmq() {
    if mq_answers; then
        say "RabbitMQ answers at $MQ_HOST:$MQ_PORT; using it"
        return
    fi
    is_loopback "$MQ_HOST" || die "RabbitMQ at $MQ_HOST:$MQ_PORT (AMQP_URL) does not answer; \
only a local one can be started here"
    need_root "RabbitMQ at $MQ_HOST:$MQ_PORT"
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        apt_install rabbitmq-server
    fi
    if mq_answers; then
        say "RabbitMQ answers at $MQ_HOST:$MQ_PORT after installation; using it"
        return
    fi
    mkdir -p "$STATE_DIR"
    local dir
    dir="$(mktemp -d "$STATE_DIR/rabbitmq.XXXXXX")"
    mkdir -p "$dir/mnesia" "$dir/log"
    echo "[]." >"$dir/enabled_plugins"
    echo "listeners.tcp.1 = 127.0.0.1:$MQ_PORT" >"$dir/rabbitmq.conf"
    chown -R rabbitmq:rabbitmq "$dir"
    chmod 755 "$STATE_DIR"
    state_set rabbitmq_dir "$dir"
    state_set rabbitmq_node "homeostat$$@localhost"
    say "starting a throwaway RabbitMQ in $dir"
    start_owned_rabbitmq "$dir"
    say "RabbitMQ started at 127.0.0.1:$MQ_PORT (guest/guest)"
}

stop_postgres() {
    local dir bin
    dir="$(state_get postgres_dir)"
    bin="$(state_get postgres_bin)"
    [[ -n "$dir" ]] || return 0
    say "stopping the PostgreSQL started in $dir"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    state_del postgres_dir
    state_del postgres_bin
}

stop_rabbitmq() {
    local dir node
    dir="$(state_get rabbitmq_dir)"
    node="$(state_get rabbitmq_node)"
    [[ -n "$dir" ]] || return 0
    say "stopping the RabbitMQ node $node"
    # shellcheck disable=SC2046
    env $(mq_env "$dir") rabbitmqctl -n "$node" shutdown >/dev/null 2>&1 || true
    rm -rf "$dir"
    state_del rabbitmq_dir
    state_del rabbitmq_node
}

restart_postgres() {
    local dir bin
    dir="$(state_get postgres_dir)"
    bin="$(state_get postgres_bin)"
    if [[ -n "$dir" ]]; then
        say "restarting the PostgreSQL started in $dir"
        as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w \
            -t "$WAIT_SECS" -o "$(pg_ctl_opts "$dir")" restart >/dev/null
    elif command -v pg_lsclusters >/dev/null 2>&1; then
        # A Debian cluster: find the one on our port.
        local version cluster
        read -r version cluster < <(pg_lsclusters --no-header |
            awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }') || true
        [[ -n "${version:-}" ]] || die "no PostgreSQL cluster on port $PG_PORT (pg_lsclusters)"
        say "restarting PostgreSQL cluster $version/$cluster"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" restart -m fast
    else
        die "PostgreSQL was not started by this script and is not a pg_ctlcluster cluster; \
restart it yourself"
    fi
    wait_for "PostgreSQL" pg_answers
    say "PostgreSQL is back at $PG_HOST:$PG_PORT"
}

restart_rabbitmq() {
    local dir node
    dir="$(state_get rabbitmq_dir)"
    node="$(state_get rabbitmq_node)"
    if [[ -n "$dir" ]]; then
        say "restarting the RabbitMQ node $node"
        # shellcheck disable=SC2046
        env $(mq_env "$dir") rabbitmqctl -n "$node" shutdown >/dev/null
        start_owned_rabbitmq "$dir"
    else
        command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found; restart RabbitMQ yourself"
        say "restarting the local RabbitMQ node"
        # `shutdown` is `stop` that also waits for the node's process to exit.
        rabbitmqctl shutdown >/dev/null
        rabbitmq-server -detached
        wait_for "RabbitMQ" mq_answers
    fi
    say "RabbitMQ is back at $MQ_HOST:$MQ_PORT"
}

status() {
    if pg_answers; then say "PostgreSQL answers at $PG_HOST:$PG_PORT"; else say "PostgreSQL: no answer at $PG_HOST:$PG_PORT"; fi
    if mq_answers; then say "RabbitMQ answers at $MQ_HOST:$MQ_PORT"; else say "RabbitMQ: no answer at $MQ_HOST:$MQ_PORT"; fi
    if [[ -s "$STATE_FILE" ]]; then
        say "started by this script:"
        sed 's/^/  /' "$STATE_FILE"
    else
        say "nothing started by this script"
    fi
}

case "${1:-}" in
start)
    start_postgres
    start_rabbitmq
    ;;
stop)
    stop_postgres
    stop_rabbitmq
    [[ -f "$STATE_FILE" && ! -s "$STATE_FILE" ]] && rm -f "$STATE_FILE"
    say "stopped what start started (if anything)"
    ;;
status) status ;;
restart-postgres) restart_postgres ;;
restart-rabbitmq) restart_rabbitmq ;;
*)
    echo "usage: $0 start|stop|status|restart-postgres|restart-rabbitmq" >&2
    exit 64
    ;;
esac
