"""The message types under their immagent 0.1.2 module path.

0.1.2 programs import ``Message``, ``ToolCall`` and ``Conversation`` from here; the types
themselves live with the rest of the data model in ``immagent.assets``. This module only
re-exports them, so both paths name the same classes.
"""

from immagent.assets import Conversation, Message, ToolCall

__all__ = ["Conversation", "Message", "ToolCall"]
