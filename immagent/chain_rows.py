"""Reading stored chains: the one verify-on-read of a history (schema 3).

``read_chain`` turns the node rows of a lineage (root first, as a backend returns them)
into the history's elements, proving first that every returned byte is what the head
digest commits to:

1. the head and every node back to the nearest node holding a span hash are checked one
   by one: each element's digest is hashed from its body (or taken from its tombstone or
   its verified out-of-line asset) and the node's digest recomputed from its kind, its
   parent's digest (the row before it), those element digests and its fields;
2. from there, each span node's ``span`` (in its own hashed fields) must equal the hash of
   the ``SPAN`` rows before it (digests and canonical records, one blake3 call): those
   rows are then exactly the bytes the writer hashed, including the span hash of the span
   before them, and so on back to the root;
3. a span that does not match (a redacted body, damage) is checked the slow way, node by
   node and element by element; a legacy stretch (nodes written before schema 3, which
   have no span hashes) is checked node by node. A mismatch there is an IntegrityError
   naming the row.

What this guarantees: the returned elements, counters and the head's context are the ones
the head digest commits to, or the read fails. It does not re-prove what the writer
proved when it wrote a span (that each element's body hashes to the digest its node
lists, that ``acc`` is the root over the chain): the span commits to those bytes as they
were written, and ``Store.verify`` and bundle reading check every element and every
accumulator root. Counters are checked against the elements on every read.

``read_context`` checks the few rows a writer needs to append (``ChainContext``) without
reading the history. Pure: no I/O.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import blake3
import msgspec

from immagent import accumulator, chains, codec, redaction
from immagent.assets import (
    NODE_KINDS,
    Asset,
    ConversationNode,
    Digest,
    Kind,
    decode_element,
    node_fields,
    with_context,
)
from immagent.chains import SPAN, ChainContext, NodeRow
from immagent.exceptions import AssetNotFoundError, IntegrityError, MessageNotFoundError
from immagent.rows import StoredAsset, load_rows

__all__ = ["REDACTED_READERS", "ChainRead", "Checked", "NodeDamage", "Parsed", "as_assets",
           "audit_row",
           "check_row", "parse_rows", "read_chain", "read_context", "read_node"]

#: How a redacted element of a kind reads (``immagent.redaction``: a marker message);
#: without one, reading a redacted element is an IntegrityError that says so (its node
#: still verifies). A reader raises ValueError for a damaged tombstone.
REDACTED_READERS: dict[int, Callable[[chains.Tombstone], Asset]] = {
    int(Kind.MESSAGE): redaction.marker,
}


class ChainRead(NamedTuple):
    """A verified history: the node digests root first, how many elements the history
    holds at each node (``ends``), each node's ``size`` counter, every element in order,
    and the head node with its context attached (ready for ``extend``)."""

    digests: list[Digest]
    ends: list[int]
    sizes: list[int]
    elements: tuple[Asset, ...]
    head: ConversationNode


class Parsed(NamedTuple):
    """The rows of a chain decompressed and split: fields and entries per row."""

    fields: list[bytes]
    entries: list[list[bytes]]


_FIRST = operator.itemgetter(0)
_MARKER_FIRST = frozenset((0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8)).__contains__
_NODE_PREFIX = {k: blake3.blake3(bytes((k,))) for k in NODE_KINDS}
_ELEMENT_PREFIX = {int(t.element_kind): blake3.blake3(bytes((t.element_kind,)))
                   for t in NODE_KINDS.values()}
_COUNTS = tuple(n.to_bytes(4, "big") for n in range(256))
_records = msgspec.msgpack.Decoder(tuple[msgspec.Raw, list[msgspec.Raw]])


class NodeDamage(IntegrityError):
    """A stored node row that does not hold what its digest says (``reason``: how)."""

    def __init__(self, row: NodeRow, reason: str) -> None:
        super().__init__(f"node {row.digest.hex()} is corrupt: {reason} (at depth "
                         f"{row.depth}; run store.verify())")
        self.reason = reason


def _corrupt(row: NodeRow, why: str) -> NodeDamage:
    return NodeDamage(row, why)


def _lacking_dictionary(row: NodeRow, dictionaries: Mapping[int, codec.ZstdDictionary]
                        ) -> str | None:
    """Why a row cannot be decoded when its codec names a dictionary that is not at hand
    (the row may be sound: the dictionary is what is missing or damaged), else None."""
    if type(row.codec) is int and row.codec >= codec.FIRST_DICTIONARY and (
            row.codec not in dictionaries):
        return f"its record needs dictionary {row.codec}, which is not stored"
    return None


def parse_rows(rows: Sequence[NodeRow],
               dictionaries: Mapping[int, codec.ZstdDictionary]) -> Parsed:
    """Decompress and split every row's record (IntegrityError naming the first bad row)."""
    try:
        records = codec.decode_many([r.codec for r in rows], [r.body for r in rows],
                                    dictionaries)
        split = list(map(_records.decode, records))
    except (codec.CodecError, msgspec.DecodeError, msgspec.ValidationError, TypeError):
        for row in rows:  # name the row
            try:
                chains.split_record(codec.decode(row.codec, row.body, dictionaries))
            except (codec.CodecError, ValueError, TypeError) as e:
                raise _corrupt(row, f"its record cannot be read ({e})") from None
        raise IntegrityError("a chain's records cannot be read (run store.verify())") from None
    return Parsed([bytes(f) for f, _ in split], [list(map(bytes, e)) for _, e in split])


class _Chain:
    """The state of one read: rows, their parsed records, and what is verified."""

    def __init__(self, rows: Sequence[NodeRow], parsed: Parsed,
                 leaves: Mapping[Digest, Asset], node_type: type[ConversationNode]) -> None:
        self.rows = rows
        self.fields = parsed.fields
        self.entries = parsed.entries
        self.leaves = leaves
        self.kind = int(node_type.kind)
        self.element_kind = int(node_type.element_kind)
        self.element_digests: dict[int, list[Digest]] = {}
        # Rows holding markers (out-of-line elements, tombstones): their canonical record
        # differs from the stored one. Found in C: the first byte of every entry.
        self.marked = {i for i, e in enumerate(self.entries)
                       if rows[i].refs or any(map(_MARKER_FIRST, map(_FIRST, e)))}

    def digests_of(self, i: int) -> list[Digest]:
        """The element digests of row ``i``, from their bodies (hashed), tombstones and
        out-of-line refs; IntegrityError naming the row when the markers and refs differ."""
        found = self.element_digests.get(i)
        if found is not None:
            return found
        entries, row = self.entries[i], self.rows[i]
        prefix = _ELEMENT_PREFIX[self.element_kind]
        if i not in self.marked:
            found = [prefix.copy().update(e).digest() for e in entries]
        else:
            refs = iter(row.refs)
            found = []
            for e in entries:
                if e == chains.OUT_OF_LINE:
                    ref = next(refs, None)
                    if ref is None:
                        raise _corrupt(row, "its record lists more out-of-line elements "
                                       "than its refs")
                    found.append(ref)
                    continue
                try:
                    stone = chains.tombstone(e)
                except ValueError as err:
                    raise _corrupt(row, str(err)) from None
                found.append(prefix.copy().update(e).digest() if stone is None
                             else stone.digest)
            if next(refs, None) is not None:
                raise _corrupt(row, "its refs list more out-of-line elements than its record")
        self.element_digests[i] = found
        return found

    def check_node(self, i: int, parent: Digest | None) -> None:
        """Row ``i``'s digest from its contents and its parent's digest."""
        row = self.rows[i]
        digests = self.digests_of(i)
        if parent is None:
            if row.depth != 0:
                raise _corrupt(row, "the node stored before it (its parent) is missing")
            if digests:
                raise _corrupt(row, "a root (no parent) must add nothing")
            refs: list[Digest] = []
        else:
            refs = [parent, *digests]
        count = len(refs)
        start = _NODE_PREFIX.get(row.kind)
        if start is None or row.kind != self.kind:
            raise _corrupt(row, f"its kind is {row.kind}, the chain's {self.kind}")
        data = (_COUNTS[count] if count < len(_COUNTS) else count.to_bytes(4, "big"))
        if start.copy().update(data + b"".join(refs) + self.fields[i]).digest() != row.digest:
            raise _corrupt(row, "its contents do not hash to its digest")

    def canonical(self, i: int) -> bytes:
        """Row ``i``'s canonical record (every body inline; KeyError for a tombstone)."""
        if i not in self.marked:
            return chains.record(self.fields[i], self.entries[i])
        refs = iter(self.rows[i].refs)
        bodies = []
        for e in self.entries[i]:
            if e == chains.OUT_OF_LINE:
                bodies.append(self.leaves[next(refs)].body)
            elif chains.is_marker(e):
                raise KeyError("a tombstone has no body")
            else:
                bodies.append(e)
        return chains.record(self.fields[i], bodies)

    def span_holds(self, j: int) -> bool:
        """Whether row ``j``'s span hash covers the SPAN rows before it as stored."""
        span = node_fields(self.fields[j]).span
        if span is None:
            return False
        try:
            window = [(self.rows[k].digest, self.canonical(k)) for k in range(j - SPAN, j)]
        except KeyError:
            return False
        return chains.span_hash(window) == span


def _parent(rows: Sequence[NodeRow], i: int) -> Digest | None:
    return rows[i - 1].digest if i else rows[0].parent


def read_chain(rows: Sequence[NodeRow], head: Digest, node_type: type[ConversationNode],
               leaves: Mapping[Digest, StoredAsset],
               dictionaries: Mapping[int, codec.ZstdDictionary]) -> ChainRead:
    """The verified history of ``head`` from its lineage's rows (root first, every row
    from depth 0 to the head's). See the module docstring for what is checked."""
    if not rows or rows[-1].digest != head:
        raise IntegrityError(f"the rows read do not end at node {head.hex()}")
    for i, row in enumerate(rows):
        if row.depth != i:
            raise IntegrityError(f"the lineage of node {head.hex()} is broken at depth {i}: "
                                 f"node {row.digest.hex()} is stored at depth {row.depth} "
                                 "(run store.verify())")
    declared = _declared(rows)
    if sum(declared) > _CHECK_IN_PARTS:
        _check_in_parts(rows, node_type, leaves, dictionaries, declared)
    parsed = parse_rows(rows, dictionaries)
    loaded = _load_leaves(rows, leaves, node_type, dictionaries, parsed)
    chain = _Chain(rows, parsed, loaded, node_type)
    n = len(rows)
    # 1. The head and the nodes back to the nearest span node, one by one.
    i = n - 1
    while True:
        chain.check_node(i, _parent(rows, i))
        if i == 0 or (i >= SPAN and i % SPAN == 0
                      and node_fields(parsed.fields[i]).span is not None):
            break
        i -= 1
    # 2. Spans back to the root while they hold; 3. node by node where one does not.
    j = i
    while j >= SPAN and j % SPAN == 0 and node_fields(parsed.fields[j]).span is not None:
        if not chain.span_holds(j):
            for k in range(j - 1, j - SPAN - 1, -1):
                chain.check_node(k, _parent(rows, k))
        j -= SPAN
    # Row j is verified as bytes (inside a span) or one by one; below it, one by one.
    if j not in chain.element_digests:
        chain.check_node(j, _parent(rows, j))
    for k in range(j - 1, -1, -1):
        chain.check_node(k, _parent(rows, k))
    return _history(chain, head, node_type)


#: Decompressed bytes a chain's records may declare in all before a read checks them in
#: parts first (tampered frames inflate before any digest is checked: each frame is bounded
#: by ``codec.MAX_RATIO``, this bounds their sum). A legitimate 1,000-turn history declares
#: one or two MB, so the common read decompresses once.
_CHECK_IN_PARTS = 16 << 20
#: Declared bytes decompressed and checked at once by ``_check_in_parts``.
_PART = 4 << 20


def _declared(rows: Sequence[NodeRow]) -> list[int]:
    """The bytes each row's record declares when decompressed (0 for a raw one), refused
    per frame by ``codec.check_declared`` before anything is allocated."""
    sizes = []
    for row in rows:
        if row.codec == codec.RAW:
            sizes.append(0)
            continue
        try:
            sizes.append(codec.check_declared(row.body))
        except (codec.CodecError, TypeError) as e:
            raise _corrupt(row, f"its record cannot be read ({e})") from None
    return sizes


def _check_in_parts(rows: Sequence[NodeRow], node_type: type[ConversationNode],
                    leaves: Mapping[Digest, StoredAsset],
                    dictionaries: Mapping[int, codec.ZstdDictionary],
                    declared: Sequence[int]) -> None:
    """Every row checked one by one (its digest from its contents and the digest of the row
    before it), root first, in parts of at most ``_PART`` declared bytes: what is unchecked
    at once stays bounded. A damaged row fails in its own part; the head's digest closes
    the chain when ``read_chain`` checks it again."""
    start = 0
    while start < len(rows):
        end, total = start + 1, declared[start]
        while end < len(rows) and total + declared[end] <= _PART:
            total += declared[end]
            end += 1
        part = rows[start:end]
        parsed = parse_rows(part, dictionaries)
        chain = _Chain(part, parsed, _load_leaves(part, leaves, node_type, dictionaries,
                                                  parsed), node_type)
        for k in range(len(part)):
            chain.check_node(k, _parent(rows, start + k))
        start = end


def read_context(rows: Sequence[NodeRow], head: Digest, node_type: type[ConversationNode],
                 leaves: Mapping[Digest, StoredAsset],
                 dictionaries: Mapping[int, codec.ZstdDictionary]) -> ConversationNode:
    """The head node with its context, from the rows since the last span depth (and the
    row before them, whose digest anchors the first): each checked one by one, the
    accumulator peaks stored beside the span-depth row checked against its ``acc``."""
    if not rows or rows[-1].digest != head:
        raise IntegrityError(f"the rows read do not end at node {head.hex()}")
    first = rows[0].depth
    for i, row in enumerate(rows):
        if row.depth != first + i:
            raise IntegrityError(f"the lineage of node {head.hex()} is broken at depth "
                                 f"{first + i} (run store.verify())")
    parsed = parse_rows(rows, dictionaries)
    chain = _Chain(rows, parsed, _load_leaves(rows, leaves, node_type, dictionaries, parsed),
                   node_type)
    # The row before the span depth only anchors the next one's parent link.
    anchor = 1 if first > 0 and first % SPAN != 0 else 0
    for i in range(len(rows) - 1, anchor - 1, -1):
        chain.check_node(i, _parent(rows, i))
    own = _own(chain, len(rows) - 1, decode_element(node_type.element_kind))
    node, _ = _head(chain, head, node_type, anchor, own)
    return node


def _load_leaves(rows: Sequence[NodeRow], leaves: Mapping[Digest, StoredAsset],
                 node_type: type[ConversationNode],
                 dictionaries: Mapping[int, codec.ZstdDictionary],
                 parsed: Parsed) -> dict[Digest, Asset]:
    """The out-of-line elements the rows name, verified (re-hashed) and decoded. A row
    whose refs do not match its record's out-of-line entries is damaged, not missing an
    element."""
    wanted = list(dict.fromkeys(d for r in rows for d in r.refs))
    if not wanted:
        return {}
    missing = next((d for d in wanted if d not in leaves), None)
    if missing is not None:
        # Missing, or named by a damaged row? The row's own digest tells.
        i = next(i for i, r in enumerate(rows) if missing in r.refs)
        _Chain(rows, parsed, {}, node_type).check_node(i, _parent(rows, i))
        raise (MessageNotFoundError(missing) if node_type.element_kind == Kind.MESSAGE
               else AssetNotFoundError("chain element", missing))
    found = load_rows([leaves[d] for d in wanted], dictionaries)
    for digest, asset in zip(wanted, found, strict=True):
        if asset.kind != node_type.element_kind:
            lister = next(r for r in rows if digest in r.refs)
            raise IntegrityError(f"node {lister.digest.hex()} lists {digest.hex()}, a "
                                 f"{Kind(asset.kind).name.lower()}, where a "
                                 f"{node_type.element_kind.name.lower()} must be")
    return dict(zip(wanted, found, strict=True))


def _history(chain: _Chain, head: Digest, node_type: type[ConversationNode]) -> ChainRead:
    """Elements, counters and the head's context of a verified chain."""
    rows, fields, entries = chain.rows, chain.fields, chain.entries
    decode = decode_element(node_type.element_kind)
    elements: list[Asset] = []
    sizes: list[int] = []
    ends: list[int] = []
    length = size = 0
    for i, (row, found) in enumerate(zip(rows, entries, strict=True)):
        if i in chain.marked:
            own = _own(chain, i, decode)
            added = _added_bytes(chain, i)
        else:
            try:
                own = list(map(decode, found))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                raise IntegrityError(f"node {row.digest.hex()} holds an element that cannot "
                                     f"be decoded: {e}") from None
            for asset, body in zip(own, found, strict=True):
                asset.__dict__["body"] = body
            added = sum(map(len, found))
        elements += own
        length += len(own)
        size += added
        counters = node_fields(fields[i])
        if (counters.length, counters.size) != (length, size):
            raise IntegrityError(f"node {row.digest.hex()} claims {counters.length} elements "
                                 f"({counters.size} bytes), its chain holds {length} ({size})")
        ends.append(length)
        sizes.append(size)
    node, _ = _head(chain, head, node_type, 0, elements)
    return ChainRead([r.digest for r in rows], ends, sizes, tuple(elements), node)


def _added_bytes(chain: _Chain, i: int) -> int:
    """The body bytes row ``i`` adds (what its ``size`` counter counts): a redacted
    element's from its tombstone."""
    refs = iter(chain.rows[i].refs)
    total = 0
    for entry in chain.entries[i]:
        if entry == chains.OUT_OF_LINE:
            total += len(chain.leaves[next(refs)].body)
            continue
        stone = chains.tombstone(entry)
        if stone is None:
            total += len(entry)
            continue
        try:
            total += redaction.tombstone_size(stone)
        except ValueError as e:
            raise _corrupt(chain.rows[i], str(e)) from None
    return total


def _own(chain: _Chain, i: int, decode: Callable[[bytes], Asset]) -> list[Asset]:
    """The elements of a row holding markers."""
    refs = iter(chain.rows[i].refs)
    out: list[Asset] = []
    for entry in chain.entries[i]:
        if entry == chains.OUT_OF_LINE:
            out.append(chain.leaves[next(refs)])
            continue
        stone = chains.tombstone(entry)
        if stone is not None:
            reader = REDACTED_READERS.get(chain.element_kind)
            if reader is None:
                raise IntegrityError(f"node {chain.rows[i].digest.hex()} holds redacted "
                                     f"element {stone.digest.hex()}, which this immagent "
                                     "cannot show")
            try:
                out.append(reader(stone))
            except ValueError as e:
                raise _corrupt(chain.rows[i], str(e)) from None
            continue
        try:
            asset = decode(entry)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise IntegrityError(f"node {chain.rows[i].digest.hex()} holds an element that "
                                 f"cannot be decoded: {e}") from None
        asset.__dict__["body"] = entry
        out.append(asset)
    return out


def _head(chain: _Chain, head: Digest, node_type: type[ConversationNode], first: int,
          elements: Sequence[Asset] | None = None) -> tuple[ConversationNode, ChainContext]:
    """The head node object, its context attached: peaks from the last span-depth row that
    keeps them (checked against its ``acc``) plus the element digests after it (the rows
    after a span depth were checked one by one, so their digests are known)."""
    rows, fields = chain.rows, chain.fields
    n = len(rows)
    last = n - 1
    depth = rows[last].depth
    aligned = last - depth % SPAN  # the row at the last span depth
    if aligned < 0:  # the rows read stop short of it: a damaged lineage (a moved row)
        raise IntegrityError(f"the lineage of node {head.hex()} is broken: the rows read "
                             f"do not reach depth {depth - depth % SPAN} (run store.verify())")
    counters = [node_fields(f) for f in fields]
    peaks: tuple[bytes, ...] | None = None
    count = 0
    if aligned >= first:
        stored = chains.split_peaks(rows[aligned].peaks)
        count = counters[aligned].length
        if stored is not None and accumulator.root(stored, count) == counters[aligned].acc:
            peaks = stored
    if peaks is None:  # no usable stored peaks: from every element digest of the lineage
        if first > 0 or rows[0].depth != 0:
            raise IntegrityError(f"node {rows[aligned].digest.hex()} keeps no valid "
                                 "accumulator peaks (run store.verify())")
        for k in range(n):
            if k not in chain.element_digests:
                chain.check_node(k, _parent(rows, k))
        peaks, count = accumulator.append((), 0, itertools.chain.from_iterable(
            chain.element_digests[k] for k in range(n)))
    else:
        peaks, count = accumulator.append(peaks, count, itertools.chain.from_iterable(
            chain.element_digests[k] for k in range(aligned + 1, n)))
    top = counters[last]
    if count != top.length:
        raise IntegrityError(f"node {head.hex()} claims {top.length} elements, its chain "
                             f"holds {count}")
    if top.acc is not None and accumulator.root(peaks, count) != top.acc:
        raise _corrupt(rows[last], "its accumulator root is not the root over its chain")
    window = tuple((rows[k].digest, _canonical_or_unknown(chain, k))
                   for k in range(aligned, n))
    context = ChainContext(depth, top.length, top.size, peaks, window)
    parent = _parent(rows, last)
    node = node_type(parent=parent, messages=tuple(chain.digests_of(last)) if parent else (),
                     length=top.length, size=top.size, acc=top.acc, span=top.span)
    node.__dict__["body"] = fields[last]
    node.__dict__["digest"] = head
    own = None
    if elements is not None:
        added = len(chain.entries[last])
        own = tuple(elements[len(elements) - added:]) if added else ()
    with_context(node, context, own)
    return node, context



def _canonical_or_unknown(chain: _Chain, k: int) -> bytes:
    """Row ``k``'s canonical record, b"" when a redacted element makes it unknown (no
    span can be made over it: ``chains.advance``)."""
    try:
        return chain.canonical(k)
    except KeyError:
        return b""


def check_row(row: NodeRow, dictionaries: Mapping[int, codec.ZstdDictionary]
              ) -> tuple[str, str] | None:
    """None if a stored node row hashes to its digest (from its record, its out-of-line
    refs and its parent's digest as stored), else ("corrupt" | "undecodable", reason): what
    gc checks on every node it marks from, since a damaged row (refs, parent link) could
    make it sweep live data."""
    node_type = NODE_KINDS.get(row.kind) if isinstance(row.kind, int) else None
    if node_type is None:
        return "undecodable", f"unknown node kind {row.kind!r}"
    lacking = _lacking_dictionary(row, dictionaries)
    if lacking is not None:
        return "undecodable", lacking
    try:
        parsed = parse_rows([row], dictionaries)
        chain = _Chain([row], parsed, {}, node_type)
        chain.check_node(0, row.parent)
    except NodeDamage as e:
        return "corrupt", e.reason
    except IntegrityError as e:
        return "corrupt", str(e)
    except (ValueError, TypeError) as e:
        return "corrupt", f"{type(e).__name__}: {e}"
    return None


class Checked(NamedTuple):
    """What the full check of one node row found: its problems (category, reason), the
    context its children continue from, and whether that context can be trusted (a row
    that does not hold what its digest says gives its descendants nothing to check their
    counters and accumulator against: one damaged row is one problem)."""

    problems: list[tuple[str, str]]
    context: ChainContext
    trusted: bool = True
    #: The redacted elements it holds: (digest, their tombstone's description).
    redacted: tuple[tuple[Digest, redaction.Redaction], ...] = ()


def audit_row(row: NodeRow, parent: ChainContext | None, leaves: Mapping[Digest, Asset],
              dictionaries: Mapping[int, codec.ZstdDictionary],
              trusted: bool = True) -> Checked:
    """Every check of one node row given its parent's context (None: it must be a root):
    its digest, counters, accumulator root, span hash, the peaks stored beside it, and
    that its elements decode; ``leaves`` holds its out-of-line elements, verified. What
    ``Store.verify`` runs on every node, in run order. ``trusted`` False: the parent's
    context comes from a damaged row, so only this row's digest is checked."""
    problems: list[tuple[str, str]] = []
    node_type = NODE_KINDS.get(row.kind) if isinstance(row.kind, int) else None
    if node_type is None:
        problems.append(("undecodable", f"unknown node kind {row.kind!r}"))
        return Checked(problems, parent or ChainContext(row.depth, 0, 0, (), ()))
    lacking = _lacking_dictionary(row, dictionaries)
    if lacking is not None:
        problems.append(("undecodable", lacking))
        return Checked(problems, parent or ChainContext(row.depth, 0, 0, (), ()))
    try:
        parsed = parse_rows([row], dictionaries)
    except IntegrityError as e:
        problems.append(("corrupt", e.reason if isinstance(e, NodeDamage) else str(e)))
        return Checked(problems, parent or ChainContext(row.depth, 0, 0, (), ()))
    chain = _Chain([row], parsed, leaves, node_type)
    try:
        chain.check_node(0, row.parent)
    except NodeDamage as e:
        problems.append(("corrupt", e.reason))
    try:
        digests = chain.digests_of(0)
    except IntegrityError:
        digests = []
    fields = node_fields(parsed.fields[0])
    bodies: list[bytes] | None = []
    # Body lengths: a redacted element's from its tombstone (None: one is unknown).
    lengths: list[int] | None = []
    redacted: list[tuple[Digest, redaction.Redaction]] = []
    decode = decode_element(node_type.element_kind)
    refs = iter(row.refs)
    for entry in parsed.entries[0]:
        if entry == chains.OUT_OF_LINE:
            leaf = leaves.get(next(refs, b""))
            if bodies is not None and leaf is not None:
                bodies.append(leaf.body)
            else:
                bodies = None
            if lengths is not None and leaf is not None:
                lengths.append(len(leaf.body))
            else:
                lengths = None
            continue
        if chains.is_marker(entry):
            bodies = None  # a tombstone: its size is in the tombstone, its body gone
            try:
                stone = chains.tombstone(entry)
                assert stone is not None
                info = redaction.decode_info(stone)
            except ValueError as e:
                problems.append(("corrupt", str(e)))
                lengths = None
                continue
            redacted.append((stone.digest, info))
            if lengths is not None:
                lengths.append(info.size)
            continue
        try:
            decode(entry)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            problems.append(("undecodable", f"an element cannot be decoded: {e}"))
        if bodies is not None:
            bodies.append(entry)
        if lengths is not None:
            lengths.append(len(entry))
    if parent is None:
        context = ChainContext(0, 0, 0, (), ((row.digest, chains.record(
            parsed.fields[0], [])),))
        if not problems and (row.parent is not None or digests):
            problems.append(("corrupt", "a root must have no parent and no elements"))
        return Checked(problems, context, redacted=tuple(redacted))
    # A row whose contents do not hash to its digest is one problem; what else is wrong
    # with it follows from that, and its descendants have nothing sound to be checked
    # against but their own digests.
    sound = not problems and trusted
    sizes = lengths
    # A window holding a redacted record (b"") gives no span to check against.
    window_known = (row.depth % SPAN != 0 or len(parent.window) == SPAN) and all(
        r for _, r in parent.window)
    length, size, acc, peaks, span = chains.advance(
        parent if window_known else parent._replace(depth=parent.depth + 1), digests,
        sizes if sizes is not None else [0] * len(digests))
    if sound and (length != fields.length or (sizes is not None and size != fields.size)):
        problems.append(("corrupt", f"it claims {fields.length} elements ({fields.size} "
                         f"bytes), its chain holds {length} ({size})"))
    elif sound and fields.acc is not None and fields.acc != acc:
        problems.append(("corrupt", "its accumulator root is not the root over its chain"))
    elif sound and fields.span is not None and window_known and fields.span != span:
        problems.append(("corrupt", "its span hash does not match the nodes before it"))
    stored = chains.split_peaks(row.peaks)
    if sound and row.depth % SPAN == 0 and stored is not None and stored != peaks:
        problems.append(("corrupt", "the accumulator peaks stored beside it are wrong"))
    canonical = chains.record(parsed.fields[0], bodies) if bodies is not None else b""
    context = chains.child_context(parent, row.digest, canonical, length,
                                   fields.size if sizes is None else size, peaks)
    return Checked(problems, context, sound, tuple(redacted))


def as_assets(row: NodeRow, dictionaries: Mapping[int, codec.ZstdDictionary]
              ) -> tuple[StoredAsset, list[StoredAsset], list[StoredAsset]]:
    """A node row in the canonical asset form bundles carry (digest, kind, refs = parent
    then element digests, body = its fields), its inline elements as assets of their
    own (the same records a version-2 store exported), and its redacted elements as
    tombstones: (digest, element kind, no refs, the tombstone entry as body).
    IntegrityError if the row does not hash to its digest or holds a damaged tombstone."""
    node_type = NODE_KINDS.get(row.kind)
    if node_type is None:
        raise IntegrityError(f"node {row.digest.hex()} has kind {row.kind}, no node kind "
                             "(run store.verify())")
    parsed = parse_rows([row], dictionaries)
    chain = _Chain([row], parsed, {}, node_type)
    chain.check_node(0, row.parent)
    digests = chain.digests_of(0)
    elements: list[StoredAsset] = []
    stones: list[StoredAsset] = []
    for digest, entry in zip(digests, parsed.entries[0], strict=True):
        if entry == chains.OUT_OF_LINE:
            continue
        if chains.is_marker(entry):
            stone = chains.tombstone(entry)
            assert stone is not None  # digests_of decoded it
            try:
                redaction.decode_info(stone)
            except ValueError as e:
                raise _corrupt(row, str(e)) from None
            stones.append(StoredAsset(digest, int(node_type.element_kind), (), entry))
            continue
        elements.append(StoredAsset(digest, int(node_type.element_kind), (), entry))
    refs = () if row.parent is None else (row.parent, *digests)
    return StoredAsset(row.digest, row.kind, refs, parsed.fields[0]), elements, stones


def read_node(row: NodeRow, leaves: Mapping[Digest, StoredAsset],
              dictionaries: Mapping[int, codec.ZstdDictionary]
              ) -> tuple[ConversationNode, tuple[Asset, ...]]:
    """One node and the elements it adds, verified alone (its digest from its record, its
    out-of-line elements and its parent's digest as stored), without its history or its
    context: what listings need (a log, counters). IntegrityError names the row."""
    node_type = NODE_KINDS.get(row.kind) if isinstance(row.kind, int) else None
    if node_type is None:
        raise IntegrityError(f"node {row.digest.hex()} has kind {row.kind!r}, no node kind "
                             "(run store.verify())")
    parsed = parse_rows([row], dictionaries)
    chain = _Chain([row], parsed, _load_leaves([row], leaves, node_type, dictionaries,
                                               parsed), node_type)
    chain.check_node(0, row.parent)
    own = tuple(_own(chain, 0, decode_element(node_type.element_kind)))
    fields = node_fields(parsed.fields[0])
    node = node_type(parent=row.parent, messages=tuple(chain.digests_of(0)) if row.parent
                     else (), length=fields.length, size=fields.size, acc=fields.acc,
                     span=fields.span)
    node.__dict__["body"] = parsed.fields[0]
    node.__dict__["digest"] = row.digest
    node.__dict__["_elements"] = own
    return node, own
