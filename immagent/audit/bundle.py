"""Audit bundles: one self-contained file holding states, every asset they reach, the
attestations kept about them and the signatures made when it was written, verifiable
offline and importable into any store with the same ids and digests.

Format (version 4; versions 1, 2 and 3 are still read)::

    magic   b"\\x89immagent-bundle\\r\\n\\x1a\\n"   (PNG-style: catches text-mode mangling)
    frame*  u32 big-endian length, then one msgpack record
              header  {"format": "immagent-bundle", "version": 4, "head": uuid,
                       "created_at": time, "lineage": bool}
              state   ["state", id, parent, kind, stream, refs, body, digest, time]
                        the states, newest (the head) first; then the states attached to
                        them (attestations), each after every state it may be about
              asset   ["asset", digest, kind, body, refs]   every reachable asset, canonical
              gone    ["gone", digest, kind, tombstone]     a redacted element (below)
              sig     ["sig", statement, key, signature]    signatures made at export
              end     ["end", states, assets, checksum]     last frame, then end of file

``lineage`` True: the states are one lineage, each the next one's parent (an agent's
export); False: any set of states, each state's parent either in the bundle or absent from
it, never a cycle (a LangGraph thread). Version 2 is a lineage and version 3 a set, both
without attached states or signatures; version 1 held agent records.

A bundle carries asset rows in their canonical form, the bytes the digests cover: bodies
uncompressed whatever codec the store used (``immagent.codec``), so a bundle needs no
dictionary and imports into any store, which compresses them its own way. Reading one runs
the same checks as reading a database (``rows.check_row``, ``records.check_state``) and the
content rules the API applies when it makes a record (``store.rules``); ``_Links`` resolves
every reference with the one kind it must have, checks node counters against the chain,
refuses unreferenced assets, and the lineage must end without a cycle. Exports run the same
checks, so a store never writes a bundle it would refuse to read.

**Redacted elements** (``immagent.redaction``) travel as ``gone`` records: the element's
digest and kind and its tombstone (``chains.Tombstone``: the digest again, the reason, the
time, the erased body's length), never the body. The nodes that list it still hash to
their digests, their counters count the length the tombstone states, and an import writes
the tombstone, not a body, so a bundle never brings an erased body back (a bundle made
*before* a redaction is refused by the store that redacted it: ``RedactedError``). A
reader older than ``gone`` records refuses such a bundle as malformed.

``checksum`` is blake3 over every byte before the end frame. It is checked last: the
per-record checks name the bad record, the checksum catches what no content digest covers
(ids, parents, timestamps, framing) and truncation. Decoding untrusted bytes is bounded:
frame sizes are checked before reading, nesting deeper than Python's recursion limit is a
BundleError, and the content rules bound what survives decoding (``validate.MAX_DEPTH``).

**Signatures** (``export(..., sign=[key])``). Each ``sig`` record holds a statement
(``immagent.attestations``) naming the bundle format, every head of the bundle (its states
no other state of it names as parent, attached ones aside) by id, kind and digest, and the
*content checksum*: blake3 of every byte before the first ``sig`` record. The reader
rebuilds that statement from what it read and refuses a signature over anything else (other
heads, another format, a bundle altered after it was signed) as tampering, then checks the
Ed25519 signature (with the signing extra; without it the signature is reported unchecked
unless a trust policy asks for it). A trust policy (``verify_bundle(path, trust=...)``)
then counts distinct trusted keys that vouch for the bundle (``immagent.audit.trust``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from uuid import UUID

import blake3
import msgspec

from immagent import accumulator, attestations, chain_rows, chains, redaction
from immagent.assets import NODE_KINDS, ConversationNode, Digest, Kind, decode_asset, ref_kinds
from immagent.attestations import Signed, Statement, Subject
from immagent.audit import files, keys
from immagent.audit.trust import Signer, TrustPolicy
from immagent.audit.verify import closing_iter
from immagent.codec import NO_DICTIONARIES, ZstdDictionary
from immagent.exceptions import (
    BundleError,
    FanOutError,
    IntegrityError,
    ValidationError,
)
from immagent.records import STATE_KINDS, AgentRecord, StateRow, check_state
from immagent.rows import StoredAsset, canonical_row, check_row, join_refs, split_refs
from immagent.store import rules
from immagent.validate import check_fan_out

if TYPE_CHECKING:
    from immagent.store.backend import AuditBackend

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SET_VERSION",
    "BundleInfo",
    "conflict",
    "export_bundle",
    "read",
    "read_bundle",
    "verify_bundle",
]

MAGIC: Final = b"\x89immagent-bundle\r\n\x1a\n"
#: The version every export writes (a lineage or a set, attached states, signatures).
FORMAT_VERSION: Final = 4
#: The version that held a set of states rather than one lineage (read, no longer written).
SET_VERSION: Final = 3
#: Versions this immagent reads (1: agent records; 2: state rows; 3: a set of states;
#: 4: either, with attached states and signatures).
_READABLE: Final = frozenset({1, 2, 3, 4})
#: Most signature records one bundle may carry.
MAX_SIGNATURES: Final = 64
#: Largest frame accepted when reading; bigger means a corrupt length, not a real record.
MAX_FRAME: Final = 1 << 30
#: Largest header frame (a header is a few dozen bytes).
MAX_HEADER: Final = 1 << 16
#: What msgspec raises on malformed bytes; RecursionError on nesting deeper than Python's
#: recursion limit (untrusted bytes may nest a million arrays deep).
_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, ValueError,
                         RecursionError)
_LEN = struct.Struct(">I")


class BundleInfo(msgspec.Struct, frozen=True):
    """What a bundle holds: its head state, the state ids and the asset totals, the
    attestations and signatures it carries (and which trusted keys vouched, when a trust
    policy was applied)."""

    path: str
    version: int
    head: UUID
    head_digest: Digest
    agents: tuple[UUID, ...]  # the states' ids, newest (the head) first (attached ones apart)
    assets: int
    asset_bytes: int  # total stored body bytes
    file_bytes: int
    attestations: tuple[UUID, ...] = ()  # the attached states' ids
    signers: tuple[Signer, ...] = ()  # bundle signatures, then attestations
    #: Key ids of the trusted keys that vouch for the bundle (with a trust policy).
    trusted_by: tuple[str, ...] = ()
    lineage: bool = True  # the states are one lineage (else a set: version 3, or 4's)
    #: Its states that no other state of it names as parent (what a signature names).
    heads: tuple[UUID, ...] = ()


class _Header(msgspec.Struct, frozen=True):
    format: str
    version: int
    head: UUID
    created_at: datetime
    lineage: bool = True  # version 4: one lineage, or a set (version 3 is always a set)


class _Agent(msgspec.Struct, frozen=True, array_like=True, tag="agent"):
    """Version 1's state record: an agent record as a map."""

    record: AgentRecord


class _State(msgspec.Struct, frozen=True, array_like=True, tag="state"):
    id: UUID
    parent_id: UUID | None
    kind: int
    stream: str
    refs: bytes
    body: bytes
    digest: bytes
    created_at: datetime

    def row(self) -> StateRow:
        return StateRow(id=self.id, parent_id=self.parent_id, kind=self.kind,
                        stream=self.stream, refs=split_refs(self.refs), body=self.body,
                        digest=self.digest, created_at=self.created_at)


class _Asset(msgspec.Struct, frozen=True, array_like=True, tag="asset"):
    digest: bytes
    kind: int
    body: bytes
    refs: bytes = b""  # a node's links, 32-byte digests concatenated (hashed, see digest_of)


class _Gone(msgspec.Struct, frozen=True, array_like=True, tag="gone"):
    """A redacted element: its digest, kind and tombstone entry (``chains``)."""

    digest: bytes
    kind: int
    tombstone: bytes


class _Sig(msgspec.Struct, frozen=True, array_like=True, tag="sig"):
    """A signature made at export: ``attestations.Signed``'s fields."""

    statement: bytes
    key: bytes
    signature: bytes


class _End(msgspec.Struct, frozen=True, array_like=True, tag="end"):
    agents: int
    assets: int
    checksum: bytes


_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(_Agent | _State | _Asset | _Gone | _Sig | _End)


# -- the checks reading and writing share -----------------------------------------------


class _Links:
    """Every reference of a bundle's records and what each record is, resolved when all are
    known: each reference is to a record of the one kind it must have (``assets.ref_kinds``,
    ``StateKind.ref_kinds``: the same table verify and reads use), each asset is referenced
    by something in the bundle, each node's counters are its parent's plus its elements.
    Memory: a few dozen bytes per record (bodies are not kept)."""

    def __init__(self) -> None:
        self.kinds: dict[Digest, int] = {}
        self.sizes: dict[Digest, int] = {}  # body bytes of the elements nodes count
        self.nodes: dict[Digest, ConversationNode] = {}
        # ref -> (kind it must have, the first record referring to it)
        self.wanted: dict[Digest, tuple[int, Digest | UUID]] = {}

    def state(self, row: StateRow) -> str | None:
        """Note a state's references; a problem already visible is returned."""
        return self._want(row.id, row.refs, STATE_KINDS[row.kind].ref_kinds(row))

    def asset(self, row: StoredAsset) -> str | None:
        """Note an asset (already verified) and its references."""
        if row.digest in self.kinds:
            return f"asset {row.digest.hex()} appears twice"
        self.kinds[row.digest] = row.kind
        if row.kind in NODE_KINDS:
            node = decode_asset(row.kind, row.body, row.refs)
            assert isinstance(node, ConversationNode)
            self.nodes[row.digest] = node
        else:
            self.sizes[row.digest] = len(row.body)
        return self._want(row.digest, row.refs, ref_kinds(row.kind, len(row.refs)))

    def tombstone(self, row: StoredAsset, size: int) -> str | None:
        """Note a redacted element (a verified tombstone) of ``size`` erased bytes."""
        if row.digest in self.kinds:
            return f"asset {row.digest.hex()} appears twice"
        self.kinds[row.digest] = row.kind
        self.sizes[row.digest] = size
        return None

    def _want(self, referrer: Digest | UUID, refs: tuple[Digest, ...],
              kinds: tuple[int, ...]) -> str | None:
        if len(refs) != len(kinds):
            return f"{_who(referrer)} has {len(refs)} refs where its kind has {len(kinds)}"
        for ref, kind in zip(refs, kinds, strict=True):
            first = self.wanted.setdefault(ref, (kind, referrer))
            if first[0] != kind:  # one digest, one kind: one of the two is a lie
                return (f"asset {ref.hex()} is referenced as a {_kind_name(first[0])} by "
                        f"{_who(first[1])} and as a {_kind_name(kind)} by {_who(referrer)}")
        return None

    def problem(self, where: str = "the bundle") -> str | None:
        """The first unresolved reference (missing from ``where``), wrong kind, bad counter
        or unreferenced asset; None if all is sound."""
        for digest, (kind, referrer) in self.wanted.items():
            found = self.kinds.get(digest)
            if found is None:
                return (f"asset {digest.hex()} referenced by {_who(referrer)} is missing "
                        f"from {where}")
            if found != kind:
                return (f"asset {digest.hex()} referenced by {_who(referrer)} is a "
                        f"{_kind_name(found)}, expected a {_kind_name(kind)}")
        for node in self.nodes.values():
            parent = None if node.parent is None else self.nodes[node.parent]
            wrong = rules.check_counters(
                node.digest, (node.length, node.size),
                None if parent is None else (parent.length, parent.size),
                [self.sizes[d] for d in node.messages])
            if wrong is not None:
                return wrong
        for digest in self.kinds:
            if digest not in self.wanted:
                return (f"asset {digest.hex()} is not referenced by any state or asset "
                        "of the bundle")
        return self._accumulators()

    def _accumulators(self) -> str | None:
        """The first node whose accumulator root (schema 3) is not the root over its chain.
        (Span hashes, which only speed up reads, are checked when a bundle is imported and
        by ``Store.verify``: they need the elements' bodies, which this check keeps out of
        memory.)"""
        after: dict[Digest, tuple[tuple[bytes, ...], int]] = {}
        for node in self.nodes.values():
            line: list[ConversationNode] = []
            current: ConversationNode | None = node
            while current is not None and current.digest not in after:
                line.append(current)
                current = None if current.parent is None else self.nodes[current.parent]
            state = ((), 0) if current is None else after[current.digest]
            for link in reversed(line):
                state = accumulator.append(state[0], state[1], link.messages)
                after[link.digest] = state
                if link.acc is not None and accumulator.root(*state) != link.acc:
                    return (f"asset {link.digest.hex()}'s accumulator root is not the root "
                            "over its chain")
        return None


def _content_problem(record: StateRow | StoredAsset) -> str | None:
    """Why a verified record breaks the content rules the API enforces, or None."""
    try:
        if isinstance(record, StateRow):
            rules.check_state_content(record, _who(record.id, record.kind))
        else:
            rules.check_asset_content(decode_asset(record.kind, record.body, record.refs),
                                      f"asset {record.digest.hex()}")
    except ValidationError as e:
        return f"breaks a rule the API enforces: {e}"
    return None


# -- writing ------------------------------------------------------------------------------


class _Writer:
    """Frames records into a buffer, hashing every byte (for the end checksum); the caller
    moves the buffer to the file in a worker thread, so the event loop never blocks."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._hash = blake3.blake3()
        self.size = 0

    def raw(self, data: bytes) -> None:
        self.buffer += data
        self._hash.update(data)
        self.size += len(data)

    def frame(self, record: object) -> None:
        payload = _encoder.encode(record)
        self.raw(_LEN.pack(len(payload)) + payload)

    def checksum(self) -> bytes:
        """blake3 of every byte written so far."""
        digest: bytes = self._hash.digest()
        return digest

    def end(self, agents: int, assets: int) -> None:
        # The end frame itself is outside the checksum (it carries it).
        payload = _encoder.encode(_End(agents, assets, self._hash.digest()))
        self.buffer += _LEN.pack(len(payload)) + payload
        self.size += _LEN.size + len(payload)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


async def export_bundle(backend: AuditBackend, states: list[StateRow],
                        path: str | os.PathLike[str],
                        dictionaries: Mapping[int, ZstdDictionary] = NO_DICTIONARIES, *,
                        lineage: bool = True, attached: Sequence[StateRow] = (),
                        sign: Sequence[keys.SigningKey] = (),
                        ) -> BundleInfo:
    """Write the bundle of ``states`` (a state and its ancestors, newest first, as read and
    verified by the store; with ``lineage=False`` any set of states, newest first), the
    ``attached`` states about them (attestations, oldest first) and a signature by each of
    ``sign`` to ``path`` atomically (temp file, fsync, rename).

    Assets are re-hashed on the way out, and the export fails (writing nothing at ``path``)
    if the store is corrupt or an asset vanished meanwhile (an ancestor deleted and swept
    between the lineage read and the asset walk): a bundle is only written when complete.
    """
    dest = files.writable_path(path)
    signers = _signing_keys(sign)
    head = states[0]
    everything = [*states, *attached]
    roots = sorted({d for r in everything for d in r.refs})
    writer = _Writer()
    writer.raw(MAGIC)
    # Totals are known only after the walk, so they go in the end record.
    writer.frame(_Header(format="immagent-bundle", version=FORMAT_VERSION, head=head.id,
                         created_at=datetime.now(UTC), lineage=lineage))
    for r in everything:
        writer.frame(_State(r.id, r.parent_id, r.kind, r.stream, join_refs(r.refs), r.body,
                            r.digest, r.created_at))
    # Memory: a few dozen bytes per asset of this lineage (_Links) and one batch of bodies.
    links = _Links()
    for r in everything:
        _refuse_export(head, links.state(r) or _content_problem(r))
    _refuse_export(head, _cycle_problem(states, lineage)
                   or _attached_problem(states, attached))
    asset_bytes = 0
    file = await asyncio.to_thread(files.TempFile, dest)
    try:
        # Chain nodes first, each as the asset form bundles carry (its refs and fields)
        # plus its inline elements, every one checked against the node's digest; then the
        # other assets. A failed export releases the cursor's pooled connection at once.
        async with closing_iter(backend.iter_nodes(roots)) as node_batches:
            async for node_batch in node_batches:
                for node_row in node_batch:
                    try:
                        node, elements, stones = chain_rows.as_assets(node_row,
                                                                      dictionaries)
                    except IntegrityError as e:
                        _refuse_export(head, str(e))
                    for stone in stones:
                        if stone.digest in links.kinds:
                            continue
                        _refuse_export(head, links.tombstone(stone, _gone_size(stone)))
                        writer.frame(_Gone(stone.digest, stone.kind, stone.body))
                    for row in (node, *elements):
                        if row.digest in links.kinds:
                            continue
                        _refuse_export(head, links.asset(row) or _content_problem(row))
                        asset_bytes += len(row.body)
                        writer.frame(_Asset(row.digest, row.kind, row.body,
                                            join_refs(row.refs)))
                await asyncio.to_thread(file.write, writer.take())
        async with closing_iter(backend.iter_assets(roots)) as batches:
            async for batch in batches:
                for row in batch:
                    if row.digest in links.kinds:
                        continue
                    row = _exported(row, dictionaries)
                    _refuse_export(head, links.asset(row) or _content_problem(row))
                    asset_bytes += len(row.body)
                    writer.frame(_Asset(row.digest, row.kind, row.body, join_refs(row.refs)))
                await asyncio.to_thread(file.write, writer.take())
        # An asset vanished meanwhile shows as missing: a bundle is only written complete.
        _refuse_export(head, links.problem("the store"))
        statement = Statement(purpose="bundle", subjects=_heads(states),
                              format=FORMAT_VERSION, checksum=writer.checksum())
        made = [key.sign(statement) for key in signers]
        for signed in made:
            writer.frame(_Sig(signed.statement, signed.key, signed.signature))
        writer.end(len(everything), len(links.kinds))
        await asyncio.to_thread(file.commit, writer.take())
    finally:
        await asyncio.to_thread(file.discard)
    return BundleInfo(path=str(dest), version=FORMAT_VERSION, head=head.id,
                      head_digest=head.digest, agents=tuple(r.id for r in states),
                      assets=len(links.kinds), asset_bytes=asset_bytes,
                      file_bytes=writer.size, attestations=tuple(r.id for r in attached),
                      signers=tuple(_signer(s, True) for s in made), lineage=lineage,
                      heads=tuple(h.id for h in _heads(states)))


def _signing_keys(sign: object) -> list[keys.SigningKey]:
    """The keys to sign with, checked before anything is written."""
    if isinstance(sign, keys.SigningKey):
        return [sign]
    if isinstance(sign, str | bytes) or not isinstance(sign, Sequence):
        raise ValidationError("sign", "must be a list of SigningKey", None)
    for i, key in enumerate(sign):
        if not isinstance(key, keys.SigningKey):
            raise ValidationError(f"sign[{i}]", f"must be a SigningKey (immagent.audit.keys."
                                  f"load_signing_key), got {type(key).__name__}", None)
    if len(sign) > MAX_SIGNATURES:
        raise ValidationError("sign", f"at most {MAX_SIGNATURES} signatures", None)
    return list(sign)


def _heads(states: Sequence[StateRow]) -> tuple[Subject, ...]:
    """The heads of a bundle's states (attached ones aside): those no other state of it
    names as parent, in bundle order, by (id, kind, digest): what a bundle signature
    names."""
    parents = {s.parent_id for s in states}
    return tuple(Subject(s.id, s.kind, s.digest) for s in states if s.id not in parents)


def _signer(signed: Signed, verified: bool | None) -> Signer:
    statement = attestations.decode_statement(signed.statement)
    return Signer(key_id=signed.key_id, key=signed.key, purpose=statement.purpose,
                  subjects=tuple(str(s.id) for s in statement.subjects), verified=verified,
                  note=statement.note, signed_at=statement.signed_at)


def _refuse_export(head: StateRow, problem: str | None) -> None:
    """What would make the bundle unreadable stops the export, naming it."""
    if problem is not None:
        raise IntegrityError(f"cannot export state {head.id}: {problem} (run store.verify())")


def _exported(row: StoredAsset, dictionaries: Mapping[int, ZstdDictionary]) -> StoredAsset:
    """The canonical form of a stored asset; a corrupt one is refused."""
    found = check_row(row, dictionaries)
    if found is not None:
        raise IntegrityError(f"cannot export: stored asset {row.digest.hex()} is "
                             f"{found[0]} ({found[1]}); run store.verify()")
    return canonical_row(row, dictionaries)


# -- reading ------------------------------------------------------------------------------


def verify_bundle(path: str | os.PathLike[str], *, trust: TrustPolicy | None = None
                  ) -> BundleInfo:
    """Check a bundle offline, without any database: every asset re-hashed and decoded,
    every reference resolved inside it with the kind it must have, every state's digest
    recomputed, the lineage a chain from the head (a set: parents acyclic), every
    attestation about a state of the bundle, every signature over exactly this bundle (and
    valid, when the signing extra is installed), and the file checksum. Raises BundleError
    naming the first bad asset (digest hex), state (id) or signature (key id).

    With ``trust``, also require ``trust.sigs_needed`` distinct trusted keys to vouch for
    it (UntrustedError otherwise; ExtraNotInstalledError without the signing extra)."""
    info, _, _ = read_bundle(path, keep_assets=False, trust=trust)
    return info


async def read(path: str | os.PathLike[str]
               ) -> tuple[BundleInfo, list[StateRow], list[StoredAsset]]:
    """``read_bundle`` in a worker thread (the event loop never blocks on the file)."""
    return await asyncio.to_thread(read_bundle, path, keep_assets=True)


def conflict(info: BundleInfo, state_id: UUID) -> BundleError:
    """The error for a bundle state that exists in the target store with other content."""
    return BundleError(f"{info.path}: state {state_id} already exists in this store with "
                       "different content or parent; refusing to import")


def read_bundle(path: str | os.PathLike[str], *, keep_assets: bool = True,
                trust: TrustPolicy | None = None
                ) -> tuple[BundleInfo, list[StateRow], list[StoredAsset]]:
    """Read and fully verify a bundle: (info, state rows newest first with the attached
    ones last, assets if kept); with ``trust``, judge it by that policy too.

    Everything returned has passed every check of verify_bundle, in this same pass over the
    same bytes (no window between verifying and loading).
    """
    if trust is not None:
        if not isinstance(trust, TrustPolicy):
            raise ValidationError("trust", "must be a TrustPolicy", None)
        keys.require_signing("checking a bundle against a trust policy")
    source = files.readable_path(path)
    try:
        file = source.open("rb")
    except OSError as e:
        raise ValidationError("path", f"cannot read {source}: {e.strerror}", str(source)) from e
    try:
        with file:
            info, states, assets = _read(file, source, keep_assets)
    except OSError as e:  # e.g. /proc/self/mem: a regular file that cannot be read
        raise BundleError(f"{source} cannot be read: {e.strerror or e}",
                          unusable=True) from e
    if trust is not None:
        info = _judge(info, trust)
    return info, states, assets


def _read(file: IO[bytes], source: Path, keep_assets: bool
          ) -> tuple[BundleInfo, list[StateRow], list[StoredAsset]]:
    states: list[StateRow] = []
    attached: list[StateRow] = []
    state_ids: set[UUID] = set()
    assets: list[StoredAsset] = []
    sigs: list[Signed] = []
    links = _Links()
    asset_bytes = 0

    def refuse(problem: str | None) -> None:
        if problem is not None:
            raise BundleError(f"{source}: {problem}")

    hasher = blake3.blake3()
    magic = file.read(len(MAGIC))
    if magic != MAGIC:
        raise BundleError(f"{source} is not an immagent bundle (bad magic bytes)",
                          unusable=True)
    hasher.update(magic)
    frames = _frames(file, source, hasher)
    header = _read_header(next(frames, None), source)
    signed_part: bytes | None = None  # the content checksum, at the first signature
    end: tuple[_End, bytes] | None = None  # the end record and the checksum it must hold
    for offset, payload, checksum in frames:
        try:
            record = _record_decoder.decode(payload)
        except _DECODE_ERRORS as e:  # also invalid UTF-8 in a str, and deep nesting
            raise BundleError(f"{source}: malformed record at byte {offset}: "
                              f"{_decode_reason(e)}") from None
        if isinstance(record, _End):
            end = record, checksum
            if file.read(1):
                raise BundleError(f"{source}: data after the end record (byte {offset})")
            break
        if isinstance(record, _Sig):
            if header.version < FORMAT_VERSION:
                raise BundleError(f"{source}: a signature record at byte {offset} in a "
                                  f"version {header.version} bundle")
            if len(sigs) == MAX_SIGNATURES:
                raise BundleError(f"{source}: more than {MAX_SIGNATURES} signatures")
            if signed_part is None:
                signed_part = checksum
            sigs.append(Signed(record.statement, record.key, record.signature))
            continue
        if sigs:  # everything before the signatures is what they cover
            raise BundleError(f"{source}: a record after the signatures (byte {offset})")
        if isinstance(record, _Agent | _State):
            state = _verified_state(record, source)
            if state.id in state_ids:
                raise BundleError(f"{source}: {_who(state.id)} appears twice")
            state_ids.add(state.id)
            if STATE_KINDS[state.kind].attached:
                if header.version < FORMAT_VERSION:
                    raise BundleError(f"{source}: {_who(state.id, state.kind)} is attached "
                                      f"to another state; a version {header.version} "
                                      "bundle holds none")
                attached.append(state)
            elif attached:
                raise BundleError(f"{source}: {_who(state.id, state.kind)} comes after the "
                                  "attached states (they follow every state they are about)")
            else:
                states.append(state)
            refuse(links.state(state) or _content_problem(state))
            continue
        if isinstance(record, _Gone):
            row = _verified_tombstone(record, source)
            refuse(links.tombstone(row, _gone_size(row)))
            if keep_assets:
                assets.append(row)
            continue
        row = _verified_asset(record, source)
        refuse(links.asset(row) or _content_problem(row))
        asset_bytes += len(row.body)
        if keep_assets:
            assets.append(row)
    size = file.tell()
    if end is None:
        raise BundleError(f"{source} is truncated: no end record")
    lineage = _lineage_form(header)
    _check_lineage(states, header, lineage, source)
    refuse(_attached_problem(states, attached))
    refuse(links.problem())
    last, checksum = end
    count = len(states) + len(attached)
    if last.agents != count or last.assets != len(links.kinds):
        raise BundleError(f"{source}: record counts do not match the end record "
                          f"({count} states, {len(links.kinds)} assets read)")
    if last.checksum != checksum:
        raise BundleError(f"{source}: file checksum mismatch (ids, lineage, timestamps or "
                          "framing were altered)")
    signers = _checked_signers(source, header, states, attached,
                               signed_part if signed_part is not None else checksum, sigs)
    info = BundleInfo(path=str(source), version=header.version, head=header.head,
                      head_digest=states[0].digest, agents=tuple(s.id for s in states),
                      assets=len(links.kinds), asset_bytes=asset_bytes, file_bytes=size,
                      attestations=tuple(s.id for s in attached), signers=signers,
                      lineage=lineage, heads=tuple(h.id for h in _heads(states)))
    return info, [*states, *attached], assets


def _lineage_form(header: _Header) -> bool:
    """Whether a bundle's states must be one lineage (versions 1, 2, and 4 saying so)."""
    return header.version < SET_VERSION or (header.version > SET_VERSION and header.lineage)


def _attached_problem(states: Sequence[StateRow], attached: Sequence[StateRow]) -> str | None:
    """Why the attached states do not fit the states they are about, or None: each must
    be about a state of the bundle (its parent), and an attestation must name that
    state's digest (one about other content is not about this state)."""
    by_id = {s.id: s for s in states}
    for row in attached:
        subject = by_id.get(row.parent_id) if row.parent_id is not None else None
        if subject is None:
            return (f"{_who(row.id, row.kind)} is about state {row.parent_id}, which the "
                    "bundle does not hold")
        if row.kind == Kind.ATTESTATION:
            _, _, named = attestations.attestation_of(row.kind, row.stream, row.refs,
                                                      row.body)
            if (named.kind, named.digest) != (subject.kind, subject.digest):
                return (f"attestation {row.id} vouches for other content than state "
                        f"{subject.id} holds (digest {named.digest.hex()}, the state's "
                        f"{subject.digest.hex()})")
    return None


def _checked_signers(source: Path, header: _Header, states: Sequence[StateRow],
                     attached: Sequence[StateRow], content: bytes,
                     sigs: Sequence[Signed]) -> tuple[Signer, ...]:
    """Every signature the bundle carries, checked: a bundle signature must be over exactly
    this bundle (format, heads, content checksum) and an attestation about its subject's
    digest (checked with the states); then, where the signing extra is installed, each
    Ed25519 signature must verify. A signature that is over something else, or does not
    verify, is tampering: BundleError naming the key."""
    expected = Statement(purpose="bundle", subjects=_heads(states), format=header.version,
                         checksum=content)
    found: list[tuple[Signed, str]] = []
    for signed in sigs:
        try:
            statement = attestations.check_signed(signed)
        except ValueError as e:
            raise BundleError(f"{source}: a signature record is malformed: {e}") from None
        who = f"the signature by {signed.key_id}"
        if statement.purpose != "bundle":
            raise BundleError(f"{source}: {who} is not a bundle signature (an "
                              f"{statement.purpose} statement)")
        if statement.format != header.version:
            raise BundleError(f"{source}: {who} is over a version {statement.format} "
                              f"bundle, this one is version {header.version}")
        if statement.subjects != expected.subjects:
            raise BundleError(f"{source}: {who} is over other heads than this bundle's "
                              f"({_names(statement.subjects)}; the bundle's: "
                              f"{_names(expected.subjects)})")
        if statement.checksum != expected.checksum:
            raise BundleError(f"{source}: {who} is over other content: the bundle was "
                              "altered after it was signed")
        found.append((signed, "bundle"))
    for row in attached:
        if row.kind == Kind.ATTESTATION:
            signed, _, _ = attestations.attestation_of(row.kind, row.stream, row.refs,
                                                       row.body)
            found.append((signed, f"attestation {row.id}"))
    checkable = keys.signing_available()
    signers: list[Signer] = []
    for signed, what in found:
        verified = keys.verify_signed(signed) if checkable else None
        if verified is False:
            name = f"the signature by {signed.key_id}" if what == "bundle" else what
            raise BundleError(f"{source}: {name} does not verify (made by another key, or "
                              "its statement or signature was altered)")
        signers.append(_signer(signed, verified))
    return tuple(signers)


def _names(subjects: Sequence[Subject]) -> str:
    shown = ", ".join(f"{s.id}@{s.digest.hex()[:12]}" for s in subjects[:3])
    return shown + (f" and {len(subjects) - 3} more" if len(subjects) > 3 else "")


def _judge(info: BundleInfo, trust: TrustPolicy) -> BundleInfo:
    """``info`` with the trusted keys that vouch for the bundle, or UntrustedError: a key
    vouches with a valid bundle signature, or with valid attestations of every head."""
    heads = {str(h) for h in info.heads}
    vouching: set[bytes] = set()
    attested: dict[bytes, set[str]] = {}
    for signer in info.signers:
        if not signer.verified:
            continue
        if signer.purpose == "bundle":
            vouching.add(signer.key)
        else:
            attested.setdefault(signer.key, set()).update(signer.subjects)
    vouching |= {key for key, subjects in attested.items() if heads <= subjects}
    ids = trust.require(vouching, info.signers, str(info.path))
    return msgspec.structs.replace(info, trusted_by=ids)


def _decode_reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)


def _frames(file: IO[bytes], source: Path, hasher: Any) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, payload, checksum of every byte before this frame), frame by frame."""
    size = os.fstat(file.fileno()).st_size
    while True:
        offset = file.tell()
        checksum = hasher.digest()
        prefix = file.read(_LEN.size)
        if not prefix:
            return
        if len(prefix) < _LEN.size:
            raise BundleError(f"{source} is truncated at byte {offset}")
        (length,) = _LEN.unpack(prefix)
        # Checked before reading: a damaged length must not make us allocate gigabytes.
        if length > MAX_FRAME or length > size - offset - _LEN.size:
            raise BundleError(f"{source} is truncated or damaged: a record of {length} bytes "
                              f"at byte {offset} runs past the end of the file")
        payload = file.read(length)
        if len(payload) < length:
            raise BundleError(f"{source} is truncated at byte {offset}")
        hasher.update(prefix)
        hasher.update(payload)
        yield offset, payload, checksum


def _read_header(frame: tuple[int, bytes, bytes] | None, source: Path) -> _Header:
    if frame is None:
        raise BundleError(f"{source} is truncated: no header")
    if len(frame[1]) > MAX_HEADER:
        raise BundleError(f"{source}: malformed header ({len(frame[1])} bytes)")
    try:
        raw = msgspec.msgpack.decode(frame[1])
    except _DECODE_ERRORS as e:
        raise BundleError(f"{source}: malformed header: {_decode_reason(e)}") from None
    if not isinstance(raw, dict) or raw.get("format") != "immagent-bundle":
        raise BundleError(f"{source}: malformed header (not an immagent bundle)")
    version = raw.get("version")
    if type(version) is not int or version not in _READABLE:
        raise BundleError(f"{source}: bundle format version {version!r} is not "
                          f"supported (this immagent reads versions "
                          f"{', '.join(map(str, sorted(_READABLE)))})", unusable=True)
    if "lineage" in raw and version != FORMAT_VERSION:
        raise BundleError(f"{source}: malformed header (a version {version} header has no "
                          "lineage field)")
    try:
        return msgspec.convert(raw, _Header)
    except _DECODE_ERRORS as e:
        raise BundleError(f"{source}: malformed header: {_decode_reason(e)}") from None


def _check_fan_out(source: Path, field: str, count: int) -> None:
    """The write path's fan-out limit, before the record is hashed or its refs split."""
    try:
        check_fan_out(field, count)
    except FanOutError as e:
        raise BundleError(f"{source}: {e}") from e


def _verified_asset(record: _Asset, source: Path) -> StoredAsset:
    """The stored row of a bundle asset, after the checks every stored row passes."""
    if len(record.refs) % 32:
        raise BundleError(f"{source}: asset {record.digest.hex()} has malformed refs")
    _check_fan_out(source, f"asset {record.digest.hex()}.refs", len(record.refs) // 32)
    row = StoredAsset(record.digest, record.kind, split_refs(record.refs), record.body)
    found = check_row(row)
    if found is not None:
        category, reason = found
        what = "is tampered with: its body does not hash to its digest" if (
            category == "corrupt") else f"cannot be decoded: {reason}"
        raise BundleError(f"{source}: asset {record.digest.hex()} {what}")
    return row


def _verified_tombstone(record: _Gone, source: Path) -> StoredAsset:
    """A bundle's redacted element, after the checks a stored tombstone passes: a
    redactable kind, a well-formed tombstone naming the record's digest."""
    problem = None
    if record.kind not in redaction.REDACTABLE:
        problem = f"of kind {record.kind}, which cannot be redacted"
    else:
        try:
            stone = chains.tombstone(record.tombstone)
            if stone is None:
                raise ValueError("it is not a tombstone")
            redaction.decode_info(stone)
            if stone.digest != record.digest:
                raise ValueError("its tombstone names another digest")
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        raise BundleError(f"{source}: redacted element {record.digest.hex()} is malformed: "
                          f"{problem}")
    return StoredAsset(record.digest, record.kind, (), record.tombstone)


def _gone_size(row: StoredAsset) -> int:
    """The erased bytes a verified tombstone row stands for."""
    stone = chains.tombstone(row.body)
    assert stone is not None
    return redaction.tombstone_size(stone)


def _verified_state(record: _Agent | _State, source: Path) -> StateRow:
    """The state row a bundle record holds, after the checks every stored state passes."""
    if isinstance(record, _State) and len(record.refs) % 32:
        raise BundleError(f"{source}: state {record.id} has malformed refs")
    if isinstance(record, _State):
        _check_fan_out(source, f"state {record.id}.refs", len(record.refs) // 32)
    try:
        row = record.record.to_row() if isinstance(record, _Agent) else record.row()
    except (msgspec.EncodeError, TypeError, ValueError, RecursionError) as e:
        raise BundleError(f"{source}: a state record cannot be read: "
                          f"{_decode_reason(e)}") from None
    found = check_state(row)
    if found is not None:
        raise BundleError(f"{source}: {_who(row.id, row.kind)} is tampered with: "
                          f"{found[1]}")
    return row


def _check_lineage(states: list[StateRow], header: _Header, lineage: bool,
                   source: Path) -> None:
    """The states must start with the head; a lineage must be the head followed by its
    ancestors, each the next one's child; no parent cycle either way."""
    if not states:
        raise BundleError(f"{source}: holds no state")
    if states[0].id != header.head:
        raise BundleError(f"{source}: the first state {states[0].id} is not the head "
                          f"{header.head} named in the header")
    if lineage:
        for child, parent in itertools.pairwise(states):
            if child.parent_id != parent.id:
                raise BundleError(f"{source}: state {parent.id} is not the parent of state "
                                  f"{child.id} (lineage out of order)")
    problem = _cycle_problem(states, lineage)
    if problem is not None:
        raise BundleError(f"{source}: {problem}")


def _cycle_problem(states: Sequence[StateRow], lineage: bool) -> str | None:
    """Why the parents of a bundle's states would make a walk go round for ever, or None.
    A lineage (each state the next one's child) is a cycle when its oldest state names one
    of its states as parent; in a set of states, following parents inside the bundle must
    always end."""
    if lineage:
        ids = {s.id for s in states}
        oldest = states[-1]
        if oldest.parent_id in ids:
            return (f"the lineage is a cycle: state {oldest.id} names state "
                    f"{oldest.parent_id} of the same lineage as its parent")
        return None
    parents = {s.id: s.parent_id for s in states}
    done: set[UUID] = set()
    for state in states:
        path: set[UUID] = set()
        current: UUID | None = state.id
        while current is not None and current in parents and current not in done:
            if current in path:
                return f"the parents of state {current} form a cycle"
            path.add(current)
            current = parents[current]
        done |= path
    return None


def _who(referrer: Digest | UUID, kind: int = Kind.AGENT_STATE) -> str:
    if isinstance(referrer, UUID):
        return f"{'agent' if kind == Kind.AGENT_STATE else 'state'} {referrer}"
    return f"asset {referrer.hex()}"


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"
