"""The SQLite backend's walks through ``refs``: linear in the refs, however they are spread.

A row's refs are one BLOB of concatenated 32-byte digests. SQL splits it with substr(),
and substr() of a value that spills into overflow pages reads the whole value each time:
a recursive walk splitting a node of n refs position by position read n x 32n bytes (one
append of 80,000 messages: verify 485 s, gc 67-80 s, issue 20 item 3). So refs are split
in SQL only while they are short (``SPLIT_IN_SQL`` bytes, which stay in the row's own page
whatever the page size, so substr() reads them in place); a longer value is read once and
split here, in Python. The walk then costs O(refs) whatever one row holds.

``mark`` fills ``temp.immagent_reach`` with every digest reachable from its roots, in
rounds: a recursive query walks everything it can split in SQL (and the first ref of a long
row: a node's parent, so chains of long nodes stay one query), marking the long rows it
expands; their other refs, split here, are the next round's roots. The query never expands
a row an earlier round expanded, so each row is expanded once; rounds only continue while
a long row's elements have refs of their own, which well-formed data never has (elements
are leaves). Marked rows also say whether a state links to them: gc checks those whatever
their stored kind.

Readers are ``query_only`` (a guard against writing the database file by mistake); a walk
on one lifts it for its temporary tables only, which are the connection's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

__all__ = ["PICKED_STATES", "SPLIT_IN_SQL", "begin", "end", "mark", "split"]

#: Longest refs value (bytes: 24 digests) split by substr() in SQL. A turn's node holds its
#: parent and 2-10 messages; anything longer is split once in Python.
SPLIT_IN_SQL = 24 * 32

_TABLES = (
    # digest: reached; linked: a root (a state's ref); big: 1 = a long row expanded in SQL
    # up to its first ref (the rest still to split), 2 = split.
    "CREATE TEMP TABLE IF NOT EXISTS immagent_reach (digest BLOB PRIMARY KEY, "
    "linked INTEGER NOT NULL, big INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS temp.immagent_reach_big ON immagent_reach (big) WHERE big = 1",
    # The roots of the next round.
    "CREATE TEMP TABLE IF NOT EXISTS immagent_next (digest BLOB PRIMARY KEY, "
    "linked INTEGER NOT NULL) WITHOUT ROWID",
    # The states a walk starts from, when not all of them.
    "CREATE TEMP TABLE IF NOT EXISTS immagent_ids (id BLOB PRIMARY KEY) WITHOUT ROWID",
)
# Emptied, not dropped, after a walk: a connection keeps its tables, since creating and
# dropping them changes its schema, which makes it prepare every cached statement again.
_EMPTY = tuple(f"DELETE FROM temp.{t}" for t in ("immagent_reach", "immagent_next",
                                                   "immagent_ids"))

# One round. A row (a, i) means "asset a is reached; its i-th ref is being followed": each
# step descends into that ref (k = 0) or moves to the next one (k = 1). Marker rows are
# never expanded: (a, -1) says a is a long row, expanded here up to its first ref only
# (k = 2), and (a, -2) that a is a root a state links to. After the first round a row is
# expanded only if no earlier round reached it (an INSERT reads its own table as it was
# before the statement; the first round has nothing to look up, and inserts as it goes).
# UNION drops repeats, so a row shared by many parents is expanded once. The flags of a
# digest's rows are merged by the upsert (each kept at its largest).
_ROUND = """
    INSERT INTO temp.immagent_reach (digest, linked, big)
    WITH RECURSIVE walk(a, i) AS (
        SELECT digest, 0 FROM temp.immagent_next
        UNION ALL
        SELECT digest, -2 FROM temp.immagent_next WHERE linked
        UNION
        SELECT CASE t.k WHEN 0 THEN substr(x.refs, 32 * w.i + 1, 32) ELSE w.a END,
               CASE t.k WHEN 0 THEN 0 WHEN 1 THEN w.i + 1 ELSE -1 END
          FROM walk w
          JOIN immagent_assets x ON x.digest = w.a
          JOIN (SELECT 0 AS k UNION ALL SELECT 1 UNION ALL SELECT 2) t
         WHERE w.i >= 0 {unseen}
           AND CASE t.k
                 WHEN 0 THEN 32 * w.i < length(x.refs)
                             AND (w.i = 0 OR length(x.refs) <= :small)
                 WHEN 1 THEN 32 * (w.i + 1) < length(x.refs) AND length(x.refs) <= :small
                 ELSE w.i = 0 AND length(x.refs) > :small
               END
    )
    SELECT a, i = -2, i = -1 FROM walk WHERE i <= 0
    ON CONFLICT (digest) DO UPDATE SET linked = max(linked, excluded.linked),
                                       big = max(big, excluded.big)
"""
_FIRST_ROUND = _ROUND.format(unseen="")
_LATER_ROUND = _ROUND.format(
    unseen="AND (w.i > 0 OR w.a NOT IN (SELECT digest FROM temp.immagent_reach))")


def split(refs: object, start: int = 0) -> Iterator[bytes]:
    """The 32-byte digests in a refs value from position ``start`` (a damaged value of
    another type, or a trailing partial digest, yields what it can: verify reports it)."""
    data = refs if isinstance(refs, bytes) else (
        refs.encode("utf-8", "surrogatepass") if isinstance(refs, str) else b"")
    return (data[i:i + 32] for i in range(32 * start, len(data) - 31, 32))


def begin(conn: sqlite3.Connection) -> bool:
    """Make the walk's temporary tables if this connection has none yet (on a reader,
    lifting query_only for them); returns whether query_only was on (``end`` puts it
    back)."""
    reader = bool(conn.execute("PRAGMA query_only").fetchone()[0])
    if reader:
        conn.execute("PRAGMA query_only = OFF")
    for sql in (*_TABLES, *_EMPTY):
        conn.execute(sql)
    return reader


def end(conn: sqlite3.Connection, reader: bool) -> None:
    """Empty the walk's tables; a reader is query_only again."""
    try:
        for sql in _EMPTY:
            conn.execute(sql)
    finally:
        if reader:
            conn.execute("PRAGMA query_only = ON")


def _roots_of_states(conn: sqlite3.Connection, states: str) -> None:
    """Every ref of the states ``states`` selects (a table expression with ``seq`` and
    ``refs`` columns) into the first round's roots, linked: short refs split in SQL, each
    longer value read once and split here."""
    small = {"small": SPLIT_IN_SQL}
    conn.execute(f"""
        INSERT OR IGNORE INTO temp.immagent_next (digest, linked)
        WITH RECURSIVE srefs(s, i) AS (
            SELECT seq, 0 FROM {states} WHERE length(refs) >= 32 AND length(refs) <= :small
            UNION ALL
            SELECT r.s, r.i + 1 FROM srefs r JOIN immagent_states x ON x.seq = r.s
             WHERE 32 * (r.i + 2) <= length(x.refs)
        )
        SELECT substr(x.refs, 32 * r.i + 1, 32), 1 FROM srefs r
          JOIN immagent_states x ON x.seq = r.s
    """, small)
    cursor = conn.execute(f"SELECT refs FROM {states} WHERE length(refs) > :small", small)
    insert = "INSERT OR IGNORE INTO temp.immagent_next (digest, linked) VALUES (?, 1)"
    while rows := cursor.fetchmany(16):
        for (refs,) in rows:
            conn.executemany(insert, ((d,) for d in split(refs)))


#: The states ``mark(state_ids=...)`` starts from, as a table expression.
PICKED_STATES = ("(SELECT seq, refs, id FROM immagent_states "
                 "WHERE id IN (SELECT id FROM temp.immagent_ids))")


def mark(conn: sqlite3.Connection, *, roots: Sequence[bytes] = (), all_states: bool = False,
         state_ids: Sequence[bytes] = ()) -> None:
    """Fill temp.immagent_reach (made by ``begin``) with everything reachable from
    ``roots``, from the refs of every state (``all_states``) or from those of the states
    with ids ``state_ids`` (then also listed in temp.immagent_ids: ``PICKED_STATES``).
    Absent digests are marked too (reached, just not stored): callers look for them."""
    conn.executemany("INSERT OR IGNORE INTO temp.immagent_next (digest, linked) VALUES (?, 1)",
                     ((d,) for d in roots))
    if all_states:
        _roots_of_states(conn, "immagent_states")
    if state_ids:
        conn.executemany("INSERT OR IGNORE INTO temp.immagent_ids (id) VALUES (?)",
                         ((i,) for i in state_ids))
        _roots_of_states(conn, PICKED_STATES)
    insert = "INSERT OR IGNORE INTO temp.immagent_next (digest, linked) VALUES (?, 0)"
    rounds = 0
    while conn.execute("SELECT 1 FROM temp.immagent_next LIMIT 1").fetchone() is not None:
        conn.execute(_LATER_ROUND if rounds else _FIRST_ROUND, {"small": SPLIT_IN_SQL})
        rounds += 1
        conn.execute("DELETE FROM temp.immagent_next")
        # The long rows this round expanded: their refs past the first, split once here.
        cursor = conn.execute(
            "SELECT x.refs FROM temp.immagent_reach r JOIN immagent_assets x "
            "ON x.digest = r.digest WHERE r.big = 1")
        while rows := cursor.fetchmany(16):
            for (refs,) in rows:
                conn.executemany(insert, ((d,) for d in split(refs, 1)))
        conn.execute("UPDATE temp.immagent_reach SET big = 2 WHERE big = 1")
