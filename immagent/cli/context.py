"""What every command gets: the parsed options, one event loop, output, and the Store."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

from immagent.agent import PersistentAgent
from immagent.cli.database import Database, check_sqlite_file, resolve
from immagent.cli.errors import CLIError
from immagent.cli.render import Output
from immagent.clients.agents import Store
from immagent.exceptions import SchemaMissingError

__all__ = ["Context"]

T = TypeVar("T")


class Context:
    """Runs a command's coroutines on one loop (so a Store outlives a single ``run``)
    and opens the Store on first use."""

    def __init__(self, args: argparse.Namespace, runner: asyncio.Runner) -> None:
        self.args = args
        self.runner = runner
        self.out = Output(bool(args.json))
        self._store: Store | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on the command's event loop."""
        return self.runner.run(coro)

    def database(self) -> Database:
        """The database this invocation names (not opened)."""
        return resolve(self.args.db, replicas=getattr(self.args, "replica", None))

    def store(self, *, create: bool = False, write: bool = False) -> Store:
        """The open Store. ``create``: a missing database or schema is made (chat, import);
        otherwise it must already hold an immagent store. ``write``: the command writes,
        so a read-only SQLite file fails before anything is opened."""
        if self._store is None:
            db = self.database()
            if db.path is not None:
                check_sqlite_file(db.path, create=create, write=write or create)
            self._store = self.run(_open(db, create=create))
        return self._store

    def load(self, agent_id: UUID) -> PersistentAgent:
        """The agent state with this id (AgentNotFoundError names it if absent)."""
        return self.run(self.store().load_agent(agent_id))

    def close(self) -> None:
        """Close the Store if it was opened."""
        store, self._store = self._store, None
        if store is not None:
            self.run(store.close())


async def _open(db: Database, *, create: bool) -> Store:
    """Connect; then create the schema if missing (``create``) or insist that it exists.
    Either way a database of another schema version is refused before anything is written."""
    store = await Store.connect(db.dsn, min_size=1, max_size=2, replicas=db.replicas)
    try:
        if create:
            await store.init_schema()
        else:
            await _check_schema(store, db)
    except BaseException:
        await store.close()
        raise
    return store


async def _check_schema(store: Store, db: Database) -> None:
    """Refuse a database without an immagent schema, without adding one to it."""
    try:
        await store.check_schema()
    except SchemaMissingError as e:
        raise CLIError(f"{db.shown} holds no immagent store yet (`immagent chat` or "
                       "`immagent import` creates one)") from e
