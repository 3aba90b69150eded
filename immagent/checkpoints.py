"""The stored form of LangGraph checkpoints: two state kinds and their rules, no LangGraph.

``immagent.integrations.langgraph.ImmAgentSaver`` writes these rows; the core (verify, gc,
bundles) reads them through ``records.STATE_KINDS`` without importing LangGraph, so a store
written by the saver can be audited anywhere.

A *checkpoint* is a state of kind CHECKPOINT:

* ``id``: derived from (thread id, namespace, checkpoint id), so looking a checkpoint up is
  one primary-key probe. The first 8 bytes hash the thread id alone: every row of a thread
  (checkpoints and writes, all namespaces) sits in one id range, so deleting or copying a
  thread is one index range scan (``thread_range``), never a scan of the store.
* ``parent_id``: the id its parent checkpoint has (or had: a pruned parent is gone).
* ``stream``: the thread id, then U+001F and the namespace when it is not the root one
  (``checkpoint_stream``): the index on (kind, stream, seq) lists a namespace's
  checkpoints newest first, and the newest is one probe.
* ``refs``: the channel values, in the order of ``CheckpointBody.values``: a VALUE asset
  per value, a VALUE_NODE chain head per list channel, and for a dict whose entries hold
  lists, its entries (see *shapes*). gc keeps them through these refs.
* ``body``: ``CheckpointBody``, everything else LangGraph needs back (ids, versions,
  metadata as the serializer's typed bytes).

A *writes* row (kind CHECKPOINT_WRITES) holds the writes of one ``put_writes`` call: its
stream is the checkpoint's stream, U+001F and the checkpoint id (``writes_stream``), so a
checkpoint's pending writes are one index probe; its parent is the checkpoint's state id;
its id hashes its content, so a repeated call stores nothing and a different one adds a row
(readers keep the first write of a (task, index) and the last of a special channel).

Both kinds use the generic digest rule (``records.stream_digest``: the hash of exactly the
stored kind, stream, refs and body), and their refs must match the shapes in the body.

*Shapes* say how a value was split into assets (msgpack, in the body): ``0`` one VALUE;
``1`` one VALUE_NODE chain (a list channel); ``2`` one VALUE_NODE chain read back as a
*snapshot* of that list (what LangGraph's ``DeltaChannel`` stores every so many updates: as
a chain, each snapshot shares every element and link with the one before it and with the
writes that added them); ``["l", n]`` a list of ``n`` VALUEs stored
inline (a list in a write); ``["d", key, shape, key, shape, ...]`` a dict with str keys,
entry by entry, each entry ``0`` or ``["l", n]`` (a dict holding lists, such as a graph's
input ``{"messages": [...]}``). Splitting lets a message be one asset wherever it appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from uuid import UUID

import blake3
import msgspec

from immagent.assets import Kind, encode
from immagent.exceptions import ValidationError

__all__ = [
    "CHAIN",
    "DELTA_KEYS",
    "LEAF",
    "SEP",
    "SNAPSHOT",
    "CheckpointBody",
    "WritesBody",
    "check_key",
    "check_refs",
    "checkpoint_ref_kinds",
    "checkpoint_state_id",
    "checkpoint_stream",
    "compact_id",
    "decode_checkpoint",
    "decode_ts",
    "decode_writes",
    "encode_ts",
    "expand_id",
    "parse_stream",
    "shape_kinds",
    "thread_range",
    "writes_ref_kinds",
    "writes_state_id",
    "writes_stream",
]

#: Metadata keys LangGraph's DeltaChannel leaves: such a thread's newest checkpoint needs its
#: ancestors' writes, so it is never pruned (``keep_latest``, retention policies).
DELTA_KEYS: Final = ("counters_since_delta_snapshot", "delta_writes_versioned")
#: Separates the parts of a stream: thread id, namespace, checkpoint id (none may hold it).
SEP: Final = "\x1f"
#: Shape of a value stored as one VALUE asset.
LEAF: Final = 0
#: Shape of a list channel stored as a VALUE_NODE chain.
CHAIN: Final = 1
#: Shape of a snapshot of a list (a delta channel's), stored as a VALUE_NODE chain.
SNAPSHOT: Final = 2
#: Deepest shape nesting accepted (a dict of lists).
_MAX_SHAPE_DEPTH = 2
#: Longest thread id, namespace or checkpoint id accepted (UTF-8 bytes).
MAX_KEY_BYTES: Final = 1_000

Version = int | float | str


class CheckpointBody(msgspec.Struct, frozen=True, omit_defaults=True,
                     rename={"checkpoint_id": "i", "parent": "p", "v": "v", "ts": "t",
                             "versions": "cv", "seen": "vs", "updated": "u",
                             "values": "c", "metadata": "m", "metadata_typed": "M",
                             "extra": "x", "absent": "a"}):
    """What a checkpoint row holds besides its refs. Ids are 16 bytes when they are
    canonical UUID strings (``compact_id``); ``values`` names the channels that have a
    value, each with its shape, in refs order."""

    #: str, or 16 bytes (msgspec unions take one str-like type, so these are checked by
    #: ``decode_checkpoint``)
    checkpoint_id: Any
    parent: Any = None
    v: int = 1
    #: The timestamp: microseconds since the epoch when that gives the ISO text back
    #: exactly (``encode_ts``), else the text.
    ts: int | str = ""
    versions: dict[str, Version] = {}
    seen: dict[str, dict[str, Version]] = {}
    updated: list[str] | None = None
    values: list[tuple[str, Any]] = []
    #: The checkpoint metadata as msgpack when it reads back equal (JSON-like values) ...
    metadata: dict[str, Any] | None = None
    #: ... else as the serializer's (type, bytes).
    metadata_typed: tuple[str, bytes] | None = None
    #: Checkpoint keys this layout has no field for, as the serializer's (type, bytes).
    extra: tuple[str, bytes] | None = None
    #: Keys with a field here that the checkpoint did not have (LangGraph leaves
    #: ``updated_channels`` out of some), so that it reads back without them.
    absent: list[str] = []


class WritesBody(msgspec.Struct, frozen=True, omit_defaults=True,
                 rename={"task_id": "k", "task_path": "p", "writes": "w"}):
    """What a writes row holds besides its refs: the task and, per write, its channel,
    its index (LangGraph's ``WRITES_IDX_MAP`` for special channels) and its shape."""

    task_id: Any  # str, or 16 bytes (checked by ``decode_writes``)
    task_path: str = ""
    writes: list[tuple[str, int, Any]] = []


_checkpoint_decoder = msgspec.msgpack.Decoder(CheckpointBody)
_writes_decoder = msgspec.msgpack.Decoder(WritesBody)


def decode_checkpoint(body: bytes) -> CheckpointBody:
    """The body of a checkpoint row (msgspec errors or ValueError when malformed)."""
    decoded = _checkpoint_decoder.decode(body)
    expand_id(decoded.checkpoint_id)
    if decoded.parent is not None:
        expand_id(decoded.parent)
    return decoded


def decode_writes(body: bytes) -> WritesBody:
    """The body of a writes row (msgspec errors or ValueError when malformed)."""
    decoded = _writes_decoder.decode(body)
    expand_id(decoded.task_id)
    return decoded


# -- shapes ------------------------------------------------------------------------------


def shape_kinds(shape: Any, depth: int = 0) -> list[int]:
    """The asset kinds of the refs a value of ``shape`` takes, in order (ValueError for a
    malformed shape)."""
    if type(shape) is int and shape in (LEAF, CHAIN, SNAPSHOT) and not (shape and depth):
        return [int(Kind.VALUE if shape == LEAF else Kind.VALUE_NODE)]
    if type(shape) is list and shape and shape[0] == "l" and len(shape) == 2 \
            and type(shape[1]) is int and 0 <= shape[1] <= 1 << 24:
        return [int(Kind.VALUE)] * shape[1]
    if type(shape) is list and shape and shape[0] == "d" and len(shape) % 2 == 1 \
            and depth < _MAX_SHAPE_DEPTH - 1:
        kinds: list[int] = []
        for key, inner in zip(shape[1::2], shape[2::2], strict=True):
            if type(key) is not str:
                raise ValueError(f"a dict shape has a key of type {type(key).__name__}")
            kinds += shape_kinds(inner, depth + 1)
        return kinds
    raise ValueError(f"malformed value shape {shape!r}")


def checkpoint_ref_kinds(body: bytes) -> tuple[int, ...]:
    """The kind each ref of a checkpoint row with this body must have."""
    decoded = decode_checkpoint(body)
    return tuple(k for _, shape in decoded.values for k in shape_kinds(shape))


def writes_ref_kinds(body: bytes) -> tuple[int, ...]:
    """The kind each ref of a writes row with this body must have."""
    decoded = decode_writes(body)
    return tuple(k for _, _, shape in decoded.writes for k in shape_kinds(shape))


# -- keys, streams and ids -----------------------------------------------------------------


def check_key(field: str, value: object, *, empty: bool = False,
              coerce: bool = False) -> str:
    """A thread id, namespace or checkpoint id as stored: a str of valid Unicode without
    NUL or U+001F; empty only if allowed; with ``coerce`` (thread ids), an int or UUID is
    taken as its str, as LangGraph's savers do."""
    if coerce and isinstance(value, int | UUID) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a str, got {type(value).__name__}", value)
    if not value and not empty:
        raise ValidationError(field, "must not be empty", value)
    if "\x00" in value or SEP in value:
        raise ValidationError(field, "must not contain NUL or U+001F characters", value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode (lone surrogate)", value) from None
    if size > MAX_KEY_BYTES:
        raise ValidationError(field, f"is longer than the limit of {MAX_KEY_BYTES} bytes",
                              value)
    return value


def checkpoint_stream(thread_id: str, checkpoint_ns: str) -> str:
    """The stream of a namespace's checkpoints: the thread id (root namespace) or the
    thread id, U+001F and the namespace."""
    return thread_id if not checkpoint_ns else f"{thread_id}{SEP}{checkpoint_ns}"


def writes_stream(thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> str:
    """The stream of one checkpoint's writes rows."""
    return f"{thread_id}{SEP}{checkpoint_ns}{SEP}{checkpoint_id}"


def parse_stream(kind: int, stream: str) -> tuple[str, str, str | None]:
    """(thread id, namespace, checkpoint id or None) of a checkpoint or writes stream
    (ValueError when it has the wrong number of parts for its kind)."""
    parts = stream.split(SEP)
    if kind == Kind.CHECKPOINT and 1 <= len(parts) <= 2 and parts[0]:
        return parts[0], parts[1] if len(parts) == 2 else "", None
    if kind == Kind.CHECKPOINT_WRITES and len(parts) == 3 and parts[0] and parts[2]:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"{stream!r} is not the stream of a {Kind(kind).name.lower()} row")


def _thread_prefix(thread_id: str) -> bytes:
    return blake3.blake3(b"immagent-thread\x00" + thread_id.encode("utf-8")).digest(8)


def _derived_id(thread_id: str, rest: bytes) -> UUID:
    """A version-8 UUID: 60 bits from the thread id, 62 from ``rest`` (which names the row
    within the thread), so a thread's rows are contiguous in id order."""
    raw = bytearray(_thread_prefix(thread_id)
                    + blake3.blake3(thread_id.encode("utf-8") + b"\x00" + rest).digest(8))
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return UUID(bytes=bytes(raw))


def checkpoint_state_id(thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> UUID:
    """The state id of checkpoint ``checkpoint_id`` of namespace ``checkpoint_ns`` of
    ``thread_id``: the same in every store."""
    return _derived_id(thread_id, encode(("c", checkpoint_ns, checkpoint_id)))


def writes_state_id(thread_id: str, checkpoint_ns: str, checkpoint_id: str,
                    content: bytes) -> UUID:
    """The state id of a writes row, from its checkpoint and ``content`` (the digest of
    its refs and body), so equal writes get equal ids."""
    return _derived_id(thread_id, encode(("w", checkpoint_ns, checkpoint_id, content)))


def thread_range(thread_id: str) -> tuple[UUID, UUID]:
    """(low, high): every row of ``thread_id`` has an id strictly between them (rows of
    other threads can too, when 60 bits of their thread hashes collide: filter by stream)."""
    prefix = bytearray(_thread_prefix(thread_id))
    prefix[6] = (prefix[6] & 0x0F) | 0x80
    return UUID(bytes=bytes(prefix) + b"\x00" * 8), UUID(bytes=bytes(prefix) + b"\xff" * 8)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def encode_ts(ts: str) -> int | str:
    """A checkpoint timestamp as stored: microseconds since the epoch when it is the ISO
    form of a UTC time (what LangGraph writes) and reads back identically, else the text."""
    try:
        parsed = datetime.fromisoformat(ts)
    except (ValueError, TypeError):
        return ts
    if parsed.utcoffset() != timedelta(0) or parsed.isoformat() != ts:
        return ts
    micros = (parsed - _EPOCH) // timedelta(microseconds=1)
    return micros if decode_ts(micros) == ts else ts


def decode_ts(value: int | str) -> str:
    """The timestamp ``encode_ts`` stored, as LangGraph's ISO text."""
    if isinstance(value, str):
        return value
    return (_EPOCH + timedelta(microseconds=value)).isoformat()


def compact_id(value: str) -> str | bytes:
    """A checkpoint or task id as stored: 16 bytes when it is a canonical UUID string
    (what LangGraph makes), else the string itself."""
    if len(value) == 36:
        try:
            parsed = UUID(value)
        except ValueError:
            return value
        if str(parsed) == value:
            return parsed.bytes
    return value


def expand_id(value: object) -> str:
    """The id ``compact_id`` stored (ValueError for anything but a str or 16 bytes)."""
    if isinstance(value, bytes) and len(value) == 16:
        return str(UUID(bytes=value))
    if isinstance(value, str):
        return value
    raise ValueError(f"a stored id is a str or 16 bytes, got {value!r}")


def check_refs(kinds: Sequence[int], refs: Sequence[bytes]) -> None:
    """Refs must be one per kind the body's shapes name (ValueError otherwise)."""
    if len(kinds) != len(refs):
        raise ValueError(f"the body's shapes name {len(kinds)} values, the row pins "
                         f"{len(refs)}")
