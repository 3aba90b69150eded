"""Decoded-asset cache. Assets never change once written, so a cached copy is never stale.

Chains (a conversation's messages, …) are cached the way they are stored: one *segment*
per node, holding only the elements that node adds and the digest of its parent. Every
state of a lineage therefore shares its common prefix in memory (a lineage of N states of
a few messages each costs O(N) here, not O(N²)), and extending a cached chain costs one
segment. The few hottest whole histories are also kept flat, so re-reading one is O(1).
Both are bounded in bytes (elements' bodies plus pointers), not in entries: one history
of 100,000 messages must not count as one entry.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Generic, NamedTuple, TypeVar

from immagent.assets import Asset, Digest

__all__ = ["AssetCache"]

K = TypeVar("K")
V = TypeVar("V")

#: Default byte budget of cached chains (segments and flat histories together).
HISTORY_BYTES = 64 << 20
#: What a cached entry costs besides its contents (the objects, the LRU's links).
_OVERHEAD = 100
_POINTER = 8


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
    """An LRU bounded by the bytes its entries cost (given when each is put)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, cost: int) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.used -= old[1]
        if cost > self.capacity:  # would evict everything else and still not fit
            return
        self._data[key] = (value, cost)
        self.used += cost
        while self.used > self.capacity:
            _, (_, freed) = self._data.popitem(last=False)
            self.used -= freed

    def clear(self) -> None:
        self._data.clear()
        self.used = 0


class _Segment(NamedTuple):
    """One node of a cached chain: its parent node and the elements it adds."""

    parent: Digest | None
    elements: tuple[Asset, ...]


def _cost(elements: tuple[Asset, ...]) -> int:
    return _OVERHEAD + sum(_POINTER + len(e.body) for e in elements)


class AssetCache:
    """Assets by digest (weak, plus a strong LRU of recent ones) and chains by head node,
    so re-reading or extending a hot chain costs no database trip."""

    def __init__(self, recent: int = 20_000, history_bytes: int = HISTORY_BYTES) -> None:
        self._weak: weakref.WeakValueDictionary[Digest, Asset] = weakref.WeakValueDictionary()
        self._recent: _LRU[Digest, Asset] = _LRU(recent)
        # Three quarters for the shared segments, the rest for flat copies of hot heads.
        self._segments: _ByteLRU[Digest, _Segment] = _ByteLRU(history_bytes * 3 // 4)
        self._flat: _ByteLRU[Digest, tuple[Asset, ...]] = _ByteLRU(history_bytes // 4)

    @property
    def history_bytes(self) -> int:
        """Bytes the cached chains cost now (at most the budget given)."""
        return self._segments.used + self._flat.used

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
        its segments is cached."""
        flat = self._flat.get(head)
        if flat is not None:
            return flat
        parts: list[tuple[Asset, ...]] = []
        digest: Digest | None = head
        while digest is not None:
            segment = self._segments.get(digest)
            if segment is None:
                return None
            parts.append(segment.elements)
            digest = segment.parent
        elements = tuple(itertools.chain.from_iterable(reversed(parts)))
        self._flat.put(head, elements, _OVERHEAD + _POINTER * len(elements))
        return elements

    def put_segment(self, head: Digest, parent: Digest | None,
                    elements: tuple[Asset, ...]) -> None:
        """Remember that node ``head`` adds ``elements`` to the chain ending at ``parent``
        (None: ``head`` is a root). Only verified chains are put here."""
        self._segments.put(head, _Segment(parent, elements), _cost(elements))

    def put_history(self, head: Digest, elements: tuple[Asset, ...]) -> None:
        """Remember the full element list of the chain ending at ``head`` (a flat copy: its
        segments are put separately)."""
        self._flat.put(head, elements, _OVERHEAD + _POINTER * len(elements))

    def clear(self) -> None:
        """Drop everything (the next reads go to the database)."""
        self._weak.clear()
        self._recent.clear()
        self._segments.clear()
        self._flat.clear()
