"""Decoded-asset cache. Assets never change once written, so a cached copy is never stale.

Chains (a conversation's messages, …) are cached the way they are stored, as *runs*: a run
is a stretch of consecutive nodes with the elements they add and the digest of the node
before its first one (None: it starts at a root). A chain read from the database becomes
one run (one entry, however many nodes), an ``append`` on the newest node of a run extends
that run in place (append-only lists: what its older nodes see never changes) and one on
any other node starts a run of one node, and a read whose older part is already cached
adds a run of its newer nodes only. A head's history is thus a walk over the runs its
lineage forked into, not one per step (a run per append made a long-running process's
appends slow down linearly: turn 15,000 cost 9x turn 10). Every state of a lineage
therefore shares its common prefix in memory (a lineage of N states of a few
messages each costs O(N) here, not O(N²)), and extending a cached chain costs one run.
Any node of a run is a head whose history is that run's prefix up to it plus its parent's
history. The few hottest whole histories are also kept flat, so re-reading one is O(1).
Both are bounded in bytes (elements' bodies, pointers, one node's index entry each), not
in entries: one history of 100,000 messages must not count as one entry.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from typing import Generic, TypeVar, cast

from immagent.assets import Asset, ConversationNode, Digest

__all__ = ["AssetCache"]

K = TypeVar("K")
V = TypeVar("V")

#: Default byte budget of cached chains (runs and flat histories together).
HISTORY_BYTES = 64 << 20
#: What a cached entry costs besides its contents (the objects, the LRU's links).
_OVERHEAD = 100
_POINTER = 8
#: What each node of a run costs besides: its index entry and its end offset.
_NODE = 40


class _LRU(Generic[K, V]):
    """A small strong-reference LRU: keeps recently used entries alive between calls."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


class _ByteLRU(Generic[K, V]):
    """An LRU bounded by the bytes its entries cost (given when each is put); ``dropped``
    hears of every entry that leaves other than by ``clear``."""

    def __init__(self, capacity: int, dropped: Callable[[V], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self._dropped = dropped
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, cost: int) -> bool:
        """Keep ``value`` under ``key`` (False: it alone exceeds the budget, not kept)."""
        old = self._data.pop(key, None)
        if old is not None:
            self.used -= old[1]
            if self._dropped is not None:
                self._dropped(old[0])
        if cost > self.capacity:  # would evict everything else and still not fit
            return False
        self._data[key] = (value, cost)
        self.used += cost
        self._evict()
        return True

    def grow(self, key: K, extra: int) -> bool:
        """The entry under ``key`` now costs ``extra`` more (and is the most recent); older
        entries leave to make room, and so does this one if it alone no longer fits (then
        False)."""
        value, cost = self._data.pop(key)
        if cost + extra > self.capacity:
            self.used -= cost
            if self._dropped is not None:
                self._dropped(value)
            return False
        self._data[key] = (value, cost + extra)
        self.used += extra
        self._evict()
        return True

    def _evict(self) -> None:
        while self.used > self.capacity:
            _, (gone, freed) = self._data.popitem(last=False)
            self.used -= freed
            if self._dropped is not None:
                self._dropped(gone)

    def clear(self) -> None:
        self._data.clear()
        self.used = 0


class _Run:
    """Consecutive nodes of a cached chain, oldest first: ``ends[i]`` of ``elements`` are
    added by ``nodes[0..i]``; ``parent`` is the node before ``nodes[0]`` (None: a root, or
    a node without elements). The lists only ever grow at their end (an append on the
    newest node), so a prefix once read never changes. Hashed by identity: the LRU's key."""

    __slots__ = ("elements", "ends", "nodes", "parent")

    def __init__(self, parent: Digest | None, nodes: list[Digest], ends: list[int],
                 elements: list[Asset]) -> None:
        self.parent = parent
        self.nodes = nodes
        self.ends = ends
        self.elements = elements


class AssetCache:
    """Assets by digest (weak, plus a strong LRU of recent ones) and chains by head node,
    so re-reading or extending a hot chain costs no database trip."""

    def __init__(self, recent: int = 20_000, history_bytes: int = HISTORY_BYTES) -> None:
        self._weak: weakref.WeakValueDictionary[Digest, Asset] = weakref.WeakValueDictionary()
        self._recent: _LRU[Digest, Asset] = _LRU(recent)
        # Three quarters for the shared runs, the rest for flat copies of hot heads.
        self._runs: _ByteLRU[_Run, _Run] = _ByteLRU(history_bytes * 3 // 4, self._unindex)
        # Every node of a cached run: its run and its position there (two dicts, not one
        # of pairs: no tuple per node for the cyclic GC to track).
        self._owner: dict[Digest, _Run] = {}
        self._position: dict[Digest, int] = {}
        self._flat: _ByteLRU[Digest, tuple[Asset, ...]] = _ByteLRU(history_bytes // 4)

    @property
    def history_bytes(self) -> int:
        """Bytes the cached chains cost now (at most the budget given)."""
        return self._runs.used + self._flat.used

    def get(self, digest: Digest) -> Asset | None:
        """The cached asset, or None."""
        asset = self._weak.get(digest)
        if asset is not None:
            self._recent.put(digest, asset)
        return asset

    def put(self, asset: Asset) -> None:
        """Remember a decoded (and digest-checked) asset."""
        self._weak[asset.digest] = asset
        self._recent.put(asset.digest, asset)

    def history(self, head: Digest) -> tuple[Asset, ...] | None:
        """All elements of the chain ending at node ``head``, oldest first, if every one of
        its runs is cached."""
        flat = self._flat.get(head)
        if flat is not None:
            return flat
        parts = self._parts(head)
        if parts is None:
            return None
        elements = tuple(chain.from_iterable(reversed(parts)))
        self._flat.put(head, elements, _OVERHEAD + _POINTER * len(elements))
        return elements

    def _parts(self, head: Digest | None) -> list[Sequence[Asset]] | None:
        """The elements of ``head``'s history run by run, newest first (None: one is not
        cached); touches each run it uses."""
        parts: list[Sequence[Asset]] = []
        while head is not None:
            run = self._owner.get(head)
            if run is None:
                return None
            i = self._position[head]
            self._runs.get(run)
            # The whole list, not a copy, for a run's newest node: the caller flattens the
            # parts at once, before anything can extend the run.
            parts.append(run.elements if i == len(run.nodes) - 1
                         else run.elements[:run.ends[i]])
            head = run.parent
        return parts

    def put_written(self, assets: Sequence[Asset]) -> None:
        """Remember what a write committed: every asset, and every node among them as a
        segment of its parent's chain when its elements are all at hand and of its chain's
        element kind. So every client's next step (an agent's append, a session's
        add_items, a checkpoint's list) extends a cached run: O(what it adds), however long
        the chain, and a read of the new head needs no database trip."""
        for asset in assets:
            self.put(asset)
        for node in assets:
            if (not isinstance(node, ConversationNode) or node.digest in self._owner
                    or (node.parent is None and not node.messages)):  # a bare root
                continue
            elements = tuple(self.get(d) for d in node.messages)
            if any(e is None or e.kind != node.element_kind for e in elements):
                continue
            parent = node.parent
            if parent is not None:
                # A bare root (no parent, no elements) holds no history: no link to keep.
                above = self.get(parent)
                if (isinstance(above, ConversationNode) and above.parent is None
                        and not above.messages):
                    parent = None
            self.put_segment(node.digest, parent, cast("tuple[Asset, ...]", elements))

    def put_segment(self, head: Digest, parent: Digest | None,
                    elements: tuple[Asset, ...]) -> None:
        """Remember that node ``head`` adds ``elements`` to the chain ending at ``parent``
        (None: ``head`` is a root, or its parent holds no element). Only verified chains
        are put here. On the newest node of a cached run, the run grows in place: O(what
        is added), however long the chain."""
        run = None if parent is None else self._owner.get(parent)
        if head in self._owner or run is None or run.nodes[-1] != parent:
            if head not in self._owner:
                self._put(_Run(parent, [head], [len(elements)], list(elements)))
            return
        run.nodes.append(head)
        run.ends.append(run.ends[-1] + len(elements))
        run.elements.extend(elements)
        self._owner[head] = run
        self._position[head] = len(run.nodes) - 1
        # Older runs leave to make room, or this one if it alone no longer fits (the LRU's
        # drop callback then forgets its nodes, the new one included).
        self._runs.grow(run, _NODE + _POINTER * len(elements)
                        + sum(len(e.body) for e in elements))

    def put_chain(self, nodes: Sequence[Digest], ends: Sequence[int],
                  elements: tuple[Asset, ...], sizes: Sequence[int]) -> None:
        """Remember a whole verified chain, oldest node (a root) first: ``ends[i]`` of
        ``elements`` are added by ``nodes[0..i]``, whose bodies are ``sizes[i]`` bytes
        (the nodes' verified counters). Only the nodes newer than the newest one whose
        history is cached are kept, as one run on top of it, so chains sharing a prefix
        share it here."""
        cached = list(map(self._owner.__contains__, nodes))
        start = 0
        for i in range(len(nodes) - 1, -1, -1) if any(cached) else ():
            # A prefix without elements (a bare root, shared by every chain) is not worth
            # a link: it would keep whichever run holds it alive for every chain read.
            if ends[i] == 0:
                break
            if cached[i] and self._parts(nodes[i]) is not None:
                start = i + 1
                break
        if start == len(nodes):
            return
        skip, skipped = (ends[start - 1], sizes[start - 1]) if start else (0, 0)
        run = _Run(nodes[start - 1] if start else None, list(nodes[start:]),
                   [e - skip for e in ends[start:]] if skip else list(ends[start:]),
                   list(elements[skip:]))
        self._put(run, sizes[-1] - skipped)

    def _put(self, run: _Run, body_bytes: int | None = None) -> None:
        if body_bytes is None:
            body_bytes = sum(len(e.body) for e in run.elements)
        cost = (_OVERHEAD + _NODE * len(run.nodes) + _POINTER * len(run.elements)
                + body_bytes)
        if self._runs.put(run, run, cost):
            self._owner.update(zip(run.nodes, repeat(run)))
            self._position.update(zip(run.nodes, range(len(run.nodes)), strict=True))

    def _unindex(self, run: _Run) -> None:
        """A run left the LRU: forget its nodes (those a newer run has not taken over)."""
        owner, position = self._owner, self._position
        for digest in run.nodes:
            if owner.get(digest) is run:
                del owner[digest], position[digest]

    def put_history(self, head: Digest, elements: tuple[Asset, ...]) -> None:
        """Remember the full element list of the chain ending at ``head`` (a flat copy: its
        runs are put separately)."""
        self._flat.put(head, elements, _OVERHEAD + _POINTER * len(elements))

    def clear(self) -> None:
        """Drop everything (the next reads go to the database)."""
        self._weak.clear()
        self._recent.clear()
        self._runs.clear()
        self._owner.clear()
        self._position.clear()
        self._flat.clear()
