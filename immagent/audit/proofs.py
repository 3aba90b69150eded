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

**Who vouches for it.** A proof anchors on a state digest; which digest to believe is the
verifier's question. Either they know it (``state_digest``: recorded elsewhere, read off a
verified bundle), or the proof carries *attestations* of the state (``Store.attest``: an
Ed25519 signature over the state's id, kind and digest, ``immagent.attestations``) and a
trust policy says whose signatures count (``verify_proof(..., trust=TrustPolicy(...))``).
An attestation signs the state digest, and the state digest commits to the whole chain
through its head node's accumulator root, so a trusted attestation plus a valid path
shows the element is in a state that key vouched for; no new kind of signature is needed.
Every attestation a proof carries must be about the state it proves and verify (else the
proof is ``tampered``), whether or not a policy is given.

The document is msgpack (a fixed array layout, ``FORMAT`` and ``VERSION`` first, the
attestations last and left out when there are none), in its canonical form, at most
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

from immagent import accumulator, attestations
from immagent.assets import (
    NODE_KINDS,
    Asset,
    Digest,
    NodeFields,
    decode_element,
    digest_of,
    encode,
)
from immagent.audit import keys
from immagent.audit.trust import Signer, TrustPolicy
from immagent.exceptions import ProofError, ValidationError
from immagent.records import STATE_KINDS, StateRow

__all__ = ["FORMAT", "MAX_BYTES", "MAX_SIGNATURES", "VERSION", "Proof", "ProofResult",
           "build", "verify_proof"]

FORMAT: Final = "immagent-proof"
VERSION: Final = 1
#: Largest document accepted: a proof of 2**48 leaves is under 4 KiB plus the element's
#: body and the state's; bodies are bounded by this too.
MAX_BYTES: Final = 1 << 20
#: Largest number of digests a path or a peak list may hold (the accumulator's height).
_MAX_DIGESTS: Final = accumulator.MAX_LEAVES.bit_length()
#: Most attestations one proof carries (``Store.prove`` takes a state's oldest ones).
MAX_SIGNATURES: Final = 64


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


class Proof(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """An inclusion proof document (see the module docstring); ``signatures``: the
    state's attestations, each a ``Signed`` record as an attestation's body holds it."""

    format: str
    version: int
    state_digest: bytes
    state: ProvedState
    node: ProvedNode
    leaf: ProvedLeaf
    path: list[bytes]
    peaks: list[bytes]
    signatures: list[bytes] = []

    def encode(self) -> bytes:
        """The document's bytes (msgpack)."""
        return msgspec.msgpack.encode(self)


class ProofResult(msgspec.Struct, frozen=True):
    """What a verified proof shows: the state digest it leads to (and the state's kind),
    the element's position and digest, the element itself when the proof carries it, the
    head node and the chain's length; who attested the state (``signers``, each checked
    when the signing extra is installed), and with a trust policy the trusted keys among
    them (``trusted_by``)."""

    state_digest: bytes
    index: int
    digest: bytes
    element: Asset | None
    head: bytes
    length: int
    kind: int = 0
    signers: tuple[Signer, ...] = ()
    trusted_by: tuple[str, ...] = ()


_decoder = msgspec.msgpack.Decoder(Proof)


def build(state: StateRow, head_ref: int, node_kind: int, parent: Digest,
          elements: Sequence[Digest], length: int, size: int, span: Digest | None,
          leaves: Sequence[Digest], index: int, body: bytes | None,
          signatures: Sequence[bytes] = ()) -> Proof:
    """The proof that ``leaves[index]`` (the chain's element digests, oldest first) is in
    ``state``, whose ref ``head_ref`` is the chain's head node (of ``node_kind``, with
    that parent, own elements, counters and span), carrying ``signatures`` (the bodies
    of the state's attestations, at most ``MAX_SIGNATURES``)."""
    path, peaks = accumulator.prove(leaves, index)
    refs = [b"" if i == head_ref else r for i, r in enumerate(state.refs)]
    return Proof(FORMAT, VERSION, state.digest,
                 ProvedState(state.kind, state.stream, refs, state.body, head_ref),
                 ProvedNode(node_kind, parent, list(elements), length, size, span),
                 ProvedLeaf(index, leaves[index], body), path, peaks,
                 list(signatures[:MAX_SIGNATURES]))


def verify_proof(document: bytes, state_digest: bytes | None = None, *,
                 trust: TrustPolicy | None = None) -> ProofResult:
    """Check a proof offline. ``state_digest``: the digest the proof must lead to (recorded
    elsewhere, read off a verified bundle); ``trust``: whose attestations of the state
    count, and how many distinct keys must vouch (UntrustedError when too few do;
    ExtraNotInstalledError without the signing extra). ProofError names what is wrong
    with the document itself; with neither argument, compare ``ProofResult.state_digest``
    with a digest you trust."""
    if state_digest is not None and (not isinstance(state_digest, bytes)
                                     or len(state_digest) != 32):
        raise ValidationError("state_digest", "must be 32 bytes (a state's digest)", None)
    if trust is not None:
        if not isinstance(trust, TrustPolicy):
            raise ValidationError("trust", "must be a TrustPolicy", None)
        keys.require_signing("checking a proof against a trust policy")
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
    signers = _signers(proof.signatures, digest, state.kind)
    trusted_by: tuple[str, ...] = ()
    if trust is not None:
        trusted_by = trust.require(
            (s.key for s in signers if s.verified), signers,
            f"the proof's state {digest.hex()}",
            "" if signers else "the proof carries no attestation (attest the state with "
            "`immagent attest` or Store.attest, then prove again)")
    return ProofResult(digest, leaf.index, leaf.digest, element, head, node.length,
                       state.kind, signers, trusted_by)


def _signers(signatures: Sequence[bytes], digest: bytes, kind: int) -> tuple[Signer, ...]:
    """The attestations a proof carries, each about the proved state (its digest and kind)
    and, when the signing extra is installed, verified; ProofError otherwise."""
    if len(signatures) > MAX_SIGNATURES:
        raise ProofError("oversized", f"{len(signatures)} attestations (at most "
                         f"{MAX_SIGNATURES})")
    checkable = bool(signatures) and keys.signing_available()
    found: list[Signer] = []
    for i, raw in enumerate(signatures):
        try:
            signed, statement = attestations.decode_signed(raw)
        except ValueError as e:
            raise ProofError("malformed", f"attestation {i}: {e}") from None
        if statement.purpose != "attestation" or len(statement.subjects) != 1:
            raise ProofError("malformed", f"attestation {i} is not an attestation of one "
                             "state")
        (subject,) = statement.subjects
        if subject.digest != digest or subject.kind != kind:
            raise ProofError("tampered", f"the attestation by {signed.key_id} is about "
                             f"state {subject.id} with digest {subject.digest.hex()}, not "
                             f"the proved state ({digest.hex()})")
        verified = keys.verify_signed(signed) if checkable else None
        if verified is False:
            raise ProofError("tampered", f"the attestation by {signed.key_id} does not "
                             "verify (made by another key, or its statement or signature "
                             "was altered)")
        found.append(Signer(key_id=signed.key_id, key=signed.key, purpose=statement.purpose,
                            subjects=(str(subject.id),), verified=verified,
                            note=statement.note, signed_at=statement.signed_at))
    return tuple(found)


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
    if proof.encode() != data:
        # One proof has one form: no fields past the last, no padding, no other encodings.
        raise ProofError("malformed", "not in its canonical form (extra fields or bytes)")
    return proof


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
