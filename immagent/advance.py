"""One conversational turn as pure orchestration: (history, input, model, tools) -> new messages.

No I/O lives here: the model is a ``CompleteFn`` (``immagent.llm.bind`` makes one) and tools
are a ``ToolProvider`` (``immagent.MCPManager`` is one). Nothing is stored; the caller
(SimpleAgent, or the Store in one transaction) decides what to keep, so a failed turn
leaves no trace.

Tool-round limit: ``max_tool_rounds`` (at least 1, as in immagent 0.1.2) is the number of
rounds of tool execution allowed in one turn, so the model is called at most
``max_tool_rounds + 1`` times. If the model still
asks for tools after the last allowed round, those calls are *not* run: each is answered
with an error tool result saying the limit was reached, and the turn ends there (logged as
a warning). Answering every call keeps the conversation valid for every provider (an
assistant tool call without a result is rejected by OpenAI and Anthropic), and tools are
offered on every call, because Anthropic rejects a history holding tool calls when no
tools are given. The turn then ends on tool results; the next user input continues it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from immagent.assets import Message, ToolCall
from immagent.exceptions import ToolExecutionError
from immagent.options import check_tool_rounds
from immagent.validate import MAX_INPUT_BYTES, check_text

__all__ = ["CompleteFn", "ToolProvider", "advance", "check_turn_input"]

logger = logging.getLogger("immagent")


class CompleteFn(Protocol):
    """One model call; the closure holds model, system prompt and config."""

    async def __call__(self, messages: Sequence[Message],
                       tools: Sequence[dict[str, Any]] | None) -> Message:
        """Return the assistant Message (content and/or tool_calls, tokens, model, call_config)."""
        ...


class ToolProvider(Protocol):
    """Tools the model may call (LiteLLM/OpenAI "function" schemas) and how to run them."""

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools to offer, as LiteLLM/OpenAI function tool schemas."""
        ...

    async def execute(self, name: str, arguments: dict[str, Any]) -> str:
        """Run one tool and return its text; raise ToolExecutionError on failure."""
        ...


def check_turn_input(user_input: object, max_tool_rounds: object) -> str:
    """The user input of a turn, checked (field ``user_input``, 0.1.2's parameter name),
    and the tool-round limit checked to be an int >= 1; else ValidationError."""
    text = check_text("user_input", user_input, max_bytes=MAX_INPUT_BYTES)
    check_tool_rounds(max_tool_rounds)
    return text


async def advance(
    *,
    history: Sequence[Message],
    user_input: str,
    complete: CompleteFn,
    tools: ToolProvider | None = None,
    max_tool_rounds: int = 10,
) -> list[Message]:
    """Run one turn and return only the new messages.

    They are: the user message, then the assistant message(s) interleaved with tool
    result messages (role "tool"; ``is_error=True`` for a failed call). The system prompt
    is not part of ``history``; ``complete`` adds it. Raises ValidationError (before
    ``complete`` is called) for an empty or oversized input or a ``max_tool_rounds`` below
    1, and whatever ``complete`` raises (LLMError) unchanged.
    """
    check_turn_input(user_input, max_tool_rounds)

    conversation = list(history)
    new: list[Message] = [Message(role="user", content=user_input)]
    conversation.extend(new)
    rounds = 0
    while True:
        # Asked on every call: a provider may withdraw tools mid-turn (a server died).
        schemas = tools.tool_schemas() if tools is not None else []
        reply = await complete(conversation, schemas or None)
        if reply.role != "assistant":
            raise TypeError(f"CompleteFn must return an assistant Message, got role {reply.role!r}")
        new.append(reply)
        conversation.append(reply)
        if not reply.tool_calls:
            break
        if rounds == max_tool_rounds:
            logger.warning("advance: the model asked for %d tool call(s) after the limit of %d "
                           "tool round(s); answering them with errors and ending the turn",
                           len(reply.tool_calls), max_tool_rounds)
            new.extend(_error_result(call, f"not run: the limit of {max_tool_rounds} tool "
                                     "round(s) for this turn was reached")
                       for call in reply.tool_calls)
            break
        results = await _run_round(reply.tool_calls, tools)
        rounds += 1
        new.extend(results)
        conversation.extend(results)
    logger.debug("advance: %d new message(s), %d tool round(s)", len(new), rounds)
    return new


async def _run_round(calls: Sequence[ToolCall], tools: ToolProvider | None) -> list[Message]:
    """Run one round of tool calls concurrently; results keep the calls' order."""
    outcomes = await asyncio.gather(*(_run_one(call, tools) for call in calls),
                                    return_exceptions=True)
    # Tool failures are already results. Anything else is a bug, not the model's business:
    # re-raise it, but only once every call of the round has finished (none left running).
    results: list[Message] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


async def _run_one(call: ToolCall, tools: ToolProvider | None) -> Message:
    if tools is None:
        return _error_result(call, f"no tools are available (asked for {call.name!r})")
    try:
        text = await tools.execute(call.name, _parse_arguments(call))
    except ToolExecutionError as exc:
        logger.info("advance: tool %r failed: %s", call.name, exc)
        return _error_result(call, str(exc))
    return Message(role="tool", content=text, tool_call_id=call.id)


def _parse_arguments(call: ToolCall) -> dict[str, Any]:
    """The call's JSON arguments as an object; bad JSON is a tool error the model can read."""
    if not call.arguments.strip():  # some providers send "" for a call without arguments
        return {}
    try:
        arguments = json.loads(call.arguments)
    except ValueError as exc:
        raise ToolExecutionError(f"tool {call.name!r}: arguments are not valid JSON ({exc}): "
                                 f"{call.arguments[:200]!r}") from exc
    if not isinstance(arguments, dict):
        raise ToolExecutionError(f"tool {call.name!r}: arguments must be a JSON object, got "
                                 f"{type(arguments).__name__}")
    return arguments


def _error_result(call: ToolCall, message: str) -> Message:
    # Tool messages have no error flag on the wire (OpenAI format), so the text says it.
    return Message(role="tool", content=f"Error: {message}", tool_call_id=call.id,
                   is_error=True)
