"""What every command gets: the parsed options, one event loop, output, the Store, and
references resolved to states."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

from immagent.agent import PersistentAgent
from immagent.cli import confirm
from immagent.cli.database import Database, check_sqlite_file, resolve
from immagent.cli.errors import CLIError
from immagent.cli.output import Output, Terminal, pager_command
from immagent.cli.refs import Ref, Resolved
from immagent.cli.refs import resolve as resolve_ref
from immagent.clients.agents import Store
from immagent.exceptions import SchemaMissingError
from immagent.records import StateRow

__all__ = ["Context"]

T = TypeVar("T")


class Context:
    """Runs a command's coroutines on one loop (so a Store outlives a single ``run``),
    opens the Store on first use, and holds the command's Output (a pager for commands
    that page, on a terminal, unless --no-pager)."""

    def __init__(self, args: argparse.Namespace, runner: asyncio.Runner, *,
                 pages: bool = False) -> None:
        self.args = args
        self.runner = runner
        self.terminal = Terminal.detect(getattr(args, "color", None) or "auto")
        pager = (pager_command() if pages and self.terminal.stdout_tty
                 and not getattr(args, "no_pager", False) else None)
        self.out = Output(bool(args.json), self.terminal, pager=pager)
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

    def state(self, ref: Ref) -> StateRow:
        """The state a reference names (CLIError when none or several do)."""
        return self.resolve(ref).row

    def resolve(self, ref: Ref, *, write: bool = False) -> Resolved:
        """The state a reference names and how it was named (``write``: the command will
        change the store, so a read-only database is refused first)."""
        return self.run(resolve_ref(self.store(write=write), ref))

    def load(self, agent_id: UUID) -> PersistentAgent:
        """The agent state with this id (AgentNotFoundError names it if absent)."""
        return self.run(self.store().load_agent(agent_id))

    def approve(self, plan: confirm.Plan) -> bool:
        """Go ahead with a destructive command? (see ``cli.confirm``)."""
        return confirm.approve(self.out, self.args, plan)

    def close(self) -> None:
        """Finish the pager and close the Store if it was opened."""
        try:
            self.out.close()
        finally:
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
