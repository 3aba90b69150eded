"""immagent: immutable, content-addressed agent state.

Every step creates a new agent state with a new UUID whose ``parent_id`` points at the old
one; content is stored once, keyed by its blake3 digest.
"""

from typing import TYPE_CHECKING

from immagent.advance import CompleteFn, ToolProvider
from immagent.agent import PersistentAgent
from immagent.assets import ConversationNode, Message, SystemPrompt, ToolCall
from immagent.bundle import BundleInfo, verify_bundle
from immagent.exceptions import (
    AgentNotFoundError,
    AgentNotRegisteredError,
    AssetNotFoundError,
    BundleError,
    ImmAgentError,
    IntegrityError,
    LLMError,
    MessageNotFoundError,
    SchemaMissingError,
    SchemaVersionError,
    StoreClosedError,
    StoreConnectionError,
    StoreError,
    ToolExecutionError,
    ValidationError,
)
from immagent.llm import Model
from immagent.simple import SimpleAgent
from immagent.stats import StoreStats
from immagent.store import Store
from immagent.store.backend import GCResult
from immagent.verify import AgentProblem, AssetProblem, MissingAsset, VerifyReport

if TYPE_CHECKING:
    from immagent.mcp import MCPManager

__version__ = "0.2.0"

__all__ = [
    "AgentNotFoundError",
    "AgentNotRegisteredError",
    "AgentProblem",
    "AssetNotFoundError",
    "AssetProblem",
    "BundleError",
    "BundleInfo",
    "CompleteFn",
    "ConversationNode",
    "GCResult",
    "ImmAgentError",
    "IntegrityError",
    "LLMError",
    "MCPManager",
    "Message",
    "MessageNotFoundError",
    "MissingAsset",
    "Model",
    "PersistentAgent",
    "SchemaMissingError",
    "SchemaVersionError",
    "SimpleAgent",
    "Store",
    "StoreClosedError",
    "StoreConnectionError",
    "StoreError",
    "StoreStats",
    "SystemPrompt",
    "ToolCall",
    "ToolExecutionError",
    "ToolProvider",
    "ValidationError",
    "VerifyReport",
    "__version__",
    "verify_bundle",
]


def __getattr__(name: str) -> object:
    # MCPManager pulls in the MCP SDK (~1.5 s to import): load it on first use only.
    if name == "MCPManager":
        from immagent.mcp import MCPManager

        return MCPManager
    raise AttributeError(f"module 'immagent' has no attribute {name!r}")
