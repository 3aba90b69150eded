"""PersistentAgent: one immutable, stored agent state, bound to the Store that holds it.

The agent reads through its store (the agent book, ``immagent.clients.agents``, which made
or loaded it and which it holds in a slot), ``advance`` runs one turn (``immagent.live``:
the model and tools) on the history it read, then hands the new messages to
``Store.append``, which writes them in one transaction. The store never runs a model; this
module loads the model layer on the first turn. It knows its store only as the small
interface below, ``AgentStore``, so it imports no store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, Unpack
from uuid import UUID

from immagent import history
from immagent.assets import Digest, Message
from immagent.exceptions import AgentNotRegisteredError
from immagent.ids import uuid_from_digest
from immagent.options import TurnKeywords
from immagent.records import AgentRecord

if TYPE_CHECKING:
    from immagent.advance import ToolProvider
    from immagent.stream import TurnStream

__all__ = ["AgentStore", "PersistentAgent"]


class AgentStore(Protocol):
    """What an agent asks of the store it is bound to (``immagent.Store`` is one)."""

    async def get_messages(self, agent: PersistentAgent) -> tuple[Message, ...]: ...

    async def get_system_prompt(self, agent: PersistentAgent) -> str: ...

    async def get_lineage(self, agent: PersistentAgent) -> list[PersistentAgent]: ...

    async def clone(self, agent: PersistentAgent) -> PersistentAgent: ...

    async def with_metadata(self, agent: PersistentAgent,
                            metadata: Mapping[str, Any]) -> PersistentAgent: ...

    async def append(self, agent: PersistentAgent, messages: Sequence[Message]
                     ) -> PersistentAgent: ...


class PersistentAgent:
    """An agent state. Every method that "changes" it returns a new state with a new id
    whose ``parent_id`` is this one; this object and its stored row never change.

    Equality and hashing are by identity (the store's map of live objects relies on it);
    compare ``id`` to ask "same state", ``digest`` to ask "same content".
    """

    __slots__ = ("__weakref__", "_config", "_metadata", "_store", "record")

    record: AgentRecord
    _config: Mapping[str, Any]
    _metadata: Mapping[str, Any]
    _store: AgentStore | None

    def __init__(self, record: AgentRecord, store: AgentStore | None = None) -> None:
        """Wrap a stored agent record, bound to the store that holds it (the store makes
        these; one built by hand without a store only holds the data)."""
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "_config", MappingProxyType(record.model_config))
        object.__setattr__(self, "_metadata", MappingProxyType(record.metadata))
        object.__setattr__(self, "_store", store)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PersistentAgent is immutable; its methods return new states")

    def __repr__(self) -> str:
        parent = f", parent_id={self.parent_id}" if self.parent_id else ""
        return (f"PersistentAgent(id={self.id}, name={self.name!r}, model={self.model!r}"
                f"{parent}, digest={self.digest.hex()[:16]}…)")

    def _bound(self) -> AgentStore:
        """The store this agent is bound to; AgentNotRegisteredError when there is none."""
        if self._store is None:
            raise AgentNotRegisteredError(
                f"agent {self.id} is not bound to a Store; load it with store.load_agent()")
        return self._store

    @property
    def id(self) -> UUID:
        """This state's id (UUIDv7, time-ordered)."""
        return self.record.id

    @property
    def parent_id(self) -> UUID | None:
        """The state this one was made from, or None for a new agent."""
        return self.record.parent_id

    @property
    def created_at(self) -> datetime:
        """When this state was made (UTC)."""
        return self.record.created_at

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.record.name

    @property
    def model(self) -> str:
        """The LiteLLM model string."""
        return self.record.model

    @property
    def model_config(self) -> Mapping[str, Any]:
        """Default model parameters (read-only, canonical form)."""
        return self._config

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The application's metadata (read-only, canonical form)."""
        return self._metadata

    @property
    def digest(self) -> Digest:
        """Digest of this state's whole content (prompt, model, config, metadata and the
        full conversation): equal digests mean equal content."""
        return self.record.digest

    @property
    def system_prompt_digest(self) -> Digest:
        """Digest of the SystemPrompt asset."""
        return self.record.system_prompt

    @property
    def conversation_digest(self) -> Digest:
        """Digest of the conversation's head node."""
        return self.record.conversation

    @property
    def system_prompt_id(self) -> UUID:
        """UUID of the SystemPrompt asset (derived from its digest)."""
        return uuid_from_digest(self.record.system_prompt)

    @property
    def conversation_id(self) -> UUID:
        """UUID of the head ConversationNode (derived from its digest)."""
        return uuid_from_digest(self.record.conversation)

    async def get_messages(self) -> tuple[Message, ...]:
        """The whole conversation, oldest first (one chain query plus one batched fetch)."""
        return await self._bound().get_messages(self)

    async def get_system_prompt(self) -> str:
        """The text of this agent's system prompt."""
        return await self._bound().get_system_prompt(self)

    async def messages(self) -> tuple[Message, ...]:
        """The whole conversation, oldest first (0.1.2's name for ``get_messages``)."""
        return await self.get_messages()

    async def get_lineage(self) -> list[PersistentAgent]:
        """This state's stored lineage, **root first, this state last** (0.1.2's order);
        it starts at the oldest ancestor still stored. ``Store.ancestors`` walks newest
        first."""
        return await self._bound().get_lineage(self)

    async def lineage(self) -> list[PersistentAgent]:
        """0.1.2's name for ``get_lineage``: root first, this state last."""
        return await self.get_lineage()

    async def last_response(self) -> str | None:
        """Text of the newest assistant message that has text, or None."""
        return history.last_response(await self.get_messages())

    async def token_usage(self) -> history.TokenUsage:
        """``(input_tokens, output_tokens)`` summed over the conversation's assistant
        messages; ``(0, 0)`` when there are none."""
        return history.token_usage(await self.get_messages())

    async def clone(self) -> PersistentAgent:
        """A sibling: a new state with identical content (same digest), a new id and this
        state's parent as its parent, to explore another branch from the same point."""
        return await self._bound().clone(self)

    async def with_metadata(self, metadata: Mapping[str, Any]) -> PersistentAgent:
        """A new state whose metadata is ``metadata`` (a JSON-like mapping)."""
        return await self._bound().with_metadata(self, metadata)

    async def advance(self, user_input: str, *, mcp: ToolProvider | None = None,
                      **options: Unpack[TurnKeywords]) -> PersistentAgent:
        """Send ``user_input`` to the model (running tools through ``mcp``) and return the
        new state, saved in one transaction. On any failure nothing is written.

        ``options`` are the turn's keywords (``TurnOptions``: ``max_retries=3``,
        ``timeout=120.0``, ``max_tool_rounds=10``, ``temperature``, ``max_tokens``,
        ``top_p``, ``retry_delay=1.0``), checked before anything is read or any model is
        called.
        """
        from immagent.live import check_turn, run_turn  # the model layer loads on a turn

        opts = check_turn(user_input, options)
        store = self._bound()
        history = await store.get_messages(self)
        new_messages = await run_turn(
            model=self.model, system_prompt=await store.get_system_prompt(self),
            model_config=self.model_config, history=history, user_input=user_input,
            tools=mcp, options=opts,
        )
        return await store.append(self, new_messages)

    def stream(self, user_input: str, *, mcp: ToolProvider | None = None,
               keep_partial: bool = False,
               **options: Unpack[TurnKeywords]) -> TurnStream[PersistentAgent]:
        """``advance``, streamed: a TurnStream of the turn's events (text deltas, tool
        calls and results, then ``TurnDone``); the new state, saved exactly as ``advance``
        saves it, is ``stream.agent`` afterwards::

            async with agent.stream("Hello") as s:
                async for event in s: ...
            new = s.agent

        If the model fails or the caller stops early, nothing is written, unless
        ``keep_partial``: then what the turn produced so far is saved as a new state, the
        cut-off reply marked ``interrupted``. Input and options are checked here, at once.
        """
        from immagent.live import check_turn, open_turn
        from immagent.stream import Started, TurnStream  # the model layer loads on a turn

        opts = check_turn(user_input, options)
        store = self._bound()

        async def start() -> Started[PersistentAgent]:
            history = await store.get_messages(self)
            turn = open_turn(
                model=self.model, system_prompt=await store.get_system_prompt(self),
                model_config=self.model_config, history=history, user_input=user_input,
                tools=mcp, options=opts,
            )

            async def save(messages: Sequence[Message]) -> PersistentAgent:
                return await store.append(self, messages)

            return Started(turn, save)

        return TurnStream(start, keep_partial=keep_partial)
