"""Audit bundles: one self-contained file holding an agent state, its lineage and every asset
they reach, verifiable offline and importable into any store with the same ids and digests.

Format (version 1)::

    magic   b"\\x89immagent-bundle\\r\\n\\x1a\\n"   (PNG-style: catches text-mode mangling)
    frame*  u32 big-endian length, then one msgpack record
              header  {"format": "immagent-bundle", "version": 1, "head": uuid, ...}
              agent   ["agent", AgentRecord]           the lineage, newest first (head first)
              asset   ["asset", digest, kind, body]    every reachable asset, stored bytes
              end     ["end", agents, assets, checksum] last frame, then end of file

``checksum`` is blake3 over every byte before the end frame. It is checked last: the
per-record checks (each asset re-hashed, each agent's state digest recomputed, every
reference resolved inside the bundle) name the bad asset or agent, the checksum catches
what no content digest covers (ids, parents, timestamps, framing) and truncation. The
``refs`` of an asset are not stored: they are derived from its verified body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final
from uuid import UUID

import blake3
import msgspec

from immagent.assets import (
    AgentRecord,
    Asset,
    ConversationNode,
    Digest,
    Kind,
    decode_asset,
    digest_of,
)
from immagent.exceptions import (
    AgentNotFoundError,
    BundleError,
    IntegrityError,
    StoreError,
    ValidationError,
)
from immagent.store.backend import Backend, StoredAsset, split_refs
from immagent.verify import check_asset, closing_iter

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BundleInfo",
    "export_bundle",
    "import_bundle",
    "read_bundle",
    "verify_bundle",
]

MAGIC: Final = b"\x89immagent-bundle\r\n\x1a\n"
FORMAT_VERSION: Final = 1
#: Largest frame accepted when reading; bigger means a corrupt length, not a real record.
MAX_FRAME: Final = 1 << 30
_LEN = struct.Struct(">I")


class BundleInfo(msgspec.Struct, frozen=True):
    """What a bundle holds: its head state, the lineage ids and the asset totals."""

    path: str
    version: int
    head: UUID
    head_digest: Digest
    agents: tuple[UUID, ...]  # the lineage, newest (the head) first
    assets: int
    asset_bytes: int  # total stored body bytes
    file_bytes: int


class _Header(msgspec.Struct, frozen=True):
    format: str
    version: int
    head: UUID
    created_at: datetime


class _Agent(msgspec.Struct, frozen=True, array_like=True, tag="agent"):
    record: AgentRecord


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
_record_decoder = msgspec.msgpack.Decoder(_Agent | _Asset | _End)


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


async def export_bundle(backend: Backend, agent_id: UUID, path: str | os.PathLike[str]
                        ) -> BundleInfo:
    """Write the bundle of ``agent_id`` to ``path`` atomically (temp file, fsync, rename).

    Assets are re-hashed on the way out, and the export fails (writing nothing at ``path``)
    if the store is corrupt or an asset vanished meanwhile (an ancestor deleted and swept
    between the lineage read and the asset walk): a bundle is only written when complete.
    """
    dest = _writable_path(path)
    lineage = await backend.lineage(agent_id)
    if not lineage:
        raise AgentNotFoundError(agent_id)
    roots = sorted({d for r in lineage for d in (r.system_prompt, r.conversation)})
    writer = _Writer()
    writer.raw(MAGIC)
    # Totals are known only after the walk, so they go in the end record.
    writer.frame(_Header(format="immagent-bundle", version=FORMAT_VERSION, head=agent_id,
                         created_at=datetime.now(UTC)))
    for record in lineage:
        writer.frame(_Agent(record))
    # Memory: the digests of this lineage's assets (32 bytes each) and one batch of bodies.
    written: set[Digest] = set()
    wanted: dict[Digest, Digest | UUID] = {}
    for record in lineage:
        wanted.setdefault(record.system_prompt, record.id)
        wanted.setdefault(record.conversation, record.id)
    asset_bytes = 0
    file = await asyncio.to_thread(_TempFile, dest)
    try:
        # A failed export releases the cursor's pooled connection at once.
        async with closing_iter(backend.iter_reachable(roots)) as batches:
            async for batch in batches:
                for row in batch:
                    if row.digest in written:
                        continue
                    _check_exported(row)
                    written.add(row.digest)
                    asset_bytes += len(row.body)
                    for ref in row.refs:
                        wanted.setdefault(ref, row.digest)
                    writer.frame(_Asset(row.digest, row.kind, row.body, b"".join(row.refs)))
                await asyncio.to_thread(file.write, writer.take())
        for digest, referrer in wanted.items():
            if digest not in written:
                raise IntegrityError(
                    f"cannot export agent {agent_id}: asset {digest.hex()} referenced by "
                    f"{_who(referrer)} is missing from the store (run store.verify())")
        writer.end(len(lineage), len(written))
        await asyncio.to_thread(file.commit, writer.take())
    finally:
        await asyncio.to_thread(file.discard)
    return BundleInfo(path=str(dest), version=FORMAT_VERSION, head=agent_id,
                      head_digest=lineage[0].digest, agents=tuple(r.id for r in lineage),
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


def _check_exported(row: StoredAsset) -> None:
    """Refuse to put a corrupt stored asset into a bundle."""
    found = check_asset(row)
    if found is not None:
        raise IntegrityError(f"cannot export: stored asset {row.digest.hex()} is "
                             f"{found[0]} ({found[1]}); run store.verify()")


# -- reading ------------------------------------------------------------------------------


def verify_bundle(path: str | os.PathLike[str]) -> BundleInfo:
    """Check a bundle offline, without any database: every asset re-hashed and decoded,
    every reference resolved inside it, every agent row's state digest recomputed, the
    lineage a chain from the head, and the file checksum. Raises BundleError naming the
    first bad asset (digest hex) or agent (id)."""
    info, _, _ = read_bundle(path, keep_assets=False)
    return info


def read_bundle(path: str | os.PathLike[str], *, keep_assets: bool = True
                ) -> tuple[BundleInfo, list[AgentRecord], list[StoredAsset]]:
    """Read and fully verify a bundle: (info, agent rows newest first, assets if kept).

    Everything returned has passed every check of verify_bundle, in this same pass over the
    same bytes (no window between verifying and loading).
    """
    source = _readable_path(path)
    agents: list[AgentRecord] = []
    agent_ids: set[UUID] = set()
    assets: list[StoredAsset] = []
    kinds: dict[Digest, Kind] = {}
    # ref -> (kind it must have, who refers to it); resolved when the file has been read.
    wanted: dict[Digest, tuple[Kind, Digest | UUID]] = {}
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
            if isinstance(record, _Agent):
                agent = record.record
                if agent.expected_digest() != agent.digest:
                    raise BundleError(f"{source}: agent {agent.id} is tampered with: its state "
                                      "digest does not match its fields")
                if agent.id in agent_ids:
                    raise BundleError(f"{source}: agent {agent.id} appears twice")
                agent_ids.add(agent.id)
                agents.append(agent)
                wanted.setdefault(agent.system_prompt, (Kind.SYSTEM_PROMPT, agent.id))
                wanted.setdefault(agent.conversation, (Kind.NODE, agent.id))
                continue
            row, asset = _verified_asset(record, source)
            if row.digest in kinds:
                raise BundleError(f"{source}: asset {row.digest.hex()} appears twice")
            kinds[row.digest] = asset.kind
            asset_bytes += len(row.body)
            if isinstance(asset, ConversationNode):
                if asset.parent is not None:
                    wanted.setdefault(asset.parent, (Kind.NODE, row.digest))
                for message in asset.messages:
                    wanted.setdefault(message, (Kind.MESSAGE, row.digest))
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
        if found is not kind:
            raise BundleError(f"{source}: asset {digest.hex()} referenced by {_who(referrer)} "
                              f"is a {found.name.lower()}, expected a {kind.name.lower()}")
    _check_lineage(agents, header, source)
    last, checksum = end
    if last.agents != len(agents) or last.assets != len(kinds):
        raise BundleError(f"{source}: record counts do not match the end record "
                          f"({len(agents)} agents, {len(kinds)} assets read)")
    if last.checksum != checksum:
        raise BundleError(f"{source}: file checksum mismatch (ids, lineage, timestamps or "
                          "framing were altered)")
    info = BundleInfo(path=str(source), version=header.version, head=header.head,
                      head_digest=agents[0].digest, agents=tuple(a.id for a in agents),
                      assets=len(kinds), asset_bytes=asset_bytes, file_bytes=size)
    return info, agents, assets


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
    if raw.get("version") != FORMAT_VERSION:
        raise BundleError(f"{source}: bundle format version {raw.get('version')!r} is not "
                          f"supported (this immagent reads version {FORMAT_VERSION})")
    try:
        return msgspec.convert(raw, _Header)
    except msgspec.ValidationError as e:
        raise BundleError(f"{source}: malformed header: {e}") from e


def _verified_asset(record: _Asset, source: Path) -> tuple[StoredAsset, Asset]:
    """The stored row of a bundle asset and the asset, after re-hashing and decoding."""
    name = record.digest.hex()
    try:
        kind = Kind(record.kind)
    except ValueError:
        raise BundleError(f"{source}: asset {name} has unknown kind {record.kind}") from None
    if len(record.refs) % 32:
        raise BundleError(f"{source}: asset {name} has malformed refs")
    refs = split_refs(record.refs)
    try:
        sound = kind is not Kind.AGENT_STATE and digest_of(kind, record.body, refs) == record.digest
    except ValueError:
        sound = False
    if not sound:
        raise BundleError(f"{source}: asset {name} is tampered with: its body does not hash "
                          "to its digest")
    try:
        asset = decode_asset(kind, record.body, refs)
    except (msgspec.DecodeError, ValueError) as e:
        raise BundleError(f"{source}: asset {name} cannot be decoded: {e}") from e
    return StoredAsset(record.digest, int(kind), refs, record.body), asset


def _check_lineage(agents: list[AgentRecord], header: _Header, source: Path) -> None:
    """The agent rows must be the head followed by its ancestors, each the next's child."""
    if not agents:
        raise BundleError(f"{source}: holds no agent state")
    if agents[0].id != header.head:
        raise BundleError(f"{source}: the first agent {agents[0].id} is not the head "
                          f"{header.head} named in the header")
    for child, parent in itertools.pairwise(agents):
        if child.parent_id != parent.id:
            raise BundleError(f"{source}: agent {parent.id} is not the parent of agent "
                              f"{child.id} (lineage out of order)")


# -- importing ----------------------------------------------------------------------------


async def import_bundle(backend: Backend, path: str | os.PathLike[str]) -> UUID:
    """Verify a bundle, then load it in one transaction (idempotent); returns the head id.

    Assets already present are skipped by the backend (same digest, same bytes); agent rows
    already present must be identical (same digest and parent), else BundleError. The whole
    bundle is held in memory for the one transaction: a bundle is one lineage.
    """
    info, agents, assets = await asyncio.to_thread(read_bundle, path, keep_assets=True)
    new = await _new_agents(backend, agents, info)
    try:
        # Oldest first, so the store's log order (seq) matches creation order.
        await backend.write(assets, new[::-1])
    except StoreError:
        # A concurrent import of the same bundle inserted the rows first: that is success.
        if await _new_agents(backend, agents, info):
            raise
    return info.head


async def _new_agents(backend: Backend, agents: list[AgentRecord],
                      info: BundleInfo) -> list[AgentRecord]:
    """The bundle's agent rows not yet in the store; a conflicting existing row raises."""
    existing = {r.id: r for r in await backend.get_agents([a.id for a in agents])}
    for agent in agents:
        have = existing.get(agent.id)
        if have is not None and (have.digest != agent.digest
                                 or have.parent_id != agent.parent_id):
            raise BundleError(f"{info.path}: agent {agent.id} already exists in this store "
                              "with different content or parent; refusing to import")
    return [a for a in agents if a.id not in existing]


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


def _who(referrer: Digest | UUID) -> str:
    return f"agent {referrer}" if isinstance(referrer, UUID) else f"asset {referrer.hex()}"
