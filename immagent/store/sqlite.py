"""SQLite backend: the embedded default, with exactly PostgresBackend's semantics.

Layout: the same three tables as schema.sql. Digests and UUIDs are BLOBs (32 and 16
bytes), timestamps are integer microseconds since the Unix epoch (UTC), so a record's
``created_at`` round-trips exactly as an aware UTC datetime.

``refs`` is the concatenation of the 32-byte digests an asset points at, in order (a node's
parent first), in one BLOB: 32 bytes per edge, nothing for a message (an empty BLOB costs
no payload byte), no index. A side table of edges would store each edge as a row of two
digests plus an index entry (> 100 bytes per edge, three edges per turn); an array encoding
such as JSON would double the size (hex). Recursive queries split the BLOB with substr():
a walk's rows are (asset, position in its refs), so each reachable asset is expanded once
however many parents share it, and no global bound on fan-out is needed.

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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from immagent.assets import AgentRecord, Digest, Kind
from immagent.exceptions import (
    AssetNotFoundError,
    IntegrityError,
    SchemaMissingError,
    SchemaVersionError,
    StoreConnectionError,
    StoreError,
    ValidationError,
)
from immagent.store._codec import decode_map, encode_map
from immagent.store._sqlite_pool import SQLitePool, is_busy, transaction
from immagent.store.backend import (
    SCHEMA_VERSION,
    DanglingRef,
    GCResult,
    StoredAsset,
    external_refs,
    split_refs,
)

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
    # The append-only content log (see schema.sql). `body` is the last column so reading
    # digest, kind or refs never touches a long body's overflow pages. No timestamp, as in
    # PostgreSQL: gc needs none and each turn adds three of these rows.
    """
    CREATE TABLE IF NOT EXISTS immagent_assets (
        digest      BLOB    PRIMARY KEY CHECK (length(digest) = 32),
        kind        INTEGER NOT NULL,
        refs        BLOB    NOT NULL DEFAULT x'' CHECK (length(refs) % 32 = 0),
        body        BLOB    NOT NULL
    )
    """,
    # Listing orders by id (UUIDv7, time-ordered), as in PostgreSQL. seq is the commit-order
    # position in the log: the rowid, so it costs no index, and AUTOINCREMENT never reuses
    # a deleted row's seq, like PostgreSQL's identity column.
    """
    CREATE TABLE IF NOT EXISTS immagent_agents (
        id            BLOB    NOT NULL UNIQUE CHECK (length(id) = 16),
        parent_id     BLOB    CHECK (parent_id IS NULL OR length(parent_id) = 16),
        name          TEXT    NOT NULL,
        model         TEXT    NOT NULL,
        digest        BLOB    NOT NULL CHECK (length(digest) = 32),
        system_prompt BLOB    NOT NULL CHECK (length(system_prompt) = 32),
        conversation  BLOB    NOT NULL CHECK (length(conversation) = 32),
        model_config  BLOB    NOT NULL,         -- canonical msgpack of a JSON-like map
        metadata      BLOB    NOT NULL,         -- canonical msgpack of a JSON-like map
        created_at    INTEGER NOT NULL,         -- microseconds since the Unix epoch, UTC
        seq           INTEGER PRIMARY KEY AUTOINCREMENT
    )
    """,
    "CREATE INDEX IF NOT EXISTS immagent_agents_parent ON immagent_agents (parent_id)",
    # (name, id) serves "WHERE name = ? ORDER BY id" without a sort (SQLite indexes do not
    # deduplicate keys, so PostgreSQL's reason for indexing (name) alone does not apply).
    "CREATE INDEX IF NOT EXISTS immagent_agents_name ON immagent_agents (name, id)",
)

_AGENT_COLUMNS = ("id, parent_id, created_at, name, model, system_prompt, conversation, "
                  "model_config, metadata, digest")

# A walk through refs from the digests in `roots`. A row (a, i) means "asset a is
# reachable; its i-th ref is being followed": each step either descends into that ref
# (k = 0) or moves to the next one (k = 1). UNION drops rows already seen, so an asset
# shared by many parents is expanded once. Absent digests appear with i = 0 only.
_WALK = """
    walk(a, i) AS (
        SELECT d, 0 FROM roots
        UNION
        SELECT CASE t.k WHEN 0 THEN substr(x.refs, 32 * w.i + 1, 32) ELSE w.a END,
               CASE t.k WHEN 0 THEN 0 ELSE w.i + 1 END
          FROM walk w
          JOIN immagent_assets x ON x.digest = w.a
          JOIN (SELECT 0 AS k UNION ALL SELECT 1) t
         WHERE 32 * (w.i + t.k) < length(x.refs)
    )
"""

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

_AGENT_ROOTS = """
    roots(d) AS (
        SELECT system_prompt FROM immagent_agents
        UNION SELECT conversation FROM immagent_agents
    )
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


def _record(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(
        id=UUID(bytes=row[0]), parent_id=None if row[1] is None else UUID(bytes=row[1]),
        created_at=_from_micros(row[2]), name=row[3], model=row[4],
        system_prompt=bytes(row[5]), conversation=bytes(row[6]),
        model_config=decode_map(bytes(row[7])), metadata=decode_map(bytes(row[8])),
        digest=bytes(row[9]),
    )


def _agent_params(a: AgentRecord) -> tuple[Any, ...]:
    return (a.id.bytes, None if a.parent_id is None else a.parent_id.bytes,
            _to_micros(a.created_at), a.name, a.model, a.system_prompt, a.conversation,
            encode_map(a.model_config), encode_map(a.metadata), a.digest)


def _version(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                       "AND name = 'immagent_schema'").fetchone()
    if row is None:
        return None
    row = conn.execute("SELECT max(version) FROM immagent_schema").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _unknown_version(found: int, path: str) -> SchemaVersionError:
    return SchemaVersionError(
        f"database schema version {found} in {path} is not supported by this immagent "
        f"(it knows version {SCHEMA_VERSION}); upgrade immagent or use another database"
    )


def _prepare(conn: sqlite3.Connection, path: str, *, force: bool) -> None:
    """Put the database in WAL mode (and incremental auto-vacuum when it is new).

    At open (``force`` false) a database holding only another application's tables is
    left exactly as it is; init_schema() converts it when asked to add immagent's tables.
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
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StoreConnectionError(f"cannot switch SQLite database {path} to WAL mode "
                                   f"(its journal mode stays {mode!r})")


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


class SQLiteBackend:
    """Backend over one SQLite file: a writer connection and a few readers, in threads."""

    def __init__(self, pool: SQLitePool) -> None:
        self._pool = pool
        self.path = pool.path
        self.dsn = f"sqlite:///{pool.path}"

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

    # -- schema ---------------------------------------------------------------------------

    async def init_schema(self) -> None:
        path = self.path

        def create(conn: sqlite3.Connection) -> None:
            found = _version(conn)
            if found is not None and found != SCHEMA_VERSION:
                raise _unknown_version(found, path)
            for statement in _DDL:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO immagent_schema (version) VALUES (?)",
                         (SCHEMA_VERSION,))

        def init(conn: sqlite3.Connection) -> None:
            # Refuse an unknown version before changing anything (even the journal mode);
            # create() checks again inside its write transaction, which serialises two
            # processes initialising the same file at once.
            version = transaction(conn, _version, "BEGIN")
            if version is not None and version != SCHEMA_VERSION:
                raise _unknown_version(version, path)
            _prepare(conn, path, force=True)
            transaction(conn, create)

        await self._pool.write("init_schema", init)

    async def check_schema(self) -> None:
        found = await self._pool.read("check_schema", _version)
        if found is None:
            raise SchemaMissingError(f"no immagent schema in {self.path}; "
                                     "call `await store.init_schema()`")
        if found != SCHEMA_VERSION:
            raise _unknown_version(found, self.path)

    # -- writes ---------------------------------------------------------------------------

    async def write(self, assets: Sequence[StoredAsset], agents: Sequence[AgentRecord]) -> None:
        external = external_refs(assets, agents)
        asset_rows = [(a.digest, a.kind, b"".join(a.refs), a.body) for a in assets]
        agent_rows = [_agent_params(a) for a in agents]

        def run(conn: sqlite3.Connection) -> None:
            if asset_rows:
                conn.executemany(
                    "INSERT INTO immagent_assets (digest, kind, refs, body) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING", asset_rows)
            present: set[bytes] = set()
            for chunk in _chunks(external):
                present.update(row[0] for row in conn.execute(
                    f"SELECT digest FROM immagent_assets WHERE digest IN ({_marks(len(chunk))})",
                    chunk))
            for digest in external:
                if digest not in present:
                    raise AssetNotFoundError("referenced asset", digest)
            if agent_rows:
                conn.executemany(
                    f"INSERT INTO immagent_agents ({_AGENT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", agent_rows)

        await self._pool.write("write", lambda conn: transaction(conn, run))

    async def delete_agents(self, ids: Sequence[UUID]) -> int:
        keys = [i.bytes for i in ids]

        def run(conn: sqlite3.Connection) -> int:
            deleted = 0
            for chunk in _chunks(keys):
                deleted += conn.execute(
                    f"DELETE FROM immagent_agents WHERE id IN ({_marks(len(chunk))})", chunk
                ).rowcount
            return deleted

        return await self._pool.write("delete", lambda conn: transaction(conn, run))

    async def delete_lineage(self, agent_id: UUID) -> list[UUID]:
        def run(conn: sqlite3.Connection) -> list[UUID]:
            deleted: list[UUID] = []
            cursor: bytes | None = agent_id.bytes
            while cursor is not None:
                row = conn.execute("SELECT parent_id FROM immagent_agents WHERE id = ?",
                                   (cursor,)).fetchone()
                if row is None:
                    break
                if deleted and conn.execute(
                        "SELECT 1 FROM immagent_agents WHERE parent_id = ? LIMIT 1",
                        (cursor,)).fetchone() is not None:
                    break  # an ancestor another state still descends from
                conn.execute("DELETE FROM immagent_agents WHERE id = ?", (cursor,))
                deleted.append(UUID(bytes=cursor))
                cursor = row[0]
            return deleted

        # One write transaction: SQLite's single writer serialises concurrent calls.
        return await self._pool.write("delete_lineage", lambda conn: transaction(conn, run))

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
                for d, k, r, b in conn.execute(
                        "SELECT digest, kind, refs, body FROM immagent_assets "
                        f"WHERE digest IN ({_marks(len(chunk))})", chunk):
                    found[d] = StoredAsset(d, int(k), split_refs(r), b)
            return found

        result: dict[Digest, StoredAsset] = await self._read("get_assets", run)
        return result

    async def get_conversation(
        self, head: Digest
    ) -> tuple[list[StoredAsset], dict[Digest, StoredAsset]]:
        node = int(Kind.NODE)

        def run(conn: sqlite3.Connection) -> tuple[list[StoredAsset],
                                                   dict[Digest, StoredAsset]]:
            # A node's first ref is its parent; the kind filter stops the walk at the root.
            rows = conn.execute(
                """
                WITH RECURSIVE chain(depth, digest, refs, body) AS (
                    SELECT 0, digest, refs, body FROM immagent_assets
                     WHERE digest = :head AND kind = :node
                    UNION ALL
                    SELECT c.depth + 1, a.digest, a.refs, a.body
                      FROM chain c JOIN immagent_assets a
                        ON a.digest = substr(c.refs, 1, 32) AND a.kind = :node
                )
                SELECT depth, digest, refs, body FROM chain
                """, {"head": head, "node": node}).fetchall()
            # Sorted here, not by ORDER BY: SQL would copy every body into a sorter, and
            # the queue of a one-row-per-step recursion already yields them in order.
            rows.sort(key=lambda row: int(row[0]))
            chain = [StoredAsset(d, node, split_refs(refs), b) for _, d, refs, b in rows]
            leaves: dict[Digest, StoredAsset] = {}
            # In-process, a second statement in the same snapshot costs no round trip;
            # the digests come from refs, so no body is decoded here.
            wanted = list(dict.fromkeys(d for row in chain for d in row.refs))
            for chunk in _chunks(wanted):
                for d, k, b in conn.execute(
                        "SELECT digest, kind, body FROM immagent_assets "
                        f"WHERE digest IN ({_marks(len(chunk))}) AND kind <> {node}",
                        chunk):
                    leaves[d] = StoredAsset(d, int(k), (), b)
            return chain, leaves

        result: tuple[list[StoredAsset], dict[Digest, StoredAsset]] = (
            await self._read("get_conversation", run))
        return result

    async def get_agents(self, ids: Sequence[UUID]) -> list[AgentRecord]:
        if not ids:
            return []
        keys = list(dict.fromkeys(i.bytes for i in ids))

        def run(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            for chunk in _chunks(keys):
                rows += conn.execute(f"SELECT {_AGENT_COLUMNS} FROM immagent_agents "
                                     f"WHERE id IN ({_marks(len(chunk))})", chunk).fetchall()
            return rows

        return [_record(r) for r in await self._read("get_agents", run)]

    async def list_agents(self, limit: int, offset: int, name: str | None,
                          newest_first: bool = False) -> list[AgentRecord]:
        order = "DESC" if newest_first else "ASC"
        if name is None:
            return await self._agents(
                "list_agents",
                f"SELECT {_AGENT_COLUMNS} FROM immagent_agents ORDER BY id {order} "
                "LIMIT ? OFFSET ?", (limit, offset))
        return await self._agents(
            "list_agents",
            f"SELECT {_AGENT_COLUMNS} FROM immagent_agents WHERE name = ? "
            f"ORDER BY id {order} LIMIT ? OFFSET ?", (name, limit, offset))

    async def count_agents(self, name: str | None) -> int:
        def run(conn: sqlite3.Connection) -> int:
            if name is None:
                row = conn.execute("SELECT count(*) FROM immagent_agents").fetchone()
            else:
                row = conn.execute("SELECT count(*) FROM immagent_agents WHERE name = ?",
                                   (name,)).fetchone()
            return int(row[0])

        return int(await self._pool.read("count_agents", run))

    async def lineage(self, agent_id: UUID) -> list[AgentRecord]:
        cols = ", ".join(f"a.{c.strip()}" for c in _AGENT_COLUMNS.split(","))
        return await self._agents(
            "lineage",
            f"""
            WITH RECURSIVE line AS (
                SELECT {_AGENT_COLUMNS}, 0 AS depth FROM immagent_agents WHERE id = ?
                UNION ALL
                SELECT {cols}, l.depth + 1
                  FROM line l JOIN immagent_agents a ON a.id = l.parent_id
            )
            SELECT {_AGENT_COLUMNS} FROM line ORDER BY depth
            """, (agent_id.bytes,))

    async def children(self, agent_id: UUID) -> list[UUID]:
        def run(conn: sqlite3.Connection) -> list[UUID]:
            return [UUID(bytes=row[0]) for row in conn.execute(
                "SELECT id FROM immagent_agents WHERE parent_id = ? ORDER BY id",
                (agent_id.bytes,))]

        result: list[UUID] = await self._pool.read("children", run)
        return result

    async def _agents(self, operation: str, sql: str,
                      params: Sequence[Any]) -> list[AgentRecord]:
        rows: list[Any] = await self._pool.read(
            operation, lambda conn: conn.execute(sql, params).fetchall())
        return [_record(r) for r in rows]

    # -- maintenance ----------------------------------------------------------------------

    async def gc(self) -> GCResult:
        def sweep(conn: sqlite3.Connection) -> GCResult:
            # Mark into a temporary table (SQLite spills it to disk; nothing goes through
            # Python), then sweep what is not in it, all under the write lock.
            conn.execute("DROP TABLE IF EXISTS temp.immagent_reach")
            conn.execute("CREATE TEMP TABLE immagent_reach (digest BLOB PRIMARY KEY) "
                         "WITHOUT ROWID")
            conn.execute(f"INSERT INTO temp.immagent_reach WITH RECURSIVE {_AGENT_ROOTS}, "
                         f"{_WALK} SELECT a FROM walk WHERE i = 0")
            # git's "never treat an unreadable root as absent": if a live agent reaches a
            # missing asset, what that asset would have kept is unknown; delete nothing.
            dangling = conn.execute(
                "SELECT digest FROM temp.immagent_reach r WHERE NOT EXISTS "
                "(SELECT 1 FROM immagent_assets a WHERE a.digest = r.digest) LIMIT 1"
            ).fetchone()
            if dangling is not None:
                raise IntegrityError(
                    f"gc aborted, nothing deleted: a live agent reaches asset "
                    f"{bytes(dangling[0]).hex()}, which is missing, so reachability is unknown "
                    "(run store.verify(); restore the asset by importing a bundle, or delete "
                    "the agents that need it)")
            removed, freed = conn.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM immagent_assets "
                "WHERE digest NOT IN (SELECT digest FROM temp.immagent_reach)").fetchone()
            if removed:
                conn.execute("DELETE FROM immagent_assets "
                             "WHERE digest NOT IN (SELECT digest FROM temp.immagent_reach)")
                _give_back_free_pages(conn)
            (kept,) = conn.execute("SELECT count(*) FROM immagent_assets").fetchone()
            conn.execute("DROP TABLE temp.immagent_reach")
            return GCResult(assets_removed=int(removed), bytes_freed=int(freed),
                            assets_kept=int(kept))

        result: GCResult = await self._pool.write("gc", lambda conn: transaction(conn, sweep))
        return result

    async def iter_assets(self, batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        async for batch in self._iter(
                "iter_assets",
                "SELECT digest, kind, refs, body FROM immagent_assets ORDER BY digest",
                {}, batch_size):
            yield batch

    async def iter_reachable(self, roots: Sequence[Digest],
                             batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        sql = (f"WITH RECURSIVE {_BLOB_ROOTS}, {_WALK} "
               "SELECT x.digest, x.kind, x.refs, x.body "
               "FROM walk w JOIN immagent_assets x ON x.digest = w.a WHERE w.i = 0")
        async for batch in self._iter("iter_reachable", sql, {"roots": b"".join(roots)},
                                      batch_size):
            yield batch

    async def _iter(self, operation: str, sql: str, params: dict[str, Any],
                    batch_size: int) -> AsyncIterator[list[StoredAsset]]:
        """Stream a query's assets in batches from one read transaction (one snapshot),
        holding a reader connection until the caller finishes or closes the iterator."""
        pool = self._pool
        async with pool.reader(operation) as conn:
            def start(c: sqlite3.Connection) -> sqlite3.Cursor:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                c.execute("BEGIN")
                return c.execute(sql, params)

            cursor = await pool.call(operation, conn, start)
            try:
                while rows := await pool.call(operation, conn,
                                              lambda _: cursor.fetchmany(batch_size)):
                    yield [StoredAsset(d, int(k), split_refs(r), b) for d, k, r, b in rows]
            finally:
                if not pool.closed:  # a closed pool closes the connection, ending the read
                    def end(c: sqlite3.Connection) -> None:
                        cursor.close()
                        if c.in_transaction:
                            c.execute("ROLLBACK")
                    await pool.call(operation, conn, end)

    async def dangling_refs(self, agent_ids: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[DanglingRef]:
        if agent_ids is None:
            agents = "SELECT id, system_prompt, conversation FROM immagent_agents"
            params: dict[str, Any] = {"limit": limit}
            # Every asset's refs, split by walking positions without descending.
            edges = """
                pos(a, i) AS (
                    SELECT digest, 0 FROM immagent_assets WHERE length(refs) > 0
                    UNION ALL
                    SELECT p.a, p.i + 1 FROM pos p JOIN immagent_assets x ON x.digest = p.a
                     WHERE 32 * (p.i + 1) < length(x.refs)
                ),
                edges(src, dst) AS (
                    SELECT p.a, substr(x.refs, 32 * p.i + 1, 32)
                      FROM pos p JOIN immagent_assets x ON x.digest = p.a
                )
            """
        else:
            ids = b"".join(i.bytes for i in agent_ids)
            agents = ("SELECT id, system_prompt, conversation FROM immagent_agents WHERE id IN "
                      "(SELECT substr(:ids, 16 * n + 1, 16) FROM ids)")
            params = {"limit": limit, "ids": ids}
            edges = f"""
                ids(n) AS (
                    SELECT 0 WHERE length(:ids) >= 16
                    UNION ALL SELECT n + 1 FROM ids WHERE 16 * (n + 2) <= length(:ids)
                ),
                roots(d) AS (
                    SELECT system_prompt FROM ({agents})
                    UNION SELECT conversation FROM ({agents})
                ),
                {_WALK},
                edges(src, dst) AS (
                    SELECT w.a, substr(x.refs, 32 * w.i + 1, 32)
                      FROM walk w JOIN immagent_assets x ON x.digest = w.a
                     WHERE 32 * w.i < length(x.refs)
                )
            """
        # Agent rows first-class: their prompt and head may be absent too.
        sql = f"""
            WITH RECURSIVE {edges},
            agent_refs(dst, src) AS (
                SELECT system_prompt, id FROM ({agents})
                UNION SELECT conversation, id FROM ({agents})
            )
            SELECT dst, src, 1 FROM agent_refs
             WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = agent_refs.dst)
            UNION
            SELECT dst, src, 0 FROM edges
             WHERE NOT EXISTS (SELECT 1 FROM immagent_assets m WHERE m.digest = edges.dst)
            LIMIT :limit
        """
        rows: list[Any] = await self._read(
            "dangling_refs", lambda conn: conn.execute(sql, params).fetchall())
        return [DanglingRef(bytes(d), UUID(bytes=s) if is_agent else bytes(s))
                for d, s, is_agent in rows]

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
