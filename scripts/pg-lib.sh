# Sourced by ensure-postgres.sh and pg-cluster.sh: where PostgreSQL's binaries are, how to
# install a missing Debian package, and how to run the server (it refuses to run as root).

# Set PGBIN to the directory holding pg_ctl, initdb and their siblings (found on PATH first,
# then in Debian's layout);
# return 1 when there is none.
pg_find_bin() {
  PGBIN=""
  local d
  for d in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")" /usr/lib/postgresql/*/bin; do
    # Resolved, because PATH may hold symlinks to a few of them only (pg_ctl, not psql).
    [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && { PGBIN="$(dirname "$(readlink -f "$d/pg_ctl")")"; return 0; }
  done
  return 1
}

# Install Debian packages; return 1 (with a message) where that is impossible: not root or no
# apt. The package lists are refreshed only when the first attempt fails (a fresh image has
# none; refreshing costs seconds).
pg_apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install $* here (needs root and apt-get); install it by hand" >&2
    return 1
  fi
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
  "${apt[@]}" >/dev/null 2>&1 || { apt-get update -qq >&2 && "${apt[@]}" >/dev/null; }
}

# pg_find_bin, installing Debian's `postgresql` first when nothing is found.
pg_need_bin() {
  pg_find_bin && return 0
  pg_apt_install postgresql || return 1
  pg_find_bin
}

# Set RUN to the command prefix that runs a program as the server's OS user: as root that is
# the unprivileged `postgres` user (created when missing), otherwise ourselves.
pg_run_prefix() {
  if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    RUN=(runuser -u postgres --)
  else
    RUN=()
  fi
}

# Create directory $1 owned by the server's OS user, mode 700 (its parents must be
# traversable by that user).
pg_own_dir() {
  mkdir -p "$1"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$1"; fi
  chmod 700 "$1"
}
