"""The immutable data model and its content addressing.

Every content asset (system prompt, message, conversation node) is a frozen msgspec Struct.
Its canonical bytes are deterministic msgpack (map keys sorted, default-valued fields left
out, so adding an optional field later does not change old digests; fields encode in
declaration order, so never reorder them; keys are short aliases fixed per field, because
they are repeated in every stored row); its digest is
``blake3(kind byte || canonical bytes)`` (nodes also hash their refs, see ``digest_of``);
its UUID is derived from that digest. What is
hashed is exactly the encoded fields: no timestamps, no database ids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import IntEnum
from typing import Any, ClassVar, Literal, TypeAlias
from uuid import UUID

import blake3
import msgspec

from immagent.exceptions import ValidationError
from immagent.ids import uuid_from_digest

__all__ = [
    "EMPTY_CONVERSATION",
    "AgentRecord",
    "Asset",
    "Conversation",
    "ConversationNode",
    "Digest",
    "Kind",
    "Message",
    "Role",
    "SystemPrompt",
    "ToolCall",
    "decode_asset",
    "digest_of",
    "encode",
    "state_digest",
]

Digest: TypeAlias = bytes
Role = Literal["user", "assistant", "tool"]


class Kind(IntEnum):
    """Asset kinds; the kind byte is hashed, so equal bytes of two kinds never collide."""

    SYSTEM_PROMPT = 1
    MESSAGE = 2
    NODE = 3
    AGENT_STATE = 4


_encoder = msgspec.msgpack.Encoder(order="deterministic")


def encode(obj: object) -> bytes:
    """Canonical bytes of an asset (deterministic msgpack)."""
    return _encoder.encode(obj)


def digest_of(kind: int, body: bytes, refs: Sequence[Digest] = ()) -> Digest:
    """The 32-byte blake3 digest of a stored row; verification re-runs exactly this.

    Leaves (prompts, messages): ``blake3(kind || body)``. Nodes keep their links beside
    the body, in the refs column gc walks, so the links are hashed from there:
    ``blake3(kind || count as 4 bytes big-endian || refs || body)``. Either way the digest
    covers every stored byte, and a refs column that was tampered with no longer matches.
    """
    prefix = _PREFIXES.get(kind) or bytes((kind,))
    if kind == Kind.NODE:
        prefix += len(refs).to_bytes(4, "big") + b"".join(refs)
    elif refs:
        raise ValueError(f"assets of kind {kind} have no refs")
    return blake3.blake3(prefix + body).digest()


_PREFIXES = {int(k): bytes((k,)) for k in Kind}


class _Content(msgspec.Struct, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """Shared behaviour of content assets: canonical body, digest and derived UUID."""

    kind: ClassVar[Kind]

    @functools.cached_property
    def body(self) -> bytes:
        """Canonical encoded bytes (what the store keeps)."""
        return encode(self)

    @functools.cached_property
    def digest(self) -> Digest:
        """blake3 over the kind byte, the refs (nodes only) and the canonical bytes."""
        return digest_of(self.kind, self.body, self.refs())

    @property
    def id(self) -> UUID:
        """A UUID derived from the digest: same content, same id, in any store."""
        return uuid_from_digest(self.digest)

    def refs(self) -> tuple[Digest, ...]:
        """Digests this asset points at (the edges garbage collection follows)."""
        return ()


class SystemPrompt(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
                   rename={"text": "t"}):
    """A system prompt; stored once however many agents use it."""

    text: str
    kind: ClassVar[Kind] = Kind.SYSTEM_PROMPT


class ToolCall(msgspec.Struct, frozen=True, omit_defaults=True,
               rename={"id": "i", "name": "n", "arguments": "a"}):
    """A tool call requested by the model; ``arguments`` is the JSON text it produced."""

    id: str
    name: str
    arguments: str = "{}"


class Message(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
              rename={"role": "r", "content": "c", "tool_calls": "tc", "tool_call_id": "ti",
                      "input_tokens": "in", "output_tokens": "out", "model": "m",
                      "call_config": "cfg", "is_error": "err"}):
    """One conversation message.

    Assistant messages carry the token usage of the call that produced them and, for
    audits, the model and the call parameters (``call_config``) that produced them.
    Tool results carry ``tool_call_id`` and ``is_error``.
    """

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    call_config: dict[str, Any] | None = None
    is_error: bool = False
    kind: ClassVar[Kind] = Kind.MESSAGE

    # The three constructors of immagent 0.1.2, with its parameter names (``content``).
    # They only build the value; the store checks a message when it is written.

    @classmethod
    def user(cls, content: str) -> Message:
        """A user message."""
        return cls(role="user", content=content)

    @classmethod
    def assistant(cls, content: str | None, tool_calls: Iterable[ToolCall] | None = None,
                  input_tokens: int | None = None,
                  output_tokens: int | None = None) -> Message:
        """An assistant message with its tool calls and the token usage of its call."""
        # A tuple, and None for "no calls": one form per content, so one digest.
        calls = tuple(tool_calls) if tool_calls is not None else ()
        return cls(role="assistant", content=content, tool_calls=calls or None,
                   input_tokens=input_tokens, output_tokens=output_tokens)

    @classmethod
    def tool_result(cls, tool_call_id: str, content: str) -> Message:
        """The result of the tool call ``tool_call_id``."""
        return cls(role="tool", content=content, tool_call_id=tool_call_id)


class ConversationNode(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
                       rename={"parent": "p", "messages": "m", "length": "n", "size": "s"}):
    """A link of the conversation hash chain: its parent node and the messages it adds.

    ``length`` and ``size`` are the number of messages and their total encoded bytes from
    the root up to and including this node: what a copy-per-step layout would store, known
    without reading the history. The empty conversation has no parent and no messages;
    every other node has a parent.

    Stored form: the links (parent, then messages) are the row's refs, and the body holds
    only ``length`` and ``size`` — the digests are not written twice (see ``digest_of``).
    """

    parent: Digest | None = None
    messages: tuple[Digest, ...] = ()
    length: int = 0
    size: int = 0
    kind: ClassVar[Kind] = Kind.NODE

    def __post_init__(self) -> None:
        if self.parent is None and self.messages:
            raise ValueError("a conversation node that adds messages needs a parent")

    @functools.cached_property
    def body(self) -> bytes:
        """The stored body: the counters only (the links are the refs)."""
        return encode(_NodeBody(length=self.length, size=self.size))

    def refs(self) -> tuple[Digest, ...]:
        return () if self.parent is None else (self.parent, *self.messages)

    def extend(self, messages: Iterable[Message]) -> ConversationNode:
        """The node that appends ``messages`` to this conversation."""
        added = tuple(messages)
        return ConversationNode(parent=self.digest, messages=tuple(m.digest for m in added),
                                length=self.length + len(added),
                                size=self.size + sum(len(m.body) for m in added))


class _NodeBody(msgspec.Struct, frozen=True, omit_defaults=True,
                rename={"length": "n", "size": "s"}):
    """What a node stores besides its refs."""

    length: int = 0
    size: int = 0


EMPTY_CONVERSATION = ConversationNode()


class Conversation(msgspec.Struct, frozen=True):
    """A whole conversation, under its immagent 0.1.2 name: the head node of its hash
    chain and every message in order, oldest first.

    ``id`` is the head node's id, the ``conversation_id`` of every agent state holding
    this conversation: equal ids mean identical histories, in any store. ``with_messages``
    adds one node, as one ``advance`` does, so a Conversation built step by step from an
    agent's turns has that agent's ``conversation_id``. Nothing here is stored: the nodes
    and messages are the stored assets.
    """

    head: ConversationNode = EMPTY_CONVERSATION
    messages: tuple[Message, ...] = ()

    def __post_init__(self) -> None:
        # A cheap consistency check: the head counts every message and adds the last ones.
        added = self.head.messages
        if (self.head.length != len(self.messages)
                or tuple(m.digest for m in self.messages[len(self.messages) - len(added):])
                != added):
            raise ValidationError("messages", f"{len(self.messages)} message(s) are not the "
                                  f"history of node {self.head.digest.hex()} (it holds "
                                  f"{self.head.length})", None)

    @classmethod
    def create(cls, messages: Iterable[Message] = ()) -> Conversation:
        """The empty conversation, or one that adds ``messages`` to it in one step."""
        added = tuple(messages)
        return cls().with_messages(*added) if added else cls()

    @property
    def id(self) -> UUID:
        """The head node's UUID (an agent's ``conversation_id``)."""
        return self.head.id

    @property
    def digest(self) -> Digest:
        """The head node's digest: it pins every message through the chain."""
        return self.head.digest

    @property
    def message_ids(self) -> tuple[UUID, ...]:
        """The messages' ids, oldest first (derived from their content)."""
        return tuple(m.id for m in self.messages)

    def with_messages(self, *messages: Message) -> Conversation:
        """The conversation that adds ``messages`` (at least one) as one new node."""
        if not messages or not all(isinstance(m, Message) for m in messages):
            raise ValidationError("messages", "with_messages takes one or more Message "
                                  "objects (content-derived ids cannot be resolved "
                                  "without a store)", None)
        return Conversation(head=self.head.extend(messages),
                            messages=(*self.messages, *messages))


Asset: TypeAlias = SystemPrompt | Message | ConversationNode

_decoders: dict[int, msgspec.msgpack.Decoder[Any]] = {
    int(Kind.SYSTEM_PROMPT): msgspec.msgpack.Decoder(SystemPrompt),
    int(Kind.MESSAGE): msgspec.msgpack.Decoder(Message),
}
_node_body = msgspec.msgpack.Decoder(_NodeBody)


def decode_asset(kind: int, body: bytes, refs: Sequence[Digest] = ()) -> Asset:
    """Decode a stored row of a content asset (msgspec.DecodeError or ValueError if
    malformed). A node needs its refs: they are its parent and messages."""
    if kind == Kind.NODE:
        counters = _node_body.decode(body)
        if any(len(r) != 32 for r in refs):
            raise ValueError("node refs must be 32-byte digests")
        parent, messages = (refs[0], tuple(refs[1:])) if refs else (None, ())
        return ConversationNode(parent=parent, messages=messages,
                                length=counters.length, size=counters.size)
    decoder = _decoders.get(kind)
    if decoder is None:
        raise ValueError(f"unknown asset kind {kind}")
    if refs:
        raise ValueError(f"assets of kind {kind} have no refs")
    asset: Asset = decoder.decode(body)
    return asset


class _StateContent(msgspec.Struct, frozen=True, omit_defaults=True):
    """What an agent state's digest pins (lineage and timestamps are not content)."""

    name: str
    model: str
    system_prompt: Digest
    conversation: Digest
    model_config: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


def state_digest(name: str, model: str, system_prompt: Digest, conversation: Digest,
                 model_config: Mapping[str, Any], metadata: Mapping[str, Any]) -> Digest:
    """Digest of an agent state's whole content.

    The conversation digest pins every message transitively (a Merkle chain), so equal
    digests mean equal prompt, model, config, metadata and full conversation.
    """
    content = _StateContent(name=name, model=model, system_prompt=system_prompt,
                            conversation=conversation, model_config=dict(model_config),
                            metadata=dict(metadata))
    return digest_of(Kind.AGENT_STATE, encode(content))


class AgentRecord(msgspec.Struct, frozen=True):
    """One stored agent state: identity and lineage plus the digests of its content."""

    id: UUID
    parent_id: UUID | None
    created_at: datetime
    name: str
    model: str
    system_prompt: Digest
    conversation: Digest
    model_config: dict[str, Any]
    metadata: dict[str, Any]
    digest: Digest

    def expected_digest(self) -> Digest:
        """Recompute the state digest from the fields (what verification compares)."""
        return state_digest(self.name, self.model, self.system_prompt, self.conversation,
                            self.model_config, self.metadata)
