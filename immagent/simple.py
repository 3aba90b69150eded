"""SimpleAgent: an immutable, in-memory agent for scripts and experiments (no store, no ids).

It runs the same turn logic as the persistent agent (``immagent.advance``) with the model
call from ``immagent.llm``; ``advance`` returns a new SimpleAgent and leaves this one as
it was, also when the turn fails.

Seed compatibility (immagent 0.1.2): construction by keyword or position, ``messages``
as an attribute or a call, ``clone()`` and ``with_metadata()`` as plain methods, and
``token_usage()`` returning a tuple that can also be awaited (0.1.2 made it a coroutine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn, Unpack

from immagent import history
from immagent.advance import ToolProvider
from immagent.assets import Message
from immagent.live import check_turn, open_turn, run_turn
from immagent.options import TurnKeywords
from immagent.stream import Started, TurnStream
from immagent.validate import check_agent_fields, check_json_mapping, check_text

__all__ = ["MessageList", "SimpleAgent"]


class MessageList(tuple[Message, ...]):
    """The conversation as a tuple; calling it returns itself.

    The seed README reads ``agent.messages`` as an attribute while its API table calls
    ``agent.messages()``; this type makes both spellings work.
    """

    __slots__ = ()

    def __call__(self) -> MessageList:
        return self


class SimpleAgent:
    """An immutable agent held in memory: ``agent = await agent.advance("Hello!")``."""

    __slots__ = ("_messages", "_metadata", "_model", "_model_config", "_name",
                 "_system_prompt")

    _name: str
    _system_prompt: str
    _model: str
    _model_config: dict[str, Any]
    _metadata: dict[str, Any]
    _messages: MessageList

    def __init__(self, name: str, system_prompt: str, model: str,
                 model_config: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        """Validate and hold the agent's settings; it starts with no messages.

        ``metadata`` is free JSON-like data carried along (never sent to the model).
        """
        # The rule create_agent and imported records meet too (no control characters in a
        # name or model, a config without credentials, JSON-like metadata).
        fields = check_agent_fields(name, model, model_config, metadata)
        self._set(
            name=fields.name,
            system_prompt=check_text("system_prompt", system_prompt),
            # str() stores a Model member as its plain value.
            model=str(fields.model),
            model_config=fields.model_config,
            metadata=fields.metadata,
            messages=MessageList(),
        )

    def _set(self, *, name: str, system_prompt: str, model: str,
             model_config: dict[str, Any], metadata: dict[str, Any],
             messages: MessageList) -> None:
        setattr_ = object.__setattr__  # the only writes, made while constructing
        setattr_(self, "_name", name)
        setattr_(self, "_system_prompt", system_prompt)
        setattr_(self, "_model", model)
        setattr_(self, "_model_config", model_config)
        setattr_(self, "_metadata", metadata)
        setattr_(self, "_messages", messages)

    def _evolve(self, *, added: Iterable[Message] = (),
                metadata: dict[str, Any] | None = None) -> SimpleAgent:
        """A new agent with ``added`` appended and, if given, ``metadata`` (already valid)."""
        new = object.__new__(SimpleAgent)
        new._set(name=self._name, system_prompt=self._system_prompt, model=self._model,
                 model_config=self._model_config,
                 metadata=self._metadata if metadata is None else metadata,
                 messages=MessageList((*self._messages, *added)))
        return new

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("SimpleAgent is immutable; advance() returns a new agent")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("SimpleAgent is immutable")

    def __repr__(self) -> str:
        return (f"SimpleAgent(name={self._name!r}, model={self._model!r}, "
                f"messages={len(self._messages)})")

    def _key(self) -> tuple[object, ...]:
        return (self._name, self._system_prompt, self._model, self._model_config,
                self._metadata, self._messages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SimpleAgent):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self._name, self._system_prompt, self._model, len(self._messages)))

    @property
    def name(self) -> str:
        """The agent's name."""
        return self._name

    @property
    def system_prompt(self) -> str:
        """The system prompt sent before the conversation on every call."""
        return self._system_prompt

    @property
    def model(self) -> str:
        """The LiteLLM model string."""
        return self._model

    @property
    def model_config(self) -> dict[str, Any]:
        """Default model parameters (a copy, in canonical form)."""
        return dict(self._model_config)

    @property
    def metadata(self) -> dict[str, Any]:
        """The agent's metadata (a copy, in canonical form)."""
        return dict(self._metadata)

    @property
    def messages(self) -> MessageList:
        """Every message so far (user, assistant, tool); also callable: ``messages()``."""
        return self._messages

    def last_response(self) -> str | None:
        """Text of the newest assistant message that has text, or None."""
        return history.last_response(self._messages)

    def token_usage(self) -> history.TokenUsage:
        """(input_tokens, output_tokens) summed over every model call so far.

        Use it as a tuple, ``agent.token_usage()``, or await it as in immagent 0.1.2,
        ``await agent.token_usage()``: both give the same TokenUsage.
        """
        return history.token_usage(self._messages)

    def clone(self) -> SimpleAgent:
        """A new agent equal to this one, to advance in another direction."""
        return self._evolve()

    def with_metadata(self, metadata: Mapping[str, Any]) -> SimpleAgent:
        """A new agent whose metadata is ``metadata`` (a JSON-like mapping)."""
        return self._evolve(metadata=check_json_mapping("metadata", metadata))

    async def advance(self, user_input: str, *, mcp: ToolProvider | None = None,
                      **options: Unpack[TurnKeywords]) -> SimpleAgent:
        """Send ``user_input``, run any tool calls (via ``mcp``), return the new agent.

        ``options`` are the turn's keywords (``TurnOptions``: ``max_retries``,
        ``timeout``, ``max_tool_rounds``, ``temperature``, ``max_tokens``, ``top_p``,
        ``retry_delay``). Raises ValidationError (before any model call) and LLMError;
        this agent is unchanged either way.
        """
        added = await run_turn(
            model=self._model, system_prompt=self._system_prompt,
            model_config=self._model_config, history=self._messages, user_input=user_input,
            tools=mcp, options=check_turn(user_input, options),
        )
        return self._evolve(added=added)

    def stream(self, user_input: str, *, mcp: ToolProvider | None = None,
               keep_partial: bool = False,
               **options: Unpack[TurnKeywords]) -> TurnStream[SimpleAgent]:
        """``advance``, streamed: a TurnStream of the turn's events; the new agent is
        ``stream.agent`` once ``TurnDone`` has arrived (this agent is unchanged either way).

        Stopped early, the stream makes no agent, unless ``keep_partial``: then
        ``stream.agent`` holds what the turn produced, the cut-off reply marked
        ``interrupted``. Input and options are checked here, at once.
        """
        opts = check_turn(user_input, options)

        async def start() -> Started[SimpleAgent]:
            turn = open_turn(
                model=self._model, system_prompt=self._system_prompt,
                model_config=self._model_config, history=self._messages,
                user_input=user_input, tools=mcp, options=opts,
            )

            async def save(messages: Sequence[Message]) -> SimpleAgent:
                return self._evolve(added=messages)

            return Started(turn, save)

        return TurnStream(start, keep_partial=keep_partial)
