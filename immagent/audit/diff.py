"""Diff of two states of one kind (agents, sessions, checkpoints, conversations, any client):
where they meet, what each side added, what else changed, in time proportional to the
divergence, not the history (Dolt's rule).

* **The common ancestor state**: both lineages are walked back together through
  ``parent_id`` (``state_lineage`` with a bound that doubles: one round trip per side per
  doubling) until one reaches a state the other has passed.
* **What each side added**: every ref of a state whose kind is a node kind (a
  conversation, a session branch's items, a list channel, an entry chain) is a hash chain.
  The two chains are walked back together, node by node, always stepping the side whose
  node counts more elements (each node records its length), both at once in one read when
  they count alike, until one side reaches a node the other has passed: the newest
  common node. What each side added is the elements of the nodes above it. A chain only
  one side has, or two chains with no common node, are reported by their heads without
  reading them.
* **What else changed**: the other refs (a system prompt, a channel's value), compared by
  digest (a prompt shown as text), and the body's fields, by name where the kind declares
  them (an agent's model, model config and metadata; a session's branches; a checkpoint's
  metadata and versions).

Everything read goes through the log's verified reads (``get_states``, ``state_lineage``,
``get_assets``, cache first); no history is read whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, Protocol
from uuid import UUID

import msgspec

from immagent import checkpoints
from immagent.assets import NODE_KINDS, Asset, ConversationNode, Digest, Kind, SystemPrompt
from immagent.exceptions import AssetNotFoundError, IntegrityError, ValidationError
from immagent.records import (
    STATE_KINDS,
    ConversationBody,
    SessionBody,
    StateRow,
    load_agent,
)

__all__ = ["ChainDiff", "FieldChange", "StateDiff", "diff_states"]

#: The first bound of a lineage walk (doubled while the two sides have not met).
_FIRST_BOUND: Final = 8


class _Log(Protocol):
    """The event-log reads a diff uses (``EventLog`` has them)."""

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]: ...

    async def get_assets(self, digests: Sequence[Digest]) -> list[Asset]: ...

    async def read_nodes(self, nodes: Sequence[Digest]
                         ) -> list[tuple[ConversationNode, tuple[Asset, ...]]]: ...

    async def state_lineage(self, state_id: UUID, limit: int | None = None
                            ) -> list[StateRow]: ...


class ChainDiff(msgspec.Struct, frozen=True):
    """One hash chain of the two states (``ref`` names it: "conversation", a branch, a
    channel): the newest node both hold (``base``, None when they share none or only one
    side has the chain), how many elements it holds, and what each side added above it,
    oldest first. ``left_head`` / ``right_head`` are the chains' heads (None: that side
    has no such chain)."""

    ref: str
    kind: int
    left_head: Digest | None
    right_head: Digest | None
    base: Digest | None
    base_length: int
    left: tuple[Asset, ...]
    right: tuple[Asset, ...]

    @property
    def same(self) -> bool:
        """Both sides hold the same chain."""
        return self.left_head == self.right_head


class FieldChange(msgspec.Struct, frozen=True):
    """A field, or a ref that is no chain, that differs: its name and both values (None:
    absent on that side)."""

    field: str
    left: Any
    right: Any


class StateDiff(msgspec.Struct, frozen=True):
    """What separates state ``left`` from state ``right`` (of one ``kind``)."""

    left: UUID
    right: UUID
    kind: int
    #: The newest state both lineages pass through (None: none stored).
    ancestor: UUID | None
    #: Equal content digests: nothing below differs.
    same_content: bool
    chains: tuple[ChainDiff, ...]
    changes: tuple[FieldChange, ...]


async def diff_states(log: _Log, left: UUID, right: UUID) -> StateDiff:
    """The diff of the stored states ``left`` and ``right`` (AssetNotFoundError naming one
    that is not stored; ValidationError for states of two kinds)."""
    # One round trip reads both states and the first stretch of each lineage.
    line_a, line_b = await asyncio.gather(log.state_lineage(left, _FIRST_BOUND),
                                          log.state_lineage(right, _FIRST_BOUND))
    for name, state_id, line in (("left", left, line_a), ("right", right, line_b)):
        if not line:
            raise AssetNotFoundError(f"{name} state", state_id)
    a, b = line_a[0], line_b[0]
    if a.kind != b.kind:
        raise ValidationError("right", f"state {right} is a {_kind_name(b.kind)}, state "
                              f"{left} a {_kind_name(a.kind)}: a diff compares two states "
                              "of one kind", str(right))
    ancestor, walked = await _ancestor(log, line_a, line_b)
    # The chains' nodes near the heads are the refs of the states just walked (one node a
    # step, for most clients): read them in one round trip, so the chain walks below find
    # them here instead of asking once a step.
    known = await _prefetch(log, a.kind, walked)
    chains, changes = await _content(log, known, a, b)
    return StateDiff(left=left, right=right, kind=a.kind, ancestor=ancestor,
                     same_content=a.digest == b.digest, chains=chains, changes=changes)


# -- the common ancestor state ----------------------------------------------------------


async def _ancestor(log: _Log, first_a: list[StateRow], first_b: list[StateRow]
                    ) -> tuple[UUID | None, list[StateRow]]:
    """The newest state both lineages pass through, and the states walked to find it:
    walked together from their first stretches (``_FIRST_BOUND`` rows each), each side's
    next stretch read in one bounded lineage query, the bound doubling, so the cost
    follows the distance to the meeting point."""
    order_a: list[UUID] = []
    order_b: list[UUID] = []
    seen_a: set[UUID] = set()
    seen_b: set[UUID] = set()
    walked: list[StateRow] = []
    part_a, part_b = list(first_a), list(first_b)
    bound = _FIRST_BOUND
    while True:
        for rows, order, seen in ((part_a, order_a, seen_a), (part_b, order_b, seen_b)):
            for i, row in enumerate(rows):
                if row.id in seen:  # a parent cycle (damage): stop this side
                    del rows[i:]
                    break
                order.append(row.id)
                seen.add(row.id)
                walked.append(row)
        common = [i for i in order_a if i in seen_b]
        if common:  # the first of a's walk that b passed is the newest common one
            return common[0], walked
        next_a, next_b = _onwards(part_a, bound), _onwards(part_b, bound)
        if next_a is None and next_b is None:
            return None, walked
        bound *= 2
        part_a, part_b = await asyncio.gather(_stretch(log, next_a, bound),
                                              _stretch(log, next_b, bound))


#: Chain nodes read so far in one diff, with the elements each adds: by digest.
_Known = dict[Digest, tuple[ConversationNode, tuple[Asset, ...]]]


async def _prefetch(log: _Log, kind: int, states: Sequence[StateRow]) -> _Known:
    """Every node the refs of ``states`` name, read in one batch (``read_nodes``: one row
    a node; ``get_assets`` would read each node's context, one round trip a node)."""
    wanted: dict[Digest, None] = {}
    for row in states:
        if row.kind != kind:
            continue
        for ref, ref_kind in zip(row.refs, STATE_KINDS[row.kind].ref_kinds(row), strict=True):
            if ref_kind in NODE_KINDS:
                wanted[ref] = None
    known: _Known = {}
    await _read(log, known, list(wanted))
    return known


async def _read(log: _Log, known: _Known, digests: Sequence[Digest]
                ) -> list[tuple[ConversationNode, tuple[Asset, ...]]]:
    """These nodes and their own elements: from ``known``, the rest in one read (kept)."""
    missing = [d for d in dict.fromkeys(digests) if d not in known]
    if missing:
        for node, own in await log.read_nodes(missing):
            known[node.digest] = (node, own)
    return [known[d] for d in digests]


async def _stretch(log: _Log, start: UUID | None, bound: int) -> list[StateRow]:
    return [] if start is None else await log.state_lineage(start, bound)


def _onwards(rows: Sequence[StateRow], bound: int) -> UUID | None:
    """Where a walk goes on: the parent of the last row read, if the stretch was full."""
    if len(rows) < bound or not rows:
        return None
    return rows[-1].parent_id


# -- what each side added, and what else changed ------------------------------------------


async def _content(log: _Log, known: _Known, a: StateRow, b: StateRow
                   ) -> tuple[tuple[ChainDiff, ...], tuple[FieldChange, ...]]:
    kinds_a = STATE_KINDS[a.kind].ref_kinds(a)
    kinds_b = STATE_KINDS[b.kind].ref_kinds(b)
    refs_a = dict(zip(_labels(a), zip(a.refs, kinds_a, strict=True), strict=True))
    refs_b = dict(zip(_labels(b), zip(b.refs, kinds_b, strict=True), strict=True))
    chains: list[ChainDiff] = []
    changes: list[FieldChange] = []
    pending = []
    leaves: list[tuple[str, Digest | None, Digest | None]] = []
    for label in [*refs_a, *(k for k in refs_b if k not in refs_a)]:
        left, right = refs_a.get(label), refs_b.get(label)
        kind = (left or right)[1]  # type: ignore[index]  # one side has it
        head_a = None if left is None else left[0]
        head_b = None if right is None else right[0]
        if kind in NODE_KINDS:
            if head_a is not None and head_b is not None:
                pending.append(_chain(log, known, label, kind, head_a, head_b))
            else:
                chains.append(ChainDiff(label, kind, head_a, head_b, None, 0, (), ()))
        elif head_a != head_b:
            leaves.append((label, head_a, head_b))
    chains += await asyncio.gather(*pending)
    changes += await _leaf_changes(log, leaves)
    changes += _field_changes(a, b)
    order = {label: i for i, label in enumerate([*refs_a, *refs_b])}
    chains.sort(key=lambda c: order[c.ref])
    return tuple(chains), tuple(changes)


async def _chain(log: _Log, known: _Known, label: str, kind: int, head_a: Digest,
                 head_b: Digest) -> ChainDiff:
    """Walk two chains back together to their newest common node (see the module doc)."""
    node_type = NODE_KINDS[kind]
    if head_a == head_b:
        (node,) = await _nodes(log, known, [head_a], node_type)
        return ChainDiff(label, kind, head_a, head_b, head_a, node.length, (), ())
    a, b = await _nodes(log, known, [head_a, head_b], node_type)
    walked_a: list[ConversationNode] = []
    walked_b: list[ConversationNode] = []
    seen_a = {a.digest: 0}
    seen_b = {b.digest: 0}
    base: ConversationNode | None = None
    while True:
        if a.digest in seen_b:
            base = a
            break
        if b.digest in seen_a:
            base = b
            break
        step_a = a.parent is not None and (a.length >= b.length or b.parent is None)
        step_b = b.parent is not None and (b.length >= a.length or a.parent is None)
        if not (step_a or step_b):  # two roots: no common node
            break
        wanted = [n.parent for n, step in ((a, step_a), (b, step_b)) if step]
        found = await _nodes(log, known, wanted, node_type)  # type: ignore[arg-type]
        if step_a:
            walked_a.append(a)
            a = found[0]
            seen_a.setdefault(a.digest, len(walked_a))
        if step_b:
            walked_b.append(b)
            b = found[-1]
            seen_b.setdefault(b.digest, len(walked_b))
    # What each side added: the nodes it walked above the base (a side may have stepped
    # past the base before the other reached it; those are below it and not counted).
    if base is not None:
        walked_a = walked_a[:seen_a[base.digest]]
        walked_b = walked_b[:seen_b[base.digest]]
    # The elements each walked node added, read from the nodes that hold them (one read).
    walked = list(dict.fromkeys(n.digest for n in (*walked_a, *walked_b)))
    own = {node.digest: elements for node, elements in await _read(log, known, walked)}
    return ChainDiff(label, kind, head_a, head_b, None if base is None else base.digest,
                     0 if base is None else base.length,
                     tuple(e for n in reversed(walked_a) for e in own[n.digest]),
                     tuple(e for n in reversed(walked_b) for e in own[n.digest]))


async def _nodes(log: _Log, known: _Known, digests: Sequence[Digest],
                 node_type: type[ConversationNode]) -> list[ConversationNode]:
    """The nodes with these digests, known or in one verified read (IntegrityError for
    another kind)."""
    found = [node for node, _ in await _read(log, known, digests)]
    for node in found:
        if not isinstance(node, node_type):
            raise IntegrityError(f"asset {node.digest.hex()} is a "
                                 f"{_kind_name(node.kind)}, not a "
                                 f"{_kind_name(node_type.kind)}")
    return found


async def _leaf_changes(log: _Log, leaves: Sequence[tuple[str, Digest | None, Digest | None]]
                        ) -> list[FieldChange]:
    """Refs that are no chain and differ: a system prompt by its text, anything else by
    its digest (hex)."""
    wanted = list(dict.fromkeys(d for _, x, y in leaves for d in (x, y) if d is not None))
    assets = {a.digest: a for a in await log.get_assets(wanted)} if wanted else {}

    def shown(digest: Digest | None) -> Any:
        if digest is None:
            return None
        asset = assets[digest]
        return asset.text if isinstance(asset, SystemPrompt) else digest.hex()

    return [FieldChange(label, shown(x), shown(y)) for label, x, y in leaves]


# -- how each kind names its refs and fields -------------------------------------------------


def _labels(row: StateRow) -> list[str]:
    """A name for each ref of a state, by kind (``refs[i]`` where the kind declares none)."""
    try:
        if row.kind == Kind.AGENT_STATE:
            return ["system_prompt", "conversation"]
        if row.kind == Kind.SESSION_STATE:
            body = msgspec.msgpack.decode(row.body, type=SessionBody)
            return ["main", *(b.name for b in body.branches)]
        if row.kind in (Kind.CHECKPOINT, Kind.CHECKPOINT_WRITES):
            return _value_labels(row)
        if row.kind == Kind.CONVERSATION_STATE:
            conversation = msgspec.msgpack.decode(row.body, type=ConversationBody)
            return ["head", *(f"branch[{i}]" for i in range(len(conversation.branches)))]
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        pass  # verified rows decode; anything else keeps the plain names
    return [f"refs[{i}]" for i in range(len(row.refs))]


def _value_labels(row: StateRow) -> list[str]:
    """A checkpoint's (or a writes row's) refs by channel, in the shapes' order."""
    if row.kind == Kind.CHECKPOINT:
        pairs = [(c, s) for c, s in checkpoints.decode_checkpoint(row.body).values]
    else:
        pairs = [(f"{c}#{i}", s) for c, i, s in checkpoints.decode_writes(row.body).writes]
    labels: list[str] = []
    for channel, shape in pairs:
        labels += _shape_labels(channel, shape)
    if len(labels) != len(row.refs):
        raise ValueError("the shapes do not name every ref")
    return labels


def _shape_labels(name: str, shape: Any) -> list[str]:
    if shape in (checkpoints.LEAF, checkpoints.CHAIN):
        return [name]
    if shape[0] == "l":
        return [f"{name}[{i}]" for i in range(shape[1])]
    labels: list[str] = []
    for key, inner in zip(shape[1::2], shape[2::2], strict=True):
        labels += _shape_labels(f"{name}.{key}", inner)
    return labels


def _fields(row: StateRow) -> dict[str, Any]:
    """A state's body as named fields (an agent's: name, model, model_config, metadata)."""
    if row.kind == Kind.AGENT_STATE:
        record = load_agent(row)
        return {"name": record.name, "model": record.model,
                "model_config": record.model_config, "metadata": record.metadata}
    body_type = _BODY_TYPES.get(row.kind)
    try:
        if body_type is not None:
            value: Any = msgspec.structs.asdict(msgspec.msgpack.decode(row.body,
                                                                       type=body_type))
        else:
            value = msgspec.msgpack.decode(row.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        value = {"body": row.body.hex()}
    fields = value if isinstance(value, dict) else {"body": value}
    return {"stream": row.stream, **fields}


def _field_changes(a: StateRow, b: StateRow) -> list[FieldChange]:
    left, right = _fields(a), _fields(b)
    return [FieldChange(name, left.get(name), right.get(name))
            for name in [*left, *(n for n in right if n not in left)]
            if left.get(name) != right.get(name)]


_BODY_TYPES: dict[int, type[msgspec.Struct]] = {
    int(Kind.SESSION_STATE): SessionBody,
    int(Kind.CHECKPOINT): checkpoints.CheckpointBody,
    int(Kind.CHECKPOINT_WRITES): checkpoints.WritesBody,
    int(Kind.CONVERSATION_STATE): ConversationBody,
}


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"kind {kind} state"
