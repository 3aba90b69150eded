"""The stored form of namespaced keys (a LangGraph ``BaseStore``'s items): two state kinds, no I/O.

``immagent.clients.store_items.ItemLog`` writes these rows and
``immagent.integrations.langgraph_store`` adapts them to LangGraph; the core (verify, gc,
bundles) reads them through ``records.STATE_KINDS`` without either, so a store they wrote
can be audited anywhere.

An *item state* is a state of kind STORE_ITEM, one per put, refresh or delete of a key
(the key's history), and a *head* (kind STORE_HEAD) is the key's current value:

* ``stream``: the namespace's labels joined by ``.`` (LangGraph's own text form: a label
  holds no ``.``), U+001F, then the key. A key's states are one stream, so its current
  state is one probe on the (kind, stream, seq) index and its history is the stream.
* ``refs``: the value (one ITEM asset: the canonical msgpack of a JSON object, shared by
  every key, namespace and version that holds the same object), or nothing for a delete.
* ``body``: ``ItemBody``: when the item was created and last put, its TTL and expiry.
* ``parent_id``: the key's previous state, so a key's history is one parent chain.
* ``id``: ``item_state_id``: the first bits hash the namespace level by level, the rest
  are random, so every key under a namespace prefix sits in one id range (``prefix_range``):
  a search or a namespace listing is a range scan of the state ids, never of the store.

A *head* has the stream, refs and body of the key's newest item state, which is its
``parent_id``; its ``id`` is derived from the namespace and key (``head_state_id``, in the
namespace's id range), so a put writes its item state and replaces the head in the same
transaction (``Store.commit(replace=…)``: a row deleted and inserted, never updated), and a
delete or an expiry sweep removes it. A get is then one primary-key probe, and a search or
a namespace listing scans only the heads in the prefix's range: one row per live key,
however long the keys' histories are.

The digest of both kinds is the generic one (``records.stream_digest``), so the times, the
TTL and the expiry are hashed with the value: an audit sees exactly what was kept, and for
how long.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final
from uuid import UUID

import blake3
import msgspec

from immagent.assets import Kind
from immagent.exceptions import ValidationError

__all__ = [
    "SEP",
    "ItemBody",
    "check_key",
    "check_namespace",
    "decode_head",
    "decode_item",
    "expires_at",
    "from_micros",
    "head_state_id",
    "item_state_id",
    "item_stream",
    "micros",
    "namespace_text",
    "parse_item_stream",
    "prefix_range",
]

#: Separates the namespace text from the key in a stream (a namespace label cannot hold it).
SEP: Final = "\x1f"
_KIND: Final = int(Kind.STORE_ITEM)
#: Bits of the id taken by the hash of each namespace level, from the first: enough for
#: many distinct labels where namespaces usually vary (a user id at the second level),
#: fewer for the deeper levels. Deeper levels only narrow the range no further.
_LEVEL_BITS: Final = (16, 24, 8, 4)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class ItemBody(msgspec.Struct, frozen=True, omit_defaults=True,
               rename={"created": "c", "updated": "u", "ttl": "t", "expires": "e"}):
    """What an item state holds besides its value ref. Times are microseconds since the
    Unix epoch (UTC). A put: ``created`` (when this key's current life began: its first
    put after nothing or a delete), ``updated`` (this put), the TTL in minutes and the
    expiry (None: never). A refresh repeats the put's fields with a later ``expires``.
    A delete has no ref and only ``updated`` (when it was deleted)."""

    updated: int
    created: int | None = None
    ttl: float | None = None
    expires: int | None = None


_body_decoder = msgspec.msgpack.Decoder(ItemBody)


def decode_head(body: bytes, refs: int) -> ItemBody:
    """The body of a head (the same as its item state's; a head always holds a value)."""
    if refs != 1:
        raise ValueError(f"a head pins its key's value, this one {refs} refs")
    return decode_item(body, refs)


def decode_item(body: bytes, refs: int) -> ItemBody:
    """The body of an item state with ``refs`` refs, checked against them (msgspec errors
    or ValueError when malformed): a put pins one value and says when it was created."""
    decoded = _body_decoder.decode(body)
    if refs not in (0, 1):
        raise ValueError(f"an item state pins 0 or 1 value, this one {refs}")
    if refs == 1 and decoded.created is None:
        raise ValueError("an item state with a value must say when it was created")
    if refs == 0 and (decoded.created, decoded.ttl, decoded.expires) != (None, None, None):
        raise ValueError("a deleted item's state holds only when it was deleted")
    if decoded.ttl is not None and not decoded.ttl > 0:
        raise ValueError(f"an item's TTL must be > 0 minutes, not {decoded.ttl!r}")
    if (decoded.ttl is None) != (decoded.expires is None):
        raise ValueError("an item has an expiry exactly when it has a TTL")
    return decoded


def expires_at(body: ItemBody) -> datetime | None:
    """When the item expires (None: never, or a delete)."""
    return None if body.expires is None else from_micros(body.expires)


def micros(when: datetime) -> int:
    """``when`` as stored: whole microseconds since the Unix epoch."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    """A stored time as an aware UTC datetime (exact: no float on the way)."""
    return _EPOCH + timedelta(microseconds=value)


# -- namespaces, keys, streams ------------------------------------------------------------


def check_namespace(field: str, namespace: object, *, empty: bool = False) -> tuple[str, ...]:
    """A namespace as stored: a tuple (or list) of non-empty str labels without ``.``, NUL
    or U+001F, valid Unicode; empty only where allowed (a prefix)."""
    if isinstance(namespace, str) or not isinstance(namespace, Sequence):
        raise ValidationError(field, f"must be a tuple of str labels, got "
                              f"{type(namespace).__name__}", None)
    if not namespace and not empty:
        raise ValidationError(field, "must not be empty", None)
    for i, label in enumerate(namespace):
        if not isinstance(label, str):
            raise ValidationError(f"{field}[{i}]", f"must be a str, got "
                                  f"{type(label).__name__}", None)
        if not label:
            raise ValidationError(f"{field}[{i}]", "must not be empty", label)
        if "." in label or "\x00" in label or SEP in label:
            raise ValidationError(f"{field}[{i}]", "must not contain '.', NUL or U+001F",
                                  label)
        _unicode(f"{field}[{i}]", label)
    return tuple(str.__str__(label) for label in namespace)


def check_key(field: str, key: object) -> str:
    """A key as stored: a str without NUL, valid Unicode (it ends a stream)."""
    if not isinstance(key, str):
        raise ValidationError(field, f"must be a str, got {type(key).__name__}", None)
    if "\x00" in key:
        raise ValidationError(field, "must not contain NUL characters", key)
    _unicode(field, key)
    return str.__str__(key)


def _unicode(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode (lone surrogate)", None) from None


def namespace_text(namespace: Sequence[str]) -> str:
    """The labels joined by ``.`` (LangGraph's text form of a namespace)."""
    return ".".join(namespace)


def item_stream(namespace: Sequence[str], key: str) -> str:
    """The stream of a key's states."""
    return f"{namespace_text(namespace)}{SEP}{key}"


def parse_item_stream(stream: str) -> tuple[tuple[str, ...], str]:
    """(namespace, key) of an item stream (ValueError if it is not one)."""
    text, sep, key = stream.partition(SEP)
    labels = tuple(text.split("."))
    if not sep or not all(labels):
        raise ValueError(f"{stream!r} is not the stream of an item state")
    return labels, key


# -- ids ------------------------------------------------------------------------------------


def _level_hash(label: str, bits: int) -> int:
    digest = blake3.blake3(b"immagent-namespace\x00" + label.encode("utf-8")).digest(8)
    return int.from_bytes(digest, "big") >> (64 - bits)


def _hashed(namespace: Sequence[str], depth: int) -> int:
    """The 52 hashed bits of an id for the first ``depth`` levels of ``namespace``
    (levels past them are zero bits)."""
    value = 0
    for level, bits in enumerate(_LEVEL_BITS):
        value <<= bits
        if level < min(depth, len(namespace)):
            value |= _level_hash(namespace[level], bits)
    return value


def _uuid(hashed: int, rest: int) -> UUID:
    """A version-8 UUID from 52 hashed bits and 70 more (``rest``): the first 48 hashed
    bits, the version nibble, the last 4 hashed bits (the fourth level), then ``rest``
    around the RFC 4122 variant."""
    high = (hashed >> 4) << 16 | 0x8 << 12 | (hashed & 0xF) << 8 | (rest >> 62) & 0xFF
    low = 0b10 << 62 | rest & ((1 << 62) - 1)
    return UUID(int=high << 64 | low)


def item_state_id(namespace: Sequence[str]) -> UUID:
    """A fresh state id for a state of a key in ``namespace``: the namespace's level
    hashes, then 70 random bits."""
    return _uuid(_hashed(namespace, len(namespace)),
                 int.from_bytes(os.urandom(9), "big") >> 2)


def head_state_id(namespace: Sequence[str], key: str) -> UUID:
    """The id of the head of ``key`` in ``namespace``: the namespace's level hashes, then
    70 bits of the hash of the namespace and the key (the same in every store)."""
    digest = blake3.blake3(b"immagent-head\x00" + item_stream(namespace, key).encode("utf-8"))
    return _uuid(_hashed(namespace, len(namespace)),
                 int.from_bytes(digest.digest(9), "big") >> 2)


def prefix_range(prefix: Sequence[str]) -> tuple[UUID, UUID] | None:
    """(low, high): every state of a key under namespace ``prefix`` has an id strictly
    between them (keys of other namespaces can too, when hashes collide: filter by
    stream). None for the empty prefix (every item state)."""
    depth = min(len(prefix), len(_LEVEL_BITS))
    if depth == 0:
        return None
    fixed = sum(_LEVEL_BITS[:depth])
    if fixed > 48:
        fixed += 4  # the version nibble (constant) sits before the fourth level's bits
    # The ids of those keys share their first ``fixed`` bits; everything after them varies,
    # so the bounds are that prefix followed by all 0s or all 1s (no id equals either: its
    # variant bit is 1, and its version nibble is not 0xF).
    low = _uuid(_hashed(prefix, depth), 0).int >> (128 - fixed) << (128 - fixed)
    return UUID(int=low), UUID(int=low | ((1 << (128 - fixed)) - 1))
