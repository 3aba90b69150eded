"""Where a store's bytes go: every relation of a PostgreSQL schema or a SQLite file.

Nothing here knows immagent's tables: they are discovered from the catalog (every table
whose name starts with a prefix, with its TOAST, indexes and sequences on PostgreSQL; every
b-tree of the file on SQLite, through the ``dbstat`` virtual table), so the breakdown stays
right while the schema changes. The sums are the stored bytes the benchmarks report.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

__all__ = [
    "Relation",
    "dbstat_available",
    "pg_prefix_bytes",
    "pg_relations",
    "sqlite_relations",
]

Kind = Literal["table", "toast", "index", "sequence", "internal", "free"]


@dataclass(frozen=True)
class Relation:
    """One relation's bytes: a table (heap, or the b-tree of a SQLite table), its TOAST,
    an index, a sequence, SQLite's own schema table, or pages no b-tree holds."""

    table: str  # the table the relation belongs to ("-" for file-level pages)
    name: str
    kind: Kind
    bytes: int
    rows: int | None = None  # tables only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- PostgreSQL -----------------------------------------------------------------------

# A sequence is listed under the table that owns it (identity or serial column).
_PG_TABLES = """
SELECT c.relname, c.relkind, coalesce(owner.relname, c.relname),
       pg_table_size(c.oid) - coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),
       coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_depend d ON c.relkind = 'S' AND d.classid = 'pg_class'::regclass
       AND d.objid = c.oid AND d.deptype IN ('a', 'i')
  LEFT JOIN pg_class owner ON owner.oid = d.refobjid
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'm', 'S')
   AND starts_with(c.relname, %s)
 ORDER BY c.relname
"""
_PG_INDEXES = """
SELECT t.relname, i.relname, pg_relation_size(i.oid)
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
  JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = current_schema() AND starts_with(t.relname, %s)
 ORDER BY t.relname, i.relname
"""
_PG_TOTAL = """
SELECT coalesce(sum(CASE WHEN c.relkind = 'S' THEN pg_relation_size(c.oid)
                         ELSE pg_total_relation_size(c.oid) END), 0)::bigint
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'm', 'S')
   AND starts_with(c.relname, %s)
"""


async def pg_prefix_bytes(dsn: str, prefix: str) -> int:
    """Bytes of every table (heap, TOAST, indexes) and sequence whose name starts with
    ``prefix`` in the DSN's current schema: the sum of ``pg_relations`` without counting
    rows."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(_PG_TOTAL, (prefix,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def pg_relations(dsn: str, prefix: str) -> list[Relation]:
    """Every relation of the tables (and sequences) whose name starts with ``prefix``:
    table heap (with its free-space and visibility maps), TOAST (with its index), each
    index, each sequence; tables with their row counts."""
    out: list[Relation] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(_PG_TABLES, (prefix,))
        tables = await cur.fetchall()
        cur = await conn.execute(_PG_INDEXES, (prefix,))
        indexes = await cur.fetchall()
        for name, relkind, owner, heap, toast in tables:
            if relkind == "S":
                out.append(Relation(owner, name, "sequence", int(heap)))
                continue
            count = await conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name)))
            rows = await count.fetchone()
            out.append(Relation(name, name, "table", int(heap), int(rows[0]) if rows else 0))
            if toast:
                out.append(Relation(name, "(TOAST)", "toast", int(toast)))
            out.extend(Relation(t, i, "index", int(size)) for t, i, size in indexes
                       if t == name)
    return _grouped(out)


# --- SQLite ---------------------------------------------------------------------------


def dbstat_available() -> bool:
    """Whether this Python's SQLite has the ``dbstat`` virtual table (SQLITE_ENABLE_DBSTAT_VTAB)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT count(*) FROM dbstat").fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


def sqlite_relations(path: Path) -> list[Relation]:
    """Every b-tree of a SQLite file (tables with row counts, indexes including automatic
    ones, SQLite's own tables) from ``dbstat``, plus a ``free`` entry for the pages no
    b-tree holds (free list, pointer maps, the lock-byte page), so the sum is the file
    size. Folds the WAL into the file first. Needs ``dbstat_available()``."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (page_count,) = conn.execute("PRAGMA page_count").fetchone()
        schema = {name: (kind, table) for kind, name, table in
                  conn.execute("SELECT type, name, tbl_name FROM sqlite_schema")}
        out: list[Relation] = []
        used = 0
        for name, size in conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY name"):
            used += int(size)
            kind, table = schema.get(name, ("internal", name))
            if kind == "table" and not name.startswith("sqlite_"):
                (rows,) = conn.execute(f"SELECT count(*) FROM {_quoted(name)}").fetchone()
                out.append(Relation(table, name, "table", int(size), int(rows)))
            elif kind == "index":
                out.append(Relation(table, name, "index", int(size)))
            else:
                out.append(Relation(table, name, "internal", int(size)))
        free = page_count * page_size - used
        if free:
            out.append(Relation("-", "(free list, pointer maps, lock page)", "free", free))
    finally:
        conn.close()
    return _grouped(out)


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _grouped(relations: Sequence[Relation]) -> list[Relation]:
    """Each table first, then its other relations; SQLite's own and free pages last."""
    order = {r.table: i for i, r in enumerate(sorted(relations, key=lambda r: r.table))}

    def key(r: Relation) -> tuple[int, int, int, str]:
        last = r.kind in ("internal", "free")
        return (last, order[r.table], r.kind != "table", r.name)

    return sorted(relations, key=key)
