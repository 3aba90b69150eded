"""ImmAgentStore: LangGraph long-term memory (``BaseStore``) in immagent's store (extra langgraph).

A graph's checkpointer and its store can share one immagent database::

    with ImmAgentStore.from_conn_string("memory.db") as store:   # or "postgresql://…"
        store.setup()
        graph = builder.compile(checkpointer=saver, store=store)

It is a thin adapter over ``immagent.items.ItemLog`` (the store-side client, which imports
no LangGraph): it turns LangGraph's ops into ItemLog calls and ItemLog's items into
LangGraph's ``Item``/``SearchItem``. What is stored and why is in ``immagent.kv`` and
``immagent.items``: every put is a new state of its key (a delete too), values are
content-addressed ITEM assets, a get is one index probe.

LangGraph's contract as its own stores keep it: ops of one ``batch`` read before they
write (gets, searches and listings see the store as it was; puts of one key: the last
wins), namespaces are validated as LangGraph validates them, searches list the most
recently put items first, ``filter`` compares as ``immagent.items.matches`` says. TTLs are
minutes; a read with ``refresh_ttl`` renews them (``TTLConfig.refresh_on_read`` is the
default); expired items are invisible at once (as with ``omit_expired``) and
``sweep_ttl`` / ``start_ttl_sweeper`` delete them. Vector search (``index=``) is not in
this version: it is refused, and a ``query`` on a store without an index is ignored, as
LangGraph's stores ignore it.

One class serves sync and async code. ``with ImmAgentStore.from_conn_string(...)`` runs the
store on a private event loop in a daemon thread: sync methods work from any thread, async
ones from any loop. ``async with ImmAgentStore.from_conn_string(...)`` or
``ImmAgentStore(store)`` run it on the current loop: async methods there, sync ones from
other threads (on the loop's own thread they raise ``SyncCallError``, an
``asyncio.InvalidStateError``, instead of waiting for themselves). The TTL helpers exist
in both forms: ``sweep_ttl``/``start_ttl_sweeper``/``stop_ttl_sweeper`` (sync, a thread)
and ``asweep_ttl``/``astart_ttl_sweeper``/``astop_ttl_sweeper`` (an asyncio task).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from immagent.audit.bundle import BundleInfo
from immagent.exceptions import ValidationError
from immagent.integrations.bridge import (
    MissingExtraError,
    StoreHost,
    SyncCallError,
    langgraph_dsn,
)
from immagent.items import ItemLog, ItemVersion, Put, StoredItem
from immagent.store.log import EventLog as Store

try:
    from langgraph.store.base import (
        BaseStore,
        GetOp,
        Item,
        ListNamespacesOp,
        Op,
        PutOp,
        Result,
        SearchItem,
        SearchOp,
        TTLConfig,
        validate_op_namespace,
    )
except ImportError as e:  # the extra is not installed
    raise MissingExtraError("ImmAgentStore", "langgraph") from e

__all__ = ["ImmAgentStore", "SyncCallError"]

log = logging.getLogger("immagent")

S = TypeVar("S", bound="ImmAgentStore")
#: Batches that run at once (the others wait their turn); a Store's pool has 10
#: connections by default, and a batch uses one or two at a time.
_CONCURRENT_BATCHES = 8


class ImmAgentStore(BaseStore):
    """A LangGraph ``BaseStore`` whose every put is an immutable, content-addressed state
    of an immagent ``Store`` (PostgreSQL, SQLite or memory); see the module docstring."""

    supports_ttl = True
    _finalizer: weakref.finalize[Any, Any] | None = None

    def __init__(self, store: Store, *, ttl: TTLConfig | None = None,
                 index: Any = None, refresh_slack: float = 0.01) -> None:
        """A store over an open, initialised immagent ``Store`` (shared: never closed
        here), on the loop running now (or the loop of its first async call). ``ttl``
        as LangGraph's ``TTLConfig``; a TTL refresh is skipped while the stored expiry is
        within ``refresh_slack`` x TTL of the new one (see ``immagent.items``)."""
        self._bind(StoreHost.share(store), ttl, index, refresh_slack)

    def _bind(self, host: StoreHost, ttl: TTLConfig | None, index: Any,
              refresh_slack: float) -> None:
        if index is not None:
            raise ValidationError("index", "vector search is not supported by ImmAgentStore "
                                  "in this version; leave index unset (searches then list "
                                  "and filter, and ignore query, as LangGraph's stores "
                                  "without an index do)", None)
        if ttl is not None and not isinstance(ttl, dict):
            raise ValidationError("ttl", f"must be a TTLConfig dict, got "
                                  f"{type(ttl).__name__}", None)
        self.ttl_config = ttl
        self._host = host
        self._log = ItemLog(host.store, refresh_slack=refresh_slack)
        self._sweeper: threading.Thread | None = None
        self._sweeper_stop = threading.Event()
        self._sweeper_task: asyncio.Task[None] | None = None
        self._admission: asyncio.Semaphore | None = None

    @classmethod
    def _hosted(cls: type[S], host: StoreHost, ttl: TTLConfig | None, index: Any,
                refresh_slack: float) -> S:
        store = cls.__new__(cls)
        try:
            store._bind(host, ttl, index, refresh_slack)
        except BaseException:
            host.close()
            raise
        # Dropped without close(), a private loop thread is still released.
        store._finalizer = weakref.finalize(store, host.close)
        return store

    @classmethod
    def from_conn_string(cls: type[S], conn_string: str | os.PathLike[str], *,
                         ttl: TTLConfig | None = None, index: Any = None,
                         refresh_slack: float = 0.01, **connect: Any) -> _Opening[S]:
        """A store it opens on ``conn_string`` and closes on exit, as ``with`` (a private
        loop thread: for sync code) or ``async with`` (the current loop). Takes what
        LangGraph's classes take (``":memory:"``, a SQLite path, a PostgreSQL URI) and
        immagent DSNs; ``connect`` goes to ``Store.connect``. Call ``setup()`` once."""
        return _Opening(cls, langgraph_dsn(conn_string), ttl, index, refresh_slack, connect)

    @property
    def store(self) -> Store:
        """The immagent Store the items live in (verify, gc, export through it)."""
        return self._host.store

    # -- schema, lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        """Create (or migrate) the store's tables; idempotent, safe from several processes."""
        self._host.call(lambda s: s.init_schema())

    async def asetup(self) -> None:
        """``setup`` from async code."""
        await self._host.acall(lambda s: s.init_schema())

    def close(self) -> None:
        """Stop the TTL sweeper and close what ``from_conn_string`` opened (idempotent)."""
        self._stop_thread(None)
        self._host.close()

    async def aclose(self) -> None:
        """``close`` from async code."""
        await self._stop_task(None)
        await asyncio.to_thread(self._stop_thread, None)
        await self._host.aclose()

    # -- LangGraph's batch API ----------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` (reads first, then the puts in one transaction); from a thread other
        than the store's loop (SyncCallError there)."""
        listed = _ops(ops)
        return self._host.call(lambda _: self._run(listed))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops``: reads first, then every put in one transaction."""
        listed = _ops(ops)
        return await self._host.acall(lambda _: self._run(listed))

    async def _run(self, ops: Sequence[Op]) -> list[Result]:
        # Admission: a graph may fire thousands of store calls at once; each batch makes
        # several round trips, and past the pool's size they would queue for connections
        # one query at a time (and time out). A few batches run at once, the rest wait
        # their turn here, untimed, as LangGraph's PostgreSQL store makes them wait for its
        # connection. Runs on the store's loop, so the semaphore is made there.
        if self._admission is None:
            self._admission = asyncio.Semaphore(_CONCURRENT_BATCHES)
        async with self._admission:
            return await self._execute(ops)

    async def _execute(self, ops: Sequence[Op]) -> list[Result]:
        results: list[Result] = [None] * len(ops)
        gets = [(i, op) for i, op in enumerate(ops) if isinstance(op, GetOp)]
        for refresh in (False, True):
            chosen = [(i, op) for i, op in gets if bool(op.refresh_ttl) is refresh]
            if chosen:
                found = await self._log.get_many([(op.namespace, op.key) for _, op in chosen],
                                                 refresh=refresh)
                for (i, _), item in zip(chosen, found, strict=True):
                    results[i] = None if item is None else _item(item)
        for i, op in enumerate(ops):
            if isinstance(op, SearchOp):
                # ``query`` needs a vector index; without one it is ignored, as in LangGraph.
                found_items = await self._log.search(op.namespace_prefix, filter=op.filter,
                                                     limit=op.limit, offset=op.offset,
                                                     refresh=bool(op.refresh_ttl))
                results[i] = [_search_item(item) for item in found_items]
            elif isinstance(op, ListNamespacesOp):
                results[i] = await self._log.list_namespaces(
                    match=[(c.match_type, c.path) for c in op.match_conditions or ()],
                    max_depth=op.max_depth, limit=op.limit, offset=op.offset)
        puts = [Put(tuple(op.namespace), op.key, op.value, op.ttl)
                for op in ops if isinstance(op, PutOp)]
        if puts:
            await self._log.put_many(puts)
        return results

    # -- history and audits (immagent's own) ------------------------------------------------

    def history(self, namespace: tuple[str, ...], key: str, *,
                limit: int = 100) -> list[ItemVersion]:
        """Every stored state of ``key`` (puts, TTL refreshes, deletes), newest first."""
        return self._host.call(lambda _: self._log.history(namespace, key, limit=limit))

    async def ahistory(self, namespace: tuple[str, ...], key: str, *,
                       limit: int = 100) -> list[ItemVersion]:
        """``history`` from async code."""
        return await self._host.acall(lambda _: self._log.history(namespace, key,
                                                                  limit=limit))

    def export(self, path: str | os.PathLike[str], namespace_prefix: tuple[str, ...] = (),
               key: str | None = None) -> BundleInfo:
        """Write an audit bundle of the whole history of the keys under
        ``namespace_prefix`` (or of one ``key`` in that namespace) and their values;
        ``immagent.verify_bundle`` checks it offline."""
        return self._host.call(lambda _: self._log.export(path, namespace_prefix, key))

    async def aexport(self, path: str | os.PathLike[str],
                      namespace_prefix: tuple[str, ...] = (),
                      key: str | None = None) -> BundleInfo:
        """``export`` from async code."""
        return await self._host.acall(lambda _: self._log.export(path, namespace_prefix,
                                                                 key))

    # -- TTL ---------------------------------------------------------------------------------

    def sweep_ttl(self) -> int:
        """Delete every expired item (its whole history); returns how many keys."""
        return self._host.call(lambda _: self._log.sweep_expired())

    async def asweep_ttl(self) -> int:
        """``sweep_ttl`` from async code."""
        return await self._host.acall(lambda _: self._log.sweep_expired())

    def _interval(self, minutes: float | None) -> float:
        config = self.ttl_config or {}
        return float(minutes or config.get("sweep_interval_minutes") or 5) * 60

    def start_ttl_sweeper(self, sweep_interval_minutes: float | None = None
                          ) -> concurrent.futures.Future[None]:
        """Sweep every ``sweep_interval_minutes`` (default: the TTLConfig's, else 5) in a
        daemon thread until ``stop_ttl_sweeper``; the future ends when it stops."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._sweeper is not None and self._sweeper.is_alive():
            done.add_done_callback(lambda f: self._sweeper_stop.set() if f.cancelled()
                                   else None)
            return done
        interval = self._interval(sweep_interval_minutes)
        self._sweeper_stop.clear()

        def loop() -> None:
            while not self._sweeper_stop.wait(interval):
                try:
                    self._host.call(lambda _: self._log.sweep_expired())
                except Exception:  # one failed pass must not end the sweeper
                    log.exception("the store's TTL sweep failed")
            done.set_result(None)

        self._sweeper = threading.Thread(target=loop, name="immagent-ttl-sweeper",
                                         daemon=True)
        self._sweeper.start()
        done.add_done_callback(lambda f: self._sweeper_stop.set() if f.cancelled() else None)
        return done

    def stop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Stop the sweeper thread; False if it did not stop within ``timeout`` seconds."""
        return self._stop_thread(timeout)

    def _stop_thread(self, timeout: float | None) -> bool:
        thread = self._sweeper
        if thread is None or not thread.is_alive():
            return True
        self._sweeper_stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout)
        stopped = not thread.is_alive()
        if stopped:
            self._sweeper = None
        return stopped

    async def astart_ttl_sweeper(self, sweep_interval_minutes: float | None = None
                                 ) -> asyncio.Task[None]:
        """Sweep every ``sweep_interval_minutes`` in an asyncio task of this loop until
        ``astop_ttl_sweeper`` (or the task is cancelled)."""
        if self._sweeper_task is not None and not self._sweeper_task.done():
            return self._sweeper_task
        interval = self._interval(sweep_interval_minutes)

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self._host.acall(lambda _: self._log.sweep_expired())
                except Exception:  # one failed pass must not end the sweeper
                    log.exception("the store's TTL sweep failed")

        self._sweeper_task = asyncio.create_task(loop(), name="immagent-ttl-sweeper")
        return self._sweeper_task

    async def astop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Stop the sweeper task; False if it did not stop within ``timeout`` seconds."""
        return await self._stop_task(timeout)

    async def _stop_task(self, timeout: float | None) -> bool:
        task = self._sweeper_task
        if task is None or task.done():
            return True
        task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            return False
        self._sweeper_task = None
        return True


class _Opening(Generic[S]):
    """What ``from_conn_string`` returns: ``with`` opens the store on a private loop
    thread, ``async with`` on the current loop; both close it on exit."""

    def __init__(self, cls: type[S], dsn: str, ttl: TTLConfig | None, index: Any,
                 refresh_slack: float, connect: dict[str, Any]) -> None:
        self._cls = cls
        self._dsn = dsn
        self._args = (ttl, index, refresh_slack)
        self._connect = connect
        self._store: S | None = None

    def __enter__(self) -> S:
        self._store = self._cls._hosted(StoreHost.start(self._dsn, **self._connect),
                                        *self._args)
        return self._store

    def __exit__(self, *exc: object) -> None:
        if self._store is not None:
            self._store.close()

    async def __aenter__(self) -> S:
        self._store = self._cls._hosted(await StoreHost.open(self._dsn, **self._connect),
                                        *self._args)
        return self._store

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._store is not None:
            await self._store.aclose()


def _ops(ops: Iterable[Op]) -> list[Op]:
    """The ops of a batch, each of a known type with namespace labels LangGraph accepts
    (its ``InvalidNamespaceError`` otherwise)."""
    listed = list(ops)
    for i, op in enumerate(listed):
        if not isinstance(op, GetOp | PutOp | SearchOp | ListNamespacesOp):
            raise ValidationError(f"ops[{i}]", f"unknown operation type "
                                  f"{type(op).__name__}", None)
        validate_op_namespace(op)
    return listed


def _item(found: StoredItem) -> Item:
    return Item(value=found.value, key=found.key, namespace=found.namespace,
                created_at=found.created_at, updated_at=found.updated_at)


def _search_item(found: StoredItem) -> SearchItem:
    return SearchItem(namespace=found.namespace, key=found.key, value=found.value,
                      created_at=found.created_at, updated_at=found.updated_at)
