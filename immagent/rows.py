"""Stored rows of assets: their shape, and the one verify-on-read.

A stored asset is a ``StoredAsset`` row (digest, kind, refs, body, codec), what the backends
write and return; ``stored`` makes the row of an asset. ``load_row`` is the one place a row
read from anywhere (a database, a bundle) is decompressed, re-hashed (``assets.digest_of``,
the one digest formula) and decoded before it is trusted; ``load_rows`` and
``nodes_counters`` do the same for a batch in one pass (same formula, ``digests_of``) and
fall back to the row-by-row path on any failure, so errors are exactly its. The storage
layer never interprets bodies: the kind is data.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, Literal, NamedTuple

import msgspec

from immagent import codec
from immagent.assets import (
    ASSET_KINDS,
    NODE_BODY,
    NODE_KINDS,
    Asset,
    Digest,
    Kind,
    decode_asset,
    decode_leaves,
    digest_of,
    digests_of,
)
from immagent.exceptions import IntegrityError

__all__ = [
    "StoredAsset",
    "canonical_row",
    "check_row",
    "join_refs",
    "load_row",
    "load_rows",
    "node_counters",
    "nodes_counters",
    "split_refs",
    "stored",
    "stored_rows",
    "stored_tagged_rows",
    "verified_body",
]


class StoredAsset(NamedTuple):
    """One row of the asset log as stored: digest, kind, outgoing references, body, and the
    codec the body is stored with (``immagent.codec``; 0: the canonical bytes as they are).
    The digest is of the canonical bytes, whatever the codec."""

    digest: Digest
    kind: int
    refs: tuple[Digest, ...]
    body: bytes
    codec: int = 0


def split_refs(raw: bytes | None) -> tuple[Digest, ...]:
    """The digests of a stored refs value (32-byte digests concatenated; empty or NULL for
    none), the inverse of ``join_refs``."""
    if not raw:
        return ()
    data = bytes(raw)
    count = len(data) // 32
    if count < len(_SLICES) and len(data) == 32 * count:
        return tuple(map(data.__getitem__, _SLICES[count]))
    return tuple(data[i:i + 32] for i in range(0, len(data), 32))


#: The slices of a refs value of n digests, for n below 64 (a map over them runs in C).
_SLICES = tuple(tuple(slice(32 * i, 32 * i + 32) for i in range(n)) for n in range(64))
_new_row = tuple.__new__
#: By byte length: the C callable splitting a bytes refs value of 2 to 63 digests, so the
#: row builders below need no Python call per node (one measured 0.9 us of a node's cost).
_SPLITTERS = {32 * n: operator.itemgetter(*_SLICES[n]) for n in range(2, 64)}


def stored_rows(rows: Iterable[Sequence[Any]]) -> list[StoredAsset]:
    """StoredAssets from (digest, kind, refs, body, codec) tuples as a database returns them
    (bytes, int, concatenated refs, bytes, int): built without a Python call per row, as a
    cold read materialises thousands."""
    return [_new_row(StoredAsset, (d, k, (_SPLITTERS.get(len(f), split_refs)
                                          if f.__class__ is bytes else split_refs)(f)
                                         if f else (), b, c))
            for d, k, f, b, c in rows]


def stored_tagged_rows(rows: Sequence[Sequence[Any]]
                       ) -> tuple[list[StoredAsset], list[StoredAsset]]:
    """``stored_rows`` of a query that returns two kinds of rows, tagged 0 and 1 in an
    extra first column (a chain's nodes, then their elements): split where the tags
    change, found in C, when the rows come in that order (as a UNION ALL yields them)."""
    tags = list(map(_TAG, rows))
    split = tags.index(1) if 1 in tags else len(rows)
    if 0 in tags[split:] or not set(tags) <= {0, 1}:
        return (stored_rows(r[1:] for r in rows if r[0] == 0),
                stored_rows(r[1:] for r in rows if r[0] == 1))
    return (stored_rows(map(_UNTAGGED, rows[:split])),
            stored_rows(map(_UNTAGGED, rows[split:])))


_TAG = operator.itemgetter(0)
_UNTAGGED = operator.itemgetter(slice(1, None))


def join_refs(refs: Sequence[Digest]) -> bytes:
    """The stored form of a refs list: the digests concatenated."""
    return b"".join(refs)


def stored(asset: Asset) -> StoredAsset:
    """The row that stores ``asset``, its body canonical (codec 0)."""
    return StoredAsset(asset.digest, int(asset.kind), asset.refs(), asset.body)


def _decompressed(row: StoredAsset, dictionaries: Mapping[int, codec.ZstdDictionary]
                  ) -> bytes:
    return codec.decode(row.codec, row.body, dictionaries)


def check_row(row: StoredAsset,
              dictionaries: Mapping[int, codec.ZstdDictionary] = codec.NO_DICTIONARIES,
              ) -> tuple[Literal["corrupt", "undecodable"], str] | None:
    """None if the stored row is sound, else ("corrupt" | "undecodable", reason).

    Corrupt: the stored body cannot be decompressed, or the canonical bytes (refs and body)
    do not hash to the digest, which also catches a tampered refs column that would mislead
    gc. Undecodable: they hash right but are not a valid asset of their kind, or the body
    needs a dictionary ``dictionaries`` does not hold.
    """
    digest, kind, refs, _, row_codec = row
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in ASSET_KINDS:
        return "undecodable", f"unknown asset kind {kind!r}"
    if not isinstance(row_codec, int) or isinstance(row_codec, bool):  # SQLite keeps it
        return "corrupt", f"its codec column holds a {type(row_codec).__name__}"
    if row_codec != codec.RAW and refs:
        return "corrupt", "a row with refs is never compressed, yet its codec says it is"
    if row_codec >= codec.FIRST_DICTIONARY and row_codec not in dictionaries:
        return "undecodable", f"its body needs dictionary {row_codec}, which is not stored"
    try:
        body = _decompressed(row, dictionaries)
    except codec.CodecError as e:
        return "corrupt", f"its stored body cannot be decompressed ({e})"
    try:
        sound = digest_of(kind, body, refs) == digest
    except ValueError:
        return "corrupt", f"a {Kind(kind).name.lower()} row carries refs"
    except TypeError:  # a column of the wrong type (SQLite keeps what was written)
        return "corrupt", "a column holds a value of the wrong type"
    if not sound:
        return "corrupt", "stored bytes (refs and body) do not hash to its digest"
    try:
        decode_asset(kind, body, refs)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        return "undecodable", f"{type(e).__name__}: {e}"
    except RecursionError:
        return "undecodable", "its body is nested too deeply"
    return None


def canonical_row(row: StoredAsset,
                  dictionaries: Mapping[int, codec.ZstdDictionary] = codec.NO_DICTIONARIES,
                  ) -> StoredAsset:
    """``row`` with its body decompressed (codec 0), after the checks of ``check_row``:
    the form bundles carry. IntegrityError names the row otherwise."""
    problem = check_row(row, dictionaries)
    if problem is not None:
        raise IntegrityError(f"asset {bytes(row.digest).hex()} is {problem[0]}: {problem[1]} "
                             "(run store.verify())")
    if row.codec == codec.RAW:
        return row
    return StoredAsset(row.digest, row.kind, row.refs, _decompressed(row, dictionaries))


def verified_body(row: StoredAsset,
                  dictionaries: Mapping[int, codec.ZstdDictionary] = codec.NO_DICTIONARIES,
                  ) -> bytes:
    """The canonical body of a stored row, decompressed and proved (with its kind and
    refs) to hash to its digest: the check half of ``load_row``, for a reader that decodes
    bodies itself. IntegrityError names the row otherwise."""
    digest, kind, refs, body, row_codec = row
    try:
        if row_codec != codec.RAW:
            if refs:  # never compressed (codec.encode): nothing to inflate
                raise codec.CodecError("a row with refs is never compressed")
            if row_codec >= codec.FIRST_DICTIONARY and row_codec not in dictionaries:
                raise IntegrityError(f"asset {bytes(digest).hex()} needs dictionary "
                                     f"{row_codec}, which this store does not hold "
                                     "(run store.verify())")
            body = codec.decode(row_codec, body, dictionaries)
        sound = digest_of(kind, body, refs) == digest
    except codec.CodecError as e:
        raise IntegrityError(f"asset {bytes(digest).hex()} is corrupt: its stored body cannot "
                             f"be decompressed ({e}); run store.verify()") from None
    except (ValueError, TypeError):  # a non-bytes column
        sound = False
    if not sound or kind not in ASSET_KINDS:
        raise IntegrityError(f"asset {bytes(digest).hex()} is corrupt: its stored bytes do "
                             "not match its digest (run store.verify())")
    return body


def load_row(row: StoredAsset,
             dictionaries: Mapping[int, codec.ZstdDictionary] = codec.NO_DICTIONARIES) -> Asset:
    """The asset a stored row holds, after proving its canonical bytes hash to its digest:
    the one verify-on-read every reader uses (decompressing first, so a codec is never
    trusted either). IntegrityError names the row otherwise."""
    body = verified_body(row, dictionaries)
    digest, kind, refs = row.digest, row.kind, row.refs
    try:
        if refs or kind in NODE_KINDS:
            asset = decode_asset(kind, body, refs)
        else:
            (asset,) = decode_leaves(kind, [body])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError,
            RecursionError) as e:
        raise IntegrityError(f"asset {digest.hex()} cannot be decoded: {e}") from e
    # Seed the cached properties with what was just proved, so nothing is re-encoded.
    asset.__dict__["body"] = body
    asset.__dict__["digest"] = digest
    return asset


def load_rows(rows: Sequence[StoredAsset],
              dictionaries: Mapping[int, codec.ZstdDictionary] = codec.NO_DICTIONARIES,
              ) -> list[Asset]:
    """``load_row`` of each row, in one pass over leaves of one kind: each step (decompress,
    hash, decode) runs over the whole batch in C, without a Python call per row (a cold read
    of a 1,000-turn history is 2,000 of them). Any failure re-runs the rows one by one, so
    the error is exactly ``load_row``'s."""
    if not rows:
        return []
    if len(rows) > _UNCHECKED_ROWS:  # in parts: what is unchecked at once stays bounded
        return [asset for start in range(0, len(rows), _UNCHECKED_ROWS)
                for asset in load_rows(rows[start:start + _UNCHECKED_ROWS], dictionaries)]
    kind = rows[0].kind
    codecs, stored_bodies = list(map(_CODEC, rows)), list(map(_BODY, rows))
    # A frame that may declare more than 64 KiB is read, checked and hashed on its own
    # (load_row), so a batch of them never holds more than one unchecked body.
    if (kind not in ASSET_KINDS or kind in NODE_KINDS
            or set(map(_KIND, rows)) != {kind}
            or not codec.small_frames(codecs, stored_bodies)):
        return [load_row(r, dictionaries) for r in rows]
    if any(map(_REFS, rows)):
        # A few messages reference the tools their call was offered: those one by one,
        # the rest still in one pass.
        try:
            batch = iter(load_rows([r for r in rows if not r.refs], dictionaries))
            return [load_row(r, dictionaries) if r.refs else next(batch) for r in rows]
        except IntegrityError:  # the first bad row in order names the error, as one by one
            return [load_row(r, dictionaries) for r in rows]
    digests = list(map(_DIGEST, rows))
    try:
        bodies = codec.decode_many(codecs, stored_bodies, dictionaries)
        if digests_of(kind, bodies) != digests:
            raise ValueError("a digest does not match")
        assets = decode_leaves(kind, bodies)
    except (codec.CodecError, ValueError, TypeError, msgspec.DecodeError,
            msgspec.ValidationError):
        return [load_row(r, dictionaries) for r in rows]
    # Seeded as load_row does; item assignment, as update(body=, digest=) costs twice as much.
    for asset, body, digest in zip(assets, bodies, digests, strict=True):
        seeded = asset.__dict__
        seeded["body"] = body
        seeded["digest"] = digest
    return assets


def node_counters(row: StoredAsset) -> tuple[int, int]:
    """(length, size) of a stored node row, verified as ``load_row`` would, without
    building the node: what a chain walk needs of every node but its head."""
    body = verified_body(row)
    if row.kind not in NODE_KINDS or set(map(len, row.refs)) - {32}:
        raise IntegrityError(f"asset {row.digest.hex()} is not a node with 32-byte refs")
    try:
        counters = NODE_BODY.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise IntegrityError(f"asset {row.digest.hex()} cannot be decoded: {e}") from e
    return counters.length, counters.size


def nodes_counters(rows: Sequence[StoredAsset]) -> tuple[list[int], list[int]]:
    """``node_counters`` of every row, as two lists (lengths, sizes), in one pass over nodes
    of one kind: hashed and decoded without a Python call per node (a 1,000-turn
    conversation is 1,000 nodes). Any failure re-runs the rows one by one, so the error is
    exactly ``node_counters``'s."""
    if not rows:
        return [], []
    kind = rows[0].kind
    try:
        if (kind not in NODE_KINDS or set(map(_KIND, rows)) != {kind}
                or set(map(_CODEC, rows)) != {codec.RAW}
                or set(map(len, chain.from_iterable(map(_REFS, rows)))) - {32}):
            raise ValueError("not a batch of raw nodes of one kind")
        bodies = list(map(_BODY, rows))
        if digests_of(kind, bodies, list(map(_REFS, rows))) != list(map(_DIGEST, rows)):
            raise ValueError("a digest does not match")
        counters = list(map(NODE_BODY.decode, bodies))
    except (ValueError, TypeError, msgspec.DecodeError, msgspec.ValidationError):
        pairs = [node_counters(r) for r in rows]
        return [n for n, _ in pairs], [s for _, s in pairs]
    return [c.length for c in counters], [c.size for c in counters]


_DIGEST, _KIND, _REFS, _BODY, _CODEC = map(operator.itemgetter, range(5))
#: Rows load_rows decompresses before checking their digests: codec.MAX_UNCHECKED bytes of
#: small frames (each declares at most codec.SMALL_FRAME_MAX).
_UNCHECKED_ROWS = codec.MAX_UNCHECKED // (codec.SMALL_FRAME_MAX + 1)
