"""Helpers for store tests on the replication cluster (tests/pg_cluster.py): an emptied
immagent schema on its primary, replayed on the standby, and the statement patterns that
tell which server ran which backend call (pg_stat_statements' normalised text)."""

from __future__ import annotations

import psycopg

from immagent.store.backend import SCHEMA_VERSION
from immagent.store.schema import schema_sql
from tests.pg_cluster import PgCluster

__all__ = ["CHAIN", "GET_ASSETS", "GET_STATES", "LINEAGE", "SCAN", "empty_store"]

# LIKE patterns of the statements behind each backend read.
CHAIN = "%WITH RECURSIVE seg(run, hi)%LATERAL (SELECT * FROM immagent_nodes%"
LINEAGE = "%WITH RECURSIVE line%"
GET_STATES = "%FROM immagent_states WHERE id = ANY%"
GET_ASSETS = "%FROM immagent_assets WHERE digest = ANY%"
SCAN = "%FROM immagent_states WHERE kind = $1 ORDER BY id%"


def empty_store(cluster: PgCluster) -> PgCluster:
    """Create the schema on the cluster's primary if missing, empty its tables, and wait
    until the standby has replayed that."""
    with psycopg.connect(cluster.primary, autocommit=True) as conn:
        conn.execute(schema_sql().encode())
        conn.execute("INSERT INTO immagent_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                     (SCHEMA_VERSION,))
        conn.execute("TRUNCATE immagent_assets, immagent_states, immagent_nodes")
    cluster.wait_caught_up()
    return cluster
