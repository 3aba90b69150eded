"""The options of one turn: every keyword ``advance`` takes besides the input and the tools,
with its default and its check, stated once for both agent types.

``TurnKeywords`` types the keywords where they are passed (``**options``), so a call such as
``agent.advance("hi", temperature=0.2, max_retries=1)`` is checked by type checkers;
``TurnOptions`` holds them, validated when it is built (before anything is read or any
model called).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from immagent.exceptions import ValidationError
from immagent.validate import is_credential_key

__all__ = ["DEFAULT_RETRY_DELAY", "TurnKeywords", "TurnOptions", "check_tool_rounds",
           "check_tools"]

#: First backoff delay in seconds; attempt n waits about retry_delay * 2**n (capped).
DEFAULT_RETRY_DELAY = 1.0


class TurnKeywords(TypedDict, total=False):
    """The keywords of a turn, for typing ``**options`` (defaults: see TurnOptions)."""

    max_retries: int
    timeout: float | None
    max_tool_rounds: int
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    retry_delay: float


@dataclass(frozen=True, kw_only=True)
class TurnOptions:
    """How one turn runs. ``temperature``/``max_tokens``/``top_p`` override the agent's
    model config for this turn (and are recorded on the reply); transient provider errors
    are retried ``max_retries`` times with backoff from ``retry_delay`` seconds;
    ``timeout`` bounds each model call; ``max_tool_rounds`` bounds rounds of tool calls."""

    max_retries: int = 3
    timeout: float | None = 120.0
    max_tool_rounds: int = 10
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    retry_delay: float = DEFAULT_RETRY_DELAY

    def __post_init__(self) -> None:
        check_call_params(self.max_retries, self.timeout, self.retry_delay)
        check_tool_rounds(self.max_tool_rounds)
        for field in ("temperature", "top_p"):
            value = getattr(self, field)
            if value is not None and not _number(value):
                raise ValidationError(field, f"must be a finite number or None, got "
                                      f"{value!r}", value)
        if self.max_tokens is not None and not (_int(self.max_tokens)
                                                and self.max_tokens >= 1):
            raise ValidationError("max_tokens", f"must be an int >= 1 or None, got "
                                  f"{self.max_tokens!r}", self.max_tokens)

    @classmethod
    def of(cls, keywords: Mapping[str, Any]) -> TurnOptions:
        """The options a turn's ``**options`` keywords give; a keyword that is no turn
        option is a ValidationError naming it (a credential says where credentials go)."""
        unknown = sorted(set(keywords) - _FIELDS, key=str)
        if unknown:
            key = str(unknown[0])
            hint = (" credentials are never passed per call: set them in the environment "
                    "(e.g. OPENAI_API_KEY) or LiteLLM's settings" if is_credential_key(key)
                    else f" a turn takes {', '.join(sorted(_FIELDS))}")
            raise ValidationError(key, f"is not a turn option;{hint}", None)
        return cls(**keywords)

    def overrides(self) -> dict[str, Any]:
        """The model parameters this turn sets over the agent's model config."""
        given = {"temperature": self.temperature, "max_tokens": self.max_tokens,
                 "top_p": self.top_p}
        return {k: v for k, v in given.items() if v is not None}


_FIELDS = frozenset(TurnOptions.__dataclass_fields__)


def check_tools(value: object) -> None:
    """``mcp`` (the tools of a turn) must be None or a ToolProvider: an object with callable
    ``tool_schemas`` and ``execute`` (an MCPManager, or your own); else ValidationError,
    before any model is called."""
    if value is None:
        return
    missing = [m for m in ("tool_schemas", "execute") if not callable(getattr(value, m, None))]
    if missing:
        raise ValidationError("mcp", f"must be None or a ToolProvider (with tool_schemas() "
                              f"and execute()), got {type(value).__name__} without "
                              f"{' and '.join(missing)}", None)


def check_tool_rounds(value: object) -> None:
    """``max_tool_rounds`` must be an int >= 1 (ValidationError otherwise)."""
    if not (_int(value) and value >= 1):  # type: ignore[operator]
        raise ValidationError("max_tool_rounds", "must be an int >= 1", value)


def check_call_params(max_retries: object, timeout: object, retry_delay: object) -> None:
    """Reject a negative ``max_retries``, a ``timeout`` that is not a positive number of
    seconds (or None) and a negative ``retry_delay`` (ValidationError naming the field)."""
    if not (_int(max_retries) and max_retries >= 0):  # type: ignore[operator]
        raise ValidationError("max_retries", "must be an int >= 0", max_retries)
    if timeout is not None and not (_number(timeout) and timeout > 0):  # type: ignore[operator]
        raise ValidationError("timeout", "must be a positive number of seconds or None", timeout)
    if not (_number(retry_delay) and retry_delay >= 0):  # type: ignore[operator]
        raise ValidationError("retry_delay", "must be a number of seconds >= 0", retry_delay)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
