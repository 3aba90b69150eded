"""Identifier helpers: time-ordered UUIDv7 for agent states, UUIDv8 derived from digests,
and the compact stored form of ids a client minted as text."""

from __future__ import annotations

import os
import time
from uuid import UUID

__all__ = ["pack_text_id", "unpack_text_id", "uuid7", "uuid_from_digest"]

_last_ms = 0
_counter = 0


def uuid7() -> UUID:
    """A fresh RFC 9562 version-7 UUID: 48-bit Unix milliseconds, then randomness.

    Within one millisecond a 12-bit counter keeps the ids of one process increasing, so
    sorting agent ids sorts them by creation time.
    """
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms = _last_ms
        _counter += 1
        if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
            ms += 1
            _counter = 0
    else:
        _counter = 0
    _last_ms = ms
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76 | _counter << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    return UUID(int=value)


def uuid_from_digest(digest: bytes) -> UUID:
    """The version-8 UUID that names a content asset: its digest's first 122 bits.

    The same content always gets the same UUID, so ids can be compared across stores.
    """
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return UUID(bytes=bytes(raw))


def pack_text_id(text: str) -> str | bytes:
    """How an id a client minted as text is stored: the 16 bytes of a UUID written in its
    canonical form (36 lowercase characters, as ``str(uuid)`` gives), else the text itself.
    One text has one stored form, so it hashes the same wherever it is written; msgpack
    keeps bytes and text apart, so ``unpack_text_id`` tells them back."""
    if len(text) == 36:
        try:
            parsed = UUID(text)
        except ValueError:
            return text
        if str(parsed) == text:
            return parsed.bytes
    return text


def unpack_text_id(stored: str | bytes) -> str:
    """The text of an id stored by ``pack_text_id`` (ValueError if it is neither)."""
    if isinstance(stored, bytes):
        if len(stored) != 16:
            raise ValueError(f"a packed id has 16 bytes, not {len(stored)}")
        h = stored.hex()  # str(UUID(bytes=...)), without building a UUID (a cold read has 1000s)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if isinstance(stored, str):
        return stored
    raise ValueError(f"a stored id is text or 16 bytes, not {type(stored).__name__}")
