"""The ImmAgentError tree: every error the library raises on purpose is one of these."""

from __future__ import annotations

from typing import Any
from uuid import UUID

__all__ = [
    "AgentNotFoundError",
    "AgentNotRegisteredError",
    "AssetNotFoundError",
    "BundleError",
    "ConflictError",
    "ExtraNotInstalledError",
    "FanOutError",
    "ImmAgentError",
    "IntegrityError",
    "LLMError",
    "MessageNotFoundError",
    "ProofError",
    "RedactedError",
    "SchemaMissingError",
    "SchemaVersionError",
    "SessionClosedError",
    "StaleStreamError",
    "StoreClosedError",
    "StoreConnectionError",
    "StoreError",
    "StreamBusyError",
    "ToolExecutionError",
    "TransientConflictError",
    "TurnIncompleteError",
    "UnsupportedTypeError",
    "UntrustedError",
    "ValidationError",
]


class ImmAgentError(Exception):
    """Base class of every error raised by immagent."""


def install_command(extra: str) -> str:
    """The command that installs ``extra`` of ``immagent-core``, as the README's Install
    table gives it: ``pip install immagent`` for ``llm`` (the ``immagent`` distribution is
    immagent-core[llm]), else ``pip install 'immagent-core[<extra>]'``."""
    return "pip install immagent" if extra == "llm" else f"pip install 'immagent-core[{extra}]'"


class ExtraNotInstalledError(ImmAgentError, ImportError):
    """An optional dependency is not installed: ``what`` needs an extra of the
    ``immagent-core`` distribution. ``install`` is the command that installs it, and the
    message names it: ``pip install immagent`` for the model and tool layer (LiteLLM, MCP:
    the ``llm`` extra, which the ``immagent`` distribution always brings), else
    ``pip install 'immagent-core[<extra>]'`` (which adds the framework and nothing else,
    whichever distribution is installed). Also an ImportError, so code guarding an import
    still catches it; ``name`` is the module whose import failed, when known."""

    def __init__(self, what: str, extra: str, *, needs: str | None = None,
                 cause: ImportError | None = None) -> None:
        self.extra = extra
        self.install = install_command(extra)
        why = f" ({cause})" if cause is not None and str(cause) else ""
        super().__init__(f"{what} needs {needs or f'the {extra!r} extra'}, which is not "
                         f"installed{why}: {self.install}",
                         name=cause.name if cause is not None else None)


class ValidationError(ImmAgentError, ValueError):
    """Input was rejected before anything was written; ``field`` names the culprit."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {message}")


class UnsupportedTypeError(ValidationError, TypeError):
    """A value of a type that cannot be stored (a set or bytes in a JSON value, a key that
    is not a str): also the TypeError that JSON encoders (and so the Agents SDK's
    sessions) raise for it."""


class FanOutError(ValidationError):
    """A row would reference more digests than one row may (``validate.MAX_REFS``): a
    step adding that many messages, a node or state listing that many. ``value`` is the
    number asked for, ``limit`` the most allowed."""

    def __init__(self, field: str, count: int, limit: int, what: str = "digests") -> None:
        self.limit = limit
        super().__init__(field, f"{count:,} {what} are more than one row may reference "
                         f"(at most {limit:,}); split it into several steps", count)


class AssetNotFoundError(ImmAgentError, LookupError):
    """A referenced asset is not in the store."""

    def __init__(self, what: str, key: UUID | bytes | str) -> None:
        self.key = key
        shown = key.hex() if isinstance(key, bytes) else str(key)
        super().__init__(f"{what} not found: {shown}")


class AgentNotFoundError(AssetNotFoundError):
    """No agent state with this id exists (never created, or deleted)."""

    def __init__(self, agent_id: UUID | str) -> None:
        self.agent_id = agent_id
        super().__init__("agent", agent_id)


class MessageNotFoundError(AssetNotFoundError):
    """A conversation references a message the store does not hold."""

    def __init__(self, key: UUID | bytes | str) -> None:
        super().__init__("message", key)


class AgentNotRegisteredError(ImmAgentError):
    """The agent is not bound to a Store (built by hand rather than created or loaded
    through one). An agent whose store was closed raises StoreClosedError instead."""


class StoreError(ImmAgentError):
    """The storage backend failed; the message says what and the cause is chained."""


class StoreConnectionError(StoreError):
    """The database could not be reached or opened (the message never shows a password)."""


class StoreClosedError(StoreError):
    """The Store was used after close()."""


class SessionClosedError(StoreClosedError, RuntimeError):
    """An Agents SDK session was used after close(): also the RuntimeError the SDK's own
    sessions raise, so callers that catch theirs catch ours."""


class SchemaVersionError(StoreError):
    """The database holds a schema version this immagent does not know, or none yet."""


class SchemaMissingError(SchemaVersionError):
    """The database has no immagent tables yet; ``Store.init_schema()`` creates them."""


class ConflictError(StoreError):
    """A state with this id is already stored with other content (ids are never reused)."""

    def __init__(self, state_id: UUID) -> None:
        self.state_id = state_id
        super().__init__(f"state {state_id} already exists with other content")


class TransientConflictError(StoreError):
    """PostgreSQL rolled a transaction back to resolve a conflict with a concurrent one (a
    deadlock, a serialization failure, a hot standby's recovery conflict) and running it
    again did not get through either; nothing was written. Not a connection problem: the
    same call may simply be made again."""


class StaleStreamError(StoreError):
    """A write expected a stream's newest state that another writer has since replaced;
    nothing was written. Read the stream again and retry."""

    def __init__(self, kind: int, stream: str) -> None:
        self.kind = kind
        self.stream = stream
        super().__init__(f"stream {stream!r} (kind {kind}) has a newer state than the one "
                         "this write was based on; nothing was written")


class RedactedError(ImmAgentError):
    """A write would store content that was redacted (``store.redact``): refused, nothing
    written. ``digest`` names the redacted content."""

    def __init__(self, digest: bytes) -> None:
        self.digest = digest
        super().__init__(f"content {digest.hex()} was redacted from this store and cannot be "
                         "stored again; nothing was written")


class IntegrityError(ImmAgentError):
    """Stored or exported data does not match its digest or has a dangling reference."""


class BundleError(IntegrityError):
    """An audit bundle is unreadable, malformed or tampered with. ``unusable`` is True
    when it could not be checked at all (not a bundle, a format this immagent does not
    read), False when it was checked and is corrupt."""

    def __init__(self, message: str, *, unusable: bool = False) -> None:
        self.unusable = unusable
        super().__init__(message)


class UntrustedError(ImmAgentError):
    """Intact, but not signed by enough trusted keys (a trust policy's ``sigs_needed``)."""


class ProofError(IntegrityError):
    """A proof document is refused; ``problem`` names why: ``oversized``, ``truncated``
    (not a whole document), ``malformed`` (not an immagent proof of a known version),
    ``not_in_state`` (the element is not where the proof says, under the state's
    accumulator), ``wrong_state`` (it proves another state than the one expected),
    ``tampered`` (a part does not hash to what it claims)."""

    def __init__(self, problem: str, message: str) -> None:
        self.problem = problem
        super().__init__(f"proof refused ({problem}): {message}")


class LLMError(ImmAgentError):
    """The language-model call failed (after retries, where retrying made sense)."""


class ToolExecutionError(ImmAgentError):
    """An MCP tool could not be run, or its server failed; ``tool_name`` is the tool's name
    (None when the failure is not one tool's).

    Raised as ``ToolExecutionError(message, tool_name=name)``; 0.1.2's form,
    ``ToolExecutionError(tool_name, message)``, gives 0.1.2's text, "Tool 'name' failed:
    message"."""

    def __init__(self, *args: object, tool_name: str | None = None) -> None:
        if len(args) == 2 and tool_name is None and all(isinstance(a, str) for a in args):
            tool_name, message = str(args[0]), str(args[1])
            args = (f"Tool '{tool_name}' failed: {message}",)
        self.tool_name = tool_name
        super().__init__(*args)


class StreamBusyError(ImmAgentError, RuntimeError):
    """A TurnStream was iterated or closed by a second task while another was waiting for
    its next event: a stream has one consumer. (A RuntimeError too: what Python raises for
    an async generator used that way.)"""


class TurnIncompleteError(ImmAgentError):
    """A streamed turn's new agent was asked for, but the turn has not been saved: it is
    still streaming, it failed, or it was stopped without ``keep_partial``."""
