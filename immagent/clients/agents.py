"""The agent book: the agent client of the event log, and ``Store``, 0.1.2's facade.

``Store`` is the event log (``immagent.store.log.EventLog``) plus the agent API 0.1.2 put on
it: create, load, list, count, find, delete, append, clone, metadata changes, bundles of
one agent. An agent state is a state row of kind AGENT_STATE (``records.AgentRecord``); its
conversation is a chain of messages. The log never sees this module: ``Store`` extends it
(one object, as 0.1.2 programs expect) and the log knows nothing of agents.

Every agent object the book hands out is bound to it: ``PersistentAgent`` holds its store
in a slot (no global registry). While an agent object is alive, loading its id returns that
same object (one weak map of live objects, ``Store._agents``). 0.1.2's registry functions
(``immagent.registry``) read and set that slot.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from immagent.agent import PersistentAgent
from immagent.assets import (
    EMPTY_CONVERSATION,
    Asset,
    ConversationNode,
    Digest,
    Kind,
    Message,
    SystemPrompt,
    tools_of,
)
from immagent.audit.bundle import BundleInfo
from immagent.audit.diff import StateDiff
from immagent.audit.keys import SigningKey
from immagent.audit.verify import VerifyReport
from immagent.exceptions import AgentNotFoundError, AgentNotRegisteredError, ValidationError
from immagent.ids import uuid7
from immagent.records import AgentRecord, load_agent, load_state, state_digest
from immagent.rows import StoredAsset, stored
from immagent.store.backend import Backend
from immagent.store.log import MAX_PAGE, EventLog, check_limit, storable
from immagent.validate import (
    check_agent_fields,
    check_fan_out,
    check_json_mapping,
    check_sequence,
    check_text,
    check_uuid,
)

__all__ = ["Store", "bind", "store_of"]

log = logging.getLogger("immagent")

#: Page size of internal scans (find_by_name).
_PAGE = 1000


class Store(EventLog):
    """Persistent agents (and other clients' states) over PostgreSQL, SQLite or memory.
    Open with ``await Store.connect(dsn)``; use as ``async with``. Safe to share between
    tasks of one event loop."""

    def __init__(self, backend: Backend, *, name: str = "the store",
                 cache_entries: int = 20_000) -> None:
        """A store over an open backend (``Store.connect`` makes both); ``name`` is how
        messages refer to it (never with a password)."""
        super().__init__(backend, name=name, cache_entries=cache_entries)
        # While an agent object is alive, loading its id returns that same object.
        self._agents: weakref.WeakValueDictionary[UUID, PersistentAgent] = (
            weakref.WeakValueDictionary())

    def clear_cache(self) -> None:
        """Forget every cached asset and agent object (only useful to measure or to free
        memory); loading an id afterwards makes a new object."""
        super().clear_cache()
        self._agents.clear()

    def _forget(self, ids: Sequence[UUID]) -> None:
        """Deleted states: loading their ids must not return a live object for them."""
        for state_id in ids:
            self._agents.pop(state_id, None)

    async def _forget_gone(self) -> None:
        """After a retention run: live objects of states it deleted are dropped."""
        alive = list(self._agents.keys())
        if alive:
            kept = {r.id for r in await self._open().get_states(alive)}
            self._forget([i for i in alive if i not in kept])

    # -- the agent book ---------------------------------------------------------------------

    async def create_agent(
        self,
        name: str,
        system_prompt: str,
        model: str,
        model_config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PersistentAgent:
        """Create and save a new agent with an empty conversation."""
        # The rule imported records meet too (store.rules); config checked now, not at the
        # first advance.
        fields = check_agent_fields(name, model, model_config, metadata)
        prompt = SystemPrompt(text=check_text("system_prompt", system_prompt))
        record = _new_record(None, fields.name, fields.model, prompt.digest,
                             EMPTY_CONVERSATION.digest, fields.model_config, fields.metadata)
        await self.commit([prompt, EMPTY_CONVERSATION], [record.to_row()])
        log.info("created agent %s (%s)", record.id, fields.name)
        return self._bind(record)

    async def load_agent(self, agent_id: UUID | str) -> PersistentAgent:
        """The agent state with this id (the same object while one for it is alive here)."""
        (agent,) = await self.load_agents([agent_id])
        return agent

    async def load_agents(self, agent_ids: Sequence[UUID | str]) -> list[PersistentAgent]:
        """Several agent states in one query, in the order asked for."""
        if isinstance(agent_ids, str | bytes) or not isinstance(agent_ids, Sequence):
            raise ValidationError("agent_ids", "must be a sequence of UUIDs", agent_ids)
        ids = [check_uuid("agent_id", i) for i in agent_ids]
        wanted = [i for i in dict.fromkeys(ids) if i not in self._agents]
        by_id: dict[UUID, PersistentAgent] = {}
        for i in ids:
            alive = self._agents.get(i)
            if alive is not None:
                by_id[i] = alive
        for row in await self._open().get_states(wanted):
            if row.kind == Kind.AGENT_STATE:
                by_id[row.id] = self._bind(load_agent(row))
            else:  # another client's state, or a damaged kind column: verified all the same
                load_state(row)
        for i in ids:
            if i not in by_id:
                raise AgentNotFoundError(i)
        return [by_id[i] for i in ids]

    async def list_agents(self, limit: int = 100, offset: int = 0, name: str | None = None,
                          ) -> list[PersistentAgent]:
        """Agent states, newest first, a page at a time (as in 0.1.2); ``name`` keeps those
        whose name contains it, case-insensitively (``%``, ``_`` and ``\\`` are plain
        characters). For stable paging under concurrent writes use ``scan_states``."""
        check_limit(limit)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**62:
            raise ValidationError("offset", f"must be an int >= 0, got {offset!r}", offset)
        contains = None if name is None else check_text("name", name)
        found: list[PersistentAgent] = []
        after: UUID | None = None
        skip = offset
        while len(found) < limit:
            want = min(MAX_PAGE, skip + limit - len(found))
            page = await self._scan(Kind.AGENT_STATE, after, want, True, contains)
            found.extend(self._bind(load_agent(row)) for row in page[skip:])
            skip = max(0, skip - len(page))
            if len(page) < want:
                break
            after = page[-1].id
        return found[:limit]

    async def count_agents(self, name: str | None = None) -> int:
        """How many agent states are stored (with ``name``: whose name contains it,
        case-insensitively, as ``list_agents`` filters)."""
        contains = None if name is None else check_text("name", name)
        return await self.count_states(Kind.AGENT_STATE, contains=contains)

    async def find_by_name(self, name: str) -> list[PersistentAgent]:
        """Every agent state with exactly this name, newest first (as in 0.1.2)."""
        name = check_text("name", name)
        found: list[PersistentAgent] = []
        after: int | None = None
        while True:
            page = await self._open().stream_states(Kind.AGENT_STATE, name, after_seq=after,
                                                    limit=_PAGE)
            found.extend(self._bind(load_agent(r)) for r in page)
            if len(page) < _PAGE:
                return found
            after = page[-1].seq

    async def newest_by_name(self, name: str) -> PersistentAgent | None:
        """The newest stored state with exactly this name, or None (one index probe)."""
        name = check_text("name", name)
        page = await self._open().stream_states(Kind.AGENT_STATE, name, limit=1)
        return self._bind(load_agent(page[0])) if page else None

    async def delete(self, agent: PersistentAgent | UUID | str) -> None:
        """Delete one agent state. Its assets stay until gc(); other states are untouched
        (a child's parent_id then names a deleted state and lineage walks stop there)."""
        agent_id = self._agent_id(agent)
        if await self.delete_states([agent_id]) == 0:
            raise AgentNotFoundError(agent_id)
        log.info("deleted agent %s", agent_id)

    async def delete_lineage(self, agent: PersistentAgent | UUID | str, *,
                             dry_run: bool = False) -> list[UUID]:
        """Delete ``agent`` and then each ancestor that no other live state descends from.

        A state is *live* while its row exists. The walk stops at the first ancestor that
        has another child row (or is already gone). Children of a deleted state keep their
        ``parent_id``; their lineage walks stop there. Assets stay until gc(). Returns the
        deleted ids, ``agent`` first, in one transaction. With ``dry_run`` that transaction
        is rolled back: the ids it would delete, nothing deleted.
        """
        agent_id = self._agent_id(agent)
        deleted = await self.delete_state_lineage(agent_id, dry_run=dry_run)
        if not deleted:
            raise AgentNotFoundError(agent_id)
        if not dry_run:
            log.info("deleted lineage of %s: %d states", agent_id, len(deleted))
        return deleted

    # -- per-agent operations (PersistentAgent's methods delegate here) --------------------

    async def get_messages(self, agent: PersistentAgent) -> tuple[Message, ...]:
        """All messages of ``agent``'s conversation, oldest first."""
        messages = await self.get_chain(_record(agent).conversation, Kind.NODE)
        return messages  # type: ignore[return-value]  # a NODE chain holds messages

    async def message_counts(self, agents: Sequence[PersistentAgent]) -> list[int]:
        """How many messages each agent's conversation holds, read from the head nodes
        alone (one batched fetch, no history)."""
        records = [_record(a, f"agents[{i}]")
                   for i, a in enumerate(check_sequence("agents", agents))]
        nodes = await self.read_nodes([r.conversation for r in records])
        return [n.length for n, _ in nodes]

    async def get_system_prompt(self, agent: PersistentAgent) -> str:
        """The system prompt text of ``agent``."""
        (prompt,) = await self.get_assets([_record(agent).system_prompt], SystemPrompt,
                                          "system prompt")
        return prompt.text

    async def ancestors(self, agent: PersistentAgent | UUID | str,
                        limit: int | None = None) -> list[PersistentAgent]:
        """``agent`` and its stored ancestors, **newest first**, at most ``limit`` (what
        ``immagent log`` walks); stops at a deleted parent."""
        agent_id = self._agent_id(agent)
        rows = await self._line(agent_id, limit)
        if not rows:
            raise AgentNotFoundError(agent_id)
        return [self._bind(load_agent(r)) for r in rows]

    async def get_lineage(self, agent: PersistentAgent) -> list[PersistentAgent]:
        """``agent``'s stored lineage **root first, ``agent`` last** (0.1.2's order); it
        starts at the oldest ancestor still stored."""
        return (await self.ancestors(agent))[::-1]

    async def clone(self, agent: PersistentAgent) -> PersistentAgent:
        """A sibling of ``agent``: same content (same digest), a new id and the *same*
        parent, for exploring another branch from the same point (as in 0.1.2). Writes one
        state row and no assets."""
        r = _record(agent)
        return await self._derive(r, r.parent_id, r.conversation, r.metadata)

    async def with_metadata(self, agent: PersistentAgent,
                            metadata: Mapping[str, Any]) -> PersistentAgent:
        """A new state of ``agent`` (its child) with ``metadata`` replacing the old one."""
        r = _record(agent)
        return await self._derive(r, r.id, r.conversation,
                                  check_json_mapping("metadata", metadata))

    async def append(self, agent: PersistentAgent, messages: Sequence[Message], *,
                     history: tuple[Message, ...] | None = None) -> PersistentAgent:
        """Save a new state of ``agent`` (its child) whose conversation adds ``messages``.

        Writes only the new messages, one conversation node and one state row, in one
        transaction: the store-only half of ``PersistentAgent.advance`` (also used by
        imports and benchmarks). The new state's history is cached as one more segment of
        its parent's, without another read. ``history`` is accepted for callers of the
        earlier signature and ignored: only verified chains are cached.
        """
        del history  # never trusted: a wrong one must not reach the cache
        record = _record(agent)
        if isinstance(messages, Sequence):  # the node lists its parent and every message
            check_fan_out("messages", len(messages), "messages", base=1)
        rows = _checked_messages(messages)
        added: list[Message] = list(messages)
        (parent,) = await self.get_assets([record.conversation], ConversationNode,
                                          "conversation node")
        node = parent.extend(added)
        new = await self._derive(record, record.id, node.digest, record.metadata,
                                 rows=[*rows, stored(node)], decoded=[*added, node])
        # The write cached the node as one more segment of its parent's run (O(added)); no
        # flat copy of the history is made (one per step cost O(the lineage's length)).
        return new

    async def _derive(self, r: AgentRecord, parent_id: UUID | None, conversation: Digest,
                      metadata: dict[str, Any], rows: Sequence[StoredAsset] = (),
                      decoded: Sequence[Asset] = ()) -> PersistentAgent:
        record = _new_record(parent_id, r.name, r.model, r.system_prompt, conversation,
                             r.model_config, metadata)
        await self._write(rows, [record.to_row()], decoded)
        return self._bind(record)

    def _bind(self, record: AgentRecord) -> PersistentAgent:
        alive = self._agents.get(record.id)
        if alive is not None and alive.record == record:
            return alive
        agent = PersistentAgent(record, self)
        self._agents[record.id] = agent
        return agent

    def _agent_id(self, agent: PersistentAgent | UUID | str) -> UUID:
        """The id of an agent given as a state or as its id (the field is named "agent")."""
        if isinstance(agent, UUID | str):
            return check_uuid("agent", agent)
        return _record(agent).id

    # -- audits of one agent, bundles -------------------------------------------------------

    async def verify(self, agent: PersistentAgent | UUID | str | None = None, *,
                     progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-hash the stored bytes of every asset and state (or those ``agent`` reaches),
        resolve every reference; never raises on a problem found, it lists it.
        ``progress`` gets the number of assets checked so far."""
        agent_id = None if agent is None else self._agent_id(agent)
        return await super().verify(agent_id, progress=progress)

    async def prove(self, state: PersistentAgent | UUID | str, *,
                    element: int | Digest, ref: int | None = None,
                    include_body: bool = True, attested: bool = True) -> bytes:
        """``EventLog.prove`` of an agent given as a state or as its id."""
        return await super().prove(self._agent_id(state), element=element, ref=ref,
                                   include_body=include_body, attested=attested)

    async def export(self, agent: PersistentAgent | UUID | str,
                     path: str | os.PathLike[str], *,
                     sign: Sequence[SigningKey] = ()) -> BundleInfo:
        """Write an audit bundle of ``agent`` (its lineage, the attestations about them and
        every asset they reach) to ``path``, atomically, signed by each key of ``sign``;
        verify it anywhere with ``immagent.verify_bundle``."""
        agent_id = self._agent_id(agent)
        info = await self.export_lineage(agent_id, path, sign=sign)
        if info is None:
            raise AgentNotFoundError(agent_id)
        return info

    async def diff(self, left: PersistentAgent | UUID | str,
                   right: PersistentAgent | UUID | str) -> StateDiff:
        """What separates two states (agents, or any client's states of one kind): their
        newest common ancestor, what each side added, what changed in prompt, model,
        model config and metadata (``EventLog.diff``)."""
        return await super().diff(_state_id(left, "left"), _state_id(right, "right"))

    async def import_bundle(self, path: str | os.PathLike[str]) -> PersistentAgent:
        """Verify a bundle, then load it in one transaction (idempotent: present rows are
        skipped); returns its head state with the same id and digest as where it came from."""
        info = await self.import_states(path)
        return await self.load_agent(info.head)


# -- the binding of agents to their store (0.1.2's registry) ---------------------------------


def bind(agent: PersistentAgent, store: Store) -> PersistentAgent:
    """Bind ``agent`` to ``store`` (its methods then read and write there) and return it."""
    if not isinstance(agent, PersistentAgent):
        raise ValidationError("agent", f"must be a PersistentAgent, got "
                              f"{type(agent).__name__}", None)
    if not isinstance(store, Store):
        raise ValidationError("store", f"must be a Store, got {type(store).__name__}", None)
    object.__setattr__(agent, "_store", store)
    return agent


def store_of(agent: PersistentAgent) -> Store:
    """The store ``agent`` is bound to; AgentNotRegisteredError when there is none."""
    store = getattr(agent, "_store", None)
    if not isinstance(store, Store):
        raise AgentNotRegisteredError(
            f"agent {getattr(agent, 'id', agent)} is not bound to a Store; load it with "
            "store.load_agent()")
    return store


def _state_id(state: object, field: str) -> UUID:
    """The id of a state given as an agent or as its id (ValidationError naming ``field``)."""
    if isinstance(state, UUID | str):
        return check_uuid(field, state)
    return _record(state, field).id


def _record(agent: object, field: str = "agent") -> AgentRecord:
    """The record of a PersistentAgent passed where one is required (ValidationError
    naming ``field`` otherwise)."""
    record = getattr(agent, "record", None)
    if not isinstance(record, AgentRecord):
        raise ValidationError(field, f"must be a PersistentAgent, got "
                              f"{type(agent).__name__}", None)
    return record


def _new_record(parent_id: UUID | None, name: str, model: str, system_prompt: Digest,
                conversation: Digest, model_config: dict[str, Any],
                metadata: dict[str, Any]) -> AgentRecord:
    return AgentRecord(
        id=uuid7(), parent_id=parent_id, created_at=datetime.now(UTC), name=name,
        model=model, system_prompt=system_prompt, conversation=conversation,
        model_config=model_config, metadata=metadata,
        digest=state_digest(name, model, system_prompt, conversation, model_config, metadata),
    )


def _checked_messages(messages: object) -> list[StoredAsset]:
    """The rows of a step's messages: a non-empty sequence of Message, each storable."""
    if isinstance(messages, Message) or not isinstance(messages, Sequence) or not messages:
        raise ValidationError("messages", "a step adds a non-empty sequence of Message",
                              None)
    rows = []
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise ValidationError(f"messages[{i}]", f"must be a Message, got "
                                  f"{type(m).__name__}", m)
        rows.append(storable(f"messages[{i}]", m))
        # The tool schemas its call was offered travel with it (a model call attaches
        # them); without them the store must already hold them (AssetNotFoundError).
        offered = tools_of(m)
        if offered is not None:
            rows.append(storable(f"messages[{i}].tools", offered))
    return rows
