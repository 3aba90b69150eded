"""Connections and worker threads of the SQLite backend: one writer, a few readers.

The sqlite3 module blocks, so every call runs in a thread of the backend's own executor
(never the loop's default one, which other code may saturate). One writer connection,
guarded by an asyncio.Lock, serialises this process's writes before they reach SQLite's
file lock; readers come from a small idle list bounded by a semaphore, so WAL lets them
read while a write is in flight. A connection is only ever used by one thread at a time.

Cancellation: a thread cannot be stopped, so a cancelled call interrupts its statement
(``sqlite3_interrupt``: the transaction rolls back) and waits for the thread to give the
connection back before it re-raises; a connection is never released while in use. SQLite's
busy handler ignores interrupts, so a write waits for another connection's lock in short
slices and checks between them whether its caller is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from immagent.exceptions import (
    SchemaMissingError,
    StoreClosedError,
    StoreConnectionError,
    StoreError,
)
from immagent.store.dsn import check_sqlite_file

__all__ = ["Connection", "SQLitePool", "is_busy", "map_error", "transaction"]

T = TypeVar("T")
Fn = Callable[[sqlite3.Connection], T]

# Primary SQLite result codes (the low byte of sqlite_errorcode).
_PERM, _BUSY, _LOCKED, _READONLY, _INTERRUPT = 3, 5, 6, 8, 9
_CORRUPT, _FULL, _CANTOPEN, _NOTADB = 11, 13, 14, 26

#: Longest single wait for a lock; a cancelled write notices within about this long.
_LOCK_SLICE = 0.05


class Connection(sqlite3.Connection):
    """A sqlite3 connection that knows its busy timeout and whether its caller gave up."""

    busy_timeout: float = 5.0
    cancelled: threading.Event


def is_busy(e: sqlite3.Error) -> bool:
    """True when ``e`` says another connection holds a lock this one needed."""
    code = getattr(e, "sqlite_errorcode", None)
    return (isinstance(code, int) and code & 0xFF in (_BUSY, _LOCKED)) or str(e).startswith(
        "database is locked")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def map_error(e: sqlite3.Error, operation: str, path: str, busy_timeout: float) -> StoreError:
    """The ImmAgentError for a driver error: one line naming the operation and the file."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = _first_line(e)
    if isinstance(e, sqlite3.ProgrammingError) and "closed" in text:
        return StoreClosedError(f"{operation}: the store is closed")
    if is_busy(e):
        return StoreError(
            f"{operation}: SQLite database {path} is locked/busy: another connection held "
            f"its lock for more than {busy_timeout:g} s"
        )
    if text.startswith("no such table"):
        return SchemaMissingError(
            f"{operation}: immagent tables are missing in {path}; "
            "call `await store.init_schema()`"
        )
    if primary in (_CANTOPEN, _NOTADB, _PERM):
        return StoreConnectionError(f"{operation}: cannot use SQLite database {path}: {text}")
    if primary == _READONLY:
        return StoreError(f"{operation}: SQLite database {path} is read-only: {text}")
    if primary == _FULL:
        return StoreError(f"{operation}: disk full writing SQLite database {path}")
    if primary == _CORRUPT:
        return StoreError(f"{operation}: SQLite database {path} is corrupt: {text}")
    return StoreError(f"{operation} failed on {path}: {type(e).__name__}: {text}")


def transaction(conn: sqlite3.Connection, fn: Fn[T], begin: str = "BEGIN IMMEDIATE") -> T:
    """Run ``fn`` in one transaction: committed if it returns, rolled back if it raises."""
    if conn.in_transaction:  # left open by an interrupted call: never commit half of it
        conn.execute("ROLLBACK")
    if begin == "BEGIN IMMEDIATE" and isinstance(conn, Connection):
        _begin_immediate(conn)
    else:
        conn.execute(begin)
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def _begin_immediate(conn: Connection) -> None:
    """Take the write lock, waiting up to the busy timeout, in slices (see module doc)."""
    deadline = time.monotonic() + conn.busy_timeout
    conn.execute(f"PRAGMA busy_timeout = {int(min(_LOCK_SLICE, conn.busy_timeout) * 1000)}")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not is_busy(e) or conn.cancelled.is_set() or time.monotonic() >= deadline:
                    raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(conn.busy_timeout * 1000)}")


def _text(value: bytes) -> str | bytes:
    """TEXT values as str, and invalid UTF-8 as its bytes rather than an error that would
    abort a whole read: a damaged row is the row decoder's to report (see sqlite.py)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


def _connect(path: str, busy_timeout: float, *, reader: bool) -> Connection:
    # isolation_level=None: no implicit transactions; every transaction is an explicit BEGIN.
    # check_same_thread=False: the executor's threads take turns, never share at once.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False, cached_statements=64, factory=Connection)
    conn.busy_timeout = busy_timeout
    conn.cancelled = threading.Event()
    conn.text_factory = _text
    try:
        # NORMAL is durable across application crashes in WAL mode (an OS crash may lose
        # the last commits, never corrupt the file) and saves an fsync per commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        # SQLite's lower() folds ASCII only; the stream filter must fold like Python (and
        # PostgreSQL) do, so it is done by Python's str.lower.
        conn.create_function("immagent_lower", 1, _lower, deterministic=True)
        if reader:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class SQLitePool:
    """The backend's connections and threads; every public method maps driver errors."""

    def __init__(self, path: str, busy_timeout: float, readers: int,
                 executor: ThreadPoolExecutor, writer: Connection) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._executor = executor
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(readers)
        self._idle: list[Connection] = []
        self._closed = False

    @classmethod
    async def open(cls, path: str, busy_timeout: float, readers: int,
                   prepare: Fn[None]) -> SQLitePool:
        """Check the path, open the writer and run ``prepare`` on it (in a worker thread)."""
        check_sqlite_file(path)
        executor = ThreadPoolExecutor(max_workers=readers + 1,
                                      thread_name_prefix="immagent-sqlite")

        def connect() -> Connection:
            conn = _connect(path, busy_timeout, reader=False)
            try:
                prepare(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        future = executor.submit(connect)
        try:
            writer = await _settled(asyncio.wrap_future(future))
        except BaseException as e:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
            executor.shutdown(wait=False)
            if isinstance(e, sqlite3.Error):
                reason = (f"the database is locked/busy: another connection held its lock "
                          f"for more than {busy_timeout:g} s") if is_busy(e) else _first_line(e)
                raise StoreConnectionError(
                    f"cannot open SQLite database {path}: {reason}") from e
            raise
        return cls(path, busy_timeout, readers, executor, writer)

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    async def write(self, operation: str, fn: Fn[T]) -> T:
        """Run ``fn`` on the writer connection, one call at a time in this process."""
        self._check_open(operation)
        async with self._write_lock:
            self._check_open(operation)
            return await self.call(operation, self._writer, fn)

    async def read(self, operation: str, fn: Fn[T]) -> T:
        """Run ``fn`` on an idle reader connection."""
        async with self.reader(operation) as conn:
            return await self.call(operation, conn, fn)

    @contextlib.asynccontextmanager
    async def reader(self, operation: str) -> AsyncIterator[Connection]:
        """Check out a reader connection (opened on first need) for several calls."""
        self._check_open(operation)
        async with self._slots:
            self._check_open(operation)
            conn = self._idle.pop() if self._idle else await self._run(
                operation, None, lambda: _connect(self.path, self.busy_timeout, reader=True))
            try:
                yield conn
            finally:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    async def call(self, operation: str, conn: Connection, fn: Fn[T]) -> T:
        """Run ``fn(conn)`` in a worker thread; the caller holds ``conn`` exclusively."""
        return await self._run(operation, conn, lambda: fn(conn))

    async def _run(self, operation: str, conn: Connection | None,
                   thunk: Callable[[], T]) -> T:
        self._check_open(operation)
        if conn is not None:
            conn.cancelled.clear()
        try:
            future = self._executor.submit(thunk)
        except RuntimeError as e:
            # Only "cannot schedule new futures after shutdown" means close() won the race.
            if "shutdown" not in str(e):
                raise
            raise StoreClosedError(f"{operation}: the store is closed") from e
        try:
            return await _settled(asyncio.wrap_future(future), conn)
        except sqlite3.Error as e:
            raise map_error(e, operation, self.path, self.busy_timeout) from e

    async def close(self) -> None:
        """Wait for the write in flight, then close every idle connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            conns = [*self._idle, self._writer]  # the writer last: it checkpoints the WAL
            self._idle.clear()

            def close_all() -> None:
                for conn in conns:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()

            future = self._executor.submit(close_all)
            self._executor.shutdown(wait=False)
            await _settled(asyncio.wrap_future(future))

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise StoreClosedError(f"{operation}: the store is closed")


async def _settled(future: asyncio.Future[T], conn: Connection | None = None) -> T:
    """Await a worker thread's result; if cancelled, interrupt ``conn``, wait for the thread
    to finish with it, then re-raise the cancellation."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if conn is not None:
            conn.cancelled.set()
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: its outcome is superseded by the cancellation
        raise

