#!/usr/bin/env bash
# A real PostgreSQL 15 + pgvector on loopback for zrag's store tests and benchmarks: a primary
# and, on request, a streaming replica. Nothing here is a mock; tests talk to these servers.
#
#   scripts/pg.sh install        apt packages; pgvector built from Debian's source package
#   scripts/pg.sh start          primary on 127.0.0.1:$ZRAG_PG_PORT (default 55432)
#   scripts/pg.sh start-replica  streaming replica on $ZRAG_PG_REPLICA_PORT (default 55433)
#   scripts/pg.sh restart        fast restart of the primary (the restart tests use it)
#   scripts/pg.sh stop           stops both, keeps the data directories
#   scripts/pg.sh destroy        stops both and removes the data directories
#   scripts/pg.sh destroy-replica  stops and removes the replica only
#   scripts/pg.sh env            the ZRAG_TEST_* variables the tests read
#
# Debian 12 ships PostgreSQL 15 but no pgvector binary package; pgvector's source package
# from the next Debian release (trixie, pgvector 0.8.0) builds against PostgreSQL 15. Its
# source index is fetched into a private apt state directory so the machine's own package
# lists are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
PG_ROOT=${ZRAG_PG_DIR:-$PWD/target/pg}
PORT=${ZRAG_PG_PORT:-55432}
REPLICA_PORT=${ZRAG_PG_REPLICA_PORT:-55433}
PRIMARY_DIR=$PG_ROOT/primary
REPLICA_DIR=$PG_ROOT/replica
DATABASE=zrag_test

# initdb refuses to run as root; the Debian package's `postgres` user owns the clusters.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

install() {
  local need=()
  [ -x "$PG_BIN/postgres" ] || need+=(postgresql-15)
  # pg_config alone is not enough: Debian 12 ships it in postgresql-client-15, and pgvector
  # needs the server headers.
  [ -x "$PG_BIN/pg_config" ] && [ -f /usr/include/postgresql/15/server/postgres.h ] \
    || need+=(postgresql-server-dev-15)
  command -v dpkg-source >/dev/null || need+=(dpkg-dev)
  command -v make >/dev/null || need+=(make)
  if [ ${#need[@]} -gt 0 ]; then
    echo "pg.sh: installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
  fi
  if [ -f /usr/share/postgresql/15/extension/vector.control ]; then
    return
  fi
  echo "pg.sh: building pgvector from Debian trixie's source package"
  local work
  work=$(mktemp -d)
  mkdir -p "$work/lists/partial"
  cat >"$work/sources.list" <<'EOF'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
EOF
  local apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
  apt-get "${apt_opts[@]}" update -q >/dev/null
  (cd "$work" && apt-get "${apt_opts[@]}" source --download-only -q pgvector >/dev/null)
  tar -xzf "$work"/pgvector_*.orig.tar.gz -C "$work"
  # with_llvm=no: no JIT bitcode, so clang is not needed.
  make -s -C "$work"/pgvector-*/ PG_CONFIG="$PG_BIN/pg_config" with_llvm=no -j"$(nproc)" >/dev/null
  make -s -C "$work"/pgvector-*/ PG_CONFIG="$PG_BIN/pg_config" with_llvm=no install >/dev/null
  rm -rf "$work"
  test -f /usr/share/postgresql/15/extension/vector.control
}

running() { as_owner "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_primary() {
  mkdir -p "$PG_ROOT"
  [ "$(id -u)" = 0 ] && chown postgres: "$PG_ROOT"
  if [ ! -f "$PRIMARY_DIR/PG_VERSION" ]; then
    as_owner "$PG_BIN/initdb" -D "$PRIMARY_DIR" -U postgres --auth=trust -E UTF8 \
      --locale=C.UTF-8 >/dev/null
    cat >>"$PRIMARY_DIR/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = ''
max_connections = 200
shared_buffers = 512MB
maintenance_work_mem = 1GB
wal_level = replica
max_wal_senders = 4
max_replication_slots = 4
hot_standby = on
fsync = on
synchronous_commit = on
logging_collector = off
EOF
    cat >"$PRIMARY_DIR/pg_hba.conf" <<'EOF'
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
local replication all trust
EOF
  fi
  if ! running "$PRIMARY_DIR"; then
    as_owner "$PG_BIN/pg_ctl" -D "$PRIMARY_DIR" -l "$PRIMARY_DIR/server.log" -w -t 60 start >/dev/null
  fi
  as_owner "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qtAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1 ||
    as_owner "$PG_BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DATABASE"
}

start_replica() {
  running "$PRIMARY_DIR" || start_primary
  if [ ! -f "$REPLICA_DIR/PG_VERSION" ]; then
    # A replication slot keeps the primary's WAL until the replica has it, however far a burst
    # of writes (or a primary restart) puts it behind.
    as_owner "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qtAc \
      "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'zrag_replica'" | grep -q 1 &&
      as_owner "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qtAc \
        "SELECT pg_drop_replication_slot('zrag_replica')" >/dev/null
    as_owner "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D "$REPLICA_DIR" \
      -R -X stream -C -S zrag_replica >/dev/null
    cat >>"$REPLICA_DIR/postgresql.conf" <<EOF
port = $REPLICA_PORT
unix_socket_directories = ''
EOF
  fi
  if ! running "$REPLICA_DIR"; then
    as_owner "$PG_BIN/pg_ctl" -D "$REPLICA_DIR" -l "$REPLICA_DIR/server.log" -w -t 60 start >/dev/null
  fi
}

stop() {
  for dir in "$REPLICA_DIR" "$PRIMARY_DIR"; do
    if [ -f "$dir/PG_VERSION" ] && running "$dir"; then
      as_owner "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    fi
  done
}

case "${1:-}" in
  install) install ;;
  start) install && start_primary ;;
  start-replica) install && start_replica ;;
  restart) as_owner "$PG_BIN/pg_ctl" -D "$PRIMARY_DIR" -m fast -w -t 60 restart \
    -l "$PRIMARY_DIR/server.log" >/dev/null ;;
  stop) stop ;;
  destroy) stop && rm -rf "$PRIMARY_DIR" "$REPLICA_DIR" ;;
  destroy-replica)
    if [ -f "$REPLICA_DIR/PG_VERSION" ] && running "$REPLICA_DIR"; then
      as_owner "$PG_BIN/pg_ctl" -D "$REPLICA_DIR" -m fast -w stop >/dev/null
    fi
    rm -rf "$REPLICA_DIR"
    ;;
  env)
    echo "export ZRAG_TEST_POSTGRES=postgres://postgres@127.0.0.1:$PORT/$DATABASE"
    echo "export ZRAG_TEST_POSTGRES_REPLICA=postgres://postgres@127.0.0.1:$REPLICA_PORT/$DATABASE"
    echo "export ZRAG_TEST_PG_RESTART='bash $PWD/scripts/pg.sh restart'"
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
