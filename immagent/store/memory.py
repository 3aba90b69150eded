"""In-memory backend: the storage contract as plain Python data, for tests and throwaway
stores (``Store.connect("memory://")``).

It is the executable definition of what the database backends compute in SQL: the same
contract suite runs against every backend. Nothing awaits while a write is applied, so every
call is atomic on its event loop, and a write-or-sweep lock gives gc the same exclusion
the database backends get from their locks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Self
from uuid import UUID

from immagent import redaction
from immagent.assets import NODE_KINDS, Digest, Kind, MissingAsset
from immagent.chains import SPAN, NewNode, NodeRow
from immagent.codec import RAW, ZSTD
from immagent.exceptions import StoreClosedError
from immagent.records import StateRow
from immagent.rows import StoredAsset
from immagent.store.backend import (
    SCHEMA_VERSION,
    CodecRefs,
    Head,
    MarkRows,
    Misfit,
    NodeChange,
    Redactor,
    RedactResult,
    RetainResult,
    RetentionPlan,
    RowCheck,
    StreamPlan,
    SweepResult,
    WriteResult,
)

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """A backend holding everything in dicts; gone when the process ends."""

    def __init__(self) -> None:
        self._assets: dict[Digest, StoredAsset] = {}
        # Chain nodes by digest, in insertion order, each with its depth and parent.
        self._nodes: dict[Digest, NodeRow] = {}
        self._states: dict[UUID, StateRow] = {}
        self._seq = itertools.count(1)
        self._version: int | None = None
        self._closed = False
        self._lock = asyncio.Lock()  # gc's exclusive side; writes are atomic without it

    def _open(self) -> None:
        if self._closed:
            raise StoreClosedError("the memory store is closed")

    async def close(self) -> None:
        self._closed = True

    async def ping(self) -> bool:
        return not self._closed

    def audits(self) -> Self:
        """This backend answers its own audit queries."""
        return self

    async def schema_version(self) -> int | None:
        self._open()
        return self._version

    async def migrate(self, found: int | None) -> int | None:
        self._open()
        current = self._version
        if current == found:
            self._version = SCHEMA_VERSION  # nothing to convert: data lives as objects
        return current

    async def write(self, assets: Sequence[StoredAsset], states: Sequence[StateRow],
                    require: Sequence[Digest] = (), heads: Sequence[Head] = (),
                    replace: Sequence[UUID] = (), nodes: Sequence[NewNode] = (), *,
                    require_states: Sequence[UUID] = (),
                    refuse: Sequence[Digest] = ()) -> WriteResult:
        self._open()
        async with self._lock:
            gone = tuple(i for i in dict.fromkeys(require_states) if i not in self._states)
            if gone:
                return WriteResult(missing_states=gone)
            redacted = tuple(d for d in dict.fromkeys(refuse) if self._redacted(d))
            if redacted:
                return WriteResult(redacted=redacted)
            inserted = {a.digest for a in assets}
            placed: dict[Digest, NodeRow] = {}
            for n in nodes:
                if n.digest in self._nodes or n.digest in placed:
                    continue
                parent = None if n.parent is None else (
                    self._nodes.get(n.parent) or placed.get(n.parent))
                if n.parent is not None and parent is None:
                    return WriteResult(missing=(n.parent,))
                placed[n.digest] = NodeRow(n.digest, n.kind,
                                           0 if parent is None else parent.depth + 1,
                                           n.parent, n.refs, n.body, n.codec, n.peaks, n.added)
            missing = tuple(d for d in require if d not in self._assets and d not in inserted
                            and d not in self._nodes and d not in placed)
            replaced = set(replace)
            conflicts = tuple(s.id for s in states
                              if s.id in self._states and s.id not in replaced
                              and self._states[s.id].digest != s.digest)
            stale = tuple(h for h in heads if self._newest(h.kind, h.stream) != h.state_id)
            if missing or conflicts or stale:
                return WriteResult(missing, conflicts, stale)
            for a in assets:
                self._assets.setdefault(a.digest, a)
            self._nodes.update(placed)
            kept: dict[UUID, int] = {}  # a replaced row's place in the log, kept
            for state_id in replaced:
                old = self._states.pop(state_id, None)
                if old is not None:
                    kept[state_id] = old.seq
            for s in states:
                if s.id not in self._states:
                    self._states[s.id] = _with_seq(s, kept[s.id] if s.id in kept
                                                   else next(self._seq))
        return WriteResult()

    def _redacted(self, digest: Digest) -> bool:
        found = self._states.get(redaction.state_id(digest))  # its id derives from the digest
        return found is not None and found.kind == Kind.REDACTION

    async def redact(self, digests: Sequence[Digest], states: Sequence[StateRow],
                     node_kinds: Sequence[int], rewrite: Redactor, *,
                     dry_run: bool = False) -> RedactResult:
        self._open()
        async with self._lock:
            already = tuple(d for d in dict.fromkeys(digests) if self._redacted(d))
            todo = [d for d in dict.fromkeys(digests) if d not in already]
            if not todo:
                return RedactResult(0, 0, already)
            leaves = {d: self._assets[d] for d in todo if d in self._assets}
            kinds = set(node_kinds)
            rows = [r for r in self._nodes.values() if r.kind in kinds]
            changes: list[NodeChange] = []
            for start in range(0, len(rows), 1000):
                changes += rewrite(rows[start:start + 1000], leaves)
            result = RedactResult(len(changes), len(leaves), already)
            if dry_run or not (changes or leaves):
                return result
            for change in changes:
                self._nodes[change.digest] = self._nodes[change.digest]._replace(
                    refs=change.refs, body=change.body, codec=change.codec)
            for digest in leaves:
                del self._assets[digest]
            wanted = {redaction.state_id(d) for d in todo}
            for state in states:
                if state.id in wanted and state.id not in self._states:
                    self._states[state.id] = _with_seq(state, next(self._seq))
            return result

    def _newest(self, kind: int, stream: str) -> UUID | None:
        mine = [s for s in self._states.values() if s.kind == kind and s.stream == stream]
        return max(mine, key=lambda s: s.seq).id if mine else None

    async def delete_states(self, ids: Sequence[UUID], *, stop_at_shared: bool = False,
                            attached: Sequence[int] = (),
                            dry_run: bool = False) -> list[UUID]:
        self._open()
        deleted: list[UUID] = []
        for i, state_id in enumerate(ids):
            if state_id not in self._states or state_id in deleted:
                if stop_at_shared:
                    break
                continue
            if stop_at_shared and i > 0 and any(
                    s.parent_id == state_id and s.id not in deleted
                    and s.kind not in attached for s in self._states.values()):
                break
            deleted.append(state_id)
        if not dry_run:
            for state_id in deleted:
                del self._states[state_id]
        return deleted

    async def sweep(self, check: RowCheck, codec_refs: CodecRefs | None = None, *,
                    detached: Sequence[int] = (), dry_run: bool = False) -> SweepResult:
        self._open()
        async with self._lock:
            states = list(self._states.values())
            nodes, assets, missing = self._reach(d for st in states for d in st.refs)
            if missing is not None:
                return SweepResult({}, 0, len(self._assets) + len(self._nodes), missing)
            used = sorted(({self._assets[d].codec for d in assets}
                           | {self._nodes[d].codec for d in nodes}) - {RAW, ZSTD})
            if codec_refs is not None and used:
                assets.update(codec_refs(used, [r for r in self._assets.values()
                                                if r.kind == Kind.DICTIONARY]))
            # Attached states whose subject is gone (marked from all the same, as the SQL
            # backends do: what they reach is kept one more cycle).
            gone = [s.id for s in states if s.kind in detached
                    and (s.parent_id is None or s.parent_id not in self._states)]
            dropped = set(gone)
            check([*(s for s in states if s.id not in dropped),
                   *(self._nodes[d] for d in nodes)])
            doomed = [d for d in self._assets if d not in assets]
            dead = [d for d in self._nodes if d not in nodes]
            removed, freed = self._counted(doomed, dead)
            kept = len(self._assets) + len(self._nodes) - len(doomed) - len(dead)
            if dry_run:
                return SweepResult(removed, freed, kept, states_removed=len(gone))
            for state_id in gone:
                del self._states[state_id]
            for d in doomed:
                del self._assets[d]
            for d in dead:
                del self._nodes[d]
            return SweepResult(removed, freed, kept, states_removed=len(gone))

    def _counted(self, doomed: Iterable[Digest], dead: Iterable[Digest]
                 ) -> tuple[dict[int, int], int]:
        """Rows removed per kind and their bytes, for ``doomed`` assets and ``dead`` nodes
        (a node's inline elements count as rows of their kind, as the SQL backends count
        them)."""
        removed: dict[int, int] = {}
        freed = 0
        for d in doomed:
            row = self._assets[d]
            removed[row.kind] = removed.get(row.kind, 0) + 1
            freed += len(row.body)
        for d in dead:
            node = self._nodes[d]
            removed[node.kind] = removed.get(node.kind, 0) + 1
            element = int(NODE_KINDS[node.kind].element_kind)
            inline = node.added - len(node.refs)
            if inline:
                removed[element] = removed.get(element, 0) + inline
            freed += len(node.body)
        return removed, freed

    def _reach(self, roots: Iterable[Digest]
               ) -> tuple[set[Digest], set[Digest], Digest | None]:
        """(nodes, assets) reached from ``roots`` (whole lineages, out-of-line elements,
        and what those assets reference: a message's tool schemas), and the first reached
        digest that is not stored (None if all are)."""
        nodes: set[Digest] = set()
        assets: set[Digest] = set()
        missing: Digest | None = None
        # (digest, whether it must be an asset: a ref of a node or of an asset)
        pending: list[tuple[Digest, bool]] = [(d, False) for d in roots]
        while pending:
            root, asset_only = pending.pop()
            if root in assets:
                continue
            row = self._assets.get(root)
            if row is not None:
                assets.add(root)
                pending.extend((d, True) for d in row.refs)
                continue
            if asset_only or root not in self._nodes:
                missing = missing or root
                continue
            digest: Digest | None = root
            while digest is not None and digest not in nodes:
                node = self._nodes.get(digest)
                if node is None:
                    missing = missing or digest
                    break
                nodes.add(digest)
                pending.extend((d, True) for d in node.refs)
                digest = node.parent
        return nodes, assets, missing

    async def retain(self, plans: Sequence[RetentionPlan], marks: MarkRows, *,
                     dry_run: bool = False) -> RetainResult:
        self._open()
        async with self._lock:  # nothing awaits below: atomic, as one transaction
            before = dict(self._states)
            try:
                return self._retain(plans, marks, dry_run, before)
            except BaseException:
                self._states = before  # as a rolled-back transaction
                raise

    def _retain(self, plans: Sequence[RetentionPlan], marks: MarkRows, dry_run: bool,
                before: dict[UUID, StateRow]) -> RetainResult:
        """``retain`` under the lock; ``before``: the states to restore on a stale plan."""
        deleted: dict[int, int] = {}
        state_bytes = 0
        for plan in plans:
            if any(_digest_of(self._states.get(p.mark)) != p.mark_digest
                   for p in plan.streams):
                self._states = before
                return RetainResult({}, 0, stale=True)
            doomed: list[StateRow] = []
            moved: list[tuple[int, str, int, int]] = []
            for p in plan.streams:
                line = sorted((s for s in self._states.values()
                               if s.kind == plan.kind and s.stream == p.stream),
                              key=lambda s: s.seq)
                gone, mark = self._judge(plan.kind, p, line)
                doomed += gone
                if mark is not None:
                    moved.append((plan.kind, p.stream, *mark))
            ids = {s.id for s in doomed}
            doomed += [s for s in self._states.values()
                       if s.kind in plan.followers and s.parent_id in ids]
            rows = marks(moved)
            streams = {m[1] for m in moved}
            for p in plan.streams:
                if p.stream in streams or (p.keep_every is None and p.mark_digest):
                    self._states.pop(p.mark, None)
            for row in rows:
                self._states[row.id] = _with_seq(row, next(self._seq))
            for s in doomed:
                del self._states[s.id]
                deleted[s.kind] = deleted.get(s.kind, 0) + 1
                state_bytes += len(s.body) + 32 * len(s.refs)
        if not dry_run:
            return RetainResult(deleted, state_bytes)
        nodes, assets, _ = self._reach(d for s in self._states.values() for d in s.refs)
        counts, freed = self._counted([d for d in self._assets if d not in assets],
                                      [d for d in self._nodes if d not in nodes])
        self._states = before
        return RetainResult(deleted, state_bytes, assets=counts, asset_bytes=freed)

    def _judge(self, kind: int, plan: StreamPlan, line: Sequence[StateRow]
               ) -> tuple[list[StateRow], tuple[int, int] | None]:
        """The doomed states of one stream (``line``: its states in log order) and its new
        mark (position, ordinal), or None when the mark does not move: StreamPlan's rule,
        state by state (the SQL backends judge a whole plan in one statement)."""
        pinned = {s.parent_id for s in self._states.values() if s.kind == Kind.PIN}
        parents = {s.parent_id for s in self._states.values() if s.kind == kind}
        dropped = plan.drop and bool(line) and line[-1].seq == plan.head_seq
        doomed: list[StateRow] = []
        mark: tuple[int, int] | None = None
        after = 0
        for pos, s in enumerate(line, start=1):
            if s.seq > plan.mark_seq:
                after += 1
            ordinal = plan.mark_ordinal + after
            tail = (len(line) - pos < plan.keep_latest
                    or (plan.newer_than is not None and s.created_at >= plan.newer_than))
            anchor = plan.keep_every is not None and (
                s.seq <= plan.mark_seq or ordinal % plan.keep_every == 0)
            if (plan.keep_every is not None and not plan.drop and s.seq > plan.mark_seq
                    and not tail):
                mark = (s.seq, ordinal)
            if s.id in pinned:
                continue
            if dropped or not (tail or anchor or s.id not in parents):
                doomed.append(s)
        return doomed, mark

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        self._open()
        return {d: self._assets[d] for d in digests if d in self._assets}

    async def get_chain(self, head: Digest, *, context: bool = False
                        ) -> tuple[list[NodeRow], dict[Digest, StoredAsset]]:
        self._open()
        rows: list[NodeRow] = []
        node = self._nodes.get(head)
        since = 0
        if node is not None and context:
            since = max(0, node.depth - node.depth % SPAN - 1)
        seen: set[Digest] = set()
        while node is not None and node.digest not in seen and node.depth >= since:
            seen.add(node.digest)
            rows.append(node)
            node = None if node.parent is None else self._nodes.get(node.parent)
        rows.reverse()
        leaves = {d: self._assets[d] for row in rows for d in row.refs if d in self._assets}
        return rows, leaves

    async def get_nodes(self, digests: Sequence[Digest]
                        ) -> tuple[dict[Digest, NodeRow], dict[Digest, StoredAsset]]:
        self._open()
        rows = {d: self._nodes[d] for d in digests if d in self._nodes}
        leaves = {r: self._assets[r] for row in rows.values() for r in row.refs
                  if r in self._assets}
        return rows, leaves

    async def iter_nodes(self, roots: Sequence[Digest] | None = None,
                         batch_size: int = 1000) -> AsyncIterator[list[NodeRow]]:
        self._open()
        if roots is None:
            wanted = set(self._nodes)
        else:
            wanted, _, _ = self._reach(d for d in roots if d in self._nodes)
        rows = [self._nodes[d] for d in _runs_order(self._nodes) if d in wanted]
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]

    async def kinds(self, digests: Sequence[Digest]) -> dict[Digest, int]:
        self._open()
        found = {d: self._assets[d].kind for d in digests if d in self._assets}
        found.update((d, self._nodes[d].kind) for d in digests if d in self._nodes)
        return found

    async def iter_assets(self, roots: Sequence[Digest] | None = None,
                          batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        self._open()
        if roots is None:
            rows = [self._assets[d] for d in sorted(self._assets)]
        else:
            _, reached, _ = self._reach(d for d in roots
                                        if d in self._assets or d in self._nodes)
            rows = [self._assets[d] for d in reached if d in self._assets]
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]

    async def dangling_refs(self, states: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[MissingAsset]:
        self._open()
        if states is None:
            roots = list(self._states.values())
            sources: Iterable[NodeRow] = self._nodes.values()
            held: Iterable[StoredAsset] = self._assets.values()
        else:
            roots = [self._states[i] for i in states if i in self._states]
            reached, assets, _ = self._reach(d for s in roots for d in s.refs
                                             if d in self._nodes or d in self._assets)
            sources = [self._nodes[d] for d in reached]
            held = [self._assets[d] for d in assets]
        found: dict[tuple[Digest, Digest | UUID], None] = {}
        for a in held:  # a message's tool schemas
            found.update(((d, a.digest), None) for d in a.refs if d not in self._assets)
        for s in roots:
            found.update(((d, s.id), None) for d in s.refs
                         if d not in self._assets and d not in self._nodes)
        for n in sources:
            found.update(((d, n.digest), None) for d in n.refs if d not in self._assets)
            if n.parent is not None and n.parent not in self._nodes:
                found[(n.parent, n.digest)] = None
        return [MissingAsset(d, r) for d, r in itertools.islice(found, limit)]

    async def misfit_refs(self, expected: Mapping[int, tuple[int, int]],
                          states: Sequence[UUID] | None = None,
                          limit: int = 10_000) -> list[Misfit]:
        self._open()
        if states is None:
            sources: Iterable[NodeRow] = self._nodes.values()
        else:
            roots = (d for i in states if i in self._states for d in self._states[i].refs
                     if d in self._nodes)
            reached, _, _ = self._reach(roots)
            sources = [self._nodes[d] for d in reached]
        found: list[Misfit] = []
        for n in sources:
            if n.kind not in expected:
                continue
            first, rest = expected[n.kind]
            parent = None if n.parent is None else self._nodes.get(n.parent)
            if parent is not None and parent.kind != first:
                found.append(Misfit(n.digest, parent.digest, parent.kind, first))
            for ref in n.refs:
                target = self._assets.get(ref)
                if target is not None and target.kind != rest:
                    found.append(Misfit(n.digest, ref, target.kind, rest))
        return found[:limit]

    async def cyclic_states(self, limit: int = 10_000) -> list[UUID]:
        self._open()
        children: dict[UUID, list[UUID]] = {}
        rooted: list[UUID] = []
        for s in self._states.values():
            if s.parent_id is None or s.parent_id not in self._states:
                rooted.append(s.id)
            else:
                children.setdefault(s.parent_id, []).append(s.id)
        seen = set(rooted)
        while rooted:
            for child in children.get(rooted.pop(), ()):
                seen.add(child)
                rooted.append(child)
        return sorted(i for i in self._states if i not in seen)[:limit]

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        self._open()
        stats: dict[int, tuple[int, int]] = {}
        for a in self._assets.values():
            n, size = stats.get(a.kind, (0, 0))
            stats[a.kind] = (n + 1, size + len(a.body))
        for node in self._nodes.values():
            n, size = stats.get(node.kind, (0, 0))
            stats[node.kind] = (n + 1, size + len(node.body))
            element = int(NODE_KINDS[node.kind].element_kind)
            inline = node.added - len(node.refs)
            if inline:
                n, size = stats.get(element, (0, 0))
                stats[element] = (n + inline, size)
        return stats

    async def storage_bytes(self) -> int:
        self._open()
        return (sum(32 + len(a.body) + 32 * len(a.refs) for a in self._assets.values())
                + sum(48 + len(n.body) + 32 * len(n.refs) for n in self._nodes.values())
                + sum(len(s.body) + 32 * len(s.refs) + 100 for s in self._states.values()))

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]:
        self._open()
        return [self._states[i] for i in dict.fromkeys(ids) if i in self._states]

    async def scan_states(self, kind: int | None, *, after: UUID | None = None,
                          limit: int = 100, newest_first: bool = False,
                          contains: str | None = None) -> list[StateRow]:
        self._open()
        rows = sorted((s for s in self._states.values() if kind in (None, s.kind)
                       and (contains is None or contains.lower() in s.stream.lower())),
                      key=lambda s: s.id, reverse=newest_first)
        if after is not None:
            rows = [s for s in rows if (s.id < after if newest_first else s.id > after)]
        return rows[:limit]

    async def stream_states(self, kind: int, stream: str, *, after_seq: int | None = None,
                            limit: int = 100, newest_first: bool = True) -> list[StateRow]:
        self._open()
        rows = sorted((s for s in self._states.values()
                       if s.kind == kind and s.stream == stream),
                      key=lambda s: s.seq, reverse=newest_first)
        if after_seq is not None:
            rows = [s for s in rows
                    if (s.seq < after_seq if newest_first else s.seq > after_seq)]
        return rows[:limit]

    async def count_states(self, kind: int, *, stream: str | None = None,
                           contains: str | None = None) -> int:
        self._open()
        return sum(1 for s in self._states.values() if s.kind == kind
                   and (stream is None or s.stream == stream)
                   and (contains is None or contains.lower() in s.stream.lower()))

    async def stream_heads(self, kind: int, *, after: str | None = None,
                           limit: int = 100) -> list[StateRow]:
        self._open()
        heads: dict[str, StateRow] = {}
        for s in self._states.values():
            if (s.kind == kind and (after is None or s.stream > after)
                    and (s.stream not in heads or s.seq > heads[s.stream].seq)):
                heads[s.stream] = s
        return [heads[name] for name in sorted(heads)[:limit]]

    async def lineage(self, state_id: UUID, limit: int | None = None) -> list[StateRow]:
        self._open()
        rows: list[StateRow] = []
        seen: set[UUID] = set()
        current = self._states.get(state_id)
        while current is not None and (limit is None or len(rows) < limit):
            if current.id in seen and limit is None:
                break  # each row once without a limit; with one, a cycle repeats ids
            seen.add(current.id)
            rows.append(current)
            current = (None if current.parent_id is None
                       else self._states.get(current.parent_id))
        return rows


def _digest_of(row: StateRow | None) -> Digest | None:
    return None if row is None else row.digest


def _with_seq(state: StateRow, seq: int) -> StateRow:
    return StateRow(id=state.id, parent_id=state.parent_id, kind=state.kind,
                    stream=state.stream, refs=state.refs, body=state.body,
                    digest=state.digest, created_at=state.created_at, seq=seq)


def _runs_order(nodes: Mapping[Digest, NodeRow]) -> list[Digest]:
    """Node digests in the order a database's runs give them: depth first, a node's first
    child (in insertion order) right after it, continuing its run, its other children
    starting runs later; parents always before children."""
    children: dict[Digest | None, list[Digest]] = {}
    for digest, node in nodes.items():
        parent = node.parent if node.parent in nodes else None
        children.setdefault(parent, []).append(digest)
    order: list[Digest] = []
    pending = list(reversed(children.get(None, [])))
    while pending:
        digest = pending.pop()
        order.append(digest)
        pending.extend(reversed(children.get(digest, [])))
    return order
