"""States: the rows of the log that have an identity (an agent state, a session state, …).

A content asset is named by its digest alone. A *state* also has an identity: a fresh id,
the id of the state it came from (``parent_id``), the stream it belongs to (an agent's name,
a session's id, a thread's id) and a time. Every client of the store keeps its states in one
table in one shape, ``StateRow``: ``refs`` are the digests the state pins (the roots gc marks
from), ``body`` the rest of its content, ``digest`` the hash of its content. So gc, verify,
bundles and replicas treat every client alike; what a body means is declared here, by kind.

The agent state (``AgentRecord``) is the first such kind. Its digest keeps the definition of
schema version 1, so digests recorded before the generic table existed still verify.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID

import blake3
import msgspec

from immagent import attestations, checkpoints, kv, redaction, retention
from immagent.assets import Digest, Kind, encode
from immagent.exceptions import IntegrityError
from immagent.ids import unpack_text_id
from immagent.rows import join_refs

__all__ = [
    "STATE_KINDS",
    "AgentRecord",
    "ConversationBody",
    "SessionBody",
    "SessionBranch",
    "StateKind",
    "StateRow",
    "attached_kinds",
    "check_state",
    "conversation_body",
    "item_body",
    "load_agent",
    "load_state",
    "session_body",
    "state_digest",
    "state_from_v1",
    "stream_digest",
]


class StateRow(msgspec.Struct, frozen=True):
    """One state as stored: identity and lineage, then content (kind, stream, refs, body)
    and the digest of that content. ``seq`` is the log position the store gave it (0 until
    written); it is not content and not carried between stores."""

    id: UUID
    parent_id: UUID | None
    kind: int
    stream: str
    refs: tuple[Digest, ...]
    body: bytes
    digest: Digest
    created_at: datetime
    seq: int = 0


class StateKind(NamedTuple):
    """How a state kind is hashed and what its refs must point at."""

    #: The content digest of a row of this kind (what its ``digest`` must equal).
    digest: Callable[[StateRow], Digest]
    #: The asset kind each ref must have, in order.
    ref_kinds: Callable[[StateRow], tuple[int, ...]]
    #: When a row of this kind stops being live on its own (None: never): a stream whose
    #: newest state has expired is swept whole (an item's TTL, ``immagent.kv``). The rule
    #: retention applies to every kind that declares it.
    expires: Callable[[StateRow], datetime | None] | None = None
    #: A row of an *attached* kind is about another state, its subject, which its
    #: ``parent_id`` names (an attestation): it lives while its subject does (gc removes
    #: it once the subject is gone), never keeps its subject from a lineage deletion, and
    #: travels in bundles with its subject.
    attached: bool = False


def stream_digest(kind: int, stream: str, refs: Sequence[Digest], body: bytes) -> Digest:
    """The digest of a state's content by the generic rule: blake3 over the kind byte, the
    stream (4-byte length + UTF-8), the refs (4-byte count + digests) and the body, i.e.
    over exactly the stored bytes. Kinds other than agent states use it."""
    name = stream.encode("utf-8")
    return blake3.blake3(bytes((kind,)) + len(name).to_bytes(4, "big") + name
                         + len(refs).to_bytes(4, "big") + join_refs(refs) + body).digest()


# -- agent states -----------------------------------------------------------------------


class _StateContent(msgspec.Struct, frozen=True, omit_defaults=True):
    """What an agent state's digest pins (lineage and timestamps are not content).
    Field names and order are part of the digest: never change them."""

    name: str
    model: str
    system_prompt: Digest
    conversation: Digest
    model_config: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


class _AgentBody(msgspec.Struct, frozen=True, omit_defaults=True,
                 rename={"model": "m", "model_config": "c", "metadata": "d"}):
    """The stored body of an agent state: what its row does not hold elsewhere (the name
    is the stream, the prompt and head node are the refs). Short keys: one per turn."""

    model: str
    model_config: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


_agent_body = msgspec.msgpack.Decoder(_AgentBody)


def state_digest(name: str, model: str, system_prompt: Digest, conversation: Digest,
                 model_config: Mapping[str, Any], metadata: Mapping[str, Any]) -> Digest:
    """Digest of an agent state's whole content.

    The conversation digest pins every message transitively (a Merkle chain), so equal
    digests mean equal prompt, model, config, metadata and full conversation.
    """
    content = _StateContent(name=name, model=model, system_prompt=system_prompt,
                            conversation=conversation, model_config=dict(model_config),
                            metadata=dict(metadata))
    return blake3.blake3(bytes((Kind.AGENT_STATE,)) + encode(content)).digest()


class AgentRecord(msgspec.Struct, frozen=True):
    """One agent state: identity and lineage plus its content and the digest of it. The
    one agent data type: ``PersistentAgent`` wraps it, the store writes it as a StateRow."""

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

    def to_row(self) -> StateRow:
        """The row that stores this state."""
        body = encode(_AgentBody(model=self.model, model_config=self.model_config,
                                 metadata=self.metadata))
        return StateRow(id=self.id, parent_id=self.parent_id, kind=int(Kind.AGENT_STATE),
                        stream=self.name, refs=(self.system_prompt, self.conversation),
                        body=body, digest=self.digest, created_at=self.created_at)


_v1_map = msgspec.msgpack.Decoder(dict[str, Any])


def state_from_v1(id: UUID, parent_id: UUID | None, created_at: datetime, name: str,
                  model: str, system_prompt: Digest, conversation: Digest,
                  model_config: bytes, metadata: bytes, digest: Digest) -> StateRow:
    """The state row of an agent row of schema version 1 (its maps stored as msgpack bytes),
    for migrations: the digest is kept as it was, so recorded digests stay valid."""
    try:
        config, meta = _v1_map.decode(model_config), _v1_map.decode(metadata)
    except msgspec.DecodeError as e:
        raise IntegrityError(f"agent row {id} cannot be migrated: its model_config or "
                             f"metadata cannot be decoded ({e})") from e
    return AgentRecord(id=id, parent_id=parent_id, created_at=created_at, name=name,
                       model=model, system_prompt=bytes(system_prompt),
                       conversation=bytes(conversation), model_config=config,
                       metadata=meta, digest=bytes(digest)).to_row()


def _decode_agent(row: StateRow) -> AgentRecord:
    """The record a row of kind AGENT_STATE holds, unverified (ValueError if malformed)."""
    if len(row.refs) != 2:
        raise ValueError(f"an agent state pins 2 digests, this row has {len(row.refs)}")
    body = _agent_body.decode(row.body)
    return AgentRecord(id=row.id, parent_id=row.parent_id, created_at=row.created_at,
                       name=row.stream, model=body.model, system_prompt=row.refs[0],
                       conversation=row.refs[1], model_config=body.model_config,
                       metadata=body.metadata, digest=row.digest)


def _agent_digest(row: StateRow) -> Digest:
    return _decode_agent(row).expected_digest()


# -- LangGraph checkpoints (immagent.checkpoints holds their body types) ------------------


def _generic_kind(ref_kinds: Callable[[bytes], tuple[int, ...]]) -> StateKind:
    """The rules of a kind hashed by ``stream_digest`` whose refs its body describes: the
    body must decode, the stream must have the kind's parts, the refs must match."""

    def kinds(row: StateRow) -> tuple[int, ...]:
        found = ref_kinds(row.body)
        checkpoints.check_refs(found, row.refs)
        return found

    def digest(row: StateRow) -> Digest:
        checkpoints.parse_stream(row.kind, row.stream)
        kinds(row)
        return stream_digest(row.kind, row.stream, row.refs, row.body)

    return StateKind(digest=digest, ref_kinds=kinds)


# -- session states (an OpenAI Agents SDK session, immagent.clients.sessions) ------------


class SessionBranch(msgspec.Struct, frozen=True, array_like=True):
    """A branch of a session besides ``main``: its name and when it was made (microseconds
    since the Unix epoch, UTC)."""

    name: str
    created: int


class SessionBody(msgspec.Struct, frozen=True, omit_defaults=True,
                  rename={"branches": "b", "retired": "r", "generation": "g", "usage": "u",
                          "owner": "o"}):
    """The stored body of a session state. The state's refs are the head item node of
    each branch: ``main`` first, then ``branches`` in order, then the head of the usage
    chain of each branch listed in ``usage`` (by index, ascending; a branch without
    recorded usage has none). ``retired`` are branch names used before (deleted or
    cleared) and never reused; ``generation`` counts ``clear_session`` calls; ``owner``
    is who the session belongs to (set by its first state, kept by every later one). A
    session with only ``main`` stores one byte here."""

    branches: tuple[SessionBranch, ...] = ()
    retired: tuple[str, ...] = ()
    generation: int = 0
    usage: tuple[int, ...] = ()
    owner: str | None = None


_session_body = msgspec.msgpack.Decoder(SessionBody)


def session_body(row: StateRow) -> SessionBody:
    """The body of a session state row, checked against its refs (ValueError or
    msgspec.DecodeError if malformed); unverified: ``load_state`` proves the digest."""
    body = _session_body.decode(row.body)
    names = ["main", *(b.name for b in body.branches)]
    if len(names) + len(body.usage) != len(row.refs):
        raise ValueError(f"a session state with {len(names)} branch(es) and "
                         f"{len(body.usage)} usage chain(s) pins "
                         f"{len(names) + len(body.usage)} digests, this row has "
                         f"{len(row.refs)}")
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ValueError("a session state's branch names must be distinct and non-blank")
    if body.generation < 0:
        raise ValueError("a session state's generation must be >= 0")
    if list(body.usage) != sorted(set(body.usage)) or any(
            not 0 <= i < len(names) for i in body.usage):
        raise ValueError("a session state's usage chains must name distinct branches, "
                         "in order")
    if body.owner is not None and not body.owner.strip():
        raise ValueError("a session state's owner must be non-blank")
    return body


def _session_digest(row: StateRow) -> Digest:
    session_body(row)  # a body that does not match its refs is undecodable, not sound
    return stream_digest(row.kind, row.stream, row.refs, row.body)


# -- items of a namespaced key-value store (immagent.kv) ---------------------------------


def item_body(row: StateRow) -> kv.ItemBody:
    """The body of an item state or head row, checked against its stream and refs
    (ValueError or msgspec errors if malformed); unverified: ``load_state`` proves the
    digest."""
    kv.parse_item_stream(row.stream)
    if row.kind == Kind.STORE_HEAD:
        return kv.decode_head(row.body, len(row.refs))
    return kv.decode_item(row.body, len(row.refs))


def _item_ref_kinds(row: StateRow) -> tuple[int, ...]:
    item_body(row)
    return (int(Kind.ITEM),) * len(row.refs)


def _item_digest(row: StateRow) -> Digest:
    item_body(row)  # a body that does not match its refs is undecodable, not sound
    return stream_digest(row.kind, row.stream, row.refs, row.body)


# -- attestations (immagent.attestations) ------------------------------------------------


def _attestation_digest(row: StateRow) -> Digest:
    _, _, subject = attestations.attestation_of(row.kind, row.stream, row.refs, row.body)
    if row.parent_id != subject.id:  # lineage is not hashed: the link is checked here
        raise ValueError(f"an attestation of state {subject.id} names {row.parent_id} as "
                         "its parent")
    return stream_digest(row.kind, row.stream, row.refs, row.body)


# -- conversation records (a pydantic-ai ConversationStore, clients/conversations.py) ----


class ConversationBody(msgspec.Struct, frozen=True, omit_defaults=True,
                       rename={"revision": "r", "updated": "t", "head": "h",
                               "branches": "b", "usage": "u", "deferred": "d",
                               "scope": "s", "forked_from": "f", "forked_at": "a",
                               "title": "n", "metadata": "m", "deleted": "x"}):
    """The stored body of a conversation state (stream = the conversation id). Its refs
    are the entry-chain link ending at ``head`` (the root when it is None), then the link
    ending at each of ``branches``, in order. Entry ids are stored by
    ``ids.pack_text_id``; ``usage`` and ``deferred`` are the client's own serialization
    (JSON text), kept opaque. A *deleted* state (a tombstone) pins nothing: its refs are
    empty and it holds no other field."""

    # Ids are ``str | bytes``, a union msgspec cannot type: ``conversation_body`` checks them.
    revision: Any = None  # the client's revision token
    updated: int = 0  # microseconds since the Unix epoch, UTC
    head: Any = None  # the newest entry of the history
    branches: tuple[Any, ...] = ()  # last entries of the histories it left
    usage: bytes = b""
    deferred: bytes | None = None
    scope: str | None = None
    forked_from: str | None = None
    forked_at: Any = None
    title: str | None = None
    metadata: dict[str, Any] | None = None
    deleted: bool = False


_conversation_body = msgspec.msgpack.Decoder(ConversationBody)


def conversation_body(row: StateRow) -> ConversationBody:
    """The body of a conversation state row, checked against its refs (ValueError or
    msgspec.DecodeError if malformed); unverified: ``load_state`` proves the digest."""
    body = _conversation_body.decode(row.body)
    if body.deleted:
        if row.refs or body != ConversationBody(deleted=True):
            raise ValueError("a deleted conversation state pins nothing and holds nothing")
        return body
    if body.revision is None:
        raise ValueError("a conversation state has a revision")
    if len(row.refs) != 1 + len(body.branches):
        raise ValueError(f"a conversation state with {len(body.branches)} branch(es) pins "
                         f"{1 + len(body.branches)} digests, this row has {len(row.refs)}")
    for stored in (body.revision, body.head, *body.branches, body.forked_at):
        if stored is not None:
            unpack_text_id(stored)
    return body


def _conversation_digest(row: StateRow) -> Digest:
    conversation_body(row)  # a body that does not match its refs is undecodable, not sound
    return stream_digest(row.kind, row.stream, row.refs, row.body)


_scope_body = msgspec.msgpack.Decoder(str)


def _scope_digest(row: StateRow) -> Digest:
    """A scope entry lists one conversation (its body: the conversation id) under its scope
    (its stream); it pins nothing."""
    if row.refs:
        raise ValueError("a conversation scope entry pins nothing")
    _scope_body.decode(row.body)
    return stream_digest(row.kind, row.stream, row.refs, row.body)


# -- retention (immagent.retention): pins, the stored policy, marks ----------------------


def _pin_digest(row: StateRow) -> Digest:
    """A pin names its subject as parent and repeats the subject's refs (their kinds in its
    body), so the pinned content stays; its stream is the subject's id."""
    body = retention.decode_pin(row.body)
    if len(body.ref_kinds) != len(row.refs):
        raise ValueError(f"a pin lists {len(body.ref_kinds)} ref kinds for {len(row.refs)} "
                         "refs")
    if row.parent_id is None or row.stream != str(row.parent_id):
        raise ValueError("a pin's stream is the id of the state it pins, its parent")
    return stream_digest(row.kind, row.stream, row.refs, row.body)


def _policy_digest(row: StateRow) -> Digest:
    if row.refs or row.stream != retention.POLICY_STREAM:
        raise ValueError(f"a retention policy pins nothing and lives in stream "
                         f"{retention.POLICY_STREAM!r}")
    retention.decode_policy(row.body)
    return stream_digest(row.kind, row.stream, row.refs, row.body)


def _mark_digest(row: StateRow) -> Digest:
    mark = retention.decode_mark(row.body)
    if (row.refs or row.stream != retention.MARK_STREAM
            or row.id != retention.mark_id(mark.kind, mark.stream)):
        raise ValueError("a retention mark pins nothing, lives in stream "
                         f"{retention.MARK_STREAM!r} and has the id its stream derives")
    return stream_digest(row.kind, row.stream, row.refs, row.body)


def _redaction_digest(row: StateRow) -> Digest:
    """A redaction record pins nothing, has no parent, lives in the stream named by the
    redacted digest (lowercase hex) and has the id that digest derives."""
    redaction.decode_note(row.body)
    try:
        digest = bytes.fromhex(row.stream)
    except ValueError:
        digest = b""
    if (len(digest) != 32 or row.stream != digest.hex() or row.refs
            or row.parent_id is not None or row.id != redaction.state_id(digest)):
        raise ValueError("a redaction record pins nothing, has no parent, lives in the "
                         "stream of its digest (hex) and has the id its digest derives")
    return stream_digest(row.kind, row.stream, row.refs, row.body)


# -- every state kind -------------------------------------------------------------------

#: Each state kind's rules. A client of the store adds its kind here (kinds are data to
#: the backends: a new one needs no storage change).
STATE_KINDS: dict[int, StateKind] = {
    int(Kind.AGENT_STATE): StateKind(
        digest=_agent_digest,
        ref_kinds=lambda row: (int(Kind.SYSTEM_PROMPT), int(Kind.NODE)),
    ),
    int(Kind.SESSION_STATE): StateKind(
        digest=_session_digest,
        ref_kinds=lambda row: (int(Kind.ITEM_NODE),) * len(row.refs),
    ),
    # The store's own: which zstd dictionaries exist (store/compression.py).
    int(Kind.COMPRESSION): StateKind(
        digest=lambda row: stream_digest(row.kind, row.stream, row.refs, row.body),
        ref_kinds=lambda row: tuple(int(Kind.DICTIONARY) for _ in row.refs),
    ),
    # pydantic-ai conversations (immagent.clients.conversations).
    int(Kind.CONVERSATION_STATE): StateKind(
        digest=_conversation_digest,
        ref_kinds=lambda row: (int(Kind.ENTRY_NODE),) * len(row.refs),
    ),
    int(Kind.CONVERSATION_SCOPE): StateKind(digest=_scope_digest, ref_kinds=lambda row: ()),
    # LangGraph checkpoints (immagent.checkpoints).
    int(Kind.CHECKPOINT): _generic_kind(checkpoints.checkpoint_ref_kinds),
    int(Kind.CHECKPOINT_WRITES): _generic_kind(checkpoints.writes_ref_kinds),
    # A LangGraph BaseStore's items (immagent.kv): one state per put, refresh or delete,
    # and the current value of each key (its head).
    int(Kind.STORE_ITEM): StateKind(
        digest=_item_digest,
        ref_kinds=_item_ref_kinds,
        expires=lambda row: kv.expires_at(item_body(row)),
    ),
    int(Kind.STORE_HEAD): StateKind(
        digest=_item_digest,
        ref_kinds=_item_ref_kinds,
        expires=lambda row: kv.expires_at(item_body(row)),
    ),
    # A signature over another state (immagent.attestations), attached to it.
    int(Kind.ATTESTATION): StateKind(digest=_attestation_digest, ref_kinds=lambda row: (),
                                     attached=True),
    # Retention (immagent.retention): pins, the stored policy, per-stream marks.
    int(Kind.PIN): StateKind(digest=_pin_digest,
                             ref_kinds=lambda row: retention.decode_pin(row.body).ref_kinds),
    int(Kind.RETENTION_POLICY): StateKind(digest=_policy_digest, ref_kinds=lambda row: ()),
    int(Kind.RETENTION_MARK): StateKind(digest=_mark_digest, ref_kinds=lambda row: ()),
    # Redaction (immagent.redaction): one record per redacted digest.
    int(Kind.REDACTION): StateKind(digest=_redaction_digest, ref_kinds=lambda row: ()),
}


def attached_kinds() -> tuple[int, ...]:
    """The state kinds whose rows are attached to a subject state (``StateKind.attached``)."""
    return tuple(sorted(k for k, rules in STATE_KINDS.items() if rules.attached))


def check_state(row: StateRow) -> tuple[Literal["corrupt", "undecodable"], str] | None:
    """None if a stored state row is sound, else ("corrupt" | "undecodable", reason):
    corrupt when its content no longer gives its digest, undecodable when its body is not
    a valid body of its kind (or the kind is unknown)."""
    damaged = _damaged_column(row)
    if damaged is not None:
        return "corrupt", damaged
    rules = STATE_KINDS.get(row.kind)
    if rules is None:
        return "undecodable", f"unknown state kind {row.kind}"
    try:
        expected = rules.digest(row)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as e:
        return "undecodable", f"{type(e).__name__}: {e}"
    except RecursionError:
        return "undecodable", "its body is nested too deeply"
    if expected != row.digest:
        return "corrupt", "its content does not hash to its stored state digest"
    return None


_COLUMN_TYPES: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("id", UUID), ("parent_id", (UUID, type(None))), ("kind", int), ("stream", str),
    ("refs", tuple), ("body", bytes), ("digest", bytes), ("created_at", datetime),
)


def _damaged_column(row: StateRow) -> str | None:
    """Which column of a row read back holds a value of the wrong type (a database without
    strict column types, SQLite, keeps whatever was written into it), or None. Neither the
    timestamp nor the lineage is hashed, so a damaged one is caught only here."""
    for name, kind in _COLUMN_TYPES:
        value = getattr(row, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"column {name} holds a {type(value).__name__}, not a {name} value"
    if any(not isinstance(r, bytes) or len(r) != 32 for r in row.refs):
        return "column refs does not hold 32-byte digests"
    if len(row.digest) != 32:
        return "column digest does not hold a 32-byte digest"
    if row.created_at.tzinfo is None:
        return "column created_at holds a time without a time zone"
    return None


def load_state(row: StateRow) -> StateRow:
    """``row`` after proving its content hashes to its digest: the one verify-on-read for
    states, as ``assets.load_row`` is for assets. IntegrityError names the row otherwise."""
    problem = check_state(row)
    if problem is not None:
        raise IntegrityError(f"state {row.id} is {problem[0]}: {problem[1]} "
                             "(run store.verify())")
    return row


def load_agent(row: StateRow) -> AgentRecord:
    """The verified agent record a state row holds (IntegrityError if the row is damaged
    or is not an agent state)."""
    if row.kind != Kind.AGENT_STATE:
        raise IntegrityError(f"state {row.id} is not an agent state (kind {row.kind})")
    damaged = _damaged_column(row)
    if damaged is not None:
        raise IntegrityError(f"state {row.id} is corrupt: {damaged} (run store.verify())")
    try:
        record = _decode_agent(row)  # decoded once: the digest is checked on the record
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError,
            RecursionError) as e:
        raise IntegrityError(f"state {row.id} is undecodable: {type(e).__name__}: {e} "
                             "(run store.verify())") from e
    if record.expected_digest() != row.digest:
        raise IntegrityError(f"state {row.id} is corrupt: its content does not hash to its "
                             "stored state digest (run store.verify())")
    return record
