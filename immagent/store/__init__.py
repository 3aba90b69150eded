"""The event log and its backends; ``immagent.store.Store`` is 0.1.2's module path.

The package itself is the log (``immagent.store.log.EventLog``) and knows no client. 0.1.2
programs import ``Store`` from here; that class is the log plus the agent client
(``immagent.clients.agents``), so it is loaded on first use of the name rather than by the
package: importing the log never loads a client, and no import runs in a circle.
"""

import importlib
from typing import TYPE_CHECKING

from immagent.store.backend import Head
from immagent.store.log import EventLog

if TYPE_CHECKING:
    from immagent.clients.agents import Store

__all__ = ["EventLog", "Head", "Store"]


def __getattr__(name: str) -> object:
    if name != "Store":
        raise AttributeError(f"module 'immagent.store' has no attribute {name!r}")
    value = getattr(importlib.import_module("immagent.clients.agents"), name)
    globals()[name] = value  # later lookups do not come here again
    return value
