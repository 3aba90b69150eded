"""A real schema-version-1 store, built with version 1's DDL and rows (as immagent 0.2 before
the event-store layout wrote them: commit ba51f08), opened and migrated by init_schema() on
both backends: every digest, state and read must survive."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from immagent import Message, Store, verify_proof
from immagent.assets import (
    EMPTY_CONVERSATION,
    Asset,
    ConversationNode,
    SystemPrompt,
    Tools,
    encode,
)
from immagent.exceptions import SchemaVersionError
from immagent.records import AgentRecord, StateRow, state_digest
from immagent.rows import stored
from tests.conftest import ROOT
from tests.test_verify import assert_clean

# -- version 1's DDL, verbatim -----------------------------------------------------------

_V1_SQLITE = (
    """
    CREATE TABLE IF NOT EXISTS immagent_schema (
        version     INTEGER PRIMARY KEY,
        applied_at  INTEGER NOT NULL DEFAULT
                    (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS immagent_assets (
        digest      BLOB    PRIMARY KEY CHECK (length(digest) = 32),
        kind        INTEGER NOT NULL,
        refs        BLOB    NOT NULL DEFAULT x'' CHECK (length(refs) % 32 = 0),
        body        BLOB    NOT NULL
    )
    """,
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
    "CREATE INDEX IF NOT EXISTS immagent_agents_name ON immagent_agents (name, id)",
)

_V1_POSTGRES = """
CREATE TABLE IF NOT EXISTS immagent_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS immagent_assets (
    digest      bytea       PRIMARY KEY CHECK (octet_length(digest) = 32),
    kind        smallint    NOT NULL,
    refs        bytea       CHECK (octet_length(refs) % 32 = 0),
    body        bytea       NOT NULL
);
CREATE OR REPLACE FUNCTION immagent_refs(refs bytea) RETURNS SETOF bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ROWS 3 AS $$
    SELECT substring(refs FROM i * 32 + 1 FOR 32)
      FROM generate_series(0, coalesce(octet_length(refs), 0) / 32 - 1) AS i
$$;
CREATE TABLE IF NOT EXISTS immagent_agents (
    id            uuid        PRIMARY KEY,
    parent_id     uuid,
    name          text        NOT NULL,
    model         text        NOT NULL,
    digest        bytea       NOT NULL,
    system_prompt bytea       NOT NULL,
    conversation  bytea       NOT NULL,
    model_config  bytea       NOT NULL,
    metadata      bytea       NOT NULL,
    created_at    timestamptz NOT NULL,
    seq           bigint      GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS immagent_agents_parent ON immagent_agents (parent_id);
CREATE INDEX IF NOT EXISTS immagent_agents_name ON immagent_agents (name);
"""


# -- version 1's rows ----------------------------------------------------------------------


def legacy_extend(node: ConversationNode, added: Sequence[Message]) -> ConversationNode:
    """The node an immagent before schema 3 made: no accumulator root, no span hash."""
    return ConversationNode(parent=node.digest, messages=tuple(m.digest for m in added),
                            length=node.length + len(added),
                            size=node.size + sum(len(m.body) for m in added))


class V1Store:
    """What a version-1 immagent wrote for a small fleet: assets as rows (canonical bodies,
    node links in refs) and agent rows whose maps are canonical msgpack."""

    def __init__(self) -> None:
        self.prompt = SystemPrompt(text="You are terse. " * 20)
        self.assets: dict[bytes, Asset] = {}
        self.agents: list[dict[str, Any]] = []
        self.histories: dict[uuid.UUID, tuple[Message, ...]] = {}
        start = datetime(2026, 11, 1, tzinfo=UTC)
        for a in range(3):
            node: ConversationNode = EMPTY_CONVERSATION
            history: tuple[Message, ...] = ()
            parent: uuid.UUID | None = None
            for step in range(4):
                if step:
                    added = (Message.user(f"question {a}.{step} " * 8),
                             Message(role="assistant", content=f"answer {a}.{step} " * 12,
                                     input_tokens=step, output_tokens=2 * step,
                                     model="immagent/echo"))
                    node = legacy_extend(node, added)
                    history += added
                config, metadata = {"temperature": 0.1 * a}, {"step": step}
                row: dict[str, Any] = {
                    "id": uuid.uuid4(), "parent_id": parent, "name": f"agent-{a}",
                    "model": "immagent/echo", "system_prompt": self.prompt.digest,
                    "conversation": node.digest, "model_config": encode(config),
                    "metadata": encode(metadata), "maps": (config, metadata),
                    "created_at": start + timedelta(minutes=10 * a + step),
                    "digest": state_digest(f"agent-{a}", "immagent/echo", self.prompt.digest,
                                           node.digest, config, metadata)}
                self.agents.append(row)
                self.histories[row["id"]] = history
                parent = row["id"]
                assets: list[SystemPrompt | ConversationNode | Message] = [
                    self.prompt, EMPTY_CONVERSATION, node, *history]
                for asset in assets:
                    self.assets[asset.digest] = asset

    def asset_rows(self) -> list[tuple[bytes, int, bytes, bytes]]:
        return [(r.digest, r.kind, b"".join(r.refs), r.body)
                for r in (stored(a) for a in self.assets.values())]


def _write_sqlite_v1(path: Path, v1: V1Store) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in _V1_SQLITE:
        conn.execute(statement)
    conn.execute("INSERT INTO immagent_schema (version) VALUES (1)")
    conn.executemany("INSERT INTO immagent_assets (digest, kind, refs, body) VALUES (?, ?, ?, ?)",
                     v1.asset_rows())
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    conn.executemany(
        "INSERT INTO immagent_agents (id, parent_id, name, model, digest, system_prompt, "
        "conversation, model_config, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r["id"].bytes, None if r["parent_id"] is None else r["parent_id"].bytes, r["name"],
          r["model"], r["digest"], r["system_prompt"], r["conversation"], r["model_config"],
          r["metadata"], (r["created_at"] - epoch) // timedelta(microseconds=1))
         for r in v1.agents])
    conn.commit()
    conn.close()


def _write_postgres_v1(dsn: str, v1: V1Store) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_V1_POSTGRES.encode())
        conn.execute("INSERT INTO immagent_schema (version) VALUES (1)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO immagent_assets (digest, kind, refs, body) "
                            "VALUES (%s, %s, %s, %s)",
                            [(d, k, f or None, b) for d, k, f, b in v1.asset_rows()])
            cur.executemany(
                "INSERT INTO immagent_agents (id, parent_id, name, model, digest, "
                "system_prompt, conversation, model_config, metadata, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(r["id"], r["parent_id"], r["name"], r["model"], r["digest"],
                  r["system_prompt"], r["conversation"], r["model_config"], r["metadata"],
                  r["created_at"]) for r in v1.agents])


@pytest.fixture
def v1_dsn(backend_name: str, tmp_path: Path, pg_dsn: str) -> Iterator[tuple[str, V1Store]]:
    """A version-1 store on the parametrised backend (a scratch database on PostgreSQL)."""
    v1 = V1Store()
    if backend_name == "sqlite":
        path = tmp_path / "v1.db"
        _write_sqlite_v1(path, v1)
        yield f"sqlite:///{path}", v1
        return
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    name = f"{params['dbname']}_v1_{uuid.uuid4().hex[:6]}"
    admin = psycopg.conninfo.make_conninfo(**{**params, "dbname": "postgres"})  # type: ignore[arg-type]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = psycopg.conninfo.make_conninfo(**{**params, "dbname": name})  # type: ignore[arg-type]
    try:
        _write_postgres_v1(dsn, v1)
        yield dsn, v1
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


async def test_a_version_1_store_is_migrated_by_init_schema_with_every_digest_kept(
        v1_dsn: tuple[str, V1Store]) -> None:
    dsn, v1 = v1_dsn
    async with await Store.connect(dsn, min_size=1, max_size=2) as store:
        with pytest.raises(SchemaVersionError, match="schema version 1"):
            await store.check_schema()
        await store.init_schema()
        await store.check_schema()  # now at SCHEMA_VERSION
        report = await store.verify()
        assert_clean(report)
        # The prompt stays an asset; the nodes are chain nodes holding their messages.
        nodes = [a for a in v1.assets.values() if isinstance(a, ConversationNode)]
        assert (report.assets_checked, report.nodes_checked) == (1, len(nodes))
        assert report.agents_checked == len(v1.agents)
        for row in v1.agents:
            agent = await store.load_agent(row["id"])
            assert agent.digest == row["digest"]
            assert agent.parent_id == row["parent_id"]
            assert agent.record.created_at == row["created_at"]
            assert (agent.record.model_config, agent.record.metadata) == row["maps"]
            assert await agent.get_messages() == v1.histories[row["id"]]
            assert await agent.get_system_prompt() == v1.prompt.text
        # The log order survived: a name's newest state is its last v1 row.
        newest = await store.newest_by_name("agent-2")
        assert newest is not None and newest.id == v1.agents[-1]["id"]
        # Migrated bodies stay canonical; new ones are written compressed.
        agent = await store.append(newest, [Message.user("after the migration " * 20)])
        store.clear_cache()
        assert (await agent.get_messages())[-1].content == "after the migration " * 20
        assert_clean(await store.verify())
        await store.init_schema()  # idempotent now


# -- version 2 (the event-store layout before chain nodes moved out of the asset table) ----

_V2_SQLITE = (
    """
    CREATE TABLE IF NOT EXISTS immagent_schema (
        version     INTEGER PRIMARY KEY,
        applied_at  INTEGER NOT NULL DEFAULT
                    (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS immagent_assets (
        digest      BLOB    PRIMARY KEY CHECK (length(digest) = 32),
        kind        INTEGER NOT NULL,
        codec       INTEGER NOT NULL DEFAULT 0,
        refs        BLOB    NOT NULL DEFAULT x'' CHECK (length(refs) % 32 = 0),
        body        BLOB    NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS immagent_states (
        id          BLOB    NOT NULL UNIQUE CHECK (length(id) = 16),
        parent_id   BLOB    CHECK (parent_id IS NULL OR length(parent_id) = 16),
        kind        INTEGER NOT NULL,
        stream      TEXT    NOT NULL,
        refs        BLOB    NOT NULL CHECK (length(refs) % 32 = 0),
        digest      BLOB    NOT NULL CHECK (length(digest) = 32),
        created_at  INTEGER NOT NULL,
        body        BLOB    NOT NULL,
        seq         INTEGER PRIMARY KEY AUTOINCREMENT
    )
    """,
    "CREATE INDEX IF NOT EXISTS immagent_states_stream ON immagent_states (kind, stream)",
    "CREATE INDEX IF NOT EXISTS immagent_states_parent ON immagent_states (parent_id)",
)

_V2_POSTGRES = """
CREATE TABLE IF NOT EXISTS immagent_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS immagent_assets (
    digest      bytea       NOT NULL CHECK (octet_length(digest) = 32),
    kind        smallint    NOT NULL,
    codec       smallint    NOT NULL DEFAULT 0,
    refs        bytea       CHECK (octet_length(refs) % 32 = 0),
    body        bytea       NOT NULL,
    CONSTRAINT immagent_assets_digest EXCLUDE USING hash (digest WITH =)
);
CREATE OR REPLACE FUNCTION immagent_refs(refs bytea) RETURNS SETOF bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ROWS 3 AS $$
    SELECT substring(refs FROM i * 32 + 1 FOR 32)
      FROM generate_series(0, coalesce(octet_length(refs), 0) / 32 - 1) AS i
$$;
CREATE TABLE IF NOT EXISTS immagent_states (
    id          uuid        PRIMARY KEY,
    parent_id   uuid,
    kind        smallint    NOT NULL,
    stream      text        NOT NULL,
    refs        bytea       NOT NULL CHECK (octet_length(refs) % 32 = 0),
    digest      bytea       NOT NULL CHECK (octet_length(digest) = 32),
    created_at  timestamptz NOT NULL,
    body        bytea       NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS immagent_states_stream ON immagent_states (kind, stream, seq);
CREATE INDEX IF NOT EXISTS immagent_states_parent ON immagent_states (parent_id);
"""


class V2Store(V1Store):
    """What a version-2 immagent wrote: the same fleet as rows of the asset table (nodes
    with their links in refs) and agent states, plus a longer lineage (several migration
    batches) whose last reply names the tool schemas its call was offered (a message with
    a ref of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.tools = Tools.of([{"type": "function", "function": {"name": "add"}}])
        node: ConversationNode = EMPTY_CONVERSATION
        history: tuple[Message, ...] = ()
        parent: uuid.UUID | None = None
        start = datetime(2026, 11, 2, tzinfo=UTC)
        for step in range(40):
            reply = Message(role="assistant", content=f"long answer {step}",
                            tools=self.tools.digest if step == 39 else None)
            added = (Message.user(f"long question {step}"), reply)
            node = legacy_extend(node, added)
            history += added
            row: dict[str, Any] = {
                "id": uuid.uuid4(), "parent_id": parent, "name": "long",
                "model": "immagent/echo", "system_prompt": self.prompt.digest,
                "conversation": node.digest, "model_config": encode({}),
                "metadata": encode({}), "maps": ({}, {}),
                "created_at": start + timedelta(minutes=step),
                "digest": state_digest("long", "immagent/echo", self.prompt.digest,
                                       node.digest, {}, {})}
            self.agents.append(row)
            self.histories[row["id"]] = history
            parent = row["id"]
            for asset in (node, *added):
                self.assets[asset.digest] = asset
        self.assets[self.tools.digest] = self.tools

    def state_rows(self) -> list[StateRow]:
        return [AgentRecord(id=r["id"], parent_id=r["parent_id"], created_at=r["created_at"],
                            name=r["name"], model=r["model"],
                            system_prompt=r["system_prompt"], conversation=r["conversation"],
                            model_config=r["maps"][0], metadata=r["maps"][1],
                            digest=r["digest"]).to_row() for r in self.agents]


def _write_v2(dsn: str, v2: V2Store) -> None:
    assets = [stored(a) for a in v2.assets.values()]
    states = v2.state_rows()
    if dsn.startswith("sqlite:///"):
        _write_sqlite_v2(dsn.removeprefix("sqlite:///"), assets, states)
        return
    _write_postgres_v2(dsn, assets, states)


def _write_sqlite_v2(path: str, assets: Sequence[Any], states: Sequence[StateRow]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in _V2_SQLITE:
        conn.execute(statement)
    conn.execute("INSERT INTO immagent_schema (version) VALUES (2)")
    conn.executemany("INSERT INTO immagent_assets (digest, kind, codec, refs, body) "
                     "VALUES (?, ?, 0, ?, ?)",
                     [(a.digest, a.kind, b"".join(a.refs), a.body) for a in assets])
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    conn.executemany(
        "INSERT INTO immagent_states (id, parent_id, kind, stream, refs, digest, "
        "created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(s.id.bytes, None if s.parent_id is None else s.parent_id.bytes, s.kind,
          s.stream, b"".join(s.refs), s.digest,
          (s.created_at - epoch) // timedelta(microseconds=1), s.body) for s in states])
    conn.commit()
    conn.close()


def _write_postgres_v2(dsn: str, assets: Sequence[Any], states: Sequence[StateRow]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_V2_POSTGRES.encode())
        conn.execute("INSERT INTO immagent_schema (version) VALUES (2)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO immagent_assets (digest, kind, codec, refs, body) "
                            "VALUES (%s, %s, 0, %s, %s)",
                            [(a.digest, a.kind, b"".join(a.refs) or None, a.body)
                             for a in assets])
            cur.executemany(
                "INSERT INTO immagent_states (id, parent_id, kind, stream, refs, digest, "
                "created_at, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [(s.id, s.parent_id, s.kind, s.stream, b"".join(s.refs), s.digest,
                  s.created_at, s.body) for s in states])


@pytest.fixture
def v2_dsn(backend_name: str, tmp_path: Path, pg_dsn: str) -> Iterator[tuple[str, V2Store]]:
    """A version-2 store on the parametrised backend (a scratch database on PostgreSQL)."""
    v2 = V2Store()
    if backend_name == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'v2.db'}"
        _write_v2(dsn, v2)
        yield dsn, v2
        return
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    name = f"{params['dbname']}_v2_{uuid.uuid4().hex[:6]}"
    admin = psycopg.conninfo.make_conninfo(**{**params, "dbname": "postgres"})  # type: ignore[arg-type]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = psycopg.conninfo.make_conninfo(**{**params, "dbname": name})  # type: ignore[arg-type]
    try:
        _write_v2(dsn, v2)
        yield dsn, v2
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def _raw(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    if dsn.startswith("sqlite:///"):
        lite = sqlite3.connect(dsn.removeprefix("sqlite:///"))
        try:
            return [tuple(r) for r in lite.execute(sql)]
        finally:
            lite.close()
    with psycopg.connect(dsn) as pg:
        return [tuple(r) for r in pg.execute(sql.encode()).fetchall()]


async def _assert_migrated(dsn: str, v2: V2Store) -> None:
    async with await Store.connect(dsn, min_size=1, max_size=2) as store:
        with pytest.raises(SchemaVersionError, match="schema version 2"):
            await store.check_schema()
        await store.init_schema()
        await store.check_schema()
        report = await store.verify()
        assert_clean(report)
        nodes = [a for a in v2.assets.values() if isinstance(a, ConversationNode)]
        # The prompt, the tools and the reply naming them stay assets; every node is a
        # chain node holding the rest of its messages.
        assert (report.assets_checked, report.nodes_checked) == (3, len(nodes))
        for row in v2.agents:
            agent = await store.load_agent(row["id"])
            assert agent.digest == row["digest"] and agent.parent_id == row["parent_id"]
            assert await agent.get_messages() == v2.histories[row["id"]]
        # The reply keeps its ref; the schemas it names are still there, and kept by gc.
        long = v2.agents[-1]["id"]
        assert (await store.gc()).assets_removed == 0
        store.clear_cache()
        last = (await (await store.load_agent(long)).get_messages())[-1]
        assert last.tools == v2.tools.digest
        (tools,) = await store.get_assets([v2.tools.digest], Tools, "tools")
        assert tools == v2.tools
        # The first append after the migration needs no history: the peaks were kept.
        grown = await store.append(await store.load_agent(long), [Message.user("and now?")])
        assert verify_proof(await store.prove(grown, element=80), grown.digest).element == \
            Message.user("and now?")
        assert_clean(await store.verify())


async def test_a_version_2_store_is_migrated_by_init_schema_with_every_digest_kept(
        v2_dsn: tuple[str, V2Store]) -> None:
    await _assert_migrated(*v2_dsn)


#: A child that migrates with two nodes a batch and dies (SIGKILL-like: no cleanup, no
#: rollback of its own) while writing the second batch of node rows.
_DIE_MID_MIGRATION = r"""
import asyncio, os, sys
from immagent import Store
from immagent.store import _migrate

_migrate.BATCH = 2
rows = _migrate.Records.rows
calls = 0

def dying(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == 2:
        print("dying", flush=True)
        os._exit(9)
    return rows(self, *args, **kwargs)

_migrate.Records.rows = dying

async def main(dsn):
    async with await Store.connect(dsn, min_size=1, max_size=1) as store:
        await store.init_schema()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_crash_in_the_middle_of_the_migration_leaves_version_2_untouched(
        v2_dsn: tuple[str, V2Store]) -> None:
    dsn, v2 = v2_dsn
    before = _raw(dsn, "SELECT digest, kind, refs, body FROM immagent_assets ORDER BY digest")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIE_MID_MIGRATION, dsn, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 9 and b"dying" in out, err.decode()
    # The one migration transaction died with the process: still version 2, every row as
    # it was, no node table.
    assert _raw(dsn, "SELECT max(version) FROM immagent_schema") == [(2,)]
    assert _raw(dsn, "SELECT digest, kind, refs, body FROM immagent_assets "
                     "ORDER BY digest") == before
    tables = ("SELECT name FROM sqlite_master WHERE name = 'immagent_nodes'"
              if dsn.startswith("sqlite:///")
              else "SELECT to_regclass('immagent_nodes') FROM (SELECT 1) AS one "
                   "WHERE to_regclass('immagent_nodes') IS NOT NULL")
    assert _raw(dsn, tables) == []
    # The next init_schema() migrates as if nothing had happened.
    await _assert_migrated(dsn, v2)
