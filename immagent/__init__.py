"""immagent: immutable, content-addressed agent state.

Every step creates a new agent state with a new UUID whose ``parent_id`` points at the old
one; content is stored once, keyed by its blake3 digest.

The event log, the agent book (``Store``) and the agent class are imported here; the model
layer (the model call, streams, MCP) is loaded on first use of one of its names, so a
program that only uses the store (or the command line listing it) never loads model code.
"""

import importlib
from typing import TYPE_CHECKING

from immagent.agent import PersistentAgent
from immagent.assets import ConversationNode, Message, MissingAsset, SystemPrompt, ToolCall
from immagent.audit.bundle import BundleInfo, verify_bundle
from immagent.audit.diff import StateDiff
from immagent.audit.gc import GCResult
from immagent.audit.keys import (
    PublicKey,
    SigningKey,
    generate_key,
    load_public_key,
    load_signing_key,
)
from immagent.audit.proofs import ProofResult, verify_proof
from immagent.audit.trust import TrustPolicy
from immagent.audit.verify import AgentProblem, AssetProblem, VerifyReport
from immagent.clients.agents import Store
from immagent.exceptions import (
    AgentNotFoundError,
    AgentNotRegisteredError,
    AssetNotFoundError,
    BundleError,
    ConflictError,
    ExtraNotInstalledError,
    FanOutError,
    ImmAgentError,
    IntegrityError,
    LLMError,
    MessageNotFoundError,
    ProofError,
    RedactedError,
    SchemaMissingError,
    SchemaVersionError,
    SessionClosedError,
    StaleStreamError,
    StoreClosedError,
    StoreConnectionError,
    StoreError,
    StreamBusyError,
    ToolExecutionError,
    TransientConflictError,
    TurnIncompleteError,
    UnsupportedTypeError,
    UntrustedError,
    ValidationError,
)
from immagent.records import StateRow
from immagent.store.stats import StoreStats

if TYPE_CHECKING:
    from immagent.advance import CompleteFn, ToolProvider
    from immagent.llm import Model
    from immagent.mcp import MCPManager
    from immagent.simple import SimpleAgent
    from immagent.stream import (
        AssistantReply,
        TextDelta,
        ToolCallRequest,
        ToolResult,
        TurnDone,
        TurnEvent,
        TurnStream,
    )

# Public names of the agent layer, by the module that defines them (loaded on first use;
# MCPManager alone pulls in the MCP SDK, ~1.5 s).
_LAZY = {"CompleteFn": "immagent.advance", "ToolProvider": "immagent.advance",
         "Model": "immagent.llm",
         "MCPManager": "immagent.mcp", "SimpleAgent": "immagent.simple",
         "AssistantReply": "immagent.stream", "TextDelta": "immagent.stream",
         "ToolCallRequest": "immagent.stream", "ToolResult": "immagent.stream",
         "TurnDone": "immagent.stream", "TurnEvent": "immagent.stream",
         "TurnStream": "immagent.stream"}

__version__ = "0.2.0"

__all__ = [
    "AgentNotFoundError",
    "AgentNotRegisteredError",
    "AgentProblem",
    "AssetNotFoundError",
    "AssetProblem",
    "AssistantReply",
    "BundleError",
    "BundleInfo",
    "CompleteFn",
    "ConflictError",
    "ConversationNode",
    "ExtraNotInstalledError",
    "FanOutError",
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
    "ProofError",
    "ProofResult",
    "PublicKey",
    "RedactedError",
    "SchemaMissingError",
    "SchemaVersionError",
    "SessionClosedError",
    "SigningKey",
    "SimpleAgent",
    "StaleStreamError",
    "StateDiff",
    "StateRow",
    "Store",
    "StoreClosedError",
    "StoreConnectionError",
    "StoreError",
    "StoreStats",
    "StreamBusyError",
    "SystemPrompt",
    "TextDelta",
    "ToolCall",
    "ToolCallRequest",
    "ToolExecutionError",
    "ToolProvider",
    "ToolResult",
    "TransientConflictError",
    "TrustPolicy",
    "TurnDone",
    "TurnEvent",
    "TurnIncompleteError",
    "TurnStream",
    "UnsupportedTypeError",
    "UntrustedError",
    "ValidationError",
    "VerifyReport",
    "__version__",
    "generate_key",
    "load_public_key",
    "load_signing_key",
    "verify_bundle",
    "verify_proof",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'immagent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come here again
    return value
