"""Decoded-asset cache. Assets never change once written, so a cached copy is never stale."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Generic, TypeVar

from immagent.assets import Asset, Digest

__all__ = ["AssetCache"]

K = TypeVar("K")
V = TypeVar("V")


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


class AssetCache:
    """Assets by digest (weak, plus a strong LRU of recent ones) and whole chains by head
    node (a conversation's messages, …), so re-reading or extending a hot chain costs no
    database trip."""

    def __init__(self, recent: int = 20_000, histories: int = 256) -> None:
        self._weak: weakref.WeakValueDictionary[Digest, Asset] = weakref.WeakValueDictionary()
        self._recent: _LRU[Digest, Asset] = _LRU(recent)
        self._histories: _LRU[Digest, tuple[Asset, ...]] = _LRU(histories)

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
        """All elements of the chain ending at node ``head``, oldest first, if cached."""
        return self._histories.get(head)

    def put_history(self, head: Digest, elements: tuple[Asset, ...]) -> None:
        """Remember the full element list of the chain ending at ``head``."""
        self._histories.put(head, elements)

    def clear(self) -> None:
        """Drop everything (the next reads go to the database)."""
        self._weak.clear()
        self._recent.clear()
        self._histories.clear()
