"""Offline models for tests and demos: honest test doubles, not language models.

Two kinds, under the model prefix ``immagent/``:

* ``"immagent/echo"`` (``Model.ECHO``) answers ``"Echo: <last user input>"`` and reports
  word counts as token usage. Needs no setup. It streams word by word; set
  ``IMMAGENT_ECHO_DELAY`` (seconds per word) to watch it type in a demo.
* ``ScriptedModel([...])`` plays back a script of replies (text, tool calls, errors to
  raise, delays, the chunks a streamed reply arrives in) under its own model name
  ``scripted.model``, and records every request it receives (``scripted.requests``).

Two ways to reach them, which answer alike (same messages, same digests):

* **in-process** (the default): ``immagent.llm`` answers an offline model itself, without
  importing LiteLLM, so the command line and most tests never pay LiteLLM's import.
* **through LiteLLM**: after ``route_through_litellm(True)`` a call goes through the real
  ``litellm.acompletion`` path (parameter handling, response objects, the streaming
  wrapper, exception types), as a LiteLLM custom provider named ``immagent``; only the
  network is missing. ``register()`` installs the provider for code that calls
  ``litellm.acompletion`` itself.

Either way the provider sees the same request and produces the same chunks (LiteLLM's
``GenericStreamingChunk`` dicts): in-process, ``immagent.llm`` reads those chunks itself.
One difference remains: LiteLLM turns an exception that is not one of its own, raised by
the provider, into a retryable ``APIConnectionError``; in-process it is a permanent
failure. Script failures with ``litellm_error(...)``.

Example::

    scripted = ScriptedModel([Reply.call("add", a=2, b=2), "The answer is 4."])
    agent = SimpleAgent("calc", "You add.", scripted.model)

Importing this module is cheap; LiteLLM is imported only on the LiteLLM path.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
import os
import re
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from immagent import lazy_litellm
from immagent.assets import ToolCall
from immagent.exceptions import ValidationError

__all__ = [
    "ECHO_DELAY_ENV",
    "ECHO_MODEL",
    "PROVIDER",
    "Chunk",
    "ErrorKind",
    "OfflineModelError",
    "Reply",
    "Request",
    "ScriptItem",
    "ScriptedModel",
    "is_offline",
    "litellm_error",
    "local_chunks",
    "register",
    "route_through_litellm",
    "routes_through_litellm",
]

#: The LiteLLM provider prefix of every offline model.
PROVIDER = "immagent"
#: The echo model, also available as ``immagent.Model.ECHO``.
ECHO_MODEL = f"{PROVIDER}/echo"
#: Seconds the echo model waits per word (unset: no wait), for demos of streaming.
ECHO_DELAY_ENV = "IMMAGENT_ECHO_DELAY"

# The options LiteLLM forwards that are our own call plumbing, not model parameters.
_PLUMBING = frozenset({"tools", "max_retries", "stream", "stream_options"})

Chunk: TypeAlias = dict[str, Any]  # a LiteLLM GenericStreamingChunk


class OfflineModelError(Exception):
    """An offline model cannot answer (unknown model, script exhausted): a permanent
    failure, which the LiteLLM path raises as LiteLLM's BadRequestError."""


@dataclass(frozen=True)
class Request:
    """What an offline model received: OpenAI-format messages, tools and parameters."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    #: Model parameters (temperature, max_tokens, ...), without tools and call plumbing.
    params: dict[str, Any]
    timeout: float | None
    #: Whether the reply was asked for as a stream.
    stream: bool = False

    @property
    def last_message(self) -> dict[str, Any]:
        """The newest message (what the model is answering)."""
        return self.messages[-1]


@dataclass(frozen=True)
class Reply:
    """One scripted turn: text and/or tool calls, or an error to raise; optional delays.

    Token counts default to word counts (input: every message; output: the reply).
    ``tool_calls`` takes ToolCall objects or ``(name, arguments)`` pairs; pairs get ids
    ``call_1``, ``call_2``, ... numbered per ScriptedModel.

    Streamed, the text arrives in ``chunks`` (default: word by word; given, they make up
    the text) with ``chunk_delay`` seconds before each (``chunk_delays``: a gap of its own
    before each), and each tool call in two pieces. Asked for whole, the reply comes after
    the same total delay. ``error`` with ``chunks``: a stream that fails after sending
    them (asked for whole: the error).
    """

    text: str | None = None
    tool_calls: Sequence[ToolCall | tuple[str, Mapping[str, Any]]] = ()
    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Raised from inside the provider (use LiteLLM exceptions, see ``litellm_error``).
    error: BaseException | None = None
    #: Seconds to wait before replying or raising (for timeout tests).
    delay: float = 0.0
    #: The pieces a streamed text arrives in ("".join(chunks) is the text).
    chunks: Sequence[str] = field(default=())
    #: Seconds before each streamed chunk.
    chunk_delay: float = 0.0
    #: Seconds before each streamed chunk, one per chunk (uneven gaps; replaces chunk_delay).
    chunk_delays: Sequence[float] = field(default=())

    def __post_init__(self) -> None:
        if self.chunks:
            joined = "".join(self.chunks)
            if self.text is not None and self.text != joined:
                raise ValidationError("chunks", "must make up the text when both are given",
                                      self.chunks)
            object.__setattr__(self, "text", joined)
        for name in ("delay", "chunk_delay"):
            value = getattr(self, name)
            if not _seconds(value):
                raise ValidationError(name, "must be a number of seconds >= 0", value)
        gaps = self.chunk_delays
        if gaps and (len(gaps) != len(_pieces(self)) or not all(map(_seconds, gaps))):
            raise ValidationError("chunk_delays", "must be one number of seconds >= 0 "
                                  f"per chunk ({len(_pieces(self))})", gaps)

    @classmethod
    def call(cls, name: str, /, **arguments: Any) -> Reply:
        """A reply that makes one tool call: ``Reply.call("add", a=1, b=2)``."""
        return cls(tool_calls=[(name, arguments)])

    @classmethod
    def calls(cls, *calls: tuple[str, Mapping[str, Any]]) -> Reply:
        """A reply that makes several tool calls in one round."""
        return cls(tool_calls=list(calls))

    @classmethod
    def fail(cls, error: BaseException, *, delay: float = 0.0) -> Reply:
        """A turn that raises ``error`` (after ``delay`` seconds)."""
        return cls(error=error, delay=delay)


#: A script entry: plain text, a Reply, an exception to raise, or a function of the
#: request returning text or a Reply (to answer from what the model was sent).
ScriptItem: TypeAlias = "str | Reply | BaseException | Callable[[Request], str | Reply]"


class ScriptedModel:
    """A model that plays back ``replies`` in order and records each request it gets.

    Use ``scripted.model`` as the model string and keep a reference to the ScriptedModel
    while it is in use (the provider holds it weakly, so finished tests leave nothing
    behind). Each call (including each retry) takes the next entry; when the script runs
    out the call fails permanently (not retried), so a test that makes more calls than it
    scripted fails loudly.
    """

    _names = itertools.count(1)

    def __init__(self, replies: Iterable[ScriptItem] = (), *, name: str | None = None) -> None:
        if name is None:
            name = f"scripted-{next(self._names)}"
        if not name or "/" in name or name == "echo":
            raise ValidationError("name", "must be a non-empty name without '/', not 'echo'",
                                  name)
        if name in _models:
            raise ValidationError("name", f"a ScriptedModel named {name!r} already exists", name)
        self.name = name
        #: The LiteLLM model string to pass as ``model=``.
        self.model = f"{PROVIDER}/{name}"
        #: Every request received, in order (retries included).
        self.requests: list[Request] = []
        self._script: deque[ScriptItem] = deque(replies)
        self._call_ids = itertools.count(1)
        _models[name] = self

    def __repr__(self) -> str:
        return f"ScriptedModel({self.model!r}, remaining={self.remaining})"

    def extend(self, replies: Iterable[ScriptItem]) -> None:
        """Append more entries to the script."""
        self._script.extend(replies)

    @property
    def remaining(self) -> int:
        """Entries not yet played."""
        return len(self._script)

    def _next(self, request: Request) -> Reply:
        self.requests.append(request)
        if not self._script:
            raise OfflineModelError(f"ScriptedModel {self.name!r}: script exhausted after "
                                    f"{len(self.requests) - 1} call(s)")
        item = self._script.popleft()
        if callable(item):
            item = item(request)
        if isinstance(item, BaseException):
            return Reply(error=item)
        if isinstance(item, str):
            return Reply(text=item)
        return item


# Live scripted models by name; a model nobody references any more drops out.
_models: weakref.WeakValueDictionary[str, ScriptedModel] = weakref.WeakValueDictionary()
# Echo replies carry no tool calls today; the counter keeps _answer total anyway.
_echo_call_ids = itertools.count(1)
_via_litellm = False


def is_offline(model: str) -> bool:
    """Whether ``model`` names an offline model (``immagent/...``)."""
    return model.startswith(f"{PROVIDER}/")


def route_through_litellm(enabled: bool) -> bool:
    """Send offline-model calls through ``litellm.acompletion`` (True) or answer them
    in-process (False, the default); returns the previous setting."""
    global _via_litellm
    previous, _via_litellm = _via_litellm, bool(enabled)
    return previous


def routes_through_litellm() -> bool:
    """Whether offline-model calls go through LiteLLM (see ``route_through_litellm``)."""
    return _via_litellm


# -- answering: the same for both paths ------------------------------------------------

@dataclass(frozen=True)
class _Answer:
    """A resolved reply: what was asked, the Reply, its tool calls (with ids) and usage."""

    request: Request
    reply: Reply
    calls: list[dict[str, Any]]
    input_tokens: int
    output_tokens: int


def _tool_call(call: ToolCall | tuple[str, Mapping[str, Any]],
               ids: Iterator[int]) -> dict[str, Any]:
    if isinstance(call, ToolCall):
        call_id, name, arguments = call.id, call.name, call.arguments
    else:
        name, args = call
        call_id, arguments = f"call_{next(ids)}", json.dumps(dict(args))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):  # content given as parts: [{"type": "text", "text": ...}]
        return sum(_words(p.get("text")) for p in value if isinstance(p, dict))
    return 0


def _text_of(content: object) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _echo(request: Request) -> Reply:
    user = [m for m in request.messages if m.get("role") == "user"]
    text = f"Echo: {_text_of(user[-1]['content']) if user else ''}".rstrip()
    return Reply(text=text, chunk_delay=_echo_delay())


def _echo_delay() -> float:
    raw = os.environ.get(ECHO_DELAY_ENV, "").strip()
    try:
        delay = float(raw) if raw else 0.0
    except ValueError:
        raise ValidationError(ECHO_DELAY_ENV, "must be a number of seconds", raw) from None
    if not (math.isfinite(delay) and delay >= 0):
        raise ValidationError(ECHO_DELAY_ENV, "must be a number of seconds >= 0", raw)
    return delay


def _answer(name: str, messages: list[dict[str, Any]], options: Mapping[str, Any],
            timeout: object, *, stream: bool) -> _Answer:
    """Resolve one call: ``name`` without the provider prefix, ``options`` LiteLLM's
    optional params (model parameters plus tools and plumbing)."""
    # A ScriptedModel keeps its requests for assertions, so they are copied; the echo
    # model reads its request once and drops it, and copying a long history per call
    # would make the test double, not the library, the cost benchmarks measure.
    keep = name != "echo"

    def clone(value: Any) -> Any:
        return copy.deepcopy(value) if keep else value

    request = Request(
        model=f"{PROVIDER}/{name}",
        messages=clone(list(messages)),
        tools=clone(options.get("tools")),
        params={k: v for k, v in options.items() if k not in _PLUMBING},
        timeout=float(timeout) if isinstance(timeout, int | float) else None,
        stream=stream,
    )
    scripted = None
    if name == "echo":
        reply = _echo(request)
    else:
        scripted = _models.get(name)
        if scripted is None:
            raise OfflineModelError(f"unknown offline model {request.model!r}: use "
                                    f"{ECHO_MODEL!r} or a live ScriptedModel's .model")
        reply = scripted._next(request)
    ids = scripted._call_ids if scripted else _echo_call_ids
    calls = [_tool_call(c, ids) for c in reply.tool_calls]
    input_tokens = reply.input_tokens
    if input_tokens is None:
        input_tokens = sum(_words(m.get("content")) for m in request.messages)
    output_tokens = reply.output_tokens
    if output_tokens is None:
        output_tokens = _words(reply.text) + sum(
            1 + _words(c["function"]["arguments"]) for c in calls)
    return _Answer(request, reply, calls, input_tokens, output_tokens)


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


def _gaps(reply: Reply) -> list[float]:
    """Seconds before each streamed text piece."""
    return list(reply.chunk_delays) or [reply.chunk_delay] * len(_pieces(reply))


def _pieces(reply: Reply) -> list[str]:
    """The text's streamed pieces: the script's chunks, else word by word (each word
    with the whitespace before it), so the pieces always join to the text."""
    if reply.chunks:
        return [c for c in reply.chunks if c]
    return re.findall(r"\s*\S+|\s+$", reply.text or "")


def _chunk(text: str = "", *, tool_use: dict[str, Any] | None = None,
           finish: str = "", usage: dict[str, int] | None = None) -> Chunk:
    chunk: Chunk = {"text": text, "is_finished": bool(finish), "finish_reason": finish,
                    "usage": usage, "index": 0}
    if tool_use is not None:
        chunk["tool_use"] = tool_use
    return chunk


def _chunks(answer: _Answer, *, stream: bool) -> Iterator[Chunk]:
    """The reply as GenericStreamingChunks: text pieces, each tool call in two pieces (so
    readers must join fragments), then the finish with usage. Whole: one chunk per kind."""
    reply = answer.reply
    pieces = _pieces(reply) if stream else ([reply.text] if reply.text else [])
    yield from (_chunk(p) for p in pieces)
    for index, call in enumerate(answer.calls):
        arguments = call["function"]["arguments"]
        cut = len(arguments) // 2 if stream else len(arguments)
        yield _chunk(tool_use={"id": call["id"], "type": "function", "index": index,
                               "function": {"name": call["function"]["name"],
                                            "arguments": arguments[:cut]}})
        if cut < len(arguments):
            yield _chunk(tool_use={"id": None, "type": "function", "index": index,
                                   "function": {"name": None, "arguments": arguments[cut:]}})
    usage = {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
             "total_tokens": answer.input_tokens + answer.output_tokens}
    yield _chunk(finish="tool_calls" if answer.calls else "stop", usage=usage)


async def _sleep(seconds: float) -> None:
    if seconds > 0:  # no sleep, not even sleep(0): an undelayed reply runs straight through
        await asyncio.sleep(seconds)


async def _play(answer: _Answer, *, stream: bool) -> AsyncGenerator[Chunk, None]:
    """The chunks of ``answer`` with the reply's delays, raising its error where scripted."""
    reply = answer.reply
    if reply.delay > 0:
        await asyncio.sleep(reply.delay)
    if reply.error is not None and not (stream and reply.chunks):
        raise reply.error
    gaps = iter(_gaps(reply))
    if not stream:  # a whole reply takes as long as its stream
        await _sleep(sum(gaps))
    for chunk in _chunks(answer, stream=stream):
        if stream and chunk["text"]:
            await _sleep(next(gaps))
        if reply.error is not None and chunk["is_finished"]:
            raise reply.error  # a stream that breaks after its chunks
        yield chunk


def local_chunks(model: str, messages: list[dict[str, Any]], params: Mapping[str, Any],
                 tools: Sequence[dict[str, Any]] | None, timeout: float | None, *,
                 stream: bool) -> AsyncGenerator[Chunk, None]:
    """The in-process path: offline ``model``'s reply as GenericStreamingChunk dicts (one
    chunk per kind when not ``stream``), exactly what the LiteLLM provider would send.
    Raises OfflineModelError or the scripted error; never imports LiteLLM."""
    options = {**params, **({"tools": list(tools)} if tools else {})}
    answer = _answer(model.removeprefix(f"{PROVIDER}/"), messages, options, timeout,
                     stream=stream)
    return _play(answer, stream=stream)


# -- the LiteLLM custom provider -----------------------------------------------------------

_handler: Any = None


def _kwargs_answer(kwargs: dict[str, Any], *, stream: bool) -> _Answer:
    try:
        return _answer(kwargs["model"], kwargs["messages"],
                       dict(kwargs.get("optional_params") or {}), kwargs.get("timeout"),
                       stream=stream)
    except OfflineModelError as exc:
        raise litellm_error("bad_request", str(exc), model=f"{PROVIDER}/{kwargs['model']}") \
            from None


def _response(answer: _Answer) -> Any:
    litellm = lazy_litellm.load()
    from litellm.types.utils import Usage

    message: dict[str, Any] = {"role": "assistant", "content": answer.reply.text}
    if answer.calls:
        message["tool_calls"] = answer.calls
    return litellm.ModelResponse(
        model=answer.request.model,
        choices=[{"index": 0, "finish_reason": "tool_calls" if answer.calls else "stop",
                  "message": message}],
        usage=Usage(prompt_tokens=answer.input_tokens,
                    completion_tokens=answer.output_tokens,
                    total_tokens=answer.input_tokens + answer.output_tokens),
    )


def _make_handler() -> Any:
    from litellm.llms.custom_llm import CustomLLM

    class OfflineProvider(CustomLLM):
        """Routes ``immagent/<name>`` to the echo model or a live ScriptedModel."""

        # LiteLLM passes everything by keyword; taking **kwargs keeps this provider
        # working when LiteLLM adds parameters.
        async def acompletion(self, *args: Any, **kwargs: Any) -> Any:
            answer = _kwargs_answer(kwargs, stream=False)
            async for _ in _play(answer, stream=False):  # the delays and scripted errors
                pass
            return _response(answer)

        # An async generator, not a coroutine returning one: LiteLLM iterates what the
        # call returns, and both work.
        async def astreaming(  # type: ignore[override]
                self, *args: Any, **kwargs: Any) -> AsyncGenerator[Chunk, None]:
            async for chunk in _play(_kwargs_answer(kwargs, stream=True), stream=True):
                yield chunk

        def completion(self, *args: Any, **kwargs: Any) -> Any:
            answer = _kwargs_answer(kwargs, stream=False)
            reply = answer.reply
            time.sleep(reply.delay + sum(_gaps(reply)))
            if reply.error is not None:
                raise reply.error
            return _response(answer)

    return OfflineProvider()


def register() -> None:
    """Register the ``immagent`` provider with LiteLLM (idempotent; imports LiteLLM).

    ``immagent.llm`` does this itself when it sends an offline model's call through
    LiteLLM; call it only to use the offline models with ``litellm.acompletion`` directly.
    """
    global _handler
    litellm = lazy_litellm.load()
    if _handler is None:
        _handler = _make_handler()
    # User code may have replaced litellm.custom_provider_map since the last call.
    if not any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": _handler})


ErrorKind = Literal["rate_limit", "timeout", "connection", "internal", "unavailable",
                    "auth", "bad_request", "context_window"]


def litellm_error(kind: ErrorKind, message: str = "simulated failure", *,
                  model: str = ECHO_MODEL) -> Exception:
    """A LiteLLM exception of the given kind, for ``Reply.fail(...)`` in tests."""
    lazy_litellm.load()
    from litellm import exceptions as litellm

    # LiteLLM's exception constructors disagree on argument order; use keywords.
    match kind:
        case "rate_limit":
            return litellm.RateLimitError(message=message, llm_provider=PROVIDER, model=model)
        case "timeout":
            return litellm.Timeout(message=message, model=model, llm_provider=PROVIDER)
        case "connection":
            return litellm.APIConnectionError(message=message, llm_provider=PROVIDER,
                                              model=model)
        case "internal":
            return litellm.InternalServerError(message=message, llm_provider=PROVIDER,
                                               model=model)
        case "unavailable":
            return litellm.ServiceUnavailableError(message=message, llm_provider=PROVIDER,
                                                   model=model)
        case "auth":
            return litellm.AuthenticationError(message=message, llm_provider=PROVIDER,
                                               model=model)
        case "bad_request":
            return litellm.BadRequestError(message=message, model=model, llm_provider=PROVIDER)
        case "context_window":
            return litellm.ContextWindowExceededError(message=message, model=model,
                                                      llm_provider=PROVIDER)
    raise ValidationError("kind", f"unknown error kind {kind!r}", kind)
