"""The language-model call: LiteLLM with our own retries, a hard timeout and error mapping.

LiteLLM is imported lazily (it takes seconds to import), only when the first call is made.
Its own retry machinery is switched off (``num_retries=0``, ``max_retries=0``): it silently
does nothing without ``tenacity`` and retries authentication errors when it does, so the
retry loop here is the only one, keyed on exception class.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from immagent.assets import Message, ToolCall
from immagent.exceptions import LLMError, ValidationError
from immagent.options import DEFAULT_RETRY_DELAY, check_call_params
from immagent.validate import (
    MAX_NAME_CHARS,
    RESERVED_CONFIG_KEYS,
    check_config,
    check_text,
    redact_secrets,
    scrub_text,
)

if TYPE_CHECKING:
    from types import ModuleType

    from immagent.advance import CompleteFn

__all__ = [
    "DEFAULT_RETRY_DELAY",
    "RESERVED_CONFIG_KEYS",
    "Model",
    "bind",
    "check_call_params",
    "check_config",
    "complete",
    "to_litellm_messages",
]

logger = logging.getLogger("immagent")


class Model(StrEnum):
    """Common LiteLLM model strings; any other LiteLLM model string works as well."""

    # Anthropic
    CLAUDE_3_5_HAIKU = "anthropic/claude-3-5-haiku-20241022"
    CLAUDE_SONNET_4 = "anthropic/claude-sonnet-4-20250514"
    CLAUDE_OPUS_4 = "anthropic/claude-opus-4-20250514"
    # OpenAI
    GPT_4O = "openai/gpt-4o"
    GPT_4O_MINI = "openai/gpt-4o-mini"
    O1 = "openai/o1"
    O1_MINI = "openai/o1-mini"
    # Offline test double (immagent.testing): replies "Echo: <last user input>".
    ECHO = "immagent/echo"


MAX_RETRY_DELAY = 30.0


def _litellm() -> ModuleType:
    """Import LiteLLM once, offline-safe, with our test provider registered."""
    # Without this LiteLLM downloads a price map over the network at import time.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    # LiteLLM prints "Give Feedback / Get Help" banners to stdout on every error;
    # a library must not write to its user's stdout.
    litellm.suppress_debug_info = True
    from immagent import testing

    testing.register()
    return litellm


def _retryable(litellm: ModuleType) -> tuple[type[Exception], ...]:
    # BadGatewayError (502) is the same kind of transient gateway failure as a 503.
    return (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError,
            litellm.InternalServerError, litellm.ServiceUnavailableError,
            litellm.BadGatewayError)


def _never_retry(litellm: ModuleType) -> tuple[type[Exception], ...]:
    # Checked first: some of these subclass retryable OpenAI base classes.
    return (litellm.AuthenticationError, litellm.BadRequestError,
            litellm.ContextWindowExceededError, litellm.PermissionDeniedError,
            litellm.NotFoundError)


def to_litellm_messages(system_prompt: str, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the OpenAI chat format LiteLLM takes, system prompt first."""
    out: list[dict[str, Any]] = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt})
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""})
        elif m.role == "assistant":
            d: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
            out.append(d)
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


def _backoff(attempt: int, base: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    delay = min(MAX_RETRY_DELAY, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _to_message(response: Any, model: str, config: dict[str, Any]) -> Message:
    """Turn a LiteLLM ModelResponse into an assistant Message (tokens, model, call_config)."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise LLMError(f"{model}: the response has no choices")
    reply = choices[0].message
    tool_calls: tuple[ToolCall, ...] | None = None
    if reply.tool_calls:
        calls = []
        for i, tc in enumerate(reply.tool_calls):
            args = tc.function.arguments
            # Some providers hand back parsed arguments; the Message keeps JSON text.
            if not isinstance(args, str):
                args = json.dumps(args if args is not None else {}, ensure_ascii=False)
            calls.append(ToolCall(id=scrub_text(str(tc.id or f"call_{i}")),
                                  name=scrub_text(str(tc.function.name or "")),
                                  arguments=scrub_text(args)))
        tool_calls = tuple(calls)
    content = scrub_text(reply.content) if isinstance(reply.content, str) else None
    usage = getattr(response, "usage", None)
    return Message(
        role="assistant",
        content=content,
        tool_calls=tool_calls,
        input_tokens=_count(getattr(usage, "prompt_tokens", None)),
        output_tokens=_count(getattr(usage, "completion_tokens", None)),
        model=model,
        call_config=config or None,
    )


def _count(value: object) -> int | None:
    """A token count as the Message stores it (providers sometimes send floats or junk)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) and 0 <= value < 2**63 else None


async def complete(
    model: str,
    system_prompt: str,
    messages: Sequence[Message],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    config: Mapping[str, Any] | None = None,
    max_retries: int = 3,
    timeout: float | None = 120.0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> Message:
    """Call ``model`` once (plus up to ``max_retries`` retries on transient errors).

    ``config`` (temperature, max_tokens, top_p, any other LiteLLM parameter) is passed
    through and recorded, canonicalised, as the reply's ``call_config``. ``timeout``
    bounds each attempt; a timed-out attempt counts as transient. Raises LLMError with
    the provider's message (cause chained) and ValidationError for bad arguments.
    """
    # str() turns a Model member into its plain value, so messages store a plain str.
    model = str(check_text("model", model, max_bytes=MAX_NAME_CHARS))
    if not isinstance(system_prompt, str):
        raise ValidationError("system_prompt", "must be a str", system_prompt)
    canonical = check_config(config)
    check_call_params(max_retries, timeout, retry_delay)
    litellm = _litellm()
    kwargs: dict[str, Any] = {
        **canonical,
        "model": model,
        "messages": to_litellm_messages(system_prompt, messages),
        "num_retries": 0,
        "max_retries": 0,
    }
    if tools:
        kwargs["tools"] = list(tools)
    if timeout is not None:
        kwargs["timeout"] = float(timeout)
    never, transient = _never_retry(litellm), _retryable(litellm)

    for attempt in range(max_retries + 1):
        started = time.perf_counter()
        logger.debug("LLM request: model=%s messages=%d tools=%d attempt=%d", model,
                     len(kwargs["messages"]), len(tools or ()), attempt + 1)
        try:
            # LiteLLM's timeout is advisory for some providers; this one is not.
            async with asyncio.timeout(timeout):
                response = await litellm.acompletion(**kwargs)
        except TimeoutError as exc:
            error: Exception = exc
            reason = f"no reply within {timeout} s"
        except never as exc:
            raise LLMError(f"{model}: {_provider_message(exc)}") from _cause(exc)
        except transient as exc:
            error, reason = exc, _provider_message(exc)
        except Exception as exc:
            raise LLMError(f"{model}: {_provider_message(exc)}") from _cause(exc)
        else:
            message = _to_message(response, model, canonical)
            logger.debug("LLM reply: model=%s elapsed=%.0fms input_tokens=%s output_tokens=%s"
                         " tool_calls=%d", model, (time.perf_counter() - started) * 1000,
                         message.input_tokens, message.output_tokens,
                         len(message.tool_calls or ()))
            return message
        if attempt == max_retries:
            raise LLMError(f"{model}: failed after {attempt + 1} attempt(s): {reason}"
                           ) from _cause(error)
        delay = _backoff(attempt, retry_delay)
        logger.warning("LLM call to %s failed (%s); retry %d of %d in %.2f s", model, reason,
                       attempt + 1, max_retries, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _provider_message(exc: BaseException) -> str:
    # Providers echo keys in their errors ("Incorrect API key provided: sk-..."): the
    # message is raised, logged and shown, so every credential shape is redacted first.
    return redact_secrets(str(getattr(exc, "message", None) or exc) or type(exc).__name__)


def _cause(exc: BaseException) -> BaseException | None:
    """The provider's exception as the LLMError's cause, unless its text holds a secret: a
    traceback prints the cause, so then it is left out (its class and redacted text are in
    the LLMError's message)."""
    text = str(getattr(exc, "message", None) or exc)
    return exc if redact_secrets(text) == text else None


def bind(
    model: str,
    system_prompt: str,
    config: Mapping[str, Any] | None = None,
    max_retries: int = 3,
    timeout: float | None = 120.0,
    *,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> CompleteFn:
    """A CompleteFn for ``advance()`` that calls ``model`` with this prompt and config.

    Arguments are validated here, so a bad config fails before any message is made.
    """
    # str() turns a Model member into its plain value, so messages store a plain str.
    model = str(check_text("model", model, max_bytes=MAX_NAME_CHARS))
    if not isinstance(system_prompt, str):
        raise ValidationError("system_prompt", "must be a str", system_prompt)
    canonical = check_config(config)
    check_call_params(max_retries, timeout, retry_delay)

    async def call(messages: Sequence[Message],
                   tools: Sequence[dict[str, Any]] | None) -> Message:
        return await complete(model, system_prompt, messages, tools=tools, config=canonical,
                              max_retries=max_retries, timeout=timeout,
                              retry_delay=retry_delay)

    return call
