#!/usr/bin/env bash
# Prepare everything the benchmarks compare against, on 127.0.0.1 only, and idempotently:
# running it twice reuses what the first run started. Writes benchmarks/.work/env (ports and
# paths) which benchmarks/run and the Python benchmarks read.
#
# Why a private PostgreSQL cluster and private redis/memcached processes: the benchmark must not
# depend on (or disturb) system services, and every backend must run on the same machine in the
# same run, so the ratios compare like with like.
#
# A server that cannot be installed or started is not fatal: its backend is reported as "missing"
# by the benchmarks, never silently dropped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK="$ROOT/benchmarks/.work"
mkdir -p "$WORK"
ENV_FILE="$WORK/env"
log() { echo "[setup] $*"; }

# ---------------------------------------------------------------------------------------------
# Debian packages (only when missing: apt-get is slow and needs the network).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v memcached >/dev/null || need+=(memcached)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        log "apt-get install ${need[*]}"
        apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (offline?)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need[@]}" >/dev/null 2>&1 || log "apt-get install failed: ${need[*]}"
    else
        log "not root: cannot install ${need[*]}; those backends will be reported missing"
    fi
fi
# Debian's packages start system-wide services on install; we use our own processes instead.
for svc in redis-server memcached; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" >/dev/null 2>&1 || true
    fi
done

# ---------------------------------------------------------------------------------------------
# Helpers.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {  # pick_port NAME DEFAULT: reuse the port from a previous run, else a free one
    local name=$1 port=$2
    if [ -f "$ENV_FILE" ]; then
        local prev
        prev=$(sed -n "s/^${name}=//p" "$ENV_FILE")
        [ -n "$prev" ] && port=$prev
    fi
    while ! port_free "$port" && ! alive_on "$name" "$port"; do port=$((port + 1)); done
    echo "$port"
}
alive_on() {  # our own server (pid file alive) already listens there
    local name=$1
    local pidfile="$WORK/${name,,}.pid"
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}
wait_port() {  # wait_port PORT: up to 10 s for a listener
    for _ in $(seq 100); do
        port_free "$1" || return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# Redis.
REDIS_PORT=$(pick_port REDIS_PORT 16379)
REDIS_OK=0
if command -v redis-server >/dev/null; then
    if alive_on REDIS_PORT; then
        REDIS_OK=1
    else
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
            --daemonize yes --pidfile "$WORK/redis_port.pid" --dir "$WORK" \
            --logfile "$WORK/redis.log" >/dev/null 2>&1
        wait_port "$REDIS_PORT" && REDIS_OK=1
    fi
fi
log "redis on 127.0.0.1:$REDIS_PORT ok=$REDIS_OK"

# ---------------------------------------------------------------------------------------------
# Memcached (-u root is required when running as root; 256 MiB so 4 KB sessions are not evicted).
MEMCACHED_PORT=$(pick_port MEMCACHED_PORT 11311)
MEMCACHED_OK=0
if command -v memcached >/dev/null; then
    if alive_on MEMCACHED_PORT; then
        MEMCACHED_OK=1
    else
        user_opt=()
        [ "$(id -u)" = 0 ] && user_opt=(-u root)
        memcached -d -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 -m 256 "${user_opt[@]}" \
            -P "$WORK/memcached_port.pid" >/dev/null 2>&1
        wait_port "$MEMCACHED_PORT" && MEMCACHED_OK=1
    fi
fi
log "memcached on 127.0.0.1:$MEMCACHED_PORT ok=$MEMCACHED_OK"

# ---------------------------------------------------------------------------------------------
# PostgreSQL: a private cluster in benchmarks/.work/pg, TCP on 127.0.0.1 only, trust auth (it is
# reachable only from this machine and holds nothing but benchmark sessions).
PG_PORT=$(pick_port PG_PORT 15432)
PG_OK=0
PGBIN=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && PGBIN=$d; done
[ -z "$PGBIN" ] && command -v initdb >/dev/null && PGBIN=$(dirname "$(command -v initdb)")
as_pg() {  # PostgreSQL refuses to run as root
    if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
if [ -n "$PGBIN" ]; then
    PGDATA="$WORK/pg"
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        mkdir -p "$PGDATA"
        [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA"
        chmod 700 "$PGDATA"
        as_pg "'$PGBIN/initdb' -D '$PGDATA' -U postgres --auth=trust -E UTF8" \
            >"$WORK/initdb.log" 2>&1 || log "initdb failed: see $WORK/initdb.log"
    fi
    if [ -f "$PGDATA/PG_VERSION" ]; then
        if ! as_pg "'$PGBIN/pg_ctl' -D '$PGDATA' status >/dev/null 2>&1"; then
            as_pg "'$PGBIN/pg_ctl' -D '$PGDATA' -l '$PGDATA/server.log' -w start \
                -o \"-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''\"" \
                >/dev/null 2>&1 || log "pg_ctl start failed: see $PGDATA/server.log"
        else
            PG_PORT=$(sed -n '4p' "$PGDATA/postmaster.pid")
        fi
        if wait_port "$PG_PORT"; then
            as_pg "'$PGBIN/psql' -h 127.0.0.1 -p $PG_PORT -U postgres -tAc \
                \"SELECT 1 FROM pg_database WHERE datname='bench'\"" 2>/dev/null | grep -q 1 \
                || as_pg "'$PGBIN/createdb' -h 127.0.0.1 -p $PG_PORT -U postgres bench" \
                    >/dev/null 2>&1
            PG_OK=1
        fi
    fi
fi
log "postgresql on 127.0.0.1:$PG_PORT ok=$PG_OK"

# ---------------------------------------------------------------------------------------------
# Python environment: a venv of its own (so installing the [bench] extra never disturbs the
# team's .venv), with this checkout installed editable.
VENV="$WORK/venv"
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import django_shmsession, gunicorn, redis, pymemcache, diskcache, \
psycopg" >/dev/null 2>&1 || [ pyproject.toml -nt "$VENV/.installed" ]; then
    log "pip install -e '.[bench]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[bench]" \
        && touch "$VENV/.installed"
fi

cat >"$ENV_FILE" <<EOF
REDIS_PORT=$REDIS_PORT
REDIS_OK=$REDIS_OK
MEMCACHED_PORT=$MEMCACHED_PORT
MEMCACHED_OK=$MEMCACHED_OK
PG_PORT=$PG_PORT
PG_OK=$PG_OK
BENCH_PYTHON=$VENV/bin/python
WRK=$(command -v wrk || true)
EOF
log "wrote $ENV_FILE"
