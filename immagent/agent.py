"""PersistentAgent: one immutable, stored agent state, bound to the Store that holds it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from immagent import registry
from immagent.assets import AgentRecord, Digest, Message
from immagent.ids import uuid_from_digest
from immagent.llm import DEFAULT_RETRY_DELAY

if TYPE_CHECKING:
    from immagent.advance import ToolProvider

__all__ = ["PersistentAgent"]


@dataclass(frozen=True, eq=False, repr=False)
class PersistentAgent:
    """An agent state. Every method that "changes" it returns a new state with a new id
    whose ``parent_id`` is this one; this object and its stored row never change.

    Equality and hashing are by identity (the weak store registry relies on it); compare
    ``id`` to ask "same state", ``digest`` to ask "same content".
    """

    id: UUID
    created_at: datetime
    name: str
    parent_id: UUID | None
    model: str
    model_config: Mapping[str, Any]
    metadata: Mapping[str, Any]
    digest: Digest
    system_prompt_digest: Digest
    conversation_digest: Digest

    def __repr__(self) -> str:
        parent = f", parent_id={self.parent_id}" if self.parent_id else ""
        return (f"PersistentAgent(id={self.id}, name={self.name!r}, model={self.model!r}"
                f"{parent}, digest={self.digest.hex()[:16]}…)")

    @property
    def system_prompt_id(self) -> UUID:
        """UUID of the SystemPrompt asset (derived from its digest)."""
        return uuid_from_digest(self.system_prompt_digest)

    @property
    def conversation_id(self) -> UUID:
        """UUID of the head ConversationNode (derived from its digest)."""
        return uuid_from_digest(self.conversation_digest)

    @classmethod
    def _from_record(cls, record: AgentRecord) -> PersistentAgent:
        return cls(
            id=record.id, created_at=record.created_at, name=record.name,
            parent_id=record.parent_id, model=record.model,
            model_config=MappingProxyType(record.model_config),
            metadata=MappingProxyType(record.metadata), digest=record.digest,
            system_prompt_digest=record.system_prompt, conversation_digest=record.conversation,
        )

    def _record(self) -> AgentRecord:
        return AgentRecord(
            id=self.id, parent_id=self.parent_id, created_at=self.created_at, name=self.name,
            model=self.model, system_prompt=self.system_prompt_digest,
            conversation=self.conversation_digest, model_config=dict(self.model_config),
            metadata=dict(self.metadata), digest=self.digest,
        )

    async def get_messages(self) -> tuple[Message, ...]:
        """The whole conversation, oldest first (one chain query plus one batched fetch)."""
        return await registry.store_of(self).get_messages(self)

    async def get_system_prompt(self) -> str:
        """The text of this agent's system prompt."""
        return await registry.store_of(self).get_system_prompt(self)

    async def get_lineage(self) -> list[PersistentAgent]:
        """This state and its ancestors, newest first; stops at a deleted parent."""
        return await registry.store_of(self).get_lineage(self)

    async def clone(self) -> PersistentAgent:
        """A new state with identical content (same digest), a new id and this as parent."""
        return await registry.store_of(self).clone(self)

    async def with_metadata(self, metadata: Mapping[str, Any]) -> PersistentAgent:
        """A new state whose metadata is ``metadata`` (a JSON-like mapping)."""
        return await registry.store_of(self).with_metadata(self, metadata)

    async def advance(
        self,
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
        """Send ``input`` to the model (running tools through ``mcp``) and return the new
        state, saved in one transaction. On any failure nothing is written.

        ``temperature``/``max_tokens``/``top_p`` override ``model_config`` for this turn and
        are recorded on the reply; transient provider errors are retried ``max_retries``
        times with backoff starting at ``retry_delay`` seconds; ``timeout`` bounds each call.
        """
        return await registry.store_of(self).advance(
            self, input, temperature=temperature, max_tokens=max_tokens, top_p=top_p, mcp=mcp,
            max_retries=max_retries, timeout=timeout, max_tool_rounds=max_tool_rounds,
            retry_delay=retry_delay,
        )
