"""ImmAgentSaver: a LangGraph checkpointer over immagent's store.

Needs the extra: ``pip install 'immagent-core[langgraph]'``.

Switching a graph to it is one line, sync or async, as LangGraph's docs open its savers::

    with ImmAgentSaver.from_conn_string("checkpoints.db") as saver:        # SqliteSaver
        saver.setup()
        graph = builder.compile(checkpointer=saver)
        graph.invoke(inputs, config)

    async with ImmAgentSaver.from_conn_string("postgresql://…") as saver:  # AsyncPostgresSaver
        await saver.setup()
        graph = builder.compile(checkpointer=saver)
        await graph.ainvoke(inputs, config)

``ImmAgentSaver(store)`` shares an open immagent ``Store``; ``ImmAgentSaver(pool)`` a psycopg
``AsyncConnectionPool`` or ``AsyncConnection`` you own (as ``AsyncPostgresSaver(conn)``).

This module is the adapter: it parses LangGraph's configs, assembles ``CheckpointTuple``s,
numbers channel versions and bridges the sync API. The checkpoints themselves are kept by
the checkpoint client, ``immagent.clients.checkpoints`` (which needs no LangGraph): each
checkpoint one immutable state row of the event log, channel values content-addressed
(stored once however many checkpoints, threads and forks share them), list channels hash
chains that grow by what a step adds, pending writes rows of their own. Its digest
(``saver.digest(config)``) pins the whole checkpoint; ``store.verify()`` re-hashes every
row the saver wrote; ``saver.export(thread, path)`` writes a bundle that
``immagent.verify_bundle`` checks offline; ``store.gc()`` reclaims what deleted threads
leave.

**Versions are integers** (``get_next_version``): LangGraph's savers add a random fraction
so that two forks of a thread never share a blob key; here a value is found by digest from
its checkpoint, so plain counters are enough and keep every row small.

**Sync and async** (``immagent.store.hosting``): the store runs on one event loop.
``with from_conn_string(...)`` gives it a private loop in a daemon thread, so sync calls
(``graph.invoke``) work from any thread and async ones from any loop; ``async with`` or a
shared store run it on the caller's loop, where async calls run directly and sync ones work
from other threads (on that loop itself they raise ``SyncCallError``, an
``asyncio.InvalidStateError``, instead of waiting for themselves, as LangGraph's async
savers do). ``close()`` (or the end of the ``with``) closes the store and stops the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, cast

from immagent import checkpoints as cp
from immagent.audit.bundle import BundleInfo
from immagent.clients.checkpoints import CheckpointLog, Snapshot
from immagent.exceptions import ExtraNotInstalledError, ValidationError
from immagent.records import StateRow
from immagent.store import dsn as dsns
from immagent.store.hosting import Host, OwnedHost, SharedHost, SyncCallError
from immagent.store.log import EventLog

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        get_serializable_checkpoint_metadata,
        writes_sort_key,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as e:  # the extra is not installed
    raise ExtraNotInstalledError("immagent.integrations.langgraph", "langgraph", cause=e) from e
try:  # DeltaChannel's snapshot (LangGraph 1.2+, beta)
    from langgraph.checkpoint.base import DeltaChannelHistory
    from langgraph.checkpoint.serde.types import _DeltaSnapshot
except ImportError:  # an older LangGraph: no delta channels to store
    _DeltaSnapshot = None  # type: ignore[assignment, misc]

__all__ = ["ImmAgentSaver", "SyncCallError"]

T = TypeVar("T")
S = TypeVar("S", bound="ImmAgentSaver")


@dataclass(frozen=True, slots=True)
class _Target:
    """The checkpoint a config names (no ``checkpoint_id``: the newest)."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str | None


class ImmAgentSaver(BaseCheckpointSaver[int]):
    """A LangGraph checkpointer storing checkpoints as immutable, content-addressed rows
    of an immagent ``Store`` (PostgreSQL, SQLite or memory); see the module docstring."""

    def __init__(self, store: EventLog | object, *,
                 serde: SerializerProtocol | None = None) -> None:
        """A saver over an open immagent ``Store``, or over a psycopg ``AsyncConnection``
        or ``AsyncConnectionPool`` you own (as LangGraph's ``AsyncPostgresSaver(conn)``);
        either is shared, never closed here. It runs on the loop running now (or the loop
        of its first async call): async methods there, sync ones from other threads."""
        if not isinstance(store, EventLog):
            store = EventLog.over(store)  # a psycopg pool or connection; else ValidationError
        self._bind(SharedHost(store, _WHAT), store, serde)

    def _bind(self, host: Host, store: EventLog, serde: SerializerProtocol | None,
              owned: EventLog | None = None) -> None:
        super().__init__(serde=serde)
        self._host = host
        self._store = store
        self._owned = owned  # a store ``async with from_conn_string`` opened: closed here
        self._client = CheckpointLog(store, self.serde)

    _finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def store(self) -> EventLog:
        """The immagent store the checkpoints live in (verify, gc, export through it)."""
        return self._store

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the store runs on (None until a shared store's first call)."""
        return self._host.loop

    @property
    def _checkpoints(self) -> CheckpointLog:
        """The checkpoint client over this saver's serializer: ``with_allowlist`` makes a
        shallow copy with another serializer, which then gets a client of its own (sharing
        the caches)."""
        if self._client.serde is not self.serde:
            self._client = self._client.with_serde(self.serde)
        return self._client

    @classmethod
    def from_conn_string(cls: type[S], conn_string: str | os.PathLike[str], *,
                         serde: SerializerProtocol | None = None,
                         **connect: Any) -> _Opening[S]:
        """A saver over a store it opens on ``conn_string`` and closes on exit: ``with``
        (a private loop thread: for sync graphs, as ``SqliteSaver``/``PostgresSaver``) or
        ``async with`` (the current loop, as ``AsyncSqliteSaver``/``AsyncPostgresSaver``).
        Takes what LangGraph's savers take (``":memory:"``, a SQLite path with any suffix,
        a PostgreSQL URI or libpq string) and immagent DSNs; ``connect`` goes to
        ``Store.connect`` (async form). Call ``setup()`` once (``await saver.setup()`` in
        async code)."""
        return _Opening(cls, _dsn(conn_string), serde, connect)

    def setup(self) -> Awaitable[None]:
        """Create (or migrate) the store's tables; idempotent, safe from several processes.
        ``saver.setup()`` in sync code, ``await saver.setup()`` in async code (on the
        saver's loop the work happens when awaited; elsewhere it is done before this
        returns, and the result can still be awaited)."""
        running = _running()
        if running is not None and self._host.loop in (running, None):
            return self.asetup()  # (a shared store's first call: this loop becomes its loop)
        self._host.call(_init_schema, write=True)
        return _DONE

    async def asetup(self) -> None:
        """``setup`` from async code, on any loop."""
        await self._host.run(_init_schema, write=True)

    def close(self) -> None:
        """Close what ``from_conn_string`` opened (idempotent; a shared store stays open).
        A store ``async with`` opened closes on its own loop: from that loop, ``aclose``."""
        if self._owned is not None and not self._owned.closed:
            owned = self._owned
            self._call(lambda: owned.close(), write=True)
        self._host.release()

    async def aclose(self) -> None:
        """``close`` from async code."""
        if self._owned is not None and not self._owned.closed:
            owned = self._owned
            await self._host.run(lambda _: owned.close(), write=True)
        await asyncio.to_thread(self._host.release)

    async def _hop(self, make: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        """Run an async method's work on the store's loop (here when it is this loop)."""

        async def work(_: EventLog) -> T:
            return await make()

        return await self._host.run(work, write=write)

    def _call(self, make: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        """A sync method's work, on the store's loop (SyncCallError on that loop itself)."""

        async def work(_: EventLog) -> T:
            return await make()

        return self._host.call(work, write=write)

    # -- reads ------------------------------------------------------------------------------

    async def _get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``), or the newest of its
        thread and namespace; None when there is none."""
        target = _target(config)
        row = await self._checkpoints.find(target.thread_id, target.checkpoint_ns,
                                           target.checkpoint_id)
        if row is None:
            return None
        body = cp.decode_checkpoint(row.body)
        return await self._tuple(row, body, target.thread_id, target.checkpoint_ns,
                                 self._checkpoints.metadata(body))

    async def _list(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncGenerator[CheckpointTuple, None]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValidationError("limit", f"must be an int, got {limit!r}", limit)
        if filter is not None and not isinstance(filter, Mapping):
            raise ValidationError("filter", f"must be a mapping, got {type(filter).__name__}",
                                  filter)
        before_id = None
        if before is not None:
            before_id = _parts(before, require_thread=False)[2]
        thread_id, ns, checkpoint_id = (None, None, None) if config is None else _parts(config)
        client = self._checkpoints
        remaining = limit
        async for row in client.listed(thread_id, ns, checkpoint_id, before_id):
            if remaining is not None and remaining <= 0:
                return
            body = cp.decode_checkpoint(row.body)
            if before_id is not None and cp.expand_id(body.checkpoint_id) >= before_id:
                continue
            metadata = client.metadata(body)
            if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                continue
            row_thread, row_ns, _ = cp.parse_stream(row.kind, row.stream)
            if remaining is not None:
                remaining -= 1
            yield await self._tuple(row, body, row_thread, row_ns, metadata)

    async def _digest(self, config: RunnableConfig) -> bytes | None:
        """The content digest of the checkpoint ``config`` names (or the newest of its
        namespace): blake3 over its stored row, which pins every channel value through the
        refs. None when there is none."""
        target = _target(config)
        row = await self._checkpoints.find(target.thread_id, target.checkpoint_ns,
                                           target.checkpoint_id)
        return None if row is None else row.digest

    async def _tuple(self, row: StateRow, body: cp.CheckpointBody, thread_id: str, ns: str,
                     metadata: dict[str, Any]) -> CheckpointTuple:
        client = self._checkpoints
        checkpoint_id = cp.expand_id(body.checkpoint_id)
        checkpoint: dict[str, Any] = {
            "v": body.v, "id": checkpoint_id, "ts": cp.decode_ts(body.ts),
            "channel_values": {name: _from_snapshot(value) for name, value in
                               (await client.channel_values(row, body)).items()},
            "channel_versions": dict(body.versions),
            "versions_seen": {node: dict(seen) for node, seen in body.seen.items()},
            "updated_channels": body.updated,
        }
        for key in body.absent:  # read back exactly as put: nothing added
            checkpoint.pop(key, None)
        checkpoint.update(client.extra(body))
        parent = None if body.parent is None else {"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ns,
            "checkpoint_id": cp.expand_id(body.parent)}}
        writes = sorted(await client.pending_writes(thread_id, ns, checkpoint_id),
                        key=lambda w: writes_sort_key(w[0], w[1], w[2]))
        return CheckpointTuple(
            config={"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                     "checkpoint_id": checkpoint_id}},
            checkpoint=cast(Checkpoint, checkpoint),
            metadata=cast(CheckpointMetadata, metadata),
            parent_config=cast(RunnableConfig | None, parent),
            pending_writes=[(task_id, channel, value)
                            for _, task_id, _, channel, value in writes],
        )

    # -- writes -----------------------------------------------------------------------------

    async def _put(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        """Store ``checkpoint`` as the child of the checkpoint ``config`` names: one state
        row, plus the values it does not share with what is stored (one transaction)."""
        target = _target(config)
        if not isinstance(checkpoint, Mapping):
            raise ValidationError("checkpoint", f"must be a mapping, got "
                                  f"{type(checkpoint).__name__}", None)
        checkpoint_id = cp.check_key("checkpoint['id']", checkpoint.get("id"))
        _check_checkpoint(checkpoint)
        if not isinstance(new_versions, Mapping):
            raise ValidationError("new_versions", f"must be a mapping of channel versions, "
                                  f"got {type(new_versions).__name__}", None)
        if not isinstance(metadata, Mapping):
            raise ValidationError("metadata", f"must be a mapping, got "
                                  f"{type(metadata).__name__}", None)
        thread_id, ns = target.thread_id, target.checkpoint_ns
        values = checkpoint.get("channel_values")
        if values and _DeltaSnapshot is not None and any(
                type(v) is _DeltaSnapshot and type(v.value) is list for v in values.values()):
            checkpoint = cast(Checkpoint, {**checkpoint, "channel_values": {
                name: Snapshot(v.value) if type(v) is _DeltaSnapshot and type(v.value) is list
                else v for name, v in values.items()}})
        await self._checkpoints.put(
            thread_id, ns, checkpoint_id, target.checkpoint_id, checkpoint,
            get_serializable_checkpoint_metadata(config, metadata), new_versions)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": checkpoint_id}}

    async def _put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        """Store the writes of task ``task_id`` on the checkpoint ``config`` names (which
        may be written after them: LangGraph saves both in the background)."""
        target = _target(config)
        if target.checkpoint_id is None:
            raise ValidationError("checkpoint_id", "put_writes needs the config of a "
                                  "checkpoint (configurable.checkpoint_id)", None)
        task_id = cp.check_key("task_id", task_id)
        if not isinstance(task_path, str):
            raise ValidationError("task_path", f"must be a str, got "
                                  f"{type(task_path).__name__}", task_path)
        if isinstance(writes, str | bytes | Mapping) or not isinstance(writes, Sequence):
            raise ValidationError("writes", f"must be a sequence of (channel, value) pairs, "
                                  f"got {type(writes).__name__}", None)
        for idx, write in enumerate(writes):
            if not isinstance(write, tuple | list) or len(write) != 2:
                raise ValidationError(f"writes[{idx}]", f"must be a (channel, value) pair, "
                                      f"got {_shown(write)}", None)
        await self._checkpoints.put_writes(target.thread_id, target.checkpoint_ns,
                                           target.checkpoint_id, task_id, task_path, writes,
                                           WRITES_IDX_MAP)

    # -- threads: delete, copy, prune, runs, export ------------------------------------------

    async def _delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of ``thread_id`` (rows only: ``store.gc()``
        reclaims the values nothing else uses)."""
        await self._checkpoints.delete_thread(cp.check_key("thread_id", thread_id,
                                                           coerce=True))

    async def _copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread to another in one transaction:
        new rows, the same checkpoint ids, the same values (no asset is written)."""
        source = cp.check_key("source_thread_id", source_thread_id, coerce=True)
        target = cp.check_key("target_thread_id", target_thread_id, coerce=True)
        await self._checkpoints.copy_thread(source, target)

    async def _prune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep the newest checkpoint of each namespace of each thread
        and its writes, delete the rest; ``"delete"``: delete the threads. Rows only. A
        thread using a DeltaChannel is refused by keep_latest (its newest checkpoint needs
        its ancestors' writes), and then nothing is pruned."""
        await self._checkpoints.prune(_thread_list("thread_ids", thread_ids), strategy)

    async def _delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is one of ``run_ids``, and their
        writes. Run ids are not indexed: this reads every checkpoint's metadata."""
        await self._checkpoints.delete_for_runs(set(_thread_list("run_ids", run_ids)))

    async def _export(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the thread (every checkpoint and write, every namespace,
        and every value they reach) to ``path``; check it with ``immagent.verify_bundle``
        and load it anywhere with ``Store.import_states``."""
        return await self._checkpoints.export(
            cp.check_key("thread_id", thread_id, coerce=True), path)

    async def _delta_history(self, config: RunnableConfig,
                             channels: Sequence[str]) -> dict[str, DeltaChannelHistory]:
        target = _target(config)
        if isinstance(channels, str) or not isinstance(channels, Sequence):
            raise ValidationError("channels", f"must be a sequence of channel names, got "
                                  f"{type(channels).__name__}", None)
        names = [cp.check_key(f"channels[{i}]", c) for i, c in enumerate(channels)]
        found = await self._checkpoints.delta_history(
            target.thread_id, target.checkpoint_ns, target.checkpoint_id, names)
        out: dict[str, DeltaChannelHistory] = {}
        for name, history in found.items():
            writes = [(task_id, name, value) for group in history.writes
                      for _, task_id, _, value in sorted(
                          group, key=lambda w: writes_sort_key(w[0], w[1], w[2]))]
            entry: DeltaChannelHistory = {"writes": writes}
            if history.seeded:
                entry["seed"] = _from_snapshot(history.seed)
            out[name] = entry
        return out

    # -- versions -----------------------------------------------------------------------------

    def get_next_version(self, current: int | None, channel: None) -> int:
        """The next version of a channel: integers counting up (a float counts up from its
        integer part; a string version, written by another saver, keeps that format)."""
        if current is None:
            return 1
        if isinstance(current, str):  # LangGraph's "<32 digits>.<random>" form: keep it, as
            # versions of one channel are compared with each other
            return cast(int, f"{int(current.split('.')[0]) + 1:032}.{random.random():016}")
        return int(current) + 1

    # -- the public API: async on any loop, sync from any thread but the store's loop -----
    #
    # Each method's work (the ``_`` methods above) runs on the loop the store runs on: an
    # async call from another loop hands it over (Host.run), a sync call blocks its
    # thread until it is done (Host.call; on the store's own loop that would wait for
    # itself, so it raises SyncCallError, as LangGraph's async savers do).

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``), or the newest of its
        thread and namespace; None when there is none."""
        return await self._hop(lambda: self._get_tuple(config))

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Sync ``aget_tuple``."""
        return self._call(lambda: self._get_tuple(config))

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        """Store ``checkpoint`` as the child of the checkpoint ``config`` names: one state
        row, plus the values it does not share with what is stored (one transaction)."""
        return await self._hop(lambda: self._put(config, checkpoint, metadata, new_versions),
                               write=True)

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        """Sync ``aput``."""
        return self._call(lambda: self._put(config, checkpoint, metadata, new_versions), write=True)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        """Store the writes of task ``task_id`` on the checkpoint ``config`` names (which
        may be written after them: LangGraph saves both in the background)."""
        await self._hop(lambda: self._put_writes(config, writes, task_id, task_path), write=True)

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        """Sync ``aput_writes``."""
        self._call(lambda: self._put_writes(config, writes, task_id, task_path), write=True)

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of ``thread_id`` (rows only: ``store.gc()``
        reclaims the values nothing else uses)."""
        await self._hop(lambda: self._delete_thread(thread_id), write=True)

    def delete_thread(self, thread_id: str) -> None:
        """Sync ``adelete_thread``."""
        self._call(lambda: self._delete_thread(thread_id), write=True)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread to another in one transaction:
        new rows, the same checkpoint ids, the same values (no asset is written)."""
        await self._hop(lambda: self._copy_thread(source_thread_id, target_thread_id), write=True)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Sync ``acopy_thread``."""
        self._call(lambda: self._copy_thread(source_thread_id, target_thread_id), write=True)

    async def aprune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep the newest checkpoint of each namespace of each thread,
        what its reconstruction needs and its writes; ``"delete"``: delete the threads.
        Rows only (``store.gc()`` reclaims values)."""
        await self._hop(lambda: self._prune(thread_ids, strategy=strategy), write=True)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Sync ``aprune``."""
        self._call(lambda: self._prune(thread_ids, strategy=strategy), write=True)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is one of ``run_ids``, and their
        writes. Run ids are not indexed: this reads every checkpoint's metadata."""
        await self._hop(lambda: self._delete_for_runs(run_ids), write=True)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Sync ``adelete_for_runs``."""
        self._call(lambda: self._delete_for_runs(run_ids), write=True)

    async def adigest(self, config: RunnableConfig) -> bytes | None:
        """The content digest of the checkpoint ``config`` names (or the newest of its
        namespace): blake3 over its stored row, which pins every channel value through the
        refs. None when there is none."""
        return await self._hop(lambda: self._digest(config))

    def digest(self, config: RunnableConfig) -> bytes | None:
        """Sync ``adigest``."""
        return self._call(lambda: self._digest(config))

    async def aexport(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the thread (every checkpoint and write, every namespace,
        and every value they reach) to ``path``; check it with ``immagent.verify_bundle``
        and load it anywhere with ``Store.import_states``."""
        return await self._hop(lambda: self._export(thread_id, path), write=True)

    def export(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Sync ``aexport``."""
        return self._call(lambda: self._export(thread_id, path), write=True)

    async def aget_delta_channel_history(
            self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """What LangGraph needs to rebuild ``channels`` (``DeltaChannel``s) at the checkpoint
        ``config`` names: per channel, the writes of its ancestors oldest first (each
        checkpoint's in ``writes_sort_key`` order) back to the nearest ancestor storing a
        value for it, and that value as ``seed`` (absent: start empty). The walk follows
        parent links, never listing order, so a fork replays only its own branch."""
        return await self._hop(lambda: self._delta_history(config, channels))

    def get_delta_channel_history(
            self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Sync ``aget_delta_channel_history``."""
        return self._call(lambda: self._delta_history(config, channels))

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of ``config``'s thread (and namespace, when it names
        one; of the whole store when ``config`` is None), whose metadata has every
        ``filter`` item, older than ``before``, at most ``limit``."""
        listing = self._list(config, filter=filter, before=before, limit=limit)
        try:
            while True:
                more, item = await self._hop(lambda: _step(listing))
                if not more:
                    return
                assert item is not None
                yield item
        finally:
            await self._hop(listing.aclose)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None,
             limit: int | None = None) -> Iterator[CheckpointTuple]:
        """Sync ``alist``."""
        listing = self._list(config, filter=filter, before=before, limit=limit)
        try:
            while True:
                more, item = self._call(lambda: _step(listing))
                if not more:
                    return
                assert item is not None
                yield item
        finally:
            with contextlib.suppress(SyncCallError):
                self._call(listing.aclose)


class _Opening(Generic[S]):
    """What ``from_conn_string`` returns: ``with`` opens the store on a private loop
    thread, ``async with`` on the current loop; both close it on exit."""

    def __init__(self, cls: type[S], dsn: str, serde: SerializerProtocol | None,
                 connect: dict[str, Any]) -> None:
        self._cls = cls
        self._dsn = dsn
        self._serde = serde
        self._connect = connect
        self._saver: S | None = None

    def __enter__(self) -> S:
        host = OwnedHost(self._dsn, _WHAT)
        store = host.open()  # errors here, and no thread left behind
        saver = self._cls.__new__(self._cls)
        saver._bind(host, store, self._serde)
        # Dropped without close(), the private loop thread is still released.
        saver._finalizer = weakref.finalize(saver, host.release)
        self._saver = saver
        return saver

    def __exit__(self, *exc: object) -> None:
        if self._saver is not None:
            self._saver.close()

    async def __aenter__(self) -> S:
        store = await EventLog.connect(self._dsn, **self._connect)
        saver = self._cls.__new__(self._cls)
        saver._bind(SharedHost(store, _WHAT), store, self._serde, owned=store)
        self._saver = saver
        return saver

    async def __aexit__(self, *exc: object) -> None:
        if self._saver is not None:
            await self._saver.aclose()


class _Done:
    """The awaitable ``setup()`` returns when it has done its work already."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that yields nothing: awaiting it returns None at once


_DONE: Final = _Done()


#: How the saver is named in the host's errors.
_WHAT: Final = "ImmAgentSaver"


def _dsn(conn_string: object) -> str:
    """The DSN of a connection string as LangGraph's savers take it: a ``postgresql://``
    URI or libpq string, ``":memory:"`` (a throwaway in-process store, immagent's
    ``memory://``), or a SQLite file path with any suffix or none; immagent's own DSNs pass
    through."""
    if conn_string == ":memory:":
        return "memory://"
    return dsns.parse(conn_string, bare_paths=True).dsn


async def _init_schema(store: EventLog) -> None:
    await store.init_schema()


def _from_snapshot(value: Any) -> Any:
    """A value as LangGraph reads it: a stored snapshot is its ``_DeltaSnapshot``."""
    if type(value) is Snapshot and _DeltaSnapshot is not None:
        return _DeltaSnapshot(value.value)
    return value


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _step(listing: AsyncIterator[CheckpointTuple]) -> tuple[bool, CheckpointTuple | None]:
    try:
        return True, await anext(listing)
    except StopAsyncIteration:
        return False, None


# -- helpers --------------------------------------------------------------------------------


def _parts(config: object, *, require_thread: bool = True
           ) -> tuple[str, str | None, str | None]:
    """(thread id, namespace or None when absent, checkpoint id or None) of a config."""
    configurable = config.get("configurable") if isinstance(config, Mapping) else None
    if not isinstance(configurable, Mapping):
        raise ValidationError("config", "must be a RunnableConfig with a 'configurable' "
                              "mapping", None)
    thread = configurable.get("thread_id")
    thread_id = ("" if thread is None and not require_thread
                 else cp.check_key("thread_id", thread, coerce=True))
    ns = configurable.get("checkpoint_ns")
    checkpoint_ns = None if ns is None else cp.check_key("checkpoint_ns", ns, empty=True)
    raw_id = configurable.get("checkpoint_id")
    checkpoint_id = None if raw_id is None or raw_id == "" else cp.check_key(
        "checkpoint_id", raw_id)
    return thread_id, checkpoint_ns, checkpoint_id


def _target(config: object) -> _Target:
    """The checkpoint a config names: thread, namespace (default the root one), id."""
    thread_id, ns, checkpoint_id = _parts(config)
    return _Target(thread_id, ns or "", checkpoint_id)


def _thread_list(field: str, values: object) -> list[str]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | set | frozenset):
        raise ValidationError(field, f"must be a sequence of ids, not a "
                              f"{type(values).__name__}", values)
    return [cp.check_key(f"{field}[{i}]", v, coerce=True) for i, v in enumerate(values)]


def _shown(value: object) -> str:
    """A short description of a rejected value for an error message."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _check_checkpoint(checkpoint: Mapping[str, Any]) -> None:
    """LangGraph's checkpoint dict has the shape the checkpoint client stores: the field
    named in a ValidationError when it does not (checked before anything is written)."""
    _check_versions("checkpoint['channel_versions']", checkpoint.get("channel_versions"))
    field = "checkpoint['versions_seen']"
    seen = checkpoint.get("versions_seen")
    if seen is not None:
        if not isinstance(seen, Mapping):
            raise ValidationError(field, f"must be a mapping of node -> channel versions, "
                                  f"got {type(seen).__name__}", None)
        for node, versions in seen.items():
            if not isinstance(node, str):
                raise ValidationError(field, f"node names must be str, got {_shown(node)}",
                                      None)
            if not isinstance(versions, Mapping):
                raise ValidationError(f"{field}[{node!r}]", f"must be a mapping of channel "
                                      f"versions, got {type(versions).__name__}", None)
            _check_versions(f"{field}[{node!r}]", versions)
    values = checkpoint.get("channel_values")
    if values is not None and not isinstance(values, Mapping):
        raise ValidationError("checkpoint['channel_values']", f"must be a mapping, got "
                              f"{type(values).__name__}", None)


def _check_versions(field: str, value: object) -> None:
    """Channel versions: str channel names, int, float or str versions (None: none yet)."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a mapping of channel versions, got "
                              f"{type(value).__name__}", None)
    for name, version in value.items():
        if not isinstance(name, str):
            raise ValidationError(field, f"channel names must be str, got {_shown(name)}",
                                  None)
        if isinstance(version, bool) or not isinstance(version, int | float | str):
            raise ValidationError(f"{field}[{name!r}]", f"a version must be an int, float "
                                  f"or str, got {_shown(version)}", None)
