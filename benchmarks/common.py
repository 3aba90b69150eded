"""Shared pieces of the benchmarks: fixed-size texts, database plumbing, timing, tables.

Both sides of every comparison (immagent and LangGraph) take their texts from here, so
they store exactly the same logical payload.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

__all__ = [
    "REPLY_BYTES",
    "USER_BYTES",
    "Timer",
    "drop_database",
    "fmt_bytes",
    "fresh_database",
    "growth_exponent",
    "percentile",
    "pg_relation_bytes",
    "print_table",
    "remove_sqlite_files",
    "reply_text",
    "sqlite_file_bytes",
    "user_text",
    "with_database",
]

#: UTF-8 size of every user message the benchmarks send.
USER_BYTES = 200
#: UTF-8 size of every assistant reply (LangGraph's canned node mirrors the offline model).
REPLY_BYTES = 200

_WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7))
    for i in range(512)
]


def _filler(seed: str, size: int) -> str:
    """Deterministic pseudo-random lowercase words, exactly ``size`` ASCII bytes.

    Random words rather than repeated text, so PostgreSQL's TOAST compression (which
    LangGraph's large blobs would get) cannot make either side look better than real prose.
    """
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def user_text(thread: str, turn: int) -> str:
    """The user message of ``turn`` in ``thread``: unique, exactly USER_BYTES bytes."""
    head = f"[{thread} t{turn}] "
    return head + _filler(head, USER_BYTES - len(head))


def reply_text(user: str) -> str:
    """The assistant reply to ``user``: unique per user text, exactly REPLY_BYTES bytes."""
    head = "Reply: "
    return head + _filler(user, REPLY_BYTES - len(head))


# --- PostgreSQL ---------------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def fresh_database(dsn: str, database: str) -> str:
    """Drop and re-create ``database`` on the server of ``dsn``; returns its DSN."""
    admin = with_database(dsn, "postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    return with_database(dsn, database)


async def drop_database(dsn: str, database: str) -> None:
    """Drop ``database`` (if present) on the server of ``dsn``."""
    admin = with_database(dsn, "postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def pg_relation_bytes(dsn: str, tables: Sequence[str]) -> int:
    """Sum of ``pg_total_relation_size`` (heap, TOAST, indexes) of the tables present."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = ANY(%s) AND c.relkind = 'r'"
            " AND n.nspname = current_schema()",
            (list(tables),),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


# --- SQLite -------------------------------------------------------------------------


def sqlite_file_bytes(path: Path) -> int:
    """Bytes of a SQLite database on disk after folding its WAL into the main file."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    total = path.stat().st_size
    for suffix in ("-wal", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            total += side.stat().st_size
    return total


def remove_sqlite_files(path: Path) -> None:
    """Delete a SQLite database and its WAL/SHM/journal side files, if present."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


# --- numbers and tables -------------------------------------------------------------


class Timer:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``)."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, by linear interpolation."""
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def growth_exponent(n1: int, bytes1: int, n2: int, bytes2: int) -> float:
    """k in bytes ~ N**k, from two points: log(b2/b1) / log(n2/n1)."""
    return math.log(bytes2 / bytes1) / math.log(n2 / n1)


def fmt_bytes(n: float) -> str:
    """Human-readable binary size (B, KiB, MiB, GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
