"""The weak binding of agents to the Store that made or loaded them.

Agents stay plain immutable data; their methods look their store up here. An entry goes
away with its agent, so the registry never keeps agents alive.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from immagent.exceptions import AgentNotRegisteredError

if TYPE_CHECKING:
    from immagent.agent import PersistentAgent
    from immagent.store import Store

__all__ = ["bind", "store_of"]

_stores: weakref.WeakKeyDictionary[PersistentAgent, Store] = weakref.WeakKeyDictionary()


def bind(agent: PersistentAgent, store: Store) -> PersistentAgent:
    """Register ``agent`` as belonging to ``store`` and return it."""
    _stores[agent] = store
    return agent


def store_of(agent: PersistentAgent) -> Store:
    """The store ``agent`` is bound to; AgentNotRegisteredError when there is none."""
    store = _stores.get(agent)
    if store is None:
        raise AgentNotRegisteredError(
            f"agent {agent.id} is not bound to a Store; load it with store.load_agent()"
        )
    return store
