"""A Store and the event loop it runs on, reachable from any thread and any loop (no SDK import).

A ``Store`` is bound to the loop it was opened on (psycopg's pool, the SQLite backend's
asyncio lock), while framework code calls an adapter from wherever it runs: LangGraph runs
a sync graph in worker threads, an async one on the caller's loop. ``StoreHost`` is the
one place that decides how a call gets to the store's loop, for every adapter:

* ``StoreHost.start(dsn)``: the host owns a store on a private loop in a daemon thread
  (what a sync ``with Adapter.from_conn_string(...)`` needs); ``close()`` closes both.
* ``await StoreHost.open(dsn)``: the host owns a store on the running loop
  (``async with``); ``aclose()`` closes it.
* ``StoreHost.share(store)``: a store the caller opened, on the loop running now (or the
  loop of the first async call); never closed here.

``call`` (sync) schedules the work onto the store's loop and blocks for its result, as
LangGraph's async stores and savers do; on the loop's own thread it would wait for itself
forever, so it raises ``SyncCallError`` instead. ``acall`` (async) runs the work directly
when awaited on the store's loop and hands it over otherwise.

``langgraph_dsn`` maps the connection strings LangGraph's own classes take (``":memory:"``,
a SQLite path without a suffix) to a DSN ``Store.connect`` opens; ``MissingExtraError`` is
what an adapter raises when its framework is not installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from immagent.exceptions import ImmAgentError, StoreClosedError, StoreError, ValidationError
from immagent.store import dsn as dsns
from immagent.store.log import EventLog as Store

__all__ = ["MissingExtraError", "StoreHost", "SyncCallError", "langgraph_dsn"]

T = TypeVar("T")
Work = Callable[[Store], Awaitable[T]]


class SyncCallError(ImmAgentError, asyncio.InvalidStateError):
    """A sync method was called where it cannot block: on the event loop the store runs
    on (use the ``a…`` method there), or while no loop runs the store."""


class MissingExtraError(ImmAgentError, ImportError):
    """An integration's framework is not installed; the message names the install command."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs the {extra!r} extra: pip install 'immagent[{extra}]'")


def langgraph_dsn(conn_string: str | os.PathLike[str]) -> str:
    """The DSN of a connection string as LangGraph's savers and stores take it: a
    ``postgresql://`` URI or libpq string, ``":memory:"`` (a throwaway in-process store,
    immagent's ``memory://``), or a SQLite file path with any suffix; immagent's own DSNs
    pass through."""
    if isinstance(conn_string, str) and conn_string == ":memory:":
        return "memory://"
    return dsns.parse(conn_string, bare_paths=True).dsn


class StoreHost:
    """Where a store lives and how a call from any thread or loop reaches it (see the
    module docstring). Thread-safe."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop | None, *,
                 owned: bool, thread: threading.Thread | None = None) -> None:
        """Prefer ``start``, ``open`` or ``share``."""
        self.store = store
        self._loop = loop
        self._owned = owned
        self._thread = thread
        self._mutex = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, dsn: str, **connect: Any) -> StoreHost:
        """Open a store on a new private event loop in a daemon thread; blocks until it
        is open (its errors are raised here, and the thread is gone again)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_serve, args=(loop,), name="immagent-store",
                                  daemon=True)
        thread.start()
        try:
            store = asyncio.run_coroutine_threadsafe(Store.connect(dsn, **connect),
                                                     loop).result()
        except BaseException:
            _stop(loop, thread)
            raise
        return cls(store, loop, owned=True, thread=thread)

    @classmethod
    async def open(cls, dsn: str, **connect: Any) -> StoreHost:
        """Open a store on the running loop; ``aclose()`` closes it."""
        return cls(await Store.connect(dsn, **connect), asyncio.get_running_loop(),
                   owned=True)

    @classmethod
    def share(cls, store: Store) -> StoreHost:
        """Use an open store (never closed here) on the loop running now, or else on the
        loop of the first async call."""
        if not isinstance(store, Store):
            raise ValidationError("store", f"must be an immagent Store, got "
                                  f"{type(store).__name__}", None)
        if store.closed:
            raise ValidationError("store", "the Store is closed", None)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return cls(store, loop, owned=False)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the store runs on (None until a shared store's first async call)."""
        return self._loop

    def call(self, work: Work[T]) -> T:
        """Run ``work(store)`` on the store's loop from this thread and wait for it
        (SyncCallError on the loop's own thread, or while no loop runs the store)."""
        loop = self._usable()
        if loop is None or not loop.is_running():
            raise SyncCallError("the sync methods run on the event loop of the immagent "
                                "Store, and none is running: open it with "
                                "`with ….from_conn_string(...)`, create it inside a running "
                                "loop and call from another thread, or use the async methods")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise SyncCallError("a sync method was called on the event loop its immagent "
                                "Store runs on, where it would wait for itself forever: "
                                "await the async method (`a…`) instead")

        async def run() -> T:
            return await work(self.store)

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    async def acall(self, work: Work[T]) -> T:
        """Run ``work(store)`` on the store's loop and return its result to this one."""
        here = asyncio.get_running_loop()
        with self._mutex:
            if self._loop is None:
                self._loop = here  # a shared store's first async call decides its loop
        loop = self._usable()
        assert loop is not None
        if loop is here:
            return await work(self.store)
        if loop.is_closed() or not loop.is_running():
            raise StoreError("the immagent Store belongs to an event loop that is not "
                             "running, so this loop cannot use it: keep that loop running, "
                             "or open the store with `with ….from_conn_string(...)`")

        async def run() -> T:
            return await work(self.store)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), loop))

    def _usable(self) -> asyncio.AbstractEventLoop | None:
        if self._closed:
            raise StoreClosedError("the store is closed")
        return self._loop

    def close(self) -> None:
        """Close what the host owns (idempotent): a store on its private thread is closed
        and the thread stopped; a store opened on another running loop is closed through
        it; a shared store is left open."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
        if not self._owned:
            return
        loop, thread = self._loop, self._thread
        if loop is None or loop.is_closed():
            return
        if thread is not None and threading.current_thread() is thread:
            # On the private loop itself (a finalizer): it cannot wait for itself.
            task = loop.create_task(self.store.close())
            task.add_done_callback(lambda _: loop.stop())
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise SyncCallError("close() was called on the loop the store runs on: "
                                "await aclose() instead")
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self.store.close(), loop).result()
        except (concurrent.futures.CancelledError, RuntimeError):
            pass  # the loop is already stopping: nothing left to close on it
        finally:
            if thread is not None:
                _stop(loop, thread)

    async def aclose(self) -> None:
        """``close()`` from a coroutine (on the store's loop too)."""
        with self._mutex:
            if self._closed:
                return
            if self._owned and self._thread is None and self._loop is asyncio.get_running_loop():
                self._closed = True
                await self.store.close()
                return
        await asyncio.to_thread(self.close)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    thread.join()
