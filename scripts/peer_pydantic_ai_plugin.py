"""pytest plugin: run pydantic-ai's own conversation-store tests against immagent.

Loaded with ``-p peer_pydantic_ai_plugin`` (``scripts/`` on ``PYTHONPATH``) into a pytest
run of pydantic-ai's test files. pydantic-ai tests its stores through
``InMemoryConversationStore``; importing this plugin (which pytest does before it loads
any conftest or test module) replaces that class, in ``pydantic_ai.conversation_store``,
with ``PeerStore``: an ``ImmAgentConversationStore`` (so every behaviour is ours) that
takes no arguments, as the in-memory store does, and opens a fresh store of its own on
``IMMAGENT_PEER_BACKEND``: ``sqlite`` (a new file per store, the default), ``postgres`` (a
new database per store on the server ``IMMAGENT_PEER_DSN``, dropped at exit) or ``memory``.
Tests that subclass the in-memory store subclass ours instead.

Tests that look inside the in-memory store (its ``_records`` and ``_entries`` dicts, or
``delete`` removing entries, which ours keeps by design) fail here: the runner
(``scripts/peer_pydantic_ai.py``) lists every test that passes on pydantic-ai's store and
fails on ours, for the README's account of what does not apply.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import uuid

import pydantic_ai.conversation_store as conversation_store

from immagent.integrations.pydantic_ai import ImmAgentConversationStore

__all__ = ["PeerStore", "install"]

_BACKEND = os.environ.get("IMMAGENT_PEER_BACKEND", "sqlite")
_DSN = os.environ.get("IMMAGENT_PEER_DSN", "")
_numbers = itertools.count()
_tmp = tempfile.mkdtemp(prefix="immagent-peer-")
_databases: list[str] = []


def _fresh_db() -> str:
    """Where the next store lives: nothing any other store wrote is visible there."""
    if _BACKEND == "memory":
        return "memory://"
    if _BACKEND == "postgres":
        import psycopg

        name = f"immagent_peer_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        _databases.append(name)
        params = psycopg.conninfo.conninfo_to_dict(_DSN)
        params["dbname"] = name
        return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    return f"sqlite:///{_tmp}/store-{next(_numbers)}.db"


class PeerStore(ImmAgentConversationStore):
    """ImmAgentConversationStore in the place of pydantic-ai's InMemoryConversationStore."""

    def __init__(self) -> None:
        super().__init__(_fresh_db())


@atexit.register
def _cleanup() -> None:
    shutil.rmtree(_tmp, ignore_errors=True)
    if _databases:
        import psycopg

        with psycopg.connect(_DSN, autocommit=True) as conn:
            for name in _databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def install() -> None:
    """Put PeerStore where pydantic-ai's tests find their in-memory store."""
    PeerStore.__name__ = PeerStore.__qualname__ = "InMemoryConversationStore"
    conversation_store.InMemoryConversationStore = PeerStore  # type: ignore[misc,assignment]


install()


def pytest_report_header() -> str:
    return f"immagent peer run: InMemoryConversationStore is ImmAgentConversationStore " \
           f"on {_BACKEND}"
