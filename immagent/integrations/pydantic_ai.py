"""A pydantic-ai ``ConversationStore`` kept in immagent's store: every save a state, verifiable.

``ImmAgentConversationStore`` implements pydantic-ai's ``ConversationStore`` storage
primitives (``read_record``, ``read_records``, ``write_record``, ``write_details``,
``delete_record``, ``read_entry``, and ``read_history`` in one chain read); the ABC does
the rest (``load``, ``save``, ``branch``, ``fork``, ``update``, ``delete``,
``list_conversations``). Use it wherever pydantic-ai takes a conversation store::

    store = ImmAgentConversationStore("chat.db")
    conversation = await store.load(cid) or Conversation(conversation_id=cid)
    result = await agent.run("Hello", conversation=conversation)
    await store.save(result)

What differs from pydantic-ai's own stores: nothing is overwritten. Every save, branch,
title update and delete is a new immutable state of the conversation
(``immagent.clients.conversations``): each entry is a content-addressed asset stored once, a
history is a hash chain of them, so branches and forks share every entry before their
fork point; a state's digest pins the whole conversation, ``Store.verify()`` checks it
like everything else, and ``export`` writes an audit bundle. Past states stay listable
(``list_states``) and loadable (``load_state``); ``delete`` writes a deleted state and
keeps the entries (``purge`` deletes the conversation's rows, then ``Store.gc()``
reclaims what no other conversation holds).

pydantic-ai's revision is checked against the newest state and the write commits only if
that state is still the newest (``Store.commit``'s ``heads``), so of two writers that
loaded the same revision exactly one saves; the other gets ``ConversationConflict``.

Messages, usage and deferred tool requests are stored as pydantic-ai serializes them
(``ModelMessagesTypeAdapter``'s JSON), so they load back equal. Title and metadata must
be JSON values (ValidationError otherwise, nothing written).

Event loops: as ``ImmAgentSession`` (``immagent.store.hosting``): given a DSN the
store owns a private loop in a daemon thread, opened on first use and closed by
``close()``; given an open ``Store`` (any ``EventLog``) it runs on that store's loop, and
calls from other loops (``Agent.run_sync``, ``asyncio.run``) are handed over to it.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from uuid import UUID

from immagent.exceptions import ExtraNotInstalledError

try:
    from pydantic import TypeAdapter
    from pydantic import ValidationError as PydanticValidationError
    from pydantic_ai.conversation import Conversation
    from pydantic_ai.conversation_store import (
        ConversationConflict,
        ConversationDetails,
        ConversationEntry,
        ConversationRecord,
        ConversationStore,
    )
    from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter
    from pydantic_ai.tools import DeferredToolRequests
    from pydantic_ai.usage import RunUsage
except ImportError as e:  # the extra is not installed
    raise ExtraNotInstalledError("immagent.integrations.pydantic_ai", "pydantic-ai",
                                 cause=e) from e

from immagent.assets import Entry
from immagent.audit.bundle import BundleInfo
from immagent.clients.conversations import (
    ConversationLog,
    ConversationState,
    NewEntry,
    RecordUpdate,
    RevisionConflictError,
    check_conversation_id,
)
from immagent.exceptions import ImmAgentError, IntegrityError, StoreClosedError, ValidationError
from immagent.store import dsn as dsns
from immagent.store.hosting import Host, OwnedHost, SharedHost
from immagent.store.log import EventLog

__all__ = ["ConversationState", "ImmAgentConversationConflict", "ImmAgentConversationStore"]

T = TypeVar("T")
_WHAT = "the conversation store"
_USAGE: TypeAdapter[RunUsage] = TypeAdapter(RunUsage)
_DEFERRED: TypeAdapter[DeferredToolRequests] = TypeAdapter(DeferredToolRequests)
_KNOWN_DETAILS = frozenset({"title", "metadata"})


class ImmAgentConversationConflict(ConversationConflict, ImmAgentError):
    """pydantic-ai's ``ConversationConflict`` (the conversation changed since it was read),
    raised by immagent: ``except ConversationConflict`` and ``except ImmAgentError`` both
    catch it."""


def _dump_message(message: ModelMessage) -> bytes:
    """A message as pydantic-ai serializes it (one element of a history's JSON array)."""
    return ModelMessagesTypeAdapter.dump_json([message])[1:-1]


def _load_messages(entries: Sequence[Entry]) -> list[ModelMessage]:
    """Fresh message objects of ``entries``, parsed in one call."""
    if not entries:
        return []
    try:
        return ModelMessagesTypeAdapter.validate_json(
            b"[" + b",".join(e.message for e in entries) + b"]")
    except PydanticValidationError as e:
        raise IntegrityError(f"a stored message cannot be read as a pydantic-ai message: "
                             f"{e.errors()[0].get('msg', e)}") from None


def _dump_usage(usage: RunUsage) -> bytes:
    data = _USAGE.dump_json(usage, exclude_defaults=True)
    return b"" if data == b"{}" else data


def _load_usage(data: bytes) -> RunUsage:
    return _USAGE.validate_json(data) if data else RunUsage()


def _record(state: ConversationState) -> ConversationRecord:
    """pydantic-ai's record of a (live) conversation state."""
    assert state.revision is not None  # only deleted states have none
    try:
        usage = _load_usage(state.usage)
        deferred = None if state.deferred is None else _DEFERRED.validate_json(state.deferred)
    except PydanticValidationError as e:
        raise IntegrityError(f"conversation state {state.id}: its usage or deferred tool "
                             f"requests cannot be read: {e.errors()[0].get('msg', e)}") from None
    return ConversationRecord(
        conversation_id=state.conversation_id, head_id=state.head_id, usage=usage,
        deferred_tool_requests=deferred, scope=state.scope, forked_from=state.forked_from,
        forked_at=state.forked_at, title=state.title, metadata=state.metadata,
        branches=[entry_id for entry_id, _ in state.branches], revision=state.revision,
        updated_at=state.updated_at)


def _entries(history: Sequence[Entry], start: int) -> list[ConversationEntry]:
    """pydantic-ai's entries of ``history[start:]`` (each pointing at the one before)."""
    wanted = history[start:]
    if not wanted:
        return []
    ids = [e.entry_id for e in wanted]
    parents = [history[start - 1].entry_id if start else None, *ids[:-1]]
    return [ConversationEntry(id=entry_id, parent_id=parent, message=message)
            for entry_id, parent, message in zip(ids, parents, _load_messages(wanted),
                                                 strict=True)]


class ImmAgentConversationStore(ConversationStore):
    """A pydantic-ai conversation store whose every change is kept, content-addressed, in
    an immagent store (SQLite, PostgreSQL or memory). Safe to use from many tasks and
    from several threads (each with its own event loop) at once."""

    def __init__(self, db: str | os.PathLike[str] | EventLog = "memory://") -> None:
        """The conversations in ``db``: a DSN (``sqlite:///path.db``, a bare ``*.db`` path,
        ``postgresql://…``; opened, with its schema, on first use and closed by
        ``close()``), or an open, initialised ``Store`` or ``EventLog`` (shared; not closed
        here). The default is a throwaway in-memory store, as ``InMemoryConversationStore``."""
        host: Host
        if isinstance(db, EventLog):
            if db.closed:
                raise ValidationError("db", "the store is closed", None)
            host = SharedHost(db, _WHAT)
        else:
            host = OwnedHost(dsns.parse(db).dsn, _WHAT)  # a bad DSN fails here
        self._host = host
        self._log: ConversationLog | None = None
        self._closed = False
        # A store dropped without close() still releases its host (and thread).
        self._finalizer = weakref.finalize(self, host.release)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'closed' if self._closed else 'open'})"

    async def _run(self, work: Callable[[ConversationLog], Awaitable[T]], *,
                   write: bool = False) -> T:
        if self._closed:
            raise StoreClosedError(f"{_WHAT} is closed")

        async def on_store(store: EventLog) -> T:
            # Runs on the store's loop only, so the log needs no lock of its own.
            if self._log is None:
                self._log = ConversationLog(store)
            return await work(self._log)

        try:
            return await self._host.run(on_store, write=write)
        except RevisionConflictError as e:
            raise ImmAgentConversationConflict(e.conversation_id, message=str(e)) from None

    # -- the storage primitives of pydantic-ai's ConversationStore -----------------------

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation's current record (its newest state), None if it was never
        saved or is deleted: one index probe."""
        check_conversation_id("conversation_id", conversation_id)
        state = await self._run(lambda log: log.record(conversation_id))
        return None if state is None else _record(state)

    async def read_records(self, *, scope: str | None = None,
                           limit: int | None = None) -> list[ConversationRecord]:
        """The current records of the conversations saved with ``scope`` (None: all),
        most recently updated first, at most ``limit``."""
        states = await self._run(lambda log: log.records(scope, limit))
        return [_record(s) for s in states]

    async def write_record(self, record: ConversationRecord, *,
                           new_entries: Sequence[ConversationEntry] = (),
                           expected_revision: str | None) -> None:
        """A new state of the conversation holding ``record`` and the entries its history
        adds, in one transaction, if the stored revision is ``expected_revision`` (None:
        the conversation must not exist); the stored title and metadata are kept.
        ``ConversationConflict`` otherwise, or if ``record.head_id`` names an entry no
        longer stored; nothing is written then."""
        if not isinstance(record, ConversationRecord):
            raise ValidationError("record", f"must be a ConversationRecord, got "
                                  f"{type(record).__name__}", None)
        entries = []
        for i, entry in enumerate(new_entries):
            if not isinstance(entry, ConversationEntry) or entry.kind != "message":
                raise ValidationError(f"new_entries[{i}]", "must be a ConversationEntry "
                                      "holding a message", None)
            entries.append(NewEntry(entry.id, entry.parent_id, _dump_message(entry.message)))
        update = RecordUpdate(
            head_id=record.head_id, revision=record.revision, updated_at=record.updated_at,
            usage=_dump_usage(record.usage),
            deferred=None if record.deferred_tool_requests is None
            else _DEFERRED.dump_json(record.deferred_tool_requests),
            scope=record.scope, forked_from=record.forked_from, forked_at=record.forked_at,
            branches=tuple(record.branches), title=record.title, metadata=record.metadata)
        await self._run(lambda log: log.write(record.conversation_id, update, entries,
                                              expected_revision=expected_revision), write=True)

    async def write_details(self, conversation_id: str, details: ConversationDetails, *,
                            expected_revision: str,
                            expected: ConversationDetails | None = None) -> ConversationRecord:
        """A new state with the title and/or metadata in ``details`` replaced, revision
        and ``updated_at`` kept, if the stored record has ``expected_revision`` and the
        values in ``expected``; ``ConversationConflict`` otherwise (nothing written)."""
        wanted = dict(details)
        checks = dict(expected or {})
        unknown = (set(wanted) | set(checks)) - _KNOWN_DETAILS
        if unknown:
            raise NotImplementedError(f"{type(self).__name__} stores only a conversation's "
                                      f"title and metadata, not {sorted(unknown)}")
        expects = {f"expected_{k}": v for k, v in checks.items()}
        state = await self._run(lambda log: log.write_details(
            conversation_id, expected_revision=expected_revision, **wanted, **expects),
            write=True)
        return _record(state)

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """A deleted state after the record with ``expected_revision`` (it no longer loads
        or lists); ``ConversationConflict`` otherwise. Its entries stay stored, with every
        earlier state: ``purge`` deletes them."""
        await self._run(lambda log: log.delete(conversation_id,
                                               expected_revision=expected_revision), write=True)

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry ``entry_id`` of a history this store object has read (pydantic-ai
        reads a conversation before naming its entries); a LookupError
        (``EntryNotFoundError``) for any other."""

        async def read(log: ConversationLog) -> ConversationEntry:
            history, index = await log.locate(entry_id)
            return _entries(history[:index + 1], index)[0]

        return await self._run(read)

    async def read_history(self, head_id: str | None, *,
                           limit: int | None = None) -> list[ConversationEntry]:
        """The entries from the first one up to ``head_id``, in order, or only the last
        ``limit`` of them: one verified chain read (cache first)."""
        if head_id is None:
            return []
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise ValidationError("limit", f"must be an int >= 0 or None, got {limit!r}", limit)

        async def read(log: ConversationLog) -> list[ConversationEntry]:
            history, index = await log.locate(head_id)
            kept = history[:index + 1]
            return _entries(kept, 0 if limit is None else max(0, len(kept) - limit))

        return await self._run(read)

    # -- immutable history and audits ----------------------------------------------------

    async def list_states(self, conversation_id: str, limit: int = 100, *,
                          after_seq: int | None = None,
                          newest_first: bool = True) -> list[ConversationState]:
        """The conversation's stored states (every save, branch, update and delete) in
        log order, newest first by default, a page at a time (pass the last one's ``seq``
        as ``after_seq``)."""
        return await self._run(lambda log: log.states(conversation_id, limit=limit,
                                                      after_seq=after_seq,
                                                      newest_first=newest_first))

    async def load_state(self, state: ConversationState | UUID | str) -> Conversation:
        """The conversation as a stored state holds it (messages, usage, deferred tool
        requests and that state's revision: saving it is a ``ConversationConflict`` once
        the conversation has moved on, so branch or fork to continue from it).
        ValidationError for a deleted state or an id that is not a conversation state."""
        wanted = state.id if isinstance(state, ConversationState) else state

        async def read(log: ConversationLog) -> tuple[ConversationState, list[Entry]]:
            found = await log.load_state(wanted)
            return found, list(await log.history(found.head))

        found, history = await self._run(read)
        if found.deleted:
            raise ValidationError("state", f"state {found.id} is a deleted conversation's",
                                  found.id)
        record = _record(found)
        return Conversation(messages=_load_messages(history), usage=record.usage,
                            conversation_id=record.conversation_id,
                            deferred_tool_requests=record.deferred_tool_requests,
                            revision=record.revision)

    async def export(self, conversation_id: str, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the conversation (its states' lineage, its scope entry
        and every entry they reach); ``immagent.verify_bundle`` checks it offline and
        ``Store.import_states`` loads it elsewhere with the same ids and digests."""
        return await self._run(lambda log: log.export(conversation_id, path))

    async def purge(self, conversation_id: str, *, scope: str | None = None) -> int:
        """Delete every stored state of the conversation (rows only; ``Store.gc()`` then
        reclaims the entries no other conversation holds). With ``scope``, a conversation
        last saved with another scope (deleted or not) is left as it is (0). Returns the
        rows deleted."""

        async def purge(log: ConversationLog) -> int:
            if scope is None:
                return await log.purge(conversation_id)
            return await log.purge(conversation_id, scope=scope)

        return await self._run(purge, write=True)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the store (idempotent); a store opened from a DSN closes here, after the
        calls in flight."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> ImmAgentConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ImmAgentConversationStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
