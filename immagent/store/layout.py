"""The storage layout, described once: tables, columns, their checks and the indexes.

The two DDLs (``schema.sql`` for PostgreSQL, ``_DDL`` in ``store/sqlite.py``) are written by
hand in each engine's dialect (their types, identity columns and index semantics differ);
``tests/test_schema.py`` reads the schema each engine actually created and checks it
against this description, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["INDEXES", "LOC_OFFSET", "LOC_SHIFT", "TABLES", "Column", "Index"]

#: A chain node's ``loc`` is ``run << LOC_SHIFT | offset``: its offset in its run takes the
#: low LOC_SHIFT bits (docs/layout.md).
LOC_SHIFT = 24
LOC_OFFSET = (1 << LOC_SHIFT) - 1

Type = Literal["digest", "uuid", "blob", "text", "int", "time", "seq"]
Check = Literal["len32", "len16", "mult32"]


class Column(NamedTuple):
    """One column: its logical type, whether it may be NULL, and the check it carries."""

    name: str
    type: Type
    nullable: bool = False
    check: Check | None = None


class Index(NamedTuple):
    """A secondary index. ``log_order``: entries end in ``seq`` (SQLite gets that for free:
    seq is the rowid every index entry ends with; PostgreSQL lists it). ``sqlite_only``:
    an index on an expression SQLite needs where PostgreSQL has a hash index (the digest
    exclusion constraints); its ``columns`` are then that expression."""

    table: str
    columns: tuple[str, ...]
    log_order: bool = False
    sqlite_only: bool = False


TABLES: dict[str, tuple[Column, ...]] = {
    "immagent_schema": (Column("version", "int"), Column("applied_at", "time")),
    "immagent_assets": (
        Column("digest", "digest", check="len32"),
        Column("kind", "int"),
        Column("codec", "int"),
        # NULL for no refs on PostgreSQL, an empty BLOB on SQLite (which costs no byte).
        Column("refs", "blob", nullable=True, check="mult32"),
        Column("body", "blob"),
    ),
    "immagent_nodes": (
        Column("loc", "seq"),
        Column("kind", "int"),
        Column("codec", "int"),
        Column("count", "int"),
        Column("depth", "int", nullable=True),  # a run's first row only
        Column("digest", "digest", check="len32"),
        Column("parent", "digest", nullable=True, check="len32"),  # a run's first row only
        # NULL for no out-of-line elements on PostgreSQL, an empty BLOB on SQLite.
        Column("refs", "blob", nullable=True, check="mult32"),
        Column("peaks", "blob", nullable=True, check="mult32"),
        Column("body", "blob"),
    ),
    "immagent_states": (
        Column("id", "uuid"),
        Column("parent_id", "uuid", nullable=True),
        Column("kind", "int"),
        Column("stream", "text"),
        Column("refs", "blob", check="mult32"),
        Column("digest", "digest", check="len32"),
        Column("created_at", "time"),
        Column("body", "blob"),
        Column("seq", "seq"),
    ),
}

INDEXES: dict[str, Index] = {
    "immagent_states_stream": Index("immagent_states", ("kind", "stream"), log_order=True),
    "immagent_states_parent": Index("immagent_states", ("parent_id",)),
    "immagent_nodes_digest": Index("immagent_nodes", ("substr(digest, 1, 8)",),
                                   sqlite_only=True),
}
