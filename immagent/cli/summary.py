"""How agent states are summarised in tables and JSON, and their message counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from immagent.agent import PersistentAgent
from immagent.assets import ConversationNode
from immagent.store import Store

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
    """Conversation lengths, read from each head node (one batched fetch, no history).

    Uses the Store's internal asset fetch: there is no public "length of a conversation"
    yet. If that internal changes, the counts are left out rather than failing the listing.
    """
    fetch = getattr(store, "_assets", None)
    if fetch is None or not agents:
        return [None] * len(agents)
    nodes = await fetch([a.conversation_digest for a in agents], "conversation node")
    return [n.length if isinstance(n, ConversationNode) else None for n in nodes]


async def newest(store: Store, name: str) -> PersistentAgent | None:
    """The most recently created state with this name (a lineage's "HEAD"), or None."""
    count = await store.count_agents(name)
    if count == 0:
        return None
    page = await store.list_agents(limit=1, offset=count - 1, name=name)
    return page[-1] if page else None
