"""What the SQL backends (SQLite, PostgreSQL) share: the state-scan queries, built once for
both (which states of which kind, past which id or log position, whose stream holds which
text; the backends differ only in their placeholder and in how they fold case, which they
pass in as a Dialect), the rooted-states query, and the exception that aborts a write
transaction with its result."""

from __future__ import annotations

from typing import Any, NamedTuple
from uuid import UUID

from immagent.records import StateRow
from immagent.store.backend import WriteResult

__all__ = ["ROOTED_STATES", "Dialect", "StateQueries", "WriteAborted", "count_query",
           "scan_query", "state_filter", "stream_query"]

#: ``rooted(id)``: the states whose lineage ends, reached from a root (no parent, or a parent
#: not stored) through children; every other state runs into a parent cycle. UNION ALL: a
#: state has one parent, so each is reached at most once, and cycles never.
ROOTED_STATES = """
    WITH RECURSIVE rooted(id) AS (
        SELECT s.id FROM immagent_states s
         WHERE s.parent_id IS NULL
            OR NOT EXISTS (SELECT 1 FROM immagent_states p WHERE p.id = s.parent_id)
        UNION ALL
        SELECT c.id FROM rooted r JOIN immagent_states c ON c.parent_id = r.id
    )
"""


class WriteAborted(Exception):
    """Raised inside a write transaction to roll it back and report ``result``."""

    def __init__(self, result: WriteResult) -> None:
        self.result = result


class Dialect(NamedTuple):
    """How one engine spells a parameter and "stream contains, case-insensitively"."""

    columns: str  # the state columns, in StateRow's order
    mark: str  # the placeholder: "%s" or "?"
    contains: str  # e.g. "strpos(lower(stream), %s) > 0"; the needle is lowercased here
    uuid: type[bytes] | type[UUID]  # how the engine takes a UUID parameter


def state_filter(dialect: Dialect, kind: int | None, *, stream: str | None = None,
                 contains: str | None = None, after: UUID | None = None,
                 newest_first: bool = False) -> tuple[str, list[Any]]:
    """(``WHERE …`` or "", its parameters). ``after`` pages by id: strictly before it when
    ``newest_first``, else after. ``contains`` is literal text (no wildcards to escape)."""
    where: list[str] = []
    params: list[Any] = []
    if kind is not None:
        where.append(f"kind = {dialect.mark}")
        params.append(kind)
    if stream is not None:
        where.append(f"stream = {dialect.mark}")
        params.append(stream)
    if after is not None:
        where.append(f"id {'<' if newest_first else '>'} {dialect.mark}")
        params.append(after.bytes if dialect.uuid is bytes else after)
    if contains is not None:
        where.append(dialect.contains)
        params.append(contains.lower())
    return (f"WHERE {' AND '.join(where)}" if where else ""), params


def scan_query(dialect: Dialect, kind: int | None, *, after: UUID | None, limit: int,
               newest_first: bool, contains: str | None) -> tuple[str, list[Any]]:
    """States of ``kind`` in id order, keyset-paged past ``after`` (Backend.scan_states)."""
    clause, params = state_filter(dialect, kind, after=after, contains=contains,
                                  newest_first=newest_first)
    return (f"SELECT {dialect.columns} FROM immagent_states {clause} ORDER BY id "
            f"{'DESC' if newest_first else 'ASC'} LIMIT {dialect.mark}", [*params, limit])


def stream_query(dialect: Dialect, kind: int, stream: str, *, after_seq: int | None,
                 limit: int, newest_first: bool) -> tuple[str, list[Any]]:
    """A stream's states in log order, paged past ``after_seq`` (Backend.stream_states).
    ORDER BY names the index's leading columns too (equal here) so the engine walks the
    (kind, stream, seq) index instead of sorting."""
    clause, params = state_filter(dialect, kind, stream=stream)
    if after_seq is not None:
        clause += f" AND seq {'<' if newest_first else '>'} {dialect.mark}"
        params.append(after_seq)
    order = "DESC" if newest_first else "ASC"
    return (f"SELECT {dialect.columns} FROM immagent_states {clause} "
            f"ORDER BY kind {order}, stream {order}, seq {order} LIMIT {dialect.mark}",
            [*params, limit])


def count_query(dialect: Dialect, kind: int, *, stream: str | None,
                contains: str | None) -> tuple[str, list[Any]]:
    """How many states match (Backend.count_states)."""
    clause, params = state_filter(dialect, kind, stream=stream, contains=contains)
    return f"SELECT count(*) FROM immagent_states {clause}", params


class StateQueries:
    """The state scans of ``Backend``, for an SQL backend that supplies its dialect and how
    it runs a query (``_states``: rows; ``_count``: one number)."""

    _dialect: Dialect

    async def _states(self, operation: str, sql: str,
                      params: list[Any]) -> list[StateRow]:
        raise NotImplementedError

    async def _count(self, operation: str, sql: str, params: list[Any]) -> int:
        raise NotImplementedError

    async def scan_states(self, kind: int | None, *, after: UUID | None = None,
                          limit: int = 100, newest_first: bool = False,
                          contains: str | None = None) -> list[StateRow]:
        return await self._states("scan_states", *scan_query(
            self._dialect, kind, after=after, limit=limit, newest_first=newest_first,
            contains=contains))

    async def stream_states(self, kind: int, stream: str, *, after_seq: int | None = None,
                            limit: int = 100, newest_first: bool = True) -> list[StateRow]:
        return await self._states("stream_states", *stream_query(
            self._dialect, kind, stream, after_seq=after_seq, limit=limit,
            newest_first=newest_first))

    async def count_states(self, kind: int, *, stream: str | None = None,
                           contains: str | None = None) -> int:
        return await self._count("count_states", *count_query(
            self._dialect, kind, stream=stream, contains=contains))
