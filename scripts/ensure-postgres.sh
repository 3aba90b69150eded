#!/usr/bin/env bash
# Ensure a throwaway PostgreSQL (tests, benchmarks, CI) is running on 127.0.0.1:$PGPORT with database $PGDATABASE.
# Prints its DSN. Idempotent; as root the server runs as the unprivileged `postgres` user.
# Works as root (runs the server as the unprivileged 'postgres' OS user) or as a normal user.
#
#   ensure-postgres.sh        start it unless it runs; print the DSN
#   ensure-postgres.sh stop   stop it, if this checkout started it (`make stop`): a server
#                             it found running was started by someone else and is left alone
set -euo pipefail
PGPORT="${PGPORT:-55432}"
PGDATABASE="${PGDATABASE:-immagent_test}"
PGROOT="${PGROOT:-/tmp/immagent-pg}"          # holds data/, sock/, log
PGDATA_DIR="$PGROOT/data"; PGSOCK="$PGROOT/sock"; PGLOG="$PGROOT/server.log"
# Who started the running server: the checkout path, written when this script starts it.
STARTED_BY="$PGROOT/started-by"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/.." && pwd -P)"
. "$HERE/pg-lib.sh"

if [ "${1:-}" = stop ]; then
  if [ "$(cat "$STARTED_BY" 2>/dev/null)" != "$CHECKOUT" ]; then
    echo "ensure-postgres: leaving the PostgreSQL on port $PGPORT alone (this checkout did not start it)" >&2
    exit 0
  fi
  pg_find_bin || { echo "ensure-postgres: no PostgreSQL binaries" >&2; exit 1; }
  pg_run_prefix
  if "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null
    echo "ensure-postgres: stopped the PostgreSQL on port $PGPORT" >&2
  fi
  rm -f "$STARTED_BY"
  exit 0
fi

# 1. binaries: prefer PATH, then Debian's layout, else install Debian's package.
pg_need_bin

# 2. who runs it: postgres refuses to run as root.
pg_run_prefix

pg_own_dir "$PGROOT"

# 3. init once.
if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
  "${RUN[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 --no-sync >/dev/null
  "${RUN[@]}" mkdir -p "$PGSOCK"
fi

# 4. start unless already up (fast settings: throwaway data, no durability).
if ! "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGLOG" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGSOCK -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" >/dev/null
  echo "$CHECKOUT" > "$STARTED_BY"
fi

# 5. wait for readiness over TCP, then create the database if missing.
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.5; done
psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$PGDATABASE'" | grep -q 1 \
  || psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -qc "CREATE DATABASE \"$PGDATABASE\""
echo "postgresql://postgres@127.0.0.1:$PGPORT/$PGDATABASE"
