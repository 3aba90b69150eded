"""How a hash chain is stored (schema 3): node rows that carry their elements' bodies.

A chain (a conversation, a session branch's items, a list channel's values) is a line of
nodes, each naming its parent and the elements it adds. What a node *is* (its digest) is
defined in ``immagent.assets`` and does not depend on anything here: blake3 over the kind,
the parent's digest, the elements' digests and the node's fields (counters, the
accumulator root ``acc``, and at every ``SPAN``-th depth the span hash ``span``). This
module is the stored form and the few rules that tie it to the digests:

* **Records.** A node row holds a *record*: the node's canonical fields and, for each
  element, its canonical body inline (``INLINE_MAX`` bytes at most), or a marker saying
  the body is a separate content-addressed asset (larger bodies, shared by every chain
  that holds them; the row's ``refs`` column lists their digests in order), or a
  *tombstone* (a redacted body: its digest and why it is gone). The *canonical record*
  is the record with every body inline; it never depends on where a body is stored.
* **Span hashes.** A node at depth ``d`` (the root is depth 0) with ``d % SPAN == 0`` and
  ``d >= SPAN`` commits, in its hashed fields, to ``span_hash`` of the ``SPAN`` nodes
  before it: their digests and canonical records in one blake3 call. A reader verifies
  the head and the nodes back to the nearest span node one by one, then each span with
  one hash over its concatenated bytes: a history costs one hash per ``SPAN`` nodes
  instead of one per node and one per element. A span whose bytes changed (a redaction,
  damage) is checked the slow way, node by node and element by element, which still
  detects any changed byte.
* **Context.** Appending a node needs its parent's depth, counters, accumulator peaks and
  the canonical records since the last span depth (``ChainContext``); the store keeps the
  peaks beside every span-depth row (``peaks`` column, not hashed: checked against the
  row's ``acc`` before use), so a writer that has not read the history rebuilds the
  context from at most ``SPAN + 1`` rows.

Physical placement (runs of consecutive nodes, their locators) is the backends' business;
rows come and go as ``NodeRow`` and ``NewNode``. Pure: no I/O, no import of the asset
classes (``immagent.assets`` imports this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import blake3
import msgspec

from immagent import accumulator

__all__ = [
    "EXT_OUT_OF_LINE",
    "EXT_TOMBSTONE",
    "INLINE_MAX",
    "OUT_OF_LINE",
    "SPAN",
    "ChainContext",
    "NewNode",
    "NodeRow",
    "Tombstone",
    "advance",
    "canonical_record",
    "is_marker",
    "join_peaks",
    "record",
    "root_context",
    "span_hash",
    "split_peaks",
    "split_record",
]

#: Nodes per span: every node at a depth that is a multiple of SPAN commits to the hash of
#: the SPAN nodes before it. 16 measured: reads of 1,000 turns hash 63 spans (0.3 ms) and
#: verify at most 15 nodes one by one; the span costs 34 bytes every 16 nodes.
SPAN = 16
#: Largest element body stored inline in its node's record; larger bodies are separate
#: assets, deduplicated across every chain. 4 KiB measured: on the realistic corpus an
#: asset of its own costs more (its digest twice, a row, a sparse page) than sharing the
#: repeats below this size saves; above it, repeated pastes and long answers dedup (see
#: docs/storage.md).
INLINE_MAX = 4096
#: msgpack extension types of record entries that are not an inline body.
EXT_OUT_OF_LINE = 1
EXT_TOMBSTONE = 2
#: The entry of an out-of-line element (its digest is in the row's refs, in order).
OUT_OF_LINE = b"\xc7\x00\x01"

_SPAN_PREFIX = b"immagent/span/v1\n"
#: First bytes of msgpack extension values: an element body (a map, or a JSON value) never
#: starts with one.
_EXT_FIRST = frozenset((0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8))


class NodeRow(NamedTuple):
    """A node row as a backend returns it.

    ``depth`` and ``parent`` (the digest of the node before it, None for a root) come from
    where the row is stored, ``refs`` are the digests of its out-of-line elements in order,
    ``body`` its record as stored (``codec``: immagent.codec), ``peaks`` the accumulator
    peaks kept beside span-depth rows (None elsewhere), ``added`` how many elements the
    node adds (a storage fact, for statistics; the record is what is trusted).
    """

    digest: bytes
    kind: int
    depth: int
    parent: bytes | None
    refs: tuple[bytes, ...]
    body: bytes
    codec: int = 0
    peaks: bytes | None = None
    added: int = 0


class NewNode(NamedTuple):
    """A node row to write: placed by the backend after its parent (stored, or earlier in
    the same write), or as a root."""

    digest: bytes
    kind: int
    parent: bytes | None
    refs: tuple[bytes, ...]
    body: bytes
    codec: int
    peaks: bytes | None
    added: int


class Tombstone(msgspec.Struct, frozen=True, array_like=True):
    """What a redacted element leaves in its node's record: its digest (so the node still
    verifies) and a description of the erasure (msgpack map: reason, time, ...)."""

    digest: bytes
    info: msgspec.Raw


class ChainContext(NamedTuple):
    """What appending to a node needs: its depth, its counters, the accumulator's peaks
    after its elements, and ``window``: (digest, canonical record) of every node from the
    last span depth (``depth - depth % SPAN``) up to and including it; a record is b""
    when a redacted body makes it unknown (no span can then be made over it)."""

    depth: int
    length: int
    size: int
    peaks: tuple[bytes, ...]
    window: tuple[tuple[bytes, bytes], ...]


_ROW = msgspec.msgpack.Decoder(tuple[msgspec.Raw, list[msgspec.Raw]])
_TOMBSTONE = msgspec.msgpack.Decoder(Tombstone)
_ENCODER = msgspec.msgpack.Encoder()


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def record(fields: bytes, entries: Sequence[bytes]) -> bytes:
    """A record: the node's canonical fields (a msgpack map) and one entry per element,
    each an inline canonical body or a marker (``OUT_OF_LINE``, a tombstone)."""
    return b"\x92" + fields + _array_header(len(entries)) + b"".join(entries)


def canonical_record(fields: bytes, bodies: Sequence[bytes]) -> bytes:
    """The record with every element body inline: what span hashes cover."""
    return record(fields, bodies)


def split_record(data: bytes) -> tuple[bytes, list[bytes]]:
    """(fields, entries) of a record (ValueError if it is not one)."""
    try:
        fields, entries = _ROW.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a node record: {e}") from None
    return bytes(fields), list(map(bytes, entries))


def is_marker(entry: bytes) -> bool:
    """Whether a record entry is a marker (out of line, tombstone) rather than a body."""
    return bool(entry) and entry[0] in _EXT_FIRST


def tombstone(entry: bytes) -> Tombstone | None:
    """The tombstone an entry holds, or None for any other entry (ValueError if damaged)."""
    if not is_marker(entry) or entry == OUT_OF_LINE:
        return None
    try:
        ext = msgspec.msgpack.decode(entry)
    except msgspec.DecodeError as e:
        raise ValueError(f"a damaged record entry: {e}") from None
    if not isinstance(ext, msgspec.msgpack.Ext) or ext.code != EXT_TOMBSTONE:
        raise ValueError("a record entry of an unknown extension type")
    try:
        found = _TOMBSTONE.decode(ext.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"a damaged tombstone: {e}") from None
    if len(found.digest) != 32:
        raise ValueError("a tombstone without a 32-byte digest")
    return found


def tombstone_entry(digest: bytes, info: bytes) -> bytes:
    """The record entry of a redacted element (``info``: a canonical msgpack map)."""
    return _ENCODER.encode(msgspec.msgpack.Ext(
        EXT_TOMBSTONE, _ENCODER.encode(Tombstone(digest, msgspec.Raw(info)))))


def span_hash(window: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The span hash of ``SPAN`` nodes given as (digest, canonical record), oldest first."""
    return blake3.blake3(_SPAN_PREFIX + b"".join(d + r for d, r in window)).digest()


def join_peaks(peaks: Sequence[bytes]) -> bytes:
    """The stored form of accumulator peaks (32-byte digests concatenated)."""
    return b"".join(peaks)


def split_peaks(data: bytes | None) -> tuple[bytes, ...] | None:
    """Peaks from their stored form (None if absent or malformed)."""
    if data is None or len(data) % 32:
        return None
    return tuple(data[i:i + 32] for i in range(0, len(data), 32))


def root_context(digest: bytes, fields: bytes) -> ChainContext:
    """The context of a chain's root (depth 0, no elements)."""
    return ChainContext(0, 0, 0, (), ((digest, canonical_record(fields, ())),))


def advance(parent: ChainContext, element_digests: Sequence[bytes],
            element_sizes: Sequence[int]) -> tuple[int, int, bytes | None, tuple[bytes, ...],
                                                   bytes | None]:
    """What a child of ``parent`` adding these elements holds in its fields: (length,
    size, acc, peaks after it, span) — span only at a span depth."""
    peaks, length = accumulator.append(parent.peaks, parent.length, element_digests)
    depth = parent.depth + 1
    span = None
    # A redacted body in the window (its canonical record unknown, b""): no span can be
    # made; the node is then checked the slow way, like a node written before schema 3.
    if depth % SPAN == 0 and all(r for _, r in parent.window):
        if len(parent.window) != SPAN:
            raise ValueError(f"a node at depth {depth} needs the {SPAN} nodes before it, "
                             f"the context holds {len(parent.window)}")
        span = span_hash(parent.window)
    return (length, parent.size + sum(element_sizes), accumulator.root(peaks, length),
            peaks, span)


def child_context(parent: ChainContext, digest: bytes, canonical: bytes, length: int,
                  size: int, peaks: tuple[bytes, ...]) -> ChainContext:
    """The context of the child ``advance`` described, once its digest and canonical
    record are known."""
    depth = parent.depth + 1
    entry = ((digest, canonical),)
    window = entry if depth % SPAN == 0 else parent.window + entry
    return ChainContext(depth, length, size, peaks, window)
