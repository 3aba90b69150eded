"""Offline models for tests and demos: honest test doubles, not language models.

They are a LiteLLM custom provider named ``immagent``, so a call to one goes through the
real ``litellm.acompletion`` path (parameter handling, response objects, exception types)
and only the network is missing. Two kinds:

* ``"immagent/echo"`` (``Model.ECHO``) answers ``"Echo: <last user input>"`` and reports
  word counts as token usage. Needs no setup.
* ``ScriptedModel([...])`` plays back a script of replies (text, tool calls, errors to
  raise, delays) under its own model name ``scripted.model``, and records every request
  it receives (``scripted.requests``) for assertions.

Example::

    scripted = ScriptedModel([Reply.call("add", a=2, b=2), "The answer is 4."])
    agent = SimpleAgent("calc", "You add.", scripted.model)

Importing this module is cheap; LiteLLM is imported on first registration.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypeAlias

from immagent.assets import ToolCall
from immagent.exceptions import ValidationError

__all__ = [
    "ECHO_MODEL",
    "PROVIDER",
    "Reply",
    "Request",
    "ScriptItem",
    "ScriptedModel",
    "litellm_error",
    "register",
]

#: The LiteLLM provider prefix of every offline model.
PROVIDER = "immagent"
#: The echo model, also available as ``immagent.Model.ECHO``.
ECHO_MODEL = f"{PROVIDER}/echo"

# The options LiteLLM forwards that are our own call plumbing, not model parameters.
_PLUMBING = frozenset({"tools", "max_retries"})


@dataclass(frozen=True)
class Request:
    """What an offline model received: OpenAI-format messages, tools and parameters."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    #: Model parameters (temperature, max_tokens, ...), without tools and retry plumbing.
    params: dict[str, Any]
    timeout: float | None

    @property
    def last_message(self) -> dict[str, Any]:
        """The newest message (what the model is answering)."""
        return self.messages[-1]


@dataclass(frozen=True)
class Reply:
    """One scripted turn: text and/or tool calls, or an error to raise; optional delay.

    Token counts default to word counts (input: every message; output: the reply).
    ``tool_calls`` takes ToolCall objects or ``(name, arguments)`` pairs; pairs get ids
    ``call_1``, ``call_2``, ... numbered per ScriptedModel.
    """

    text: str | None = None
    tool_calls: Sequence[ToolCall | tuple[str, Mapping[str, Any]]] = ()
    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Raised from inside the provider (use LiteLLM exceptions, see ``litellm_error``).
    error: BaseException | None = None
    #: Seconds to wait before replying or raising (for timeout tests).
    delay: float = 0.0

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
    out the call fails with a non-retryable BadRequestError, so a test that makes more
    calls than it scripted fails loudly.
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
        register()

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
            raise litellm_error("bad_request", f"ScriptedModel {self.name!r}: script exhausted "
                                f"after {len(self.requests) - 1} call(s)", model=self.model)
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
_handler: Any = None
# Echo replies carry no tool calls today; the counter keeps _response total anyway.
_echo_call_ids = itertools.count(1)


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
    return Reply(text=f"Echo: {_text_of(user[-1]['content']) if user else ''}".rstrip())


def _request(kwargs: dict[str, Any], *, keep: bool) -> Request:
    # A ScriptedModel keeps its requests for assertions, so they are copied; the echo
    # model reads its request once and drops it, and copying a long history per call
    # would make the test double, not the library, the cost benchmarks measure.
    def clone(value: Any) -> Any:
        return copy.deepcopy(value) if keep else value

    options = dict(kwargs.get("optional_params") or {})
    timeout = kwargs.get("timeout")
    return Request(
        model=f"{PROVIDER}/{kwargs['model']}",
        messages=clone(list(kwargs["messages"])),
        tools=clone(options.get("tools")),
        params={k: v for k, v in options.items() if k not in _PLUMBING},
        timeout=float(timeout) if isinstance(timeout, int | float) else None,
    )


def _resolve(kwargs: dict[str, Any]) -> tuple[Request, Reply, ScriptedModel | None]:
    name = kwargs["model"]
    request = _request(kwargs, keep=name != "echo")
    if name == "echo":
        return request, _echo(request), None
    scripted = _models.get(name)
    if scripted is None:
        raise litellm_error("bad_request", f"unknown offline model {request.model!r}: use "
                            f"{ECHO_MODEL!r} or a live ScriptedModel's .model", model=name)
    return request, scripted._next(request), scripted


def _response(request: Request, reply: Reply, scripted: ScriptedModel | None) -> Any:
    import litellm
    from litellm.types.utils import Usage

    ids = scripted._call_ids if scripted else _echo_call_ids
    calls = [_tool_call(c, ids) for c in reply.tool_calls]
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if calls:
        message["tool_calls"] = calls
    input_tokens = reply.input_tokens
    if input_tokens is None:
        input_tokens = sum(_words(m.get("content")) for m in request.messages)
    output_tokens = reply.output_tokens
    if output_tokens is None:
        output_tokens = _words(reply.text) + sum(
            1 + _words(c["function"]["arguments"]) for c in calls)
    return litellm.ModelResponse(
        model=request.model,
        choices=[{"index": 0, "finish_reason": "tool_calls" if calls else "stop",
                  "message": message}],
        usage=Usage(prompt_tokens=input_tokens, completion_tokens=output_tokens,
                    total_tokens=input_tokens + output_tokens),
    )


def _make_handler() -> Any:
    from litellm.llms.custom_llm import CustomLLM

    class OfflineProvider(CustomLLM):
        """Routes ``immagent/<name>`` to the echo model or a live ScriptedModel."""

        # LiteLLM passes everything by keyword; taking **kwargs keeps this provider
        # working when LiteLLM adds parameters.
        async def acompletion(self, *args: Any, **kwargs: Any) -> Any:
            request, reply, scripted = _resolve(kwargs)
            if reply.delay > 0:
                await asyncio.sleep(reply.delay)
            if reply.error is not None:
                raise reply.error
            return _response(request, reply, scripted)

        def completion(self, *args: Any, **kwargs: Any) -> Any:
            request, reply, scripted = _resolve(kwargs)
            if reply.delay > 0:
                time.sleep(reply.delay)
            if reply.error is not None:
                raise reply.error
            return _response(request, reply, scripted)

    return OfflineProvider()


def _import_litellm() -> ModuleType:
    # Without this LiteLLM downloads a price map over the network at import time.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def register() -> None:
    """Register the ``immagent`` provider with LiteLLM (idempotent; imports LiteLLM).

    ``immagent.llm.complete`` calls this itself; call it only to use the offline models
    with ``litellm.acompletion`` directly.
    """
    global _handler
    litellm = _import_litellm()
    if _handler is None:
        _handler = _make_handler()
    # Checked on every call: user code may have replaced litellm.custom_provider_map.
    if not any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": _handler})


ErrorKind = Literal["rate_limit", "timeout", "connection", "internal", "unavailable",
                    "auth", "bad_request", "context_window"]


def litellm_error(kind: ErrorKind, message: str = "simulated failure", *,
                  model: str = ECHO_MODEL) -> Exception:
    """A LiteLLM exception of the given kind, for ``Reply.fail(...)`` in tests."""
    _import_litellm()
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
