"""A pytest plugin that runs LangGraph's own graph tests with ImmAgentSaver as a checkpointer.

Loaded by ``scripts/peer_langgraph.py`` (``-p peer_langgraph_plugin``) into a run of
``libs/langgraph/tests`` from LangGraph's source; nothing of LangGraph's is copied here.
LangGraph's ``tests/conftest.py`` picks checkpointers with two parametrised fixtures,
``sync_checkpointer`` and ``async_checkpointer``. When that conftest is registered (before
pytest reads its fixtures) this plugin replaces both with fixtures of the same name whose
params are the savers asked for in ``IMMAGENT_PEER_SAVERS``: LangGraph's own ones (run by
LangGraph's original fixture function, unchanged) and ``immagent_sqlite`` /
``immagent_postgres``, opened here the way LangGraph's docs open its savers (sync: ``with
ImmAgentSaver.from_conn_string(...)``; async: ``async with``). LangGraph's PostgreSQL
fixtures are pointed at ``IMMAGENT_PEER_DSN``'s server (they create and drop a database per
test, and so do ours).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import psycopg
import pytest

OURS = ("immagent_sqlite", "immagent_postgres")


def _server() -> str:
    """The PostgreSQL server's URI ending in "/" (LangGraph appends a database name)."""
    dsn = os.environ.get("IMMAGENT_PEER_DSN", "")
    if not dsn:
        return ""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    return f"postgresql://{user}{password}@{info.get('host', 'localhost')}:" \
           f"{info.get('port', 5432)}/"


def _wanted(kind: str) -> list[str]:
    """The fixture params to run for ``kind`` ("sync" or "async")."""
    names = [n.strip() for n in os.environ.get("IMMAGENT_PEER_SAVERS", "").split(",")
             if n.strip()]
    theirs = {"sync": {"memory": "memory", "sqlite": "sqlite", "postgres": "postgres"},
              "async": {"memory": "memory", "sqlite": "sqlite_aio",
                        "postgres": "postgres_aio"}}[kind]
    return [theirs.get(n, n) for n in names]


@contextlib.contextmanager
def _database() -> Iterator[str]:
    server = _server()
    if not server:
        raise RuntimeError("IMMAGENT_PEER_DSN is not set: no PostgreSQL for immagent_postgres")
    # Not uuid.uuid4: tests such as test_root_graph patch it (deterministic_uuids) before
    # this fixture runs and count on the ids it hands out.
    name = f"immagent_peer_{secrets.token_hex(8)}"
    with psycopg.connect(server + "postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server + name
    finally:
        with psycopg.connect(server + "postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _target(name: str) -> Iterator[str]:
    if name == "immagent_postgres":
        with _database() as dsn:
            yield dsn
    else:
        with tempfile.TemporaryDirectory(prefix="immagent-peer-") as folder:
            yield os.path.join(folder, "checkpoints.db")


@contextlib.contextmanager
def _ours_sync(name: str) -> Iterator[Any]:
    from immagent.integrations.langgraph import ImmAgentSaver

    with _target(name) as target, ImmAgentSaver.from_conn_string(target) as saver:
        saver.setup()
        yield saver


@contextlib.asynccontextmanager
async def _ours_async(name: str) -> AsyncIterator[Any]:
    from immagent.integrations.langgraph import ImmAgentSaver

    with _target(name) as target:
        async with ImmAgentSaver.from_conn_string(target) as saver:
            await saver.setup()
            yield saver


def _replace_fixtures(conftest: ModuleType) -> None:
    original_sync = getattr(conftest, "sync_checkpointer")._get_wrapped_function()  # noqa: B009
    original_async = getattr(conftest, "async_checkpointer")._get_wrapped_function()  # noqa: B009

    @pytest.fixture(scope="function", params=_wanted("sync"))
    def sync_checkpointer(request: pytest.FixtureRequest) -> Iterator[Any]:
        if request.param in OURS:
            with _ours_sync(request.param) as saver:
                yield saver
        else:
            yield from original_sync(request)

    @pytest.fixture(scope="function", params=_wanted("async"))
    async def async_checkpointer(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
        if request.param in OURS:
            async with _ours_async(request.param) as saver:
                yield saver
        else:
            async for saver in original_async(request):
                yield saver

    setattr(conftest, "sync_checkpointer", sync_checkpointer)  # noqa: B010
    setattr(conftest, "async_checkpointer", async_checkpointer)  # noqa: B010


def pytest_plugin_registered(plugin: object, plugin_name: str) -> None:
    """Swap LangGraph's checkpointer fixtures before pytest parses its tests' conftest,
    and point its PostgreSQL fixtures at our server."""
    if not isinstance(plugin, ModuleType):
        return
    if plugin.__name__ == "tests.conftest" and hasattr(plugin, "sync_checkpointer"):
        _replace_fixtures(plugin)
    if plugin.__name__ == "tests.conftest" or plugin_name.endswith("conftest.py"):
        import sys

        module = sys.modules.get("tests.conftest_checkpointer")
        if module is not None and _server():
            module.DEFAULT_POSTGRES_URI = _server()  # type: ignore[attr-defined]


# -- outcomes, paired by everything but the checkpointer ---------------------------------------

_CHECKPOINTERS = ("sync_checkpointer", "async_checkpointer")
_items: dict[str, dict[str, str]] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # after -k and deselection
        callspec = getattr(item, "callspec", None)
        params = dict(callspec.params) if callspec is not None else {}
        saver = next((str(params.pop(k)) for k in _CHECKPOINTERS if k in params), None)
        if saver is None:
            continue
        name = getattr(item, "originalname", item.name)
        rest = ",".join(f"{k}={params[k]!r}" for k in sorted(params))
        _items[item.nodeid] = {"nodeid": item.nodeid, "name": name, "saver": saver,
                               "key": f"{item.path.name}::{name}[{rest}]",
                               "outcome": "not run"}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    item = _items.get(report.nodeid)
    if item is None:
        return
    if report.failed:
        item["outcome"] = "failed"
        text = str(report.longrepr) if report.longrepr is not None else ""
        lines = [line for line in text.splitlines() if line.startswith("E ")]
        item["message"] = (lines[-1] if lines else text.splitlines()[-1] if text else "")[:300]
    elif report.skipped and item["outcome"] != "failed":
        item["outcome"] = "skipped"
    elif report.when == "call" and report.passed and item["outcome"] != "failed":
        item["outcome"] = "passed"


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("IMMAGENT_PEER_RESULTS")
    if target:
        import json

        with open(target, "w", encoding="utf-8") as out:
            json.dump(list(_items.values()), out)
