"""Test harness: a real PostgreSQL (started here when IMMAGENT_TEST_DSN is unset) and real
SQLite files. Every backend-agnostic test runs against both through the ``store`` fixture."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings

import immagent
from immagent import Message

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Hypothesis profiles: quick in CI, deep locally with HYPOTHESIS_PROFILE=deep.
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["postgres", "sqlite"]

# The primary + standby + PgBouncer fixtures; nothing starts until a test asks for them.
pytest_plugins = ["tests.pg_cluster"]


def _server_dsn() -> str:
    """A PostgreSQL server: $IMMAGENT_TEST_DSN, else one started by our own script, else
    (no PostgreSQL binaries and none installable) a testcontainers one if Docker answers."""
    dsn = os.environ.get("IMMAGENT_TEST_DSN")
    if dsn:
        return dsn
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-postgres.sh")],
                         capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.strip().splitlines()[-1]
    container = _docker_postgres()
    if container is None:
        pytest.exit(f"no PostgreSQL for the tests: ensure-postgres.sh failed:\n{out.stderr}",
                    returncode=1)
    return container


def _docker_postgres() -> str | None:
    """A PostgreSQL container through testcontainers, or None when no Docker engine answers."""
    try:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
    except Exception:  # no engine, no image: the caller reports the original failure
        return None
    _containers.append(container)
    return str(container.get_connection_url())


_containers: list[object] = []


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh database, created for this test session and dropped after it."""
    server = _server_dsn()
    name = f"immagent_t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(server)
    params["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _pg_schema(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        from immagent.store.backend import SCHEMA_VERSION
        from immagent.store.schema import schema_sql

        conn.execute(schema_sql().encode())
        conn.execute("INSERT INTO immagent_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                     (SCHEMA_VERSION,))
    return pg_dsn


def _truncate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE immagent_assets, immagent_states, immagent_nodes")


@pytest.fixture
def pg_store_dsn(_pg_schema: str) -> str:
    """The session database, emptied for this test."""
    _truncate(_pg_schema)
    return _pg_schema


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_dsn(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store's DSN on the parametrised backend."""
    if backend_name == "postgres":
        return str(request.getfixturevalue("pg_store_dsn"))
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(store_dsn: str) -> AsyncIterator[immagent.Store]:
    """An open, initialised, empty Store on each backend."""
    s = await immagent.Store.connect(store_dsn, min_size=1, max_size=4)
    await s.init_schema()
    try:
        yield s
    finally:
        await s.close()


def turn(i: int, tag: str = "", *, tokens: tuple[int, int] | None = (1, 1),
         model: str | None = None, call_config: dict[str, Any] | None = None) -> list[Message]:
    """One step's messages, distinct per ``i`` and ``tag``: a user question and its answer
    (with token usage, and optionally the model and call parameters audits record)."""
    given, taken = (None, None) if tokens is None else tokens
    return [Message(role="user", content=f"q{i}{tag}"),
            Message(role="assistant", content=f"a{i}{tag}", input_tokens=given,
                    output_tokens=taken, model=model, call_config=call_config)]


def raw_sql(dsn: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the store's database directly; PostgreSQL placeholders are %s,
    SQLite ones ?, and UUID parameters become SQLite's 16-byte blobs."""
    if dsn.startswith("sqlite:///"):
        import sqlite3

        args = [p.bytes if isinstance(p, uuid.UUID) else p for p in params]
        with sqlite3.connect(dsn.removeprefix("sqlite:///")) as conn:
            return list(conn.execute(sql.replace("%s", "?"), args).fetchall())
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), list(params))
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def count_rows(dsn: str, table: str, where: str = "TRUE") -> int:
    """Rows in one of our tables, read behind the Store's back (for storage assertions)."""
    return int(raw_sql(dsn, f"SELECT count(*) FROM {table} WHERE {where}")[0][0])


def stored_elements(dsn: str, kind: int | None = None) -> int:
    """Chain elements stored (schema 3): held inline by node rows, or as assets of their
    own (larger bodies, and elements a state points at)."""
    from immagent.assets import NODE_KINDS

    width = "length" if dsn.startswith("sqlite:///") else "octet_length"
    node_kinds = [k for k, t in NODE_KINDS.items() if kind is None or t.element_kind == kind]
    held = sum(int(raw_sql(dsn, f"SELECT coalesce(sum(count - coalesce({width}(refs), 0) "
                                f"/ 32), 0) FROM immagent_nodes WHERE kind = {k}")[0][0])
               for k in node_kinds)
    element_kinds = {int(t.element_kind) for t in NODE_KINDS.values()}
    own = [k for k in element_kinds if kind is None or k == kind]
    return held + sum(count_rows(dsn, "immagent_assets", f"kind = {k}") for k in own)


def node_record(dsn: str, digest: bytes) -> bytes:
    """A stored chain node's record, decompressed (what immagent.chains describes)."""
    from immagent import codec
    from immagent.store import _migrate

    (row,) = raw_sql(dsn, "SELECT codec, body FROM immagent_nodes WHERE digest = %s",
                     [digest])
    dictionaries = _migrate.dictionaries_from(bytes(b) for (b,) in raw_sql(
        dsn, "SELECT body FROM immagent_assets WHERE kind = 9"))
    return codec.decode(int(row[0]), bytes(row[1]), dictionaries)


def write_record(dsn: str, digest: bytes, record: bytes) -> None:
    """Store ``record`` as a node's record, uncompressed (damage, behind the Store's back)."""
    raw_sql(dsn, "UPDATE immagent_nodes SET codec = 0, body = %s WHERE digest = %s",
            [record, digest])


def root_row(node: Any) -> Any:
    """The row that stores a chain's root node (its record: its fields, no elements), for
    tests writing through a backend directly."""
    from immagent import chains

    return chains.NewNode(node.digest, int(node.kind), None, (),
                          chains.record(node.body, []), 0, b"", 0)


def node_row(node: Any, elements: Sequence[Any] = (), *, peaks: bytes | None = None,
             out_of_line: Sequence[bytes] = ()) -> Any:
    """The row that stores ``node`` with its elements inline (those whose digests are in
    ``out_of_line`` named by refs instead), uncompressed: for tests writing through a
    backend directly."""
    from immagent import chains

    entries = [chains.OUT_OF_LINE if e.digest in out_of_line else e.body for e in elements]
    return chains.NewNode(node.digest, int(node.kind), node.parent, tuple(out_of_line),
                          chains.record(node.body, entries), 0,
                          b"" if peaks is None and node.parent is None else peaks,
                          len(elements))


def distinct_elements(dsn: str, kind: int) -> int:
    """Distinct chain elements of ``kind`` stored, whether held by nodes or assets of their
    own: what "stored once" means (a node may keep a second copy of a value another
    process had just written as an asset of its own; that is a storage detail)."""
    import blake3

    from immagent import chains
    from immagent.assets import NODE_KINDS

    digests = {bytes(r[0]) for r in raw_sql(
        dsn, f"SELECT digest FROM immagent_assets WHERE kind = {int(kind)}")}
    node_kinds = [k for k, t in NODE_KINDS.items() if t.element_kind == kind]
    for k in node_kinds:
        for (digest,) in raw_sql(dsn, f"SELECT digest FROM immagent_nodes WHERE kind = {k}"):
            _, entries = chains.split_record(node_record(dsn, bytes(digest)))
            digests.update(blake3.blake3(bytes((int(kind),)) + e).digest() for e in entries
                           if not chains.is_marker(e))
    return len(digests)
