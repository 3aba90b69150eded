"""What is read off a conversation's messages, the same way for both agent types: the last
response and the token usage."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from typing import NamedTuple

from immagent.assets import Message

__all__ = ["TokenUsage", "last_response", "token_usage"]


class TokenUsage(NamedTuple):
    """``(input_tokens, output_tokens)`` summed over a conversation's model calls.

    It is also awaitable and gives itself: immagent 0.1.2 made ``token_usage()`` a
    coroutine on both agent types, so ``await agent.token_usage()`` works on a
    SimpleAgent as well as the plain ``agent.token_usage()`` call.
    """

    input_tokens: int
    output_tokens: int

    def __await__(self) -> Generator[None, None, TokenUsage]:
        yield from ()  # nothing to wait for: the figures are already known
        return self


def token_usage(messages: Iterable[Message]) -> TokenUsage:
    """Token usage summed over the assistant messages; ``(0, 0)`` when there are none."""
    replies = [m for m in messages if m.role == "assistant"]
    return TokenUsage(sum(m.input_tokens or 0 for m in replies),
                      sum(m.output_tokens or 0 for m in replies))


def last_response(messages: Sequence[Message]) -> str | None:
    """Text of the newest assistant message that has text, or None."""
    for message in reversed(messages):
        if message.role == "assistant" and message.content:
            return message.content
    return None
