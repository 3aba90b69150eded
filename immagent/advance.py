"""One conversational turn as pure orchestration: (history, input, model, tools) -> new messages.

No I/O lives here: the model is a ``CompleteFn`` (``immagent.llm.bind`` makes one) and tools
are a ``ToolProvider`` (``immagent.MCPManager`` is one). Nothing is stored; the caller
(SimpleAgent, or the Store in one transaction) decides what to keep, so a failed turn
leaves no trace.

``Turn`` is the loop, written once: ``advance()`` runs it with whole replies and returns
the new messages; a streamed turn (``immagent.stream``) runs it with a ``StreamingModel``
and hands its events (text deltas, replies, tool calls and results) to the caller as they
happen. A turn stopped half-way knows what it has produced so far (``Turn.partial``).

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
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from immagent.assets import Message, ToolCall
from immagent.exceptions import ToolExecutionError
from immagent.options import check_tool_rounds
from immagent.validate import MAX_INPUT_BYTES, check_text

__all__ = [
    "AssistantReply",
    "CompleteFn",
    "StepEvent",
    "StreamingModel",
    "TextDelta",
    "ToolCallRequest",
    "ToolProvider",
    "ToolResult",
    "Turn",
    "advance",
    "check_turn_input",
]

logger = logging.getLogger("immagent")


class CompleteFn(Protocol):
    """One model call; the closure holds model, system prompt and config."""

    async def __call__(self, messages: Sequence[Message],
                       tools: Sequence[dict[str, Any]] | None) -> Message:
        """Return the assistant Message (content and/or tool_calls, tokens, model, call_config)."""
        ...


class StreamingModel(Protocol):
    """One streamed model call per ``stream()``, and what a reply cut short is stored as
    (``immagent.llm.bind`` makes one)."""

    def stream(self, messages: Sequence[Message],
               tools: Sequence[dict[str, Any]] | None) -> AsyncGenerator[str | Message, None]:
        """The reply's text pieces as they arrive, then its whole assistant Message."""
        ...

    def interrupted(self, text: str) -> Message:
        """The assistant message of a reply stopped after ``text`` (marked interrupted)."""
        ...


class ToolProvider(Protocol):
    """Tools the model may call (LiteLLM/OpenAI "function" schemas) and how to run them."""

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools to offer, as LiteLLM/OpenAI function tool schemas."""
        ...

    async def execute(self, name: str, arguments: dict[str, Any]) -> str:
        """Run one tool and return its text; raise ToolExecutionError on failure."""
        ...


# -- what a turn emits ---------------------------------------------------------------------
# ``round`` counts the turn's model calls: 0 for the first, one more after each tool round.

@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the assistant's text, as the model produced it."""

    text: str
    round: int


@dataclass(frozen=True, slots=True)
class AssistantReply:
    """A model call finished: its whole assistant message (text, tool calls, usage)."""

    message: Message
    round: int


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """The model asked for this tool call; the round's calls then run concurrently."""

    call: ToolCall
    round: int


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool call finished (``message.is_error`` if it failed), in the order calls finish;
    the stored results keep the calls' order."""

    call: ToolCall
    message: Message
    round: int


StepEvent: TypeAlias = TextDelta | AssistantReply | ToolCallRequest | ToolResult


def check_turn_input(user_input: object, max_tool_rounds: object) -> str:
    """The user input of a turn, checked (field ``user_input``, 0.1.2's parameter name),
    and the tool-round limit checked to be an int >= 1; else ValidationError."""
    text = check_text("user_input", user_input, max_bytes=MAX_INPUT_BYTES)
    check_tool_rounds(max_tool_rounds)
    return text


class Turn:
    """One turn as it runs: ``events()`` drives it; ``messages`` are the new messages
    complete so far (the whole turn once ``events()`` is exhausted); ``partial()`` is what
    to keep if it is stopped now."""

    def __init__(self, *, history: Sequence[Message], user_input: str, model: StreamingModel,
                 tools: ToolProvider | None = None, max_tool_rounds: int = 10) -> None:
        """Check the input (ValidationError) and set the turn up; nothing runs yet."""
        check_turn_input(user_input, max_tool_rounds)
        self._history = history
        self._model, self._tools, self._max_rounds = model, tools, max_tool_rounds
        self.messages: list[Message] = [Message(role="user", content=user_input)]
        self._text: list[str] | None = None  # the reply being streamed, if one is
        self._calls: Sequence[ToolCall] = ()  # asked for and not all answered yet
        self._answered: dict[int, Message] = {}

    def partial(self) -> list[Message]:
        """The new messages if the turn stopped now: a reply cut short is kept with the
        text it had (marked ``interrupted``), and tool calls not answered yet get error
        results (marked too), so the conversation stays valid for every provider."""
        out = list(self.messages)
        if self._text is not None:
            out.append(self._model.interrupted("".join(self._text)))
        for i, call in enumerate(self._calls):
            out.append(self._answered[i] if i in self._answered else _error_result(
                call, "the turn was interrupted before this tool call finished",
                interrupted=True))
        return out

    async def events(self) -> AsyncGenerator[StepEvent, None]:
        """Run the turn, yielding what happens; raises what the model raises (LLMError)."""
        conversation = [*self._history, *self.messages]
        rounds = 0
        while True:
            # Asked on every call: a provider may withdraw tools mid-turn (a server died).
            schemas = self._tools.tool_schemas() if self._tools is not None else []
            self._text = []
            reply: Message | None = None
            async with aclosing(self._model.stream(conversation, schemas or None)) as pieces:
                async for item in pieces:
                    if isinstance(item, Message):
                        reply = item
                    else:
                        self._text.append(item)
                        yield TextDelta(item, rounds)
            if reply is None or reply.role != "assistant":
                raise TypeError("a model call must end with an assistant Message, got "
                                f"{reply!r}")
            self._text = None
            self.messages.append(reply)
            conversation.append(reply)
            self._calls, self._answered = reply.tool_calls or (), {}
            yield AssistantReply(reply, rounds)
            if not self._calls:
                break
            if rounds == self._max_rounds:
                logger.warning("advance: the model asked for %d tool call(s) after the limit "
                               "of %d tool round(s); answering them with errors and ending "
                               "the turn", len(self._calls), self._max_rounds)
                calls, self._calls = self._calls, ()
                results = [_error_result(call, f"not run: the limit of {self._max_rounds} "
                                         "tool round(s) for this turn was reached")
                           for call in calls]
                self.messages.extend(results)
                for call, result in zip(calls, results, strict=True):
                    yield ToolCallRequest(call, rounds)
                    yield ToolResult(call, result, rounds)
                break
            for call in self._calls:
                yield ToolCallRequest(call, rounds)
            async with aclosing(self._run_round(rounds)) as running:
                async for event in running:
                    yield event
            results = [self._answered[i] for i in range(len(self._calls))]
            self._calls, self._answered = (), {}
            self.messages.extend(results)
            conversation.extend(results)
            rounds += 1
        logger.debug("advance: %d new message(s), %d tool round(s)", len(self.messages), rounds)

    async def _run_round(self, round_: int) -> AsyncGenerator[ToolResult, None]:
        """Run the round's calls concurrently, yielding each result as its call finishes."""
        calls = self._calls
        tasks: dict[asyncio.Future[Message], int] = {
            asyncio.ensure_future(_run_one(call, self._tools)): i
            for i, call in enumerate(calls)}
        pending: set[asyncio.Future[Message]] = set(tasks)
        failure: BaseException | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=tasks.__getitem__):
                    i = tasks[task]
                    if task.exception() is not None:
                        failure = failure or task.exception()
                        continue
                    self._answered[i] = task.result()
                    yield ToolResult(calls[i], task.result(), round_)
        finally:
            # Stopped early (the caller left, or was cancelled): no call keeps running.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Tool failures are already results. Anything else is a bug, not the model's
        # business: re-raise it, but only once every call of the round has finished.
        if failure is not None:
            raise failure


class _Whole:
    """A CompleteFn as a StreamingModel: one reply, no pieces."""

    def __init__(self, complete: CompleteFn) -> None:
        self._complete = complete

    async def stream(self, messages: Sequence[Message],
                     tools: Sequence[dict[str, Any]] | None) -> AsyncGenerator[str | Message, None]:
        yield await self._complete(messages, tools)

    def interrupted(self, text: str) -> Message:
        return Message(role="assistant", content=text or None, interrupted=True)


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
    turn = Turn(history=history, user_input=user_input, model=_Whole(complete), tools=tools,
                max_tool_rounds=max_tool_rounds)
    async with aclosing(turn.events()) as events:
        async for _ in events:
            pass
    return turn.messages


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
                                 f"{call.arguments[:200]!r}", tool_name=call.name) from exc
    if not isinstance(arguments, dict):
        raise ToolExecutionError(f"tool {call.name!r}: arguments must be a JSON object, got "
                                 f"{type(arguments).__name__}", tool_name=call.name)
    return arguments


def _error_result(call: ToolCall, message: str, *, interrupted: bool = False) -> Message:
    # Tool messages have no error flag on the wire (OpenAI format), so the text says it.
    return Message(role="tool", content=f"Error: {message}", tool_call_id=call.id,
                   is_error=True, interrupted=interrupted)
