"""Redaction: erasing one element's body while every digest that names it stays true.

A redacted element (today: a conversation message) leaves, in every node record that held
its body, a *tombstone* (``chains.Tombstone``): its digest, so the node still hashes to
its digest and every state that contained it still verifies, and a ``Redaction``: why,
when, how many bytes the body had (the node's ``size`` counter covers them) and the few
fields that keep a conversation well formed without the text (a message's role, the id of
the tool call a tool result answers, the ids and names of the tool calls an assistant
asked for; never the content, never the arguments).

Reading a redacted message gives a *marker message* (``marker``): the same role and tool
call ids, and content ``[redacted <date>: <reason>]`` (``[redacted <date>]`` without a
reason), never empty text. ``redacted(message)`` tells a marker from a message and gives
the digest, reason and time. A marker is an ordinary message of its own digest: writing
it elsewhere stores the marker, not the erased body.

The store also keeps one REDACTION state per redacted digest (stream: the digest in hex,
body: ``RedactionNote``): the list ``verify`` and the write path consult (a later write of
the same content is refused), and what a bundle carries so that an import refuses the body
too. This module is the pure part (formats, the rewrite of one record); the one
transaction that applies it is ``EventLog.redact`` and each backend's ``redact``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, NamedTuple
from uuid import UUID

import blake3
import msgspec

from immagent import chains
from immagent.assets import Digest, Kind, Message, ToolCall, decode_element, encode

__all__ = [
    "MAX_REASON_BYTES",
    "REDACTABLE",
    "STREAM_HEX",
    "Redacted",
    "Redaction",
    "RedactionNote",
    "decode_note",
    "erase",
    "marker",
    "marker_text",
    "redacted",
    "state_id",
    "tombstone_size",
]

#: Element kinds that can be redacted, with their chain's node kind. Other chains (session
#: items, LangGraph values, pydantic-ai entries) are refused by ``EventLog.redact``.
REDACTABLE: dict[int, int] = {int(Kind.MESSAGE): int(Kind.NODE)}
#: Longest reason kept (UTF-8 bytes); a longer one is refused, never cut.
MAX_REASON_BYTES = 1000
#: Most tool calls a tombstone keeps the ids and names of (untrusted rows are bounded).
_MAX_CALLS = 1000
#: A REDACTION state's stream is the redacted digest in lowercase hex.
STREAM_HEX = 64

Role = Literal["user", "assistant", "tool"]


class Redaction(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
                rename={"reason": "why", "at": "at", "size": "n", "role": "r",
                        "tool_call_id": "ti", "tool_calls": "tc"}):
    """A tombstone's description of an erasure (its ``info``, canonical msgpack): the
    reason, when (microseconds since the Unix epoch, UTC), the erased body's length in
    bytes, and what keeps a conversation well formed (role, tool call ids and names)."""

    reason: str
    at: int
    size: int
    role: Role | None = None
    tool_call_id: str | None = None
    tool_calls: tuple[tuple[str, str], ...] = ()


class RedactionNote(msgspec.Struct, frozen=True, omit_defaults=True,
                    forbid_unknown_fields=True, rename={"reason": "why", "at": "at",
                                                        "kind": "k"}):
    """The body of a REDACTION state: the reason, when (as in ``Redaction``) and the
    redacted element's kind."""

    reason: str
    at: int
    kind: int


class Redacted(NamedTuple):
    """What a marker message stands for: the erased element's digest, why and when."""

    digest: Digest
    reason: str
    at: datetime


_INFO = msgspec.msgpack.Decoder(Redaction)
_NOTE = msgspec.msgpack.Decoder(RedactionNote)
_ID_PREFIX = b"immagent/redaction/v1\n"


def _checked(reason: str, at: int) -> None:
    if len(reason.encode("utf-8", "surrogatepass")) > MAX_REASON_BYTES:
        raise ValueError(f"a redaction reason longer than {MAX_REASON_BYTES} bytes")
    if not 0 <= at < 1 << 62:
        raise ValueError("a redaction time out of range")


def decode_info(stone: chains.Tombstone) -> Redaction:
    """The description a tombstone holds (ValueError if malformed or out of bounds)."""
    try:
        info = _INFO.decode(stone.info)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"a damaged tombstone description: {e}") from None
    _checked(info.reason, info.at)
    if info.size < 0 or len(info.tool_calls) > _MAX_CALLS:
        raise ValueError("a tombstone description out of bounds")
    return info


def decode_note(body: bytes) -> RedactionNote:
    """A REDACTION state's body (ValueError if malformed or out of bounds)."""
    try:
        note = _NOTE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"a damaged redaction record: {e}") from None
    _checked(note.reason, note.at)
    if note.kind not in REDACTABLE:
        raise ValueError(f"a redaction of kind {note.kind}, which cannot be redacted")
    return note


def tombstone_size(stone: chains.Tombstone) -> int:
    """The byte length of the body a tombstone replaced (what its node's counters count)."""
    return decode_info(stone).size


def state_id(digest: Digest) -> UUID:
    """The id of the REDACTION state of ``digest``: derived from it, so a digest has one."""
    raw = bytearray(blake3.blake3(_ID_PREFIX + digest).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom), RFC 9562
    raw[8] = (raw[8] & 0x3F) | 0x80
    return UUID(bytes=bytes(raw))


def micros(at: datetime) -> int:
    """``at`` as microseconds since the Unix epoch (an aware datetime)."""
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // _MICRO


_MICRO = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def marker_text(reason: str, at: datetime) -> str:
    """The content of a marker message: ``[redacted 2026-12-08: <reason>]``."""
    day = at.astimezone(UTC).date().isoformat()
    return f"[redacted {day}: {reason}]" if reason else f"[redacted {day}]"


def marker(stone: chains.Tombstone) -> Message:
    """The message a redacted message reads as (see the module docstring); ValueError if
    the tombstone is damaged."""
    info = decode_info(stone)
    at = datetime.fromtimestamp(0, UTC) + info.at * _MICRO
    calls = tuple(ToolCall(id=i, name=n) for i, n in info.tool_calls) or None
    message = Message(role=info.role or "user", content=marker_text(info.reason, at),
                      tool_calls=calls, tool_call_id=info.tool_call_id)
    message.__dict__["redacted"] = Redacted(stone.digest, info.reason, at)
    return message


def redacted(message: object) -> Redacted | None:
    """What a marker message stands for, or None for any other object."""
    found = getattr(message, "__dict__", {}).get("redacted")
    return found if isinstance(found, Redacted) else None


def _info(kind: int, body: bytes, reason: str, at: int) -> bytes:
    """The canonical description of the erasure of ``body`` (an element of ``kind``)."""
    if kind != Kind.MESSAGE:
        return encode(Redaction(reason, at, len(body)))
    message = decode_element(kind)(body)
    assert isinstance(message, Message)
    calls = tuple((c.id, c.name) for c in message.tool_calls or ())
    return encode(Redaction(reason, at, len(body), message.role, message.tool_call_id,
                            calls))


class Erased(NamedTuple):
    """A node record after ``erase``: the new record, the row's new out-of-line refs and
    the digests it erased, in record order."""

    record: bytes
    refs: tuple[Digest, ...]
    erased: list[Digest]


def erase(record: bytes, refs: Sequence[Digest], element_kind: int,
          targets: Mapping[Digest, RedactionNote],
          leaves: Mapping[Digest, bytes]) -> Erased | None:
    """The record with every element in ``targets`` replaced by its tombstone (inline
    bodies found by hashing them; out-of-line ones by their ref, their body taken from
    ``leaves``, and dropped from the refs), or None if it holds none of them. ValueError
    if the record is damaged or an out-of-line target's body is not in ``leaves``."""
    fields, entries = chains.split_record(record)
    prefix = blake3.blake3(bytes((element_kind,)))
    pending = iter(refs)
    kept: list[Digest] = []
    out: list[bytes] = []
    erased: list[Digest] = []
    for entry in entries:
        if entry == chains.OUT_OF_LINE:
            ref = next(pending, None)
            if ref is None:
                raise ValueError("a record lists more out-of-line elements than its refs")
            note = targets.get(ref)
            if note is None:
                kept.append(ref)
                out.append(entry)
                continue
            body = leaves.get(ref)
            if body is None:
                raise ValueError(f"out-of-line element {ref.hex()} is not stored")
            out.append(chains.tombstone_entry(ref, _info(element_kind, body, note.reason,
                                                         note.at)))
            erased.append(ref)
            continue
        if chains.is_marker(entry):
            out.append(entry)
            continue
        digest = prefix.copy().update(entry).digest()
        note = targets.get(digest)
        if note is None:
            out.append(entry)
            continue
        out.append(chains.tombstone_entry(digest, _info(element_kind, entry, note.reason,
                                                        note.at)))
        erased.append(digest)
    if next(pending, None) is not None:
        raise ValueError("a record's refs list more out-of-line elements than it holds")
    if not erased:
        return None
    return Erased(chains.record(fields, out), tuple(kept), erased)
