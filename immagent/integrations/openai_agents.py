"""An OpenAI Agents SDK ``Session`` kept in immagent's store: durable, branchable, verifiable.

``ImmAgentSession`` implements the SDK's ``Session`` protocol (``get_items``, ``add_items``,
``pop_item``, ``clear_session``) and the branching methods of the SDK's
``AdvancedSQLiteSession`` (``create_branch_from_turn``, ``switch_to_branch``,
``list_branches``, ``delete_branch``), plus ``fork``. Use it wherever the SDK takes a
session: ``Runner.run(agent, "hi", session=ImmAgentSession("user-42", "chat.db"))``.

What differs from the SDK's own sessions: nothing is destroyed. Every change is a new
immutable *session state* (``immagent.clients.sessions``): ``add_items`` appends, ``pop_item`` and
``clear_session`` write a state without the item(s), and every earlier state stays
listable (``list_states``) and loadable (``get_state_items``) until its row is deleted with
``Store.delete_states``; only then can ``Store.gc()`` reclaim its items. Items are content-
addressed assets, so branches and forks share them and their chain links instead of copying
rows; a state's ``digest`` pins its whole content, ``Store.verify()`` checks sessions like
everything else, and ``export`` writes an audit bundle of the session's lineage.

Items come back equal (``==``) to what was added, as JSON would carry them: object keys in
sorted order, tuples as lists, ints and floats kept apart. Values JSON cannot carry (sets,
bytes, objects, NaN, infinities, non-str keys, ints beyond 64 bits, lone surrogates, cycles)
are a ValidationError naming ``items[i]``, and nothing is written.

Event loops. A ``Store`` is bound to the event loop it was opened on (its pools and locks
are), while the SDK runs a session from wherever it is used: ``Runner.run_sync`` runs its
own loop, and one session may be used from several threads at once. So every operation
runs on the store's loop and other loops hand their calls to it:

* ``db`` a DSN (``sqlite:///path.db``, a bare ``*.db`` path, ``postgresql://…``,
  ``memory://``): the session owns a store on a private loop in a daemon thread, opened
  (and its schema created) on first use, closed by ``close()``. Forks share it.
* ``db`` an open ``Store`` (or any ``EventLog``): shared, never closed by the session. Its
  loop is the one running when the session is made (or else the loop of its first call);
  calls from other loops are sent to it, so that loop must keep running meanwhile.

A cancelled ``add_items``/``pop_item``/``clear_session``/branch call waits until its write
has committed or failed before it re-raises the cancellation, as the SDK's sessions do: a
cancelled caller never leaves a write in flight behind it.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar, cast
from uuid import UUID

from immagent.exceptions import ExtraNotInstalledError

try:
    from agents.items import TResponseInputItem
    from agents.memory.session_settings import (
        SessionSettings,
        coerce_session_settings,
        resolve_session_limit,
    )
except ImportError as e:  # the extra is not installed
    raise ExtraNotInstalledError("immagent.integrations.openai_agents", "openai-agents",
                                 cause=e) from e

from immagent.assets import Item
from immagent.audit.bundle import BundleInfo
from immagent.clients.sessions import (
    MAIN,
    SessionLog,
    SessionState,
    check_items,
    check_session_id,
    decode_items,
    user_turns,
)
from immagent.exceptions import StoreClosedError, StoreError, ValidationError
from immagent.store import dsn as dsns
from immagent.store.log import EventLog

__all__ = ["ImmAgentSession", "SessionState"]

T = TypeVar("T")
Work = Callable[[EventLog], Coroutine[Any, Any, T]]


async def _settle(future: asyncio.Future[T]) -> T:
    """The outcome of a write, even if the caller is cancelled while it runs: then the
    write is waited for first and the cancellation re-raised after (never a write left
    running behind a caller that believes it stopped it)."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as e:
            if future.cancelled():
                raise
            cancelled = cancelled or e
        except BaseException:
            break  # the write failed: reported below
    if cancelled is not None:
        raise cancelled
    return future.result()


class _Host(abc.ABC):
    """Where a session's store lives and how a call from any loop reaches it."""

    def __init__(self) -> None:
        self._users = 1
        self._mutex = threading.Lock()

    def share(self) -> _Host:
        """One more session (a fork) uses this host; each one's close() releases it."""
        with self._mutex:
            if self._closed():
                raise StoreClosedError("the session is closed")
            self._users += 1
        return self

    @abc.abstractmethod
    async def run(self, work: Work[T], *, write: bool) -> T:
        """Run ``work(store)`` on the store's loop and return its result here."""

    def release(self) -> None:
        """One user is done; the last one closes what the host owns."""
        with self._mutex:
            self._users -= 1
            last = self._users == 0
        if last:
            self._shutdown()

    @abc.abstractmethod
    def _closed(self) -> bool:
        """True once the last user released the host."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Close what the host owns (called once, by the last release)."""


async def _hop(work: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop,
               write: bool) -> T:
    """Run a coroutine on another thread's ``loop`` and await it from this one."""
    waiter = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))
    return await (_settle(waiter) if write else waiter)


class _OwnedHost(_Host):
    """A store opened from a DSN, on a private event loop in a daemon thread."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: EventLog | None = None
        self._opening: asyncio.Lock | None = None
        self._done = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def _closed(self) -> bool:
        return self._done

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._mutex:
            if self._done:
                raise StoreClosedError("the session is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._opening = asyncio.Lock()
                self._thread = threading.Thread(target=self._serve, args=(self._loop,),
                                                name="immagent-session", daemon=True)
                self._thread.start()
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> EventLog:
        assert self._opening is not None
        async with self._opening:  # concurrent first calls open one store
            if self._done:  # a call that slipped in as close() began opens nothing
                raise StoreClosedError("the session is closed")
            if self._store is None:
                store = await EventLog.connect(self._dsn)
                try:
                    await store.init_schema()
                except BaseException:
                    await store.close()
                    raise
                self._store = store
            return self._store

    async def _call(self, work: Work[T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await work(await self._open())
        finally:
            self._tasks.discard(task)

    async def run(self, work: Work[T], *, write: bool) -> T:
        loop = self._start()
        return await _hop(self._call(work), loop, write)

    async def _close_store(self) -> None:
        # Calls already running finish first (close() is refused to new ones).
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in self._tasks if t is not current),
                             return_exceptions=True)
        if self._store is not None:
            await self._store.close()

    def _shutdown(self) -> None:
        with self._mutex:
            self._done = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        if threading.current_thread() is thread:
            # Released from the loop's own thread (a finalizer): it cannot wait for
            # itself, so the loop closes the store and then stops.
            task = loop.create_task(self._close_store())
            task.add_done_callback(lambda _: loop.stop())
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close_store(), loop).result()
        except (concurrent.futures.CancelledError, RuntimeError):
            pass  # the loop is already stopping: nothing left to close on it
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


class _SharedHost(_Host):
    """An open Store given by the caller, on the loop it was opened on (never closed here)."""

    def __init__(self, store: EventLog) -> None:
        super().__init__()
        self._store = store
        self._done = False
        try:
            self._home: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._home = None  # taken from the first call

    def _closed(self) -> bool:
        return self._done

    async def run(self, work: Work[T], *, write: bool) -> T:
        if self._done:
            raise StoreClosedError("the session is closed")
        here = asyncio.get_running_loop()
        with self._mutex:
            if self._home is None:
                self._home = here
            home = self._home
        if home is here:
            return await (_settle(asyncio.ensure_future(work(self._store))) if write
                          else work(self._store))
        if home.is_closed() or not home.is_running():
            raise StoreError("the Store this session shares belongs to an event loop that "
                             "is not running, so it cannot be used from this one: keep its "
                             "loop running, or give the session a DSN to own a store")
        return await _hop(work(self._store), home, write)

    def _shutdown(self) -> None:
        self._done = True


class ImmAgentSession:
    """An OpenAI Agents SDK session whose every state is kept, content-addressed, in an
    immagent store (SQLite or PostgreSQL). A drop-in for ``SQLiteSession``; safe to use
    from many tasks and from several threads (each with its own event loop) at once."""

    session_settings: SessionSettings | None

    def __init__(self, session_id: str, db: str | os.PathLike[str] | EventLog, *,
                 session_settings: SessionSettings | dict[str, Any] | None = None) -> None:
        """The session ``session_id`` in ``db``: a DSN (opened on first use, closed by
        ``close()``) or an open, initialised ``Store`` or ``EventLog`` (shared; not closed here).
        ``session_settings.limit`` bounds ``get_items()`` as in the SDK's sessions."""
        self.session_id = check_session_id("session_id", session_id)
        self.session_settings = (coerce_session_settings(session_settings)
                                 if session_settings is not None else SessionSettings())
        host: _Host
        if isinstance(db, EventLog):
            if db.closed:
                raise ValidationError("db", "the Store is closed", None)
            host = _SharedHost(db)
        else:
            target = dsns.parse(db)  # a bad DSN fails here, before any thread starts
            host = _OwnedHost(target.dsn)
        self._bind(host)

    def _bind(self, host: _Host) -> None:
        self._host = host
        self._log: SessionLog | None = None
        self._closed = False
        # A session dropped without close() still releases its host (and thread).
        self._finalizer = weakref.finalize(self, host.release)

    @classmethod
    def _sharing(cls, host: _Host, session_id: str,
                 settings: SessionSettings | None) -> ImmAgentSession:
        session = cls.__new__(cls)
        session.session_id = session_id
        session.session_settings = settings
        session._bind(host.share())
        return session

    def __repr__(self) -> str:
        return f"ImmAgentSession({self.session_id!r}, branch={self.current_branch_id!r})"

    @property
    def current_branch_id(self) -> str:
        """The branch this session object reads and writes (``main`` until switched)."""
        return self._log.branch if self._log is not None else MAIN

    async def _run(self, work: Callable[[SessionLog], Awaitable[T]], *,
                   write: bool = False) -> T:
        if self._closed:
            raise StoreClosedError(f"session {self.session_id!r} is closed")

        async def on_store(store: EventLog) -> T:
            # Runs on the store's loop only, so the log needs no lock of its own here.
            if self._log is None:
                self._log = SessionLog(store, self.session_id)
            return await work(self._log)

        return await self._host.run(on_store, write=write)

    # -- the SDK's Session protocol -------------------------------------------------------

    async def get_items(self, limit: int | None = None, *,
                        branch_id: str | None = None) -> list[TResponseInputItem]:
        """The items of the current branch (or ``branch_id``) oldest first; with ``limit``
        (or else ``session_settings.limit``) only the latest ``limit`` of them, still in
        order (0: none; negative: all, as in the SDK's SQLite session)."""
        wanted = resolve_session_limit(limit, self.session_settings)
        _check_limit(wanted)

        async def read(log: SessionLog) -> list[Any]:
            return _latest(await log.items(branch_id), wanted)

        return cast(list[TResponseInputItem], await self._run(read))

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` to the current branch, in one new state (none for an empty
        list). Concurrent calls are applied one after another, none lost."""
        checked = check_items(items)

        async def change(log: SessionLog) -> None:
            await log.append(checked)

        if not checked:
            if self._closed:
                raise StoreClosedError(f"session {self.session_id!r} is closed")
            return
        await self._run(change, write=True)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item of the current branch (None when it is empty);
        the state before it stays stored."""

        async def change(log: SessionLog) -> Item | None:
            item, _ = await log.pop()
            return item

        item = await self._run(change, write=True)
        return None if item is None else cast(TResponseInputItem, decode_items([item])[0])

    async def clear_session(self) -> None:
        """Make the session empty in a new state: ``main`` holds no item and every other
        branch is gone (their names stay used). Earlier states stay stored."""

        async def change(log: SessionLog) -> None:
            await log.clear()

        await self._run(change, write=True)

    # -- branches (the SDK's AdvancedSQLiteSession methods) --------------------------------

    async def create_branch_from_turn(self, turn_number: int,
                                      branch_name: str | None = None) -> str:
        """A new branch holding the current branch's items before turn ``turn_number``
        (its user message, the ``turn_number``-th), switched to; returns its id. Shares
        every item with its source. ValueError (ValidationError) if the turn has no user
        message or ``branch_name`` is blank or was used in this session before."""

        async def change(log: SessionLog) -> str:
            await log.create_branch(branch_name, turn_number)
            return log.branch

        return await self._run(change, write=True)

    async def switch_to_branch(self, branch_id: str) -> None:
        """Read and write ``branch_id`` from now on (this object only); ValueError
        (ValidationError) if the session has no such branch."""

        async def switch(log: SessionLog) -> None:
            await log.switch(branch_id)

        await self._run(switch)

    async def list_branches(self) -> list[dict[str, Any]]:
        """The session's branches, oldest first, as the SDK's advanced session lists them:
        ``branch_id``, ``message_count``, ``user_turns``, ``is_current``, ``created_at``
        (an aware UTC datetime; ``main``'s is the session's first state's)."""

        async def read(log: SessionLog) -> list[dict[str, Any]]:
            state = await log.newest()
            if state is None:
                return []
            current = log.resolve_branch(state)
            began = await log.oldest()
            out = []
            for branch in state.branches:
                items = await log.history(branch.head)
                created: datetime | None = branch.created_at or (
                    began.created_at if began else None)
                out.append({"branch_id": branch.name, "message_count": len(items),
                            "user_turns": user_turns(items),
                            "is_current": branch.name == current, "created_at": created})
            return out

        return await self._run(read)

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """A new state without ``branch_id`` (its name is never reused). ValueError
        (ValidationError) for ``main``, an unknown branch, or the current one unless
        ``force`` (which moves this object to ``main``). Earlier states keep it."""

        async def change(log: SessionLog) -> None:
            await log.delete_branch(branch_id, force=force)

        await self._run(change, write=True)

    async def fork(self, new_session_id: str, at_turn: int | None = None) -> ImmAgentSession:
        """A new session ``new_session_id`` starting with this one's current branch (the
        items before turn ``at_turn``, or all) as its ``main``, sharing every item; its
        first state's parent is this session's newest state. It uses this session's store
        (a DSN-opened store stays open until both are closed). ValidationError if
        ``new_session_id`` already has states."""
        target = check_session_id("new_session_id", new_session_id)

        async def change(log: SessionLog) -> None:
            await log.fork(target, at_turn)

        await self._run(change, write=True)
        return ImmAgentSession._sharing(self._host, target, self.session_settings)

    # -- immutable history ---------------------------------------------------------------

    async def current_state(self) -> SessionState | None:
        """The session's newest state (its ``digest`` pins every branch's items), or None
        before the first write."""
        return await self._run(lambda log: log.newest())

    async def list_states(self, limit: int = 100, *, after_seq: int | None = None,
                          newest_first: bool = True) -> list[SessionState]:
        """The session's stored states in log order, newest first by default, a page at a
        time (pass the last one's ``seq`` as ``after_seq``)."""
        return await self._run(lambda log: log.states(limit=limit, after_seq=after_seq,
                                                      newest_first=newest_first))

    async def get_state_items(self, state: SessionState | UUID | str, *,
                              branch_id: str = MAIN,
                              limit: int | None = None) -> list[TResponseInputItem]:
        """The items ``branch_id`` held in a stored state (this session's or any other's),
        oldest first, the latest ``limit`` if given. ValidationError if the state is not
        stored or has no such branch."""
        _check_limit(limit)
        wanted = state.id if isinstance(state, SessionState) else state

        async def read(log: SessionLog) -> list[Any]:
            found = await log.load(wanted)
            head = found.head(branch_id)
            if head is None:
                raise ValidationError("branch_id", f"state {found.id} has no branch "
                                      f"{branch_id!r}", branch_id)
            return _latest(await log.history(head), limit)

        return cast(list[TResponseInputItem], await self._run(read))

    async def export(self, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the session's newest state, its lineage and every item
        they reach (``immagent.verify_bundle`` checks it offline; ``Store.import_states``
        loads it elsewhere with the same ids and digests)."""

        async def change(log: SessionLog) -> BundleInfo:
            state = await log.newest()
            info = None if state is None else await log.store.export_lineage(state.id, path)
            if info is None:
                raise ValidationError("session_id", f"session {self.session_id!r} has no "
                                      "state to export", self.session_id)
            return info

        return await self._run(change)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the session (idempotent); a store it opened from a DSN closes when the
        last session using it (it and its forks) is closed. Waits for calls in flight."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> ImmAgentSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _check_limit(limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise ValidationError("limit", f"must be an int or None, got {limit!r}", limit)


def _latest(items: tuple[Item, ...], limit: int | None) -> list[Any]:
    """Copies of the latest ``limit`` items in order (None or negative: all; 0: none)."""
    if limit is not None and limit >= 0:
        items = items[max(0, len(items) - limit):] if limit else ()
    return decode_items(items)

