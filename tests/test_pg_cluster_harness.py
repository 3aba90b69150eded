"""The replication/pooler harness itself, with plain psycopg: the standby really replicates,
its controls do what they say, PgBouncer really pools per transaction, and
pg_stat_statements counts on the server that ran the statement."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.pg_cluster import PgCluster, PgClusterError


@pytest.fixture
def table(pg_cluster_db: PgCluster) -> Iterator[str]:
    """A fresh one-column table on the primary, already replayed on the standby."""
    name = f"harness_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster_db.primary, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (x int)".encode())
    pg_cluster_db.wait_caught_up()
    yield name
    with psycopg.connect(pg_cluster_db.primary, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}".encode())


def _insert(dsn: str, table: str, x: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s)".encode(), (x,))


def _values(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT x FROM {table} ORDER BY x".encode())]


def _lsn(dsn: str, expr: str) -> int:
    """An LSN-valued expression as a number, so two servers' positions compare."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT ({expr}) - '0/0'::pg_lsn".encode()).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def test_the_standby_is_a_read_only_replica_of_the_primary(pg_cluster_db: PgCluster,
                                                           table: str) -> None:
    _insert(pg_cluster_db.primary, table, 1)
    pg_cluster_db.wait_caught_up()
    assert _values(pg_cluster_db.standby, table) == [1]
    with psycopg.connect(pg_cluster_db.standby, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(pg_errors.ReadOnlySqlTransaction):
            conn.execute(f"INSERT INTO {table} VALUES (2)".encode())


def test_paused_replay_hides_a_new_row_until_resumed(pg_cluster_db: PgCluster,
                                                     table: str) -> None:
    with pg_cluster_db.replay_paused():
        _insert(pg_cluster_db.primary, table, 1)
        flushed = _lsn(pg_cluster_db.primary, "pg_current_wal_flush_lsn()")
        # The standby receives the row's WAL while paused; only applying it waits.
        deadline = time.monotonic() + 10
        while _lsn(pg_cluster_db.standby, "pg_last_wal_receive_lsn()") < flushed:
            assert time.monotonic() < deadline, "the standby never received the WAL"
            time.sleep(0.01)
        assert _lsn(pg_cluster_db.standby, "pg_last_wal_replay_lsn()") < flushed
        assert _values(pg_cluster_db.standby, table) == []
        with pytest.raises(PgClusterError, match="replay is paused"):
            pg_cluster_db.wait_caught_up()
    pg_cluster_db.wait_caught_up()
    assert _values(pg_cluster_db.standby, table) == [1]


def test_a_stopped_standby_refuses_connections_and_catches_up_when_restarted(
        pg_cluster_db: PgCluster, table: str) -> None:
    with pg_cluster_db.standby_stopped():
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_cluster_db.standby, connect_timeout=2).close()
        _insert(pg_cluster_db.primary, table, 7)
    assert _values(pg_cluster_db.standby, table) == [7]


def test_statement_counts_are_per_server(pg_cluster_db: PgCluster, table: str) -> None:
    pg_cluster_db.reset_stats()
    pattern = f"SELECT x FROM {table}%"
    for _ in range(3):
        _values(pg_cluster_db.standby, table)
    for _ in range(2):
        _values(pg_cluster_db.primary, table)
    assert pg_cluster_db.calls("standby", pattern) == 3
    assert pg_cluster_db.calls("primary", pattern) == 2
    pg_cluster_db.reset_stats()
    assert pg_cluster_db.calls("standby", pattern) == 0
    assert pg_cluster_db.calls("primary", pattern) == 0


def test_pgbouncer_reaches_the_primary(pg_cluster_db: PgCluster, table: str) -> None:
    pg_cluster_db.reset_stats()
    _insert(pg_cluster_db.bouncer, table, 5)
    assert _values(pg_cluster_db.bouncer, table) == [5]
    assert _values(pg_cluster_db.primary, table) == [5]
    assert pg_cluster_db.calls("primary", f"INSERT INTO {table}%") == 1
    assert pg_cluster_db.calls("standby", f"INSERT INTO {table}%") == 0


def test_pgbouncer_pools_per_transaction(pg_cluster_db: PgCluster) -> None:
    pools = {p["database"]: p["pool_mode"] for p in pg_cluster_db.bouncer_admin("SHOW POOLS")}
    assert pools[pg_cluster_db.dbname] == "transaction"
    pid = "SELECT pg_backend_pid()"
    with (psycopg.connect(pg_cluster_db.bouncer, autocommit=True) as a,
          psycopg.connect(pg_cluster_db.bouncer, autocommit=True) as b):
        with a.transaction():
            held = a.execute(pid).fetchone()
            # A transaction pins its server connection: the other client gets another one.
            assert b.execute(pid).fetchone() != held
        # Released at commit, and PgBouncer reuses the most recently released one (LIFO):
        # two clients, one session each, share a backend, which session pooling never does.
        assert b.execute(pid).fetchone() == held


def test_prepared_statements_leak_between_clients_through_pgbouncer(
        pg_cluster_db: PgCluster) -> None:
    """The fact the store must live with: psycopg's automatic prepared statements are
    server-session state, so in transaction mode one client's collide with another's."""
    query = "SELECT %s::int"

    def run_twice_threshold(threshold: int | None) -> None:
        with (psycopg.connect(pg_cluster_db.bouncer, autocommit=True,
                              prepare_threshold=threshold) as a,
              psycopg.connect(pg_cluster_db.bouncer, autocommit=True,
                              prepare_threshold=threshold) as b):
            for conn in (a, b):  # both name their first prepared statement _pg3_0
                for i in range(3):
                    conn.execute(query, (i,))

    try:
        with pytest.raises(pg_errors.DuplicatePreparedStatement):
            run_twice_threshold(1)
        run_twice_threshold(None)
    finally:  # the server connections keep the statements: replace them for later tests
        pg_cluster_db.bouncer_admin(f"RECONNECT {pg_cluster_db.dbname}")
