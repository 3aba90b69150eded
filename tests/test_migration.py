"""A real schema-version-1 store, built with version 1's DDL and rows (as immagent 0.2 before
the event-store layout wrote them: commit ba51f08), opened and migrated by init_schema() on
both backends: every digest, state and read must survive."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from immagent import Message, Store
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, SystemPrompt, encode
from immagent.exceptions import SchemaVersionError
from immagent.records import state_digest
from immagent.rows import stored
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

class V1Store:
    """What a version-1 immagent wrote for a small fleet: assets as rows (canonical bodies,
    node links in refs) and agent rows whose maps are canonical msgpack."""

    def __init__(self) -> None:
        self.prompt = SystemPrompt(text="You are terse. " * 20)
        self.assets: dict[bytes, SystemPrompt | ConversationNode | Message] = {}
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
                    node = node.extend(added)
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
        assert report.assets_checked == len(v1.assets)
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
