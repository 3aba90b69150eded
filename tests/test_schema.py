"""Both engines' schemas, as they really are after init_schema(), against the one layout
description (immagent/store/layout.py): same tables, columns, nullability, checks and
indexes, so the two DDLs cannot drift apart."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import psycopg

from immagent import Store
from immagent.store.layout import INDEXES, TABLES, Column

_PG_TYPES = {"digest": {"bytea"}, "uuid": {"uuid"}, "blob": {"bytea"}, "text": {"text"},
             "int": {"smallint", "integer"}, "time": {"timestamp with time zone"},
             "seq": {"bigint"}}
_SQLITE_TYPES = {"digest": "BLOB", "uuid": "BLOB", "blob": "BLOB", "text": "TEXT",
                 "int": "INTEGER", "time": "INTEGER", "seq": "INTEGER"}


def _pg_check(column: Column) -> str | None:
    if column.check == "len32":
        return f"(octet_length({column.name}) = 32)"
    if column.check == "mult32":
        return f"((octet_length({column.name}) % 32) = 0)"
    return None


def _sqlite_checks(column: Column) -> list[str]:
    found = {"len32": [f"length({column.name}) = 32"],
             "mult32": [f"length({column.name}) % 32 = 0"]}.get(column.check or "", [])
    if column.type == "uuid":  # a BLOB here: PostgreSQL's uuid type holds the length
        found.append(f"length({column.name}) = 16")
    return found


async def test_postgres_schema_matches_the_layout(pg_store_dsn: str) -> None:
    async with await Store.connect(pg_store_dsn, min_size=1, max_size=1) as store:
        await store.init_schema()
    with psycopg.connect(pg_store_dsn) as conn:
        for table, columns in TABLES.items():
            rows = conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = %s ORDER BY ordinal_position", (table,)).fetchall()
            assert [r[0] for r in rows] == [c.name for c in columns], table
            checks = " ".join(r[0] for r in conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = %s::regclass AND contype = 'c'", (table,)).fetchall())
            for (_, data_type, nullable), column in zip(rows, columns, strict=True):
                assert data_type in _PG_TYPES[column.type], (table, column)
                assert (nullable == "YES") == column.nullable, (table, column)
                wanted = _pg_check(column)
                assert wanted is None or wanted in checks, (table, column, checks)
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'immagent%%'").fetchall()}
        assert tables == set(TABLES)
        for name, index in INDEXES.items():
            if index.sqlite_only:
                continue
            (definition,) = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                                         (name,)).fetchone() or ("",)
            keys = (*index.columns, "seq") if index.log_order else index.columns
            assert f"ON public.{index.table} USING btree ({', '.join(keys)})" in definition


async def test_sqlite_schema_matches_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.db"
    async with await Store.connect(f"sqlite:///{path}") as store:
        await store.init_schema()
    with sqlite3.connect(path) as conn:
        tables = {r[0]: r[1] for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
            "AND name LIKE 'immagent%'")}
        assert set(tables) == set(TABLES)
        for table, columns in TABLES.items():
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            assert [r[1] for r in info] == [c.name for c in columns], table
            ddl = re.sub(r"\s+", " ", tables[table])
            for (_, _, declared, notnull, default, pk), column in zip(info, columns,
                                                                       strict=True):
                assert declared == _SQLITE_TYPES[column.type], (table, column)
                # An INTEGER PRIMARY KEY is the rowid: never NULL whatever it declares. An
                # absent BLOB may be spelled as an empty one (it costs no payload byte).
                absent_as_empty = column.nullable and notnull and default == "x''"
                assert bool(notnull or pk) == (not column.nullable) or absent_as_empty, (
                    table, column)
                for check in _sqlite_checks(column):
                    assert f"CHECK ({check}" in ddl or f"CHECK (parent_id IS NULL OR {check}" \
                        in ddl, (table, column, ddl)
        for name, index in INDEXES.items():
            if index.sqlite_only:  # on an expression: PRAGMA index_info names no column
                (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?",
                                      (name,)).fetchone()
                assert sql.endswith(f"({', '.join(index.columns)})"), (name, sql)
            else:
                listed = [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
                assert listed == list(index.columns), name  # + the rowid (seq), implicitly
            (owner,) = conn.execute("SELECT tbl_name FROM sqlite_master WHERE name = ?",
                                    (name,)).fetchone()
            assert owner == index.table
