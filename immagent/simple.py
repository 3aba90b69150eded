"""SimpleAgent: an immutable, in-memory agent for scripts and experiments (no store, no ids).

It runs the same turn logic as the persistent agent (``immagent.advance``) with the model
call from ``immagent.llm``; ``advance`` returns a new SimpleAgent and leaves this one as
it was, also when the turn fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from immagent import llm
from immagent.advance import ToolProvider
from immagent.assets import Message
from immagent.turn import run_turn
from immagent.validate import MAX_NAME_CHARS, check_text

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

    __slots__ = ("_messages", "_model", "_model_config", "_name", "_system_prompt")

    _name: str
    _system_prompt: str
    _model: str
    _model_config: dict[str, Any]
    _messages: MessageList

    def __init__(self, name: str, system_prompt: str, model: str,
                 model_config: Mapping[str, Any] | None = None) -> None:
        """Validate and hold the agent's settings; it starts with no messages."""
        self._set(
            name=check_text("name", name, max_bytes=MAX_NAME_CHARS),
            system_prompt=check_text("system_prompt", system_prompt),
            # str() stores a Model member as its plain value.
            model=str(check_text("model", model, max_bytes=MAX_NAME_CHARS)),
            model_config=llm.check_config(model_config),
            messages=MessageList(),
        )

    def _set(self, *, name: str, system_prompt: str, model: str,
             model_config: dict[str, Any], messages: MessageList) -> None:
        setattr_ = object.__setattr__  # the only writes, made while constructing
        setattr_(self, "_name", name)
        setattr_(self, "_system_prompt", system_prompt)
        setattr_(self, "_model", model)
        setattr_(self, "_model_config", model_config)
        setattr_(self, "_messages", messages)

    def _with_messages(self, added: Iterable[Message]) -> SimpleAgent:
        new = object.__new__(SimpleAgent)
        new._set(name=self._name, system_prompt=self._system_prompt, model=self._model,
                 model_config=self._model_config, messages=MessageList((*self._messages,
                                                                        *added)))
        return new

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("SimpleAgent is immutable; advance() returns a new agent")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("SimpleAgent is immutable")

    def __repr__(self) -> str:
        return (f"SimpleAgent(name={self._name!r}, model={self._model!r}, "
                f"messages={len(self._messages)})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SimpleAgent):
            return NotImplemented
        return (self._name, self._system_prompt, self._model, self._model_config,
                self._messages) == (other._name, other._system_prompt, other._model,
                                    other._model_config, other._messages)

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
    def messages(self) -> MessageList:
        """Every message so far (user, assistant, tool); also callable: ``messages()``."""
        return self._messages

    def last_response(self) -> str | None:
        """Text of the newest assistant message that has text, or None."""
        for message in reversed(self._messages):
            if message.role == "assistant" and message.content:
                return message.content
        return None

    def token_usage(self) -> tuple[int, int]:
        """(input_tokens, output_tokens) summed over every model call so far."""
        return (sum(m.input_tokens or 0 for m in self._messages),
                sum(m.output_tokens or 0 for m in self._messages))

    async def advance(
        self,
        input: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        mcp: ToolProvider | None = None,
        max_retries: int = 3,
        timeout: float | None = 120.0,
        max_tool_rounds: int = 10,
        retry_delay: float = llm.DEFAULT_RETRY_DELAY,
    ) -> SimpleAgent:
        """Send ``input``, run any tool calls (via ``mcp``), return the new agent.

        ``temperature``/``max_tokens``/``top_p`` override ``model_config`` for this turn.
        Raises ValidationError, LLMError; this agent is unchanged either way.
        """
        added = await run_turn(
            model=self._model, system_prompt=self._system_prompt,
            model_config=self._model_config, history=self._messages, user_input=input,
            temperature=temperature, max_tokens=max_tokens, top_p=top_p, tools=mcp,
            max_retries=max_retries, timeout=timeout, max_tool_rounds=max_tool_rounds,
            retry_delay=retry_delay,
        )
        return self._with_messages(added)
