"""Conversations: pydantic-ai's conversation log (records over chains of entries), immutably.

The store-side half of ``immagent.integrations.pydantic_ai.ImmAgentConversationStore``. It
imports no SDK: the client hands in messages, usage and deferred tool requests already
serialized (JSON text), so the store, gc, verify and bundles understand conversations
where pydantic-ai is not installed. Data model:

* an *entry* (``assets.Entry``, kind ENTRY) is an entry id and its message, stored once
  however many branches and forks hold it;
* a *history* is a hash chain of ``EntryNode`` links, one link per entry, rooted at the
  shared ``EMPTY_ENTRIES``: its shape follows from its entries, so the link ending at any
  entry of a history this log has read is computed, never looked up, and a branch or a
  fork from the middle of a history points at a link that is already stored;
* a *conversation state* (kind CONVERSATION_STATE, stream = the conversation id) is one
  version of the record: refs = the link ending at the head, then the link ending at each
  branch the conversation left; body = ``records.ConversationBody`` (revision, usage,
  deferred requests, scope, fork origin, title, metadata); parent = the state before it.
  A delete writes a *deleted* state (a tombstone) that pins nothing;
* a *scope entry* (kind CONVERSATION_SCOPE, stream = ``scope_key(scope)``, its id derived
  from the conversation id) lists a conversation under its scope: written with the
  conversation's first state, deleted in the same transaction as the conversation.

Every change is a new state, written with ``Store.commit(..., heads=[Head(...)])``: it
commits only if the state it was computed from is still the stream's newest. The
client's *revision* (pydantic-ai's optimistic token) is kept in the body and checked
against the newest state before each write, so a write from a stale revision is a
``RevisionConflictError``; a head that moved without the revision changing (a title
update) is re-read and the write computed again. Nothing is updated or deleted in place:
every earlier state stays loadable (``states``, ``load_state``) until ``purge`` deletes
the conversation's rows, and only then can ``Store.gc()`` reclaim what nothing else holds.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import blake3
import msgspec

from immagent.assets import EMPTY_ENTRIES, Asset, Digest, Entry, EntryNode, Kind
from immagent.audit.bundle import BundleInfo
from immagent.exceptions import (
    AssetNotFoundError,
    ImmAgentError,
    IntegrityError,
    StaleStreamError,
    ValidationError,
)
from immagent.ids import pack_text_id, unpack_text_id, uuid7, uuid_from_digest
from immagent.records import ConversationBody, StateRow, conversation_body, stream_digest
from immagent.store.backend import Head
from immagent.store.log import EventLog
from immagent.validate import (
    MAX_INPUT_BYTES,
    MAX_NAME_BYTES,
    check_json_value,
    check_key,
    check_text,
    check_uuid,
)

__all__ = [
    "ConversationLog",
    "ConversationState",
    "EntryNotFoundError",
    "NewEntry",
    "RecordUpdate",
    "RevisionConflictError",
    "check_conversation_id",
    "scope_entry_id",
    "scope_key",
]

_KIND = int(Kind.CONVERSATION_STATE)
_SCOPE = int(Kind.CONVERSATION_SCOPE)
#: A writer that keeps finding the head moved (title updates racing it) gives up here.
_MAX_ATTEMPTS = 1000
#: Histories (and the entry index of each) kept per log, most recently used first.
_HISTORIES = 8
#: Entry ids whose link this log knows (heads and branch tips it read or wrote); entries
#: inside a history are found through the remembered histories instead.
_LINKS = 20_000
#: Largest serialized message, usage or deferred requests accepted (bytes).
MAX_SERIALIZED = 64 * MAX_INPUT_BYTES
#: Conversations whose newest state is read at once while listing.
_LIST_BATCH = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNSET: Any = object()


class RevisionConflictError(ImmAgentError):
    """The conversation changed since it was read (saved, updated, deleted, or created by
    someone else), or a write names an entry that is no longer there; nothing was
    written. Load it again and decide what to do."""

    def __init__(self, conversation_id: str, reason: str | None = None) -> None:
        self.conversation_id = conversation_id
        super().__init__(reason or f"conversation {conversation_id!r} was saved or deleted "
                         "since it was loaded, or already exists; load it again")


class EntryNotFoundError(AssetNotFoundError):
    """No history this log has read holds the entry (a LookupError)."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__("conversation entry", entry_id)


class NewEntry(NamedTuple):
    """An entry a write adds: its id, the entry before it (None: the first of a history)
    and its message as the client serialized it."""

    entry_id: str
    parent_id: str | None
    message: bytes


class RecordUpdate(NamedTuple):
    """What a write sets: the record the client passes. ``title`` and ``metadata`` are
    kept from the stored record when there is one (``write_details`` changes them)."""

    head_id: str | None
    revision: str
    updated_at: datetime
    usage: bytes = b""
    deferred: bytes | None = None
    scope: str | None = None
    forked_from: str | None = None
    forked_at: str | None = None
    branches: tuple[str, ...] = ()
    title: str | None = None
    metadata: dict[str, Any] | None = None


class ConversationState(msgspec.Struct, frozen=True):
    """One stored version of a conversation's record. ``digest`` pins its whole content
    (every entry of its history and of each branch it left, through the hash chains);
    ``head`` and ``branches`` name the links ending at those entries."""

    id: UUID
    parent_id: UUID | None
    conversation_id: str
    created_at: datetime
    digest: Digest
    seq: int
    deleted: bool
    revision: str | None
    updated_at: datetime
    head_id: str | None
    head: Digest | None
    branches: tuple[tuple[str, Digest], ...]
    usage: bytes
    deferred: bytes | None
    scope: str | None
    forked_from: str | None
    forked_at: str | None
    title: str | None
    metadata: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: StateRow) -> ConversationState:
        """The state a verified row holds (IntegrityError if it is another kind)."""
        if row.kind != _KIND:
            raise IntegrityError(f"state {row.id} is not a conversation state (kind {row.kind})")
        try:
            body = conversation_body(row)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise IntegrityError(f"conversation state {row.id} cannot be decoded: {e}") from e
        return cls(
            id=row.id, parent_id=row.parent_id, conversation_id=row.stream,
            created_at=row.created_at, digest=row.digest, seq=row.seq, deleted=body.deleted,
            revision=_text(body.revision), updated_at=_from_micros(body.updated),
            head_id=_text(body.head), head=row.refs[0] if row.refs else None,
            branches=tuple((unpack_text_id(b), link)
                           for b, link in zip(body.branches, row.refs[1:], strict=True)),
            usage=body.usage, deferred=body.deferred, scope=body.scope,
            forked_from=body.forked_from, forked_at=_text(body.forked_at), title=body.title,
            metadata=body.metadata,
        )

    def links(self) -> dict[str, Digest]:
        """The entries whose link this state names: its head and each branch's tip."""
        found = dict(self.branches)
        if self.head_id is not None and self.head is not None:
            found[self.head_id] = self.head
        return found


class _History:
    """A history this log read or wrote: its entries, where each entry is, and the link
    ending at each (computed on demand: one link per entry, from the root)."""

    def __init__(self, head: Digest, entries: tuple[Entry, ...]) -> None:
        self.head = head
        self.entries = entries
        self._positions: dict[str, int] | None = None
        self._links: list[EntryNode] | None = None

    def position(self, entry_id: str) -> int | None:
        """Where ``entry_id`` is in the history (the last place, should it repeat)."""
        if self._positions is None:
            self._positions = {e.entry_id: i for i, e in enumerate(self.entries)}
        return self._positions.get(entry_id)

    def link(self, index: int) -> EntryNode:
        """The link ending at the entry at ``index``, computed; IntegrityError if the
        stored chain is not one link per entry (the computed head differs)."""
        if self._links is None:
            links: list[EntryNode] = []
            node = EMPTY_ENTRIES
            for entry in self.entries:
                node = node.extend([entry])
                links.append(node)
            if links and links[-1].digest != self.head:
                raise IntegrityError(f"entry chain {self.head.hex()} is not one link per entry")
            self._links = links
        return self._links[index]


# -- pure helpers -----------------------------------------------------------------------


def check_conversation_id(field: str, value: object) -> str:
    """A conversation id: non-blank text without NUL (it is a stream in every backend)."""
    return check_text(field, value, max_bytes=MAX_NAME_BYTES)


def _check_id(field: str, value: object) -> str:
    return check_text(field, value, max_bytes=MAX_NAME_BYTES)


def _check_optional_id(field: str, value: object) -> str | None:
    return None if value is None else _check_id(field, value)


def _check_scope(field: str, value: object) -> str | None:
    if value is None:
        return None
    scope = check_key(field, value)
    if len(scope.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValidationError(field, f"is longer than the limit of {MAX_NAME_BYTES} bytes", None)
    return scope


def _check_serialized(field: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ValidationError(field, f"must be bytes (serialized), got {type(value).__name__}",
                              None)
    if len(value) > MAX_SERIALIZED:
        raise ValidationError(field, f"is larger than the limit of {MAX_SERIALIZED} bytes", None)
    return value


def _check_title(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a str or None, got {type(value).__name__}", None)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        raise ValidationError(field, f"is longer than the limit of {MAX_INPUT_BYTES} bytes",
                              None)
    check_key(field, value)
    return value


def _check_metadata(field: str, value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a dict or None, got {type(value).__name__}", None)
    checked: dict[str, Any] = check_json_value(field, dict(value))
    return checked


def scope_key(scope: str | None) -> str:
    """The stream scope entries of ``scope`` are listed in (None: conversations saved
    without a scope). U+001F cannot end a scope's key early: the prefix is fixed."""
    return "scope" if scope is None else "scope\x1f" + scope


def scope_entry_id(conversation_id: str) -> UUID:
    """The id of the scope entry of ``conversation_id``: derived from it, so it is found,
    replaced and deleted without a lookup."""
    digest = blake3.blake3(b"immagent conversation scope\x00"
                           + conversation_id.encode("utf-8")).digest()
    return uuid_from_digest(digest)


def _text(stored: Any) -> str | None:
    return None if stored is None else unpack_text_id(stored)


def _micros(t: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    if t.tzinfo is None:
        raise ValidationError("record.updated_at", "must be an aware datetime", None)
    return (t - _EPOCH) // timedelta(microseconds=1)


def _from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _new_entries(entries: object) -> list[NewEntry]:
    """The checked entries of a write: each after the one before it, ids distinct."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise ValidationError("new_entries", "must be a sequence of entries", None)
    checked: list[NewEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, NewEntry):
            raise ValidationError(f"new_entries[{i}]", "must be a NewEntry", None)
        entry_id = _check_id(f"new_entries[{i}].id", entry.entry_id)
        parent = _check_optional_id(f"new_entries[{i}].parent_id", entry.parent_id)
        if i and parent != checked[-1].entry_id:
            raise ValidationError(f"new_entries[{i}].parent_id", "must be the entry before it "
                                  f"({checked[-1].entry_id!r}): new entries come in order",
                                  parent)
        if entry_id in seen or entry_id == parent:
            raise ValidationError(f"new_entries[{i}].id", "is used twice in this write",
                                  entry_id)
        seen.add(entry_id)
        checked.append(NewEntry(entry_id, parent, _check_serialized(
            f"new_entries[{i}].message", entry.message)))
    return checked


def _check_update(update: object, entries: Sequence[NewEntry]) -> RecordUpdate:
    if not isinstance(update, RecordUpdate):
        raise ValidationError("record", "must be a RecordUpdate", None)
    head = _check_optional_id("record.head_id", update.head_id)
    if entries and head != entries[-1].entry_id:
        raise ValidationError("record.head_id", "must be the last new entry "
                              f"({entries[-1].entry_id!r})", head)
    if not isinstance(update.updated_at, datetime):
        raise ValidationError("record.updated_at", "must be a datetime", None)
    if isinstance(update.branches, str) or not isinstance(update.branches, Sequence):
        raise ValidationError("record.branches", "must be a sequence of entry ids", None)
    return RecordUpdate(
        head_id=head, revision=_check_id("record.revision", update.revision),
        updated_at=update.updated_at, usage=_check_serialized("record.usage", update.usage),
        deferred=None if update.deferred is None
        else _check_serialized("record.deferred_tool_requests", update.deferred),
        scope=_check_scope("record.scope", update.scope),
        forked_from=_check_optional_id("record.forked_from", update.forked_from),
        forked_at=_check_optional_id("record.forked_at", update.forked_at),
        branches=tuple(_check_id(f"record.branches[{i}]", b)
                       for i, b in enumerate(update.branches)),
        title=_check_title("record.title", update.title),
        metadata=_check_metadata("record.metadata", update.metadata),
    )


def _row(conversation_id: str, parent_id: UUID | None, refs: tuple[Digest, ...],
         body: ConversationBody) -> StateRow:
    data = msgspec.msgpack.encode(body)
    return StateRow(id=uuid7(), parent_id=parent_id, kind=_KIND, stream=conversation_id,
                    refs=refs, body=data, digest=stream_digest(_KIND, conversation_id, refs, data),
                    created_at=datetime.now(UTC))


def _scope_row(conversation_id: str, scope: str | None) -> StateRow:
    stream = scope_key(scope)
    data = msgspec.msgpack.encode(conversation_id)
    return StateRow(id=scope_entry_id(conversation_id), parent_id=None, kind=_SCOPE,
                    stream=stream, refs=(), body=data,
                    digest=stream_digest(_SCOPE, stream, (), data), created_at=datetime.now(UTC))


def _body(state: ConversationState, **changes: Any) -> ConversationBody:
    """The body of ``state`` with ``changes`` (fields of ConversationBody)."""
    fields: dict[str, Any] = {
        "revision": None if state.revision is None else pack_text_id(state.revision),
        "updated": _micros(state.updated_at),
        "head": None if state.head_id is None else pack_text_id(state.head_id),
        "branches": tuple(pack_text_id(b) for b, _ in state.branches),
        "usage": state.usage, "deferred": state.deferred, "scope": state.scope,
        "forked_from": state.forked_from,
        "forked_at": None if state.forked_at is None else pack_text_id(state.forked_at),
        "title": state.title, "metadata": state.metadata,
    }
    fields.update(changes)
    return ConversationBody(**fields)


async def _backoff(attempt: int) -> None:
    """A jittered, growing pause: writers in other processes spread out."""
    await asyncio.sleep(random.random() * min(0.05, 0.001 * (attempt + 1)))


# -- the client -------------------------------------------------------------------------


class ConversationLog:
    """The conversations of one store, as seen by one client object. Use it from the event
    loop the store runs on.

    Its caches hold no authority: the histories it read last (with where each entry is),
    and which link ends at the entries it saw named as heads and branch tips or wrote. An
    entry is found by id through them (``locate``): pydantic-ai's ``ConversationStore``
    always reads a conversation before naming its entries, so that is every entry it
    asks for. Several objects (or processes) on one store stay correct through the
    revision and head checks."""

    def __init__(self, store: EventLog) -> None:
        """The conversations of ``store`` (nothing is read until used)."""
        self.store = store
        self._histories: OrderedDict[Digest, _History] = OrderedDict()
        self._links: OrderedDict[str, Digest] = OrderedDict()

    # -- reads --------------------------------------------------------------------------

    async def newest(self, conversation_id: str) -> ConversationState | None:
        """The conversation's newest state (a deleted one included), None if it has none
        (one index probe)."""
        cid = check_conversation_id("conversation_id", conversation_id)
        rows = await self.store.stream_states(_KIND, cid, limit=1)
        if not rows:
            return None
        state = ConversationState.from_row(rows[0])
        self._learn(state)
        return state

    async def record(self, conversation_id: str) -> ConversationState | None:
        """The conversation's current record, None if it was never saved or is deleted."""
        state = await self.newest(conversation_id)
        return None if state is None or state.deleted else state

    async def records(self, scope: str | None = None, limit: int | None = None
                      ) -> list[ConversationState]:
        """The current records of the conversations saved with ``scope`` (None: every
        conversation), most recently updated first, at most ``limit``. Reads the scope's
        entries, then each conversation's newest state (one probe each)."""
        scope = _check_scope("scope", scope)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise ValidationError("limit", f"must be an int >= 0 or None, got {limit!r}", limit)
        ids = await self._listed(scope)
        found: list[ConversationState] = []
        for start in range(0, len(ids), _LIST_BATCH):
            batch = ids[start:start + _LIST_BATCH]
            found.extend(s for s in await asyncio.gather(*map(self.record, batch))
                         if s is not None and (scope is None or s.scope == scope))
        found.sort(key=lambda s: (s.updated_at, s.seq), reverse=True)
        return found if limit is None else found[:limit]

    async def _listed(self, scope: str | None) -> list[str]:
        """The conversation ids listed under ``scope`` (None: all), each once."""
        rows: list[StateRow] = []
        if scope is None:
            after: UUID | None = None
            while page := await self.store.scan_states(_SCOPE, after=after, limit=1000):
                rows.extend(page)
                after = page[-1].id
        else:
            key = scope_key(scope)
            after_seq: int | None = None
            while page := await self.store.stream_states(_SCOPE, key, after_seq=after_seq,
                                                         limit=1000, newest_first=False):
                rows.extend(page)
                after_seq = page[-1].seq
        return list(dict.fromkeys(msgspec.msgpack.decode(r.body, type=str) for r in rows))

    async def states(self, conversation_id: str, *, limit: int = 100,
                     after_seq: int | None = None, newest_first: bool = True
                     ) -> list[ConversationState]:
        """The conversation's stored states in log order (newest first by default), a page
        at a time: pass the last one's ``seq`` as ``after_seq``."""
        cid = check_conversation_id("conversation_id", conversation_id)
        rows = await self.store.stream_states(_KIND, cid, after_seq=after_seq, limit=limit,
                                              newest_first=newest_first)
        return [ConversationState.from_row(r) for r in rows]

    async def load_state(self, state_id: UUID | str) -> ConversationState:
        """A stored conversation state by id; ValidationError if there is none."""
        wanted = check_uuid("state_id", state_id)
        rows = await self.store.get_states([wanted])
        if not rows or rows[0].kind != _KIND:
            raise ValidationError("state_id", f"no conversation state {wanted} is stored", wanted)
        state = ConversationState.from_row(rows[0])
        self._learn(state)
        return state

    async def history(self, link: Digest | None) -> tuple[Entry, ...]:
        """The entries of the chain ending at ``link``, oldest first."""
        if link is None or link == EMPTY_ENTRIES.digest:
            return ()
        return (await self._read(link)).entries

    async def locate(self, entry_id: str) -> tuple[tuple[Entry, ...], int]:
        """A history holding ``entry_id`` (oldest first) and its position there
        (EntryNotFoundError if no history this log has seen holds it)."""
        history, index = await self._find(_check_id("entry_id", entry_id))
        return history.entries, index

    async def _find(self, entry_id: str) -> tuple[_History, int]:
        link = self._links.get(entry_id)
        if link is not None:
            history = await self._read(link)
            if not history.entries or history.entries[-1].entry_id != entry_id:
                raise IntegrityError(f"entry chain {link.hex()} does not end at entry "
                                     f"{entry_id!r}, as the state naming it says")
            return history, len(history.entries) - 1
        for history in reversed(self._histories.values()):
            index = history.position(entry_id)
            if index is not None:
                return history, index
        raise EntryNotFoundError(entry_id)

    async def _read(self, link: Digest) -> _History:
        cached = self._histories.get(link)
        if cached is not None:
            self._histories.move_to_end(link)
            return cached
        entries = await self.store.get_chain(link, Kind.ENTRY_NODE)
        if not all(isinstance(e, Entry) for e in entries):
            raise IntegrityError(f"chain {link.hex()} holds an element that is not an entry")
        history = _History(link, entries)  # type: ignore[arg-type]  # checked above
        self._remember(history)
        return history

    def _remember(self, history: _History) -> None:
        self._histories[history.head] = history
        self._histories.move_to_end(history.head)
        while len(self._histories) > _HISTORIES:
            self._histories.popitem(last=False)
        if history.entries:
            self._link(history.entries[-1].entry_id, history.head)

    def _link(self, entry_id: str, link: Digest) -> None:
        self._links[entry_id] = link
        self._links.move_to_end(entry_id)
        while len(self._links) > _LINKS:
            self._links.popitem(last=False)

    def _learn(self, state: ConversationState) -> None:
        for entry_id, link in state.links().items():
            self._link(entry_id, link)

    # -- writes -------------------------------------------------------------------------

    async def write(self, conversation_id: str, update: RecordUpdate,
                    entries: Sequence[NewEntry] = (), *,
                    expected_revision: str | None) -> ConversationState:
        """Write a new state of the conversation from ``update``, adding ``entries`` (in
        order, each after the one it names) to the history ending at the first one's
        parent. RevisionConflictError, nothing written, if the stored revision is not
        ``expected_revision`` (None: the conversation must not exist, or be deleted), or
        if an entry the update names is in no history of the conversation, the branches it
        left or the conversation it was forked from. The stored title and metadata are
        kept (``update``'s apply to a new conversation)."""
        cid = check_conversation_id("conversation_id", conversation_id)
        new = _new_entries(entries)
        update = _check_update(update, new)
        expected = _check_optional_id("expected_revision", expected_revision)
        added = [Entry.of(e.entry_id, e.message) for e in new]
        for attempt in range(_MAX_ATTEMPTS):
            newest = await self.newest(cid)
            current = None if newest is None or newest.deleted else newest
            if (current.revision if current is not None else None) != expected:
                raise RevisionConflictError(cid)
            plan = await self._plan(cid, current, update, new, added)
            if current is not None:
                parent_id: UUID | None = current.id
                title, metadata = current.title, current.metadata
            else:
                parent_id = await self._fork_parent(update.forked_from)
                title, metadata = update.title, update.metadata
            body = ConversationBody(
                revision=pack_text_id(update.revision), updated=_micros(update.updated_at),
                head=None if update.head_id is None else pack_text_id(update.head_id),
                branches=tuple(pack_text_id(b) for b in update.branches), usage=update.usage,
                deferred=update.deferred, scope=update.scope, forked_from=update.forked_from,
                forked_at=None if update.forked_at is None else pack_text_id(update.forked_at),
                title=title, metadata=metadata)
            row = _row(cid, parent_id, plan.refs, body)
            states, replace = [row], []
            if current is None or current.scope != update.scope:
                states.append(_scope_row(cid, update.scope))
                replace.append(scope_entry_id(cid))
            try:
                await self.store.commit(plan.assets, states, replace=replace, heads=[
                    Head(_KIND, cid, newest.id if newest is not None else None)])
            except StaleStreamError:
                await _backoff(attempt)
                continue
            except AssetNotFoundError as e:
                # A link or entry the write points at was reclaimed meanwhile (its
                # conversation purged and gc run): as pydantic-ai's backends report it.
                raise RevisionConflictError(cid, f"conversation {cid!r} points at an entry "
                                            f"that is no longer stored ({e})") from e
            for history in plan.histories:
                self._remember(history)
            state = ConversationState.from_row(row)
            self._learn(state)
            return state
        raise RevisionConflictError(cid, f"conversation {cid!r} kept changing during the write")

    class _Plan(NamedTuple):
        refs: tuple[Digest, ...]
        assets: list[Asset]
        histories: list[_History]

    async def _plan(self, cid: str, current: ConversationState | None, update: RecordUpdate,
                    new: Sequence[NewEntry], added: Sequence[Entry]) -> _Plan:
        """The refs and assets of a write: the links ending at its head and branch tips
        (computed where they are not named by the current state), and the new entries with
        one new link each."""
        known = current.links() if current is not None else {}
        assets: list[Asset] = []
        histories: list[_History] = []
        if new:
            parent = new[0].parent_id
            base, before = ((EMPTY_ENTRIES, ()) if parent is None
                            else await self._link_at(cid, parent, known, current, update))
            node = base
            links: list[EntryNode] = []
            for entry in added:
                node = node.extend([entry])
                links.append(node)
            head: EntryNode = node
            assets.extend([base, *added, *links])
            if before is not None:
                histories.append(_History(head.digest, (*before, *added)))
        elif update.head_id is None:
            head = EMPTY_ENTRIES
            assets.append(head)
        else:
            head, _ = await self._link_at(cid, update.head_id, known, current, update)
            assets.append(head)
        tips = []
        for tip in update.branches:
            link, _ = await self._link_at(cid, tip, known, current, update)
            tips.append(link.digest)
            assets.append(link)
        return self._Plan((head.digest, *tips), assets, histories)

    async def _link_at(self, cid: str, entry_id: str, known: Mapping[str, Digest],
                       current: ConversationState | None, update: RecordUpdate
                       ) -> tuple[EntryNode, tuple[Entry, ...] | None]:
        """The link ending at ``entry_id`` and, when known, the history it ends. Looked
        for where pydantic-ai's store names entries from: the current state's head and
        branch tips, the histories this log read, then the conversation's own histories
        and those of the conversation it was forked from (read now). RevisionConflictError
        when none holds it, as a backend reports an entry a concurrent change released."""
        for attempt in range(2):
            link = known.get(entry_id)
            if link is not None:
                (node,) = await self.store.get_assets([link], EntryNode, "entry node")
                cached = self._histories.get(link)
                return node, cached.entries if cached is not None else None
            try:
                history, index = await self._find(entry_id)
            except EntryNotFoundError:
                if attempt:
                    break
                await self._read_around(current, update)
                continue
            if index == len(history.entries) - 1:  # its head: stored, no need to compute
                (node,) = await self.store.get_assets([history.head], EntryNode, "entry node")
                return node, history.entries
            return history.link(index), history.entries[:index + 1]
        raise RevisionConflictError(cid, f"conversation {cid!r}: entry {entry_id!r} is not in "
                                    "its history, a branch it left, or the history it was "
                                    "forked from")

    async def _read_around(self, current: ConversationState | None,
                           update: RecordUpdate) -> None:
        """Read the histories an entry a write names may be in (see ``_link_at``)."""
        states = [current] if current is not None else []
        if update.forked_from is not None:
            source = await self.record(update.forked_from)
            if source is not None:
                states.append(source)
        for state in states:
            for link in {state.head, *(link for _, link in state.branches)}:
                if link is not None:
                    await self.history(link)

    async def _fork_parent(self, forked_from: str | None) -> UUID | None:
        """The parent of a new conversation's first state: the newest state of the
        conversation it was forked from (so its lineage, and its bundle, continue there)."""
        if forked_from is None:
            return None
        source = await self.newest(forked_from)
        return None if source is None else source.id

    async def write_details(self, conversation_id: str, *, expected_revision: str,
                            title: Any = _UNSET, metadata: Any = _UNSET,
                            expected_title: Any = _UNSET,
                            expected_metadata: Any = _UNSET) -> ConversationState:
        """A new state with ``title`` and/or ``metadata`` replaced (None clears one), the
        revision and ``updated_at`` kept. RevisionConflictError, nothing written, unless
        the stored record has ``expected_revision`` and the expected title and metadata."""
        cid = check_conversation_id("conversation_id", conversation_id)
        revision = _check_id("expected_revision", expected_revision)
        changes: dict[str, Any] = {}
        if title is not _UNSET:
            changes["title"] = _check_title("title", title)
        if metadata is not _UNSET:
            changes["metadata"] = _check_metadata("metadata", metadata)
        for attempt in range(_MAX_ATTEMPTS):
            current = await self.record(cid)
            if current is None or current.revision != revision:
                raise RevisionConflictError(cid)
            if ((expected_title is not _UNSET and current.title != expected_title)
                    or (expected_metadata is not _UNSET
                        and current.metadata != expected_metadata)):
                raise RevisionConflictError(cid, f"conversation {cid!r} does not have the "
                                            "expected title or metadata; nothing was written")
            if not changes:
                return current
            row = _row(cid, current.id, tuple(link for link in
                                              (current.head, *(b for _, b in current.branches))
                                              if link is not None),
                       _body(current, **changes))
            try:
                await self.store.commit([], [row], heads=[Head(_KIND, cid, current.id)])
            except StaleStreamError:
                await _backoff(attempt)
                continue
            return ConversationState.from_row(row)
        raise RevisionConflictError(cid, f"conversation {cid!r} kept changing during the update")

    async def delete(self, conversation_id: str, *, expected_revision: str) -> ConversationState:
        """A deleted state (it pins nothing) after the record with ``expected_revision``,
        and its scope entry deleted, in one transaction; RevisionConflictError otherwise.
        Earlier states and their entries stay stored (``purge`` deletes them)."""
        cid = check_conversation_id("conversation_id", conversation_id)
        revision = _check_id("expected_revision", expected_revision)
        for attempt in range(_MAX_ATTEMPTS):
            current = await self.record(cid)
            if current is None or current.revision != revision:
                raise RevisionConflictError(cid)
            row = _row(cid, current.id, (), ConversationBody(deleted=True))
            try:
                await self.store.commit([], [row], replace=[scope_entry_id(cid)],
                                        heads=[Head(_KIND, cid, current.id)])
            except StaleStreamError:
                await _backoff(attempt)
                continue
            return ConversationState.from_row(row)
        raise RevisionConflictError(cid, f"conversation {cid!r} kept changing during the delete")

    async def purge(self, conversation_id: str, *, scope: Any = _UNSET) -> int:
        """Delete every stored state of the conversation and its scope entry (rows only;
        ``Store.gc()`` then reclaims the entries no other state reaches: a fork keeps the
        ones it shares). With ``scope``, only if the conversation was last saved with it
        (deleted or not). Returns how many rows were deleted."""
        cid = check_conversation_id("conversation_id", conversation_id)
        ids: list[UUID] = [scope_entry_id(cid)]
        newest: list[ConversationState] = []
        after: int | None = None
        while page := await self.store.stream_states(_KIND, cid, after_seq=after, limit=1000):
            ids.extend(r.id for r in page)
            newest.extend(s for s in map(ConversationState.from_row, page) if not s.deleted)
            after = page[-1].seq
        if scope is not _UNSET and (not newest or newest[0].scope != scope):
            return 0
        return await self.store.delete_states(ids)

    async def export(self, conversation_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the conversation: its newest state's lineage (which
        continues into the conversation it was forked from), its scope entry and every
        entry they reach (``immagent.verify_bundle`` checks it offline;
        ``Store.import_states`` loads it elsewhere with the same ids and digests)."""
        state = await self.newest(conversation_id)
        if state is None:
            raise ValidationError("conversation_id", f"conversation {conversation_id!r} has no "
                                  "stored state to export", conversation_id)
        lineage = await self.store.state_lineage(state.id)
        ids = [r.id for r in lineage]
        scope = scope_entry_id(state.conversation_id)
        if await self.store.get_states([scope]):
            ids.append(scope)
        return await self.store.export_states(ids, path)
