#!/usr/bin/env bash
# The local AICert orchestration stack: a Prefect server on loopback, the `aicert` process
# work pool, a worker, and the deployments (certify-training, verify-and-promote,
# certify-evaluation).
#
#   bash deployments/stack.sh up [--postgres] [--limit N] [--port P] [--deployments python|yaml]
#   bash deployments/stack.sh down
#   bash deployments/stack.sh env       # prints `export PREFECT_API_URL=...` for your shell
#   bash deployments/stack.sh status
#
# State lives under $AICERT_HOME (default ~/.aicert): the server's PREFECT_HOME (its SQLite
# database and result storage) in prefect/, pid files and logs in stack/, and, with
# --postgres, a PostgreSQL cluster in $AICERT_PG_DIR (default $AICERT_HOME/postgres).
# Every wait is bounded ($AICERT_STACK_TIMEOUT seconds, default 120).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AICERT_HOME="${AICERT_HOME:-$HOME/.aicert}"
PYTHON="${AICERT_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
STATE="$AICERT_HOME/stack"
PREFECT_DIR="$AICERT_HOME/prefect"
PG_DIR="${AICERT_PG_DIR:-$AICERT_HOME/postgres}"
POOL="${AICERT_WORK_POOL:-aicert}"
TIMEOUT="${AICERT_STACK_TIMEOUT:-120}"
# How often the worker asks for new flow runs: the bulk of the event-to-start latency.
POLL_SECONDS="${AICERT_WORKER_POLL_SECONDS:-2}"

log() { printf '\033[1m[stack]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1m[stack]\033[0m error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Stop a process group started with setsid (its pid is the group id): SIGTERM, then SIGKILL.
stop_group() {
  local name="$1" pidfile="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if alive "$pid"; then
    log "stopping the $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 $((TIMEOUT * 5))); do
      alive "$pid" || break
      sleep 0.2
    done
    if alive "$pid"; then
      log "the $name did not stop in ${TIMEOUT}s: killing it"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  # The group may outlive its leader (uvicorn under `prefect server start`).
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# -- PostgreSQL (Debian's postgresql package) ---------------------------------------------

pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  die "PostgreSQL is not installed (apt-get install postgresql)"
}

# PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_up() {
  local bin port password
  bin="$(pg_bindir)"
  mkdir -p "$PG_DIR"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$PG_DIR"
    chmod 0700 "$PG_DIR"
    as_pg test -w "$PG_DIR" ||
      die "the postgres user cannot reach $PG_DIR (a parent folder is private): set AICERT_PG_DIR"
  fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "creating a PostgreSQL cluster in $PG_DIR/data"
    password="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(24))')"
    (umask 077 && printf '%s\n' "$password" >"$STATE/pg-password")
    (umask 077 && printf '%s\n' "$password" >"$PG_DIR/pwfile")
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PG_DIR/pwfile"
    as_pg "$bin/initdb" -D "$PG_DIR/data" -U prefect --pwfile="$PG_DIR/pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --locale=C >"$STATE/initdb.log" 2>&1 ||
      { rm -f "$PG_DIR/pwfile"; cat "$STATE/initdb.log" >&2; die "initdb failed"; }
    rm -f "$PG_DIR/pwfile"
    # Loopback TCP only: no Unix socket in a shared folder.
    printf '%s\n' "listen_addresses = '127.0.0.1'" "unix_socket_directories = ''" |
      as_pg tee -a "$PG_DIR/data/postgresql.conf" >/dev/null
  fi
  [ -f "$STATE/pg-password" ] || die "$STATE/pg-password is missing: remove $PG_DIR to start afresh"
  password="$(cat "$STATE/pg-password")"
  port="$(free_port)"
  log "starting PostgreSQL on 127.0.0.1:$port"
  as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -o "-p $port" \
    -w -t "$TIMEOUT" start >/dev/null || { as_pg cat "$PG_DIR/postgres.log" >&2 || true; die "PostgreSQL did not start"; }
  echo "$port" >"$STATE/pg-port"
  if ! PGPASSWORD="$password" "$bin/psql" -h 127.0.0.1 -p "$port" -U prefect -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
    PGPASSWORD="$password" "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
  fi
  DATABASE_URL="postgresql+asyncpg://prefect:$password@127.0.0.1:$port/prefect"
}

pg_down() {
  [ -f "$STATE/pg-port" ] || return 0
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    log "stopping PostgreSQL"
    as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DIR/data" -m fast -w -t "$TIMEOUT" stop >/dev/null || true
  fi
  rm -f "$STATE/pg-port"
}

# -- the stack --------------------------------------------------------------------------------

wait_healthy() {
  local url="$1" pid="$2" deadline=$((SECONDS + TIMEOUT))
  until curl -fs -o /dev/null --max-time 2 "$url/health"; do
    alive "$pid" || { tail -n 40 "$STATE/server.log" >&2; die "the Prefect server exited"; }
    [ "$SECONDS" -lt "$deadline" ] || die "the Prefect server was not healthy after ${TIMEOUT}s"
    sleep 0.5
  done
}

wait_worker() {
  local pid="$1" deadline=$((SECONDS + TIMEOUT))
  until grep -q "started!" "$STATE/worker.log" 2>/dev/null; do
    alive "$pid" || { tail -n 40 "$STATE/worker.log" >&2; die "the worker exited"; }
    [ "$SECONDS" -lt "$deadline" ] || die "the worker did not start in ${TIMEOUT}s"
    sleep 0.5
  done
}

up() {
  local postgres=0 limit=4 port="${AICERT_PREFECT_PORT:-4200}" deployments=python
  while [ $# -gt 0 ]; do
    case "$1" in
      --postgres) postgres=1 ;;
      --limit) limit="${2:?--limit needs a number}"; shift ;;
      --port) port="${2:?--port needs a number}"; shift ;;
      --deployments) deployments="${2:?--deployments needs python or yaml}"; shift ;;
      *) usage ;;
    esac
    shift
  done
  [[ "$limit" =~ ^[1-9][0-9]*$ ]] || die "--limit must be a positive number"
  [[ "$deployments" =~ ^(python|yaml)$ ]] || die "--deployments must be python or yaml"
  mkdir -p "$STATE" "$PREFECT_DIR"
  if [ -f "$STATE/server.pid" ] && alive "$(cat "$STATE/server.pid")"; then
    die "the stack is already up (see 'stack.sh status'); run 'stack.sh down' first"
  fi

  # A failed `up` takes down what it started, so that the next `up` starts clean.
  trap 'rc=$?; trap - EXIT; if [ "$rc" -ne 0 ]; then log "up failed: stopping what it started"; down || true; fi; exit "$rc"' EXIT
  DATABASE_URL=""
  if [ "$postgres" -eq 1 ]; then pg_up; fi

  local api="http://127.0.0.1:$port/api"
  log "starting the Prefect server on $api (PREFECT_HOME=$PREFECT_DIR)"
  (
    unset PREFECT_API_URL
    export PREFECT_HOME="$PREFECT_DIR" PREFECT_SERVER_ANALYTICS_ENABLED=false
    export PREFECT_UI_API_URL="$api"
    [ -n "$DATABASE_URL" ] && export PREFECT_API_DATABASE_CONNECTION_URL="$DATABASE_URL"
    exec setsid "$PYTHON" -m prefect server start --host 127.0.0.1 --port "$port" \
      </dev/null >"$STATE/server.log" 2>&1
  ) &
  echo $! >"$STATE/server.pid"
  wait_healthy "$api" "$(cat "$STATE/server.pid")"

  export PREFECT_API_URL="$api" PREFECT_HOME="$PREFECT_DIR" PREFECT_SERVER_ANALYTICS_ENABLED=false
  {
    echo "export PREFECT_API_URL=$api"
    echo "export PREFECT_HOME=$PREFECT_DIR"
    echo "export AICERT_HOME=$AICERT_HOME"
  } >"$STATE/env"
  if [ -n "$DATABASE_URL" ]; then echo postgres >"$STATE/backend"; else echo sqlite >"$STATE/backend"; fi

  log "creating the process work pool '$POOL'"
  "$PYTHON" -m prefect --no-prompt work-pool inspect "$POOL" >/dev/null 2>&1 ||
    "$PYTHON" -m prefect --no-prompt work-pool create "$POOL" --type process >/dev/null

  log "starting a worker (limit $limit, polling every ${POLL_SECONDS}s)"
  (
    export PREFECT_WORKER_QUERY_SECONDS="$POLL_SECONDS"
    exec setsid "$PYTHON" -m prefect --no-prompt worker start --pool "$POOL" --type process \
      --limit "$limit" --name "aicert-worker-$port" --install-policy never \
      </dev/null >"$STATE/worker.log" 2>&1
  ) &
  echo $! >"$STATE/worker.pid"

  log "applying the deployments ($deployments)"
  if [ "$deployments" = yaml ]; then
    (cd "$ROOT" && "$PYTHON" -m prefect --no-prompt deploy --all \
      --prefect-file deployments/prefect.yaml --pool "$POOL") >"$STATE/deploy.log" 2>&1 ||
      { cat "$STATE/deploy.log" >&2; die "prefect deploy failed"; }
  else
    (cd "$ROOT" && "$PYTHON" -m aicert.flows.deploy apply --pool "$POOL") >"$STATE/deploy.log" 2>&1 ||
      { cat "$STATE/deploy.log" >&2; die "applying the deployments failed"; }
  fi
  wait_worker "$(cat "$STATE/worker.pid")"
  log "up: UI http://127.0.0.1:$port  API $api  ($(cat "$STATE/backend"))"
  log "in your shell: eval \"\$(bash deployments/stack.sh env)\""
  trap - EXIT
}

# Cancel the flow runs in flight (their cancellation hooks tear their machines down) while
# the worker and the server still run: a worker's flow runs live in their own sessions, so
# stopping the worker alone would orphan them.
drain() {
  [ -f "$STATE/env" ] && [ -f "$STATE/server.pid" ] && alive "$(cat "$STATE/server.pid")" || return 0
  [ -f "$STATE/worker.pid" ] && alive "$(cat "$STATE/worker.pid")" || return 0
  log "cancelling the flow runs in flight"
  (
    # shellcheck disable=SC1091
    source "$STATE/env"
    cd "$ROOT" && "$PYTHON" -m aicert.flows.deploy drain --pool "$POOL" --timeout "$TIMEOUT"
  ) >&2 || log "some flow runs did not end in ${TIMEOUT}s: stopping anyway"
}

down() {
  drain
  stop_group worker "$STATE/worker.pid"
  stop_group "Prefect server" "$STATE/server.pid"
  pg_down
  rm -f "$STATE/env" "$STATE/backend"
  log "down"
}

status() {
  local name pidfile
  for name in server worker; do
    pidfile="$STATE/$name.pid"
    if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
      echo "$name: running (pid $(cat "$pidfile"))"
    else
      echo "$name: stopped"
    fi
  done
  [ -f "$STATE/pg-port" ] && echo "postgres: port $(cat "$STATE/pg-port")"
  [ -f "$STATE/env" ] && cat "$STATE/env"
  return 0
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  env) [ -f "$STATE/env" ] && cat "$STATE/env" || die "the stack is not up" ;;
  status) status ;;
  *) usage ;;
esac
