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
however many parents share it. substr() reads a value that spills into overflow pages
whole each time, so only short values are split in SQL; longer ones (a step of many
messages) are read once and split in Python (``_sqlite_walk``), and every walk is O(refs).

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

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar
from uuid import UUID

from immagent.assets import NODE_KINDS, Digest, Kind, MissingAsset
from immagent.codec import FIRST_DICTIONARY
from immagent.exceptions import (
    IntegrityError,
    StoreConnectionError,
    StoreError,
    ValidationError,
)
from immagent.records import StateRow, state_from_v1
from immagent.rows import StoredAsset, join_refs, split_refs, stored_rows, stored_tagged_rows
from immagent.store import _sqlite_walk as walk
from immagent.store._sqlite_pool import SQLitePool, is_busy, transaction
from immagent.store.backend import (
    SCHEMA_VERSION,
    CodecRefs,
    Head,
    MarkRows,
    Misfit,
    RetainResult,
    RetentionPlan,
    RowCheck,
    SweepResult,
    WriteResult,
)
from immagent.store.sql import (
    DOOMED_TOTALS,
    MOVED_MARKS,
    ROOTED_STATES,
    Dialect,
    Rehearsal,
    StateQueries,
    followers_query,
    judge_query,
)
from immagent.store.sql import WriteAborted as _Abort

__all__ = ["SQLiteBackend"]

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
)

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

# The refs of states (all, or those whose seq is in `picked`), split by position; only
# short ones (see _sqlite_walk: a long one is split in Python, once).
_STATE_REFS = """
    srefs(s, i) AS (
        SELECT seq, 0 FROM {states} WHERE length(refs) >= 32 AND length(refs) <= :small
        UNION ALL
        SELECT r.s, r.i + 1 FROM srefs r JOIN immagent_states x ON x.seq = r.s
         WHERE 32 * (r.i + 2) <= length(x.refs)
    ),
    state_refs(src, dst) AS (
        SELECT x.id, substr(x.refs, 32 * r.i + 1, 32)
          FROM srefs r JOIN immagent_states x ON x.seq = r.s
    )
"""

#: Elements of a node fetched by get_chain's first statement (a turn adds two to four).
_INLINE_ELEMENTS = 4

# The chain ending at :head and its nodes' first elements, in one statement (measured ~15 %
# faster than a second statement for the elements, the rest is found by _ELEMENTS_SQL).
# Each node's first ref is its parent, followed while it has the head's kind. UNION (not
# UNION ALL): a damaged refs column pointing back into the chain repeats a row and ends the
# walk instead of looping forever. Element digests are cut from each node's refs by
# position (a constant series: 1 .. _INLINE_ELEMENTS), one primary-key probe each.
_CHAIN_SQL = f"""
    WITH RECURSIVE chain({_ASSET_COLUMNS}) AS (
        SELECT {_ASSET_COLUMNS} FROM immagent_assets WHERE digest = :head
        UNION
        SELECT a.digest, a.kind, a.refs, a.body, a.codec
          FROM chain c JOIN immagent_assets a
            ON a.digest = substr(c.refs, 1, 32) AND a.kind = c.kind
    )
    SELECT 0, {_ASSET_COLUMNS} FROM chain
    UNION ALL
    SELECT 1, x.digest, x.kind, x.refs, x.body, x.codec
      FROM chain c
      JOIN ({" UNION ALL ".join(f"SELECT {i} AS i" for i in range(1, _INLINE_ELEMENTS + 1))}) s
      JOIN immagent_assets x ON x.digest = substr(c.refs, 32 * s.i + 1, 32)
     WHERE 32 * s.i < length(c.refs)
"""
_ELEMENTS_SQL = f"""
    WITH RECURSIVE {_BLOB_ROOTS}
    SELECT x.digest, x.kind, x.refs, x.body, x.codec
      FROM roots JOIN immagent_assets x ON x.digest = roots.d
"""

# Node kinds, for gc's checks (ints from the core, safe to inline).
_NODE_KINDS = ", ".join(str(int(k)) for k in sorted(NODE_KINDS))

# The reached assets gc checks before it sweeps: every row with refs, every node, and every
# row a state or a row links to as its first ref (a node's parent), whatever its kind
# column says (a node whose kind was changed and refs emptied would otherwise mark nothing
# and never be checked). The walk (_sqlite_walk.mark) flags what states link to; a first
# ref is cut from each reached refs value once (substr of its first 32 bytes).
_GC_CHECKED = f"""
    SELECT a.digest, a.kind, a.refs, a.body, a.codec FROM temp.immagent_reach r
      JOIN immagent_assets a ON a.digest = r.digest
     WHERE length(a.refs) > 0 OR a.kind IN ({_NODE_KINDS}) OR r.linked
        OR a.digest IN (SELECT substr(p.refs, 1, 32) FROM temp.immagent_reach pr
                          JOIN immagent_assets p ON p.digest = pr.digest
                         WHERE length(p.refs) > 0)
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


class _Referrers:
    """(missing digest, referrer) pairs, distinct and at most ``limit``, found by splitting
    refs values in Python (each read once, however long)."""

    def __init__(self, missing: set[bytes], limit: int) -> None:
        self.missing = missing
        self.limit = limit
        self.pairs: list[MissingAsset] = []
        self._seen: set[tuple[bytes, bytes]] = set()

    def scan(self, rows: Iterable[Sequence[Any]], *, state: bool) -> None:
        for src, refs in rows:
            if len(self.pairs) >= self.limit:
                return
            source = _blob(src)
            for d in walk.split(refs):
                if d in self.missing and (d, source) not in self._seen:
                    self._seen.add((d, source))
                    self.pairs.append(MissingAsset(d, UUID(bytes=source) if state else source))
                    if len(self.pairs) >= self.limit:
                        return


def _all_dangling(conn: sqlite3.Connection, limit: int) -> list[MissingAsset]:
    """Every (absent digest, referrer) pair of the store, at most ``limit``: short refs
    values split in SQL, longer ones in Python (see _sqlite_walk)."""
    sql = f"""
        WITH RECURSIVE {_STATE_REFS.format(states="immagent_states")},
        pos(a, i) AS (
            SELECT digest, 0 FROM immagent_assets
             WHERE length(refs) > 0 AND length(refs) <= :small
            UNION ALL
            SELECT p.a, p.i + 1 FROM pos p JOIN immagent_assets x ON x.digest = p.a
             WHERE 32 * (p.i + 1) < length(x.refs)
        ),
        edges(src, dst) AS (
            SELECT p.a, substr(x.refs, 32 * p.i + 1, 32)
              FROM pos p JOIN immagent_assets x ON x.digest = p.a
        )
        SELECT dst, src, 1 FROM state_refs
         WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = state_refs.dst)
        UNION
        SELECT dst, src, 0 FROM edges
         WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = edges.dst)
        LIMIT :limit
    """
    small = walk.SPLIT_IN_SQL
    found = [MissingAsset(_blob(d), UUID(bytes=_blob(s)) if is_state else _blob(s))
             for d, s, is_state in conn.execute(sql, {"limit": limit, "small": small})]
    seen = {(m.digest, m.referrer) for m in found}
    probe = "SELECT 1 FROM immagent_assets WHERE digest = ?"
    for table, key, is_state in (("immagent_assets", "digest", False),
                                 ("immagent_states", "id", True)):
        cursor = conn.execute(f"SELECT {key}, refs FROM {table} WHERE length(refs) > ?",
                              (small,))
        while len(found) < limit and (rows := cursor.fetchmany(16)):
            for src, refs in rows:
                referrer: bytes | UUID = UUID(bytes=_blob(src)) if is_state else _blob(src)
                for d in walk.split(refs):
                    if (d, referrer) not in seen and conn.execute(probe, (d,)).fetchone() is None:
                        seen.add((d, referrer))
                        found.append(MissingAsset(d, referrer))
    return found[:limit]


def _swept(conn: sqlite3.Connection, check: RowCheck, codec_refs: CodecRefs | None,
           detached: Sequence[int], dry_run: bool) -> SweepResult:
    """gc after the mark (temp.immagent_reach): refuse a missing asset, delete the attached
    states whose subject is gone, mark what the codecs of marked rows name, check every row
    marked from, delete every unmarked asset."""
    missing = conn.execute(
        "SELECT digest FROM temp.immagent_reach r WHERE NOT EXISTS "
        "(SELECT 1 FROM immagent_assets a WHERE a.digest = r.digest) LIMIT 1").fetchone()
    if missing is not None:
        (kept,) = conn.execute("SELECT count(*) FROM immagent_assets").fetchone()
        return SweepResult({}, 0, int(kept), _blob(missing[0]))
    # Attached states whose subject is gone (marked from all the same: what they reach is
    # kept one more cycle).
    gone = conn.execute(
        f"DELETE FROM immagent_states WHERE kind IN ({_marks(len(detached))}) AND "
        "(parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM immagent_states p "
        "WHERE p.id = immagent_states.parent_id))", list(detached)
    ).rowcount if detached else 0
    if codec_refs is not None:
        used = [int(c) for (c,) in conn.execute(
            "SELECT DISTINCT a.codec FROM temp.immagent_reach r JOIN immagent_assets a "
            f"ON a.digest = r.digest WHERE a.codec >= {FIRST_DICTIONARY}")]
        if used:
            dictionaries = [_asset(r) for r in conn.execute(
                f"SELECT {_ASSET_COLUMNS} FROM immagent_assets WHERE kind = ?",
                (int(Kind.DICTIONARY),))]
            conn.executemany(
                "INSERT OR IGNORE INTO temp.immagent_reach (digest, linked, big) "
                "VALUES (?, 0, 2)", ((d,) for d in codec_refs(used, dictionaries)))
    for sql, decode in ((f"SELECT {_STATE_COLUMNS} FROM immagent_states", _state),
                        (_GC_CHECKED, _asset)):
        cursor = conn.execute(sql)
        while rows := cursor.fetchmany(1000):
            check([decode(r) for r in rows])
    removed: dict[int, int] = {}
    freed = 0
    unmarked = "digest NOT IN (SELECT digest FROM temp.immagent_reach)"
    for kind, n, size in conn.execute(
            "SELECT kind, count(*), coalesce(sum(length(body)), 0) FROM immagent_assets "
            f"WHERE {unmarked} GROUP BY kind"):
        removed[int(kind)] = int(n)
        freed += int(size)
    if dry_run:  # everything but the commit: the caller's transaction is rolled back
        (total,) = conn.execute("SELECT count(*) FROM immagent_assets").fetchone()
        raise Rehearsal(SweepResult(removed, freed, int(total) - sum(removed.values()),
                                    states_removed=gone))
    if removed:
        conn.execute(f"DELETE FROM immagent_assets WHERE {unmarked}")
        _give_back_free_pages(conn)
    (kept,) = conn.execute("SELECT count(*) FROM immagent_assets").fetchone()
    return SweepResult(removed, freed, int(kept), states_removed=gone)


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
                    replace: Sequence[UUID] = (), *,
                    require_states: Sequence[UUID] = ()) -> WriteResult:
        asset_rows = [(a.digest, a.kind, join_refs(a.refs), a.body, a.codec) for a in assets]
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
            if asset_rows:
                conn.executemany(
                    f"INSERT INTO immagent_assets ({_ASSET_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING", asset_rows)
            present: set[bytes] = set()
            for chunk in _chunks(wanted):
                present.update(row[0] for row in conn.execute(
                    f"SELECT digest FROM immagent_assets WHERE digest IN ({_marks(len(chunk))})",
                    chunk))
            missing = tuple(d for d in wanted if d not in present)
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
            # Mark into a temporary table (SQLite spills it to disk; Python only splits
            # long refs values), then sweep what is not in it, all under the write lock.
            walk.begin(conn)
            try:
                walk.mark(conn, all_states=True)
                return _swept(conn, check, codec_refs, detached, dry_run)
            finally:
                walk.end(conn, False)

        try:
            result: SweepResult = await self._pool.write(
                "gc", lambda conn: transaction(conn, sweep))
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
            # What a gc would then remove: the same mark as a sweep's, counted, not swept.
            walk.begin(conn)
            try:
                walk.mark(conn, all_states=True)
                swept = conn.execute(
                    "SELECT kind, count(*), coalesce(sum(length(body)), 0) FROM "
                    "immagent_assets WHERE digest NOT IN (SELECT digest FROM "
                    "temp.immagent_reach) GROUP BY kind").fetchall()
            finally:
                walk.end(conn, False)
            raise Rehearsal(RetainResult(deleted, state_bytes,
                                         assets={int(k): int(n) for k, n, _ in swept},
                                         asset_bytes=sum(int(b) for _, _, b in swept)))

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

    async def get_chain(
        self, head: Digest
    ) -> tuple[list[StoredAsset], dict[Digest, StoredAsset]]:
        def run(conn: sqlite3.Connection) -> tuple[list[StoredAsset],
                                                   dict[Digest, StoredAsset]]:
            rows = conn.execute(_CHAIN_SQL, {"head": head}).fetchall()
            # A compound SELECT yields its parts in order: the nodes (tag 0), newest first
            # (the queue of a one-row-per-step recursion), then the elements (tag 1).
            try:
                chain, elements = stored_tagged_rows(rows)
            except (TypeError, ValueError):  # a column of the wrong type: decode each row
                chain = [_asset(r[1:]) for r in rows if r[0] == 0]
                elements = [_asset(r[1:]) for r in rows if r[0] == 1]
            leaves = {r.digest: r for r in elements}
            # Elements past the first _INLINE_ELEMENTS of a node, in a second statement of
            # the same snapshot (in-process: no round trip), their digests passed as one
            # BLOB split by position: measured 2-3x faster than IN lists of bound parameters.
            rest = b"".join(d for row in chain for d in row.refs[1 + _INLINE_ELEMENTS:]
                            if d not in leaves)
            if rest:
                found = conn.execute(_ELEMENTS_SQL, {"roots": rest}).fetchall()
                try:
                    leaves.update((r.digest, r) for r in stored_rows(found))
                except (TypeError, ValueError):
                    leaves.update((a.digest, a) for a in map(_asset, found))
            return chain, leaves

        result: tuple[list[StoredAsset], dict[Digest, StoredAsset]] = (
            await self._read("get_chain", run))
        return result

    async def iter_assets(self, roots: Sequence[Digest] | None = None,
                          batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        if roots is None:
            sql = f"SELECT {_ASSET_COLUMNS} FROM immagent_assets ORDER BY digest"
        else:
            sql = ("SELECT x.digest, x.kind, x.refs, x.body, x.codec FROM temp.immagent_reach r "
                   "JOIN immagent_assets x ON x.digest = r.digest")
        pool = self._pool
        async with pool.reader("iter_assets") as conn:
            walking = False

            def start(c: sqlite3.Connection) -> sqlite3.Cursor:
                nonlocal walking
                if c.in_transaction:
                    c.execute("ROLLBACK")
                c.execute("BEGIN")  # one snapshot for the whole stream
                if roots is not None:
                    walking = walk.begin(c)
                    walk.mark(c, roots=list(roots))
                return c.execute(sql)

            def end(c: sqlite3.Connection, cursor: sqlite3.Cursor | None) -> None:
                if cursor is not None:
                    cursor.close()
                if roots is not None:
                    walk.end(c, walking)
                if c.in_transaction:
                    c.execute("ROLLBACK")

            try:
                cursor = await pool.call("iter_assets", conn, start)
            except BaseException:
                if not pool.closed:
                    await pool.call("iter_assets", conn, lambda c: end(c, None))
                raise
            try:
                while rows := await pool.call("iter_assets", conn,
                                              lambda _: cursor.fetchmany(batch_size)):
                    yield _rows(rows)
            finally:
                if not pool.closed:  # a closed pool closes the connection, ending the read
                    await pool.call("iter_assets", conn, lambda c: end(c, cursor))

    async def dangling_refs(self, states: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[MissingAsset]:
        if states is None:
            result: list[MissingAsset] = await self._read(
                "dangling_refs", lambda conn: _all_dangling(conn, limit))
            return result
        ids = [i.bytes for i in dict.fromkeys(states)]

        def run(conn: sqlite3.Connection) -> list[MissingAsset]:
            reader = walk.begin(conn)
            try:
                walk.mark(conn, state_ids=ids)
                missing = {_blob(r[0]) for r in conn.execute(
                    "SELECT digest FROM temp.immagent_reach r WHERE NOT EXISTS "
                    "(SELECT 1 FROM immagent_assets m WHERE m.digest = r.digest) LIMIT ?",
                    (limit,))}
                if not missing:
                    return []
                # Who refers to them: each reached refs value read once, split here.
                found = _Referrers(missing, limit)
                found.scan(conn.execute(f"SELECT id, refs FROM {walk.PICKED_STATES}"),
                           state=True)
                found.scan(conn.execute(
                    "SELECT r.digest, x.refs FROM temp.immagent_reach r JOIN immagent_assets x"
                    " ON x.digest = r.digest WHERE length(x.refs) > 0"), state=False)
                return found.pairs
            finally:
                walk.end(conn, reader)

        result = await self._read("dangling_refs", run)
        return result

    async def misfit_refs(self, expected: Mapping[int, tuple[int, int]],
                          states: Sequence[UUID] | None = None,
                          limit: int = 10_000) -> list[Misfit]:
        if not expected:
            return []
        kinds = ", ".join(str(int(k)) for k in sorted(expected))  # ints: safe to inline
        if states is None:
            sql = (f"SELECT digest, kind, refs FROM immagent_assets "
                   f"WHERE kind IN ({kinds}) AND length(refs) > 0")
        else:
            sql = (f"SELECT x.digest, x.kind, x.refs FROM temp.immagent_reach r "
                   f"JOIN immagent_assets x ON x.digest = r.digest "
                   f"WHERE x.kind IN ({kinds}) AND length(x.refs) > 0")
        ids = [] if states is None else [i.bytes for i in dict.fromkeys(states)]

        def misfits(conn: sqlite3.Connection) -> list[Misfit]:
            # In-process, one primary-key probe per ref costs microseconds, and each refs
            # BLOB is read once (splitting it in SQL with substr() re-reads its overflow
            # pages for every position). Memory: one row and the findings.
            found: list[Misfit] = []
            probe = "SELECT kind FROM immagent_assets WHERE digest = ?"
            for digest, kind, raw in conn.execute(sql):
                first, rest = expected[kind]
                refs = split_refs(_blob(raw))
                for i, ref in enumerate(refs):
                    target = conn.execute(probe, (ref,)).fetchone()
                    want = first if i == 0 else rest
                    if target is not None and target[0] != want:
                        found.append(Misfit(_blob(digest), ref, target[0], want))
                        if len(found) >= limit:
                            return found
            return found

        def run(conn: sqlite3.Connection) -> list[Misfit]:
            if states is None:
                return misfits(conn)
            reader = walk.begin(conn)
            try:
                walk.mark(conn, state_ids=ids)
                return misfits(conn)
            finally:
                walk.end(conn, reader)

        result: list[Misfit] = await self._read("misfit_refs", run)
        return result

    async def cyclic_states(self, limit: int = 10_000) -> list[UUID]:
        sql = ROOTED_STATES + """
            SELECT id, seq FROM immagent_states WHERE id NOT IN (SELECT id FROM rooted)
             ORDER BY id LIMIT ?
        """
        rows: list[Any] = await self._read(
            "cyclic_states", lambda conn: conn.execute(sql, (limit,)).fetchall())
        return [_uuid(i, seq) for i, seq in rows]

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        rows: list[Any] = await self._pool.read(
            "asset_stats",
            lambda conn: conn.execute(
                "SELECT kind, count(*), coalesce(sum(length(body)), 0) "
                "FROM immagent_assets GROUP BY kind").fetchall())
        return {int(k): (int(n), int(b)) for k, n, b in rows}

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
