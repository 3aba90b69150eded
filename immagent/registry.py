"""The agent-to-store binding under its immagent 0.1.2 module path.

An agent holds the store that made or loaded it (``PersistentAgent`` keeps it in a slot; the
agent book, ``immagent.clients.agents``, binds it). 0.1.2 kept that binding here, in a
registry: its two functions keep working and read or set the same slot.
"""

from immagent.clients.agents import bind, store_of

__all__ = ["bind", "get_store", "register_agent", "store_of"]

#: 0.1.2's name: the Store ``agent`` is bound to (AgentNotRegisteredError when none is).
get_store = store_of
#: 0.1.2's name: bind ``agent`` to ``store`` (its methods then read and write there).
register_agent = bind
