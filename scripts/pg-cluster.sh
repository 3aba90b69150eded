#!/usr/bin/env bash
# A throwaway replication cluster on loopback, for the replica and pooler tests and benchmarks:
# a primary PostgreSQL, a hot standby streaming from it (pg_basebackup -R), and PgBouncer in
# transaction pooling mode in front of the primary; pg_stat_statements is loaded on both
# servers so a test can count the statements each one ran.
#
#   pg-cluster.sh [up]             start whatever is not running (idempotent), print the DSNs
#   pg-cluster.sh env              print the DSNs, start nothing
#   pg-cluster.sh status           one line per part: running or not
#   pg-cluster.sh pause-replay     pg_wal_replay_pause() on the standby; returns once paused
#   pg-cluster.sh resume-replay    pg_wal_replay_resume()
#   pg-cluster.sh wait-replay [S]  wait (at most S seconds, default 10) until the standby has
#                                  replayed everything the primary has flushed
#   pg-cluster.sh stop-standby     stop the standby (fast shutdown)
#   pg-cluster.sh start-standby    start it again; returns once it streams and has caught up
#   pg-cluster.sh reset-stats      pg_stat_statements_reset() on both servers
#   pg-cluster.sh down [--purge]   stop all three (and delete their data)
#
# The DSNs are KEY=VALUE lines, fit for `eval`: PGCLUSTER_PRIMARY, PGCLUSTER_STANDBY,
# PGCLUSTER_BOUNCER (all for database $PGCLUSTER_DATABASE, default immagent_test).
# Exit status 3: binaries are missing and cannot be installed here (tests skip on it).
#
# PGCLUSTER_PORT is the primary's port (standby +1, PgBouncer +2) and PGCLUSTER_ROOT holds
# data, sockets and logs. The default port is derived from this checkout's path, so two
# checkouts on one machine never share a cluster: their tests pause and stop the standby.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/pg-lib.sh"

SUM="$(cd "$HERE/.." && pwd -P | cksum | cut -d' ' -f1)"
PORT="${PGCLUSTER_PORT:-$((21000 + SUM % 1500 * 3))}"   # below Linux's ephemeral range
ROOT="${PGCLUSTER_ROOT:-/tmp/immagent-pgcluster-$PORT}"
DB="${PGCLUSTER_DATABASE:-immagent_test}"
P_PORT=$PORT; S_PORT=$((PORT + 1)); B_PORT=$((PORT + 2))
PRIMARY="$ROOT/primary"; STANDBY="$ROOT/standby"; BOUNCER="$ROOT/pgbouncer"; SOCK="$ROOT/sock"
PGBOUNCER_BIN="$(command -v pgbouncer 2>/dev/null || echo /usr/sbin/pgbouncer)"
CANNOT_INSTALL=3

exec 4>&2   # die() reports on the real stderr even inside poll's redirections
die() { echo "pg-cluster: $*" >&4; exit 1; }
dsn() { echo "postgresql://postgres@127.0.0.1:$1/$DB"; }

# psql PORT DATABASE SQL: one statement, unaligned tuples only, no ~/.psqlrc.
q() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d "$2" -tAc "$3"; }

# poll SECONDS WHAT COMMAND...: rerun COMMAND every 20 ms until it succeeds.
poll() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.02
  done
}

binaries() {  # find (or install) everything `up` needs; exit 3 when impossible
  pg_need_bin || exit $CANNOT_INSTALL
  [ -f "$("$PGBIN/pg_config" --pkglibdir 2>/dev/null || echo "$PGBIN/../lib")/pg_stat_statements.so" ] \
    || pg_apt_install postgresql-contrib || exit $CANNOT_INSTALL
  [ -x "$PGBOUNCER_BIN" ] || pg_apt_install pgbouncer || exit $CANNOT_INSTALL
  [ -x "$PGBOUNCER_BIN" ] || { echo "pg-cluster: no $PGBOUNCER_BIN after installing pgbouncer" >&2; exit $CANNOT_INSTALL; }
  pg_run_prefix
}

running() { "${RUN[@]}" "$PGBIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_server() {  # DATADIR PORT LOG
  running "$1" && return 0
  # 4>&- 9>&-: the daemon must not inherit (and so hold open forever) our stderr copy
  # (a caller reading it would never see EOF) or this script's lock.
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$1" -l "$3" -w -t 60 -o "-p $2" start >/dev/null 4>&- 9>&- \
    || { tail -n 20 "$3" >&2; return 1; }
}

streaming() { [ "$(q "$S_PORT" postgres "SELECT status FROM pg_stat_wal_receiver")" = streaming ]; }
bouncer_up() { q "$B_PORT" pgbouncer "SHOW VERSION"; }
bouncer_pid() { [ -s "$BOUNCER/pgbouncer.pid" ] && kill -0 "$(cat "$BOUNCER/pgbouncer.pid")" 2>/dev/null; }

caught_up() {  # TARGET_LSN: the standby has replayed up to it; fails loudly when paused
  local row
  row="$(q "$S_PORT" postgres "SELECT pg_is_wal_replay_paused(), pg_last_wal_replay_lsn() >= '$1'::pg_lsn")"
  [ "${row%|*}" = f ] || die "replay is paused on the standby; resume it first"
  [ "${row#*|}" = t ]
}

init_primary() {
  # A standby cloned from an older primary could never stream from this one.
  rm -rf "$PRIMARY" "$STANDBY"
  "${RUN[@]}" "$PGBIN/initdb" -D "$PRIMARY" -U postgres --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 --no-sync >/dev/null
  # Copied to the standby by pg_basebackup. Throwaway data: no fsync; but commits stay
  # synchronous, because a walsender only ships flushed WAL, and fsync=off makes flushing free.
  cat >>"$PRIMARY/postgresql.conf" <<EOF

# --- pg-cluster.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
max_connections = 200
fsync = off
full_page_writes = off
synchronous_commit = on
wal_writer_delay = 10ms
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB        # a standby stopped for a while catches up without a slot
hot_standby = on
shared_preload_libraries = 'pg_stat_statements'
EOF
}

build_standby() {
  rm -rf "$STANDBY"
  "${RUN[@]}" "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P_PORT" -U postgres -D "$STANDBY" \
    -R -X stream -c fast --no-sync
}

ensure_standby() {  # running, streaming, replay resumed; rebuilt once when it cannot stream
  [ -s "$STANDBY/PG_VERSION" ] || build_standby
  if ! { start_server "$STANDBY" "$S_PORT" "$ROOT/standby.log" \
         && (poll 15 "the standby to stream" streaming); }; then
    echo "pg-cluster: the standby does not stream; cloning it again" >&2
    "${RUN[@]}" "$PGBIN/pg_ctl" -D "$STANDBY" -m immediate stop >/dev/null 2>&1 || true
    build_standby
    start_server "$STANDBY" "$S_PORT" "$ROOT/standby.log"
    poll 15 "the standby to stream" streaming
  fi
  q "$S_PORT" postgres "SELECT pg_wal_replay_resume()" >/dev/null
}

write_bouncer_config() {  # prints "changed" when the file was (re)written
  local ini="$BOUNCER/pgbouncer.ini" new
  new="$(cat <<EOF
;; written by scripts/pg-cluster.sh
[databases]
* = host=127.0.0.1 port=$P_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $B_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BOUNCER/userlist.txt
admin_users = postgres
stats_users = postgres
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
logfile = $BOUNCER/pgbouncer.log
pidfile = $BOUNCER/pgbouncer.pid
EOF
)"
  if [ ! -f "$ini" ] || [ "$(cat "$ini")" != "$new" ]; then
    printf '%s\n' "$new" >"$ini"
    echo '"postgres" ""' >"$BOUNCER/userlist.txt"   # trust: the user only has to be listed
    chown -R --reference="$BOUNCER" "$BOUNCER"
    echo changed
  fi
}

ensure_bouncer() {
  pg_own_dir "$BOUNCER"
  if [ -n "$(write_bouncer_config)" ] && bouncer_pid; then
    kill "$(cat "$BOUNCER/pgbouncer.pid")"
    poll 10 "PgBouncer to stop" eval '! bouncer_pid'
  fi
  if ! bouncer_pid; then
    "${RUN[@]}" "$PGBOUNCER_BIN" -d -q "$BOUNCER/pgbouncer.ini" 4>&- 9>&- \
      || { tail -n 20 "$BOUNCER/pgbouncer.log" >&2; die "PgBouncer did not start"; }
  fi
  poll 10 "PgBouncer to accept connections" bouncer_up
}

cmd_env() {
  echo "PGCLUSTER_PRIMARY=$(dsn "$P_PORT")"
  echo "PGCLUSTER_STANDBY=$(dsn "$S_PORT")"
  echo "PGCLUSTER_BOUNCER=$(dsn "$B_PORT")"
}

cmd_up() {
  binaries
  pg_own_dir "$ROOT"
  [ -s "$PRIMARY/PG_VERSION" ] || init_primary
  "${RUN[@]}" mkdir -p "$SOCK"
  start_server "$PRIMARY" "$P_PORT" "$ROOT/primary.log" || die "the primary did not start"
  q "$P_PORT" postgres "SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
  [ "$(q "$P_PORT" postgres "SELECT 1 FROM pg_database WHERE datname = '$DB'")" = 1 ] \
    || q "$P_PORT" postgres "CREATE DATABASE \"$DB\"" >/dev/null
  ensure_standby
  ensure_bouncer
  cmd_wait_replay 15
  cmd_env
}

cmd_status() {
  pg_run_prefix
  local what
  for what in "primary $PRIMARY" "standby $STANDBY"; do
    if running "${what#* }"; then echo "${what%% *}: running"; else echo "${what%% *}: stopped"; fi
  done
  if bouncer_pid; then echo "pgbouncer: running"; else echo "pgbouncer: stopped"; fi
}

cmd_pause_replay() {
  q "$S_PORT" postgres "SELECT pg_wal_replay_pause()" >/dev/null
  poll 10 "replay to pause" eval \
    '[ "$(q "$S_PORT" postgres "SELECT pg_get_wal_replay_pause_state()")" = paused ]'
}

cmd_resume_replay() { q "$S_PORT" postgres "SELECT pg_wal_replay_resume()" >/dev/null; }

cmd_wait_replay() {
  local target
  target="$(q "$P_PORT" postgres "SELECT pg_current_wal_flush_lsn()")"
  caught_up "$target" && return 0
  poll "${1:-10}" "the standby to replay up to $target" caught_up "$target"
}

cmd_stop_standby() {
  pg_run_prefix
  running "$STANDBY" || return 0
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$STANDBY" -m fast -w stop >/dev/null
}

cmd_start_standby() {
  pg_run_prefix
  ensure_standby
  cmd_wait_replay 15
}

cmd_reset_stats() {
  q "$P_PORT" postgres "SELECT pg_stat_statements_reset()" >/dev/null
  q "$S_PORT" postgres "SELECT pg_stat_statements_reset()" >/dev/null
}

cmd_down() {
  pg_run_prefix
  if bouncer_pid; then kill "$(cat "$BOUNCER/pgbouncer.pid")"; fi
  local d
  for d in "$STANDBY" "$PRIMARY"; do
    if running "$d"; then "${RUN[@]}" "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null; fi
  done
  if [ "${1:-}" = --purge ]; then rm -rf "$ROOT"; fi
}

cmd="${1:-up}"; [ $# -gt 0 ] && shift
case "$cmd" in
  env) cmd_env; exit 0 ;;
  up|status|pause-replay|resume-replay|wait-replay|stop-standby|start-standby|reset-stats|down) ;;
  *) die "unknown command '$cmd' (see the comment at the top of $0)" ;;
esac
if [ "$cmd" != up ]; then pg_find_bin || die "no PostgreSQL binaries; run '$0 up' first"; fi
# One command at a time per cluster: concurrent test sessions may all call `up`.
exec 9>"$ROOT.lock"
flock 9
"cmd_${cmd//-/_}" "$@"
