"""How agent states are summarised in tables and JSON, and their message counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from immagent.agent import PersistentAgent
from immagent.clients.agents import Store

__all__ = ["agent_json", "message_counts", "newest"]


def agent_json(agent: PersistentAgent, messages: int | None = None) -> dict[str, Any]:
    """The identifying fields of a state, for ``--json`` output."""
    return {
        "id": str(agent.id),
        "parent_id": str(agent.parent_id) if agent.parent_id else None,
        "name": agent.name,
        "model": agent.model,
        "created_at": agent.created_at.isoformat(),
        "digest": agent.digest.hex(),
        "messages": messages,
    }


async def message_counts(store: Store, agents: Sequence[PersistentAgent]) -> list[int | None]:
    """Conversation lengths, read from each head node (one batched fetch, no history)."""
    if not agents:
        return []
    return list(await store.message_counts(agents))


async def newest(store: Store, name: str) -> PersistentAgent | None:
    """The most recently stored state with this name (a lineage's "HEAD"), or None."""
    return await store.newest_by_name(name)
