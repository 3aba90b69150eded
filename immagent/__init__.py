"""immagent: immutable, content-addressed agent state.

Every step creates a new agent state with a new UUID whose ``parent_id`` points at the old
one; content is stored once, keyed by its blake3 digest.
"""

from immagent.agent import PersistentAgent
from immagent.assets import ConversationNode, Message, SystemPrompt, ToolCall
from immagent.exceptions import (
    AgentNotFoundError,
    AgentNotRegisteredError,
    AssetNotFoundError,
    BundleError,
    ImmAgentError,
    IntegrityError,
    LLMError,
    MessageNotFoundError,
    SchemaVersionError,
    StoreClosedError,
    StoreConnectionError,
    StoreError,
    ToolExecutionError,
    ValidationError,
)
from immagent.store import Store
from immagent.store.backend import GCResult

__version__ = "0.2.0"

__all__ = [
    "AgentNotFoundError",
    "AgentNotRegisteredError",
    "AssetNotFoundError",
    "BundleError",
    "ConversationNode",
    "GCResult",
    "ImmAgentError",
    "IntegrityError",
    "LLMError",
    "Message",
    "MessageNotFoundError",
    "PersistentAgent",
    "SchemaVersionError",
    "Store",
    "StoreClosedError",
    "StoreConnectionError",
    "StoreError",
    "SystemPrompt",
    "ToolCall",
    "ToolExecutionError",
    "ValidationError",
    "__version__",
]
