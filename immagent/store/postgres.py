"""PostgreSQL backend: psycopg 3 async with a psycopg_pool connection pool.

Concurrency with gc: every write transaction takes the *shared* side of one advisory lock
and gc takes the *exclusive* side, so a sweep never runs while a writer is between
"this asset already exists, I will point at it" and its commit. Writers also check, under
that lock, that every asset they point at and do not insert themselves still exists, which
closes the other window (a sweep that ran before the writer's transaction began).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from uuid import UUID

import psycopg
import psycopg.conninfo
import psycopg_pool
from psycopg import errors as pg_errors

from immagent.assets import AgentRecord, Digest, Kind
from immagent.exceptions import (
    AssetNotFoundError,
    IntegrityError,
    SchemaMissingError,
    SchemaVersionError,
    StoreClosedError,
    StoreConnectionError,
    StoreError,
)
from immagent.store._codec import decode_map, encode_map
from immagent.store.backend import (
    SCHEMA_VERSION,
    DanglingRef,
    GCResult,
    StoredAsset,
    external_refs,
    split_refs,
)
from immagent.store.schema import schema_sql

__all__ = ["PostgresBackend", "safe_dsn"]

log = logging.getLogger("immagent")

# Advisory lock keys (arbitrary constants, namespaced by a fixed high word).
_GC_LOCK = 0x1A3A_6E70_0000_0001
_SCHEMA_LOCK = 0x1A3A_6E70_0000_0002
_LINEAGE_LOCK = 0x1A3A_6E70_0000_0003

_AGENT_COLUMNS = ("id, parent_id, created_at, name, model, system_prompt, conversation, "
                  "model_config, metadata, digest")


def safe_dsn(dsn: str) -> str:
    """The DSN with any password removed, fit for error messages and logs."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    params.pop("password", None)
    host, port, db = params.get("host", "localhost"), params.get("port", 5432), params.get("dbname")
    user = str(params.get("user") or "")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{db or ''}"


@contextlib.contextmanager
def _mapped(operation: str) -> Iterator[None]:
    """Translate driver errors into the ImmAgentError tree, naming the operation."""
    try:
        yield
    except psycopg_pool.PoolClosed as e:
        raise StoreClosedError(f"{operation}: the store is closed") from e
    except psycopg_pool.PoolTimeout as e:
        raise StoreConnectionError(f"{operation}: no database connection available ({e})") from e
    except pg_errors.UndefinedTable as e:
        raise SchemaMissingError(
            f"{operation}: immagent tables are missing; call `await store.init_schema()`"
        ) from e
    except psycopg.OperationalError as e:
        raise StoreConnectionError(f"{operation}: database connection failed: {e}") from e
    except psycopg.Error as e:
        raise StoreError(f"{operation} failed: {type(e).__name__}: {e}") from e


def _record(row: tuple[Any, ...]) -> AgentRecord:
    return AgentRecord(
        id=row[0], parent_id=row[1], created_at=row[2], name=row[3], model=row[4],
        system_prompt=bytes(row[5]), conversation=bytes(row[6]),
        model_config=decode_map(bytes(row[7])), metadata=decode_map(bytes(row[8])),
        digest=bytes(row[9]),
    )


class PostgresBackend:
    """Backend over one psycopg_pool.AsyncConnectionPool."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool[Any], dsn: str) -> None:
        self._pool = pool
        self.dsn = safe_dsn(dsn)

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 2, max_size: int = 10,
                   max_inactive_connection_lifetime: float = 300.0,
                   connect_timeout: float = 10.0) -> PostgresBackend:
        """Connect, failing fast with a clear error when the server is unreachable."""
        shown = safe_dsn(dsn)
        # One direct connection first: the pool would only retry silently until timeout.
        try:
            probe = await psycopg.AsyncConnection.connect(dsn, connect_timeout=int(connect_timeout))
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            password = _password(dsn)
            if password:
                reason = reason.replace(password, "***")
            raise StoreConnectionError(f"cannot connect to {shown}: {reason}") from None
        await probe.close()
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size,
            max_idle=max_inactive_connection_lifetime, timeout=30.0, open=False,
            name="immagent", configure=_configure,
        )
        try:
            with _mapped("connect"):
                await pool.open(wait=True, timeout=connect_timeout)
        except BaseException:  # a failed or cancelled open must not leave pool workers
            await pool.close()
            raise
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> bool:
        try:
            async with self._pool.connection(timeout=5.0) as conn:
                await conn.execute("SELECT 1")
            return True
        except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed):
            return False

    # -- schema ---------------------------------------------------------------------------

    async def init_schema(self) -> None:
        with _mapped("init_schema"):
            async with self._pool.connection() as conn, conn.transaction():
                # Serialise concurrent initialisers: CREATE ... IF NOT EXISTS can still race.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                found = await self._version(conn)
                if found is not None and found != SCHEMA_VERSION:
                    raise _unknown_version(found)
                await conn.execute(schema_sql().encode())
                await conn.execute(
                    "INSERT INTO immagent_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                    (SCHEMA_VERSION,),
                )

    async def check_schema(self) -> None:
        with _mapped("check_schema"):
            async with self._pool.connection() as conn:
                found = await self._version(conn)
        if found is None:
            raise SchemaMissingError("no immagent schema here; call `await store.init_schema()`")
        if found != SCHEMA_VERSION:
            raise _unknown_version(found)

    @staticmethod
    async def _version(conn: psycopg.AsyncConnection[Any]) -> int | None:
        cur = await conn.execute("SELECT to_regclass('immagent_schema') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            return None
        cur = await conn.execute("SELECT max(version) FROM immagent_schema")
        row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # -- writes ---------------------------------------------------------------------------

    async def write(self, assets: Sequence[StoredAsset], agents: Sequence[AgentRecord]) -> None:
        external = external_refs(assets, agents)
        with _mapped("write"):
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_GC_LOCK,))
                async with conn.cursor() as cur:
                    if assets:
                        await cur.executemany(
                            "INSERT INTO immagent_assets (digest, kind, refs, body) "
                            "VALUES (%s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                            [(a.digest, a.kind, b"".join(a.refs) or None, a.body)
                             for a in assets],
                        )
                    if external:
                        await cur.execute(
                            "SELECT d FROM unnest(%s::bytea[]) AS d WHERE NOT EXISTS "
                            "(SELECT 1 FROM immagent_assets WHERE digest = d)",
                            (external,),
                        )
                        missing = await cur.fetchall()
                        if missing:
                            raise AssetNotFoundError("referenced asset", bytes(missing[0][0]))
                    if agents:
                        await cur.executemany(
                            f"INSERT INTO immagent_agents ({_AGENT_COLUMNS}) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            [_agent_params(a) for a in agents],
                        )

    async def delete_agents(self, ids: Sequence[UUID]) -> int:
        with _mapped("delete"):
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM immagent_agents WHERE id = ANY(%s)", (list(ids),)
                )
                return int(cur.rowcount)

    async def delete_lineage(self, agent_id: UUID) -> list[UUID]:
        with _mapped("delete_lineage"):
            async with self._pool.connection() as conn, conn.transaction():
                # Serialise lineage deletions: otherwise two siblings deleted at once each
                # see the other still present and both keep their (then childless) parent.
                # Under READ COMMITTED the statement's snapshot is taken after the lock.
                # LATERAL ... LIMIT 1: one key probe per ancestor (see lineage()).
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LINEAGE_LOCK,))
                cur = await conn.execute(
                    """
                    WITH RECURSIVE doomed(id, parent_id, depth) AS (
                        SELECT id, parent_id, 0 FROM immagent_agents WHERE id = %s
                        UNION ALL
                        SELECT a.id, a.parent_id, d.depth + 1
                          FROM doomed d CROSS JOIN LATERAL (
                               SELECT id, parent_id FROM immagent_agents
                                WHERE id = d.parent_id LIMIT 1) AS a
                         WHERE NOT EXISTS (SELECT 1 FROM immagent_agents c
                                            WHERE c.parent_id = a.id AND c.id <> d.id)
                    )
                    DELETE FROM immagent_agents a USING doomed d WHERE a.id = d.id
                    RETURNING a.id, d.depth
                    """,
                    (agent_id,),
                )
                rows = await cur.fetchall()
        return [row[0] for row in sorted(rows, key=lambda row: int(row[1]))]

    # -- reads ----------------------------------------------------------------------------

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        if not digests:
            return {}
        with _mapped("get_assets"):
            async with self._pool.connection() as conn, conn.cursor(binary=True) as cur:
                await cur.execute(
                    "SELECT digest, kind, refs, body FROM immagent_assets "
                    "WHERE digest = ANY(%s)",
                    (list(digests),),
                )
                rows = await cur.fetchall()
        return {d: StoredAsset(d, k, split_refs(r), b) for d, k, r, b in rows}

    async def get_conversation(
        self, head: Digest
    ) -> tuple[list[StoredAsset], dict[Digest, StoredAsset]]:
        # A node's first ref is its parent when it has one; the kind filter stops the walk
        # at the root. generate_series is inlined here
        # rather than immagent_refs(): a function call per node cost ~15 us, the whole read
        # budget. Binary results: bytea comes back unescaped.
        with _mapped("get_conversation"):
            async with self._pool.connection() as conn, conn.cursor(binary=True) as cur:
                await cur.execute(
                    """
                    WITH RECURSIVE chain(digest, body, refs, depth) AS (
                        SELECT digest, body, refs, 0 FROM immagent_assets
                         WHERE digest = %(head)s AND kind = %(node)s
                        UNION ALL
                        SELECT a.digest, a.body, a.refs, c.depth + 1
                          FROM chain c CROSS JOIN LATERAL (
                               SELECT digest, body, refs FROM immagent_assets
                                WHERE digest = substring(c.refs FROM 1 FOR 32)
                                  AND kind = %(node)s LIMIT 1) AS a
                    )
                    SELECT depth, digest, %(node)s::smallint, refs, body FROM chain
                    UNION ALL
                    SELECT -1, m.digest, m.kind, NULL, m.body
                      FROM (SELECT DISTINCT substring(c.refs FROM i * 32 + 1 FOR 32) AS d
                              FROM chain c,
                                   generate_series(0, octet_length(c.refs) / 32 - 1) AS i
                           ) r
                      JOIN immagent_assets m ON m.digest = r.d AND m.kind <> %(node)s
                    """,
                    {"head": head, "node": int(Kind.NODE)},
                )
                rows = await cur.fetchall()
        chain = sorted((r for r in rows if r[0] >= 0), key=lambda r: int(r[0]))
        leaves = {r[1]: StoredAsset(r[1], int(r[2]), (), r[4]) for r in rows if r[0] < 0}
        return [StoredAsset(r[1], int(r[2]), split_refs(r[3]), r[4]) for r in chain], leaves

    async def get_agents(self, ids: Sequence[UUID]) -> list[AgentRecord]:
        if not ids:
            return []
        return await self._agents(
            f"SELECT {_AGENT_COLUMNS} FROM immagent_agents WHERE id = ANY(%s)", (list(ids),)
        )

    async def list_agents(self, limit: int, offset: int, name: str | None,
                          newest_first: bool = False) -> list[AgentRecord]:
        order = "DESC" if newest_first else "ASC"
        if name is None:
            return await self._agents(
                f"SELECT {_AGENT_COLUMNS} FROM immagent_agents ORDER BY id {order} "
                "LIMIT %s OFFSET %s",
                (limit, offset),
            )
        return await self._agents(
            f"SELECT {_AGENT_COLUMNS} FROM immagent_agents WHERE name = %s "
            f"ORDER BY id {order} LIMIT %s OFFSET %s",
            (name, limit, offset),
        )

    async def count_agents(self, name: str | None) -> int:
        with _mapped("count_agents"):
            async with self._pool.connection() as conn:
                if name is None:
                    cur = await conn.execute("SELECT count(*) FROM immagent_agents")
                else:
                    cur = await conn.execute(
                        "SELECT count(*) FROM immagent_agents WHERE name = %s", (name,)
                    )
                row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def lineage(self, agent_id: UUID) -> list[AgentRecord]:
        # The LATERAL ... LIMIT 1 pins one primary-key probe per step; a plain join let the
        # planner pick a hash join that scanned the whole table once per ancestor.
        return await self._agents(
            f"""
            WITH RECURSIVE line AS (
                SELECT {_AGENT_COLUMNS}, 0 AS depth FROM immagent_agents WHERE id = %s
                UNION ALL
                SELECT a.*, l.depth + 1
                  FROM line l CROSS JOIN LATERAL (
                       SELECT {_AGENT_COLUMNS} FROM immagent_agents
                        WHERE id = l.parent_id LIMIT 1) AS a
            )
            SELECT {_AGENT_COLUMNS} FROM line ORDER BY depth
            """,
            (agent_id,),
        )

    async def children(self, agent_id: UUID) -> list[UUID]:
        with _mapped("children"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT id FROM immagent_agents WHERE parent_id = %s ORDER BY id",
                    (agent_id,),
                )
                return [row[0] for row in await cur.fetchall()]

    async def _agents(self, sql: str, params: Sequence[Any]) -> list[AgentRecord]:
        with _mapped("load agents"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql.encode(), params)
                rows = await cur.fetchall()
        return [_record(r) for r in rows]

    # -- maintenance ----------------------------------------------------------------------

    async def gc(self) -> GCResult:
        with _mapped("gc"):
            async with self._pool.connection() as conn, conn.transaction():
                # Exclusive side of the writers' shared lock, taken before the statement, so
                # its snapshot (READ COMMITTED: per statement) sees every committed write and
                # no write can start until the sweep commits.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_GC_LOCK,))
                # `dangling` is git's "never treat an unreadable root as absent": if anything
                # reachable points at a missing asset, the mark is incomplete (what that asset
                # would have kept is unknown), so the sweep deletes nothing at all.
                cur = await conn.execute(
                    """
                    WITH RECURSIVE reach(digest) AS (
                        SELECT unnest(ARRAY[system_prompt, conversation]) FROM immagent_agents
                        UNION
                        SELECT r FROM reach
                          JOIN immagent_assets a ON a.digest = reach.digest
                          CROSS JOIN LATERAL immagent_refs(a.refs) AS r
                    ), dangling AS (
                        SELECT reach.digest FROM reach
                         WHERE NOT EXISTS (SELECT 1 FROM immagent_assets a
                                            WHERE a.digest = reach.digest)
                         LIMIT 1
                    ), swept AS (
                        DELETE FROM immagent_assets a
                         WHERE NOT EXISTS (SELECT 1 FROM reach WHERE reach.digest = a.digest)
                           AND NOT EXISTS (SELECT 1 FROM dangling)
                        RETURNING octet_length(a.body) AS size
                    )
                    SELECT count(*), coalesce(sum(size), 0),
                           (SELECT count(*) FROM immagent_assets),
                           (SELECT digest FROM dangling)
                      FROM swept
                    """
                )
                row = await cur.fetchone()
        assert row is not None
        if row[3] is not None:
            raise IntegrityError(
                f"gc aborted, nothing deleted: a live agent reaches asset {bytes(row[3]).hex()}, "
                "which is missing, so reachability is unknown (run store.verify(); restore "
                "the asset by importing a bundle, or delete the agents that need it)"
            )
        removed, freed, before = int(row[0]), int(row[1]), int(row[2])
        # The sub-select sees the snapshot from before the DELETE.
        return GCResult(assets_removed=removed, bytes_freed=freed, assets_kept=before - removed)

    async def iter_assets(self, batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        with _mapped("iter_assets"):
            # A server-side cursor keeps memory bounded on large stores.
            async with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor(name="immagent_iter_assets") as cur,
            ):
                await cur.execute(
                    "SELECT digest, kind, refs, body FROM immagent_assets ORDER BY digest"
                )
                while rows := await cur.fetchmany(batch_size):
                    yield [StoredAsset(bytes(d), k, split_refs(refs), bytes(b))
                           for d, k, refs, b in rows]

    async def iter_reachable(self, roots: Sequence[Digest],
                             batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        with _mapped("iter_reachable"):
            async with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor(name="immagent_iter_reachable") as cur,
            ):
                await cur.execute(
                    """
                    WITH RECURSIVE reach(digest) AS (
                        SELECT unnest(%s::bytea[])
                        UNION
                        SELECT r FROM reach
                          JOIN immagent_assets a ON a.digest = reach.digest
                          CROSS JOIN LATERAL immagent_refs(a.refs) AS r
                    )
                    SELECT a.digest, a.kind, a.refs, a.body
                      FROM reach JOIN immagent_assets a ON a.digest = reach.digest
                    """,
                    (list(roots),),
                )
                while rows := await cur.fetchmany(batch_size):
                    yield [StoredAsset(bytes(d), k, split_refs(refs), bytes(b))
                           for d, k, refs, b in rows]

    async def dangling_refs(self, agent_ids: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[DanglingRef]:
        if agent_ids is None:
            sql = """
                SELECT DISTINCT r, a.digest, NULL::uuid
                  FROM immagent_assets a CROSS JOIN LATERAL immagent_refs(a.refs) AS r
                 WHERE NOT EXISTS (SELECT 1 FROM immagent_assets b WHERE b.digest = r)
                UNION ALL
                SELECT DISTINCT d, NULL::bytea, g.id
                  FROM immagent_agents g
                  CROSS JOIN LATERAL unnest(ARRAY[g.system_prompt, g.conversation]) AS d
                 WHERE NOT EXISTS (SELECT 1 FROM immagent_assets b WHERE b.digest = d)
                LIMIT %(limit)s
                """
        else:
            sql = """
                WITH RECURSIVE roots(id, digest) AS (
                    SELECT id, unnest(ARRAY[system_prompt, conversation])
                      FROM immagent_agents WHERE id = ANY(%(ids)s)
                ), reach(digest) AS (
                    SELECT digest FROM roots
                    UNION
                    SELECT r FROM reach
                      JOIN immagent_assets a ON a.digest = reach.digest
                      CROSS JOIN LATERAL immagent_refs(a.refs) AS r
                )
                SELECT DISTINCT r, a.digest, NULL::uuid
                  FROM reach JOIN immagent_assets a ON a.digest = reach.digest
                  CROSS JOIN LATERAL immagent_refs(a.refs) AS r
                 WHERE NOT EXISTS (SELECT 1 FROM immagent_assets b WHERE b.digest = r)
                UNION ALL
                SELECT DISTINCT digest, NULL::bytea, id FROM roots
                 WHERE NOT EXISTS (SELECT 1 FROM immagent_assets b
                                    WHERE b.digest = roots.digest)
                LIMIT %(limit)s
                """
        with _mapped("dangling_refs"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    sql.encode(), {"ids": list(agent_ids or ()), "limit": limit}
                )
                rows = await cur.fetchall()
        return [DanglingRef(bytes(m), bytes(d) if d is not None else i) for m, d, i in rows]

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        with _mapped("asset_stats"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT kind, count(*), coalesce(sum(octet_length(body)), 0) "
                    "FROM immagent_assets GROUP BY kind"
                )
                rows = await cur.fetchall()
        return {int(k): (int(n), int(b)) for k, n, b in rows}

    async def storage_bytes(self) -> int:
        with _mapped("storage_bytes"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT coalesce(sum(pg_total_relation_size(c)), 0) FROM unnest(ARRAY["
                    "'immagent_assets', 'immagent_agents', 'immagent_schema']::regclass[]) c"
                )
                row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Per-connection settings. JIT is off: our recursive queries look expensive to the
    planner, and compiling them cost ~400 ms against a few ms of execution."""
    await conn.set_autocommit(True)
    await conn.execute("SET jit = off")
    await conn.set_autocommit(False)


def _password(dsn: str) -> str | None:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password")  # type: ignore[return-value]
    except psycopg.ProgrammingError:
        return None


def _unknown_version(found: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"database schema version {found} is not supported by this immagent "
        f"(it knows version {SCHEMA_VERSION}); upgrade immagent or use another database"
    )


def _agent_params(a: AgentRecord) -> tuple[Any, ...]:
    return (a.id, a.parent_id, a.created_at, a.name, a.model, a.system_prompt, a.conversation,
            encode_map(a.model_config), encode_map(a.metadata), a.digest)
