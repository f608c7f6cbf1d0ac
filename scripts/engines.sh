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
# Replicated engines on loopback (root; installs rabbitmq-server, postgresql-15-auto-failover and
# pg-auto-failover-cli when missing), all under $HOMEOSTAT_CLUSTER_DIR (default
# /tmp/homeostat-cluster), beside (never touching) the engines above:
#
#   scripts/engines.sh cluster start      a 3-node RabbitMQ cluster (AMQP ports 5681-5683) and a
#                                         pg_auto_failover formation: monitor on 6000, primary and
#                                         synchronous standby on 6001/6002
#   scripts/engines.sh cluster stop       stop all of it and delete its data
#   scripts/engines.sh cluster status     the nodes, and which PostgreSQL node is the primary
#   scripts/engines.sh cluster urls       DATABASE_URL=… and AMQP_URL=… lines naming every node
#   scripts/engines.sh cluster kill-rabbitmq N       SIGKILL RabbitMQ node N (1-3)
#   scripts/engines.sh cluster kill-postgres-primary SIGKILL the primary PostgreSQL node (its
#                                         pg_autoctl keeper and its postgres): the monitor
#                                         promotes the standby
#   scripts/engines.sh cluster heal       restart every killed node, wait until all 3 RabbitMQ
#                                         nodes run and PostgreSQL has a primary and a standby
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

# Does the RabbitMQ at MQ_HOST:MQ_PORT answer the AMQP handshake (Connection.Start, a method
# frame, after the protocol header)? A node out of file handles accepts TCP and never answers.
mq_handshakes() {
    local first
    first="$(timeout 5 bash -c "exec 3<>/dev/tcp/$MQ_HOST/$MQ_PORT
        printf 'AMQP\\x00\\x00\\x09\\x01' >&3
        head -c 1 <&3 | od -An -tx1" 2>/dev/null)" || return 1
    [[ "${first// /}" == 01 ]]
}

# Queue names the tests and `loadtest bench` give their organisms (an extended regex).
TEST_QUEUES='^homeostat(_test_|_failover_|[.](e2e|polite|cap|stable|upgrade|bench|api-test)[.])'

# Delete the queues earlier test and benchmark runs left on the local broker (their names, no
# consumer): every quorum queue holds file handles on the broker, and a broker out of them stops
# accepting connections. The tests delete their own queues; these are from runs that failed or
# were killed. Needs rabbitmqctl (root); does nothing otherwise.
tidy_rabbitmq() {
    is_loopback "$MQ_HOST" || return 0
    [[ "$(id -u)" == 0 ]] && command -v rabbitmqctl >/dev/null 2>&1 || return 0
    # A throwaway broker this script started is deleted whole by `stop`.
    [[ -z "$(state_get rabbitmq_node)" ]] || return 0
    local names
    names="$(timeout 60 rabbitmqctl -q list_queues name consumers 2>/dev/null |
        awk -v pat="$TEST_QUEUES" '$2 == "0" && $1 ~ pat { print $1 }')" || return 0
    [[ -n "$names" ]] || return 0
    say "deleting $(wc -l <<<"$names") queues left on RabbitMQ by earlier test runs"
    xargs -P 4 -I{} timeout 30 rabbitmqctl -q delete_queue {} <<<"$names" >/dev/null 2>&1 || true
}

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
        tidy_rabbitmq
        if ! mq_handshakes; then
            is_loopback "$MQ_HOST" && [[ "$(id -u)" == 0 ]] || die "RabbitMQ at \
$MQ_HOST:$MQ_PORT accepts connections but does not answer the AMQP handshake (out of file \
handles? \`rabbitmq-diagnostics status\` shows them); restart it"
            say "RabbitMQ at $MQ_HOST:$MQ_PORT accepts connections but does not answer the \
AMQP handshake; restarting it"
            restart_rabbitmq
        fi
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
    wait_for "RabbitMQ's AMQP handshake" mq_handshakes
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


# ---------------------------------------------------------------------------------------------
# Replicated engines (`cluster ...`).

CLUSTER_DIR="${HOMEOSTAT_CLUSTER_DIR:-/tmp/homeostat-cluster}"
CLUSTER_MQ_PORTS=(5681 5682 5683)
CLUSTER_PG_MONITOR_PORT=6000
CLUSTER_PG_PORTS=(6001 6002)
CLUSTER_PG_DB=test

mq_node() { echo "homeostat-c$1@localhost"; }

# The environment of RabbitMQ cluster node $1 (its own name, ports and directories).
cmq_env() {
    local n="$1" dir="$CLUSTER_DIR/rabbitmq$1" port="${CLUSTER_MQ_PORTS[$(($1 - 1))]}"
    echo "RABBITMQ_NODENAME=$(mq_node "$n")" \
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" \
        "RABBITMQ_NODE_PORT=$port" \
        "RABBITMQ_DIST_PORT=$((port + 20000))" \
        "RABBITMQ_MNESIA_BASE=$dir/mnesia" \
        "RABBITMQ_LOG_BASE=$dir/log" \
        "RABBITMQ_PID_FILE=$dir/rabbitmq.pid" \
        "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins" \
        "RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf" \
        "ERL_EPMD_ADDRESS=127.0.0.1"
}

cmq() {
    local n="$1"
    shift
    # shellcheck disable=SC2046 # word splitting of the NAME=value list is intended
    env $(cmq_env "$n") "$@"
}

cmq_answers() { answers 127.0.0.1 "${CLUSTER_MQ_PORTS[$(($1 - 1))]}"; }

cmq_start_node() {
    local n="$1" dir="$CLUSTER_DIR/rabbitmq$1"
    if cmq_answers "$n"; then return; fi
    if [[ ! -d "$dir" ]]; then
        mkdir -p "$dir/mnesia" "$dir/log"
        echo "[]." >"$dir/enabled_plugins"
        {
            echo "listeners.tcp.1 = 127.0.0.1:${CLUSTER_MQ_PORTS[$((n - 1))]}"
            echo "loopback_users = none"
        } >"$dir/rabbitmq.conf"
        chown -R rabbitmq:rabbitmq "$dir"
    fi
    # The server's Erlang VM spins idle schedulers by default: not on a shared 2-core machine.
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none" \
        cmq "$n" rabbitmq-server -detached
}

cmq_wait_node() {
    local n="$1" deadline=$((SECONDS + WAIT_SECS))
    until cmq_answers "$n" && cmq "$n" rabbitmqctl -q -n "$(mq_node "$n")" await_startup \
        >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "RabbitMQ node $n did not start; see $CLUSTER_DIR/rabbitmq$n/log"
        sleep 0.5
    done
}

cmq_pid() {
    local f="$CLUSTER_DIR/rabbitmq$1/rabbitmq.pid"
    [[ -s "$f" ]] && cat "$f"
}

# Run a command as the postgres user with pg_autoctl's files under the cluster directory.
cpg() {
    runuser -u postgres -- env XDG_CONFIG_HOME="$CLUSTER_DIR/pg/config" \
        XDG_DATA_HOME="$CLUSTER_DIR/pg/share" PATH="$(pg_bindir):$PATH" "$@"
}

cpg_monitor_sql() {
    cpg psql -X -q -At -h 127.0.0.1 -p "$CLUSTER_PG_MONITOR_PORT" -U autoctl_node \
        -d pg_auto_failover -c "$1"
}

# Start `pg_autoctl` for one node (or the monitor) in its own process group, in the background.
cpg_run() {
    local name="$1"
    shift
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$CLUSTER_DIR/pg/$name.pgid" \
        runuser -u postgres -- env XDG_CONFIG_HOME="$CLUSTER_DIR/pg/config" \
        XDG_DATA_HOME="$CLUSTER_DIR/pg/share" PATH="$(pg_bindir):$PATH" "$@" \
        >>"$CLUSTER_DIR/pg/$name.log" 2>&1 </dev/null &
}

cpg_node_port() { echo "${CLUSTER_PG_PORTS[$(($1 - 1))]}"; }

cpg_start_node() {
    local n="$1" port
    port="$(cpg_node_port "$n")"
    if [[ -f "$CLUSTER_DIR/pg/node$n/PG_VERSION" ]]; then
        cpg_run "node$n" pg_autoctl run --pgdata "$CLUSTER_DIR/pg/node$n"
    else
        cpg_run "node$n" pg_autoctl create postgres --pgdata "$CLUSTER_DIR/pg/node$n" \
            --pgport "$port" --listen 127.0.0.1 --hostname 127.0.0.1 --name "node$n" \
            --dbname "$CLUSTER_PG_DB" --auth trust --no-ssl --pgctl "$(pg_bindir)/pg_ctl" \
            --monitor "postgres://autoctl_node@127.0.0.1:$CLUSTER_PG_MONITOR_PORT/pg_auto_failover?sslmode=disable" \
            --run
    fi
}

# The formation's nodes, one "name port reportedstate goalstate" line each.
cpg_states() {
    cpg_monitor_sql "SELECT nodename, nodeport, reportedstate, goalstate FROM pgautofailover.node \
        ORDER BY nodeid" 2>/dev/null | tr '|' ' '
}

cpg_primary() {
    cpg_states | awk '$3 == "primary" && $4 == "primary" || $3 == "wait_primary" && $4 == "wait_primary" || $3 == "single" && $4 == "single" { print $1; exit }'
}

# Wait until the formation is a primary and a streaming standby.
cpg_wait_healthy() {
    local deadline=$((SECONDS + ${1:-$WAIT_SECS}))
    until [[ "$(cpg_states | awk '$3 == $4 && ($3 == "primary" || $3 == "secondary") { n++ } END { print n + 0 }')" == 2 ]]; do
        ((SECONDS < deadline)) || die "PostgreSQL formation not healthy: $(cpg_states | tr '\n' ';'); see $CLUSTER_DIR/pg/*.log"
        # A new standby's pg_basebackup waits for a checkpoint, spread over minutes by
        # default: ask the primary for an immediate one.
        cpg_checkpoint_primary
        sleep 1
    done
}

cpg_checkpoint_primary() {
    local name
    name="$(cpg_states | awk '$3 == "wait_primary" || $3 == "primary" || $3 == "single" { print $2; exit }')"
    [[ -n "$name" ]] || return 0
    cpg psql -X -q -h /var/run/postgresql -p "$name" -d postgres -c CHECKPOINT >/dev/null 2>&1 || true
}

cpg_node_answers() { pg_isready -q -h 127.0.0.1 -p "$(cpg_node_port "$1")" -t 1; }

cluster_start() {
    need_root "the replicated engines"
    command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
    local bin
    bin="$(pg_bindir)"
    [[ -n "$bin" ]] || { apt_install postgresql; bin="$(pg_bindir)"; }
    local major
    major="$(basename "$(dirname "$bin")")"
    if ! command -v pg_autoctl >/dev/null 2>&1 ||
        [[ ! -f "/usr/share/postgresql/$major/extension/pgautofailover.control" ]]; then
        apt_install "postgresql-$major-auto-failover" pg-auto-failover-cli
    fi
    mkdir -p "$CLUSTER_DIR/pg/config" "$CLUSTER_DIR/pg/share"
    chmod 755 "$CLUSTER_DIR"
    chown -R postgres:postgres "$CLUSTER_DIR/pg"

    # RabbitMQ: three nodes started together, then 2 and 3 join 1.
    local n
    for n in 1 2 3; do cmq_start_node "$n"; done
    for n in 1 2 3; do cmq_wait_node "$n"; done
    for n in 2 3; do
        if ! cmq "$n" rabbitmqctl -q -n "$(mq_node "$n")" cluster_status 2>/dev/null |
            grep -q "$(mq_node 1)"; then
            cmq "$n" rabbitmqctl -q -n "$(mq_node "$n")" stop_app
            cmq "$n" rabbitmqctl -q -n "$(mq_node "$n")" join_cluster "$(mq_node 1)"
            cmq "$n" rabbitmqctl -q -n "$(mq_node "$n")" start_app
        fi
    done
    say "RabbitMQ cluster: $(mq_node 1), $(mq_node 2), $(mq_node 3) on 127.0.0.1:${CLUSTER_MQ_PORTS[*]}"

    # PostgreSQL: the monitor, then the first node (primary), then the second (standby).
    if ! pg_isready -q -h 127.0.0.1 -p "$CLUSTER_PG_MONITOR_PORT" -t 1; then
        if [[ -f "$CLUSTER_DIR/pg/monitor/PG_VERSION" ]]; then
            cpg_run monitor pg_autoctl run --pgdata "$CLUSTER_DIR/pg/monitor"
        else
            cpg_run monitor pg_autoctl create monitor --pgdata "$CLUSTER_DIR/pg/monitor" \
                --pgport "$CLUSTER_PG_MONITOR_PORT" --hostname 127.0.0.1 --auth trust --no-ssl \
                --pgctl "$bin/pg_ctl" --run
        fi
    fi
    local deadline=$((SECONDS + WAIT_SECS))
    until cpg_monitor_sql "SELECT 1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "pg_auto_failover monitor did not start; see $CLUSTER_DIR/pg/monitor.log"
        sleep 0.5
    done
    # Fail over in seconds, not the default tens of seconds (a node is lost after ~2 s of
    # failed health checks; a primary that stopped reporting is not waited for long).
    local setting
    for setting in health_check_period=1000 health_check_timeout=1000 \
        health_check_max_retries=1 health_check_retry_delay=500 \
        node_considered_unhealthy_timeout=2000 primary_demote_timeout=3000; do
        cpg psql -X -q -h /var/run/postgresql -p "$CLUSTER_PG_MONITOR_PORT" -d pg_auto_failover \
            -c "ALTER SYSTEM SET pgautofailover.${setting%=*} = ${setting#*=}" >/dev/null
    done
    cpg psql -X -q -h /var/run/postgresql -p "$CLUSTER_PG_MONITOR_PORT" -d pg_auto_failover \
        -c "SELECT pg_reload_conf()" >/dev/null
    for n in 1 2; do
        if ! cpg_node_answers "$n"; then cpg_start_node "$n"; fi
        deadline=$((SECONDS + WAIT_SECS))
        until cpg_states | grep -q "^node$n "; do
            ((SECONDS < deadline)) || die "PostgreSQL node $n did not register; see $CLUSTER_DIR/pg/node$n.log"
            sleep 0.5
        done
        if [[ "$n" == 1 ]]; then
            deadline=$((SECONDS + WAIT_SECS))
            until cpg_states | awk '$1 == "node1" && ($3 == "single" || $3 ~ /primary$/) { ok = 1 } END { exit !ok }'; do
                ((SECONDS < deadline)) || die "PostgreSQL node 1 did not start; see $CLUSTER_DIR/pg/node1.log"
                sleep 0.5
            done
        fi
    done
    cpg_wait_healthy
    say "PostgreSQL formation: $(cpg_states | tr '\n' ';')"
    cluster_urls
}

cluster_urls() {
    local hosts="" urls="" port
    for port in "${CLUSTER_PG_PORTS[@]}"; do hosts="${hosts:+$hosts,}127.0.0.1:$port"; done
    for port in "${CLUSTER_MQ_PORTS[@]}"; do
        urls="${urls:+$urls,}amqp://guest:guest@127.0.0.1:$port/%2f"
    done
    echo "DATABASE_URL=postgres://postgres@$hosts/$CLUSTER_PG_DB?target_session_attrs=read-write"
    echo "AMQP_URL=$urls"
}

# SIGKILL a process group recorded in a .pgid file, and a postmaster recorded in a data dir.
kill_group() {
    local pgid_file="$1" pgdata="${2:-}" pgid pm
    if [[ -s "$pgid_file" ]]; then
        pgid="$(cat "$pgid_file")"
        kill -KILL -- "-$pgid" 2>/dev/null || true
        rm -f "$pgid_file"
    fi
    if [[ -n "$pgdata" && -s "$pgdata/postmaster.pid" ]]; then
        pm="$(head -n 1 "$pgdata/postmaster.pid")"
        if [[ -n "$pm" ]] && kill -0 "$pm" 2>/dev/null; then
            local children
            children="$(ps -o pid= --ppid "$pm" || true)"
            kill -KILL "$pm" $children 2>/dev/null || true
        fi
    fi
}

cluster_kill_rabbitmq() {
    local n="${1:-}" pid
    [[ "$n" =~ ^[123]$ ]] || die "kill-rabbitmq needs a node number 1-3"
    pid="$(cmq_pid "$n")" || die "RabbitMQ node $n has no pid file"
    kill -KILL "$pid" 2>/dev/null || die "RabbitMQ node $n (pid $pid) is not running"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    say "killed RabbitMQ node $n ($(mq_node "$n"), pid $pid)"
}

cluster_kill_postgres_primary() {
    local name
    name="$(cpg_primary)"
    [[ -n "$name" ]] || die "no PostgreSQL primary to kill: $(cpg_states | tr '\n' ';')"
    kill_group "$CLUSTER_DIR/pg/$name.pgid" "$CLUSTER_DIR/pg/$name"
    say "killed PostgreSQL primary $name"
}

cluster_heal() {
    local n
    for n in 1 2 3; do
        if ! cmq_answers "$n"; then
            say "restarting RabbitMQ node $n"
            cmq_start_node "$n"
        fi
    done
    for n in 1 2 3; do cmq_wait_node "$n"; done
    for n in 1 2; do
        if [[ ! -s "$CLUSTER_DIR/pg/node$n.pgid" ]] ||
            ! kill -0 "$(cat "$CLUSTER_DIR/pg/node$n.pgid")" 2>/dev/null; then
            say "restarting PostgreSQL node $n"
            kill_group "$CLUSTER_DIR/pg/node$n.pgid" "$CLUSTER_DIR/pg/node$n"
            cpg_start_node "$n"
        fi
    done
    cpg_wait_healthy 180
    say "healed: PostgreSQL $(cpg_states | tr '\n' ';')"
}

cluster_stop() {
    local n pid
    for n in 1 2; do kill_group "$CLUSTER_DIR/pg/node$n.pgid" "$CLUSTER_DIR/pg/node$n"; done
    kill_group "$CLUSTER_DIR/pg/monitor.pgid" "$CLUSTER_DIR/pg/monitor"
    for n in 1 2 3; do
        pid="$(cmq_pid "$n" || true)"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # The Erlang port mappers and helpers of the killed nodes exit with them; wait for them.
    for n in 1 2 3; do
        pid="$(cmq_pid "$n" || true)"
        while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    rm -rf "$CLUSTER_DIR"
    say "replicated engines stopped and deleted"
}

cluster_status() {
    local n
    for n in 1 2 3; do
        if cmq_answers "$n"; then say "RabbitMQ node $n: answers on ${CLUSTER_MQ_PORTS[$((n - 1))]}"; else say "RabbitMQ node $n: down"; fi
    done
    say "PostgreSQL formation (name port reported goal):"
    cpg_states | sed 's/^/  /'
}

cluster() {
    case "${1:-}" in
    start) cluster_start ;;
    stop) cluster_stop ;;
    status) cluster_status ;;
    urls) cluster_urls ;;
    kill-rabbitmq) cluster_kill_rabbitmq "${2:-}" ;;
    kill-postgres-primary) cluster_kill_postgres_primary ;;
    heal) cluster_heal ;;
    *)
        echo "usage: $0 cluster start|stop|status|urls|kill-rabbitmq N|kill-postgres-primary|heal" >&2
        exit 64
        ;;
    esac
}

case "${1:-}" in
cluster)
    shift
    cluster "$@"
    ;;
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
    echo "usage: $0 start|stop|status|restart-postgres|restart-rabbitmq|cluster …" >&2
    exit 64
    ;;
esac
