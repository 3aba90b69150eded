"""Inclusion proofs: that one element (a message, an item, a value) is part of a state,
shown without the rest of the state's history, checked offline against the state's digest.

A state pins its head node; the head node's digest covers its fields, among them ``acc``,
the root of the accumulator (``immagent.accumulator``: a Merkle mountain range) over every
element digest of its chain. A proof carries, for element ``index`` of the chain:

* the element's digest (and, unless left out, its canonical body, which must hash to it);
* the sibling digests from the element up to its peak and the other peaks: O(log n)
  digests, from which the verifier recomputes ``acc``;
* the head node without ``acc``: its kind, its parent's digest, the digests of the elements
  it adds, its counters and span hash; with the recomputed ``acc`` this gives the head
  node's digest;
* the state's content (its kind, stream, refs with the head's slot left empty, body): with
  the recomputed head digest in that slot, the state's digest by its kind's own rule
  (``records.STATE_KINDS``).

A proof holds, so, if and only if the element is at ``index`` of the chain the state's
digest commits to (or someone found a blake3 collision). What it shows besides the
element: the state's own fields (an agent's name, model, config and metadata; a
checkpoint's versions), the head node's counters and the digests of the head's own
elements; nothing of the rest of the history.

The document is msgpack (a fixed array layout, ``FORMAT`` and ``VERSION`` first), at most
``MAX_BYTES``; anything else is refused with a ``ProofError`` naming the problem. Pure:
no I/O (``Store.prove`` builds proofs from the store).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final
from uuid import UUID

import blake3
import msgspec

from immagent import accumulator
from immagent.assets import (
    NODE_KINDS,
    Asset,
    Digest,
    NodeFields,
    decode_element,
    digest_of,
    encode,
)
from immagent.exceptions import ProofError
from immagent.records import STATE_KINDS, StateRow

__all__ = ["FORMAT", "MAX_BYTES", "VERSION", "Proof", "ProofResult", "build", "verify_proof"]

FORMAT: Final = "immagent-proof"
VERSION: Final = 1
#: Largest document accepted: a proof of 2**48 leaves is under 4 KiB plus the element's
#: body and the state's; bodies are bounded by this too.
MAX_BYTES: Final = 1 << 20
#: Largest number of digests a path or a peak list may hold (the accumulator's height).
_MAX_DIGESTS: Final = accumulator.MAX_LEAVES.bit_length()


class ProvedState(msgspec.Struct, frozen=True, array_like=True):
    """A state's content, its head node's slot in ``refs`` left empty (``head``)."""

    kind: int
    stream: str
    refs: list[bytes]
    body: bytes
    head: int


class ProvedNode(msgspec.Struct, frozen=True, array_like=True):
    """The head node without its accumulator root (which the proof recomputes)."""

    kind: int
    parent: bytes
    elements: list[bytes]
    length: int
    size: int
    span: bytes | None = None


class ProvedLeaf(msgspec.Struct, frozen=True, array_like=True):
    """The element: its position in the chain (0 = the first), its digest, and its
    canonical body unless the proof leaves it out."""

    index: int
    digest: bytes
    body: bytes | None = None


class Proof(msgspec.Struct, frozen=True, array_like=True):
    """An inclusion proof document (see the module docstring)."""

    format: str
    version: int
    state_digest: bytes
    state: ProvedState
    node: ProvedNode
    leaf: ProvedLeaf
    path: list[bytes]
    peaks: list[bytes]

    def encode(self) -> bytes:
        """The document's bytes (msgpack)."""
        return msgspec.msgpack.encode(self)


class ProofResult(msgspec.Struct, frozen=True):
    """What a verified proof shows: the state digest it leads to, the element's position
    and digest, the element itself when the proof carries it, and the head node."""

    state_digest: bytes
    index: int
    digest: bytes
    element: Asset | None
    head: bytes
    length: int


_decoder = msgspec.msgpack.Decoder(Proof)


def build(state: StateRow, head_ref: int, node_kind: int, parent: Digest,
          elements: Sequence[Digest], length: int, size: int, span: Digest | None,
          leaves: Sequence[Digest], index: int, body: bytes | None) -> Proof:
    """The proof that ``leaves[index]`` (the chain's element digests, oldest first) is in
    ``state``, whose ref ``head_ref`` is the chain's head node (of ``node_kind``, with
    that parent, own elements, counters and span)."""
    path, peaks = accumulator.prove(leaves, index)
    refs = [b"" if i == head_ref else r for i, r in enumerate(state.refs)]
    return Proof(FORMAT, VERSION, state.digest,
                 ProvedState(state.kind, state.stream, refs, state.body, head_ref),
                 ProvedNode(node_kind, parent, list(elements), length, size, span),
                 ProvedLeaf(index, leaves[index], body), path, peaks)


def verify_proof(document: bytes, state_digest: bytes | None = None) -> ProofResult:
    """Check a proof offline; ``state_digest``: the digest the proof must lead to (a digest
    recorded elsewhere, a signed head). ProofError names what is wrong otherwise; without
    ``state_digest``, compare ``ProofResult.state_digest`` with a digest you trust."""
    proof = _decode(document)
    state, node, leaf = proof.state, proof.node, proof.leaf
    node_type = NODE_KINDS.get(node.kind)
    if node_type is None:
        raise ProofError("malformed", f"kind {node.kind} is not a chain node kind")
    if (not 0 <= leaf.index < node.length or node.length > accumulator.MAX_LEAVES
            or node.size < 0 or len(node.elements) > node.length):
        raise ProofError("malformed", f"element {leaf.index} of a chain of {node.length}")
    if any(len(d) != 32 for d in (leaf.digest, node.parent, *node.elements, *proof.path,
                                  *proof.peaks)) or (node.span is not None
                                                     and len(node.span) != 32):
        raise ProofError("malformed", "a digest that is not 32 bytes")
    if len(proof.path) > _MAX_DIGESTS or len(proof.peaks) > _MAX_DIGESTS:
        raise ProofError("oversized", "more digests than any accumulator's height")
    element = None
    if leaf.body is not None:
        prefix = bytes((int(node_type.element_kind),))
        if blake3.blake3(prefix + leaf.body).digest() != leaf.digest:
            raise ProofError("tampered", "the element's body does not hash to its digest")
        try:
            element = decode_element(node_type.element_kind)(leaf.body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise ProofError("malformed", f"the element's body cannot be decoded: {e}") \
                from None
    try:
        acc = accumulator.root_from_proof(leaf.digest, leaf.index, node.length, proof.path,
                                          proof.peaks)
    except ValueError as e:
        raise ProofError("not_in_state", f"element {leaf.index}: {e}") from None
    fields = encode(NodeFields(length=node.length, size=node.size, acc=acc, span=node.span))
    head = digest_of(node.kind, fields, (node.parent, *node.elements))
    if not 0 <= state.head < len(state.refs) or state.refs[state.head] != b"":
        raise ProofError("malformed", "the state's head slot is not an empty ref")
    refs = tuple(head if i == state.head else r for i, r in enumerate(state.refs))
    if any(len(r) != 32 for r in refs):
        raise ProofError("malformed", "a state ref that is not 32 bytes")
    rules = STATE_KINDS.get(state.kind)
    if rules is None:
        raise ProofError("malformed", f"unknown state kind {state.kind}")
    row = StateRow(id=UUID(int=0), parent_id=None, kind=state.kind, stream=state.stream,
                   refs=refs, body=state.body, digest=b"", created_at=_EPOCH)
    try:
        digest = rules.digest(row)
        kinds = rules.ref_kinds(row)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError,
            RecursionError) as e:
        raise ProofError("malformed", f"the state's content cannot be read: {e}") from None
    if kinds[state.head] != node.kind:
        raise ProofError("malformed", f"the state's ref {state.head} holds a kind "
                         f"{kinds[state.head]}, not a chain of kind {node.kind}")
    if digest != proof.state_digest:
        # The element is not in the chain whose root the proof computed, or a part of the
        # proof was changed: either way it does not lead to the state it names.
        raise ProofError("not_in_state", f"the proof leads to state digest {digest.hex()}, "
                         f"not to {proof.state_digest.hex()} it names")
    if state_digest is not None and digest != state_digest:
        raise ProofError("wrong_state", f"it proves state digest {digest.hex()}, not "
                         f"{state_digest.hex()}")
    return ProofResult(digest, leaf.index, leaf.digest, element, head, node.length)


def _decode(document: object) -> Proof:
    if not isinstance(document, bytes | bytearray | memoryview):
        raise ProofError("malformed", f"a proof is bytes, got {type(document).__name__}")
    data = bytes(document)
    if len(data) > MAX_BYTES:
        raise ProofError("oversized", f"{len(data)} bytes (at most {MAX_BYTES})")
    try:
        proof = _decoder.decode(data)
    except msgspec.DecodeError as e:
        problem = "truncated" if "truncated" in str(e) or "end of" in str(e) else "malformed"
        raise ProofError(problem, f"not a proof document: {e}") from None
    except (msgspec.ValidationError, RecursionError) as e:
        raise ProofError("malformed", f"not a proof document: {e}") from None
    if proof.format != FORMAT or proof.version != VERSION:
        raise ProofError("malformed", f"a {proof.format!r} document of version "
                         f"{proof.version} (this immagent reads {FORMAT!r} {VERSION})")
    return proof


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
