"""ImmAgentSaver: a LangGraph checkpointer over immagent's store (extra ``immagent[langgraph]``).

Switching a graph to it is one line::

    async with ImmAgentSaver.from_conn_string("postgresql://…") as saver:
        await saver.setup()
        graph = builder.compile(checkpointer=saver)

It is a second client of the store, next to PersistentAgent, written only through the
event-store API (``Store.commit``, ``get_states``, ``stream_states``, ``scan_states``,
``get_chain``, ``delete_states``). The stored form is in ``immagent.checkpoints``; in short:

* **A checkpoint is one immutable state row** (kind CHECKPOINT) whose id is derived from
  (thread, namespace, checkpoint id): ``get_tuple`` with a checkpoint id is one primary-key
  probe, the newest checkpoint of a namespace one index probe on its stream. Its refs are
  the digests of its channel values (so gc keeps them), its body the rest (versions,
  metadata as the serializer's typed bytes). Its digest (``saver.digest(config)``) pins the
  whole checkpoint: every channel value through the Merkle refs.
* **Channel values are content-addressed assets**: a VALUE is the serializer's
  ``dumps_typed`` (type, bytes), hashed, so an unchanged value is never stored twice. A
  channel whose version did not move reuses the parent checkpoint's digest without
  serializing anything (the rule LangGraph's own savers follow for their blobs).
* **A list channel is a hash chain** of per-element VALUEs (VALUE_NODE links, read with
  ``Store.get_chain``). The new chain is built from the longest common prefix with the
  parent checkpoint's chain, so a step that appends adds only the appended elements, and
  ``add_messages`` replacing or removing elements costs what changed. A put on a thread
  with no parent (``update_state`` into a new thread) reuses a chain this saver has seen
  with the same prefix. Forks (a replay from a ``checkpoint_id``, ``copy_thread``) share
  every asset.
* **Pending writes** are rows of kind CHECKPOINT_WRITES, one per ``put_writes`` call,
  pinning their values (lists and dicts of lists element by element, so a message written
  by a node is the same asset as that message in the channel). Rows are never changed: a
  repeated write is one row (its id hashes its content); for a (task, index) the first
  write wins, for a special channel (errors, interrupts) the last, as in LangGraph's savers.
* **Versions are integers** (``get_next_version``): LangGraph's savers add a random
  fraction so that two forks of a thread never share a blob key; here a value is found by
  digest from its checkpoint, so plain counters are enough and keep every row small.

Deleting (``delete_thread``, ``prune``, ``delete_for_runs``) deletes rows only;
``store.gc()`` reclaims the assets nothing reaches any more. A put that points at an asset
gc removed meanwhile (its thread was deleted) fails the store's "what a write points at
must exist" check, and the saver then writes the checkpoint again with every value
included. ``store.verify()`` re-hashes every row the saver wrote; ``saver.export(thread,
path)`` writes a bundle that ``immagent.verify_bundle`` checks offline.

Ordering: a namespace's checkpoints are listed in the order they were stored, which is
checkpoint-id order for everything LangGraph writes (a thread's checkpoints are put one
after another, ids are time-ordered; ``copy_thread`` and bundle imports keep the order).
``list(None)`` and listing every namespace of a thread sort by checkpoint id.

The saver is async; its sync methods work from other threads while the loop that created
it runs (as LangGraph's async savers do) and raise ``SyncCallError`` on that loop itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast
from uuid import UUID

import msgspec
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from immagent import checkpoints as cp
from immagent.assets import EMPTY_VALUES, Asset, Digest, Kind, Value, ValueNode, encode
from immagent.audit.bundle import BundleInfo
from immagent.exceptions import (
    AssetNotFoundError,
    ConflictError,
    ImmAgentError,
    ValidationError,
)
from immagent.records import StateRow, stream_digest
from immagent.store import Store

__all__ = ["ImmAgentSaver", "SyncCallError"]

T = TypeVar("T")

#: Checkpoint keys with a field of their own in the stored body.
_KNOWN_KEYS: Final = frozenset({"v", "id", "ts", "channel_values", "channel_versions",
                                "versions_seen", "updated_channels"})
#: Known keys a checkpoint may lack (and then reads back without).
_OPTIONAL_KEYS: Final = ("versions_seen", "updated_channels")
#: Metadata keys LangGraph's DeltaChannel leaves; keep_latest refuses such threads.
_DELTA_KEYS: Final = ("counters_since_delta_snapshot", "delta_writes_versioned")
_PRUNE_STRATEGIES: Final = ("keep_latest", "delete")
_PAGE: Final = 1000
#: How far back a chain is walked, link by link, to find where a shortened list forks.
_MAX_WALK: Final = 64


class SyncCallError(ImmAgentError, asyncio.InvalidStateError):
    """A sync method of the saver was called where it cannot block: on the event loop the
    saver runs on (use the ``a…`` method), or with no loop running the saver."""


# -- chains this saver has written or read ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chain:
    """A value chain as this saver knows it: its head, every element, and (when this saver
    built it) every link root first, so a shortened list finds its fork point at once."""

    head: ValueNode
    elements: tuple[Value, ...]
    nodes: tuple[ValueNode, ...] | None


class _Chains:
    """Recently used chains by head digest (bounded), and by (last element, length), which
    finds the chain a list without a parent checkpoint can extend. Values are immutable,
    so nothing here can be stale; a chain gc removed is caught by the store's write check."""

    def __init__(self, max_heads: int = 2048, max_elements: int = 2_000_000) -> None:
        self._by_head: OrderedDict[Digest, _Chain] = OrderedDict()
        self._by_tail: dict[tuple[Digest, int], Digest] = {}
        self._elements = 0
        self._max_heads = max_heads
        self._max_elements = max_elements

    def get(self, head: Digest) -> _Chain | None:
        chain = self._by_head.get(head)
        if chain is not None:
            self._by_head.move_to_end(head)
        return chain

    def add(self, chain: _Chain) -> None:
        digest = chain.head.digest
        if digest in self._by_head:
            self._by_head.move_to_end(digest)
            return
        self._by_head[digest] = chain
        self._elements += len(chain.elements)
        if chain.elements:
            self._by_tail[(chain.elements[-1].digest, len(chain.elements))] = digest
        while len(self._by_head) > self._max_heads or (
                self._elements > self._max_elements and len(self._by_head) > 1):
            old_digest, old = self._by_head.popitem(last=False)
            self._elements -= len(old.elements)
            if old.elements:
                key = (old.elements[-1].digest, len(old.elements))
                if self._by_tail.get(key) == old_digest:
                    del self._by_tail[key]

    def longest_prefix(self, digests: Sequence[Digest]) -> tuple[_Chain, int] | None:
        """The known chain whose elements are the longest prefix of ``digests``."""
        for length in range(len(digests), 0, -1):
            head = self._by_tail.get((digests[length - 1], length))
            chain = None if head is None else self._by_head.get(head)
            if chain is not None and _common_prefix(chain.elements, digests) == length:
                return chain, length
        return None

    def clear(self) -> None:
        self._by_head.clear()
        self._by_tail.clear()
        self._elements = 0


def _same_prefix(elements: Sequence[Value], items: Sequence[tuple[str, bytes]]) -> int:
    """How many leading ``elements`` have exactly the serialized form of ``items``."""
    n = min(len(elements), len(items))
    for i in range(n):
        element, (type_, data) = elements[i], items[i]
        if element.data != data or element.type != type_:
            return i
    return n


def _common_prefix(elements: Sequence[Value], digests: Sequence[Digest]) -> int:
    n = min(len(elements), len(digests))
    for i in range(n):
        if elements[i].digest != digests[i]:
            return i
    return n


@dataclass(slots=True)
class _Encoded:
    """A value split into assets: its shape, the refs it takes, the assets to write and
    the chain to remember once the write committed."""

    shape: Any
    refs: list[Digest]
    assets: list[Asset]
    chain: _Chain | None = None


@dataclass(frozen=True, slots=True)
class _Target:
    """The checkpoint a config names (no ``checkpoint_id``: the newest)."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str | None


# -- the saver ----------------------------------------------------------------------------


class ImmAgentSaver(BaseCheckpointSaver[int]):
    """A LangGraph checkpointer storing checkpoints as immutable, content-addressed rows
    of an immagent ``Store`` (PostgreSQL, SQLite or memory); see the module docstring."""

    def __init__(self, store: Store, *, serde: SerializerProtocol | None = None) -> None:
        """A saver over an open store; create it inside the event loop that runs the store
        (its sync methods schedule onto that loop)."""
        if not isinstance(store, Store):
            raise ValidationError("store", f"must be an immagent Store, got "
                                  f"{type(store).__name__}", None)
        super().__init__(serde=serde)
        self.store = store
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self._chains = _Chains()
        # Checkpoint rows recently written or read, by state id: the parent of the next put
        # is almost always here. Rows are immutable; a deleted one is only ever used as a
        # parent, and the store's write check catches a value gc removed since.
        self._rows: OrderedDict[UUID, StateRow] = OrderedDict()

    @classmethod
    @contextlib.asynccontextmanager
    async def from_conn_string(cls, conn_string: str, *,
                               serde: SerializerProtocol | None = None,
                               **connect: Any) -> AsyncIterator[ImmAgentSaver]:
        """A saver over a store it opens on ``conn_string`` (any ``Store.connect`` DSN;
        ``connect`` is passed on) and closes on exit. Call ``await saver.setup()`` once."""
        store = await Store.connect(conn_string, **connect)
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
        row = await self._find(target)
        if row is None:
            return None
        body = cp.decode_checkpoint(row.body)
        return await self._tuple(row, body, target.thread_id, target.checkpoint_ns,
                                 self._metadata(body))

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
        remaining = limit
        async for row in self._listed(config, before_id):
            if remaining is not None and remaining <= 0:
                return
            body = cp.decode_checkpoint(row.body)
            if before_id is not None and cp.expand_id(body.checkpoint_id) >= before_id:
                continue
            metadata = self._metadata(body)
            if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                continue
            thread_id, ns, _ = cp.parse_stream(row.kind, row.stream)
            if remaining is not None:
                remaining -= 1
            yield await self._tuple(row, body, thread_id, ns, metadata)

    async def adigest(self, config: RunnableConfig) -> bytes | None:
        """The content digest of the checkpoint ``config`` names (or the newest of its
        namespace): blake3 over its stored row, which pins every channel value through the
        refs. None when there is none."""
        row = await self._find(_target(config))
        return None if row is None else row.digest

    async def _find(self, target: _Target) -> StateRow | None:
        stream = cp.checkpoint_stream(target.thread_id, target.checkpoint_ns)
        if target.checkpoint_id is None:
            page = await self.store.stream_states(Kind.CHECKPOINT, stream, limit=1)
            row = page[0] if page else None
        else:
            state_id = cp.checkpoint_state_id(target.thread_id, target.checkpoint_ns,
                                              target.checkpoint_id)
            found = await self.store.get_states([state_id])
            row = found[0] if found else None
            if row is not None and (row.kind != Kind.CHECKPOINT or row.stream != stream
                                    or cp.expand_id(cp.decode_checkpoint(row.body)
                                                    .checkpoint_id) != target.checkpoint_id):
                row = None  # a 122-bit hash collision, or a damaged row: not this one
        if row is not None:
            self._remember(row)
        return row

    async def _listed(self, config: RunnableConfig | None,
                      before_id: str | None) -> AsyncIterator[StateRow]:
        """The checkpoint rows a listing walks, newest first, before filtering."""
        if config is None:
            rows = [r async for r in self._scan(Kind.CHECKPOINT)]
            for row in sorted(rows, key=_checkpoint_key, reverse=True):
                yield row
            return
        thread_id, checkpoint_ns, checkpoint_id = _parts(config)
        if checkpoint_ns is None:  # every namespace of the thread
            rows = await self._thread_rows(thread_id, (Kind.CHECKPOINT,))
            for row in sorted(rows, key=_checkpoint_key, reverse=True):
                if checkpoint_id is None or _checkpoint_key(row) == checkpoint_id:
                    yield row
            return
        if checkpoint_id is not None:
            found_row = await self._find(_Target(thread_id, checkpoint_ns, checkpoint_id))
            if found_row is not None:
                yield found_row
            return
        stream = cp.checkpoint_stream(thread_id, checkpoint_ns)
        after: int | None = None
        if before_id is not None:  # start at the cursor when it is stored: one probe
            found = await self.store.get_states([cp.checkpoint_state_id(
                thread_id, checkpoint_ns, before_id)])
            if found and found[0].stream == stream:
                after = found[0].seq
        while True:
            page = await self.store.stream_states(Kind.CHECKPOINT, stream, after_seq=after,
                                                  limit=_PAGE)
            for row in page:
                yield row
            if len(page) < _PAGE:
                return
            after = page[-1].seq

    async def _tuple(self, row: StateRow, body: cp.CheckpointBody, thread_id: str, ns: str,
                     metadata: dict[str, Any]) -> CheckpointTuple:
        self._remember(row)
        checkpoint_id = cp.expand_id(body.checkpoint_id)
        values = await self._decode([(shape, refs) for (_, shape), refs in
                                     zip(body.values, _split(body.values, row.refs),
                                         strict=True)])
        checkpoint: dict[str, Any] = {
            "v": body.v, "id": checkpoint_id, "ts": cp.decode_ts(body.ts),
            "channel_values": {name: value for (name, _), value in zip(body.values, values,
                                                                       strict=True)},
            "channel_versions": dict(body.versions),
            "versions_seen": {node: dict(seen) for node, seen in body.seen.items()},
            "updated_channels": body.updated,
        }
        for key in body.absent:
            checkpoint.pop(key, None)
        if body.extra is not None:
            checkpoint.update(self.serde.loads_typed(body.extra))
        parent = None if body.parent is None else {"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ns,
            "checkpoint_id": cp.expand_id(body.parent)}}
        return CheckpointTuple(
            config={"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                     "checkpoint_id": checkpoint_id}},
            checkpoint=cast(Checkpoint, checkpoint),
            metadata=cast(CheckpointMetadata, metadata),
            parent_config=cast(RunnableConfig | None, parent),
            pending_writes=await self._pending_writes(thread_id, ns, checkpoint_id),
        )

    async def _pending_writes(self, thread_id: str, ns: str,
                              checkpoint_id: str) -> list[PendingWrite]:
        """The checkpoint's writes in ``writes_sort_key`` order: for each (task, index)
        the first stored, for a special channel (negative index) the last."""
        stream = cp.writes_stream(thread_id, ns, checkpoint_id)
        rows: list[StateRow] = []
        after: int | None = None
        while True:
            page = await self.store.stream_states(Kind.CHECKPOINT_WRITES, stream,
                                                  after_seq=after, limit=_PAGE,
                                                  newest_first=False)
            rows += page
            if len(page) < _PAGE:
                break
            after = page[-1].seq
        chosen: dict[tuple[str, int], tuple[str, str, Any, list[Digest]]] = {}
        for row in rows:
            body = cp.decode_writes(row.body)
            task_id = cp.expand_id(body.task_id)
            for (channel, idx, shape), refs in zip(body.writes, _split(
                    [(c, s) for c, _, s in body.writes], row.refs), strict=True):
                if idx >= 0 and (task_id, idx) in chosen:
                    continue
                chosen[(task_id, idx)] = (body.task_path, channel, shape, refs)
        order = sorted(chosen, key=lambda k: writes_sort_key(chosen[k][0], k[0], k[1]))
        values = await self._decode([(chosen[k][2], chosen[k][3]) for k in order])
        return [(k[0], chosen[k][1], v) for k, v in zip(order, values, strict=True)]

    async def _decode(self, items: Sequence[tuple[Any, Sequence[Digest]]]) -> list[Any]:
        """The values stored with these shapes and refs: leaves in one batched read, each
        chain from this saver's memory or one ``get_chain``."""
        leaves: list[Digest] = []
        heads: list[Digest] = []
        for shape, refs in items:
            for kind, ref in zip(cp.shape_kinds(shape), refs, strict=True):
                (heads if kind == Kind.VALUE_NODE else leaves).append(ref)
        found: dict[Digest, Value] = dict(zip(leaves, await self.store.get_assets(
            leaves, Value, "channel value"), strict=True)) if leaves else {}
        chains = {h: (await self._read_chain(h)).elements for h in dict.fromkeys(heads)}
        loads = self.serde.loads_typed

        def build(shape: Any, refs: Iterator[Digest]) -> Any:
            if shape == cp.LEAF:
                v = found[next(refs)]
                return loads((v.type, v.data))
            if shape == cp.CHAIN:
                return [loads((e.type, e.data)) for e in chains[next(refs)]]
            if shape[0] == "l":
                return [loads((found[d].type, found[d].data))
                        for d in [next(refs) for _ in range(shape[1])]]
            return {key: build(inner, refs) for key, inner in zip(shape[1::2], shape[2::2],
                                                                  strict=True)}

        return [build(shape, iter(refs)) for shape, refs in items]

    async def _read_chain(self, head: Digest) -> _Chain:
        chain = self._chains.get(head)
        if chain is None:
            elements = await self.store.get_chain(head, Kind.VALUE_NODE)
            (node,) = await self.store.get_assets([head], ValueNode, "value chain")
            chain = _Chain(node, cast(tuple[Value, ...], elements), None)
            self._chains.add(chain)
        return chain

    def _remember(self, row: StateRow) -> None:
        self._rows[row.id] = row
        self._rows.move_to_end(row.id)
        if len(self._rows) > 4096:
            self._rows.popitem(last=False)

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
        # Every field is checked before anything is serialized or written.
        versions = _versions("checkpoint['channel_versions']",
                             checkpoint.get("channel_versions"))
        seen = _versions_seen(checkpoint.get("versions_seen"))
        channel_values = checkpoint.get("channel_values") or {}
        if not isinstance(channel_values, Mapping):
            raise ValidationError("checkpoint['channel_values']", f"must be a mapping, got "
                                  f"{type(channel_values).__name__}", None)
        version = _int("checkpoint['v']", checkpoint.get("v", 1))
        updated = _str_list(checkpoint.get("updated_channels"))
        if not isinstance(new_versions, Mapping):
            raise ValidationError("new_versions", f"must be a mapping of channel versions, "
                                  f"got {type(new_versions).__name__}", None)
        if not isinstance(metadata, Mapping):
            raise ValidationError("metadata", f"must be a mapping, got "
                                  f"{type(metadata).__name__}", None)
        extra = self._extra(checkpoint)
        thread_id, ns, parent_id = (target.thread_id, target.checkpoint_ns,
                                    target.checkpoint_id)
        parent = await self._parent_values(thread_id, ns, parent_id)
        meta, meta_typed = self._encode_metadata(
            get_serializable_checkpoint_metadata(config, metadata))
        for attempt in range(2):
            # Attempt 2 shares nothing it has not written itself: gc removed something the
            # first one pointed at (the store refused the write, so nothing was written).
            fresh = attempt == 1
            values, refs, assets, chains = await self._encode_channels(
                versions, channel_values, new_versions, {} if fresh else parent, fresh)
            body = _encode_body("checkpoint", cp.CheckpointBody(
                checkpoint_id=cp.compact_id(checkpoint_id),
                parent=None if parent_id is None else cp.compact_id(parent_id),
                v=version, ts=cp.encode_ts(str(checkpoint.get("ts", ""))),
                versions=versions, seen=seen, updated=updated,
                values=values, metadata=meta, metadata_typed=meta_typed, extra=extra,
                absent=[k for k in _OPTIONAL_KEYS if k not in checkpoint]))
            row = _checkpoint_row(thread_id, ns, checkpoint_id, parent_id, refs, body)
            try:
                await self._commit(assets, row)
            except AssetNotFoundError:
                if fresh:
                    raise
                self._chains.clear()
                continue
            for chain in chains:
                self._chains.add(chain)
            self._remember(row)
            break
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": checkpoint_id}}

    async def _commit(self, assets: Sequence[Asset], row: StateRow) -> None:
        """Write a checkpoint. A checkpoint id stored before with other content is replaced
        (LangGraph's savers upsert it) by ``commit(replace=[id])``: the old row and the new
        one swap in one transaction (a reader finds one or the other, never neither; a put
        that fails leaves the old one), and the new row keeps the old one's place in the
        log, so the namespace's order (LangGraph's: by checkpoint id) never changes and no
        other row is touched. Concurrent re-puts of one id are serialised by the store; the
        later commit wins. A put of a new id (the usual one) is a plain commit."""
        known = self._rows.get(row.id)
        if known is None or known.digest == row.digest:
            try:
                await self.store.commit(assets, [row])
                return
            except ConflictError:
                pass
        await self.store.commit(assets, [row], replace=[row.id])

    async def _parent_values(self, thread_id: str, ns: str, parent_id: str | None
                             ) -> dict[str, tuple[Any, Any, list[Digest]]]:
        """The parent checkpoint's channels: name -> (version, shape, refs); empty when
        there is no parent or it is not stored."""
        if parent_id is None:
            return {}
        state_id = cp.checkpoint_state_id(thread_id, ns, parent_id)
        row = self._rows.get(state_id)
        if row is None:
            found = await self.store.get_states([state_id])
            if not found or found[0].kind != Kind.CHECKPOINT:
                return {}
            row = found[0]
            self._remember(row)
        body = cp.decode_checkpoint(row.body)
        return {name: (body.versions.get(name), shape, refs) for (name, shape), refs in
                zip(body.values, _split(body.values, row.refs), strict=True)}

    async def _encode_channels(
        self, versions: Mapping[str, cp.Version], channel_values: Mapping[str, Any],
        new_versions: ChannelVersions, parent: Mapping[str, tuple[Any, Any, list[Digest]]],
        fresh: bool,
    ) -> tuple[list[tuple[str, Any]], list[Digest], list[Asset], list[_Chain]]:
        """Every channel that has a value: reused from the parent when its version did not
        move, else serialized (lists as chains)."""
        shapes: list[tuple[str, Any]] = []
        refs: list[Digest] = []
        assets: list[Asset] = []
        chains: list[_Chain] = []
        for name, version in versions.items():
            known = parent.get(name)
            if name not in new_versions and known is not None and known[0] == version:
                shapes.append((name, known[1]))
                refs += known[2]
                continue
            if name not in channel_values:
                continue  # the channel is empty at this version
            encoded = await self._encode(f"channel_values[{name!r}]", channel_values[name],
                                         parent_head=(known[2][0] if known is not None
                                                      and known[1] == cp.CHAIN else None),
                                         fresh=fresh, chain=True)
            shapes.append((name, encoded.shape))
            refs += encoded.refs
            assets += encoded.assets
            if encoded.chain is not None:
                chains.append(encoded.chain)
        return shapes, refs, assets, chains

    async def _encode(self, field: str, value: Any, *, parent_head: Digest | None = None,
                      fresh: bool = False, chain: bool = False) -> _Encoded:
        """``value`` split into assets: a list as a chain (``chain``: a checkpoint's channel)
        or inline elements (a write), a dict holding lists entry by entry, else one VALUE."""
        if type(value) is list:
            items = [self._dump(f"{field}[{i}]", x) for i, x in enumerate(value)]
            if chain:
                built, added = await self._chain(parent_head, items, fresh)
                return _Encoded(cp.CHAIN, [built.head.digest], added, built)
            elements = [Value(type=t, data=d) for t, d in items]
            return _Encoded(["l", len(elements)], [e.digest for e in elements],
                            list(elements))
        if (type(value) is dict and value and all(type(k) is str for k in value)
                and any(type(v) is list for v in value.values())):
            shape: list[Any] = ["d"]
            refs: list[Digest] = []
            assets: list[Asset] = []
            for key, entry in value.items():
                inner = await self._encode(f"{field}[{key!r}]", entry)
                shape += [key, inner.shape]
                refs += inner.refs
                assets += inner.assets
            return _Encoded(shape, refs, assets)
        leaf = self._value(field, value)
        return _Encoded(cp.LEAF, [leaf.digest], [leaf])

    def _value(self, field: str, value: Any) -> Value:
        type_, data = self._dump(field, value)
        return Value(type=type_, data=data)

    def _dump(self, field: str, value: Any) -> tuple[str, bytes]:
        """The serializer's (type, bytes) of ``value``; ValidationError naming ``field``."""
        try:
            type_, data = self.serde.dumps_typed(value)
        except Exception as e:  # the serializer's own errors, of any class
            raise ValidationError(field, f"cannot be serialized: {type(e).__name__}: {e}",
                                  None) from e
        return str(type_), bytes(data)

    async def _chain(self, parent_head: Digest | None, items: list[tuple[str, bytes]],
                     fresh: bool) -> tuple[_Chain, list[Asset]]:
        """The chain holding the serialized ``items``, built on the longest prefix it shares
        with the parent's chain (or a known chain, without a parent), and the assets to
        write. Elements equal to the parent's are compared as bytes and not hashed again."""
        base: _Chain | None = None
        shared = 0
        if not fresh and parent_head is not None:
            with contextlib.suppress(AssetNotFoundError):  # swept: build without it
                base = await self._read_chain(parent_head)
                shared = _same_prefix(base.elements, items)
        values = [*(base.elements[:shared] if base is not None else ()),
                  *(Value(type=t, data=d) for t, d in items[shared:])]
        if not fresh and shared == 0 and values:
            found = self._chains.longest_prefix([v.digest for v in values])
            if found is not None:
                base, shared = found
        node, nodes = ((EMPTY_VALUES, (EMPTY_VALUES,)) if base is None
                       else await self._fork_point(base, shared))
        added = values[node.length:]
        head = node.extend(added) if added else node
        assets: list[Asset] = [*added]
        if head is not node:
            assets.append(head)
        if node.digest == EMPTY_VALUES.digest:
            assets.append(EMPTY_VALUES)
        chain = _Chain(head, tuple(values),
                       None if nodes is None else nodes if head is node else (*nodes, head))
        return chain, assets

    async def _fork_point(self, base: _Chain, shared: int
                          ) -> tuple[ValueNode, tuple[ValueNode, ...] | None]:
        """The last link of ``base`` holding at most its first ``shared`` elements (and the
        links up to it, when known)."""
        if shared == len(base.elements):
            return base.head, base.nodes
        if base.nodes is not None:
            i = bisect.bisect_right([n.length for n in base.nodes], shared) - 1
            return base.nodes[i], base.nodes[:i + 1]
        node = base.head
        for _ in range(_MAX_WALK):
            if node.length <= shared:
                return node, None
            if node.parent is None:
                break
            try:
                (node,) = await self.store.get_assets([node.parent], ValueNode, "value chain")
            except AssetNotFoundError:
                break
        return EMPTY_VALUES, (EMPTY_VALUES,)

    def _encode_metadata(self, metadata: Mapping[str, Any]
                         ) -> tuple[dict[str, Any] | None, tuple[str, bytes] | None]:
        """Metadata as plain msgpack when it reads back equal (so audits read it without
        the serializer), else as the serializer's typed bytes."""
        plain = dict(metadata)
        try:
            if msgspec.msgpack.decode(encode(plain)) == plain:
                return plain, None
        except (msgspec.EncodeError, msgspec.DecodeError, TypeError, ValueError,
                OverflowError, UnicodeEncodeError):
            pass
        return None, self._dump("metadata", plain)

    def _metadata(self, body: cp.CheckpointBody) -> dict[str, Any]:
        if body.metadata_typed is not None:
            loaded = self.serde.loads_typed(body.metadata_typed)
            return dict(loaded) if isinstance(loaded, Mapping) else {}
        return dict(body.metadata or {})

    def _extra(self, checkpoint: Mapping[str, Any]) -> tuple[str, bytes] | None:
        """Checkpoint keys without a field of their own (``pending_sends`` of LangGraph
        before 1.2, anything newer), stored as they are so that they read back exactly."""
        extra = {k: v for k, v in checkpoint.items() if k not in _KNOWN_KEYS}
        if not extra:
            return None
        for key, value in extra.items():  # name the key that cannot be stored
            self._dump(f"checkpoint[{key!r}]", value)
        return self._dump("checkpoint", extra)

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
        if isinstance(writes, str | bytes | Mapping) or not isinstance(writes, Sequence):
            raise ValidationError("writes", f"must be a sequence of (channel, value) pairs, "
                                  f"got {type(writes).__name__}", None)
        entries: list[tuple[str, int, Any]] = []
        refs: list[Digest] = []
        assets: list[Asset] = []
        for idx, write in enumerate(writes):
            if not isinstance(write, tuple | list) or len(write) != 2:
                raise ValidationError(f"writes[{idx}]", f"must be a (channel, value) pair, "
                                      f"got {_shown(write)}", None)
            channel, value = write
            if not isinstance(channel, str):
                raise ValidationError(f"writes[{idx}]", f"the channel must be a str, got "
                                      f"{channel!r}", channel)
            encoded = await self._encode(f"writes[{idx}]", value)
            entries.append((channel, WRITES_IDX_MAP.get(channel, idx), encoded.shape))
            refs += encoded.refs
            assets += encoded.assets
        if not entries:
            return
        thread_id, ns, checkpoint_id = (target.thread_id, target.checkpoint_ns,
                                        target.checkpoint_id)
        body = _encode_body("writes", cp.WritesBody(
            task_id=cp.compact_id(task_id), task_path=task_path, writes=entries))
        stream = cp.writes_stream(thread_id, ns, checkpoint_id)
        digest = stream_digest(Kind.CHECKPOINT_WRITES, stream, refs, body)
        row = StateRow(id=cp.writes_state_id(thread_id, ns, checkpoint_id, digest),
                       parent_id=cp.checkpoint_state_id(thread_id, ns, checkpoint_id),
                       kind=int(Kind.CHECKPOINT_WRITES), stream=stream, refs=tuple(refs),
                       body=body, digest=digest, created_at=datetime.now(UTC))
        await self.store.commit(assets, [row])

    # -- threads: delete, copy, prune, runs, export ------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of ``thread_id`` (rows only: ``store.gc()``
        reclaims the values nothing else uses)."""
        thread_id = cp.check_key("thread_id", thread_id, coerce=True)
        await self._delete([r.id for r in await self._thread_rows(thread_id)])

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread to another in one transaction:
        new rows, the same checkpoint ids, the same values (no asset is written)."""
        source = cp.check_key("source_thread_id", source_thread_id, coerce=True)
        target = cp.check_key("target_thread_id", target_thread_id, coerce=True)
        rows = sorted(await self._thread_rows(source), key=lambda r: r.seq)
        copies = [_rethreaded(r, target) for r in rows]
        if not copies:
            return
        try:
            await self.store.commit([], copies)
        except ConflictError as e:
            raise ValidationError("target_thread_id", f"thread {target!r} already holds "
                                  f"state {e.state_id} with other content; nothing was "
                                  "copied", target) from e

    async def aprune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep the newest checkpoint of each namespace of each thread
        and its writes, delete the rest; ``"delete"``: delete the threads. Rows only. A
        thread using a DeltaChannel is refused by keep_latest (its newest checkpoint needs
        its ancestors' writes), and then nothing is pruned."""
        threads = _thread_list("thread_ids", thread_ids)
        if strategy not in _PRUNE_STRATEGIES:
            raise ValidationError("strategy", f"must be one of {', '.join(_PRUNE_STRATEGIES)}"
                                  f", got {strategy!r}", strategy)
        doomed: list[UUID] = []
        for thread_id in threads:
            rows = await self._thread_rows(thread_id)
            if strategy == "delete":
                doomed += [r.id for r in rows]
                continue
            newest: dict[str, StateRow] = {}
            for row in rows:
                if row.kind != Kind.CHECKPOINT:
                    continue
                metadata = self._metadata(cp.decode_checkpoint(row.body))
                if any(k in metadata for k in _DELTA_KEYS):
                    raise ValidationError("strategy", f"keep_latest cannot prune thread "
                                          f"{thread_id!r}: it uses a DeltaChannel; nothing "
                                          "was pruned", strategy)
                ns = cp.parse_stream(row.kind, row.stream)[1]
                if ns not in newest or row.seq > newest[ns].seq:
                    newest[ns] = row
            kept = {r.id for r in newest.values()}
            doomed += [r.id for r in rows if r.id not in kept and r.parent_id not in kept]
        await self._delete(doomed)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is one of ``run_ids``, and their
        writes. Run ids are not indexed: this reads every checkpoint's metadata."""
        wanted = set(_thread_list("run_ids", run_ids))
        if not wanted:
            return
        doomed: list[UUID] = []
        async for row in self._scan(Kind.CHECKPOINT):
            body = cp.decode_checkpoint(row.body)
            if self._metadata(body).get("run_id") not in wanted:
                continue
            doomed.append(row.id)
            thread_id, ns, _ = cp.parse_stream(row.kind, row.stream)
            stream = cp.writes_stream(thread_id, ns, cp.expand_id(body.checkpoint_id))
            after: int | None = None
            while True:
                page = await self.store.stream_states(Kind.CHECKPOINT_WRITES, stream,
                                                      after_seq=after, limit=_PAGE)
                doomed += [w.id for w in page]
                if len(page) < _PAGE:
                    break
                after = page[-1].seq
        await self._delete(doomed)

    async def aexport(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the thread (every checkpoint and write, every namespace,
        and every value they reach) to ``path``; check it with ``immagent.verify_bundle``
        and load it anywhere with ``Store.import_states``."""
        thread_id = cp.check_key("thread_id", thread_id, coerce=True)
        rows = await self._thread_rows(thread_id)
        if not rows:
            raise ValidationError("thread_id", f"thread {thread_id!r} has no checkpoints",
                                  thread_id)
        return await self.store.export_states([r.id for r in rows], path)

    async def _thread_rows(self, thread_id: str,
                           kinds: Sequence[int] = (Kind.CHECKPOINT, Kind.CHECKPOINT_WRITES)
                           ) -> list[StateRow]:
        """Every row of ``thread_id`` of these kinds: a range scan over the thread's ids."""
        low, high = cp.thread_range(thread_id)
        rows: list[StateRow] = []
        for kind in kinds:
            after, size = low, 64
            while True:
                page = await self.store.scan_states(kind, after=after, limit=size)
                inside = [r for r in page if r.id < high]
                rows += [r for r in inside
                         if cp.parse_stream(r.kind, r.stream)[0] == thread_id]
                if len(inside) < len(page) or len(page) < size:
                    break
                after, size = page[-1].id, min(size * 4, _PAGE)
        return rows

    async def _scan(self, kind: int) -> AsyncIterator[StateRow]:
        after: UUID | None = None
        while True:
            page = await self.store.scan_states(kind, after=after, limit=_PAGE)
            for row in page:
                yield row
            if len(page) < _PAGE:
                return
            after = page[-1].id

    async def _delete(self, ids: Sequence[UUID]) -> None:
        for start in range(0, len(ids), 10_000):
            chunk = ids[start:start + 10_000]
            await self.store.delete_states(chunk)
            for i in chunk:
                self._rows.pop(i, None)

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


def _split(values: Sequence[tuple[str, Any]], refs: Sequence[Digest]) -> list[list[Digest]]:
    """``refs`` cut into each value's share, by shape."""
    out: list[list[Digest]] = []
    start = 0
    for _, shape in values:
        n = len(cp.shape_kinds(shape))
        out.append(list(refs[start:start + n]))
        start += n
    return out


def _checkpoint_key(row: StateRow) -> str:
    return cp.expand_id(cp.decode_checkpoint(row.body).checkpoint_id)


def _encode_body(field: str, body: msgspec.Struct) -> bytes:
    try:
        return encode(body)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError,
            UnicodeEncodeError) as e:
        raise ValidationError(field, f"cannot be stored: {e}", None) from e


def _int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an int, got {value!r}", value)
    return value


def _shown(value: object) -> str:
    """A short description of a rejected value for an error message."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _versions(field: str, value: object) -> dict[str, cp.Version]:
    """A map of channel versions as stored: str channel names, int, float or str versions
    (None: no channel has a version yet)."""
    if value is None:
        return {}
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
    return dict(value)


def _versions_seen(value: object) -> dict[str, dict[str, cp.Version]]:
    field = "checkpoint['versions_seen']"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a mapping of node -> channel versions, got "
                              f"{type(value).__name__}", None)
    out: dict[str, dict[str, cp.Version]] = {}
    for node, seen in value.items():
        if not isinstance(node, str):
            raise ValidationError(field, f"node names must be str, got {_shown(node)}", None)
        if not isinstance(seen, Mapping):
            raise ValidationError(f"{field}[{node!r}]", f"must be a mapping of channel "
                                  f"versions, got {type(seen).__name__}", None)
        out[node] = _versions(f"{field}[{node!r}]", seen)
    return out


def _str_list(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence | set | frozenset):
        raise ValidationError("checkpoint['updated_channels']", f"must be a list of channel "
                              f"names, got {value!r}", value)
    return [str(v) for v in value]


def _checkpoint_row(thread_id: str, ns: str, checkpoint_id: str, parent_id: str | None,
                    refs: Sequence[Digest], body: bytes) -> StateRow:
    stream = cp.checkpoint_stream(thread_id, ns)
    return StateRow(
        id=cp.checkpoint_state_id(thread_id, ns, checkpoint_id),
        parent_id=None if parent_id is None else cp.checkpoint_state_id(thread_id, ns,
                                                                        parent_id),
        kind=int(Kind.CHECKPOINT), stream=stream, refs=tuple(refs), body=body,
        digest=stream_digest(Kind.CHECKPOINT, stream, refs, body),
        created_at=datetime.now(UTC))


def _rethreaded(row: StateRow, thread_id: str) -> StateRow:
    """The copy of a checkpoint or writes row in another thread: same body and refs,
    the ids, parent and stream of that thread."""
    _, ns, checkpoint_id = cp.parse_stream(row.kind, row.stream)
    if row.kind == Kind.CHECKPOINT:
        body = cp.decode_checkpoint(row.body)
        parent = None if body.parent is None else cp.expand_id(body.parent)
        return _checkpoint_row(thread_id, ns, cp.expand_id(body.checkpoint_id), parent,
                               row.refs, row.body)
    assert checkpoint_id is not None
    stream = cp.writes_stream(thread_id, ns, checkpoint_id)
    digest = stream_digest(row.kind, stream, row.refs, row.body)
    return StateRow(id=cp.writes_state_id(thread_id, ns, checkpoint_id, digest),
                    parent_id=cp.checkpoint_state_id(thread_id, ns, checkpoint_id),
                    kind=row.kind, stream=stream, refs=row.refs, body=row.body,
                    digest=digest, created_at=datetime.now(UTC))
