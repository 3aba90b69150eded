"""Where an adapter's store lives, and how a call from any event loop reaches it.

An ``EventLog`` (a ``Store``) is bound to the event loop it was opened on (psycopg's pool,
the SQLite backend's asyncio lock), while an SDK calls its session or store from wherever it runs:
``Runner.run_sync`` and ``Agent.run_sync`` run a loop of their own, ``asyncio.run`` makes a
new one each time, and one object may serve several threads at once. So every operation
runs on the store's loop, and other loops hand their calls to it:

* ``OwnedHost``: a store opened from a DSN, on a private event loop in a daemon thread
  (opened, with ``init_schema``, on first use; closed by the last ``release``);
* ``SharedHost``: an open ``Store`` (any ``EventLog``) the caller gave, on the loop it runs
  on (never closed here); calls from other loops are sent to it, so that loop must keep
  running.

Sync code (a framework's sync API, run from worker threads) calls ``Host.call``: the work
is scheduled onto the store's loop and the thread waits for it, as LangGraph's async
stores and savers do. On that loop's own thread waiting would block the loop it waits
for, so ``call`` raises ``SyncCallError`` there instead of hanging.

A write (``write=True``) that is cancelled waits until it has committed or failed before
the cancellation is re-raised: a cancelled caller never leaves a write running behind it.
No SDK is imported here; the adapters of every SDK share it.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from immagent.exceptions import ImmAgentError, StoreClosedError, StoreError
from immagent.store.log import EventLog

__all__ = ["Host", "OwnedHost", "SharedHost", "SyncCallError", "Work", "hop", "settle"]

T = TypeVar("T")
Work = Callable[[EventLog], Coroutine[Any, Any, T]]
#: How a host runs work on its loop (for ``call``).
Runner = Callable[[Work[Any]], Coroutine[Any, Any, Any]]


async def settle(future: asyncio.Future[T]) -> T:
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


class SyncCallError(ImmAgentError, asyncio.InvalidStateError):
    """A sync method was called where it cannot block: on the event loop the store runs on
    (await the async method there), or while no loop runs the store. An
    ``asyncio.InvalidStateError``, as LangGraph's async stores raise in that case."""


class Host(abc.ABC):
    """Where an adapter's store lives and how a call from any loop reaches it. ``what``
    names the adapter object in errors ("the session", "the conversation store")."""

    def __init__(self, what: str = "the session", *,
                 closed: type[StoreClosedError] = StoreClosedError) -> None:
        self.what = what
        #: What a call after the last release raises (an adapter may name its SDK's kind).
        self._closed_error = closed
        self._users = 1
        self._mutex = threading.Lock()

    def share(self) -> Host:
        """One more adapter object (a fork) uses this host; each one's close() releases it."""
        with self._mutex:
            if self._closed():
                raise self._closed_error(f"{self.what} is closed")
            self._users += 1
        return self

    @abc.abstractmethod
    async def run(self, work: Work[T], *, write: bool) -> T:
        """Run ``work(store)`` on the store's loop and return its result here."""

    @property
    @abc.abstractmethod
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the store runs on (None before it is known)."""

    @abc.abstractmethod
    def _target(self) -> tuple[asyncio.AbstractEventLoop, Runner]:
        """The running loop a sync call goes to, and how to run work there."""

    def call(self, work: Work[T], *, write: bool) -> T:
        """``run`` for sync code: schedule ``work(store)`` onto the store's loop and block
        this thread until it is done (a write is waited for even if this thread is
        interrupted). SyncCallError on the store's loop itself, or while no loop runs it."""
        loop, runner = self._target()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise SyncCallError(f"a sync method of {self.what} was called on the event loop "
                                "its immagent store runs on, where it would wait for itself "
                                "forever: await the async method (`a…`) instead, or call it "
                                "from another thread")
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            runner(work), loop)
        if not write:
            return future.result()
        while True:  # a write is never left running behind an interrupted caller
            try:
                return future.result()
            except KeyboardInterrupt:
                if future.done():
                    raise

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


async def hop(work: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop,
               write: bool) -> T:
    """Run a coroutine on another thread's ``loop`` and await it from this one."""
    waiter = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))
    return await (settle(waiter) if write else waiter)


class OwnedHost(Host):
    """A store opened from a DSN, on a private event loop in a daemon thread."""

    def __init__(self, dsn: str, what: str = "the session", *,
                 closed: type[StoreClosedError] = StoreClosedError,
                 thread_name: str = "immagent-store") -> None:
        super().__init__(what, closed=closed)
        self._dsn = dsn
        self._thread_name = thread_name
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
                raise self._closed_error(f"{self.what} is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._opening = asyncio.Lock()
                self._thread = threading.Thread(target=self._serve, args=(self._loop,),
                                                name=self._thread_name, daemon=True)
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
                raise self._closed_error(f"{self.what} is closed")
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
        return await hop(self._call(work), loop, write)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _target(self) -> tuple[asyncio.AbstractEventLoop, Runner]:
        return self._start(), self._call

    def open(self) -> EventLog:
        """Open the store now (its errors raised here, the thread stopped again) instead of
        on first use; the open store."""
        try:
            return self.call(_itself, write=False)
        except BaseException:
            self.release()
            raise

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


class SharedHost(Host):
    """An open store given by the caller, on the loop it was opened on (never closed here)."""

    def __init__(self, store: EventLog, what: str = "the session", *,
                 closed: type[StoreClosedError] = StoreClosedError) -> None:
        super().__init__(what, closed=closed)
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
            raise self._closed_error(f"{self.what} is closed")
        here = asyncio.get_running_loop()
        with self._mutex:
            if self._home is None:
                self._home = here
            home = self._home
        if home is here:
            return await (settle(asyncio.ensure_future(work(self._store))) if write
                          else work(self._store))
        if home.is_closed() or not home.is_running():
            raise StoreError(f"the store {self.what} shares belongs to an event loop that "
                             "is not running, so it cannot be used from this one: keep its "
                             f"loop running, or give {self.what} a DSN to own a store")
        return await hop(work(self._store), home, write)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._home

    def _target(self) -> tuple[asyncio.AbstractEventLoop, Runner]:
        if self._done:
            raise self._closed_error(f"{self.what} is closed")
        home = self._home
        if home is None or home.is_closed() or not home.is_running():
            raise SyncCallError(f"the sync methods of {self.what} run on the event loop of "
                                "its immagent store, and none is running: create it inside "
                                "a running loop and call from another thread, give it a DSN "
                                "to own a store (`with ….from_conn_string(...)`), or use the "
                                "async methods")

        async def direct(work: Work[Any]) -> Any:
            return await work(self._store)

        return home, direct

    def _shutdown(self) -> None:
        self._done = True


async def _itself(store: EventLog) -> EventLog:
    return store
