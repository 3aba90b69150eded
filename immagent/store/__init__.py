"""The Store: public facade over a storage backend, the asset cache and the agent registry."""

from immagent.store.backend import Head
from immagent.store.log import Store

__all__ = ["Head", "Store"]
