"""The checkpoint client: LangGraph checkpoints as immutable rows of the event log.

The store-side half of ``immagent.integrations.langgraph.ImmAgentSaver``: it imports no
LangGraph (the adapter parses configs, assembles ``CheckpointTuple``s and bridges the sync
API), so the log, gc and verify understand checkpoints without it. It is written only
through the log's API (``commit``, ``get_states``, ``stream_states``, ``scan_states``,
``get_chain``, ``delete_states``); the serializer (LangGraph's ``serde``) is passed in. The
stored form is in ``immagent.checkpoints``; in short:

* **A checkpoint is one immutable state row** (kind CHECKPOINT) whose id is derived from
  (thread, namespace, checkpoint id): a read by checkpoint id is one primary-key probe, the
  newest checkpoint of a namespace one index probe on its stream. Its refs are the digests
  of its channel values (so gc keeps them), its body the rest (versions, metadata as the
  serializer's typed bytes). Its digest pins the whole checkpoint: every channel value
  through the Merkle refs.
* **Channel values are content-addressed assets**: a VALUE is the serializer's
  ``dumps_typed`` (type, bytes), hashed, so an unchanged value is never stored twice. A
  channel whose version did not move reuses the parent checkpoint's digest without
  serializing anything (the rule LangGraph's own savers follow for their blobs).
* **A list channel is a hash chain** of per-element VALUEs (VALUE_NODE links, read with
  ``get_chain``). The new chain is built from the longest common prefix with the parent
  checkpoint's chain, so a step that appends adds only the appended elements, and
  ``add_messages`` replacing or removing elements costs what changed. A put on a thread
  with no parent (``update_state`` into a new thread) reuses a chain this client has seen
  with the same prefix. Forks (a replay from a checkpoint id, ``copy_thread``) share every
  asset.
* **Pending writes** are rows of kind CHECKPOINT_WRITES, one per ``put_writes`` call,
  pinning their values (lists and dicts of lists element by element, so a message written
  by a node is the same asset as that message in the channel). Rows are never changed: a
  repeated write is one row (its id hashes its content); for a (task, index) the first
  write wins, for a special channel (errors, interrupts) the last, as in LangGraph's savers.

Deleting (``delete_thread``, ``prune``, ``delete_for_runs``) deletes rows only; ``gc()``
reclaims the assets nothing reaches any more. A put that points at an asset gc removed
meanwhile (its thread was deleted) fails the log's "what a write points at must exist"
check, and the put is then written again with every value included.

Ordering: a namespace's checkpoints are listed in the order they were stored, which is
checkpoint-id order for everything LangGraph writes (a thread's checkpoints are put one
after another, ids are time-ordered; ``copy_thread`` and bundle imports keep the order).
Listing the whole store or every namespace of a thread sorts by checkpoint id.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol, cast
from uuid import UUID

import msgspec

from immagent import checkpoints as cp
from immagent.assets import EMPTY_VALUES, Asset, Digest, Kind, Value, ValueNode, encode
from immagent.audit.bundle import BundleInfo
from immagent.exceptions import (
    AssetNotFoundError,
    ConflictError,
    ValidationError,
)
from immagent.records import StateRow, stream_digest
from immagent.store.log import EventLog

__all__ = ["ChannelHistory", "CheckpointLog", "Serde", "Snapshot"]

#: Checkpoint keys with a field of their own in the stored body.
_KNOWN_KEYS: Final = frozenset({"v", "id", "ts", "channel_values", "channel_versions",
                                "versions_seen", "updated_channels"})
#: Known keys a checkpoint may lack (and then reads back without).
_OPTIONAL_KEYS: Final = ("versions_seen", "updated_channels")
#: Metadata keys LangGraph's DeltaChannel leaves; the first names the delta channels.
_DELTA_KEYS: Final = cp.DELTA_KEYS
_DELTA_COUNTERS: Final = _DELTA_KEYS[0]
_PRUNE_STRATEGIES: Final = ("keep_latest", "delete")
_PAGE: Final = 1000
#: How far back a chain is walked, link by link, to find where a shortened list forks.
_MAX_WALK: Final = 64
#: Shapes stored as one VALUE_NODE chain.
_CHAINS: Final = (cp.CHAIN, cp.SNAPSHOT)
#: Ancestors read per lineage query when a walk leaves this client's memory.
_LINEAGE_PAGE: Final = 64
#: How far back a new snapshot looks for the one before it (LangGraph snapshots a delta
#: channel at least every 5000 steps).
_MAX_SEED_WALK: Final = 10_000
#: Checkpoints whose writes a history reads at once.
_PARALLEL_READS: Final = 8


class Serde(Protocol):
    """The serializer values are stored with (LangGraph's ``SerializerProtocol`` is one):
    ``(type tag, bytes)`` out, the value back."""

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]: ...

    def loads_typed(self, data: tuple[str, bytes]) -> Any: ...


# -- chains this client has written or read -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chain:
    """A value chain as this client knows it: its head, every element, and (when this client
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


class Snapshot(NamedTuple):
    """A snapshot of a list channel (LangGraph's ``DeltaChannel`` stores one every so many
    updates; the adapter hands it over as this). Stored as a chain (shape ``SNAPSHOT``), so
    it shares every element and link with the snapshot before it and with the writes that
    added them, and read back as this."""

    value: list[Any]


@dataclass(slots=True)
class ChannelHistory:
    """What one channel needs to be rebuilt at a checkpoint: the writes of every ancestor
    from the nearest one that stores a value for it (the seed, included) to the parent,
    oldest checkpoint first, each checkpoint's writes as (task path, task id, index,
    value) in the order stored; and that value (``seeded`` False: the walk reached the root
    or a deleted parent without one)."""

    writes: list[list[tuple[str, str, int, Any]]]
    seeded: bool = False
    seed: Any = None



# -- the client -----------------------------------------------------------------------------


class CheckpointLog:
    """LangGraph checkpoints and their pending writes over an ``EventLog``, serialized with
    ``serde`` (see the module docstring). Arguments are checked by the caller (the
    adapter parses LangGraph's configs); values are checked here as they are serialized."""

    def __init__(self, log: EventLog, serde: Serde) -> None:
        self.log = log
        self.serde = serde
        self._chains = _Chains()
        # Checkpoint rows recently written or read, by state id: the parent of the next put
        # is almost always here. Rows are immutable; a deleted one is only ever used as a
        # parent, and the log's write check catches a value gc removed since.
        self._rows: OrderedDict[UUID, StateRow] = OrderedDict()

    def with_serde(self, serde: Serde) -> CheckpointLog:
        """This client with another serializer, sharing its caches (values and rows are
        immutable, so the caches hold for every serializer)."""
        clone = copy.copy(self)
        clone.serde = serde
        return clone

    # -- reads ------------------------------------------------------------------------------

    async def find(self, thread_id: str, ns: str, checkpoint_id: str | None
                   ) -> StateRow | None:
        """The checkpoint row of ``checkpoint_id`` in the thread's namespace ``ns`` (None:
        the newest); None when there is none."""
        stream = cp.checkpoint_stream(thread_id, ns)
        if checkpoint_id is None:
            page = await self.log.stream_states(Kind.CHECKPOINT, stream, limit=1)
            row = page[0] if page else None
        else:
            state_id = cp.checkpoint_state_id(thread_id, ns, checkpoint_id)
            found = await self.log.get_states([state_id])
            row = found[0] if found else None
            if row is not None and (row.kind != Kind.CHECKPOINT or row.stream != stream
                                    or cp.expand_id(cp.decode_checkpoint(row.body)
                                                    .checkpoint_id) != checkpoint_id):
                row = None  # a 122-bit hash collision, or a damaged row: not this one
        if row is not None:
            self.remember(row)
        return row

    async def listed(self, thread_id: str | None, checkpoint_ns: str | None,
                     checkpoint_id: str | None, before_id: str | None
                     ) -> AsyncIterator[StateRow]:
        """The checkpoint rows a listing walks, newest first, before filtering: of the
        whole store (``thread_id`` None), of every namespace of a thread (``checkpoint_ns``
        None), or of one namespace; only ``checkpoint_id`` when given. ``before_id`` starts
        a namespace's walk at that checkpoint when it is stored."""
        if thread_id is None:
            rows = [r async for r in self._scan(Kind.CHECKPOINT)]
            for row in sorted(rows, key=_checkpoint_key, reverse=True):
                yield row
            return
        if checkpoint_ns is None:  # every namespace of the thread
            rows = await self._thread_rows(thread_id, (Kind.CHECKPOINT,))
            for row in sorted(rows, key=_checkpoint_key, reverse=True):
                if checkpoint_id is None or _checkpoint_key(row) == checkpoint_id:
                    yield row
            return
        if checkpoint_id is not None:
            found_row = await self.find(thread_id, checkpoint_ns, checkpoint_id)
            if found_row is not None:
                yield found_row
            return
        stream = cp.checkpoint_stream(thread_id, checkpoint_ns)
        after: int | None = None
        if before_id is not None:  # start at the cursor when it is stored: one probe
            found = await self.log.get_states([cp.checkpoint_state_id(
                thread_id, checkpoint_ns, before_id)])
            if found and found[0].stream == stream:
                after = found[0].seq
        while True:
            page = await self.log.stream_states(Kind.CHECKPOINT, stream, after_seq=after,
                                                  limit=_PAGE)
            for row in page:
                yield row
            if len(page) < _PAGE:
                return
            after = page[-1].seq

    async def channel_values(self, row: StateRow, body: cp.CheckpointBody) -> dict[str, Any]:
        """The channel values of a checkpoint row (its decoded ``body``), deserialized."""
        self.remember(row)
        values = await self._decode([(shape, refs) for (_, shape), refs in
                                     zip(body.values, _split(body.values, row.refs),
                                         strict=True)])
        return {name: value for (name, _), value in zip(body.values, values, strict=True)}

    async def pending_writes(self, thread_id: str, ns: str, checkpoint_id: str
                             ) -> list[tuple[str, str, int, str, Any]]:
        """The checkpoint's writes as (task path, task id, index, channel, value): for each
        (task, index) the first stored, for a special channel (negative index) the last;
        in the order they were first stored (LangGraph's adapter sorts them its way)."""
        chosen = await self._chosen_writes(thread_id, ns, checkpoint_id)
        values = await self._decode([(shape, refs) for *_, shape, refs in chosen])
        return [(path, task_id, idx, channel, v) for (path, task_id, idx, channel, _, _), v
                in zip(chosen, values, strict=True)]

    async def _chosen_writes(self, thread_id: str, ns: str, checkpoint_id: str
                             ) -> list[tuple[str, str, int, str, Any, list[Digest]]]:
        """``pending_writes`` before decoding: (path, task id, index, channel, shape, refs)."""
        stream = cp.writes_stream(thread_id, ns, checkpoint_id)
        rows: list[StateRow] = []
        after: int | None = None
        while True:
            page = await self.log.stream_states(Kind.CHECKPOINT_WRITES, stream,
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
        return [(path, task_id, idx, channel, shape, refs)
                for (task_id, idx), (path, channel, shape, refs) in chosen.items()]

    async def _decode(self, items: Sequence[tuple[Any, Sequence[Digest]]]) -> list[Any]:
        """The values stored with these shapes and refs: leaves in one batched read, each
        chain from this saver's memory or one ``get_chain``."""
        leaves: list[Digest] = []
        heads: list[Digest] = []
        for shape, refs in items:
            for kind, ref in zip(cp.shape_kinds(shape), refs, strict=True):
                (heads if kind == Kind.VALUE_NODE else leaves).append(ref)
        found: dict[Digest, Value] = dict(zip(leaves, await self.log.get_assets(
            leaves, Value, "channel value"), strict=True)) if leaves else {}
        chains = {h: (await self._read_chain(h)).elements for h in dict.fromkeys(heads)}
        loads = self.serde.loads_typed

        def build(shape: Any, refs: Iterator[Digest]) -> Any:
            if shape == cp.LEAF:
                v = found[next(refs)]
                return loads((v.type, v.data))
            if shape == cp.CHAIN:
                return [loads((e.type, e.data)) for e in chains[next(refs)]]
            if shape == cp.SNAPSHOT:
                return Snapshot([loads((e.type, e.data)) for e in chains[next(refs)]])
            if shape[0] == "l":
                return [loads((found[d].type, found[d].data))
                        for d in [next(refs) for _ in range(shape[1])]]
            return {key: build(inner, refs) for key, inner in zip(shape[1::2], shape[2::2],
                                                                  strict=True)}

        return [build(shape, iter(refs)) for shape, refs in items]

    async def _read_chain(self, head: Digest) -> _Chain:
        chain = self._chains.get(head)
        if chain is None:
            elements = await self.log.get_chain(head, Kind.VALUE_NODE)
            (node,) = await self.log.get_assets([head], ValueNode, "value chain")
            chain = _Chain(node, cast(tuple[Value, ...], elements), None)
            self._chains.add(chain)
        return chain

    def remember(self, row: StateRow) -> None:
        """Keep a checkpoint row read or written here (the parent of the next put is almost
        always one of them)."""
        self._rows[row.id] = row
        self._rows.move_to_end(row.id)
        if len(self._rows) > 4096:
            self._rows.popitem(last=False)

    # -- writes -----------------------------------------------------------------------------

    async def put(self, thread_id: str, ns: str, checkpoint_id: str, parent_id: str | None,
                  checkpoint: Mapping[str, Any], metadata: Mapping[str, Any],
                  new_versions: Mapping[str, Any]) -> None:
        """Store ``checkpoint`` (LangGraph's dict) as the child of ``parent_id``: one state
        row, plus the values it does not share with what is stored (one transaction)."""
        at = await self._parent_row(thread_id, ns, parent_id)
        parent = {} if at is None else _channels(at)
        meta, meta_typed = self._encode_metadata(metadata)
        for attempt in range(2):
            # Attempt 2 shares nothing it has not written itself: gc removed something the
            # first one pointed at (the store refused the write, so nothing was written).
            fresh = attempt == 1
            values, refs, assets, chains = await self._encode_channels(
                checkpoint, new_versions, {} if fresh else parent, fresh, at)
            body = _encode_body("checkpoint", cp.CheckpointBody(
                checkpoint_id=cp.compact_id(checkpoint_id),
                parent=None if parent_id is None else cp.compact_id(parent_id),
                v=_int("checkpoint['v']", checkpoint.get("v", 1)),
                ts=cp.encode_ts(str(checkpoint.get("ts", ""))),
                versions=dict(checkpoint.get("channel_versions") or {}),
                seen={k: dict(v) for k, v in (checkpoint.get("versions_seen") or {}).items()},
                updated=_str_list(checkpoint.get("updated_channels")),
                values=values, metadata=meta, metadata_typed=meta_typed,
                extra=self._extra(checkpoint),
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
            self.remember(row)
            break

    async def _commit(self, assets: Sequence[Asset], row: StateRow) -> None:
        """Write a checkpoint. A checkpoint id stored before with other content is replaced
        (LangGraph's savers upsert it) by ``commit(replace=[id])``: the old row and the new
        one swap in one transaction (a reader finds one or the other, never neither; a put
        that fails leaves the old one), and the new row keeps the old one's place in the
        log, so the namespace's order (LangGraph's: by checkpoint id) never changes and no
        other row is touched. Concurrent re-puts of one id are serialised by the log; the
        later commit wins. A put of a new id (the usual one) is a plain commit."""
        known = self._rows.get(row.id)
        if known is None or known.digest == row.digest:
            try:
                await self.log.commit(assets, [row])
                return
            except ConflictError:
                pass
        await self.log.commit(assets, [row], replace=[row.id])

    async def _parent_row(self, thread_id: str, ns: str, parent_id: str | None
                          ) -> StateRow | None:
        """The parent checkpoint's row; None when there is no parent or it is not stored."""
        if parent_id is None:
            return None
        state_id = cp.checkpoint_state_id(thread_id, ns, parent_id)
        row = self._rows.get(state_id)
        if row is None:
            found = await self.log.get_states([state_id])
            if not found or found[0].kind != Kind.CHECKPOINT:
                return None
            row = found[0]
            self.remember(row)
        return row

    async def _ancestors(self, row: StateRow) -> AsyncIterator[StateRow]:
        """The checkpoint rows above ``row``, its parent first, along parent links (never
        list order: a fork sees its own branch only), to the root or a deleted parent:
        from this client's memory, else a page of the log's lineage walk at a time."""
        stream = row.stream
        parent = row.parent_id
        while parent is not None:
            known = self._rows.get(parent)
            page = [known] if known is not None else await self.log.state_lineage(
                parent, limit=_LINEAGE_PAGE)
            if not page:
                return
            for above in page:
                if above.kind != Kind.CHECKPOINT or above.stream != stream:
                    return  # not a checkpoint of this namespace: damage, or an id collision
                self.remember(above)
                yield above
            parent = page[-1].parent_id

    async def _stored_head(self, at: StateRow, name: str) -> Digest | None:
        """The chain head of channel ``name`` at ``at`` or its nearest ancestor storing a
        value for it (None: none within reach, or not a chain)."""
        walked = 0
        rows = _chain_rows(at, self._ancestors(at))
        async for row in rows:
            for (channel, shape), refs in _channels_and_refs(row):
                if channel == name:
                    return refs[0] if shape in _CHAINS else None
            walked += 1
            if walked >= _MAX_SEED_WALK:
                return None
        return None

    async def delta_history(self, thread_id: str, ns: str, checkpoint_id: str | None,
                            channels: Sequence[str]) -> dict[str, ChannelHistory]:
        """What ``channels`` need to be rebuilt at a checkpoint (None: the newest of the
        namespace): for each, the writes of its ancestors back to the nearest one storing a
        value for it, and that value (LangGraph's ``get_delta_channel_history``). The walk
        follows parent links, so a fork never sees the writes of the branch it left; the
        checkpoint's own writes are pending for its next step and are not included."""
        history = {name: ChannelHistory([]) for name in channels}
        target = await self.find(thread_id, ns, checkpoint_id)
        if target is None or not channels:
            return history
        path = await self._seed_path(target, set(channels))
        rows = [row for row, _, _ in path]
        stored = await self._writes_of(thread_id, ns, rows)
        wanted: list[tuple[str, int, Any, Sequence[Digest]]] = []
        places: list[tuple[str, int, str, str, int]] = []
        seeds: list[tuple[str, Any, Sequence[Digest]]] = []
        for step, ((row, serves, seeded), entries) in enumerate(zip(path, stored,
                                                                    strict=True)):
            for path_, task_id, idx, channel, shape, refs in entries:
                if channel in serves:
                    wanted.append((channel, step, shape, refs))
                    places.append((channel, step, path_, task_id, idx))
            for (channel, shape), refs in _channels_and_refs(row):
                if channel in seeded:
                    seeds.append((channel, shape, refs))
        values = await self._decode([(shape, refs) for _, _, shape, refs in wanted]
                                    + [(shape, refs) for _, shape, refs in seeds])
        steps = len(path)
        groups: dict[str, list[list[tuple[str, str, int, Any]]]] = {
            name: [[] for _ in range(steps)] for name in channels}
        for (channel, step, path_, task_id, idx), value in zip(places, values[:len(wanted)],
                                                                 strict=True):
            groups[channel][step].append((path_, task_id, idx, value))
        for (channel, _, _), value in zip(seeds, values[len(wanted):], strict=True):
            history[channel].seeded, history[channel].seed = True, value
        for name in channels:
            history[name].writes = [g for g in reversed(groups[name]) if g]
        return history

    async def _seed_path(self, target: StateRow, channels: set[str]
                         ) -> list[tuple[StateRow, frozenset[str], frozenset[str]]]:
        """The ancestors of ``target`` whose writes rebuild ``channels``, parent first, up
        to the nearest one storing a value for each: (row, the channels its writes serve,
        the channels it seeds)."""
        path: list[tuple[StateRow, frozenset[str], frozenset[str]]] = []
        remaining = set(channels)
        async for row in self._ancestors(target):
            names = {channel for channel, _ in cp.decode_checkpoint(row.body).values}
            seeded = frozenset(remaining & names)
            path.append((row, frozenset(remaining), seeded))
            remaining -= seeded
            if not remaining:
                break
        return path

    async def _writes_of(self, thread_id: str, ns: str, rows: Sequence[StateRow]
                         ) -> list[list[tuple[str, str, int, str, Any, list[Digest]]]]:
        """Each checkpoint's chosen writes, undecoded, read a few checkpoints at a time."""
        gate = asyncio.Semaphore(_PARALLEL_READS)

        async def one(row: StateRow) -> list[tuple[str, str, int, str, Any, list[Digest]]]:
            checkpoint_id = cp.expand_id(cp.decode_checkpoint(row.body).checkpoint_id)
            async with gate:
                return await self._chosen_writes(thread_id, ns, checkpoint_id)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    async def _encode_channels(
        self, checkpoint: Mapping[str, Any], new_versions: Mapping[str, Any],
        parent: Mapping[str, tuple[Any, Any, list[Digest]]], fresh: bool,
        at: StateRow | None,
    ) -> tuple[list[tuple[str, Any]], list[Digest], list[Asset], list[_Chain]]:
        """Every channel that has a value: reused from the parent when its version did not
        move, else serialized (lists as chains)."""
        versions = checkpoint.get("channel_versions") or {}
        channel_values = checkpoint.get("channel_values") or {}
        if not isinstance(versions, Mapping) or not isinstance(channel_values, Mapping):
            raise ValidationError("checkpoint", "channel_versions and channel_values must "
                                  "be mappings", None)
        shapes: list[tuple[str, Any]] = []
        refs: list[Digest] = []
        assets: list[Asset] = []
        chains: list[_Chain] = []
        for name, version in versions.items():
            if not isinstance(name, str):
                raise ValidationError("checkpoint['channel_versions']", f"channel names "
                                      f"must be str, got {name!r}", name)
            known = parent.get(name)
            if name not in new_versions and known is not None and known[0] == version:
                shapes.append((name, known[1]))
                refs += known[2]
                continue
            if name not in channel_values:
                continue  # the channel is empty at this version
            value = channel_values[name]
            head = known[2][0] if known is not None and known[1] in _CHAINS else None
            if head is None and type(value) is Snapshot and not fresh and at is not None:
                # A delta channel's snapshot: its last one is on an older ancestor (the
                # checkpoints between hold no value for it); build on that chain.
                head = await self._stored_head(at, name)
            encoded = await self._encode(f"channel_values[{name!r}]", value,
                                         parent_head=head, fresh=fresh, chain=True)
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
        if chain and type(value) is Snapshot and type(value.value) is list:
            items = [self._dump(f"{field}[{i}]", x) for i, x in enumerate(value.value)]
            built, added = await self._chain(parent_head, items, fresh)
            return _Encoded(cp.SNAPSHOT, [built.head.digest], added, built)
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
                (node,) = await self.log.get_assets([node.parent], ValueNode, "value chain")
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

    def metadata(self, body: cp.CheckpointBody) -> dict[str, Any]:
        """A checkpoint's metadata, deserialized."""
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

    def extra(self, body: cp.CheckpointBody) -> dict[str, Any]:
        """The checkpoint keys stored without a field of their own (see ``_extra``)."""
        return {} if body.extra is None else dict(self.serde.loads_typed(body.extra))

    async def put_writes(self, thread_id: str, ns: str, checkpoint_id: str, task_id: str,
                         task_path: str, writes: Sequence[tuple[str, Any]],
                         special: Mapping[str, int]) -> None:
        """Store the writes of task ``task_id`` on a checkpoint (which may be written after
        them: LangGraph saves both in the background). A write to a channel in ``special``
        takes that index (negative: the last such write wins), the others their position."""
        entries: list[tuple[str, int, Any]] = []
        refs: list[Digest] = []
        assets: list[Asset] = []
        for idx, write in enumerate(writes):
            channel, value = write
            if not isinstance(channel, str):
                raise ValidationError(f"writes[{idx}]", f"the channel must be a str, got "
                                      f"{channel!r}", channel)
            encoded = await self._encode(f"writes[{idx}]", value)
            entries.append((channel, special.get(channel, idx), encoded.shape))
            refs += encoded.refs
            assets += encoded.assets
        if not entries:
            return
        body = _encode_body("writes", cp.WritesBody(
            task_id=cp.compact_id(task_id), task_path=task_path, writes=entries))
        stream = cp.writes_stream(thread_id, ns, checkpoint_id)
        digest = stream_digest(Kind.CHECKPOINT_WRITES, stream, refs, body)
        row = StateRow(id=cp.writes_state_id(thread_id, ns, checkpoint_id, digest),
                       parent_id=cp.checkpoint_state_id(thread_id, ns, checkpoint_id),
                       kind=int(Kind.CHECKPOINT_WRITES), stream=stream, refs=tuple(refs),
                       body=body, digest=digest, created_at=datetime.now(UTC))
        await self.log.commit(assets, [row])

    # -- threads: delete, copy, prune, runs, export ------------------------------------------

    async def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of ``thread_id`` (rows only: ``gc()`` reclaims
        the values nothing else uses)."""
        await self._delete([r.id for r in await self._thread_rows(thread_id)])

    async def copy_thread(self, source: str, target: str) -> None:
        """Copy every checkpoint and write of one thread to another in one transaction:
        new rows, the same checkpoint ids, the same values (no asset is written)."""
        rows = sorted(await self._thread_rows(source), key=lambda r: r.seq)
        copies = [_rethreaded(r, target) for r in rows]
        if not copies:
            return
        try:
            await self.log.commit([], copies)
        except ConflictError as e:
            raise ValidationError("target_thread_id", f"thread {target!r} already holds "
                                  f"state {e.state_id} with other content; nothing was "
                                  "copied", target) from e

    async def prune(self, threads: Sequence[str], strategy: str) -> None:
        """``"keep_latest"``: keep the newest checkpoint of each namespace of each thread,
        the ancestors its delta channels are rebuilt from (see ``_kept_for``) and the
        writes of every kept checkpoint, delete the rest; ``"delete"``: delete the threads.
        Rows only."""
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
                ns = cp.parse_stream(row.kind, row.stream)[1]
                if ns not in newest or row.seq > newest[ns].seq:
                    newest[ns] = row
            kept: set[UUID] = set()
            for row in newest.values():
                kept |= await self._kept_for(row)
            doomed += [r.id for r in rows if r.id not in kept
                       and not (r.kind == Kind.CHECKPOINT_WRITES and r.parent_id in kept)]
        await self._delete(doomed)

    async def _kept_for(self, newest: StateRow) -> set[UUID]:
        """The checkpoints ``keep_latest`` keeps for a namespace's newest one: itself and,
        when it uses delta channels (their names are the keys of LangGraph's
        ``counters_since_delta_snapshot`` metadata), every ancestor whose writes rebuild
        them, up to the nearest that stores a value for each (their seed). Deleting those
        would leave the newest checkpoint's channels silently empty. Metadata that marks a
        delta thread without naming its channels keeps the whole branch."""
        body = cp.decode_checkpoint(newest.body)
        metadata = self.metadata(body)
        counters = metadata.get(_DELTA_COUNTERS)
        if isinstance(counters, Mapping):
            stored = {channel for channel, _ in body.values}
            channels = {str(c) for c in counters} - stored
            if not channels:
                return {newest.id}
            return {newest.id, *(row.id for row, _, _ in
                                 await self._seed_path(newest, channels))}
        if any(k in metadata for k in _DELTA_KEYS):
            return {newest.id, *[row.id async for row in self._ancestors(newest)]}
        return {newest.id}

    async def delete_for_runs(self, wanted: set[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is in ``wanted``, and their
        writes. Run ids are not indexed: this reads every checkpoint's metadata."""
        if not wanted:
            return
        doomed: list[UUID] = []
        async for row in self._scan(Kind.CHECKPOINT):
            body = cp.decode_checkpoint(row.body)
            if self.metadata(body).get("run_id") not in wanted:
                continue
            doomed.append(row.id)
            thread_id, ns, _ = cp.parse_stream(row.kind, row.stream)
            stream = cp.writes_stream(thread_id, ns, cp.expand_id(body.checkpoint_id))
            after: int | None = None
            while True:
                page = await self.log.stream_states(Kind.CHECKPOINT_WRITES, stream,
                                                      after_seq=after, limit=_PAGE)
                doomed += [w.id for w in page]
                if len(page) < _PAGE:
                    break
                after = page[-1].seq
        await self._delete(doomed)

    async def export(self, thread_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the thread (every checkpoint and write, every namespace,
        and every value they reach) to ``path``."""
        rows = await self._thread_rows(thread_id)
        if not rows:
            raise ValidationError("thread_id", f"thread {thread_id!r} has no checkpoints",
                                  thread_id)
        return await self.log.export_states([r.id for r in rows], path)

    async def _thread_rows(self, thread_id: str,
                           kinds: Sequence[int] = (Kind.CHECKPOINT, Kind.CHECKPOINT_WRITES)
                           ) -> list[StateRow]:
        """Every row of ``thread_id`` of these kinds: a range scan over the thread's ids."""
        low, high = cp.thread_range(thread_id)
        rows: list[StateRow] = []
        for kind in kinds:
            after, size = low, 64
            while True:
                page = await self.log.scan_states(kind, after=after, limit=size)
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
            page = await self.log.scan_states(kind, after=after, limit=_PAGE)
            for row in page:
                yield row
            if len(page) < _PAGE:
                return
            after = page[-1].id

    async def _delete(self, ids: Sequence[UUID]) -> None:
        for start in range(0, len(ids), 10_000):
            chunk = ids[start:start + 10_000]
            await self.log.delete_states(chunk)
            for i in chunk:
                self._rows.pop(i, None)


# -- helpers --------------------------------------------------------------------------------


def _split(values: Sequence[tuple[str, Any]], refs: Sequence[Digest]) -> list[list[Digest]]:
    """``refs`` cut into each value's share, by shape."""
    out: list[list[Digest]] = []
    start = 0
    for _, shape in values:
        n = len(cp.shape_kinds(shape))
        out.append(list(refs[start:start + n]))
        start += n
    return out


def _channels_and_refs(row: StateRow) -> list[tuple[tuple[str, Any], list[Digest]]]:
    """A checkpoint row's ((channel, shape), refs) per stored channel value."""
    body = cp.decode_checkpoint(row.body)
    return list(zip(body.values, _split(body.values, row.refs), strict=True))


def _channels(row: StateRow) -> dict[str, tuple[Any, Any, list[Digest]]]:
    """A checkpoint row's channels: name -> (version, shape, refs)."""
    versions = cp.decode_checkpoint(row.body).versions
    return {name: (versions.get(name), shape, refs)
            for (name, shape), refs in _channels_and_refs(row)}


async def _chain_rows(first: StateRow, rest: AsyncIterator[StateRow]
                      ) -> AsyncIterator[StateRow]:
    yield first
    async for row in rest:
        yield row


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
