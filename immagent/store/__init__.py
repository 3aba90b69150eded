"""The Store: public facade over a storage backend, the asset cache and the agent registry."""

from immagent.store.store import Store

__all__ = ["Store"]
