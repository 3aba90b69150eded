"""What the SQL backends (SQLite, PostgreSQL) share: the state-scan queries, built once for
both (which states of which kind, past which id or log position, whose stream holds which
text; the backends differ only in their placeholder and in how they fold case, which they
pass in as a Dialect), the rooted-states query, the exception that aborts a write
transaction with its result, and the one that rolls a dry run back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar
from uuid import UUID

from immagent.chains import NodeRow
from immagent.records import StateRow
from immagent.rows import split_refs
from immagent.store.backend import WriteResult
from immagent.store.layout import LOC_OFFSET

__all__ = ["DOOMED_TOTALS", "MOVED_MARKS", "ROOTED_STATES", "Dialect", "Rehearsal",
           "StateQueries", "WriteAborted", "count_query", "followers_query", "heads_query",
           "judge_query", "node_rows", "scan_query", "state_filter", "stream_query"]

T = TypeVar("T")

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


class Rehearsal(Exception, Generic[T]):
    """Raised at the end of a dry run's transaction (a deletion, a sweep) to roll it back
    and report what it did: the dry run runs exactly the statements of the real one, its
    checks included."""

    def __init__(self, result: T) -> None:
        super().__init__("dry run: rolled back")
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


def heads_query(dialect: Dialect, kind: int, *, after: str | None,
                limit: int) -> tuple[str, list[Any]]:
    """The newest state of each of the first ``limit`` streams of ``kind`` past ``after``
    (Backend.stream_heads). A loose index scan on (kind, stream, seq): the recursion finds
    each next stream name with one probe and stops after ``limit`` of them; each stream's
    highest seq is one more probe, and its row one more (an equi-join on the same index,
    or SQLite's rowid). Never reads a stream's other states."""
    m = dialect.mark
    past = f" AND stream > {m}" if after is not None else ""
    columns = ", ".join(f"h.{c.strip()}" for c in dialect.columns.split(","))
    sql = f"""
        WITH RECURSIVE streams(stream, n) AS (
            SELECT stream, 1 FROM (SELECT stream FROM immagent_states
                                    WHERE kind = {m}{past} ORDER BY kind, stream LIMIT 1) f
            UNION ALL
            SELECT (SELECT s.stream FROM immagent_states s
                     WHERE s.kind = {m} AND s.stream > t.stream
                     ORDER BY s.kind, s.stream LIMIT 1), t.n + 1
              FROM streams t WHERE t.stream IS NOT NULL AND t.n < {m}
        ), heads(stream, n, seq) AS (
            SELECT t.stream, t.n, (SELECT max(s.seq) FROM immagent_states s
                                    WHERE s.kind = {m} AND s.stream = t.stream)
              FROM streams t WHERE t.stream IS NOT NULL
        )
        SELECT {columns} FROM heads t
          JOIN immagent_states h ON h.kind = {m} AND h.stream = t.stream AND h.seq = t.seq
         ORDER BY t.n"""
    params: list[Any] = [kind, *([after] if after is not None else []), kind, limit, kind,
                         kind]
    return sql, params


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

    async def stream_heads(self, kind: int, *, after: str | None = None,
                           limit: int = 100) -> list[StateRow]:
        return await self._states("stream_heads", *heads_query(
            self._dialect, kind, after=after, limit=limit))


# -- retention (Backend.retain): one selection for both engines ------------------------------
#
# The engine fills a table ``immagent_plan`` with one row per planned stream (StreamPlan:
# stream, head_seq, latest, newer, every, dropped, mseq, mord, mark, mark_digest) and an
# empty ``immagent_judged`` (id, kind, stream, seq, bytes, doomed, ordinal, marked); these
# statements judge every state of the planned streams in one pass (window functions over
# the (kind, stream, seq) index), never a Python step per state.


def judge_query(kind: int, pin_kind: int, length: str, fence: str = "") -> str:
    """INSERT into ``immagent_judged`` every state of kind ``kind`` in a planned stream
    that is doomed (``StreamPlan``'s rule) or that moves its stream's mark (thinned by
    ``keep_every``: past the old mark, not among the newest ``latest`` nor young enough),
    with its position counted on from the mark (``ordinal``). ``length`` is the engine's
    byte-length function. Kinds are ints, inlined.

    Whether a state has a child or a pin is one probe of the parent_id index per state not
    kept otherwise (the CASE decides in order; scalar subqueries, because PostgreSQL turns
    an EXISTS into a hash of every state's parent, which past work_mem became a scan per
    row: minutes a page). ``fence`` keeps the engine from inlining the verdict into the
    outer filter, which would probe twice per doomed state (PostgreSQL: ``OFFSET 0``)."""
    kind, pin_kind = int(kind), int(pin_kind)
    return f"""
        INSERT INTO immagent_judged (id, kind, stream, seq, bytes, doomed, ordinal, marked)
        WITH ranked AS (
            SELECT s.id, s.stream, s.seq, s.created_at,
                   {length}(s.body) + {length}(s.refs) AS bytes,
                   p.head_seq, p.latest, p.newer, p.every, p.dropped, p.mseq, p.mord,
                   row_number() OVER w AS pos,
                   count(*) OVER (PARTITION BY s.stream) AS total,
                   max(s.seq) OVER (PARTITION BY s.stream) AS newest,
                   count(*) FILTER (WHERE s.seq > p.mseq) OVER w AS after_mark
              FROM immagent_plan p
              JOIN immagent_states s ON s.kind = {kind} AND s.stream = p.stream
            WINDOW w AS (PARTITION BY s.stream ORDER BY s.seq ROWS UNBOUNDED PRECEDING)
        ), judged AS (
            SELECT r.id, r.stream, r.seq, r.bytes, r.mord + r.after_mark AS ordinal,
                   (r.dropped AND r.newest = r.head_seq) AS dropped,
                   (r.every IS NOT NULL AND NOT r.dropped AND r.seq > r.mseq
                    AND r.total - r.pos >= r.latest
                    AND NOT (r.newer IS NOT NULL AND r.created_at >= r.newer)) AS marked,
                   (r.total - r.pos < r.latest
                    OR (r.newer IS NOT NULL AND r.created_at >= r.newer)
                    OR (r.every IS NOT NULL
                        AND (r.seq <= r.mseq OR (r.mord + r.after_mark) % r.every = 0)))
                       AS kept
              FROM ranked r
        ), verdict AS (
            SELECT j.id, j.stream, j.seq, j.bytes, j.ordinal, j.marked,
                   CASE WHEN j.kept AND NOT j.dropped THEN FALSE
                        WHEN NOT j.dropped AND (
                            SELECT c.id FROM immagent_states c
                             WHERE c.parent_id = j.id AND c.kind = {kind} LIMIT 1) IS NULL
                            THEN FALSE  -- a head
                        ELSE (SELECT q.id FROM immagent_states q
                               WHERE q.parent_id = j.id AND q.kind = {pin_kind} LIMIT 1) IS NULL
                   END AS doomed
              FROM judged j {fence}
        )
        SELECT id, {kind}, stream, seq, bytes, doomed, ordinal, marked FROM verdict
         WHERE doomed OR marked
    """


def followers_query(kinds: Sequence[int], length: str) -> str:
    """INSERT into ``immagent_judged``, as doomed, every row of the follower ``kinds``
    whose parent is doomed (a doomed checkpoint's writes). Kinds are ints, inlined."""
    listed = ", ".join(str(int(k)) for k in kinds)
    return f"""
        INSERT INTO immagent_judged (id, kind, stream, seq, bytes, doomed, ordinal, marked)
        SELECT f.id, f.kind, f.stream, f.seq, {length}(f.body) + {length}(f.refs),
               TRUE, 0, FALSE
          FROM immagent_judged d JOIN immagent_states f ON f.parent_id = d.id
         WHERE d.doomed AND f.kind IN ({listed})
    """


#: The new mark of each stream thinned past its old one: its newest thinned position and
#: that position's ordinal (both maxima belong to the same row: ordinals grow with seq).
MOVED_MARKS = """
    SELECT stream, max(seq), max(ordinal) FROM immagent_judged WHERE marked GROUP BY stream
"""
#: What a retention transaction deleted, by kind: count and stored bytes.
DOOMED_TOTALS = """
    SELECT kind, count(*), coalesce(sum(bytes), 0) FROM immagent_judged WHERE doomed
     GROUP BY kind
"""


def node_rows(rows: Sequence[Sequence[Any]], previous: tuple[int, bytes] | None,
              blob: Callable[[Any], Any], integer: Callable[[Any], Any]) -> list[NodeRow]:
    """NodeRows from (loc, digest, kind, count, codec, refs, peaks, body, run depth, run
    parent digest) rows in loc order: a row's parent is the row before it in its run (None
    where that row is missing, which the checks report), or its run's parent. A row whose
    run has lost its first row (run depth None) gets its offset as depth and no parent, so
    the checks report it instead of it going unseen. ``blob`` and ``integer`` turn a
    driver's column values into bytes and ints (SQLite keeps a damaged column's type for
    the checks to report)."""
    out: list[NodeRow] = []
    for loc, digest, kind, count, row_codec, refs, peaks, body, depth, run_parent in rows:
        offset = loc & LOC_OFFSET
        if offset == 0:
            parent = None if run_parent is None else blob(run_parent)
        else:
            parent = previous[1] if previous is not None and previous[0] == loc - 1 else None
        digest = blob(digest)
        out.append(NodeRow(digest, integer(kind), integer(depth or 0) + offset, parent,
                           split_refs(blob(refs)), blob(body),
                           integer(row_codec), None if peaks is None else blob(peaks),
                           integer(count)))
        previous = (loc, digest)
    return out
