"""Test harness: a real PostgreSQL (started here when IMMAGENT_TEST_DSN is unset) and real
SQLite files. Every backend-agnostic test runs against both through the ``store`` fixture.
Also the one home of what several test modules share: the ``calc`` MCP server, the two
paths of the offline models (``offline_path``, with ``FAST`` and ``USER``), and loading an
example (``example``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

import immagent
from immagent import Message

if TYPE_CHECKING:
    from immagent.mcp import MCPManager

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Hypothesis profiles: quick in CI, deep locally with HYPOTHESIS_PROFILE=deep.
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["postgres", "sqlite"]
#: What tests of modules marked ``on_cluster`` run on besides: the replication cluster's
#: PgBouncer (transaction pooling) and a Store reading from its hot standby.
CLUSTER_BACKENDS = ["pgbouncer", "replica"]

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "on_cluster: the module's store tests also run "
                            "through PgBouncer and with a read replica (the replication "
                            "cluster of tests/pg_cluster.py)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses a store runs on each backend; in a module marked
    ``on_cluster``, on the cluster's too."""
    if "backend_name" in metafunc.fixturenames:
        names = BACKENDS + (CLUSTER_BACKENDS if metafunc.definition.get_closest_marker(
            "on_cluster") else [])
        metafunc.parametrize("backend_name", names, indirect=True)


@pytest.fixture
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_dsn(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store's DSN on the parametrised backend (on the cluster: the primary,
    where tests look at and damage rows)."""
    if backend_name == "postgres":
        return str(request.getfixturevalue("pg_store_dsn"))
    if backend_name in CLUSTER_BACKENDS:
        from tests.cluster_store import empty_store

        return empty_store(request.getfixturevalue("pg_cluster_db")).primary
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(store_dsn: str, backend_name: str,
                request: pytest.FixtureRequest) -> AsyncIterator[immagent.Store]:
    """An open, initialised, empty Store on each backend."""
    if backend_name == "pgbouncer":
        bouncer = request.getfixturevalue("pg_cluster_db").bouncer
        s = await immagent.Store.connect(f"{bouncer} prepare_threshold=none", min_size=1,
                                         max_size=4)
    elif backend_name == "replica":
        standby = request.getfixturevalue("pg_cluster_db").standby
        s = await immagent.Store.connect(store_dsn, replicas=[standby], min_size=1,
                                         max_size=4)
    else:
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


def unrecorded(messages: Sequence[Message]) -> tuple[Message, ...]:
    """``messages`` without the request digests (and tools) model calls record, for tests
    that compare what a turn said with literal messages; ``tests/test_replay.py`` checks
    the records themselves."""
    import msgspec

    return tuple(msgspec.structs.replace(m, request=None, tools=None) for m in messages)


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


# -- shared by several modules: tools, the offline models' two paths, the examples ---------

#: The MCP server tool tests talk to: a real stdio server process (examples/).
CALCULATOR = str(ROOT / "examples" / "calculator_server.py")
#: retry_delay for tests: the real backoff code, negligible sleeps.
FAST = 0.001
#: A one-message history for model calls.
USER = [Message(role="user", content="hello there")]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def calc() -> AsyncIterator[MCPManager]:
    """An MCPManager connected to the calculator server (one process per module)."""
    from immagent.mcp import MCPManager  # the MCP SDK loads only where a test needs it

    async with MCPManager() as mcp:
        await mcp.connect("calc", sys.executable, [CALCULATOR])
        yield mcp


@pytest.fixture(params=["in-process", "litellm"])
def offline_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the offline models answered in-process, then through LiteLLM's real
    call path (a module opts in with ``pytest.mark.usefixtures("offline_path")``)."""
    from immagent.offline import route_through_litellm

    previous = route_through_litellm(request.param == "litellm")
    yield str(request.param)
    route_through_litellm(previous)


@contextlib.contextmanager
def example(name: str) -> Iterator[ModuleType]:
    """``examples/<name>.py`` loaded as a module, registered in ``sys.modules`` while in use
    (LangGraph resolves a graph state's annotations through it)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example",
                                                  ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
