"""ImmAgentSaver: a LangGraph checkpointer over immagent's store (extra ``immagent[langgraph]``).

Switching a graph to it is one line::

    async with ImmAgentSaver.from_conn_string("postgresql://…") as saver:
        await saver.setup()
        graph = builder.compile(checkpointer=saver)

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

The saver is async; its sync methods work from other threads while the loop that created
it runs (as LangGraph's async savers do) and raise ``SyncCallError`` on that loop itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from immagent.exceptions import ExtraNotInstalledError

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

from immagent import checkpoints as cp
from immagent.audit.bundle import BundleInfo
from immagent.clients.checkpoints import CheckpointLog
from immagent.exceptions import ImmAgentError, ValidationError
from immagent.records import StateRow
from immagent.store.log import EventLog

__all__ = ["ImmAgentSaver", "SyncCallError"]

T = TypeVar("T")


class SyncCallError(ImmAgentError, asyncio.InvalidStateError):
    """A sync method of the saver was called where it cannot block: on the event loop the
    saver runs on (use the ``a…`` method), or with no loop running the saver."""


@dataclass(frozen=True, slots=True)
class _Target:
    """The checkpoint a config names (no ``checkpoint_id``: the newest)."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str | None


class ImmAgentSaver(BaseCheckpointSaver[int]):
    """A LangGraph checkpointer storing checkpoints as immutable, content-addressed rows
    of an immagent ``Store`` (PostgreSQL, SQLite or memory); see the module docstring."""

    def __init__(self, store: EventLog, *, serde: SerializerProtocol | None = None) -> None:
        """A saver over an open store; create it inside the event loop that runs the store
        (its sync methods schedule onto that loop)."""
        if not isinstance(store, EventLog):
            raise ValidationError("store", f"must be an immagent Store, got "
                                  f"{type(store).__name__}", None)
        super().__init__(serde=serde)
        self.store = store
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self._client = CheckpointLog(store, self.serde)

    @property
    def _checkpoints(self) -> CheckpointLog:
        """The checkpoint client over this saver's serializer: ``with_allowlist`` makes a
        shallow copy with another serializer, which then gets a client of its own (sharing
        the caches)."""
        if self._client.serde is not self.serde:
            self._client = self._client.with_serde(self.serde)
        return self._client

    @classmethod
    @contextlib.asynccontextmanager
    async def from_conn_string(cls, conn_string: str, *,
                               serde: SerializerProtocol | None = None,
                               **connect: Any) -> AsyncIterator[ImmAgentSaver]:
        """A saver over a store it opens on ``conn_string`` (any ``Store.connect`` DSN;
        ``connect`` is passed on) and closes on exit. Call ``await saver.setup()`` once."""
        store = await EventLog.connect(conn_string, **connect)
        try:
            yield cls(store, serde=serde)
        finally:
            await store.close()

    async def setup(self) -> None:
        """Create (or migrate) the store's tables; idempotent, safe from several processes."""
        await self.store.init_schema()

    # -- reads ------------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
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

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of ``config``'s thread (and namespace, when it names
        one; of the whole store when ``config`` is None), whose metadata has every
        ``filter`` item, older than ``before``, at most ``limit``."""
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

    async def adigest(self, config: RunnableConfig) -> bytes | None:
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
            "channel_values": await client.channel_values(row, body),
            "channel_versions": dict(body.versions),
            "versions_seen": {node: dict(seen) for node, seen in body.seen.items()},
            "updated_channels": body.updated,
            "pending_sends": [],
        }
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

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        """Store ``checkpoint`` as the child of the checkpoint ``config`` names: one state
        row, plus the values it does not share with what is stored (one transaction)."""
        target = _target(config)
        if not isinstance(checkpoint, Mapping):
            raise ValidationError("checkpoint", f"must be a mapping, got "
                                  f"{type(checkpoint).__name__}", None)
        checkpoint_id = cp.check_key("checkpoint['id']", checkpoint.get("id"))
        thread_id, ns = target.thread_id, target.checkpoint_ns
        await self._checkpoints.put(
            thread_id, ns, checkpoint_id, target.checkpoint_id, checkpoint,
            get_serializable_checkpoint_metadata(config, metadata), new_versions)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": checkpoint_id}}

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
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
        await self._checkpoints.put_writes(target.thread_id, target.checkpoint_ns,
                                           target.checkpoint_id, task_id, task_path, writes,
                                           WRITES_IDX_MAP)

    # -- threads: delete, copy, prune, runs, export ------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of ``thread_id`` (rows only: ``store.gc()``
        reclaims the values nothing else uses)."""
        await self._checkpoints.delete_thread(cp.check_key("thread_id", thread_id,
                                                           coerce=True))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread to another in one transaction:
        new rows, the same checkpoint ids, the same values (no asset is written)."""
        source = cp.check_key("source_thread_id", source_thread_id, coerce=True)
        target = cp.check_key("target_thread_id", target_thread_id, coerce=True)
        await self._checkpoints.copy_thread(source, target)

    async def aprune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep the newest checkpoint of each namespace of each thread
        and its writes, delete the rest; ``"delete"``: delete the threads. Rows only. A
        thread using a DeltaChannel is refused by keep_latest (its newest checkpoint needs
        its ancestors' writes), and then nothing is pruned."""
        await self._checkpoints.prune(_thread_list("thread_ids", thread_ids), strategy)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is one of ``run_ids``, and their
        writes. Run ids are not indexed: this reads every checkpoint's metadata."""
        await self._checkpoints.delete_for_runs(set(_thread_list("run_ids", run_ids)))

    async def aexport(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the thread (every checkpoint and write, every namespace,
        and every value they reach) to ``path``; check it with ``immagent.verify_bundle``
        and load it anywhere with ``Store.import_states``."""
        return await self._checkpoints.export(
            cp.check_key("thread_id", thread_id, coerce=True), path)

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

    # -- the sync interface ---------------------------------------------------------------------

    def _sync(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run an async method on the saver's loop from another thread and wait for it."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            raise SyncCallError("the sync methods of ImmAgentSaver run on the event loop "
                                "that created it, and none is running: create the saver "
                                "inside a running loop, or use the async methods")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise SyncCallError("a sync method of ImmAgentSaver was called on its own event "
                                "loop, where it would block forever: use the async method "
                                "(e.g. `await saver.aget_tuple(...)`, `await "
                                "graph.ainvoke(...)`), or call it from another thread")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Sync ``aget_tuple`` (from a thread other than the saver's loop)."""
        return self._sync(lambda: self.aget_tuple(config))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None,
             limit: int | None = None) -> Iterator[CheckpointTuple]:
        """Sync ``alist`` (from a thread other than the saver's loop)."""
        listing = self.alist(config, filter=filter, before=before, limit=limit)

        async def step() -> tuple[bool, CheckpointTuple | None]:
            try:
                return True, await anext(listing)
            except StopAsyncIteration:
                return False, None

        while True:
            more, item = self._sync(step)
            if not more:
                return
            assert item is not None
            yield item

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        """Sync ``aput`` (from a thread other than the saver's loop)."""
        return self._sync(lambda: self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        """Sync ``aput_writes`` (from a thread other than the saver's loop)."""
        self._sync(lambda: self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        """Sync ``adelete_thread`` (from a thread other than the saver's loop)."""
        self._sync(lambda: self.adelete_thread(thread_id))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Sync ``acopy_thread`` (from a thread other than the saver's loop)."""
        self._sync(lambda: self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Sync ``aprune`` (from a thread other than the saver's loop)."""
        self._sync(lambda: self.aprune(thread_ids, strategy=strategy))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Sync ``adelete_for_runs`` (from a thread other than the saver's loop)."""
        self._sync(lambda: self.adelete_for_runs(run_ids))

    def digest(self, config: RunnableConfig) -> bytes | None:
        """Sync ``adigest`` (from a thread other than the saver's loop)."""
        return self._sync(lambda: self.adigest(config))

    def export(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Sync ``aexport`` (from a thread other than the saver's loop)."""
        return self._sync(lambda: self.aexport(thread_id, path))


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
