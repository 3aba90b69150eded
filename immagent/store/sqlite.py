"""SQLite backend: the embedded default, with exactly PostgresBackend's semantics.

Layout: the same tables as schema.sql. Digests and UUIDs are BLOBs (32 and 16 bytes),
timestamps are integer microseconds since the Unix epoch (UTC), so a state's
``created_at`` round-trips exactly as an aware UTC datetime.

``refs`` is the concatenation of the 32-byte digests a row points at, in order (a node's
parent first), in one BLOB: 32 bytes per edge, nothing for a message (an empty BLOB costs
no payload byte), no index. A side table of edges would store each edge as a row of two
digests plus an index entry (> 100 bytes per edge, three edges per turn); an array encoding
such as JSON would double the size (hex). Recursive queries split the BLOB with substr():
a walk's rows are (asset, position in its refs), so each reachable asset is expanded once
however many parents share it. Since schema 3 only states and a node's out-of-line
elements (bodies over ``chains.INLINE_MAX``) have refs: a step of many messages holds them
in its record, so the substr() walks never split a long refs value of a history.

Concurrency with gc: SQLite has one writer per database file. Every write and the gc sweep
run as ``BEGIN IMMEDIATE`` transactions, which take that write lock at BEGIN, so gc's mark
and sweep are never interleaved with a writer that deduplicated onto an unreferenced asset
(the writer's existence check of what it points at runs inside its own transaction, as in
PostgresBackend). Across processes the lock is SQLite's file lock; a writer that finds it
taken waits up to ``busy_timeout``, then fails with a StoreError naming the file.

No foreign keys: parent_id deliberately is not one (a child outlives its deleted parent,
as in PostgreSQL) and digests inside ``refs`` cannot be one, so PRAGMA foreign_keys stays
at SQLite's default (off) and costs nothing.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar
from uuid import UUID

from immagent import codec
from immagent.assets import NODE_KINDS, Digest, Kind, MissingAsset
from immagent.chains import SPAN, NewNode, NodeRow
from immagent.codec import FIRST_DICTIONARY
from immagent.exceptions import (
    IntegrityError,
    StoreConnectionError,
    StoreError,
    ValidationError,
)
from immagent.records import StateRow, state_from_v1
from immagent.redaction import state_id
from immagent.rows import StoredAsset, join_refs, split_refs, stored_rows
from immagent.store import _migrate
from immagent.store._sqlite_pool import SQLitePool, is_busy, transaction
from immagent.store.backend import (
    SCHEMA_VERSION,
    CodecRefs,
    Head,
    MarkRows,
    Misfit,
    NodeChange,
    Redactor,
    RedactResult,
    RetainResult,
    RetentionPlan,
    RowCheck,
    SweepResult,
    WriteResult,
)
from immagent.store.layout import LOC_OFFSET as _OFFSET
from immagent.store.layout import LOC_SHIFT as _SHIFT
from immagent.store.sql import (
    DOOMED_TOTALS,
    MOVED_MARKS,
    ROOTED_STATES,
    Dialect,
    Rehearsal,
    StateQueries,
    followers_query,
    judge_query,
    node_rows,
)
from immagent.store.sql import WriteAborted as _Abort

__all__ = ["SQLiteBackend"]

log = logging.getLogger("immagent")

T = TypeVar("T")

#: Bound parameters per statement; below SQLite's historical limit of 999.
_CHUNK = 500

# now() in microseconds since the Unix epoch (julianday() has millisecond resolution).
_NOW = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"

_DDL = (
    f"""
    CREATE TABLE IF NOT EXISTS immagent_schema (
        version     INTEGER PRIMARY KEY,
        applied_at  INTEGER NOT NULL DEFAULT ({_NOW})  -- microseconds since the epoch, UTC
    )
    """,
    # The append-only content log (see schema.sql), keyed by digest and WITHOUT ROWID: the
    # digest is stored once, as the key, instead of in the row and again in a unique index
    # (135 B/turn on a 1,000-turn agent), and a lookup is one b-tree descent, not two. The
    # random keys leave pages ~77 % full, which costs less than the index once bodies are
    # compressed (measured before compression: 844 against 729 + 135 B/turn). `body` is
    # last so reading digest, kind or refs never touches a long body's overflow pages.
    # `codec` says how the body is stored (immagent.codec); 0 and 1 cost no payload byte.
    # No timestamp, as in PostgreSQL: gc needs none and each turn adds three of these rows.
    """
    CREATE TABLE IF NOT EXISTS immagent_assets (
        digest      BLOB    PRIMARY KEY CHECK (length(digest) = 32),
        kind        INTEGER NOT NULL,
        codec       INTEGER NOT NULL DEFAULT 0,
        refs        BLOB    NOT NULL DEFAULT x'' CHECK (length(refs) % 32 = 0),
        body        BLOB    NOT NULL
    ) WITHOUT ROWID
    """,
    # Every client's states (see schema.sql). seq is the commit-order position in the log:
    # the rowid, so it costs no index, and AUTOINCREMENT never reuses a deleted row's seq,
    # like PostgreSQL's identity column (a replacement takes the seq of the row it replaces).
    """
    CREATE TABLE IF NOT EXISTS immagent_states (
        id          BLOB    NOT NULL UNIQUE CHECK (length(id) = 16),
        parent_id   BLOB    CHECK (parent_id IS NULL OR length(parent_id) = 16),
        kind        INTEGER NOT NULL,
        stream      TEXT    NOT NULL,
        refs        BLOB    NOT NULL CHECK (length(refs) % 32 = 0),
        digest      BLOB    NOT NULL CHECK (length(digest) = 32),
        created_at  INTEGER NOT NULL,           -- microseconds since the Unix epoch, UTC
        body        BLOB    NOT NULL,
        seq         INTEGER PRIMARY KEY AUTOINCREMENT
    )
    """,
    # Every SQLite index entry ends with the rowid (seq), so (kind, stream) already serves
    # "a stream's states in log order" without storing seq twice.
    "CREATE INDEX IF NOT EXISTS immagent_states_stream ON immagent_states (kind, stream)",
    "CREATE INDEX IF NOT EXISTS immagent_states_parent ON immagent_states (parent_id)",
    # Chain nodes (see schema.sql and immagent/chains.py), clustered by run: `loc` is the
    # rowid, (run << 24) | the node's offset in its run, so a run is one range of the table
    # b-tree (a rowid table keeps rows up to a page inline; WITHOUT ROWID spills past
    # ~2 KB). A node's parent is the row before it; a run's first row names the node it
    # continues from (`parent`, NULL for a chain's root) and its depth, NULL on every
    # other row (a NULL costs one header byte). Nodes are found by digest through an index
    # on its first 8 bytes (20 instead of ~45 bytes an entry; the digest itself is compared
    # in the row, and the single writer checks for a node before inserting it, so it
    # stays unique).
    """
    CREATE TABLE IF NOT EXISTS immagent_nodes (
        loc     INTEGER PRIMARY KEY,
        kind    INTEGER NOT NULL,
        codec   INTEGER NOT NULL DEFAULT 0,
        count   INTEGER NOT NULL,
        depth   INTEGER,
        digest  BLOB    NOT NULL CHECK (length(digest) = 32),
        parent  BLOB    CHECK (length(parent) = 32),
        refs    BLOB    NOT NULL DEFAULT x'' CHECK (length(refs) % 32 = 0),
        peaks   BLOB    CHECK (length(peaks) % 32 = 0),
        body    BLOB    NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS immagent_nodes_digest ON immagent_nodes (substr(digest, 1, 8))",
)

# `r` is always the first row of `n`'s run: its depth, and its parent (a run's first
# node's parent; the row before it for every other node).
_NODE_COLUMNS = ("n.loc, n.digest, n.kind, n.count, n.codec, n.refs, n.peaks, n.body, "
                 f"r.depth, CASE WHEN n.loc & {_OFFSET} = 0 THEN r.parent END")
_RUN_START = f"immagent_nodes r ON r.loc = n.loc >> {_SHIFT} << {_SHIFT}"
# A node by digest: the expression index on its first 8 bytes, then the digest itself.
_BY_DIGEST = "substr(n.digest, 1, 8) = substr({d}, 1, 8) AND n.digest = {d}"
# From a run (seg.run) to the run its first node continues: the parent's run and loc.
_UP = f"""
    SELECT p.loc >> {_SHIFT}, p.loc FROM seg
      JOIN immagent_nodes r ON r.loc = seg.run << {_SHIFT}
      JOIN immagent_nodes p ON substr(p.digest, 1, 8) = substr(r.parent, 1, 8)
                           AND p.digest = r.parent
"""
# The runs of a lineage: from the head's run to the root's, each with the last loc the
# lineage uses in it. UNION: a damaged row that makes runs loop ends the walk.
_SEGMENTS = f"""
    seg(run, hi) AS (
        SELECT n.loc >> {_SHIFT}, n.loc FROM immagent_nodes n WHERE {_BY_DIGEST.format(d=":head")}
        UNION
        {_UP} WHERE r.depth > :since
    )
"""
_CHAIN_NODES = f"""
    WITH RECURSIVE {_SEGMENTS}
    SELECT {_NODE_COLUMNS} FROM seg
      JOIN immagent_nodes r ON r.loc = seg.run << {_SHIFT}
      JOIN immagent_nodes n ON n.loc BETWEEN seg.run << {_SHIFT} AND seg.hi
     WHERE r.depth + (n.loc & {_OFFSET}) >= :since
     ORDER BY n.loc
"""
_HEAD_DEPTH = f"""
    SELECT r.depth + (n.loc & {_OFFSET}) FROM immagent_nodes n JOIN {_RUN_START}
     WHERE {_BY_DIGEST.format(d=":head")}
"""

_STATE_COLUMNS = "id, parent_id, kind, stream, refs, body, digest, created_at, seq"
_ASSET_COLUMNS = "digest, kind, refs, body, codec"

# Roots passed as one BLOB of concatenated digests: no limit on their number. Indexed by
# position (n), never by copying the rest of the BLOB, which would be quadratic.
_BLOB_ROOTS = """
    roots(d, n) AS (
        SELECT substr(:roots, 1, 32), 0 WHERE length(:roots) >= 32
        UNION ALL
        SELECT substr(:roots, 32 * (n + 1) + 1, 32), n + 1 FROM roots
         WHERE 32 * (n + 2) <= length(:roots)
    )
"""

# The refs of states (all, or those whose seq is in `picked`), split by position.
_STATE_REFS = """
    srefs(s, i) AS (
        SELECT seq, 0 FROM {states} WHERE length(refs) >= 32
        UNION ALL
        SELECT r.s, r.i + 1 FROM srefs r JOIN immagent_states x ON x.seq = r.s
         WHERE 32 * (r.i + 2) <= length(x.refs)
    ),
    state_refs(src, dst) AS (
        SELECT x.id, substr(x.refs, 32 * r.i + 1, 32)
          FROM srefs r JOIN immagent_states x ON x.seq = r.s
    )
"""

# The refs of the assets among `{held}` (a message names its tool schemas), split by
# position: (src, dst) pairs.
_ASSET_REFS = """
    arefs(a, i) AS (
        SELECT digest, 0 FROM immagent_assets WHERE length(refs) > 0 AND digest IN ({held})
        UNION ALL
        SELECT r.a, r.i + 1 FROM arefs r JOIN immagent_assets x ON x.digest = r.a
         WHERE 32 * (r.i + 2) <= length(x.refs)
    ),
    asset_refs(src, dst) AS (
        SELECT x.digest, substr(x.refs, 32 * r.i + 1, 32)
          FROM arefs r JOIN immagent_assets x ON x.digest = r.a
    )
"""

_ELEMENTS_SQL = f"""
    WITH RECURSIVE {_BLOB_ROOTS}
    SELECT x.digest, x.kind, x.refs, x.body, x.codec
      FROM roots JOIN immagent_assets x ON x.digest = roots.d
"""

_ALL_STATE_REFS = _STATE_REFS.format(states="immagent_states")

# Node kinds, for the migration (ints from the core, safe to inline).
_NODE_KINDS = ", ".join(str(int(k)) for k in sorted(NODE_KINDS))

# The out-of-line refs of the nodes gc marked (runs up to their last live loc).
_MARKED_REFS = f"""
    orefs(a, i) AS (
        SELECT n.loc, 0 FROM temp.immagent_reach_runs rr
          JOIN immagent_nodes n ON n.loc BETWEEN rr.run << {_SHIFT} AND rr.hi
         WHERE length(n.refs) > 0
        UNION ALL
        SELECT o.a, o.i + 1 FROM orefs o JOIN immagent_nodes x ON x.loc = o.a
         WHERE 32 * (o.i + 2) <= length(x.refs)
    ),
    marked_refs(d) AS (
        SELECT substr(x.refs, 32 * o.i + 1, 32) FROM orefs o JOIN immagent_nodes x ON x.loc = o.a
    )
"""

# The lineages of the nodes among `roots(d)`: per run, the last loc they use.
_ROOT_SPANS = f"""
    seg(run, hi) AS (
        SELECT n.loc >> {_SHIFT}, n.loc FROM roots
          JOIN immagent_nodes n ON {_BY_DIGEST.format(d="roots.d")}
        UNION
        {_UP}
    ),
    span(run, hi) AS (SELECT run, max(hi) FROM seg GROUP BY run)
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _to_micros(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def _from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


# Row decoding. SQLite keeps whatever value is written into a column, whatever its declared
# type, so a damaged row may hold TEXT where a BLOB belongs, or an INTEGER where TEXT does.
# Decoding never raises on such a value: it is turned into something the one verify-on-read
# (``assets.check_row``/``load_row``, ``records.check_state``/``load_state``) refuses, so
# verify lists the row and goes on and every read raises IntegrityError. BLOB columns are
# always bytes (TEXT as its UTF-8 bytes, anything else as its text: it then fails its
# digest); other columns keep a value of the wrong type as it is.


def _blob(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return str(value).encode()


def _time(value: Any) -> Any:
    if type(value) is not int:
        return value
    try:
        return _from_micros(value)
    except OverflowError:
        return value


def _uuid(value: Any, seq: Any) -> UUID:
    data = _blob(value)
    if len(data) != 16:  # cannot even name the row: nothing to report it by
        raise IntegrityError(f"state row with seq {seq} is damaged: its id is not 16 bytes "
                             "(run store.verify())")
    return UUID(bytes=data)


def _state(row: Sequence[Any]) -> StateRow:
    return StateRow(
        id=_uuid(row[0], row[8]),
        parent_id=None if row[1] is None else (
            UUID(bytes=row[1]) if isinstance(row[1], bytes) and len(row[1]) == 16
            else row[1]),
        kind=row[2], stream=row[3], refs=split_refs(_blob(row[4])), body=_blob(row[5]),
        digest=_blob(row[6]), created_at=_time(row[7]), seq=int(row[8]),
    )


def _state_params(s: StateRow) -> tuple[Any, ...]:
    return (s.id.bytes, None if s.parent_id is None else s.parent_id.bytes, s.kind, s.stream,
            join_refs(s.refs), s.body, s.digest, _to_micros(s.created_at))


def _rows(rows: Sequence[Sequence[Any]]) -> list[StoredAsset]:
    """Asset rows the fast way (``stored_rows``), or one by one when a column of the wrong
    type makes that fail."""
    try:
        return stored_rows(rows)
    except (TypeError, ValueError):
        return [_asset(r) for r in rows]


def _asset(row: Sequence[Any]) -> StoredAsset:
    return StoredAsset(_blob(row[0]), row[1], split_refs(_blob(row[2])), _blob(row[3]),
                       row[4])


def _node_rows(rows: Sequence[Sequence[Any]],
               previous: tuple[int, bytes] | None = None) -> list[NodeRow]:
    return node_rows(rows, previous, _blob, _same)


def _same(value: Any) -> Any:
    return value  # SQLite's ints are ints; a damaged column keeps its type for the checks


def _find_node(conn: sqlite3.Connection, digest: bytes) -> int | None:
    row = conn.execute(f"SELECT n.loc FROM immagent_nodes n WHERE {_BY_DIGEST.format(d='?1')}",
                       (digest,)).fetchone()
    return None if row is None else int(row[0])


def _node_depth(conn: sqlite3.Connection, loc: int) -> int:
    (depth,) = conn.execute("SELECT depth FROM immagent_nodes WHERE loc = ?",
                            (loc >> _SHIFT << _SHIFT,)).fetchone()
    return int(depth) + (loc & _OFFSET)


def _place_nodes(conn: sqlite3.Connection, nodes: Sequence[NewNode]) -> Digest | None:
    """Insert new nodes, each right after its parent when that slot is free (the run goes
    on), else as the first node of a new run that names its parent; a node already stored
    is skipped. Returns a parent that is not stored, if any (nothing is kept then: the
    caller rolls back)."""
    placed: dict[bytes, int] = {}
    insert = ("INSERT INTO immagent_nodes (loc, kind, codec, count, depth, digest, parent, "
              "refs, peaks, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (loc) DO NOTHING")
    for node in nodes:
        if node.digest in placed or _find_node(conn, node.digest) is not None:
            continue
        parent: int | None = None
        if node.parent is not None:
            parent = placed.get(node.parent)
            if parent is None:
                parent = _find_node(conn, node.parent)
            if parent is None:
                return node.parent
        tail = (join_refs(node.refs), node.peaks, node.body)
        if parent is not None and parent & _OFFSET < _OFFSET and conn.execute(
                insert, (parent + 1, node.kind, node.codec, node.added, None, node.digest,
                         None, *tail)).rowcount == 1:
            placed[node.digest] = parent + 1
            continue
        # A root, a fork (the slot after the parent holds another node), or a run at its
        # length limit: a new run, after the last one.
        (last,) = conn.execute("SELECT coalesce(max(loc), 0) FROM immagent_nodes").fetchone()
        loc = ((int(last) >> _SHIFT) + 1) << _SHIFT
        depth = 0 if parent is None else _node_depth(conn, parent) + 1
        conn.execute(insert, (loc, node.kind, node.codec, node.added, depth, node.digest,
                              node.parent, *tail))
        placed[node.digest] = loc
    return None


def _count_rows(conn: sqlite3.Connection) -> int:
    (assets,) = conn.execute("SELECT count(*) FROM immagent_assets").fetchone()
    (nodes,) = conn.execute("SELECT count(*) FROM immagent_nodes").fetchone()
    return int(assets) + int(nodes)


def _stats(rows: Sequence[Sequence[Any]]) -> dict[int, tuple[int, int]]:
    """asset_stats from (kind, rows, body bytes, inline elements) rows: a node kind's inline
    elements count under their element kind (their bytes are the nodes')."""
    stats: dict[int, tuple[int, int]] = {}
    for kind, n, size, inline in rows:
        count, total = stats.get(int(kind), (0, 0))
        stats[int(kind)] = (count + int(n), total + int(size))
        node_type = NODE_KINDS.get(int(kind))
        if node_type is not None and inline:
            element = int(node_type.element_kind)
            count, total = stats.get(element, (0, 0))
            stats[element] = (count + int(inline), total)
    return stats


def _newest(conn: sqlite3.Connection, head: Head) -> UUID | None:
    row = conn.execute("SELECT id FROM immagent_states WHERE kind = ? AND stream = ? "
                       "ORDER BY seq DESC LIMIT 1", (head.kind, head.stream)).fetchone()
    return None if row is None else UUID(bytes=row[0])


def _version(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                       "AND name = 'immagent_schema'").fetchone()
    if row is None:
        return None
    row = conn.execute("SELECT max(version) FROM immagent_schema").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _prepare(conn: sqlite3.Connection, path: str, *, force: bool) -> None:
    """Put the database in WAL mode (and incremental auto-vacuum when it is new).

    At open (``force`` false) a database holding only another application's tables is
    left exactly as it is; migrate() converts it when asked to add immagent's tables.
    """
    (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() == "wal":
        return
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    if not force and tables and _version(conn) is None:
        return
    if not tables:
        # Only settable before the first table exists: lets gc give freed pages back to
        # the file system (PRAGMA incremental_vacuum) instead of keeping a free list.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # 8 KiB pages: a WITHOUT ROWID row keeps up to ~2 KB in its leaf page (4 KiB pages:
        # ~1 KB), and a longer one spills into overflow pages no other row shares. Measured
        # on the realistic corpus: 0.98x -> 0.82x of the raw text; the empty file grows
        # from 36 to 72 KiB. VACUUM applies the size to the still empty file before WAL.
        conn.execute("PRAGMA page_size = 8192")
        conn.execute("VACUUM")
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StoreConnectionError(f"cannot switch SQLite database {path} to WAL mode "
                                   f"(its journal mode stays {mode!r})")


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: agent rows become states of kind AGENT_STATE (digests unchanged),
    in their log order; the agents table goes."""
    cursor = conn.execute(
        "SELECT id, parent_id, created_at, name, model, system_prompt, conversation, "
        "model_config, metadata, digest FROM immagent_agents ORDER BY seq")
    insert = (f"INSERT INTO immagent_states ({_STATE_COLUMNS.removesuffix(', seq')}) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
    while rows := cursor.fetchmany(1000):
        conn.executemany(insert, [_state_params(state_from_v1(
            UUID(bytes=r[0]), None if r[1] is None else UUID(bytes=r[1]), _from_micros(r[2]),
            r[3], r[4], r[5], r[6], r[7], r[8], r[9])) for r in rows])
    conn.execute("DROP TABLE immagent_agents")


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """Version 2 -> 3: chain nodes move from the asset table into runs, holding their
    elements' bodies (immagent/store/_migrate.py); digests unchanged."""
    links = {_blob(d): (_blob(p) if p else None) for d, p in conn.execute(
        f"SELECT digest, substr(refs, 1, 32) FROM immagent_assets WHERE kind IN ({_NODE_KINDS})")}
    plan, runs = _migrate.plan_runs(links)
    dictionaries = _migrate.dictionaries_from(
        _blob(b) for (b,) in conn.execute("SELECT body FROM immagent_assets WHERE kind = ?",
                                          (int(Kind.DICTIONARY),)))
    standalone = {d for (refs,) in conn.execute("SELECT refs FROM immagent_states")
                  for d in split_refs(_blob(refs))}
    records = _migrate.Records(dictionaries, standalone, runs)
    for start in range(0, len(plan), _migrate.BATCH):
        batch = plan[start:start + _migrate.BATCH]
        nodes: dict[bytes, tuple[int, tuple[bytes, ...], bytes]] = {}
        for chunk in _chunks([p.digest for p in batch]):
            for d, k, refs, body, row_codec in conn.execute(
                    f"SELECT {_ASSET_COLUMNS} FROM immagent_assets WHERE digest IN "
                    f"({_marks(len(chunk))})", chunk):
                nodes[_blob(d)] = (k, split_refs(_blob(refs)),
                                   codec.decode(row_codec, _blob(body), dictionaries))
        wanted = list(dict.fromkeys(e for n in nodes.values() for e in n[1][1:]))
        elements: dict[bytes, tuple[int, bytes]] = {}
        for chunk in _chunks(wanted):
            # An element with refs of its own (a message naming its tool schemas) stays an
            # asset: its digest covers its refs, which a record cannot hold.
            elements.update((_blob(d), (c, _blob(b))) for d, c, b in conn.execute(
                f"SELECT digest, codec, body FROM immagent_assets WHERE digest IN "
                f"({_marks(len(chunk))}) AND coalesce(length(refs), 0) = 0", chunk))
        conn.executemany(
            "INSERT INTO immagent_nodes (loc, kind, codec, count, depth, digest, parent, refs, "
            "peaks, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            records.rows(batch, nodes, elements))
        log.info("migrating to schema 3: %d of %d chain nodes", start + len(batch), len(plan))
    conn.execute(f"DELETE FROM immagent_assets WHERE kind IN ({_NODE_KINDS})")
    for chunk in _chunks(sorted(records.deletable())):
        conn.execute(f"DELETE FROM immagent_assets WHERE digest IN ({_marks(len(chunk))})",
                     chunk)


def _redacted(conn: sqlite3.Connection, ids: Sequence[bytes]) -> list[bytes]:
    """Those of ``ids`` (REDACTION state ids, ``redaction.state_id``) that are stored."""
    found: list[bytes] = []
    for chunk in _chunks(ids):
        found += (r[0] for r in conn.execute(
            f"SELECT id FROM immagent_states WHERE id IN ({_marks(len(chunk))}) "
            f"AND kind = {int(Kind.REDACTION)}", chunk))
    return found


def _give_back_free_pages(conn: sqlite3.Connection) -> None:
    """Shrink the file by the pages a sweep freed, inside the sweep's transaction.

    Each execute() of PRAGMA incremental_vacuum frees one page (the sqlite3 module steps a
    statement without result columns once), so it runs once per free page.
    """
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # not INCREMENTAL: keep them
        return
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    for _ in range(int(free)):
        conn.execute("PRAGMA incremental_vacuum")


def _mark(conn: sqlite3.Connection) -> None:
    """gc's mark, into temporary tables of the writer's transaction (SQLite spills them to
    disk; nothing goes through Python): per run, the last loc a live lineage uses; every
    asset a state or a marked node's out-of-line refs name, and what those assets name."""
    for table in ("immagent_reach", "immagent_reach_runs"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{table}")
    conn.execute("CREATE TEMP TABLE immagent_reach_runs (run INTEGER PRIMARY KEY, "
                 "hi INTEGER NOT NULL)")
    conn.execute("CREATE TEMP TABLE immagent_reach (digest BLOB PRIMARY KEY) "
                 "WITHOUT ROWID")
    conn.execute(f"""
        INSERT INTO temp.immagent_reach_runs
        WITH RECURSIVE {_ALL_STATE_REFS},
        seg(run, hi) AS (
            SELECT n.loc >> {_SHIFT}, n.loc FROM state_refs s
              JOIN immagent_nodes n ON {_BY_DIGEST.format(d="s.dst")}
            UNION
            {_UP}
        )
        SELECT run, max(hi) FROM seg GROUP BY run""")
    conn.execute(f"""
        INSERT OR IGNORE INTO temp.immagent_reach
        WITH RECURSIVE {_ALL_STATE_REFS},
        {_MARKED_REFS}
        SELECT dst FROM state_refs WHERE NOT EXISTS (
            SELECT 1 FROM immagent_nodes n WHERE {_BY_DIGEST.format(d="dst")})
        UNION SELECT d FROM marked_refs""")
    # What the marked assets name (a message's tool schemas; those name nothing).
    conn.execute(f"""
        INSERT OR IGNORE INTO temp.immagent_reach
        WITH RECURSIVE {_ASSET_REFS.format(held="SELECT digest FROM temp.immagent_reach")}
        SELECT dst FROM asset_refs""")


#: The chain nodes ``_mark`` did not reach (a FROM clause and its condition).
_DEAD_NODES = f"""
    FROM immagent_nodes WHERE NOT EXISTS (
        SELECT 1 FROM temp.immagent_reach_runs rr
         WHERE rr.run = immagent_nodes.loc >> {_SHIFT} AND immagent_nodes.loc <= rr.hi)"""


def _unmarked(conn: sqlite3.Connection) -> tuple[dict[int, int], int, int]:
    """What a sweep after ``_mark`` deletes: rows per kind (a node's inline elements count
    as rows of their kind), their bytes, and the stored rows (nodes and assets)."""
    removed: dict[int, int] = {}
    freed = rows_gone = 0
    for kind, n, size, inline in conn.execute(
            f"SELECT kind, count(*), coalesce(sum(length(body)), 0), "
            f"coalesce(sum(count - length(refs) / 32), 0) {_DEAD_NODES} GROUP BY kind"):
        removed[int(kind)] = removed.get(int(kind), 0) + int(n)
        freed += int(size)
        rows_gone += int(n)
        element = NODE_KINDS.get(int(kind))
        if element is not None and inline:
            key = int(element.element_kind)
            removed[key] = removed.get(key, 0) + int(inline)
    for kind, n, size in conn.execute(
            "SELECT kind, count(*), coalesce(sum(length(body)), 0) FROM immagent_assets "
            "WHERE digest NOT IN (SELECT digest FROM temp.immagent_reach) GROUP BY kind"):
        removed[int(kind)] = removed.get(int(kind), 0) + int(n)
        freed += int(size)
        rows_gone += int(n)
    return removed, freed, rows_gone


def _mark_codec_refs(conn: sqlite3.Connection, codec_refs: CodecRefs) -> None:
    """Mark what ``codec_refs`` names for the dictionaries the marked rows (assets and
    nodes) are stored with: gc's rule, a row's codec is a reference to its dictionary."""
    used = [int(c) for (c,) in conn.execute(f"""
        SELECT a.codec FROM temp.immagent_reach r JOIN immagent_assets a
            ON a.digest = r.digest WHERE a.codec >= {FIRST_DICTIONARY}
        UNION
        SELECT n.codec FROM temp.immagent_reach_runs rr
          JOIN immagent_nodes n ON n.loc BETWEEN rr.run << {_SHIFT} AND rr.hi
         WHERE n.codec >= {FIRST_DICTIONARY}""")]
    if not used:
        return
    dictionaries = [_asset(r) for r in conn.execute(
        f"SELECT {_ASSET_COLUMNS} FROM immagent_assets WHERE kind = ?",
        (int(Kind.DICTIONARY),))]
    conn.executemany("INSERT OR IGNORE INTO temp.immagent_reach (digest) VALUES (?)",
                     ((d,) for d in codec_refs(used, dictionaries)))


class SQLiteBackend(StateQueries):
    """Backend over one SQLite file: a writer connection and a few readers, in threads."""

    # SQLite's lower() folds ASCII only; immagent_lower is Python's (see _sqlite_pool).
    _dialect = Dialect(columns=_STATE_COLUMNS, mark="?",
                       contains="instr(immagent_lower(stream), ?) > 0", uuid=bytes)

    def __init__(self, pool: SQLitePool) -> None:
        self._pool = pool
        self.path = pool.path

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float = 5.0,
                   readers: int = 4) -> SQLiteBackend:
        """Open (creating if absent) the database file at ``path``.

        ``busy_timeout`` is how long a call waits for another connection's lock before it
        fails; ``readers`` bounds the reader connections used concurrently.
        """
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            raise ValidationError("path", f"must be a str, got {type(path).__name__}", path)
        if (not isinstance(busy_timeout, int | float) or isinstance(busy_timeout, bool)
                or not 0 <= busy_timeout <= 3600):
            raise ValidationError("busy_timeout", f"must be seconds from 0 to 3600, got "
                                  f"{busy_timeout!r}", busy_timeout)
        if not isinstance(readers, int) or isinstance(readers, bool) or not 1 <= readers <= 64:
            raise ValidationError("readers", f"must be an int from 1 to 64, got {readers!r}",
                                  readers)
        pool = await SQLitePool.open(path, float(busy_timeout), readers,
                                     lambda conn: _prepare(conn, path, force=False))
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> bool:
        if self._pool.closed:
            return False
        try:
            await self._pool.read("ping", lambda conn: conn.execute("SELECT 1").fetchone())
        except StoreError:  # ping answers the question rather than raising
            return False
        return True

    def audits(self) -> Self:
        """This backend answers its own audit queries."""
        return self

    # -- schema ---------------------------------------------------------------------------

    async def schema_version(self) -> int | None:
        found: int | None = await self._pool.read("schema_version", _version)
        return found

    async def migrate(self, found: int | None) -> int | None:
        path = self.path

        def upgrade(conn: sqlite3.Connection) -> int | None:
            current = _version(conn)  # under the write lock: another process may have won
            if current != found:
                return current
            if current == 1:
                # The v1 asset table is rebuilt in the new layout (WITHOUT ROWID, a codec
                # column); its bodies stay canonical (codec 0), as they were written.
                conn.execute("ALTER TABLE immagent_assets RENAME TO immagent_assets_v1")
            for statement in _DDL:
                conn.execute(statement)
            if current == 1:
                # In digest order, so the new b-tree's pages are filled, not split.
                conn.execute(f"INSERT INTO immagent_assets ({_ASSET_COLUMNS}) "
                             "SELECT digest, kind, refs, body, 0 FROM immagent_assets_v1 "
                             "ORDER BY digest")
                conn.execute("DROP TABLE immagent_assets_v1")
                _migrate_v1(conn)
            if current in (1, 2):
                _migrate_v2(conn)
                _give_back_free_pages(conn)
            conn.execute("INSERT OR IGNORE INTO immagent_schema (version) VALUES (?)",
                         (SCHEMA_VERSION,))
            return current

        def run(conn: sqlite3.Connection) -> int | None:
            _prepare(conn, path, force=True)  # outside a transaction: journal mode
            return transaction(conn, upgrade)

        result: int | None = await self._pool.write("init_schema", run)
        return result

    # -- writes ---------------------------------------------------------------------------

    async def write(self, assets: Sequence[StoredAsset], states: Sequence[StateRow],
                    require: Sequence[Digest] = (), heads: Sequence[Head] = (),
                    replace: Sequence[UUID] = (), nodes: Sequence[NewNode] = (), *,
                    require_states: Sequence[UUID] = (),
                    refuse: Sequence[Digest] = ()) -> WriteResult:
        asset_rows = [(a.digest, a.kind, join_refs(a.refs), a.body, a.codec) for a in assets]
        refused = {state_id(d).bytes: d for d in refuse}
        state_rows = [_state_params(s) for s in states]
        wanted = list(dict.fromkeys(require))
        replaced = [i.bytes for i in dict.fromkeys(replace)]
        needed = list(dict.fromkeys(require_states))

        def run(conn: sqlite3.Connection) -> None:
            # The single writer serialises this with retention: no lock beyond it.
            if needed:
                found: set[bytes] = set()
                for chunk in _chunks([i.bytes for i in needed]):
                    found.update(r[0] for r in conn.execute(
                        f"SELECT id FROM immagent_states WHERE id IN ({_marks(len(chunk))})",
                        chunk))
                gone = tuple(i for i in needed if i.bytes not in found)
                if gone:
                    raise _Abort(WriteResult(missing_states=gone))
            if refused:
                hit = _redacted(conn, list(refused))
                if hit:
                    raise _Abort(WriteResult(redacted=tuple(refused[i] for i in hit)))
            if asset_rows:
                conn.executemany(
                    f"INSERT INTO immagent_assets ({_ASSET_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING", asset_rows)
            if nodes:
                lost = _place_nodes(conn, nodes)
                if lost is not None:
                    raise _Abort(WriteResult(missing=(lost,)))
            present: set[bytes] = set()
            for chunk in _chunks(wanted):
                present.update(row[0] for row in conn.execute(
                    f"SELECT digest FROM immagent_assets WHERE digest IN ({_marks(len(chunk))})",
                    chunk))
            missing = tuple(d for d in wanted
                            if d not in present and _find_node(conn, d) is None)
            if missing:
                raise _Abort(WriteResult(missing=missing))
            # The single writer serialises every write: no lock beyond BEGIN IMMEDIATE.
            stale = tuple(h for h in heads if _newest(conn, h) != h.state_id)
            if stale:
                raise _Abort(WriteResult(stale=stale))
            kept: dict[bytes, int] = {}  # a replaced row's seq: its place in the log
            for chunk in _chunks(replaced):
                kept.update(conn.execute(
                    f"DELETE FROM immagent_states WHERE id IN ({_marks(len(chunk))}) "
                    "RETURNING id, seq", chunk).fetchall())
            if not state_rows:
                return
            before = conn.total_changes
            conn.executemany(
                f"INSERT INTO immagent_states ({_STATE_COLUMNS.removesuffix(', seq')}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [p for p in state_rows if p[0] not in kept])
            if kept:
                conn.executemany(
                    f"INSERT INTO immagent_states ({_STATE_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    [(*p, kept[p[0]]) for p in state_rows if p[0] in kept])
            if conn.total_changes - before < len(state_rows):  # some ids were there already
                digests = {s.id.bytes: s.digest for s in states}
                conflicts: list[UUID] = []
                for chunk in _chunks(list(digests)):
                    conflicts += [UUID(bytes=i) for i, d in conn.execute(
                        f"SELECT id, digest FROM immagent_states WHERE id IN "
                        f"({_marks(len(chunk))})", chunk) if d != digests[i]]
                if conflicts:
                    raise _Abort(WriteResult(conflicts=tuple(conflicts)))

        try:
            await self._pool.write("write", lambda conn: transaction(conn, run))
        except _Abort as stop:
            return stop.result
        return WriteResult()

    async def delete_states(self, ids: Sequence[UUID], *, stop_at_shared: bool = False,
                            attached: Sequence[int] = (),
                            dry_run: bool = False) -> list[UUID]:
        keys = [i.bytes for i in dict.fromkeys(ids)]
        # Children of attached kinds (attestations) do not keep a parent.
        other_child = ("SELECT 1 FROM immagent_states WHERE parent_id = ?"
                       + (f" AND kind NOT IN ({_marks(len(attached))})" if attached else ""))

        def run(conn: sqlite3.Connection) -> list[UUID]:
            if not stop_at_shared:
                deleted = []
                for chunk in _chunks(keys):
                    deleted += [UUID(bytes=r[0]) for r in conn.execute(
                        f"DELETE FROM immagent_states WHERE id IN ({_marks(len(chunk))}) "
                        "RETURNING id", chunk)]
                order = {k: n for n, k in enumerate(ids)}
                return sorted(deleted, key=order.__getitem__)
            done: list[UUID] = []
            for n, key in enumerate(keys):
                # The single writer serialises these: no sibling deletion interleaves.
                sql = "DELETE FROM immagent_states WHERE id = ?"
                if n:
                    sql += f" AND NOT EXISTS ({other_child})"
                params = (key, key, *attached) if n else (key,)
                if conn.execute(sql, params).rowcount == 0:
                    break
                done.append(UUID(bytes=key))
            return done

        def rehearse(conn: sqlite3.Connection) -> list[UUID]:
            raise Rehearsal(run(conn))

        try:
            result: list[UUID] = await self._pool.write(
                "delete", lambda conn: transaction(conn, rehearse if dry_run else run))
        except Rehearsal as done:
            return list(done.result)
        return result

    async def sweep(self, check: RowCheck, codec_refs: CodecRefs | None = None, *,
                    detached: Sequence[int] = (), dry_run: bool = False) -> SweepResult:
        def sweep(conn: sqlite3.Connection) -> SweepResult:
            _mark(conn)
            missing = conn.execute(f"""
                SELECT digest FROM temp.immagent_reach r WHERE NOT EXISTS
                    (SELECT 1 FROM immagent_assets a WHERE a.digest = r.digest)
                UNION ALL
                SELECT r.parent FROM temp.immagent_reach_runs rr
                  JOIN immagent_nodes r ON r.loc = rr.run << {_SHIFT}
                 WHERE r.parent IS NOT NULL AND NOT EXISTS (
                       SELECT 1 FROM immagent_nodes p WHERE substr(p.digest, 1, 8) =
                              substr(r.parent, 1, 8) AND p.digest = r.parent)
                UNION ALL
                SELECT n.digest FROM temp.immagent_reach_runs rr
                  JOIN immagent_nodes n ON n.loc = rr.hi
                 WHERE NOT EXISTS (SELECT 1 FROM immagent_nodes r
                                    WHERE r.loc = rr.run << {_SHIFT})
                LIMIT 1""").fetchone()
            if missing is not None:
                kept = _count_rows(conn)
                found = missing[0]
                return SweepResult({}, 0, kept, _blob(found))
            # Attached states whose subject is gone (marked from all the same: what they
            # reach is kept one more cycle).
            gone = conn.execute(
                f"DELETE FROM immagent_states WHERE kind IN ({_marks(len(detached))}) AND "
                "(parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM immagent_states p "
                "WHERE p.id = immagent_states.parent_id))", list(detached)
            ).rowcount if detached else 0
            if codec_refs is not None:
                _mark_codec_refs(conn, codec_refs)
            cursor = conn.execute(f"SELECT {_STATE_COLUMNS} FROM immagent_states")
            while rows := cursor.fetchmany(1000):
                check([_state(r) for r in rows])
            cursor = conn.execute(f"""
                SELECT {_NODE_COLUMNS} FROM temp.immagent_reach_runs rr
                  JOIN immagent_nodes r ON r.loc = rr.run << {_SHIFT}
                  JOIN immagent_nodes n ON n.loc BETWEEN rr.run << {_SHIFT} AND rr.hi
                 ORDER BY n.loc""")
            previous: tuple[int, bytes] | None = None
            while rows := cursor.fetchmany(1000):
                batch = _node_rows(rows, previous)
                previous = (rows[-1][0], batch[-1].digest)
                check(batch)
            removed, freed, rows_gone = _unmarked(conn)
            if dry_run:  # everything but the commit: the caller's transaction is rolled back
                raise Rehearsal(SweepResult(removed, freed, _count_rows(conn) - rows_gone,
                                            states_removed=gone))
            if removed:
                conn.execute(f"DELETE {_DEAD_NODES}")
                conn.execute("DELETE FROM immagent_assets "
                             "WHERE digest NOT IN (SELECT digest FROM temp.immagent_reach)")
                _give_back_free_pages(conn)
            kept = _count_rows(conn)
            conn.execute("DROP TABLE temp.immagent_reach")
            conn.execute("DROP TABLE temp.immagent_reach_runs")
            return SweepResult(removed, freed, kept, states_removed=gone)

        try:
            result: SweepResult = await self._pool.write(
                "gc", lambda conn: transaction(conn, sweep))
        except Rehearsal as rehearsed:
            return rehearsed.result  # type: ignore[no-any-return]
        return result

    # -- redaction ------------------------------------------------------------------------

    async def redact(self, digests: Sequence[Digest], states: Sequence[StateRow],
                     node_kinds: Sequence[int], rewrite: Redactor, *,
                     dry_run: bool = False) -> RedactResult:
        ids = {state_id(d).bytes: d for d in dict.fromkeys(digests)}
        kinds = list(dict.fromkeys(int(k) for k in node_kinds))

        def run(conn: sqlite3.Connection) -> RedactResult:
            already = tuple(ids[i] for i in _redacted(conn, list(ids)))
            todo = [d for d in ids.values() if d not in already]
            if not todo or not kinds:
                return RedactResult(0, 0, already)
            leaves: dict[Digest, StoredAsset] = {}
            for chunk in _chunks(todo):
                leaves.update((a.digest, a) for a in _rows(conn.execute(
                    f"SELECT {_ASSET_COLUMNS} FROM immagent_assets "
                    f"WHERE digest IN ({_marks(len(chunk))})", chunk).fetchall()))
            changes: list[NodeChange] = []
            cursor = conn.execute(
                "SELECT digest, kind, refs, body, codec FROM immagent_nodes "
                f"WHERE kind IN ({_marks(len(kinds))}) ORDER BY loc", kinds)
            while batch := cursor.fetchmany(1000):
                changes += rewrite([NodeRow(_blob(d), k, 0, None, split_refs(_blob(r)),
                                            _blob(b), c) for d, k, r, b, c in batch], leaves)
            result = RedactResult(len(changes), len(leaves), already)
            if dry_run or not (changes or leaves):
                raise Rehearsal(result)
            # Freed cells and pages are zeroed, so the erased bytes do not linger in the
            # file's free space (docs/retention.md says what else to run).
            conn.execute("PRAGMA secure_delete = ON")
            try:
                conn.executemany(
                    "UPDATE immagent_nodes SET refs = ?1, body = ?2, codec = ?3 "
                    "WHERE substr(digest, 1, 8) = substr(?4, 1, 8) AND digest = ?4",
                    [(join_refs(c.refs), c.body, c.codec, c.digest) for c in changes])
                for chunk in _chunks(list(leaves)):
                    conn.execute(f"DELETE FROM immagent_assets WHERE digest IN "
                                 f"({_marks(len(chunk))})", chunk)
                wanted = {state_id(d).bytes for d in todo}
                conn.executemany(
                    f"INSERT INTO immagent_states ({_STATE_COLUMNS.removesuffix(', seq')}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    [p for p in map(_state_params, states) if p[0] in wanted])
                _give_back_free_pages(conn)
            finally:
                conn.execute("PRAGMA secure_delete = OFF")
            return result

        try:
            result: RedactResult = await self._pool.write(
                "redact", lambda conn: transaction(conn, run))
        except Rehearsal as rehearsed:
            return rehearsed.result  # type: ignore[no-any-return]
        return result

    # -- retention ------------------------------------------------------------------------

    async def retain(self, plans: Sequence[RetentionPlan], marks: MarkRows, *,
                     dry_run: bool = False) -> RetainResult:
        def run(conn: sqlite3.Connection) -> RetainResult:
            # Temporary tables of the writer connection, emptied in this transaction.
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS immagent_plan (stream TEXT PRIMARY "
                         "KEY, head_seq INTEGER, latest INTEGER, newer INTEGER, every INTEGER,"
                         " dropped INTEGER, mseq INTEGER, mord INTEGER, mark BLOB, "
                         "mark_digest BLOB)")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS immagent_judged (id BLOB, kind "
                         "INTEGER, stream TEXT, seq INTEGER, bytes INTEGER, doomed INTEGER, "
                         "ordinal INTEGER, marked INTEGER)")
            deleted: dict[int, int] = {}
            state_bytes = 0
            for plan in plans:
                if not plan.streams:
                    continue
                conn.execute("DELETE FROM temp.immagent_plan")
                conn.execute("DELETE FROM temp.immagent_judged")
                conn.executemany(
                    "INSERT INTO temp.immagent_plan VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(p.stream, p.head_seq, p.keep_latest,
                      None if p.newer_than is None else _to_micros(p.newer_than),
                      p.keep_every, int(p.drop), p.mark_seq, p.mark_ordinal, p.mark.bytes,
                      p.mark_digest) for p in plan.streams])
                # A concurrent run moved a mark since this plan read it: plan again.
                if conn.execute(
                        "SELECT 1 FROM temp.immagent_plan p LEFT JOIN immagent_states m "
                        "ON m.id = p.mark WHERE m.digest IS NOT p.mark_digest LIMIT 1"
                ).fetchone() is not None:
                    raise Rehearsal(RetainResult({}, 0, stale=True))
                conn.execute(judge_query(plan.kind, Kind.PIN, "length"))
                if plan.followers:
                    conn.execute(followers_query(plan.followers, "length"))
                moved = {str(r[0]): (int(r[1]), int(r[2]))
                         for r in conn.execute(MOVED_MARKS)}
                rows = marks([(plan.kind, s, q, o) for s, (q, o) in sorted(moved.items())])
                gone = [p.mark.bytes for p in plan.streams if p.stream in moved
                        or (p.keep_every is None and p.mark_digest is not None)]
                for chunk in _chunks(gone):
                    conn.execute(f"DELETE FROM immagent_states WHERE id IN "
                                 f"({_marks(len(chunk))})", chunk)
                if rows:
                    conn.executemany(
                        f"INSERT INTO immagent_states ({_STATE_COLUMNS.removesuffix(', seq')})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [_state_params(r) for r in rows])
                conn.execute("DELETE FROM immagent_states WHERE id IN "
                             "(SELECT id FROM temp.immagent_judged WHERE doomed)")
                for kind, n, size in conn.execute(DOOMED_TOTALS):
                    deleted[int(kind)] = deleted.get(int(kind), 0) + int(n)
                    state_bytes += int(size)
            if not dry_run:
                if deleted:
                    _give_back_free_pages(conn)  # as a sweep does: the file shrinks
                return RetainResult(deleted, state_bytes)
            # What a gc would then remove: a sweep's mark, counted (rolled back).
            _mark(conn)
            removed, freed, _ = _unmarked(conn)
            raise Rehearsal(RetainResult(deleted, state_bytes, assets=removed,
                                         asset_bytes=freed))

        try:
            result: RetainResult = await self._pool.write(
                "retain", lambda conn: transaction(conn, run))
        except Rehearsal as done:
            return done.result  # type: ignore[no-any-return]
        return result

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, operation: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one read transaction (one consistent snapshot) on a reader."""
        return await self._pool.read(operation, lambda conn: transaction(conn, fn, "BEGIN"))

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        if not digests:
            return {}
        keys = list(dict.fromkeys(digests))

        def run(conn: sqlite3.Connection) -> dict[Digest, StoredAsset]:
            found: dict[Digest, StoredAsset] = {}
            for chunk in _chunks(keys):
                for row in conn.execute(
                        f"SELECT {_ASSET_COLUMNS} FROM immagent_assets "
                        f"WHERE digest IN ({_marks(len(chunk))})", chunk):
                    asset = _asset(row)
                    found[asset.digest] = asset
            return found

        result: dict[Digest, StoredAsset] = await self._read("get_assets", run)
        return result

    async def get_chain(self, head: Digest, *, context: bool = False
                        ) -> tuple[list[NodeRow], dict[Digest, StoredAsset]]:
        def run(conn: sqlite3.Connection) -> tuple[list[NodeRow], dict[Digest, StoredAsset]]:
            since = 0
            if context:
                found = conn.execute(_HEAD_DEPTH, {"head": head}).fetchone()
                if found is None:
                    return [], {}
                depth = int(found[0])
                since = max(0, depth - depth % SPAN - 1)
            try:
                rows = _node_rows(conn.execute(_CHAIN_NODES, {"head": head, "since": since})
                                  .fetchall())
            except TypeError as e:  # a column of the wrong type (SQLite keeps what it got)
                raise IntegrityError(f"the lineage of node {head.hex()} holds a damaged row: "
                                     f"{e} (run store.verify())") from None
            # The out-of-line elements, in a second statement of the same snapshot, their
            # digests passed as one BLOB split by position.
            wanted = b"".join(dict.fromkeys(d for row in rows for d in row.refs))
            leaves: dict[Digest, StoredAsset] = {}
            if wanted:
                found_rows = conn.execute(_ELEMENTS_SQL, {"roots": wanted}).fetchall()
                leaves.update((r.digest, r) for r in _rows(found_rows))
            return rows, leaves

        result: tuple[list[NodeRow], dict[Digest, StoredAsset]] = (
            await self._read("get_chain", run))
        return result

    async def get_nodes(self, digests: Sequence[Digest]
                        ) -> tuple[dict[Digest, NodeRow], dict[Digest, StoredAsset]]:
        keys = list(dict.fromkeys(digests))
        sql = f"""
            SELECT {_NODE_COLUMNS}, CASE WHEN n.loc & {_OFFSET} = 0 THEN r.parent
                   ELSE (SELECT p.digest FROM immagent_nodes p WHERE p.loc = n.loc - 1) END
              FROM immagent_nodes n JOIN {_RUN_START}
             WHERE {_BY_DIGEST.format(d="?1")}"""

        def run(conn: sqlite3.Connection) -> tuple[dict[Digest, NodeRow],
                                                   dict[Digest, StoredAsset]]:
            found: dict[Digest, NodeRow] = {}
            for digest in keys:  # in-process: a probe costs microseconds
                row = conn.execute(sql, (digest,)).fetchone()
                if row is not None:
                    (node,) = _node_rows([row[:10]])
                    found[digest] = node._replace(parent=None if row[10] is None
                                                  else _blob(row[10]))
            wanted = b"".join(dict.fromkeys(d for n in found.values() for d in n.refs))
            leaves: dict[Digest, StoredAsset] = {}
            if wanted:
                leaves.update((r.digest, r) for r in _rows(
                    conn.execute(_ELEMENTS_SQL, {"roots": wanted}).fetchall()))
            return found, leaves

        result: tuple[dict[Digest, NodeRow], dict[Digest, StoredAsset]] = (
            await self._read("get_nodes", run))
        return result

    async def kinds(self, digests: Sequence[Digest]) -> dict[Digest, int]:
        keys = list(dict.fromkeys(digests))

        def run(conn: sqlite3.Connection) -> dict[Digest, int]:
            found: dict[Digest, int] = {}
            for chunk in _chunks(keys):
                found.update((_blob(d), k) for d, k in conn.execute(
                    f"SELECT digest, kind FROM immagent_assets "
                    f"WHERE digest IN ({_marks(len(chunk))})", chunk))
            for digest in keys:
                if digest not in found:
                    row = conn.execute(f"SELECT n.kind FROM immagent_nodes n WHERE "
                                       f"{_BY_DIGEST.format(d='?1')}", (digest,)).fetchone()
                    if row is not None:
                        found[digest] = row[0]
            return found

        result: dict[Digest, int] = await self._read("kinds", run)
        return result

    async def _stream(self, operation: str, sql: str, params: dict[str, Any],
                      batch_size: int) -> AsyncIterator[list[Any]]:
        """Rows of ``sql`` in batches from one read snapshot on one reader connection."""
        pool = self._pool
        async with pool.reader(operation) as conn:
            def start(c: sqlite3.Connection) -> sqlite3.Cursor:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                c.execute("BEGIN")  # one snapshot for the whole stream
                return c.execute(sql, params)

            cursor = await pool.call(operation, conn, start)
            try:
                while rows := await pool.call(operation, conn,
                                              lambda _: cursor.fetchmany(batch_size)):
                    yield rows
            finally:
                if not pool.closed:  # a closed pool closes the connection, ending the read
                    def end(c: sqlite3.Connection) -> None:
                        cursor.close()
                        if c.in_transaction:
                            c.execute("ROLLBACK")
                    await pool.call(operation, conn, end)

    async def iter_nodes(self, roots: Sequence[Digest] | None = None,
                         batch_size: int = 1000) -> AsyncIterator[list[NodeRow]]:
        if roots is None:
            sql = (f"SELECT {_NODE_COLUMNS} FROM immagent_nodes n LEFT JOIN {_RUN_START} "
                   "ORDER BY n.loc")
            params: dict[str, Any] = {}
        else:
            sql = f"""
                WITH RECURSIVE {_BLOB_ROOTS}, {_ROOT_SPANS}
                SELECT {_NODE_COLUMNS} FROM span
                  JOIN immagent_nodes n ON n.loc BETWEEN span.run << {_SHIFT} AND span.hi
                  LEFT JOIN immagent_nodes r ON r.loc = span.run << {_SHIFT}
                 ORDER BY n.loc"""
            params = {"roots": join_refs(roots)}
        previous: tuple[int, bytes] | None = None
        async for rows in self._stream("iter_nodes", sql, params, batch_size):
            batch = _node_rows(rows, previous)
            previous = (rows[-1][0], batch[-1].digest)
            yield batch

    async def iter_assets(self, roots: Sequence[Digest] | None = None,
                          batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        if roots is None:
            sql = f"SELECT {_ASSET_COLUMNS} FROM immagent_assets ORDER BY digest"
            params: dict[str, Any] = {}
        else:
            sql = f"""
                WITH RECURSIVE {_BLOB_ROOTS}, {_ROOT_SPANS},
                orefs(a, i) AS (
                    SELECT n.loc, 0 FROM span
                      JOIN immagent_nodes n ON n.loc BETWEEN span.run << {_SHIFT} AND span.hi
                     WHERE length(n.refs) > 0
                    UNION ALL
                    SELECT o.a, o.i + 1 FROM orefs o JOIN immagent_nodes x ON x.loc = o.a
                     WHERE 32 * (o.i + 2) <= length(x.refs)
                ),
                held(d) AS (
                    SELECT d FROM roots
                    UNION SELECT substr(x.refs, 32 * o.i + 1, 32) FROM orefs o
                      JOIN immagent_nodes x ON x.loc = o.a
                ),
                {_ASSET_REFS.format(held="SELECT d FROM held")},
                wanted(d) AS (SELECT d FROM held UNION SELECT dst FROM asset_refs)
                SELECT x.digest, x.kind, x.refs, x.body, x.codec
                  FROM wanted JOIN immagent_assets x ON x.digest = wanted.d"""
            params = {"roots": join_refs(roots)}
        async for rows in self._stream("iter_assets", sql, params, batch_size):
            yield _rows(rows)

    async def dangling_refs(self, states: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[MissingAsset]:
        if states is None:
            params: dict[str, Any] = {"limit": limit}
            ctes = f"""
                {_STATE_REFS.format(states="immagent_states")},
                span(run, hi) AS (SELECT loc >> {_SHIFT}, NULL FROM immagent_nodes
                                   WHERE loc & {_OFFSET} = 0)"""
        else:
            params = {"limit": limit, "ids": b"".join(i.bytes for i in states)}
            picked = ("(SELECT seq, refs FROM immagent_states WHERE id IN "
                      "(SELECT substr(:ids, 16 * n + 1, 16) FROM ids))")
            ctes = f"""
                ids(n) AS (
                    SELECT 0 WHERE length(:ids) >= 16
                    UNION ALL SELECT n + 1 FROM ids WHERE 16 * (n + 2) <= length(:ids)
                ),
                {_STATE_REFS.format(states=picked)},
                roots(d) AS (SELECT DISTINCT dst FROM state_refs),
                {_ROOT_SPANS}"""
        # State refs stored nowhere; out-of-line refs that are not stored; runs whose parent
        # node is gone (named by the run's first node); refs of the assets those name (a
        # message's tool schemas) that are not stored.
        held = ("SELECT digest FROM immagent_assets" if states is None else
                "SELECT dst FROM state_refs UNION SELECT substr(x.refs, 32 * o.i + 1, 32) "
                "FROM orefs o JOIN immagent_nodes x ON x.loc = o.a")
        sql = f"""
            WITH RECURSIVE {ctes},
            nodes_in(loc) AS (
                SELECT n.loc FROM span JOIN immagent_nodes n
                    ON n.loc BETWEEN span.run << {_SHIFT}
                   AND coalesce(span.hi, (span.run << {_SHIFT}) | {_OFFSET})
            ),
            orefs(a, i) AS (
                SELECT x.loc, 0 FROM nodes_in JOIN immagent_nodes x ON x.loc = nodes_in.loc
                 WHERE length(x.refs) > 0
                UNION ALL
                SELECT o.a, o.i + 1 FROM orefs o JOIN immagent_nodes x ON x.loc = o.a
                 WHERE 32 * (o.i + 2) <= length(x.refs)
            ),
            {_ASSET_REFS.format(held=held)}
            SELECT dst, src, 0 FROM asset_refs
             WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = asset_refs.dst)
            UNION
            SELECT dst, src, 1 FROM state_refs
             WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = state_refs.dst)
               AND NOT EXISTS (SELECT 1 FROM immagent_nodes n
                                WHERE {_BY_DIGEST.format(d="state_refs.dst")})
            UNION
            SELECT substr(x.refs, 32 * o.i + 1, 32), x.digest, 0 FROM orefs o
              JOIN immagent_nodes x ON x.loc = o.a
             WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m
                                WHERE m.digest = substr(x.refs, 32 * o.i + 1, 32))
            UNION
            SELECT r.parent, r.digest, 0 FROM span
              JOIN immagent_nodes r ON r.loc = span.run << {_SHIFT}
             WHERE r.parent IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM immagent_nodes p WHERE substr(p.digest, 1, 8) =
                          substr(r.parent, 1, 8) AND p.digest = r.parent)
            LIMIT :limit
        """
        rows: list[Any] = await self._read(
            "dangling_refs", lambda conn: conn.execute(sql, params).fetchall())
        return [MissingAsset(_blob(d), UUID(bytes=_blob(s)) if is_state else _blob(s))
                for d, s, is_state in rows if d is not None]

    async def misfit_refs(self, expected: Mapping[int, tuple[int, int]],
                          states: Sequence[UUID] | None = None,
                          limit: int = 10_000) -> list[Misfit]:
        if not expected:
            return []
        if states is None:
            roots: list[Digest] | None = None
        else:
            roots = [d for r in await self.get_states(states) for d in r.refs]

        found: list[Misfit] = []
        probe = "SELECT kind FROM immagent_assets WHERE digest = ?"

        async for batch in self.iter_nodes(roots):
            def check(conn: sqlite3.Connection, batch: list[NodeRow] = batch) -> None:
                # In-process, one probe per ref or parent costs microseconds.
                for node in batch:
                    rule = expected.get(node.kind)
                    if rule is None:
                        continue
                    first, rest = rule
                    if node.parent is not None:
                        parent = conn.execute(
                            f"SELECT n.kind FROM immagent_nodes n WHERE "
                            f"{_BY_DIGEST.format(d='?1')}", (node.parent,)).fetchone()
                        if parent is not None and parent[0] != first:
                            found.append(Misfit(node.digest, node.parent, parent[0], first))
                    for ref in node.refs:
                        target = conn.execute(probe, (ref,)).fetchone()
                        if target is not None and target[0] != rest:
                            found.append(Misfit(node.digest, ref, target[0], rest))

            await self._read("misfit_refs", check)
            if len(found) >= limit:
                break
        return found[:limit]

    async def cyclic_states(self, limit: int = 10_000) -> list[UUID]:
        sql = ROOTED_STATES + """
            SELECT id, seq FROM immagent_states WHERE id NOT IN (SELECT id FROM rooted)
             ORDER BY id LIMIT ?
        """
        rows: list[Any] = await self._read(
            "cyclic_states", lambda conn: conn.execute(sql, (limit,)).fetchall())
        return [_uuid(i, seq) for i, seq in rows]

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        def run(conn: sqlite3.Connection) -> list[Any]:
            return [*conn.execute("SELECT kind, count(*), coalesce(sum(length(body)), 0), 0 "
                                  "FROM immagent_assets GROUP BY kind"),
                    *conn.execute("SELECT kind, count(*), coalesce(sum(length(body)), 0), "
                                  "coalesce(sum(count - length(refs) / 32), 0) "
                                  "FROM immagent_nodes GROUP BY kind")]

        return _stats(await self._read("asset_stats", run))

    async def storage_bytes(self) -> int:
        path = self.path
        busy_ms = int(self._pool.busy_timeout * 1000)

        def run(conn: sqlite3.Connection) -> int:
            # Fold the WAL back into the file first, so the number does not depend on when
            # SQLite last checkpointed. Without waiting: a reader elsewhere may keep part
            # of the WAL alive, and then its size is counted instead.
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
            finally:
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            # The -shm file is a rebuildable index of the WAL, not stored data.
            return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))

        return int(await self._pool.write("storage_bytes", run))

    # -- states ---------------------------------------------------------------------------

    async def _states(self, operation: str, sql: str,
                      params: Sequence[Any] | dict[str, Any]) -> list[StateRow]:
        rows: list[Any] = await self._pool.read(
            operation, lambda conn: conn.execute(sql, params).fetchall())
        return [_state(r) for r in rows]

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]:
        if not ids:
            return []
        keys = list(dict.fromkeys(i.bytes for i in ids))

        def run(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            for chunk in _chunks(keys):
                rows += conn.execute(f"SELECT {_STATE_COLUMNS} FROM immagent_states "
                                     f"WHERE id IN ({_marks(len(chunk))})", chunk).fetchall()
            return rows

        return [_state(r) for r in await self._read("get_states", run)]

    async def _count(self, operation: str, sql: str, params: list[Any]) -> int:
        rows: list[Any] = await self._pool.read(
            operation, lambda conn: conn.execute(sql, params).fetchall())
        return int(rows[0][0])

    async def lineage(self, state_id: UUID, limit: int | None = None) -> list[StateRow]:
        cols = ", ".join(f"s.{c.strip()}" for c in _STATE_COLUMNS.split(","))
        # Without a limit, UNION: a parent cycle repeats a row and ends the walk. With one,
        # UNION ALL stops after `limit` rows, newest first (the recursion's queue order).
        union, cap = ("UNION", "") if limit is None else ("UNION ALL", "LIMIT :limit")
        return await self._states(
            "lineage",
            f"""
            WITH RECURSIVE line({_STATE_COLUMNS}) AS (
                SELECT {_STATE_COLUMNS} FROM immagent_states WHERE id = :id
                {union}
                SELECT {cols} FROM line l JOIN immagent_states s ON s.id = l.parent_id
                {cap}
            )
            SELECT {_STATE_COLUMNS} FROM line
            """, {"id": state_id.bytes, "limit": limit})
