"""Shared pieces of the benchmarks: fixed-size texts, database plumbing, timing, tables.

Both sides of every comparison (immagent and LangGraph) take their texts from here, so
they store exactly the same logical payload.
"""

from __future__ import annotations

import math
import random
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import psycopg

__all__ = [
    "BACKENDS",
    "ECHO_PREFIX",
    "REPLY_BYTES",
    "TURN_PAYLOAD",
    "USER_BYTES",
    "Backend",
    "CorpusStored",
    "ForkResult",
    "Latency",
    "LinearPoint",
    "System",
    "Timer",
    "curve_points",
    "drop_database",
    "filler",
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
#: What the offline model ``immagent/echo`` puts before the user's text.
ECHO_PREFIX = "Echo: "
#: UTF-8 size of every assistant reply (LangGraph's canned node mirrors the offline model).
REPLY_BYTES = USER_BYTES + len(ECHO_PREFIX)
#: Logical payload of one turn: the user message plus the reply, content bytes only.
TURN_PAYLOAD = USER_BYTES + REPLY_BYTES

_WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7))
    for i in range(512)
]


def filler(seed: str, size: int) -> str:
    """Deterministic pseudo-random lowercase words of exactly ``size`` ASCII bytes.

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
    text = " ".join(parts)[:size]
    # The echo model strips trailing whitespace; keep every text's size exact.
    return text[:-1] + "x" if text.endswith(" ") else text


def user_text(thread: str, turn: int) -> str:
    """The user message of ``turn`` in ``thread``: unique, exactly USER_BYTES bytes."""
    head = f"[{thread} t{turn}] "
    return head + filler(head, USER_BYTES - len(head))


def reply_text(user: str) -> str:
    """The reply ``immagent/echo`` gives to ``user`` (REPLY_BYTES bytes for a user text)."""
    return ECHO_PREFIX + user


# --- results ------------------------------------------------------------------------

Backend = Literal["postgres", "sqlite"]
BACKENDS: tuple[Backend, ...] = ("postgres", "sqlite")
#: immagent through ``advance`` (the model call included); immagent through ``Store.append``
#: alone (store only, no model metadata on the messages); LangGraph's checkpointers;
#: LangGraph with immagent's ``ImmAgentSaver`` as the checkpointer; the OpenAI Agents SDK's
#: ``SQLiteSession``; pydantic-ai's ``InMemoryConversationStore``; pydantic-ai-harness's
#: SQLite conversation store.
System = Literal["immagent", "immagent-append", "langgraph", "immagent-saver",
                 "openai-agents", "pydantic-ai", "pydantic-ai-harness"]


@dataclass(frozen=True)
class LinearPoint:
    """Stored bytes of one conversation after ``turns`` turns (a point of the growth curve;
    ``turns == 0`` is the empty store: schema, and nothing else)."""

    system: System
    backend: Backend
    turns: int
    stored_bytes: int
    seconds: float

    @property
    def payload_bytes(self) -> int:
        """Logical content: the user messages and the replies, UTF-8 bytes."""
        return self.turns * TURN_PAYLOAD

    @property
    def bytes_per_turn(self) -> float:
        """Stored bytes / turns (0 for the empty store, N = 0)."""
        return self.stored_bytes / self.turns if self.turns else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "payload_bytes": self.payload_bytes,
                "bytes_per_turn": self.bytes_per_turn}


@dataclass(frozen=True)
class ForkResult:
    """A ``base_turns`` conversation, then ``forks`` forks each advanced ``fork_turns`` times."""

    system: System
    backend: Backend
    base_turns: int
    forks: int
    fork_turns: int
    base_bytes: int
    total_bytes: int
    seconds: float

    @property
    def bytes_per_fork(self) -> float:
        return (self.total_bytes - self.base_bytes) / self.forks

    @property
    def fork_payload_bytes(self) -> int:
        """What one fork adds logically: its own user messages and replies."""
        return self.fork_turns * TURN_PAYLOAD

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_fork": self.bytes_per_fork,
                "fork_payload_bytes": self.fork_payload_bytes}


@dataclass(frozen=True)
class Latency:
    """Latency samples of one operation, in seconds."""

    backend: Backend
    operation: str
    history_turns: int
    samples: tuple[float, ...]
    system: System = "immagent"

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "backend": self.backend, "operation": self.operation,
                "history_turns": self.history_turns, "count": len(self.samples),
                "p50_s": self.p50, "p99_s": self.p99,
                "mean_s": sum(self.samples) / len(self.samples)}


@dataclass(frozen=True)
class CorpusStored:
    """What one system stored for the realistic corpus (benchmarks/corpus.py)."""

    system: System
    backend: Backend
    conversations: int
    turns: int
    raw_bytes: int  # content bytes of every message, repeats included
    empty_bytes: int  # the empty store: schema and nothing else
    stored_bytes: int  # everything, the empty store included
    seconds: float
    #: SQLite only: the file after ``VACUUM INTO`` a copy (as a user's own VACUUM would
    #: leave it; the store never runs one). None where not measured.
    compacted_bytes: int | None = None

    @property
    def ratio(self) -> float:
        """Stored bytes / raw payload bytes (the empty store included)."""
        return self.stored_bytes / self.raw_bytes

    @property
    def net_ratio(self) -> float:
        """(Stored bytes - the empty store) / raw payload bytes."""
        return (self.stored_bytes - self.empty_bytes) / self.raw_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "net_ratio": self.net_ratio}


def curve_points(turns: int) -> list[int]:
    """Where to sample the growth curve up to ``turns``: 10, 20, 50, 100, 200, 500, ..."""
    points: list[int] = []
    base = 10
    while base <= turns:
        points.extend(p for p in (base, 2 * base, 5 * base) if p <= turns)
        base *= 10
    if not points or points[-1] != turns:
        points.append(turns)
    return points


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


def compacted_sqlite_bytes(path: Path) -> int:
    """Bytes of a SQLite database once compacted: ``VACUUM INTO`` a copy beside it (the
    original is not touched), measured, then removed. B-tree pages filled by inserts in
    random key order (immagent's digests) are about 80 % full; the copy's are full."""
    copy = path.with_name(path.name + ".compacted")
    remove_sqlite_files(copy)
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("VACUUM INTO ?", (str(copy),))
        conn.close()
        return copy.stat().st_size
    finally:
        remove_sqlite_files(copy)


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


_NUMERIC = re.compile(r"^([-+]?[\d.,]+( ?(B|KiB|MiB|GiB|%|x|/s))?|-)$")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned text table: numeric columns right-aligned, text left-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(_NUMERIC.match(r[i]) for r in cells[1:])
               for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = zip(row, widths, numeric, strict=True)
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in parts).rstrip()

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
