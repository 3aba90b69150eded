"""The immutable data model and its content addressing.

Every content asset (system prompt, message, conversation node) is a frozen msgspec Struct.
Its canonical bytes are deterministic msgpack (map keys sorted, default-valued fields left
out, so adding an optional field later does not change old digests; fields encode in
declaration order, so never reorder them; keys are short aliases fixed per field, because
they are repeated in every stored row); its digest is
``blake3(kind byte || canonical bytes)`` (nodes also hash their refs, see ``digest_of``);
its UUID is derived from that digest. What is
hashed is exactly the encoded fields: no timestamps, no database ids.

The digest formula is written once here (``hash_prefix``); stored rows, and the one
verify-on-read that re-runs the formula on every row read, are ``immagent.rows``.
"""

from __future__ import annotations

import collections
import functools
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from itertools import repeat
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, TypeAlias
from uuid import UUID

import blake3
import msgspec

from immagent import chains, codec
from immagent.exceptions import ImmAgentError, ValidationError
from immagent.ids import pack_text_id, unpack_text_id, uuid7, uuid_from_digest

__all__ = [
    "ASSET_KINDS",
    "EMPTY_CONVERSATION",
    "EMPTY_ENTRIES",
    "EMPTY_ITEMS",
    "EMPTY_VALUES",
    "NODE_BODY",
    "NODE_KINDS",
    "Asset",
    "Conversation",
    "ConversationNode",
    "Dictionary",
    "Digest",
    "Entry",
    "EntryNode",
    "Item",
    "ItemNode",
    "Kind",
    "Message",
    "MissingAsset",
    "NodeFields",
    "Role",
    "SystemPrompt",
    "ToolCall",
    "Tools",
    "Value",
    "ValueNode",
    "attach_tools",
    "decode_asset",
    "decode_element",
    "decode_leaves",
    "digest_of",
    "digests_of",
    "encode",
    "hash_prefix",
    "new_id",
    "node_fields",
    "now",
    "own_elements",
    "ref_kind_table",
    "ref_kinds",
    "tools_of",
    "with_context",
]

Digest: TypeAlias = bytes
Role = Literal["user", "assistant", "tool"]


class Kind(IntEnum):
    """Kinds of stored things; the kind byte is hashed, so equal bytes of two kinds never
    collide. Content assets and states (``immagent.records``) share this one space."""

    SYSTEM_PROMPT = 1
    MESSAGE = 2
    NODE = 3  # a link of a conversation (a hash chain of messages)
    AGENT_STATE = 4  # a state (a row of immagent_states), never a content asset
    VALUE = 5  # an opaque serialized value (a LangGraph channel value or write)
    VALUE_NODE = 6  # a link of a hash chain of values (a LangGraph list channel)
    ITEM = 7  # a JSON value: one item of an OpenAI Agents SDK session
    ITEM_NODE = 8  # a link of a session's item chain
    DICTIONARY = 9  # a zstd dictionary bodies are compressed with (immagent.codec)
    COMPRESSION = 10  # a state: the dictionaries of the store (pins them for gc)
    TOOLS = 11  # the tool schemas one model call was offered (immagent.requests)
    ENTRY = 13  # one entry of a pydantic-ai conversation log: its id and its message
    ENTRY_NODE = 14  # a link of a conversation's entry chain: exactly one entry each
    CHECKPOINT = 16  # a state: one LangGraph checkpoint (immagent.checkpoints)
    CHECKPOINT_WRITES = 17  # a state: pending writes of one task on a checkpoint
    SESSION_STATE = 18  # a state of a session (all its branches), never a content asset
    ATTESTATION = 19  # a state: a signature over another state (immagent.attestations)
    CONVERSATION_STATE = 21  # a state: one pydantic-ai conversation record (immagent.records)
    CONVERSATION_SCOPE = 22  # a state: lists one conversation under its scope
    STORE_ITEM = 24  # a state: one put, refresh or delete of a namespaced key (immagent.kv)
    STORE_HEAD = 25  # a state: the current value of a namespaced key (immagent.kv)
    PIN = 30  # a state: a pin (or tag) on another state, its parent (immagent.retention)
    RETENTION_POLICY = 31  # a state: the store's retention policy (immagent.retention)
    RETENTION_MARK = 32  # a state: how far retention has thinned one stream
    REDACTION = 33  # a state: one redacted element's digest, reason and time (redaction)


_encoder = msgspec.msgpack.Encoder(order="deterministic")


def encode(obj: object) -> bytes:
    """Canonical bytes of an asset (deterministic msgpack)."""
    return _encoder.encode(obj)


def hash_prefix(kind: int, refs: Sequence[Digest] = ()) -> bytes:
    """What a row's digest hashes before its body: the digest formula, written once.

    Leaves (prompts, messages, …): the kind byte, so ``blake3(kind || body)``. Nodes keep
    their links beside the body, in the refs column gc walks, so the links are hashed from
    there: ``blake3(kind || count as 4 bytes big-endian || refs || body)``; so is a message
    that references the tool schemas its model call was offered (the only leaf with a ref;
    a body, msgpack, never starts with the zero byte a count does, so the two forms never
    collide, and a message without one keeps its digest). Either way the digest covers
    every stored byte, and a refs column that was tampered with no longer matches.
    ValueError for refs on a kind that has none.
    """
    prefix = _PREFIXES.get(kind) or bytes((kind,))
    if kind in NODE_KINDS or (refs and kind == Kind.MESSAGE):
        count = len(refs)
        return (prefix + (_COUNTS[count] if count < len(_COUNTS) else count.to_bytes(4, "big"))
                + b"".join(refs))
    if refs:
        raise ValueError(f"assets of kind {kind} have no refs")
    return prefix


def digest_of(kind: int, body: bytes, refs: Sequence[Digest] = ()) -> Digest:
    """The 32-byte blake3 digest of a stored row (``hash_prefix``, then the body);
    verification re-runs exactly this."""
    return _blake3(hash_prefix(kind, refs) + body).digest()


def digests_of(kind: int, bodies: Sequence[bytes],
               refs: Sequence[Sequence[Digest]] | None = None) -> list[Digest]:
    """``digest_of`` of many rows of one kind (``refs`` None: none has refs), without a
    Python step per leaf: the leaves' common prefix is hashed once and the hasher copied
    per body (cheaper than a new hasher); a node's prefix holds its refs."""
    if refs is None or (kind not in NODE_KINDS and not any(refs)):
        start = _blake3(hash_prefix(kind))
        return [start.copy().update(body).digest() for body in bodies]
    return [_blake3(prefix + body).digest()
            for prefix, body in zip(map(hash_prefix, repeat(kind), refs), bodies, strict=True)]


_PREFIXES = {int(k): bytes((k,)) for k in Kind}
#: Why 0.1.2's persistence hooks have no meaning here, and what does their job.
_SEED_ROWS = ("{name} belongs to immagent 0.1.2's own database tables, which this store "
              "does not have: it writes assets itself, content-addressed. Store them with "
              "store.create_agent() / agent.advance() / store.append() or EventLog.commit(); "
              "read them with agent.get_messages() or store.get_assets(); "
              "immagent.rows.stored(asset) and immagent.rows.load_row(row) are the stored "
              "row of this layout and its verified reading")
#: A node's ref count as the digest hashes it, for the usual counts.
_COUNTS = tuple(n.to_bytes(4, "big") for n in range(64))
_blake3 = blake3.blake3


def new_id() -> UUID:
    """A new UUID (0.1.2's helper; here a time-ordered UUIDv7, as states get)."""
    return uuid7()


def now() -> datetime:
    """The current time, UTC (0.1.2's helper)."""
    return datetime.now(UTC)


class _Content(msgspec.Struct, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """Shared behaviour of content assets: canonical body, digest and derived UUID."""

    kind: ClassVar[Kind]

    @classmethod
    def from_row(cls, row: object) -> Self:
        """0.1.2's hook that built an asset from a row of its own asyncpg tables. Those
        tables are not this store's layout, so it always raises ImmAgentError naming what
        to use instead (see the README's "Upgrading from 0.1.2")."""
        raise ImmAgentError(_SEED_ROWS.format(name=f"{cls.__name__}.from_row()"))

    def to_insert_params(self) -> tuple[str, tuple[Any, ...]]:
        """0.1.2's hook that gave the INSERT statement of its own tables. This store writes
        assets itself, so it always raises ImmAgentError naming what to use instead."""
        raise ImmAgentError(_SEED_ROWS.format(name=f"{type(self).__name__}"
                                              ".to_insert_params()"))

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

    @classmethod
    def create(cls, content: str) -> SystemPrompt:
        """A system prompt holding ``content`` (0.1.2's constructor and parameter name)."""
        return cls(text=content)


class ToolCall(msgspec.Struct, frozen=True, omit_defaults=True,
               rename={"id": "i", "name": "n", "arguments": "a"}):
    """A tool call requested by the model; ``arguments`` is the JSON text it produced."""

    id: str
    name: str
    arguments: str = "{}"

    def to_litellm_dict(self) -> dict[str, Any]:
        """The call as LiteLLM (and OpenAI) take it in a request's assistant message."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class Message(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
              rename={"role": "r", "content": "c", "tool_calls": "tc", "tool_call_id": "ti",
                      "input_tokens": "in", "output_tokens": "out", "model": "m",
                      "call_config": "cfg", "is_error": "err", "interrupted": "cut",
                      "request": "rq", "tools": "tl"}):
    """One conversation message.

    Assistant messages carry the token usage of the call that produced them and, for
    audits, the model and the call parameters (``call_config``) that produced them.
    Tool results carry ``tool_call_id`` and ``is_error``. ``interrupted`` marks a message
    cut short: a streamed reply (or a tool call) stopped by the caller and kept anyway
    (``stream(..., keep_partial=True)``); it is hashed, and left out when False, so every
    other message keeps its digest.

    ``request`` is the digest of the exact request the model call was given
    (``immagent.requests``: model, system prompt, messages, tools offered, parameters), so
    an audit can rebuild it and prove it (``immagent.replay``); None on messages written
    before it was recorded (their request is unknown). ``tools`` is the digest of the
    ``Tools`` asset holding the tool schemas that call was offered: the message's one ref
    (so gc keeps the schemas while the message lives), never part of its body. Both are
    left out when None, so every other message keeps its digest.
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
    interrupted: bool = False
    request: Digest | None = None
    tools: Digest | None = None
    kind: ClassVar[Kind] = Kind.MESSAGE

    @functools.cached_property
    def body(self) -> bytes:
        """Canonical encoded bytes; ``tools`` is the row's ref, never in the body."""
        if self.tools is None:
            return encode(self)
        return encode(msgspec.structs.replace(self, tools=None))

    def refs(self) -> tuple[Digest, ...]:
        """The tool schemas its model call was offered, if any."""
        return () if self.tools is None else (self.tools,)

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

    @property
    def id(self) -> UUID:
        """A UUID derived from the digest: same content, same id, in any store. The message
        is remembered by it while it lives, so ``Conversation.with_messages`` takes the id
        in its place (0.1.2's form)."""
        message_id = uuid_from_digest(self.digest)
        _known_messages[message_id] = self
        return message_id

    def to_litellm_dict(self) -> dict[str, Any]:
        """The message as LiteLLM's request dict, as 0.1.2 made it: ``role``, then
        ``content`` unless None, ``tool_calls`` when there are any, ``tool_call_id`` when
        set. (A model call builds its own request: ``immagent.llm``.)"""
        out: dict[str, Any] = {"role": self.role}
        if self.content is not None:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = [call.to_litellm_dict() for call in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


#: Messages whose id was handed out, by id, while they live (see ``Message.id``).
_known_messages: weakref.WeakValueDictionary[UUID, Message] = weakref.WeakValueDictionary()


class Dictionary(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
                 rename={"data": "d"}):
    """A zstd dictionary the store compresses bodies with (``immagent.codec``); its zstd
    dictionary id, inside ``data``, is the codec value of the rows that use it. The store
    trains and writes these itself; a COMPRESSION state pins them for gc."""

    data: bytes
    kind: ClassVar[Kind] = Kind.DICTIONARY

    def __post_init__(self) -> None:
        codec.dictionary_id(self.data)  # ValueError unless a usable zstd dictionary

    @property
    def dictionary_id(self) -> int:
        """The zstd dictionary id (the codec value of bodies compressed with it)."""
        return codec.dictionary_id(self.data)


class ConversationNode(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
                       rename={"parent": "p", "messages": "m", "length": "n", "size": "s",
                               "acc": "a", "span": "x"}):
    """A link of the conversation hash chain: its parent node and the messages it adds.

    The chain is generic: a subclass with another ``kind`` and ``element_kind`` (see
    ``NODE_KINDS``) chains other assets the same way, and the store reads every chain with
    the same code. Here the elements are messages.

    ``length`` and ``size`` are the number of messages and their total encoded bytes from
    the root up to and including this node: what a copy-per-step layout would store, known
    without reading the history. ``acc`` is the root of the accumulator over every message
    digest from the root up to this node (``immagent.accumulator``: one message is proved
    to be in a state by O(log n) digests); ``span`` is, at every ``chains.SPAN``-th depth,
    the hash of the ``SPAN`` nodes before it (``chains.span_hash``: a reader verifies a
    history with one hash per span). Both are in the digest; a node written before schema
    3 has neither (its digest did not change), and reads and audits accept it. The empty
    conversation has no parent and no messages; every other node has a parent.

    Stored form: the links (parent, then messages) are the refs, and the body holds the
    fields above (``digest_of``); the store keeps a node as a row carrying its messages'
    bodies (``immagent.chains``). Build nodes with ``extend`` from a node the store
    returned (or a chain's empty root): it needs the parent's ``ChainContext``.
    """

    parent: Digest | None = None
    messages: tuple[Digest, ...] = ()
    length: int = 0
    size: int = 0
    acc: Digest | None = None
    span: Digest | None = None
    kind: ClassVar[Kind] = Kind.NODE
    #: The kind every element of this chain must have.
    element_kind: ClassVar[Kind] = Kind.MESSAGE

    def __post_init__(self) -> None:
        if self.parent is None and self.messages:
            raise ValueError("a conversation node that adds messages needs a parent")

    @functools.cached_property
    def body(self) -> bytes:
        """The stored body: the fields that are not links (the links are the refs)."""
        return encode(NodeFields(length=self.length, size=self.size, acc=self.acc,
                                span=self.span))

    def refs(self) -> tuple[Digest, ...]:
        return () if self.parent is None else (self.parent, *self.messages)

    def context(self) -> chains.ChainContext | None:
        """What appending to this node needs (depth, counters, accumulator peaks, the
        records since the last span depth): known for a chain's root, for nodes built by
        ``extend`` and for nodes the store read; None otherwise."""
        found: chains.ChainContext | None = self.__dict__.get("_ctx")
        if found is None and self.parent is None and not self.messages:
            found = chains.root_context(self.digest, self.body)
        return found

    def extend(self, elements: Iterable[Asset]) -> Self:
        """The node that appends ``elements`` (of ``element_kind``) to this chain, with its
        accumulator root and (at a span depth) span hash; ValueError if this node's context
        is unknown (read it through the store)."""
        added = tuple(elements)
        for element in added:
            if element.kind != self.element_kind:
                raise ValueError(f"a {self.kind.name.lower()} chains "
                                 f"{self.element_kind.name.lower()} assets, not "
                                 f"{element.kind.name.lower()}")
        context = self.context()
        if context is None:
            raise ValueError(f"the context of node {self.digest.hex()} is unknown: read the "
                             "node through the store before extending it")
        bodies = [e.body for e in added]
        digests = tuple(e.digest for e in added)
        length, size, acc, peaks, span = chains.advance(context, digests,
                                                        list(map(len, bodies)))
        node = type(self)(parent=self.digest, messages=digests, length=length, size=size,
                          acc=acc, span=span)
        node.__dict__["_ctx"] = chains.child_context(
            context, node.digest, chains.canonical_record(node.body, bodies), length, size,
            peaks)
        node.__dict__["_elements"] = added
        return node


class NodeFields(msgspec.Struct, frozen=True, omit_defaults=True,
                rename={"length": "n", "size": "s", "acc": "a", "span": "x"}):
    """What a node stores besides its refs (its hashed fields): its body is these,
    canonically encoded."""

    length: int = 0
    size: int = 0
    acc: bytes | None = None
    span: bytes | None = None


def node_fields(body: bytes) -> NodeFields:
    """A node's fields from its canonical body (msgspec errors if malformed)."""
    return _node_body.decode(body)


def with_context(node: ConversationNode, context: chains.ChainContext,
                 elements: tuple[Asset, ...] | None = None) -> None:
    """Attach a verified context (and the node's own elements, when known) to a node the
    store read, so that ``extend`` works on it. Not hashed, never stored."""
    node.__dict__["_ctx"] = context
    if elements is not None:
        node.__dict__["_elements"] = elements


def own_elements(node: ConversationNode) -> tuple[Asset, ...] | None:
    """The element assets a node adds, when it was built by ``extend`` (or read with them):
    what the store inlines in its row."""
    found: tuple[Asset, ...] | None = node.__dict__.get("_elements")
    return found


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

    def with_messages(self, *messages: Message | UUID | str) -> Conversation:
        """The conversation that adds ``messages`` (at least one) as one new node. Each is
        a Message or, as in 0.1.2, a message id: the id of a Message this process holds
        (one made or read here whose ``id`` was taken; ids are derived from content, so an
        id alone says nothing of the text). ValidationError names an id it cannot
        resolve: pass the Message object (``await agent.get_messages()`` reads them)."""
        if not messages:
            raise ValidationError("messages", "with_messages takes one or more messages",
                                  None)
        added = tuple(_resolved(f"messages[{i}]", m) for i, m in enumerate(messages))
        return Conversation(head=self.head.extend(added), messages=(*self.messages, *added))

    @classmethod
    def from_row(cls, row: object) -> Conversation:
        """0.1.2's hook for its conversations table; always raises ImmAgentError naming
        what to use instead (a conversation is a chain of stored nodes here)."""
        raise ImmAgentError(_SEED_ROWS.format(name="Conversation.from_row()"))

    def to_insert_params(self) -> tuple[str, tuple[Any, ...]]:
        """0.1.2's hook for its conversations table; always raises ImmAgentError naming
        what to use instead."""
        raise ImmAgentError(_SEED_ROWS.format(name="Conversation.to_insert_params()"))


def _resolved(field: str, message: object) -> Message:
    """A Message given as itself or by the id of a live Message whose id was taken."""
    if isinstance(message, Message):
        return message
    found = None
    if isinstance(message, UUID | str):
        try:
            found = _known_messages.get(message if isinstance(message, UUID)
                                        else UUID(message))
        except ValueError:
            found = None
    if found is None:
        raise ValidationError(field, f"{message!r} is neither a Message nor the id of one "
                              "this process holds: pass the Message object (ids are derived "
                              "from content; `await agent.get_messages()` reads them)", None)
    return found


class Value(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
            rename={"type": "t", "data": "d"}):
    """A value a client serialized itself, kept opaque: its serializer's type tag and
    bytes (for LangGraph, ``serde.dumps_typed``). Equal bytes are one asset, stored once."""

    type: str
    data: bytes = b""
    kind: ClassVar[Kind] = Kind.VALUE


class ValueNode(ConversationNode, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """A link of a hash chain of values: a list stored element by element, so a list that
    grows adds only its new elements and lists with a common prefix share it."""

    kind: ClassVar[Kind] = Kind.VALUE_NODE
    element_kind: ClassVar[Kind] = Kind.VALUE


#: The empty list of values: the root of every value chain.
EMPTY_VALUES = ValueNode()


class Item(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """One JSON value as a content asset: an item of an OpenAI Agents SDK session (a
    Responses-API input item: a message, a function call or its output, a reasoning item,
    …), stored once however many sessions, branches and forks hold it.

    The body is the canonical msgpack of the value itself (map keys sorted), so equal
    values have one digest whatever their key order; ints and floats stay apart (``1`` and
    ``1.0`` are two items, as they are two JSON texts). The item holds those bytes and
    decodes ``value`` on first use: a read hands out copies decoded from the bytes anyway,
    so the chain read of a long session builds no object tree per item. Build items with
    ``Item.of`` from values checked by ``validate.check_json_value``.
    """

    raw: bytes
    kind: ClassVar[Kind] = Kind.ITEM

    @classmethod
    def of(cls, value: Any) -> Item:
        """The item holding the JSON value ``value`` (kept, not copied, as its value)."""
        item = cls(raw=encode(value))
        item.__dict__["value"] = value
        return item

    @functools.cached_property
    def body(self) -> bytes:
        """The canonical bytes of the value (no wrapping map: one per item stored)."""
        return self.raw

    @functools.cached_property
    def value(self) -> Any:
        """The JSON value (decoded once, then shared: do not modify it)."""
        return _item_values.decode(self.raw)


class Tools(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """The tool schemas one model call was offered (LiteLLM/OpenAI function schemas, a
    JSON list), as one content asset: stored once however many calls offered the same
    tools. The body is the canonical msgpack of the list (object keys sorted: JSON objects
    are unordered), as an ``Item``'s is. A Message that offered tools references this
    asset (``Message.tools``); build it with ``Tools.of`` from a checked JSON list."""

    raw: bytes
    kind: ClassVar[Kind] = Kind.TOOLS

    @classmethod
    def of(cls, schemas: Sequence[Any]) -> Tools:
        """The asset holding ``schemas`` (a list of JSON objects, already checked)."""
        return cls(raw=encode(list(schemas)))

    @functools.cached_property
    def body(self) -> bytes:
        """The canonical bytes of the list (no wrapping map)."""
        return self.raw

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """A fresh copy of the schemas, decoded from the stored bytes."""
        value = _item_values.decode(self.raw)
        if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
            raise ValueError("a tools body is a list of objects")
        return value


def attach_tools(message: Message, tools: Tools) -> Message:
    """Keep ``tools`` (the asset ``message.tools`` names) with ``message`` in memory, not
    hashed, so whoever stores the message stores the schemas in the same write."""
    if message.tools != tools.digest:
        raise ValueError("the tools asset is not the one the message references")
    message.__dict__["_tools"] = tools
    return message


def tools_of(message: Message) -> Tools | None:
    """The Tools asset attached to ``message`` in this process (``attach_tools``), if any."""
    found = message.__dict__.get("_tools")
    return found if isinstance(found, Tools) else None


class ItemNode(ConversationNode, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """A link of a session's item chain: the same hash chain as a conversation's, over
    items (its ``messages`` are the digests of the items it adds)."""

    kind: ClassVar[Kind] = Kind.ITEM_NODE
    element_kind: ClassVar[Kind] = Kind.ITEM


#: The root of every item chain (an empty session or branch); stored once for all.
EMPTY_ITEMS = ItemNode()


class Entry(_Content, frozen=True, omit_defaults=True, dict=True, weakref=True,
            rename={"id": "i", "message": "m"}):
    """One entry of a conversation log (a pydantic-ai ``ConversationEntry``): the id the
    client minted for it and its message, as the client serialized it (JSON text, kept
    opaque like a ``Value``: the core never parses it). The id is part of the content
    because the client hands it out (to tie a rating or a billing row to a message); so
    an entry held by a conversation, its branches and its forks is stored once, and a
    message saved again under a new entry (a rewritten history) is a new entry.

    ``id`` is stored compactly (``ids.pack_text_id``: 16 bytes for a canonical UUID);
    ``entry_id`` is its text. Build entries with ``Entry.of``."""

    id: Any  # str | bytes (a union msgspec cannot type): checked by __post_init__
    message: bytes
    kind: ClassVar[Kind] = Kind.ENTRY

    def __post_init__(self) -> None:
        unpack_text_id(self.id)  # ValueError unless text or 16 bytes

    @classmethod
    def of(cls, entry_id: str, message: bytes) -> Entry:
        """The entry ``entry_id`` holding the serialized ``message``."""
        return cls(id=pack_text_id(entry_id), message=message)

    @functools.cached_property
    def entry_id(self) -> str:
        """The entry's id as the client minted it."""
        return unpack_text_id(self.id)


class EntryNode(ConversationNode, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """A link of a conversation's entry chain. Each link adds exactly one entry, so the
    chain's shape follows from its entries alone: the link ending at any entry is known
    without reading the store (a branch or a fork from the middle of a history points at
    a link that already exists), and two histories with a common prefix share its links."""

    kind: ClassVar[Kind] = Kind.ENTRY_NODE
    element_kind: ClassVar[Kind] = Kind.ENTRY

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parent is not None and len(self.messages) != 1:
            raise ValueError(f"an entry node adds exactly one entry, not {len(self.messages)}")


#: The root of every entry chain (a conversation without messages); stored once for all.
EMPTY_ENTRIES = EntryNode()

if TYPE_CHECKING:
    Asset: TypeAlias = (SystemPrompt | Message | ConversationNode | Value | Item | Entry
                        | Dictionary | Tools)
else:
    # The same set at run time, as the common base class of every content asset: so
    # isinstance() works and 0.1.2's ``Asset.from_row`` names its hook (which raises).
    Asset = _Content

#: Node kinds (hash chains), by kind: their digest covers their refs, and their refs are
#: (parent node of the same kind, then elements of the node's ``element_kind``).
NODE_KINDS: dict[int, type[ConversationNode]] = {int(Kind.NODE): ConversationNode,
                                                 int(Kind.VALUE_NODE): ValueNode,
                                                 int(Kind.ITEM_NODE): ItemNode,
                                                 int(Kind.ENTRY_NODE): EntryNode}

class _BodyDecoder(Protocol):
    def decode(self, buf: bytes, /) -> Any: ...


_item_values: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


class _ItemDecoder:
    """An ITEM (or TOOLS) body is the value's own msgpack (no Struct map around it).
    Reading checks its framing only (no objects built); ``decode_asset`` decodes it whole."""

    _framing: msgspec.msgpack.Decoder[msgspec.Raw] = msgspec.msgpack.Decoder(msgspec.Raw)

    def __init__(self, cls: type[Item] | type[Tools] = Item) -> None:
        self._cls = cls

    def decode(self, buf: bytes, /) -> Item | Tools:
        self._framing.decode(buf)
        return self._cls(raw=bytes(buf))

    def decode_many(self, bufs: Sequence[bytes], /) -> list[Item | Tools]:
        """``decode`` of each body (canonical bytes, as load_rows has them), in C."""
        collections.deque(map(self._framing.decode, bufs), maxlen=0)
        return list(map(self._cls, map(bytes, bufs)))


#: The decoder of each leaf kind's body (nodes are decoded with their refs).
_decoders: dict[int, _BodyDecoder] = {
    int(Kind.SYSTEM_PROMPT): msgspec.msgpack.Decoder(SystemPrompt),
    int(Kind.MESSAGE): msgspec.msgpack.Decoder(Message),
    int(Kind.VALUE): msgspec.msgpack.Decoder(Value),
    int(Kind.ITEM): _ItemDecoder(),
    int(Kind.ENTRY): msgspec.msgpack.Decoder(Entry),
    int(Kind.DICTIONARY): msgspec.msgpack.Decoder(Dictionary),
    int(Kind.TOOLS): _ItemDecoder(Tools),
}
_node_body = msgspec.msgpack.Decoder(NodeFields)
#: The decoder of a node's stored body (its fields), for readers that need only those.
NODE_BODY = _node_body


def decode_element(kind: int) -> Callable[[bytes], Asset]:
    """The decoder of a chain element kind's canonical bodies (msgspec errors or ValueError
    on a malformed one); ValueError for a kind that is no chain's element."""
    if kind not in {int(t.element_kind) for t in NODE_KINDS.values()}:
        raise ValueError(f"kind {kind} is not a chain element kind")
    decode: Callable[[bytes], Asset] = _decoders[kind].decode
    return decode


def decode_asset(kind: int, body: bytes, refs: Sequence[Digest] = ()) -> Asset:
    """Decode a stored row of a content asset (msgspec.DecodeError or ValueError if
    malformed). A node needs its refs: they are its parent and elements."""
    node_type = NODE_KINDS.get(kind)
    if node_type is not None:
        counters = _node_body.decode(body)
        if any(len(r) != 32 for r in refs):
            raise ValueError("node refs must be 32-byte digests")
        if any(f is not None and len(f) != 32 for f in (counters.acc, counters.span)):
            raise ValueError("a node's accumulator root and span hash are 32-byte digests")
        parent, elements = (refs[0], tuple(refs[1:])) if refs else (None, ())
        return node_type(parent=parent, messages=elements, length=counters.length,
                         size=counters.size, acc=counters.acc, span=counters.span)
    decoder = _decoders.get(kind)
    if decoder is None:
        raise ValueError(f"unknown asset kind {kind}")
    if refs and kind != Kind.MESSAGE:
        raise ValueError(f"assets of kind {kind} have no refs")
    asset: Asset = decoder.decode(body)
    if isinstance(asset, Item):
        _ = asset.value  # decoded whole here: verify must find a body that is no value
    elif isinstance(asset, Tools):
        _ = asset.schemas
    elif isinstance(asset, Message):
        asset = _with_tools(asset, refs)
    return asset


def _with_tools(message: Message, refs: Sequence[Digest]) -> Message:
    """A decoded message with its ref, the tools its call was offered, put back in place
    (ValueError for a body that holds them itself, or for more than one ref)."""
    if message.tools is not None:
        raise ValueError("a message's tools are its ref, never part of its body")
    if not refs:
        return message
    if len(refs) != 1 or len(refs[0]) != 32:
        raise ValueError(f"a message has at most one ref (its tools), this row has "
                         f"{len(refs)}")
    return msgspec.structs.replace(message, tools=bytes(refs[0]))


def ref_kind_table() -> dict[int, tuple[int, int]]:
    """The required kinds of asset refs as data: ``{kind: (first, rest)}``, the kind of the
    first ref of an asset of ``kind`` and of every later one (a node's parent is a node of
    its own kind, its elements are of its element kind; a message's one ref is the tools
    its call was offered; other kinds have no refs). What a database checks in one query
    (``Backend.misfit_refs``); ``ref_kinds`` reads the same."""
    table = {kind: (kind, int(node.element_kind)) for kind, node in NODE_KINDS.items()}
    table[int(Kind.MESSAGE)] = (int(Kind.TOOLS), int(Kind.TOOLS))
    return table


def ref_kinds(kind: int, count: int) -> tuple[int, ...]:
    """The kind each of an asset's ``count`` refs must have (see ``ref_kind_table``)."""
    rule = ref_kind_table().get(kind)
    if rule is None or count == 0:
        return ()
    return (rule[0], *([rule[1]] * (count - 1)))


class MissingAsset(msgspec.Struct, frozen=True):
    """A dangling reference: ``digest`` is not stored, ``referrer`` (an asset's digest or a
    state's id) points at it."""

    digest: Digest
    referrer: Digest | UUID

def decode_leaves(kind: int, bodies: Sequence[bytes]) -> list[Asset]:
    """The assets of canonical bodies of one leaf kind (not a node kind), decoded in one
    pass without a Python step per body; KeyError for a kind that is no leaf kind,
    msgspec's errors for a malformed body."""
    decoder = _decoders[kind]
    if isinstance(decoder, _ItemDecoder):
        return list(decoder.decode_many(bodies))
    assets: list[Asset] = list(map(decoder.decode, bodies))
    if kind == Kind.MESSAGE and any(map(_TOOLS_FIELD, assets)):
        raise ValueError("a message's tools are its ref, never part of its body")
    return assets


_TOOLS_FIELD = operator.attrgetter("tools")



#: Every kind a content asset may have (states have theirs in immagent.records).
ASSET_KINDS = frozenset(set(_decoders) | set(NODE_KINDS))

