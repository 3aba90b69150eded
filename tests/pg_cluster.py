"""Fixtures for tests that need more than one PostgreSQL server: a primary, a hot standby
streaming from it, and PgBouncer in transaction pooling mode in front of the primary, all
run by ``scripts/pg-cluster.sh`` on loopback and started only when a test asks for them.

``tests/conftest.py`` registers this module as a plugin, so any test can ask for
``pg_cluster`` (the cluster's default database) or ``pg_cluster_db`` (a fresh one).
Every control is one ``pg-cluster.sh`` command, so the shell and the tests share one
implementation. The controls act on the whole cluster: tests that use them must not run in
parallel with each other (the cluster is per checkout, so other checkouts are unaffected).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import psycopg.conninfo
import pytest

__all__ = ["PgCluster", "PgClusterError", "pg_cluster", "pg_cluster_db", "start_cluster"]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg-cluster.sh"
# pg-cluster.sh's exit status when the binaries are missing and cannot be installed here.
CANNOT_INSTALL = 3
# Set (as .ci/run does) to fail instead of skip when the cluster cannot be installed.
REQUIRE_ENV = "IMMAGENT_REQUIRE_PG_CLUSTER"

Server = Literal["primary", "standby"]


class PgClusterError(RuntimeError):
    """A pg-cluster.sh command failed; the message carries the command and its stderr."""

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        super().__init__(f"pg-cluster.sh {command} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode


def _script(*args: str) -> str:
    """Run one pg-cluster.sh command and return its stdout."""
    # The timeout turns a hung command into a test error instead of a hung session.
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                         check=False, timeout=180)
    if out.returncode != 0:
        raise PgClusterError(" ".join(args), out.returncode, out.stderr)
    return out.stdout


def _with_dbname(dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class PgCluster:
    """DSNs of the three servers, all naming one database, and the cluster's controls."""

    primary: str
    standby: str
    bouncer: str

    @property
    def dbname(self) -> str:
        """The database the three DSNs name."""
        return str(psycopg.conninfo.conninfo_to_dict(self.primary)["dbname"])

    def with_database(self, dbname: str) -> PgCluster:
        """The same cluster with DSNs naming another database."""
        return PgCluster(*(_with_dbname(d, dbname) for d in (self.primary, self.standby,
                                                               self.bouncer)))

    def pause_replay(self) -> None:
        """Stop applying WAL on the standby (it keeps receiving it); returns once paused."""
        _script("pause-replay")

    def resume_replay(self) -> None:
        """Apply WAL on the standby again."""
        _script("resume-replay")

    @contextlib.contextmanager
    def replay_paused(self) -> Iterator[None]:
        """Replay paused for the duration of the block, resumed even when the block fails."""
        self.pause_replay()
        try:
            yield
        finally:
            self.resume_replay()

    def stop_standby(self) -> None:
        """Shut the standby down (fast mode: its clients are disconnected)."""
        _script("stop-standby")

    def start_standby(self) -> None:
        """Start the standby; returns once it streams and has caught up."""
        _script("start-standby")

    @contextlib.contextmanager
    def standby_stopped(self) -> Iterator[None]:
        """The standby down for the duration of the block, started again afterwards."""
        self.stop_standby()
        try:
            yield
        finally:
            self.start_standby()

    def wait_caught_up(self, timeout: int = 10) -> None:
        """Wait until the standby has replayed all WAL the primary has flushed (every commit
        so far); raises PgClusterError on timeout or at once when replay is paused."""
        _script("wait-replay", str(timeout))

    def reset_stats(self) -> None:
        """Zero the pg_stat_statements counters on both servers."""
        _script("reset-stats")

    def calls(self, server: Server, like: str) -> int:
        """How often statements whose normalised text matches the LIKE pattern ran on that
        server in this cluster's database since the last reset_stats()."""
        dsn = self.primary if server == "primary" else self.standby
        # The extension's view lives in the `postgres` database; its counters span all.
        with psycopg.connect(_with_dbname(dsn, "postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s AND s.query LIKE %s",
                (self.dbname, like),
            ).fetchone()
        return int(row[0]) if row else 0

    def bouncer_admin(self, command: str) -> list[dict[str, Any]]:
        """One command (``SHOW POOLS``, ``RECONNECT db``, ...) on PgBouncer's admin console;
        the rows it returns, one dict each."""
        # The console speaks only the simple query protocol: no parameters, no preparing.
        with psycopg.connect(_with_dbname(self.bouncer, "pgbouncer"), autocommit=True,
                             prepare_threshold=None) as conn:
            cur = conn.execute(command.encode())
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()] if names else []


def start_cluster() -> PgCluster:
    """Start the cluster (or find it running) and return its DSNs for its default database."""
    dsns = dict(line.split("=", 1) for line in _script("up").splitlines() if "=" in line)
    return PgCluster(dsns["PGCLUSTER_PRIMARY"], dsns["PGCLUSTER_STANDBY"],
                     dsns["PGCLUSTER_BOUNCER"])


@pytest.fixture(scope="session")
def pg_cluster() -> PgCluster:
    """The running cluster; skipped only when its binaries cannot be installed here."""
    try:
        return start_cluster()
    except PgClusterError as e:
        if e.returncode == CANNOT_INSTALL and not os.environ.get(REQUIRE_ENV):
            pytest.skip(f"no PostgreSQL replication cluster here (set {REQUIRE_ENV}=1 to fail "
                        f"instead): {e}")
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def pg_cluster_db(pg_cluster: PgCluster) -> Iterator[PgCluster]:
    """The cluster with DSNs naming a fresh database, created for this test session (and
    present on the standby before the first test) and dropped after it."""
    name = f"immagent_c_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.primary, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    pg_cluster.wait_caught_up()
    yield pg_cluster.with_database(name)
    with psycopg.connect(pg_cluster.primary, autocommit=True) as conn:
        # FORCE: PgBouncer keeps idle server connections to it.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
