"""One live turn, shared by SimpleAgent and PersistentAgent: per-call settings merged over
the agent's model config, the model bound through LiteLLM, then the pure loop of
``immagent.advance`` (its ``Turn``): whole with ``run_turn``, streamed with ``open_turn``.

``advance`` is the pure loop (no I/O: the model and tools are passed in); this module makes
a turn live by binding the model. It was ``turn.py``, a name that promised the ``Turn``
class ``advance.py`` defines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from immagent import llm
from immagent.advance import ToolProvider, Turn, advance, check_turn_input
from immagent.assets import Message
from immagent.options import TurnKeywords, TurnOptions, check_tools

__all__ = ["check_turn", "open_turn", "run_turn"]


def check_turn(user_input: object, options: TurnKeywords | TurnOptions) -> TurnOptions:
    """The turn's options, validated with its input before anything is read or any model
    is called (ValidationError naming the field: an empty or oversized ``user_input``,
    ``max_tool_rounds < 1``, ``max_retries < 0``, ``timeout <= 0``, ...)."""
    checked = options if isinstance(options, TurnOptions) else TurnOptions.of(options)
    check_turn_input(user_input, checked.max_tool_rounds)
    return checked


def _bind(model: str, system_prompt: str, model_config: Mapping[str, Any],
          opts: TurnOptions) -> llm.BoundModel:
    return llm.bind(model, system_prompt, {**model_config, **opts.overrides()},
                    opts.max_retries, opts.timeout, retry_delay=opts.retry_delay)


async def run_turn(
    *,
    model: str,
    system_prompt: str,
    model_config: Mapping[str, Any],
    history: Sequence[Message],
    user_input: str,
    tools: ToolProvider | None = None,
    options: TurnOptions | None = None,
) -> list[Message]:
    """The new messages of one turn; nothing is stored. ``options`` (defaults if None)
    override ``model_config`` for this turn only (recorded on the reply)."""
    opts = check_turn(user_input, options or TurnOptions())
    check_tools(tools)
    return await advance(history=history, user_input=user_input,
                         complete=_bind(model, system_prompt, model_config, opts),
                         tools=tools, max_tool_rounds=opts.max_tool_rounds)


def open_turn(
    *,
    model: str,
    system_prompt: str,
    model_config: Mapping[str, Any],
    history: Sequence[Message],
    user_input: str,
    tools: ToolProvider | None = None,
    options: TurnOptions | None = None,
) -> Turn:
    """``run_turn``, streamed: the Turn, set up and not started (``Turn.events()`` runs
    it, each model call streamed)."""
    opts = check_turn(user_input, options or TurnOptions())
    check_tools(tools)
    return Turn(history=history, user_input=user_input,
                model=_bind(model, system_prompt, model_config, opts), tools=tools,
                max_tool_rounds=opts.max_tool_rounds)
