"""ImmAgentStore: LangGraph long-term memory (``BaseStore``) in immagent's store (extra langgraph).

A graph's checkpointer and its store can share one immagent database::

    with ImmAgentStore.from_conn_string("memory.db") as store:   # or "postgresql://…"
        store.setup()
        graph = builder.compile(checkpointer=saver, store=store)

It is a thin adapter over ``immagent.clients.store_items.ItemLog`` (the store-side
client, which imports no LangGraph): it turns LangGraph's ops into ItemLog calls and
ItemLog's items into LangGraph's ``Item``/``SearchItem``. What is stored and why is in
``immagent.kv`` and the client (and docs/langgraph-store.md): every put is a new state of
its key (a delete too), values are content-addressed ITEM assets, a get is one
primary-key probe.

Concurrent calls (LangGraph's ``aput``/``aget``/… are one batch each) are merged as they
queue on the store's loop: a group's identical reads run once and its puts commit in one
transaction, each batch's put of a key still a state of its own (see ``_execute``).

LangGraph's contract as its own stores keep it: ops of one ``batch`` read before they
write (gets, searches and listings see the store as it was; puts of one key: the last
wins), namespaces are validated as LangGraph validates them, searches list the most
recently put items first, ``filter`` compares as ``store_items.matches`` says. TTLs are
minutes; a read with ``refresh_ttl`` renews them (``TTLConfig.refresh_on_read`` is the
default); expired items are invisible at once (as with ``omit_expired``) and
``sweep_ttl`` / ``start_ttl_sweeper`` delete them. Vector search (``index=``) is not in
this version: it is refused, and a ``query`` on a store without an index is ignored, as
LangGraph's stores ignore it.

One class serves sync and async code (through ``immagent.store.hosting``, as the other
adapters). ``with ImmAgentStore.from_conn_string(...)`` runs the store on a private event
loop in a daemon thread: sync methods work from any thread, async ones from any loop.
``async with ImmAgentStore.from_conn_string(...)`` or ``ImmAgentStore(store)`` run it on
the current loop: async methods there, sync ones from other threads (on the loop's own
thread they raise ``SyncCallError``, an ``asyncio.InvalidStateError``, instead of waiting
for themselves). The TTL helpers exist in both forms:
``sweep_ttl``/``start_ttl_sweeper``/``stop_ttl_sweeper`` (sync, a thread)
and ``asweep_ttl``/``astart_ttl_sweeper``/``astop_ttl_sweeper`` (an asyncio task).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import msgspec

from immagent.audit.bundle import BundleInfo
from immagent.clients.store_items import ItemLog, ItemVersion, Put, StoredItem
from immagent.exceptions import ExtraNotInstalledError, ValidationError
from immagent.store import dsn as dsns
from immagent.store.hosting import Host, OwnedHost, SharedHost, SyncCallError, settle
from immagent.store.log import EventLog

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
    raise ExtraNotInstalledError("immagent.integrations.langgraph_store", "langgraph") from e

__all__ = ["ImmAgentStore", "SyncCallError"]

log = logging.getLogger("immagent")

S = TypeVar("S", bound="ImmAgentStore")
T = TypeVar("T")
_WHAT = "the LangGraph store"
#: Merged groups of batches that run at once (the others queue and merge); a Store's
#: pool has 10 connections by default, and a group uses one or two at a time.
_CONCURRENT_GROUPS = 4
#: Ops merged into one group at most (a batch larger than this runs alone): bounds a
#: group's transaction and the time its callers wait for the slowest op in it.
_GROUP_OPS = 2000


class ImmAgentStore(BaseStore):
    """A LangGraph ``BaseStore`` whose every put is an immutable, content-addressed state
    of an immagent store (PostgreSQL, SQLite or memory); see the module docstring."""

    supports_ttl = True
    _finalizer: weakref.finalize[Any, Any] | None = None
    _opened: EventLog | None = None  # a store ``async with from_conn_string`` opened

    def __init__(self, store: EventLog, *, ttl: TTLConfig | None = None,
                 index: Any = None, refresh_slack: float = 0.01) -> None:
        """A store over an open, initialised immagent ``Store`` (shared: never closed
        here), on the loop running now (or the loop of its first async call). ``ttl``
        as LangGraph's ``TTLConfig``; a TTL refresh is skipped while the stored expiry is
        within ``refresh_slack`` x TTL of the new one (see ``ItemLog``)."""
        if not isinstance(store, EventLog):
            raise ValidationError("store", f"must be an immagent Store, got "
                                  f"{type(store).__name__}", None)
        if store.closed:
            raise ValidationError("store", "the Store is closed", None)
        self._bind(SharedHost(store, _WHAT), ttl, index, refresh_slack, store)

    def _bind(self, host: Host, ttl: TTLConfig | None, index: Any, refresh_slack: float,
              shared: EventLog | None = None) -> None:
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
        self._shared = shared
        self._refresh_slack = refresh_slack
        self._log: ItemLog | None = None
        self._sweeper: threading.Thread | None = None
        self._sweeper_stop = threading.Event()
        self._sweeper_task: asyncio.Task[None] | None = None
        self._queue: _Queue | None = None
        self._closed = False

    @classmethod
    def from_conn_string(cls: type[S], conn_string: str | os.PathLike[str], *,
                         ttl: TTLConfig | None = None, index: Any = None,
                         refresh_slack: float = 0.01) -> _Opening[S]:
        """A store it opens on ``conn_string`` and closes on exit, as ``with`` (a private
        loop thread: for sync code) or ``async with`` (the current loop). Takes what
        LangGraph's classes take (``":memory:"``, a SQLite path with any suffix, a
        PostgreSQL URI) and immagent DSNs."""
        return _Opening(cls, _dsn(conn_string), ttl, index, refresh_slack)

    @property
    def store(self) -> EventLog:
        """The immagent store the items live in (verify, gc, export through it; use it on
        its own loop: the current one, or for ``with from_conn_string`` the private one)."""
        return self._shared if self._shared is not None else self._sync(_itself)

    # -- running on the store's loop --------------------------------------------------------

    def _client(self, store: EventLog) -> ItemLog:
        # Made on the store's loop, on first use: an owned store opens there.
        if self._log is None:
            self._log = ItemLog(store, refresh_slack=self._refresh_slack)
        return self._log

    def _sync(self, work: Callable[[ItemLog], Awaitable[T]], *, write: bool = False) -> T:
        async def run(store: EventLog) -> T:
            return await work(self._client(store))

        return self._host.call(run, write=write)

    async def _async(self, work: Callable[[ItemLog], Awaitable[T]], *,
                     write: bool = False) -> T:
        async def run(store: EventLog) -> T:
            return await work(self._client(store))

        return await self._host.run(run, write=write)

    # -- schema, lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        """Create (or migrate) the store's tables; idempotent, safe from several processes."""
        self._sync(lambda log: log.store.init_schema(), write=True)

    async def asetup(self) -> None:
        """``setup`` from async code."""
        await self._async(lambda log: log.store.init_schema(), write=True)

    def close(self) -> None:
        """Stop the TTL sweeper and close what ``from_conn_string`` opened (idempotent)."""
        self._stop_thread(None)
        self._release()

    async def aclose(self) -> None:
        """``close`` from async code."""
        await self._stop_task(None)
        await asyncio.to_thread(self._stop_thread, None)
        self._release()
        if self._opened is not None:
            await self._opened.close()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            if self._finalizer is not None:
                self._finalizer.detach()
            self._host.release()

    # -- LangGraph's batch API ----------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` (reads first, then the puts in one transaction); from a thread other
        than the store's loop (SyncCallError there)."""
        listed = _ops(ops)
        return self._sync(lambda log: self._run(log, listed), write=_writes(listed))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops``: reads first, then every put in one transaction."""
        listed = _ops(ops)
        write = _writes(listed)
        queue = self._queue
        if queue is not None and not self._closed and queue.loop is asyncio.get_running_loop():
            # On the store's loop, once a batch has run: straight into the queue, with no
            # task or coroutine of its own (a graph may gather thousands of calls, and
            # each object they hold makes every garbage collection meanwhile longer).
            return await queue.submit(_Batch(queue.log, listed), settled=write)
        return await self._async(lambda log: self._run(log, listed), write=write)

    async def _run(self, log: ItemLog, ops: Sequence[Op]) -> list[Result]:
        # Batches that arrive while others run are merged: a graph (or LangGraph's
        # ``aput``/``aget`` helpers, one batch per call) may fire thousands of calls at
        # once, and one transaction per put, one scan of the heads per search, would make
        # that quadratic. Waiting batches queue here (on the store's loop); a drainer
        # merges what has queued into one group whenever one of a few slots is free
        # (``_Queue``, ``_execute``: identical reads done once, every put a state of its
        # own, the puts of the whole group in one transaction). Each batch's own ops are
        # checked first, so a bad batch fails alone.
        if self._queue is None:
            self._queue = _Queue(log)
        # The host waits for a write whose caller was cancelled (settle).
        return await self._queue.submit(_Batch(log, ops), settled=False)

    # -- history and audits (immagent's own) ------------------------------------------------

    def history(self, namespace: tuple[str, ...], key: str, *,
                limit: int = 100) -> list[ItemVersion]:
        """Every stored state of ``key`` (puts, TTL refreshes, deletes), newest first."""
        return self._sync(lambda log: log.history(namespace, key, limit=limit))

    async def ahistory(self, namespace: tuple[str, ...], key: str, *,
                       limit: int = 100) -> list[ItemVersion]:
        """``history`` from async code."""
        return await self._async(lambda log: log.history(namespace, key, limit=limit))

    def export(self, path: str | os.PathLike[str], namespace_prefix: tuple[str, ...] = (),
               key: str | None = None) -> BundleInfo:
        """Write an audit bundle of the whole history of the keys under
        ``namespace_prefix`` (or of one ``key`` in that namespace) and their values;
        ``immagent.verify_bundle`` checks it offline."""
        return self._sync(lambda log: log.export(path, namespace_prefix, key))

    async def aexport(self, path: str | os.PathLike[str],
                      namespace_prefix: tuple[str, ...] = (),
                      key: str | None = None) -> BundleInfo:
        """``export`` from async code."""
        return await self._async(lambda log: log.export(path, namespace_prefix, key))

    def write_stats(self) -> dict[str, int]:
        """What this store's writes cost so far: ``commits`` (transactions), ``retries``
        (attempts that lost the race to another writer of a key and were planned again),
        ``states`` (rows written: item states and heads)."""
        return dict(self._log.stats) if self._log is not None else \
            {"commits": 0, "retries": 0, "states": 0}

    # -- TTL ---------------------------------------------------------------------------------

    def sweep_ttl(self) -> int:
        """Delete every expired item (its whole history); returns how many keys."""
        return self._sync(_sweep, write=True)

    async def asweep_ttl(self) -> int:
        """``sweep_ttl`` from async code."""
        return await self._async(_sweep, write=True)

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
                    self._sync(_sweep, write=True)
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
                    await self._async(_sweep, write=True)
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
                 refresh_slack: float) -> None:
        self._cls = cls
        self._dsn = dsn
        self._args = (ttl, index, refresh_slack)
        self._store: S | None = None

    def _made(self, host: Host, shared: EventLog | None = None) -> S:
        store = self._cls.__new__(self._cls)
        try:
            store._bind(host, *self._args, shared)
        except BaseException:
            host.release()
            raise
        return store

    def __enter__(self) -> S:
        host = OwnedHost(self._dsn, _WHAT)
        store = self._made(host)
        # Dropped without close(), the private loop thread is still released.
        store._finalizer = weakref.finalize(store, host.release)
        try:
            store.store  # noqa: B018 - opens it now: a bad DSN fails here, not later
        except BaseException:
            store.close()
            raise
        self._store = store
        return store

    def __exit__(self, *exc: object) -> None:
        if self._store is not None:
            self._store.close()

    async def __aenter__(self) -> S:
        opened = await EventLog.connect(self._dsn)
        try:
            await opened.init_schema()
            store = self._made(SharedHost(opened, _WHAT), opened)
        except BaseException:
            await opened.close()
            raise
        store._opened = opened
        self._store = store
        return store

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._store is not None:
            await self._store.aclose()


async def _itself(log: ItemLog) -> EventLog:
    return log.store


async def _sweep(log: ItemLog) -> int:
    return await log.sweep_expired()


def _dsn(conn_string: str | os.PathLike[str]) -> str:
    """The immagent DSN of a connection string as LangGraph's classes take it:
    ``":memory:"`` is a throwaway in-process store, a SQLite path may have any suffix."""
    if isinstance(conn_string, str) and conn_string == ":memory:":
        return "memory://"
    return dsns.parse(conn_string, bare_paths=True).dsn


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


def _writes(ops: Sequence[Op]) -> bool:
    """Whether a batch may write (a put, or a read that renews TTLs): a cancelled caller
    then waits for the write's outcome before the cancellation is raised."""
    return any(isinstance(op, PutOp) or getattr(op, "refresh_ttl", False) for op in ops)


class _Batch:
    """One caller's batch, checked, and the future its caller waits on."""

    __slots__ = ("future", "group", "ops", "puts")

    def __init__(self, log: ItemLog, ops: Sequence[Op]) -> None:
        self.ops = ops
        # Checked now: a bad value fails its own batch, never a group it would join.
        puts = [Put(tuple(op.namespace), op.key, op.value, op.ttl)
                for op in ops if isinstance(op, PutOp)]
        self.puts = log.check_puts(puts) if puts else None
        self.future: asyncio.Future[list[Result]] = \
            asyncio.get_running_loop().create_future()
        #: The task running the group this batch was merged into, once it runs.
        self.group: asyncio.Task[None] | None = None


class _Queue:
    """The batches waiting on one store's loop, and the drainer that merges them."""

    def __init__(self, log: ItemLog) -> None:
        self.log = log
        self.loop = asyncio.get_running_loop()
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._slots = asyncio.Semaphore(_CONCURRENT_GROUPS)
        self._drainer: asyncio.Task[None] | None = None
        self._groups: set[asyncio.Task[None]] = set()

    async def submit(self, batch: _Batch, *, settled: bool) -> list[Result]:
        """The batch's results once its group has run; ``settled``: a cancelled caller
        still waits for the outcome (a write is never left running behind it)."""
        self._waiting.append(batch)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="immagent-store-batches")
        try:
            return await batch.future
        except asyncio.CancelledError:
            # A write whose group already runs is waited for before the cancellation is
            # raised (one not yet taken into a group is dropped, unwritten). Done here
            # rather than by shielding every call: thousands of pending calls would each
            # hold a shield's future and callbacks.
            if settled and batch.group is not None:
                await settle(batch.group)
            raise

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._slots.acquire()
                group: list[_Batch] = []
                size = 0
                while self._waiting and (not group
                                         or size + len(self._waiting[0].ops) <= _GROUP_OPS):
                    batch = self._waiting.popleft()
                    if not batch.future.done():  # a cancelled reader is not waited for
                        group.append(batch)
                        size += len(batch.ops)
                if not group:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._run(group))
                for batch in group:
                    batch.group = task
                self._groups.add(task)
                task.add_done_callback(self._groups.discard)
        except BaseException:  # cancelled (the loop is closing): no batch waits forever
            while self._waiting:
                self._waiting.popleft().future.cancel()
            raise

    async def _run(self, group: list[_Batch]) -> None:
        try:
            try:
                outcomes: list[Any] = list(await _execute(self.log, group))
            except Exception as e:
                if len(group) == 1:
                    outcomes = [e]
                else:
                    # Nothing of the group's puts was written (one transaction): each
                    # batch runs again alone, so a failure reaches only its own callers.
                    outcomes = []
                    for batch in group:
                        try:
                            outcomes += await _execute(self.log, [batch])
                        except Exception as alone:
                            outcomes.append(alone)
        except BaseException:  # cancelled (the loop is closing): so are its callers
            for batch in group:
                batch.future.cancel()
            raise
        finally:
            self._slots.release()
        for batch, outcome in zip(group, outcomes, strict=True):
            if batch.future.done():
                continue
            if isinstance(outcome, Exception):
                batch.future.set_exception(outcome)
            else:
                batch.future.set_result(outcome)


async def _execute(log: ItemLog, group: Sequence[_Batch]) -> list[list[Result]]:
    """LangGraph's batch semantics over ItemLog, for a group of batches as for one: gets,
    searches and listings read the store as it was (identical reads are done once; a
    result used again is a fresh copy), then every batch's puts are written in one
    transaction, each batch's put of a key a state of its own, in the group's order."""
    results: list[list[Result]] = [[None] * len(b.ops) for b in group]
    places = [(n, i, op) for n, b in enumerate(group) for i, op in enumerate(b.ops)]
    gets = [(n, i, op) for n, i, op in places if isinstance(op, GetOp)]
    for refresh in (False, True):
        chosen = [(n, i, op) for n, i, op in gets if bool(op.refresh_ttl) is refresh]
        if chosen:
            found = await log.get_many([(op.namespace, op.key) for _, _, op in chosen],
                                       refresh=refresh)
            given: set[int] = set()
            for (n, i, _), item in zip(chosen, found, strict=True):
                results[n][i] = None if item is None else _item(item, fresh=id(item) in given)
                given.add(id(item))
    done: dict[Any, list[Any]] = {}  # each distinct read and its result
    for n, i, op in places:
        if not isinstance(op, SearchOp | ListNamespacesOp):
            continue
        same = _read_key(op)
        if same is not None and same in done:
            results[n][i] = _fresh(done[same])
            continue
        if isinstance(op, SearchOp):
            # ``query`` needs a vector index; without one it is ignored, as in LangGraph.
            found_items = await log.search(op.namespace_prefix, filter=op.filter,
                                           limit=op.limit, offset=op.offset,
                                           refresh=bool(op.refresh_ttl))
            result: list[Any] = [_search_item(item) for item in found_items]
        else:
            result = await log.list_namespaces(
                match=[(c.match_type, c.path) for c in op.match_conditions or ()],
                max_depth=op.max_depth, limit=op.limit, offset=op.offset)
        if same is not None:
            done[same] = result
        results[n][i] = result
    batches = [b.puts for b in group if b.puts]
    if batches:
        await log.put_checked(batches)
    return results


def _read_key(op: SearchOp | ListNamespacesOp) -> Any:
    """What makes two reads the same read (None: not known to be the same as any other):
    their type and fields, a filter in its canonical JSON (so ``True`` and ``1``, ``1``
    and ``1.0`` stay apart, as ``matches`` compares them)."""
    if isinstance(op, SearchOp):
        try:
            filter = msgspec.json.encode(op.filter, order="sorted")
        except (TypeError, ValueError, msgspec.EncodeError):
            return None  # refused by the search itself
        key: Any = (SearchOp, op.namespace_prefix, filter, op.limit, op.offset, op.query,
                    op.refresh_ttl)
    else:
        key = (ListNamespacesOp, op.match_conditions, op.max_depth, op.limit, op.offset)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _fresh(result: list[Any]) -> list[Any]:
    """A copy of a read's result for another caller: its own list, its own values."""
    return [SearchItem(namespace=r.namespace, key=r.key, value=_values_copy(r.value),
                       created_at=r.created_at, updated_at=r.updated_at, score=r.score)
            if isinstance(r, SearchItem) else r for r in result]


def _values_copy(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = msgspec.msgpack.decode(msgspec.msgpack.encode(value))
    return copied


def _item(found: StoredItem, *, fresh: bool = False) -> Item:
    return Item(value=_values_copy(found.value) if fresh else found.value, key=found.key,
                namespace=found.namespace, created_at=found.created_at, updated_at=found.updated_at)


def _search_item(found: StoredItem) -> SearchItem:
    return SearchItem(namespace=found.namespace, key=found.key, value=found.value,
                      created_at=found.created_at, updated_at=found.updated_at)
