"""Schema 2 -> 3: chain nodes move out of the asset table into runs, with their elements.

Shared by the SQL backends, which run it inside their migration transaction (one
transaction: a crash leaves the version-2 store untouched) and supply the rows; nothing
here runs SQL. No digest changes: a version-2 node keeps its bytes (its fields have no
accumulator root or span hash; reads and audits accept such *legacy* nodes), so every
state, bundle and recorded digest stays valid. What changes is where things are:

1. ``plan_runs``: the nodes form a forest (each names its parent); it is laid out in runs,
   breadth first over runs so a run's parent run always has the smaller id: a run goes on
   with a node's first child, every other child starts a run of its own.
2. ``Records``: each node's record (its fields, its elements' canonical bodies inline up
   to ``chains.INLINE_MAX``, larger ones kept as assets and named in ``refs``), compressed
   with the store's newest dictionary; the accumulator's peaks are computed along the way
   (from the element digests the version-2 refs list: no hashing of bodies) and kept
   beside every span-depth node, so the first append after the migration need not read
   its history.
3. The backend then deletes the node rows from the asset table, and the element rows that
   are now held inline only (an element a state points at, or that some node keeps out of
   line, stays).

Memory: every node's digest and parent (about 200 bytes a node), one batch of bodies, and
the peaks at fork points.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import msgspec

from immagent import accumulator, chains, codec
from immagent.assets import Dictionary, Digest, Kind
from immagent.exceptions import IntegrityError
from immagent.store.layout import LOC_OFFSET as _OFFSET
from immagent.store.layout import LOC_SHIFT as _SHIFT

__all__ = ["BATCH", "NodeColumns", "Planned", "Records", "Run", "dictionaries_from",
           "plan_runs"]

#: Nodes migrated per batch (their elements are read in one statement).
BATCH = 500


class Planned(NamedTuple):
    """Where a node goes: its loc, depth and parent (None for a root)."""

    digest: Digest
    loc: int
    depth: int
    parent: Digest | None


class NodeColumns(NamedTuple):
    """A version-3 node row, in the tables' column order."""

    loc: int
    kind: int
    codec: int
    added: int  # the count column: how many elements the node adds
    depth: int | None  # a run's first row only
    digest: Digest
    parent: Digest | None  # a run's first row only (None too for a root)
    refs: bytes
    peaks: bytes | None
    body: bytes


class Run(NamedTuple):
    """A run: its id, the depth of its first node, the loc and digest of the node it hangs
    from (None for a root, or for an orphan whose parent is not stored)."""

    run: int
    depth: int
    parent: int | None
    parent_digest: Digest | None


def plan_runs(links: Mapping[Digest, Digest | None]) -> tuple[list[Planned], list[Run]]:
    """The layout of the nodes ``links`` describes (digest -> parent digest): nodes in loc
    order and the runs. A node whose parent is not among them (a damaged store) starts a
    run of its own at depth 1 that names the missing parent, so reads report it."""
    children: dict[Digest, list[Digest]] = collections.defaultdict(list)
    starts: collections.deque[tuple[Digest, int | None, Digest | None, int]] = (
        collections.deque())
    for digest, parent in links.items():
        if parent is None:
            starts.append((digest, None, None, 0))
        elif parent not in links:
            starts.append((digest, None, parent, 1))
        else:
            children[parent].append(digest)
    planned: list[Planned] = []
    runs: list[Run] = []
    while starts:
        first, parent_loc, parent_digest, depth = starts.popleft()
        run = len(runs) + 1
        runs.append(Run(run, depth, parent_loc, parent_digest))
        node: Digest | None = first
        parent = parent_digest
        offset = 0
        while node is not None:
            loc = (run << _SHIFT) | offset
            planned.append(Planned(node, loc, depth + offset, parent))
            kids = children.get(node, [])
            starts.extend((kid, loc, node, depth + offset + 1) for kid in kids[1:])
            parent, node = node, (kids[0] if kids else None)
            offset += 1
            if node is not None and offset > _OFFSET:  # a run at its length limit
                starts.append((node, loc, parent, depth + offset))
                node = None
    return planned, runs


def dictionaries_from(bodies: Iterable[bytes]) -> codec.Dictionaries:
    """The store's dictionaries from the canonical bodies of its DICTIONARY assets."""
    decoder = msgspec.msgpack.Decoder(Dictionary)
    try:
        return codec.Dictionaries(codec.ZstdDictionary(decoder.decode(b).data) for b in bodies)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise IntegrityError(f"cannot migrate: a compression dictionary is damaged ({e}); "
                             "run store.verify() with the previous immagent") from e


class Records:
    """Builds the version-3 rows of planned nodes, batch by batch in loc order, keeping the
    accumulator's peaks along each run (and at the nodes other runs hang from)."""

    def __init__(self, dictionaries: codec.Dictionaries, standalone: set[Digest],
                 runs: Sequence[Run]) -> None:
        self._dictionaries = dictionaries
        self._writer = dictionaries.newest()
        self._standalone = standalone  # elements states point at: they stay assets
        # The nodes runs hang from: their peaks are needed after their own run moved on.
        self._forks = {r.parent_digest for r in runs if r.parent is not None}
        # Peaks (and leaf count) after each node whose children may come later; None for
        # nodes whose history is not all stored (orphans).
        self._peaks: dict[Digest, tuple[tuple[bytes, ...], int] | None] = {}
        self._last: tuple[Digest, tuple[tuple[bytes, ...], int] | None] | None = None
        self.inlined: set[Digest] = set()
        self.kept_out: set[Digest] = set()

    def rows(self, batch: Sequence[Planned],
             nodes: Mapping[Digest, tuple[int, tuple[Digest, ...], bytes]],
             elements: Mapping[Digest, tuple[int, bytes]]) -> list[NodeColumns]:
        """The columns of each planned node of ``batch``, given its version-2 (kind, refs,
        body) and its elements' stored (codec, body)."""
        out = []
        for plan in batch:
            kind, refs, fields = nodes[plan.digest]
            added = refs[1:]
            if plan.parent is None:
                state: tuple[tuple[bytes, ...], int] | None = ((), 0)
            elif self._last is not None and self._last[0] == plan.parent:
                state = self._last[1]
            else:
                state = self._peaks.get(plan.parent)
            if state is not None:
                state = accumulator.append(state[0], state[1], added)
            entries: list[bytes] = []
            out_of_line: list[Digest] = []
            for digest in added:
                body = self._body(elements.get(digest))
                if body is not None and len(body) <= chains.INLINE_MAX and (
                        digest not in self._standalone):
                    entries.append(body)
                    self.inlined.add(digest)
                else:
                    entries.append(chains.OUT_OF_LINE)
                    out_of_line.append(digest)
                    self.kept_out.add(digest)
            record = chains.record(fields, entries)
            row_codec, stored = codec.encode(int(Kind.NODE), (), record, self._writer)
            peaks = (chains.join_peaks(state[0]) if state is not None
                     and plan.depth % chains.SPAN == 0 else None)
            first = plan.loc & _OFFSET == 0  # a run's first row says where the run hangs
            out.append(NodeColumns(plan.loc, kind, row_codec, len(added),
                                   plan.depth if first else None, plan.digest,
                                   plan.parent if first else None, b"".join(out_of_line),
                                   peaks, stored))
            if plan.digest in self._forks:
                self._peaks[plan.digest] = state
            self._last = (plan.digest, state)
        return out

    def _body(self, stored: tuple[int, bytes] | None) -> bytes | None:
        """An element's canonical body, or None (absent, or damaged: it stays an asset, so
        nothing is lost and verify reports it)."""
        if stored is None:
            return None
        try:
            return codec.decode(stored[0], stored[1], self._dictionaries)
        except codec.CodecError:
            return None

    def deletable(self) -> set[Digest]:
        """Element assets now held inline only."""
        return self.inlined - self.kept_out - self._standalone
