"""Crafted audit bundles for the adversarial tests: files in the documented bundle format
(``immagent.audit.bundle``), written here from scratch with valid framing and a valid
checksum, so only the content can be what a reader refuses.

``agent_state`` builds agent-state records whose state digest is correct for whatever fields
it is given (a bad name, a reserved config key, a lineage that closes a cycle), so every
per-record digest check passes and the rules under test are the only line of defence.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import msgspec

from immagent.assets import EMPTY_CONVERSATION, Asset, ConversationNode, Message, SystemPrompt
from immagent.audit.bundle import MAGIC
from immagent.records import AgentRecord, state_digest
from immagent.rows import StoredAsset, stored

_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()


def agent_state(system_prompt: bytes, conversation: bytes, *, name: str = "crafted",
                model: str = "immagent/echo", model_config: dict[str, Any] | None = None,
                metadata: dict[str, Any] | None = None, id: uuid.UUID | None = None,
                parent_id: uuid.UUID | None = None) -> AgentRecord:
    """An agent state whose digest matches its fields, whatever they are."""
    config, meta = model_config or {}, metadata or {}
    return AgentRecord(id=id or uuid.uuid4(), parent_id=parent_id,
                       created_at=datetime.now(UTC), name=name, model=model,
                       system_prompt=system_prompt, conversation=conversation,
                       model_config=config, metadata=meta,
                       digest=state_digest(name, model, system_prompt, conversation, config,
                                           meta))


def conversation(*texts: str) -> tuple[list[Asset], ConversationNode]:
    """A one-node conversation of user messages: (the assets it needs, its head node)."""
    messages = [Message(role="user", content=t) for t in texts]
    head = EMPTY_CONVERSATION.extend(messages) if messages else EMPTY_CONVERSATION
    return [EMPTY_CONVERSATION, *messages, head], head


def rows(assets: Iterable[Asset | StoredAsset]) -> list[StoredAsset]:
    """Stored rows of assets (rows given as rows are kept as they are), each once."""
    out: dict[bytes, StoredAsset] = {}
    for a in assets:
        row = a if isinstance(a, StoredAsset) else stored(a)
        out.setdefault(row.digest, row)
    return list(out.values())


def write(path: Path, states: Sequence[AgentRecord], assets: Iterable[Asset | StoredAsset],
          *, version: int = 1, head: uuid.UUID | None = None, header: Any = None,
          raw: Sequence[bytes] = ()) -> Path:
    """A bundle of ``states`` (newest first) and ``assets`` with a correct checksum and end
    record; version 1 carries agent records, version 2 state rows. ``header`` replaces the
    header (msgpack-able data, or raw bytes) to craft a malformed one; ``raw`` payloads are
    framed after the states, as they are (counted as states in the end record)."""
    body = bytearray(MAGIC)
    hasher = blake3.blake3(MAGIC)

    def frame(record: object, *, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else _encoder.encode(record)
        data = _LEN.pack(len(payload)) + payload
        body.extend(data)
        hasher.update(data)

    if header is None:
        header = {"format": "immagent-bundle", "version": version,
                  "head": head or (states[0].id if states else uuid.uuid4()),
                  "created_at": datetime.now(UTC)}
    frame(None, raw=header if isinstance(header, bytes) else _encoder.encode(header))
    for s in states:
        if version == 1:
            frame(("agent", s))
        else:
            row = s.to_row()
            frame(("state", row.id, row.parent_id, row.kind, row.stream, b"".join(row.refs),
                   row.body, row.digest, row.created_at))
    for payload in raw:
        frame(None, raw=payload)
    asset_rows = rows(assets)
    for r in asset_rows:
        frame(("asset", r.digest, r.kind, r.body, b"".join(r.refs)))
    end = _encoder.encode(("end", len(states) + len(raw), len(asset_rows), hasher.digest()))
    body.extend(_LEN.pack(len(end)) + end)
    path.write_bytes(bytes(body))
    return path


def deeply_nested(depth: int) -> bytes:
    """Msgpack of ``depth`` nested one-element arrays around nil (no encoder nests that
    deep: it would recurse)."""
    return b"\x91" * depth + b"\xc0"


def agent_frame(record: AgentRecord, placeholder: str, replacement: bytes) -> bytes:
    """A version-1 agent frame of ``record`` with the msgpack string ``placeholder`` (a
    value in its metadata) replaced by raw msgpack bytes."""
    payload = _encoder.encode(("agent", record))
    marker = _encoder.encode(placeholder)
    assert payload.count(marker) == 1
    return payload.replace(marker, replacement)


def valid_agent(path: Path, *, prompt: str = "You are crafted.", texts: Sequence[str] = ("hi",),
                **fields: Any) -> tuple[Path, AgentRecord]:
    """A one-state bundle that every check accepts unless ``fields`` say otherwise."""
    prompt_asset = SystemPrompt(text=prompt)
    assets, head = conversation(*texts)
    record = agent_state(prompt_asset.digest, head.digest, **fields)
    return write(path, [record], [prompt_asset, *assets]), record


def frames(path: Path) -> list[bytes]:
    """The msgpack payloads of a bundle's frames, in order (header first, end last)."""
    data = path.read_bytes()[len(MAGIC):]
    out: list[bytes] = []
    while data:
        (length,) = _LEN.unpack(data[:_LEN.size])
        out.append(data[_LEN.size:_LEN.size + length])
        data = data[_LEN.size + length:]
    return out


def reframe(path: Path, payloads: Sequence[bytes]) -> Path:
    """Write ``payloads`` (header, records, and an end record last) as a bundle at ``path``
    with the end record's counts and checksum made right again: what a deliberate forger
    does, so only what no unkeyed checksum can catch is left to find."""
    *records, _ = payloads
    body = bytearray(MAGIC)
    for payload in records:
        body += _LEN.pack(len(payload)) + payload
    tags = [msgspec.msgpack.decode(p)[0] for p in records[1:]]
    end = _encoder.encode(["end", sum(t in ("state", "agent") for t in tags),
                           tags.count("asset"), blake3.blake3(bytes(body)).digest()])
    body += _LEN.pack(len(end)) + end
    path.write_bytes(bytes(body))
    return path
