"""Audit bundles: one self-contained file holding a state, its lineage and every asset they
reach, verifiable offline and importable into any store with the same ids and digests.

Format (version 2; version 1 files, which held agent records, are still read; version 3
holds a set of states instead of one lineage, see below)::

    magic   b"\\x89immagent-bundle\\r\\n\\x1a\\n"   (PNG-style: catches text-mode mangling)
    frame*  u32 big-endian length, then one msgpack record
              header  {"format": "immagent-bundle", "version": 2, "head": uuid, ...}
              state   ["state", id, parent, kind, stream, refs, body, digest, time]
                                                        the lineage, newest (the head) first
              asset   ["asset", digest, kind, body, refs]   every reachable asset, canonical
              end     ["end", states, assets, checksum]     last frame, then end of file

A bundle carries asset rows in their canonical form, the bytes the digests cover: bodies
uncompressed whatever codec the store used (``immagent.codec``), so a bundle needs no
dictionary and imports into any store, which compresses them its own way (version 2 files
written before compression existed hold the same form). Reading one runs the same checks as
reading a database: ``assets.check_row`` and ``records.check_state``. ``checksum`` is blake3
over every byte before the end frame. It is checked last: the per-record checks (each asset
re-hashed, each state's digest recomputed, every reference resolved inside the bundle with
the kind it must have) name the bad record, the checksum catches what no content digest
covers (ids, parents, timestamps, framing) and truncation.

Version 3 is version 2 for states that are not one lineage (a LangGraph thread: its
checkpoints, their writes, several namespaces): the same records, the newest state first
and named as ``head``; each state's parent is either in the bundle or absent from it (a
pruned checkpoint, a state outside the export), and parents never form a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from uuid import UUID

import blake3
import msgspec

from immagent.assets import (
    Digest,
    Kind,
    StoredAsset,
    canonical_row,
    check_row,
    join_refs,
    ref_kinds,
    split_refs,
)
from immagent.audit.verify import closing_iter
from immagent.codec import NO_DICTIONARIES, ZstdDictionary
from immagent.exceptions import BundleError, IntegrityError, ValidationError
from immagent.records import STATE_KINDS, AgentRecord, StateRow, check_state

if TYPE_CHECKING:
    from immagent.store.backend import Backend

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
FORMAT_VERSION: Final = 2
#: The version of a bundle of a set of states rather than one lineage.
SET_VERSION: Final = 3
#: Versions this immagent reads (1: agent records; 2: state rows; 3: a set of states).
_READABLE: Final = frozenset({1, 2, 3})
#: Largest frame accepted when reading; bigger means a corrupt length, not a real record.
MAX_FRAME: Final = 1 << 30
_LEN = struct.Struct(">I")


class BundleInfo(msgspec.Struct, frozen=True):
    """What a bundle holds: its head state, the lineage ids and the asset totals."""

    path: str
    version: int
    head: UUID
    head_digest: Digest
    agents: tuple[UUID, ...]  # the lineage's state ids, newest (the head) first
    assets: int
    asset_bytes: int  # total stored body bytes
    file_bytes: int


class _Header(msgspec.Struct, frozen=True):
    format: str
    version: int
    head: UUID
    created_at: datetime


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


class _End(msgspec.Struct, frozen=True, array_like=True, tag="end"):
    agents: int
    assets: int
    checksum: bytes


_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(_Agent | _State | _Asset | _End)


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

    def end(self, agents: int, assets: int) -> None:
        # The end frame itself is outside the checksum (it carries it).
        payload = _encoder.encode(_End(agents, assets, self._hash.digest()))
        self.buffer += _LEN.pack(len(payload)) + payload
        self.size += _LEN.size + len(payload)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


async def export_bundle(backend: Backend, lineage: list[StateRow],
                        path: str | os.PathLike[str],
                        dictionaries: Mapping[int, ZstdDictionary] = NO_DICTIONARIES, *,
                        version: int = FORMAT_VERSION
                        ) -> BundleInfo:
    """Write the bundle of ``lineage`` (a state and its ancestors, newest first, as read
    and verified by the store; with ``version=SET_VERSION`` any set of states, newest
    first) to ``path`` atomically (temp file, fsync, rename).

    Assets are re-hashed on the way out, and the export fails (writing nothing at ``path``)
    if the store is corrupt or an asset vanished meanwhile (an ancestor deleted and swept
    between the lineage read and the asset walk): a bundle is only written when complete.
    """
    dest = _writable_path(path)
    head = lineage[0]
    roots = sorted({d for r in lineage for d in r.refs})
    writer = _Writer()
    writer.raw(MAGIC)
    # Totals are known only after the walk, so they go in the end record.
    writer.frame(_Header(format="immagent-bundle", version=version, head=head.id,
                         created_at=datetime.now(UTC)))
    for r in lineage:
        writer.frame(_State(r.id, r.parent_id, r.kind, r.stream, join_refs(r.refs), r.body,
                            r.digest, r.created_at))
    # Memory: the digests of this lineage's assets (32 bytes each) and one batch of bodies.
    written: set[Digest] = set()
    wanted: dict[Digest, Digest | UUID] = {}
    for r in lineage:
        for d in r.refs:
            wanted.setdefault(d, r.id)
    asset_bytes = 0
    file = await asyncio.to_thread(_TempFile, dest)
    try:
        # A failed export releases the cursor's pooled connection at once.
        async with closing_iter(backend.iter_assets(roots)) as batches:
            async for batch in batches:
                for row in batch:
                    if row.digest in written:
                        continue
                    row = _exported(row, dictionaries)
                    written.add(row.digest)
                    asset_bytes += len(row.body)
                    for ref in row.refs:
                        wanted.setdefault(ref, row.digest)
                    writer.frame(_Asset(row.digest, row.kind, row.body, join_refs(row.refs)))
                await asyncio.to_thread(file.write, writer.take())
        for digest, referrer in wanted.items():
            if digest not in written:
                raise IntegrityError(
                    f"cannot export state {head.id}: asset {digest.hex()} referenced by "
                    f"{_who(referrer)} is missing from the store (run store.verify())")
        writer.end(len(lineage), len(written))
        await asyncio.to_thread(file.commit, writer.take())
    finally:
        await asyncio.to_thread(file.discard)
    return BundleInfo(path=str(dest), version=version, head=head.id,
                      head_digest=head.digest, agents=tuple(r.id for r in lineage),
                      assets=len(written), asset_bytes=asset_bytes, file_bytes=writer.size)


class _TempFile:
    """A temp file next to ``dest`` that becomes ``dest`` only on commit (fsync + rename),
    so readers see the old file or the whole new one, never a partial bundle."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        with self._os_errors():
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.",
                                        suffix=".tmp")
        self.path = Path(name)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    @contextlib.contextmanager
    def _os_errors(self) -> Iterator[None]:
        """A failed create, write or rename (no such place, read-only, disk full) is the
        destination's fault: a ValidationError naming it, never a raw OSError."""
        try:
            yield
        except OSError as e:
            raise ValidationError("path", f"cannot write {self.dest}: "
                                  f"{e.strerror or e}", str(self.dest)) from e

    def write(self, data: bytes) -> None:
        assert self._file is not None
        with self._os_errors():
            self._file.write(data)

    def commit(self, data: bytes) -> None:
        assert self._file is not None
        with self._os_errors():
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.path, self.dest)
            _fsync_dir(self.dest.parent)

    def discard(self) -> None:
        """Remove the temp file unless committed (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                self.path.unlink()


def _exported(row: StoredAsset, dictionaries: Mapping[int, ZstdDictionary]) -> StoredAsset:
    """The canonical form of a stored asset; a corrupt one is refused."""
    found = check_row(row, dictionaries)
    if found is not None:
        raise IntegrityError(f"cannot export: stored asset {row.digest.hex()} is "
                             f"{found[0]} ({found[1]}); run store.verify()")
    return canonical_row(row, dictionaries)


# -- reading ------------------------------------------------------------------------------


def verify_bundle(path: str | os.PathLike[str]) -> BundleInfo:
    """Check a bundle offline, without any database: every asset re-hashed and decoded,
    every reference resolved inside it with the kind it must have, every state's digest
    recomputed, the lineage a chain from the head (version 3: parents acyclic), and the
    file checksum. Raises
    BundleError naming the first bad asset (digest hex) or state (id)."""
    info, _, _ = read_bundle(path, keep_assets=False)
    return info


async def read(path: str | os.PathLike[str]
               ) -> tuple[BundleInfo, list[StateRow], list[StoredAsset]]:
    """``read_bundle`` in a worker thread (the event loop never blocks on the file)."""
    return await asyncio.to_thread(read_bundle, path, keep_assets=True)


def conflict(info: BundleInfo, state_id: UUID) -> BundleError:
    """The error for a bundle state that exists in the target store with other content."""
    return BundleError(f"{info.path}: state {state_id} already exists in this store with "
                       "different content or parent; refusing to import")


def read_bundle(path: str | os.PathLike[str], *, keep_assets: bool = True
                ) -> tuple[BundleInfo, list[StateRow], list[StoredAsset]]:
    """Read and fully verify a bundle: (info, state rows newest first, assets if kept).

    Everything returned has passed every check of verify_bundle, in this same pass over the
    same bytes (no window between verifying and loading).
    """
    source = _readable_path(path)
    states: list[StateRow] = []
    state_ids: set[UUID] = set()
    assets: list[StoredAsset] = []
    kinds: dict[Digest, int] = {}
    # ref -> (kind it must have, who refers to it); resolved when the file has been read.
    wanted: dict[Digest, tuple[int, Digest | UUID]] = {}
    asset_bytes = 0
    try:
        file = source.open("rb")
    except OSError as e:
        raise ValidationError("path", f"cannot read {source}: {e.strerror}", str(source)) from e
    with file:
        hasher = blake3.blake3()
        magic = file.read(len(MAGIC))
        if magic != MAGIC:
            raise BundleError(f"{source} is not an immagent bundle (bad magic bytes)")
        hasher.update(magic)
        frames = _frames(file, source, hasher)
        header = _read_header(next(frames, None), source)
        end: tuple[_End, bytes] | None = None  # the end record and the checksum it must hold
        for offset, payload, checksum in frames:
            try:
                record = _record_decoder.decode(payload)
            except (msgspec.DecodeError, ValueError) as e:  # also invalid UTF-8 in a str
                raise BundleError(f"{source}: malformed record at byte {offset}: {e}") from e
            if isinstance(record, _End):
                end = record, checksum
                if file.read(1):
                    raise BundleError(f"{source}: data after the end record (byte {offset})")
                break
            if isinstance(record, _Agent | _State):
                state = _verified_state(record, source)
                if state.id in state_ids:
                    raise BundleError(f"{source}: {_who(state.id)} appears twice")
                state_ids.add(state.id)
                states.append(state)
                for ref, kind in zip(state.refs, STATE_KINDS[state.kind].ref_kinds(state),
                                     strict=True):
                    wanted.setdefault(ref, (kind, state.id))
                continue
            row = _verified_asset(record, source)
            if row.digest in kinds:
                raise BundleError(f"{source}: asset {row.digest.hex()} appears twice")
            kinds[row.digest] = row.kind
            asset_bytes += len(row.body)
            for ref, kind in zip(row.refs, ref_kinds(row.kind, len(row.refs)), strict=True):
                wanted.setdefault(ref, (kind, row.digest))
            if keep_assets:
                assets.append(row)
        size = file.tell()
    if end is None:
        raise BundleError(f"{source} is truncated: no end record")
    for digest, (kind, referrer) in wanted.items():
        found = kinds.get(digest)
        if found is None:
            raise BundleError(f"{source}: asset {digest.hex()} referenced by {_who(referrer)} "
                              "is missing from the bundle")
        if found != kind:
            raise BundleError(f"{source}: asset {digest.hex()} referenced by {_who(referrer)} "
                              f"is a {_kind_name(found)}, expected a {_kind_name(kind)}")
    _check_lineage(states, header, source)
    last, checksum = end
    if last.agents != len(states) or last.assets != len(kinds):
        raise BundleError(f"{source}: record counts do not match the end record "
                          f"({len(states)} states, {len(kinds)} assets read)")
    if last.checksum != checksum:
        raise BundleError(f"{source}: file checksum mismatch (ids, lineage, timestamps or "
                          "framing were altered)")
    info = BundleInfo(path=str(source), version=header.version, head=header.head,
                      head_digest=states[0].digest, agents=tuple(s.id for s in states),
                      assets=len(kinds), asset_bytes=asset_bytes, file_bytes=size)
    return info, states, assets


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
    try:
        raw = msgspec.msgpack.decode(frame[1])
    except (msgspec.DecodeError, ValueError) as e:
        raise BundleError(f"{source}: malformed header: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != "immagent-bundle":
        raise BundleError(f"{source}: malformed header (not an immagent bundle)")
    if raw.get("version") not in _READABLE:
        raise BundleError(f"{source}: bundle format version {raw.get('version')!r} is not "
                          f"supported (this immagent reads versions "
                          f"{', '.join(map(str, sorted(_READABLE)))})")
    try:
        return msgspec.convert(raw, _Header)
    except msgspec.ValidationError as e:
        raise BundleError(f"{source}: malformed header: {e}") from e


def _verified_asset(record: _Asset, source: Path) -> StoredAsset:
    """The stored row of a bundle asset, after the checks every stored row passes."""
    if len(record.refs) % 32:
        raise BundleError(f"{source}: asset {record.digest.hex()} has malformed refs")
    row = StoredAsset(record.digest, record.kind, split_refs(record.refs), record.body)
    found = check_row(row)
    if found is not None:
        category, reason = found
        what = "is tampered with: its body does not hash to its digest" if (
            category == "corrupt") else f"cannot be decoded: {reason}"
        raise BundleError(f"{source}: asset {record.digest.hex()} {what}")
    return row


def _verified_state(record: _Agent | _State, source: Path) -> StateRow:
    """The state row a bundle record holds, after the checks every stored state passes."""
    if isinstance(record, _State) and len(record.refs) % 32:
        raise BundleError(f"{source}: state {record.id} has malformed refs")
    try:
        row = record.record.to_row() if isinstance(record, _Agent) else record.row()
    except (msgspec.EncodeError, TypeError, ValueError) as e:
        raise BundleError(f"{source}: a state record cannot be read: {e}") from e
    found = check_state(row)
    if found is not None:
        raise BundleError(f"{source}: {_who(row.id, row.kind)} is tampered with: "
                          f"{found[1]}")
    return row


def _check_lineage(states: list[StateRow], header: _Header, source: Path) -> None:
    """The states must be the head followed by its ancestors, each the next's child."""
    if not states:
        raise BundleError(f"{source}: holds no state")
    if states[0].id != header.head:
        raise BundleError(f"{source}: the first state {states[0].id} is not the head "
                          f"{header.head} named in the header")
    if header.version >= SET_VERSION:
        _check_acyclic(states, source)
        return
    for child, parent in itertools.pairwise(states):
        if child.parent_id != parent.id:
            raise BundleError(f"{source}: state {parent.id} is not the parent of state "
                              f"{child.id} (lineage out of order)")


def _check_acyclic(states: list[StateRow], source: Path) -> None:
    """A set of states: following parents inside the bundle must always end."""
    parents = {s.id: s.parent_id for s in states}
    done: set[UUID] = set()
    for state in states:
        path: set[UUID] = set()
        current: UUID | None = state.id
        while current is not None and current in parents and current not in done:
            if current in path:
                raise BundleError(f"{source}: the parents of state {current} form a cycle")
            path.add(current)
            current = parents[current]
        done |= path


# -- paths --------------------------------------------------------------------------------


def _writable_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise ValidationError("path", f"must be a non-empty str or path, got {path!r}", path)
    dest = Path(os.fspath(path))
    if dest.is_dir():
        raise ValidationError("path", f"{dest} is a directory, not a file name", str(dest))
    if not dest.parent.is_dir():
        raise ValidationError("path", f"directory {dest.parent} does not exist", str(dest))
    return dest


def _readable_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise ValidationError("path", f"must be a non-empty str or path, got {path!r}", path)
    source = Path(os.fspath(path))
    if not source.exists():
        raise ValidationError("path", f"no such file: {source}", str(source))
    if not source.is_file():
        raise ValidationError("path", f"{source} is not a regular file", str(source))
    return source


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _who(referrer: Digest | UUID, kind: int = Kind.AGENT_STATE) -> str:
    if isinstance(referrer, UUID):
        return f"{'agent' if kind == Kind.AGENT_STATE else 'state'} {referrer}"
    return f"asset {referrer.hex()}"


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"
