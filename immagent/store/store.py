"""Store: the one place that knows both the cache and the backend.

Reads go cache first, then one chain query plus one batched body fetch; every body read
from the database is re-hashed before it is trusted. Writes validate first, build every
asset in memory, then hand the backend one batch (one transaction).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec

from immagent import registry
from immagent.agent import PersistentAgent
from immagent.assets import (
    EMPTY_CONVERSATION,
    AgentRecord,
    Asset,
    ConversationNode,
    Digest,
    Kind,
    Message,
    SystemPrompt,
    decode_asset,
    digest_of,
    state_digest,
)
from immagent.cache import AssetCache
from immagent.exceptions import (
    AgentNotFoundError,
    AssetNotFoundError,
    IntegrityError,
    MessageNotFoundError,
    StoreClosedError,
    ValidationError,
)
from immagent.ids import uuid7
from immagent.llm import DEFAULT_RETRY_DELAY, check_config
from immagent.stats import StoreStats
from immagent.store.backend import Backend, GCResult, StoredAsset, stored
from immagent.turn import run_turn
from immagent.validate import MAX_NAME_CHARS, check_json_mapping, check_text, check_uuid

if TYPE_CHECKING:
    from immagent.advance import ToolProvider
    from immagent.bundle import BundleInfo
    from immagent.verify import VerifyReport

__all__ = ["Store"]

log = logging.getLogger("immagent")


class Store:
    """Persistent agents over PostgreSQL or SQLite. Open with ``await Store.connect(dsn)``;
    use as ``async with``. Safe to share between tasks of one event loop."""

    def __init__(self, backend: Backend, *, description: str = "") -> None:
        self._backend = backend
        self._cache = AssetCache()
        self._closed = False
        self.description = description

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        dsn: str | os.PathLike[str],
        *,
        min_size: int = 2,
        max_size: int = 10,
        max_inactive_connection_lifetime: float = 300.0,
    ) -> Store:
        """Open a store: ``postgresql://…`` for PostgreSQL, ``sqlite:///path.db`` (or a bare
        path ending in ``.db``) for the embedded SQLite backend."""
        if isinstance(dsn, os.PathLike):
            dsn = os.fspath(dsn)
        if not isinstance(dsn, str) or not dsn.strip():
            raise ValidationError("dsn", "must be a non-empty str", dsn)
        if not (isinstance(min_size, int) and isinstance(max_size, int)
                and 0 <= min_size <= max_size and max_size >= 1):
            raise ValidationError(
                "max_size", f"need 0 <= min_size <= max_size, max_size >= 1 "
                f"(got min_size={min_size!r}, max_size={max_size!r})", max_size)
        if dsn.startswith(("postgresql://", "postgres://")) or "dbname=" in dsn:
            from immagent.store.postgres import PostgresBackend, safe_dsn

            backend: Backend = await PostgresBackend.open(
                dsn, min_size=min_size, max_size=max_size,
                max_inactive_connection_lifetime=max_inactive_connection_lifetime,
            )
            return cls(backend, description=safe_dsn(dsn))
        path = _sqlite_path(dsn)
        if path is not None:
            from immagent.store.sqlite import SQLiteBackend

            # SQLite has one writer; max_size bounds the reader connections.
            backend = await SQLiteBackend.open(path, readers=max(1, min(max_size, 64)))
            return cls(backend, description=f"sqlite:///{path}")
        # Only the scheme is shown: the rest of an unsupported URL may hold a password.
        scheme = dsn.split("://", 1)[0] + "://" if "://" in dsn else "a plain path"
        raise ValidationError(
            "dsn", f"unsupported DSN ({scheme}): use postgresql://… (no +driver suffix) "
            "or sqlite:///path.db", None
        )

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    async def close(self) -> None:
        """Close the connection pool; idempotent."""
        if not self._closed:
            self._closed = True
            await self._backend.close()

    async def ping(self) -> bool:
        """True when the database answers."""
        return not self._closed and await self._backend.ping()

    async def init_schema(self) -> None:
        """Create immagent's tables if missing (idempotent; refuses unknown versions)."""
        await self._open().init_schema()

    async def check_schema(self) -> None:
        """Raise SchemaMissingError (no tables yet) or SchemaVersionError (unknown version)
        unless the database holds this immagent's schema; never changes the database."""
        await self._open().check_schema()

    def clear_cache(self) -> None:
        """Forget every cached asset (only useful to measure or to free memory)."""
        self._cache.clear()

    def _open(self) -> Backend:
        if self._closed:
            raise StoreClosedError("the store is closed")
        return self._backend

    # -- agents ---------------------------------------------------------------------------

    async def create_agent(
        self,
        name: str,
        system_prompt: str,
        model: str,
        model_config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PersistentAgent:
        """Create and save a new agent with an empty conversation."""
        backend = self._open()
        name = check_text("name", name, max_bytes=MAX_NAME_CHARS)
        prompt = SystemPrompt(text=check_text("system_prompt", system_prompt))
        model = check_text("model", model, max_bytes=MAX_NAME_CHARS)
        config = check_config(model_config, "model_config")  # not at the first advance
        meta = check_json_mapping("metadata", metadata)
        record = _new_record(None, name, model, prompt.digest, EMPTY_CONVERSATION.digest,
                             config, meta)
        await backend.write([stored(prompt), stored(EMPTY_CONVERSATION)], [record])
        self._cache.put(prompt)
        log.info("created agent %s (%s)", record.id, name)
        return self._bind(record)

    async def load_agent(self, agent_id: UUID | str) -> PersistentAgent:
        """The agent state with this id; AgentNotFoundError if there is none."""
        agent_id = check_uuid("agent_id", agent_id)
        records = await self._open().get_agents([agent_id])
        if not records:
            raise AgentNotFoundError(agent_id)
        return self._bind(records[0])

    async def load_agents(self, agent_ids: Sequence[UUID | str]) -> list[PersistentAgent]:
        """Several agent states in one query, in the order asked; any missing id raises."""
        ids = [check_uuid("agent_ids", i) for i in agent_ids]
        by_id = {r.id: r for r in await self._open().get_agents(ids)}
        for i in ids:
            if i not in by_id:
                raise AgentNotFoundError(i)
        return [self._bind(by_id[i]) for i in ids]

    async def list_agents(self, limit: int = 100, offset: int = 0, name: str | None = None,
                          *, newest_first: bool = False) -> list[PersistentAgent]:
        """Agent states in creation order (oldest first unless ``newest_first``), a page at
        a time, optionally of one name."""
        _check_page(limit, offset)
        if name is not None:
            name = check_text("name", name)
        records = await self._open().list_agents(limit, offset, name, bool(newest_first))
        return [self._bind(r) for r in records]

    async def count_agents(self, name: str | None = None) -> int:
        """How many agent states are stored (optionally with this exact name)."""
        if name is not None:
            name = check_text("name", name)
        return await self._open().count_agents(name)

    async def find_by_name(self, name: str) -> list[PersistentAgent]:
        """Every agent state with exactly this name, oldest first."""
        name = check_text("name", name)
        backend = self._open()
        found: list[PersistentAgent] = []
        page = 1000
        while True:
            batch = await backend.list_agents(page, len(found), name)
            found.extend(self._bind(r) for r in batch)
            if len(batch) < page:
                return found

    async def delete(self, agent: PersistentAgent | UUID | str) -> None:
        """Delete one agent state. Its assets stay until gc(); other states are untouched
        (a child's parent_id then names a deleted state and lineage walks stop there)."""
        agent_id = _agent_id(agent)
        if await self._open().delete_agents([agent_id]) == 0:
            raise AgentNotFoundError(agent_id)
        log.info("deleted agent %s", agent_id)

    async def gc(self) -> GCResult:
        """Remove every asset that no stored agent state can reach; safe while other tasks
        or processes write (see docs/architecture.md)."""
        result = await self._open().gc()
        log.info("gc removed %d assets (%d bytes)", result.assets_removed, result.bytes_freed)
        return result

    async def stats(self, page_size: int = 1000) -> StoreStats:
        """Sizes of what is stored and of what a copy-per-state layout would store.

        Reads every agent row once (paged) and each distinct head node and prompt once.
        """
        _check_page(page_size, 0)
        backend = self._open()
        by_kind = await backend.asset_stats()
        logical = 0
        offset = 0
        while batch := await backend.list_agents(page_size, offset, None):
            offset += len(batch)
            digests = {d for r in batch for d in (r.system_prompt, r.conversation)}
            sizes: dict[Digest, int] = {}
            for asset in await self._assets(sorted(digests), "asset"):
                sizes[asset.digest] = (asset.size if isinstance(asset, ConversationNode)
                                       else len(asset.body))
            logical += sum(sizes[r.system_prompt] + sizes[r.conversation] for r in batch)
        return StoreStats(
            agents=offset,
            assets_by_kind={Kind(k).name.lower(): v for k, v in sorted(by_kind.items())},
            payload_bytes=sum(b for _, b in by_kind.values()),
            disk_bytes=await backend.storage_bytes(),
            logical_bytes=logical,
        )

    # -- audit: verify, export, import, lineage deletion ---------------------------------

    async def delete_lineage(self, agent: PersistentAgent | UUID | str) -> list[UUID]:
        """Delete ``agent`` and then each ancestor that no other live state descends from.

        A state is *live* while its agent row exists. The walk stops at the first ancestor
        that has another child row (or is already gone). Children of a deleted state keep
        their ``parent_id``; their lineage walks stop there. Assets stay until gc().
        Returns the deleted ids, ``agent`` first, in one transaction.
        """
        agent_id = _agent_id(agent)
        deleted = await self._open().delete_lineage(agent_id)
        if not deleted:
            raise AgentNotFoundError(agent_id)
        log.info("deleted lineage of %s: %d states", agent_id, len(deleted))
        return deleted

    async def verify(self, agent: PersistentAgent | UUID | str | None = None, *,
                     progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-hash the stored bytes of every asset (or those ``agent`` reaches), resolve
        every reference, recompute every agent row's state digest; never raises on a
        problem found, it lists it. ``progress`` gets the number of assets checked so far."""
        from immagent.verify import verify_backend

        agent_id = None if agent is None else _agent_id(agent)
        if progress is not None and not callable(progress):
            raise ValidationError("progress", "must be a callable taking an int", progress)
        report = await verify_backend(self._open(), agent_id, progress=progress)
        log.info("verify: %d assets, %d problems", report.assets_checked, report.problems)
        return report

    async def export(self, agent: PersistentAgent | UUID | str,
                     path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of ``agent`` (its lineage and every asset they reach) to
        ``path``, atomically; verify it anywhere with ``immagent.verify_bundle``."""
        from immagent.bundle import export_bundle

        agent_id = _agent_id(agent)
        info = await export_bundle(self._open(), agent_id, path)
        log.info("exported %s: %d states, %d assets to %s", agent_id, len(info.agents),
                 info.assets, info.path)
        return info

    async def import_bundle(self, path: str | os.PathLike[str]) -> PersistentAgent:
        """Verify a bundle, then load it in one transaction (idempotent: present rows are
        skipped); returns its head state with the same id and digest as where it came from."""
        from immagent.bundle import import_bundle

        head = await import_bundle(self._open(), path)
        log.info("imported bundle %s: head %s", os.fspath(path), head)
        return await self.load_agent(head)

    # -- per-agent operations (PersistentAgent's methods delegate here) --------------------

    async def get_messages(self, agent: PersistentAgent) -> tuple[Message, ...]:
        """All messages of ``agent``'s conversation, oldest first."""
        return await self._history(agent.conversation_digest)

    async def message_counts(self, agents: Sequence[PersistentAgent]) -> list[int]:
        """How many messages each agent's conversation holds, read from the head nodes
        alone (one batched fetch, no history)."""
        nodes = await self._assets([a.conversation_digest for a in agents], "conversation node")
        return [n.length if isinstance(n, ConversationNode) else 0 for n in nodes]

    async def get_system_prompt(self, agent: PersistentAgent) -> str:
        """The system prompt text of ``agent``."""
        (prompt,) = await self._assets([agent.system_prompt_digest], "system prompt")
        assert isinstance(prompt, SystemPrompt)
        return prompt.text

    async def get_lineage(self, agent: PersistentAgent) -> list[PersistentAgent]:
        """``agent`` and its stored ancestors, newest first."""
        records = await self._open().lineage(agent.id)
        if not records:
            raise AgentNotFoundError(agent.id)
        return [self._bind(r) for r in records]

    async def clone(self, agent: PersistentAgent) -> PersistentAgent:
        """Same content, new id, parent = ``agent``; writes one agent row and no assets."""
        r = agent._record()
        record = _new_record(agent.id, r.name, r.model, r.system_prompt, r.conversation,
                             r.model_config, r.metadata)
        await self._open().write([], [record])
        return self._bind(record)

    async def with_metadata(self, agent: PersistentAgent,
                            metadata: Mapping[str, Any]) -> PersistentAgent:
        """A new state of ``agent`` with ``metadata`` replacing the old metadata."""
        meta = check_json_mapping("metadata", metadata)
        r = agent._record()
        record = _new_record(agent.id, r.name, r.model, r.system_prompt, r.conversation,
                             r.model_config, meta)
        await self._open().write([], [record])
        return self._bind(record)

    async def advance(
        self,
        agent: PersistentAgent,
        input: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        mcp: ToolProvider | None = None,
        max_retries: int = 3,
        timeout: float | None = 120.0,
        max_tool_rounds: int = 10,
        retry_delay: float = DEFAULT_RETRY_DELAY,
    ) -> PersistentAgent:
        """Run one turn of ``agent`` and save the result as a new state (see
        PersistentAgent.advance)."""
        self._open()
        history = await self.get_messages(agent)
        new_messages = await run_turn(
            model=agent.model, system_prompt=await self.get_system_prompt(agent),
            model_config=agent.model_config, history=history, user_input=input,
            temperature=temperature, max_tokens=max_tokens, top_p=top_p, tools=mcp,
            max_retries=max_retries, timeout=timeout, max_tool_rounds=max_tool_rounds,
            retry_delay=retry_delay,
        )
        return await self.append(agent, new_messages, history=history)

    async def append(self, agent: PersistentAgent, messages: Sequence[Message], *,
                     history: tuple[Message, ...] | None = None) -> PersistentAgent:
        """Save a new state of ``agent`` whose conversation adds ``messages``.

        Writes only the new messages, one conversation node and one agent row, in one
        transaction. This is the store-only half of advance (also used by imports and
        benchmarks).
        """
        backend = self._open()
        messages = _checked_messages(messages)
        parent = await self._node(agent.conversation_digest)
        node = parent.extend(messages)
        r = agent._record()
        record = _new_record(agent.id, r.name, r.model, r.system_prompt, node.digest,
                             r.model_config, r.metadata)
        unique = {m.digest: m for m in messages}
        await backend.write([*(stored(m) for m in unique.values()), stored(node)], [record])
        for m in unique.values():
            self._cache.put(m)
        self._cache.put(node)
        if history is None:
            history = self._cache.history(agent.conversation_digest)
        if history is not None:
            self._cache.put_history(node.digest, (*history, *messages))
        return self._bind(record)

    # -- reading assets -------------------------------------------------------------------

    def _bind(self, record: AgentRecord) -> PersistentAgent:
        return registry.bind(PersistentAgent._from_record(record), self)

    async def _node(self, digest: Digest) -> ConversationNode:
        (node,) = await self._assets([digest], "conversation node")
        if not isinstance(node, ConversationNode):
            raise IntegrityError(f"asset {digest.hex()} is not a conversation node")
        return node

    async def _assets(self, digests: Sequence[Digest], what: str) -> list[Asset]:
        """Assets by digest: cache first, the rest in one batched, digest-checked fetch."""
        # Held locally, not re-read from the cache: a batch larger than the cache's LRU
        # would evict its own first entries before they are returned.
        found: dict[Digest, Asset] = {}
        missing: list[Digest] = []
        for d in dict.fromkeys(digests):
            cached = self._cache.get(d)
            if cached is None:
                missing.append(d)
            else:
                found[d] = cached
        if missing:
            rows = await self._open().get_assets(missing)
            for d in missing:
                if d not in rows:
                    if what == "message":
                        raise MessageNotFoundError(d)
                    raise AssetNotFoundError(what, d)
                found[d] = _decode_checked(rows[d])
                self._cache.put(found[d])
        return [found[d] for d in digests]

    async def _history(self, head: Digest) -> tuple[Message, ...]:
        cached = self._cache.history(head)
        if cached is not None:
            return cached
        chain, leaves = await self._open().get_conversation(head)
        nodes: list[ConversationNode] = []
        expected: Digest | None = head
        for row in chain:
            if row.digest != expected:
                break
            node = _decode_checked(row)
            if not isinstance(node, ConversationNode):
                raise IntegrityError(f"asset {row.digest.hex()} is not a conversation node")
            nodes.append(node)
            expected = node.parent
        if expected is not None:  # the chain stopped before the root
            raise AssetNotFoundError("conversation node", expected)
        decoded: dict[Digest, Message] = {}
        for digest in (d for node in nodes for d in node.messages):
            if digest in decoded:
                continue
            if digest not in leaves:
                raise MessageNotFoundError(digest)
            message = _decode_checked(leaves[digest])
            if not isinstance(message, Message):
                raise IntegrityError(f"conversation {head.hex()} references non-message "
                                     f"asset {digest.hex()}")
            decoded[digest] = message
        history = tuple(decoded[d] for node in reversed(nodes) for d in node.messages)
        self._cache.put(nodes[0])
        self._cache.put_history(head, history)
        return history


_KINDS = frozenset(int(k) for k in Kind)


def _decode_checked(row: StoredAsset) -> Asset:
    """Decode a stored row after proving it still hashes to its digest."""
    digest, kind, refs, body = row
    try:
        sound = kind in _KINDS and digest_of(kind, body, refs) == digest
    except ValueError:  # refs on a kind that has none
        sound = False
    if not sound:
        raise IntegrityError(f"asset {digest.hex()} is corrupt: its stored bytes do not "
                             "match its digest (run store.verify())")
    try:
        asset = decode_asset(kind, body, refs)
    except (msgspec.DecodeError, ValueError) as e:
        raise IntegrityError(f"asset {digest.hex()} cannot be decoded: {e}") from e
    # Seed the cached properties with what we just proved, so nothing is re-encoded.
    asset.__dict__["body"] = body
    asset.__dict__["digest"] = digest
    return asset


def _new_record(parent_id: UUID | None, name: str, model: str, system_prompt: Digest,
                conversation: Digest, model_config: dict[str, Any],
                metadata: dict[str, Any]) -> AgentRecord:
    return AgentRecord(
        id=uuid7(), parent_id=parent_id, created_at=datetime.now(UTC), name=name,
        model=model, system_prompt=system_prompt, conversation=conversation,
        model_config=model_config, metadata=metadata,
        digest=state_digest(name, model, system_prompt, conversation, model_config, metadata),
    )


def _agent_id(agent: PersistentAgent | UUID | str) -> UUID:
    """The id of an agent given as a state or as its id (the field is named "agent")."""
    return agent.id if isinstance(agent, PersistentAgent) else check_uuid("agent", agent)


def _checked_messages(messages: object) -> list[Message]:
    """The messages of a step, each proved to survive a store round trip.

    msgspec does not type-check Struct construction, so a Message with a bad role or a
    non-str content would be hashed and committed, then fail every later read.
    """
    if isinstance(messages, Message) or not isinstance(messages, Sequence) or not messages:
        raise ValidationError("messages", "a step adds a non-empty sequence of Message",
                              None)
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise ValidationError(f"messages[{i}]", f"must be a Message, got "
                                  f"{type(m).__name__}", m)
        try:
            if decode_asset(Kind.MESSAGE, m.body) != m:
                raise ValueError("it does not survive encoding unchanged")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError,
                UnicodeEncodeError) as e:
            raise ValidationError(f"messages[{i}]", f"not a storable message: {e}",
                                  None) from None
    return list(messages)


def _check_page(limit: object, offset: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
        raise ValidationError("limit", f"must be an int from 1 to 10000, got {limit!r}", limit)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValidationError("offset", f"must be an int >= 0, got {offset!r}", offset)


def _sqlite_path(dsn: str) -> str | None:
    """The file path named by a SQLite DSN, or None if ``dsn`` is not one."""
    if dsn.startswith("sqlite:///"):
        return dsn.removeprefix("sqlite:///") or None
    if dsn.startswith("sqlite://"):
        return None
    if dsn.endswith((".db", ".sqlite", ".sqlite3")) and "://" not in dsn:
        return dsn
    return None
