#!/usr/bin/env bash
# Ensure a throwaway PostgreSQL (tests, benchmarks, CI) is running on 127.0.0.1:$PGPORT with database $PGDATABASE.
# Prints its DSN. Idempotent; as root the server runs as the unprivileged `postgres` user.
# Works as root (runs the server as the unprivileged 'postgres' OS user) or as a normal user.
set -euo pipefail
PGPORT="${PGPORT:-55432}"
PGDATABASE="${PGDATABASE:-immagent_test}"
PGROOT="${PGROOT:-/tmp/immagent-pg}"          # holds data/, sock/, log
PGDATA_DIR="$PGROOT/data"; PGSOCK="$PGROOT/sock"; PGLOG="$PGROOT/server.log"

# 1. binaries: prefer PATH, then Debian's layout, else install Debian's package.
PGBIN=""
for d in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")" /usr/lib/postgresql/*/bin; do
  [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && { PGBIN="$d"; break; }
done
if [ -z "$PGBIN" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi

# 2. who runs it: postgres refuses to run as root.
if [ "$(id -u)" = 0 ]; then
  id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  RUN=(runuser -u postgres --)
else
  RUN=()
fi

mkdir -p "$PGROOT"
[ "$(id -u)" = 0 ] && chown postgres: "$PGROOT"
chmod 700 "$PGROOT"   # (parent dirs must be traversable by 'postgres')

# 3. init once.
if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
  "${RUN[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 --no-sync >/dev/null
  "${RUN[@]}" mkdir -p "$PGSOCK"
fi

# 4. start unless already up (fast settings: throwaway data, no durability).
if ! "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGLOG" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGSOCK -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" >/dev/null
fi

# 5. wait for readiness over TCP, then create the database if missing.
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.5; done
psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$PGDATABASE'" | grep -q 1 \
  || psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -qc "CREATE DATABASE \"$PGDATABASE\""
echo "postgresql://postgres@127.0.0.1:$PGPORT/$PGDATABASE"
# stop later with: ${RUN[*]} $PGBIN/pg_ctl -D $PGDATA_DIR -m fast stop
