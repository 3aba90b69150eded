"""``PersistentAgent`` under its immagent 0.1.2 module path.

0.1.2 programs import ``PersistentAgent`` from here; the class lives in ``immagent.agent``.
This module only re-exports it, so both paths name the same class.
"""

from immagent.agent import PersistentAgent

__all__ = ["PersistentAgent"]
