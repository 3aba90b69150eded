"""The immutable data model and its content addressing.

Every content asset (system prompt, message, conversation node) is a frozen msgspec Struct.
Its canonical bytes are deterministic msgpack (map keys sorted, default-valued fields left
out, so adding an optional field later does not change old digests; fields encode in
declaration order, so never reorder them; keys are short aliases fixed per field, because
they are repeated in every stored row); its digest is
``blake3(kind byte || canonical bytes)`` (nodes also hash their refs, see ``digest_of``);
its UUID is derived from that digest. What is
hashed is exactly the encoded fields: no timestamps, no database ids.

A stored asset is a ``StoredAsset`` row (digest, kind, refs, body); ``load_row`` is the one
place a row read from anywhere (a database, a bundle) is re-hashed and decoded before it is
trusted. The storage layer never interprets bodies: the kind is data.
"""

from __future__ import annotations

import collections
import functools
import operator
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from itertools import chain
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, Self, TypeAlias
from uuid import UUID

import blake3
import msgspec

from immagent import codec
from immagent.exceptions import IntegrityError, ValidationError
from immagent.ids import uuid_from_digest

__all__ = [
    "EMPTY_CONVERSATION",
    "EMPTY_ITEMS",
    "EMPTY_VALUES",
    "NODE_KINDS",
    "Asset",
    "Conversation",
    "ConversationNode",
    "Dictionary",
    "Digest",
    "Item",
    "ItemNode",
    "Kind",
    "Message",
    "MissingAsset",
    "Role",
    "StoredAsset",
    "SystemPrompt",
    "ToolCall",
    "Value",
    "ValueNode",
    "canonical_row",
    "check_row",
    "decode_asset",
    "digest_of",
    "encode",
    "join_refs",
    "load_row",
    "load_rows",
    "node_counters",
    "nodes_counters",
    "ref_kind_table",
    "ref_kinds",
    "split_refs",
    "stored",
    "stored_rows",
    "stored_tagged_rows",
    "verified_body",
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
    CHECKPOINT = 16  # a state: one LangGraph checkpoint (immagent.checkpoints)
    CHECKPOINT_WRITES = 17  # a state: pending writes of one task on a checkpoint
    SESSION_STATE = 18  # a state of a session (all its branches), never a content asset
    STORE_ITEM = 24  # a state: one put, refresh or delete of a namespaced key (immagent.kv)
    STORE_HEAD = 25  # a state: the current value of a namespaced key (immagent.kv)


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
    if kind in NODE_KINDS:
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
                      "call_config": "cfg", "is_error": "err", "interrupted": "cut"}):
    """One conversation message.

    Assistant messages carry the token usage of the call that produced them and, for
    audits, the model and the call parameters (``call_config``) that produced them.
    Tool results carry ``tool_call_id`` and ``is_error``. ``interrupted`` marks a message
    cut short: a streamed reply (or a tool call) stopped by the caller and kept anyway
    (``stream(..., keep_partial=True)``); it is hashed, and left out when False, so every
    other message keeps its digest.
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
                       rename={"parent": "p", "messages": "m", "length": "n", "size": "s"}):
    """A link of the conversation hash chain: its parent node and the messages it adds.

    The chain is generic: a subclass with another ``kind`` and ``element_kind`` (see
    ``NODE_KINDS``) chains other assets the same way, and the store reads every chain with
    the same code. Here the elements are messages.

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
    #: The kind every element of this chain must have.
    element_kind: ClassVar[Kind] = Kind.MESSAGE

    def __post_init__(self) -> None:
        if self.parent is None and self.messages:
            raise ValueError("a conversation node that adds messages needs a parent")

    @functools.cached_property
    def body(self) -> bytes:
        """The stored body: the counters only (the links are the refs)."""
        return encode(_NodeBody(length=self.length, size=self.size))

    def refs(self) -> tuple[Digest, ...]:
        return () if self.parent is None else (self.parent, *self.messages)

    def extend(self, elements: Iterable[Asset]) -> Self:
        """The node that appends ``elements`` (of ``element_kind``) to this chain."""
        added = tuple(elements)
        for element in added:
            if element.kind != self.element_kind:
                raise ValueError(f"a {self.kind.name.lower()} chains "
                                 f"{self.element_kind.name.lower()} assets, not "
                                 f"{element.kind.name.lower()}")
        return type(self)(parent=self.digest, messages=tuple(e.digest for e in added),
                          length=self.length + len(added),
                          size=self.size + sum(len(e.body) for e in added))


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


class ItemNode(ConversationNode, frozen=True, omit_defaults=True, dict=True, weakref=True):
    """A link of a session's item chain: the same hash chain as a conversation's, over
    items (its ``messages`` are the digests of the items it adds)."""

    kind: ClassVar[Kind] = Kind.ITEM_NODE
    element_kind: ClassVar[Kind] = Kind.ITEM


#: The root of every item chain (an empty session or branch); stored once for all.
EMPTY_ITEMS = ItemNode()

Asset: TypeAlias = SystemPrompt | Message | ConversationNode | Value | Item | Dictionary

#: Node kinds (hash chains), by kind: their digest covers their refs, and their refs are
#: (parent node of the same kind, then elements of the node's ``element_kind``).
NODE_KINDS: dict[int, type[ConversationNode]] = {int(Kind.NODE): ConversationNode,
                                                 int(Kind.VALUE_NODE): ValueNode,
                                                 int(Kind.ITEM_NODE): ItemNode}

class _BodyDecoder(Protocol):
    def decode(self, buf: bytes, /) -> Any: ...


_item_values: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


class _ItemDecoder:
    """An ITEM body is the value's own msgpack (no Struct map around it). Reading checks
    its framing only (no objects built); ``decode_asset`` decodes it whole."""

    _framing: msgspec.msgpack.Decoder[msgspec.Raw] = msgspec.msgpack.Decoder(msgspec.Raw)

    def decode(self, buf: bytes, /) -> Item:
        self._framing.decode(buf)
        return Item(raw=bytes(buf))

    def decode_many(self, bufs: Sequence[bytes], /) -> list[Item]:
        """``decode`` of each body (canonical bytes, as load_rows has them), in C."""
        collections.deque(map(self._framing.decode, bufs), maxlen=0)
        return list(map(Item, map(bytes, bufs)))


#: The decoder of each leaf kind's body (nodes are decoded with their refs).
_decoders: dict[int, _BodyDecoder] = {
    int(Kind.SYSTEM_PROMPT): msgspec.msgpack.Decoder(SystemPrompt),
    int(Kind.MESSAGE): msgspec.msgpack.Decoder(Message),
    int(Kind.VALUE): msgspec.msgpack.Decoder(Value),
    int(Kind.ITEM): _ItemDecoder(),
    int(Kind.DICTIONARY): msgspec.msgpack.Decoder(Dictionary),
}
_node_body = msgspec.msgpack.Decoder(_NodeBody)


def decode_asset(kind: int, body: bytes, refs: Sequence[Digest] = ()) -> Asset:
    """Decode a stored row of a content asset (msgspec.DecodeError or ValueError if
    malformed). A node needs its refs: they are its parent and elements."""
    node_type = NODE_KINDS.get(kind)
    if node_type is not None:
        counters = _node_body.decode(body)
        if any(len(r) != 32 for r in refs):
            raise ValueError("node refs must be 32-byte digests")
        parent, elements = (refs[0], tuple(refs[1:])) if refs else (None, ())
        return node_type(parent=parent, messages=elements, length=counters.length,
                         size=counters.size)
    decoder = _decoders.get(kind)
    if decoder is None:
        raise ValueError(f"unknown asset kind {kind}")
    if refs:
        raise ValueError(f"assets of kind {kind} have no refs")
    asset: Asset = decoder.decode(body)
    if isinstance(asset, Item):
        _ = asset.value  # decoded whole here: verify must find a body that is no value
    return asset


def ref_kind_table() -> dict[int, tuple[int, int]]:
    """The required kinds of asset refs as data: ``{kind: (first, rest)}``, the kind of the
    first ref of an asset of ``kind`` and of every later one (a node's parent is a node of
    its own kind, its elements are of its element kind; other kinds have no refs). What a
    database checks in one query (``Backend.misfit_refs``); ``ref_kinds`` reads the same."""
    return {kind: (kind, int(node.element_kind)) for kind, node in NODE_KINDS.items()}


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
    return _stored_tagged(rows[:split]), _stored_tagged(rows[split:])


def _stored_tagged(rows: Sequence[Sequence[Any]]) -> list[StoredAsset]:
    """``stored_rows`` of rows with a tag column first (the same comprehension, for one
    tuple less per row)."""
    return [_new_row(StoredAsset, (d, k, (_SPLITTERS.get(len(f), split_refs)
                                          if f.__class__ is bytes else split_refs)(f)
                                         if f else (), b, c))
            for _, d, k, f, b, c in rows]


_TAG = operator.itemgetter(0)


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
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in _ASSET_KINDS:
        return "undecodable", f"unknown asset kind {kind!r}"
    if not isinstance(row_codec, int) or isinstance(row_codec, bool):  # SQLite keeps it
        return "corrupt", f"its codec column holds a {type(row_codec).__name__}"
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
            if row_codec >= codec.FIRST_DICTIONARY and row_codec not in dictionaries:
                raise IntegrityError(f"asset {bytes(digest).hex()} needs dictionary "
                                     f"{row_codec}, which this store does not hold "
                                     "(run store.verify())")
            body = codec.decode(row_codec, body, dictionaries)
        if refs or kind in NODE_KINDS:
            sound = digest_of(kind, body, refs) == digest
        else:
            prefix = _PREFIXES.get(kind)
            sound = prefix is not None and blake3.blake3(prefix + body).digest() == digest
    except codec.CodecError as e:
        raise IntegrityError(f"asset {bytes(digest).hex()} is corrupt: its stored body cannot "
                             f"be decompressed ({e}); run store.verify()") from None
    except (ValueError, TypeError):  # a non-bytes column
        sound = False
    if not sound or kind not in _ASSET_KINDS:
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
            asset = _decoders[kind].decode(body)
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
    kind = rows[0].kind
    decoder = _decoders.get(kind)
    prefix = _PREFIXES.get(kind)
    if (decoder is None or prefix is None or kind in NODE_KINDS
            or set(map(_KIND, rows)) != {kind} or any(map(_REFS, rows))):
        return [load_row(r, dictionaries) for r in rows]
    digests = list(map(_DIGEST, rows))
    try:
        bodies = codec.decode_many(list(map(_CODEC, rows)), list(map(_BODY, rows)),
                                   dictionaries)
        # A copy of a hasher fed the prefix: cheaper than a new hasher per body.
        start = _blake3(prefix)
        if [start.copy().update(b).digest() for b in bodies] != digests:
            raise ValueError("a digest does not match")
        assets: list[Asset] = list(decoder.decode_many(bodies)
                                   if isinstance(decoder, _ItemDecoder)
                                   else map(decoder.decode, bodies))
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
        counters = _node_body.decode(body)
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
    prefix = _PREFIXES.get(kind)
    try:
        if (kind not in NODE_KINDS or prefix is None or set(map(_KIND, rows)) != {kind}
                or set(map(_CODEC, rows)) != {codec.RAW}
                or set(map(len, chain.from_iterable(map(_REFS, rows)))) - {32}):
            raise ValueError("not a batch of raw nodes of one kind")
        start = _blake3(prefix)  # copied per node: cheaper than a new hasher
        hashes = [start.copy().update(_COUNTS[len(f)] + b"".join(f) + b).digest()
                  if len(f) < len(_COUNTS) else digest_of(kind, b, f)
                  for _, _, f, b, _ in rows]
        if hashes != list(map(_DIGEST, rows)):
            raise ValueError("a digest does not match")
        counters = list(map(_node_body.decode, map(_BODY, rows)))
    except (ValueError, TypeError, msgspec.DecodeError, msgspec.ValidationError):
        pairs = [node_counters(r) for r in rows]
        return [n for n, _ in pairs], [s for _, s in pairs]
    return [c.length for c in counters], [c.size for c in counters]


_DIGEST, _KIND, _REFS, _BODY, _CODEC = map(operator.itemgetter, range(5))
_blake3 = blake3.blake3
#: A node's ref count as digest_of hashes it, for the usual counts.
_COUNTS = tuple(n.to_bytes(4, "big") for n in range(64))


#: Every kind a content asset may have (states have theirs in immagent.records).
_ASSET_KINDS = frozenset(set(_decoders) | set(NODE_KINDS))
