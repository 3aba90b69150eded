"""The language-model call: LiteLLM with our own retries, a hard timeout and error mapping,
whole (``complete``) or streamed (``stream``).

LiteLLM is imported lazily (``immagent.lazy_litellm``: it takes seconds), on the first call
that needs it. The offline models (``immagent/...``, see ``immagent.offline``) are answered
in-process and need no LiteLLM at all, unless ``offline.route_through_litellm(True)`` sends
them through the real ``litellm.acompletion`` path. LiteLLM's own retry machinery is
switched off (``num_retries=0``, ``max_retries=0``): it silently does nothing without
``tenacity`` and retries authentication errors when it does, so the retry loop here is the
only one, keyed on exception class.

A streamed reply becomes the same Message as a whole one (same fields, same digest): both
are built by ``_message`` from the text, the tool calls and the usage. A stream is retried
only while none of its text has been handed out; after that a failure is an LLMError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from immagent import lazy_litellm, offline, requests
from immagent.assets import Digest, Message, ToolCall, Tools, attach_tools
from immagent.exceptions import ExtraNotInstalledError, LLMError, ValidationError
from immagent.options import DEFAULT_RETRY_DELAY, check_call_params
from immagent.validate import (
    MAX_NAME_BYTES,
    RESERVED_CONFIG_KEYS,
    check_config,
    check_text,
    check_tool_schemas,
    redact_secrets,
    scrub_text,
)

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_RETRY_DELAY",
    "RESERVED_CONFIG_KEYS",
    "BoundModel",
    "Model",
    "bind",
    "check_call_params",
    "check_config",
    "complete",
    "needs_litellm",
    "stream",
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
    # Offline test double (immagent.offline): replies "Echo: <last user input>".
    ECHO = offline.ECHO_MODEL


MAX_RETRY_DELAY = 30.0
# Usage in the stream: LiteLLM passes it to providers that support it and reports what
# the provider sends at the end of the stream.
_STREAM_OPTIONS = {"include_usage": True}


def needs_litellm(model: str) -> bool:
    """Whether a call to ``model`` imports LiteLLM (every model but the offline ones,
    unless those are routed through LiteLLM)."""
    return not offline.is_offline(model) or offline.routes_through_litellm()


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


def _transient(exc: Exception) -> bool:
    """Whether a failed attempt is worth retrying (by the provider error's class)."""
    litellm = lazy_litellm.imported_module()
    if litellm is None:  # LiteLLM was never imported: this cannot be one of its errors
        return False
    # LiteLLM wraps every error raised while a stream is read as a MidStreamFallbackError
    # (a 503); what it wraps decides.
    from litellm.exceptions import MidStreamFallbackError

    original = getattr(exc, "original_exception", None)
    if isinstance(exc, MidStreamFallbackError) and isinstance(original, Exception):
        exc = original
    # Missing credentials come as a 500 (OpenAI) or a connection error (Gemini): no retry
    # can fix them, so they fail at once, as an authentication error does.
    if _missing_key(exc) is not None:
        return False
    return not isinstance(exc, _never_retry(litellm)) and isinstance(exc, _retryable(litellm))


def _missing_key(exc: BaseException, model: str = "") -> str | None:
    """The environment variable a provider error says is missing (its key), or None when
    the error is not about missing credentials."""
    import re

    text = str(getattr(exc, "message", None) or exc)
    if not re.search(r"missing (?:\w+ )*(?:credentials|api[ _-]?key)|api_key client option "
                     r"must be set", text, re.IGNORECASE):
        return None
    named = re.search(r"\b([A-Z][A-Z0-9]*_(?:API_KEY|AUTH_TOKEN|KEY))\b", text)
    if named:
        return named.group(1)
    provider = model.split("/", 1)[0] if "/" in model else "OPENAI"
    return f"{provider.upper()}_API_KEY"


def to_litellm_messages(system_prompt: str, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the OpenAI chat format LiteLLM takes, system prompt first.

    An assistant message with neither text nor tool calls (a streamed reply interrupted
    before its first token) says nothing and every provider rejects it: it is left out.
    """
    out: list[dict[str, Any]] = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt})
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""})
        elif m.role == "assistant":
            if not m.content and not m.tool_calls:
                continue
            d: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [c.to_litellm_dict() for c in m.tool_calls]
            out.append(d)
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


def _backoff(attempt: int, base: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    delay = min(MAX_RETRY_DELAY, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _count(value: object) -> int | None:
    """A token count as the Message stores it (providers sometimes send floats or junk)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) and 0 <= value < 2**63 else None


class _Given(NamedTuple):
    """What a call was given, as its reply records it: the request record's digest and the
    tools asset it offered (None: none)."""

    request: Digest
    tools: Tools | None


def _recorded(message: Message, given: _Given | None) -> Message:
    """``message`` recording the request it answered (and carrying the tools asset, so the
    store writes it with the message)."""
    if given is None:
        return message
    message = msgspec.structs.replace(
        message, request=given.request,
        tools=None if given.tools is None else given.tools.digest)
    return message if given.tools is None else attach_tools(message, given.tools)


def _message(content: object, calls: Sequence[tuple[object, object, object]],
             usage: object, model: str, config: dict[str, Any],
             given: _Given | None = None) -> Message:
    """THE assistant Message of a reply, whole or streamed: text ("" is no text, one form
    per content), tool calls ``(id, name, arguments)``, token usage, model, call_config,
    and the request the call was given."""
    tool_calls: list[ToolCall] = []
    for i, (call_id, name, args) in enumerate(calls):
        # Some providers hand back parsed arguments; the Message keeps JSON text.
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {}, ensure_ascii=False)
        tool_calls.append(ToolCall(id=scrub_text(str(call_id or f"call_{i}")),
                                   name=scrub_text(str(name or "")),
                                   arguments=scrub_text(args)))
    return _recorded(Message(
        role="assistant",
        content=scrub_text(content) if isinstance(content, str) and content else None,
        tool_calls=tuple(tool_calls) or None,
        input_tokens=_count(_field(usage, "prompt_tokens")),
        output_tokens=_count(_field(usage, "completion_tokens")),
        model=model,
        call_config=config or None,
    ), given)


def _field(obj: object, name: str) -> object:
    """``obj.name`` or ``obj[name]``: LiteLLM objects and plain chunk dicts alike."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _to_message(response: Any, model: str, config: dict[str, Any],
                given: _Given | None = None) -> Message:
    """Turn a LiteLLM ModelResponse into an assistant Message."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise LLMError(f"{model}: the response has no choices")
    reply = choices[0].message
    calls = [(tc.id, tc.function.name, tc.function.arguments) for tc in reply.tool_calls or ()]
    return _message(reply.content, calls, getattr(response, "usage", None), model, config,
                    given)


class _Assembly:
    """A streamed reply being put together: text pieces, tool-call fragments joined by
    their index (a call's id and name come once, its arguments in pieces), the usage."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, list[Any]] = {}
        self.usage: object = None

    def call(self, index: object, call_id: object, name: object, arguments: object) -> None:
        if not isinstance(index, int):  # no index: a new call if it has an id, else more of
            index = len(self.calls) - (call_id is None and bool(self.calls))  # the last one
        slot = self.calls.setdefault(index, [None, None, ""])
        slot[0] = slot[0] or call_id
        slot[1] = slot[1] or name
        if isinstance(arguments, str):
            slot[2] += arguments
        elif arguments is not None:  # parsed arguments arrive whole
            slot[2] = arguments

    def litellm_chunk(self, chunk: Any) -> str:
        """Take one ModelResponseStream; return its text ("" if none)."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage
        choices = getattr(chunk, "choices", None) or ()
        delta = getattr(choices[0], "delta", None) if choices else None
        if delta is None:
            return ""
        for tc in getattr(delta, "tool_calls", None) or ():
            function = getattr(tc, "function", None)
            self.call(getattr(tc, "index", None), getattr(tc, "id", None),
                      getattr(function, "name", None), getattr(function, "arguments", None))
        text = getattr(delta, "content", None)
        return self._text(text)

    def generic_chunk(self, chunk: Mapping[str, Any]) -> str:
        """Take one GenericStreamingChunk dict (the in-process path); return its text."""
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        tool = chunk.get("tool_use")
        if tool is not None:
            function = tool.get("function") or {}
            self.call(tool.get("index"), tool.get("id"), function.get("name"),
                      function.get("arguments"))
        return self._text(chunk.get("text"))

    def _text(self, text: object) -> str:
        if not isinstance(text, str) or not text:
            return ""
        self.text.append(text)
        return text

    def message(self, model: str, config: dict[str, Any],
                given: _Given | None = None) -> Message:
        calls = [tuple(self.calls[i]) for i in sorted(self.calls)]
        return _message("".join(self.text), calls, self.usage, model, config, given)


class _Call:
    """One validated model call, whole or streamed, with the retry loop around it."""

    def __init__(self, model: str, system_prompt: str, config: Mapping[str, Any] | None,
                 max_retries: int, timeout: float | None, retry_delay: float) -> None:
        # str() turns a Model member into its plain value, so messages store a plain str.
        self.model = str(check_text("model", model, max_bytes=MAX_NAME_BYTES))
        if not isinstance(system_prompt, str):
            raise ValidationError("system_prompt", "must be a str", system_prompt)
        self.system_prompt = system_prompt
        self.config = check_config(config)
        check_call_params(max_retries, timeout, retry_delay)
        self.max_retries, self.timeout, self.retry_delay = max_retries, timeout, retry_delay
        #: What the newest call was given (what a reply cut short answered).
        self.given: _Given | None = None

    def interrupted(self, text: str) -> Message:
        """The assistant message of a reply cut short after ``text`` (no usage known)."""
        return _recorded(Message(role="assistant", content=scrub_text(text) or None,
                                 model=self.model, call_config=self.config or None,
                                 interrupted=True), self.given)

    def request(self, messages: Sequence[Message],
                tools: Sequence[dict[str, Any]] | None) -> requests.Request:
        """The request record of a call with these messages and tools (ValidationError for
        tool schemas that are no list of JSON objects)."""
        offered = Tools.of(check_tool_schemas("tools", tools)) if tools else None
        record = requests.build(self.model, self.system_prompt, messages, offered,
                                self.config)
        self.given = _Given(record.digest, offered)
        return record

    async def run(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None,
                  *, streamed: bool) -> AsyncGenerator[str | Message, None]:
        """The reply's text pieces (``streamed`` only) as they arrive, then its Message
        (recording the request it was given)."""
        self.request(messages, tools)
        wire = to_litellm_messages(self.system_prompt, messages)
        tools = list(tools) if tools else None
        for attempt in range(self.max_retries + 1):
            started = time.perf_counter()
            logger.debug("LLM request: model=%s messages=%d tools=%d attempt=%d stream=%s",
                         self.model, len(wire), len(tools or ()), attempt + 1, streamed)
            handed_out = 0
            replies = self._attempt(wire, tools, streamed=streamed)
            try:
                while True:
                    try:
                        item = await anext(replies)
                    except StopAsyncIteration:
                        return
                    except (LLMError, ExtraNotInstalledError):  # already say what is wrong
                        raise
                    except TimeoutError as exc:
                        error: Exception = exc
                        reason = f"no reply within {self.timeout} s"
                    except Exception as exc:
                        if not _transient(exc):
                            raise LLMError(self._failure(exc, handed_out)) from _cause(exc)
                        error, reason = exc, _provider_message(exc)
                    else:
                        if isinstance(item, Message):
                            self._log_reply(item, started)
                        else:
                            handed_out += 1
                        yield item
                        continue
                    if handed_out:  # the caller has seen part of this reply: no retry
                        raise LLMError(self._failure(error, handed_out, reason)
                                       ) from _cause(error)
                    break
            finally:
                await replies.aclose()
            if attempt == self.max_retries:
                raise LLMError(f"{self.model}: failed after {attempt + 1} attempt(s): "
                               f"{reason}") from _cause(error)
            delay = _backoff(attempt, self.retry_delay)
            logger.warning("LLM call to %s failed (%s); retry %d of %d in %.2f s", self.model,
                           reason, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)

    def _failure(self, exc: Exception, handed_out: int, reason: str | None = None) -> str:
        reason = reason or _provider_message(exc)
        key = _missing_key(exc, self.model)
        if key is not None and not handed_out:
            return f"{self.model}: no API key: set {key} in the environment ({reason})"
        if "LLM Provider NOT provided" in reason:
            return (f"{self.model}: unknown model or provider: LiteLLM cannot route it; name "
                    "it as provider/model, e.g. openai/gpt-4o-mini (providers: "
                    "https://docs.litellm.ai/docs/providers)")
        if handed_out:
            return f"{self.model}: the reply broke off after {handed_out} chunk(s): {reason}"
        return f"{self.model}: {reason}"

    def _log_reply(self, message: Message, started: float) -> None:
        logger.debug("LLM reply: model=%s elapsed=%.0fms input_tokens=%s output_tokens=%s"
                     " tool_calls=%d", self.model, (time.perf_counter() - started) * 1000,
                     message.input_tokens, message.output_tokens,
                     len(message.tool_calls or ()))

    async def _attempt(self, wire: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       *, streamed: bool) -> AsyncGenerator[str | Message, None]:
        """One attempt: text pieces (streamed only), then the Message. ``timeout`` bounds
        the whole reply, or, streamed, the wait for each chunk."""
        if not needs_litellm(self.model):
            chunks = offline.local_chunks(self.model, wire, self.config, tools, self.timeout,
                                          stream=streamed)
            assembly = _Assembly()
            async with aclosing(_timed(chunks, self.timeout)) as timed:
                async for chunk in timed:
                    text = assembly.generic_chunk(chunk)
                    if text and streamed:
                        yield text
            yield assembly.message(self.model, self.config, self.given)
            return
        # The first import takes seconds: in a thread, so the event loop keeps running.
        litellm = await lazy_litellm.load_async()
        if offline.is_offline(self.model):
            offline.register()
        kwargs: dict[str, Any] = {**self.config, "model": self.model, "messages": wire,
                                  "num_retries": 0, "max_retries": 0}
        if tools:
            kwargs["tools"] = tools
        if self.timeout is not None:
            kwargs["timeout"] = float(self.timeout)
        if not streamed:
            # LiteLLM's timeout is advisory for some providers; this one is not.
            async with asyncio.timeout(self.timeout):
                response = await litellm.acompletion(**kwargs)
            yield _to_message(response, self.model, self.config, self.given)
            return
        async with asyncio.timeout(self.timeout):
            response = await litellm.acompletion(**kwargs, stream=True,
                                                 stream_options=_STREAM_OPTIONS)
        assembly = _Assembly()
        async with aclosing(_timed(response, self.timeout)) as timed:
            async for chunk in timed:
                text = assembly.litellm_chunk(chunk)
                if text:
                    yield text
        yield assembly.message(self.model, self.config, self.given)


async def _timed(chunks: Any, timeout: float | None) -> AsyncGenerator[Any, None]:
    """``chunks`` (an async iterable) with the wait for each one bounded by ``timeout``;
    closed when this ends, however it ends (a provider's connection is released now)."""
    iterator = aiter(chunks)
    try:
        while True:
            async with asyncio.timeout(timeout):
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


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
    call = _Call(model, system_prompt, config, max_retries, timeout, retry_delay)
    return await _whole(call.run(messages, tools, streamed=False))


async def stream(
    model: str,
    system_prompt: str,
    messages: Sequence[Message],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    config: Mapping[str, Any] | None = None,
    max_retries: int = 3,
    timeout: float | None = 120.0,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> AsyncGenerator[str | Message, None]:
    """``complete``, streamed: the reply's text pieces as they arrive, then its whole
    Message (the one ``complete`` would return for the same reply: same digest).

    Transient errors are retried only before the first piece; a stream that breaks after
    it raises LLMError. ``timeout`` bounds the wait for each chunk (the first one also
    waits for the response), not the whole reply. Arguments are checked
    when iteration starts.
    """
    call = _Call(model, system_prompt, config, max_retries, timeout, retry_delay)
    async with aclosing(call.run(messages, tools, streamed=True)) as replies:
        async for item in replies:
            yield item


async def _whole(replies: AsyncGenerator[str | Message, None]) -> Message:
    async with aclosing(replies):
        async for item in replies:
            if isinstance(item, Message):
                return item
    raise AssertionError("unreachable")  # a call ends with its Message or raises


class BoundModel:
    """A model bound to its system prompt, config and call settings (``bind`` makes one):
    call it for a whole reply, ``stream()`` it for a streamed one."""

    __slots__ = ("_call",)

    def __init__(self, call: _Call) -> None:
        self._call = call

    async def __call__(self, messages: Sequence[Message],
                       tools: Sequence[dict[str, Any]] | None) -> Message:
        """One whole reply (``immagent.advance.CompleteFn``)."""
        return await _whole(self._call.run(messages, tools, streamed=False))

    def stream(self, messages: Sequence[Message],
               tools: Sequence[dict[str, Any]] | None) -> AsyncGenerator[str | Message, None]:
        """One streamed reply: text pieces, then the Message."""
        return self._call.run(messages, tools, streamed=True)

    def interrupted(self, text: str) -> Message:
        """What a reply cut short after ``text`` is stored as (marked ``interrupted``)."""
        return self._call.interrupted(text)


def bind(
    model: str,
    system_prompt: str,
    config: Mapping[str, Any] | None = None,
    max_retries: int = 3,
    timeout: float | None = 120.0,
    *,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> BoundModel:
    """A model for ``advance()`` (a CompleteFn) and streamed turns that calls ``model``
    with this prompt and config.

    Arguments are validated here, so a bad config fails before any message is made.
    """
    return BoundModel(_Call(model, system_prompt, config, max_retries, timeout, retry_delay))


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

