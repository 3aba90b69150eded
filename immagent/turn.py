"""One live turn, shared by SimpleAgent and PersistentAgent: per-call settings merged over
the agent's model config, the model bound through LiteLLM, then the pure advance loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from immagent import llm
from immagent.advance import ToolProvider, advance, check_turn_input
from immagent.assets import Message

__all__ = ["check_turn", "run_turn"]


def check_turn(user_input: object, *, max_tool_rounds: object, max_retries: object,
               timeout: object, retry_delay: object = llm.DEFAULT_RETRY_DELAY) -> None:
    """Reject bad turn arguments with a ValidationError before anything is read or any
    model is called: empty or oversized ``user_input``, ``max_tool_rounds < 1``,
    ``max_retries < 0``, ``timeout <= 0``, ``retry_delay < 0``."""
    check_turn_input(user_input, max_tool_rounds)
    llm.check_call_params(max_retries, timeout, retry_delay)


async def run_turn(
    *,
    model: str,
    system_prompt: str,
    model_config: Mapping[str, Any],
    history: Sequence[Message],
    user_input: str,
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    tools: ToolProvider | None = None,
    max_retries: int = 3,
    timeout: float | None = 120.0,
    max_tool_rounds: int = 10,
    retry_delay: float = llm.DEFAULT_RETRY_DELAY,
) -> list[Message]:
    """The new messages of one turn; nothing is stored. ``temperature``, ``max_tokens`` and
    ``top_p`` override ``model_config`` for this turn only (recorded on the reply)."""
    check_turn(user_input, max_tool_rounds=max_tool_rounds, max_retries=max_retries,
               timeout=timeout, retry_delay=retry_delay)
    overrides = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
    config = {**model_config, **{k: v for k, v in overrides.items() if v is not None}}
    complete = llm.bind(model, system_prompt, config, max_retries, timeout,
                        retry_delay=retry_delay)
    return await advance(history=history, user_input=user_input, complete=complete,
                         tools=tools, max_tool_rounds=max_tool_rounds)
