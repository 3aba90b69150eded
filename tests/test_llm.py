"""immagent.llm with the offline ``immagent`` models, every test on both paths: answered
in-process (the default, no LiteLLM) and through the real ``litellm.acompletion`` path
(the offline models as a LiteLLM custom provider). Streaming is in test_llm_stream.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from immagent.assets import Message, ToolCall
from immagent.exceptions import LLMError, ValidationError
from immagent.llm import Model, bind, complete
from immagent.testing import (
    ErrorKind,
    Reply,
    ScriptedModel,
    litellm_error,
)
from tests.conftest import FAST, USER

pytestmark = pytest.mark.usefixtures("offline_path")  # every test on both paths


async def test_echo_reply_tokens_model_and_call_config() -> None:
    reply = await complete(Model.ECHO, "Be brief.", USER,
                           config={"temperature": 1.0, "max_tokens": 50, "top_p": 0.5})
    assert reply.role == "assistant"
    assert reply.content == "Echo: hello there"
    assert reply.tool_calls is None
    # Word counts: "Be brief. hello there" in, "Echo: hello there" out.
    assert (reply.input_tokens, reply.output_tokens) == (4, 3)
    assert reply.model == "immagent/echo"
    assert type(reply.model) is str  # not the enum member: it is hashed and stored
    assert reply.call_config == {"temperature": 1, "max_tokens": 50, "top_p": 0.5}


async def test_config_reaches_the_provider_and_is_canonical() -> None:
    model = ScriptedModel(["ok"])
    reply = await complete(model.model, "sys", USER, timeout=7.5,
                           config={"temperature": 0.25, "seed": 7, "stop": ("END",)})
    (request,) = model.requests
    assert request.params == {"temperature": 0.25, "seed": 7, "stop": ["END"]}
    assert request.timeout == 7.5
    assert reply.call_config == {"temperature": 0.25, "seed": 7, "stop": ["END"]}


async def test_empty_config_is_recorded_as_none() -> None:
    reply = await complete(Model.ECHO, "", USER)
    assert reply.call_config is None


async def test_messages_are_sent_in_openai_format() -> None:
    model = ScriptedModel(["done"])
    history = [
        Message(role="user", content="add 1 and 2"),
        Message(role="assistant", tool_calls=(ToolCall("c1", "add", '{"a": 1, "b": 2}'),)),
        Message(role="tool", content="3", tool_call_id="c1"),
    ]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    await complete(model.model, "You add.", history, tools=tools)
    (request,) = model.requests
    # LiteLLM drops a None content on the way to the provider; compare without Nones.
    sent = [{k: v for k, v in m.items() if v is not None} for m in request.messages]
    assert sent == [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    assert request.tools == tools


async def test_tool_calls_and_scripted_tokens_are_parsed() -> None:
    model = ScriptedModel([Reply(tool_calls=[("add", {"a": 1, "b": 2}), ("neg", {"x": 3})],
                                 input_tokens=11, output_tokens=13)])
    reply = await complete(model.model, "sys", USER)
    assert reply.content is None
    assert reply.tool_calls == (ToolCall("call_1", "add", '{"a": 1, "b": 2}'),
                                ToolCall("call_2", "neg", '{"x": 3}'))
    assert (reply.input_tokens, reply.output_tokens) == (11, 13)


@pytest.mark.parametrize("kind", ["rate_limit", "timeout", "connection", "internal",
                                  "unavailable"])
async def test_transient_error_is_retried_then_succeeds(
        kind: ErrorKind, caplog: pytest.LogCaptureFixture) -> None:
    model = ScriptedModel([Reply.fail(litellm_error(kind, "try later")), "recovered"])
    with caplog.at_level(logging.WARNING, logger="immagent"):
        reply = await complete(model.model, "sys", USER, max_retries=2, retry_delay=FAST)
    assert reply.content == "recovered"
    assert len(model.requests) == 2
    assert model.requests[0].messages == model.requests[1].messages
    assert any("retry 1 of 2" in r.getMessage() for r in caplog.records)


async def test_gives_up_after_max_retries() -> None:
    model = ScriptedModel([Reply.fail(litellm_error("rate_limit", "slow down"))] * 3 + ["late"])
    with pytest.raises(LLMError, match="failed after 3 attempt") as info:
        await complete(model.model, "sys", USER, max_retries=2, retry_delay=FAST)
    assert "slow down" in str(info.value)
    assert type(info.value.__cause__).__name__ == "RateLimitError"
    assert len(model.requests) == 3
    assert model.remaining == 1


@pytest.mark.parametrize("kind", ["auth", "bad_request", "context_window"])
async def test_permanent_error_is_not_retried(kind: ErrorKind) -> None:
    model = ScriptedModel([Reply.fail(litellm_error(kind, "invalid x-api-key")), "never"])
    with pytest.raises(LLMError, match="invalid x-api-key") as info:
        await complete(model.model, "sys", USER, max_retries=3, retry_delay=FAST)
    # The provider's exception is chained as the cause (unwrapped by LiteLLM on its path).
    assert type(info.value.__cause__) is type(litellm_error(kind))
    assert len(model.requests) == 1
    assert model.remaining == 1


@pytest.mark.parametrize(("kind", "message", "variable"), [
    ("internal", "OpenAIException - Missing credentials. Please pass an `api_key`, or set "
                 "the `OPENAI_API_KEY` or `OPENAI_ADMIN_KEY` environment variable.",
     "OPENAI_API_KEY"),
    ("connection", "Missing Gemini API key. Set the GEMINI_API_KEY or GOOGLE_API_KEY "
                   "environment variable.", "GEMINI_API_KEY"),
    ("auth", "Missing Anthropic API Key - Please set `ANTHROPIC_API_KEY`", "ANTHROPIC_API_KEY"),
])
async def test_missing_credentials_fail_at_once_naming_the_variable(
        kind: ErrorKind, message: str, variable: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # How LiteLLM reports a missing key: a 500 for OpenAI, a connection error for Gemini.
    model = ScriptedModel([Reply.fail(litellm_error(kind, message)), "never"])
    with caplog.at_level(logging.WARNING, logger="immagent"), \
            pytest.raises(LLMError, match=f"no API key: set {variable} in the environment"):
        await complete(model.model, "sys", USER, max_retries=3, retry_delay=FAST)
    assert len(model.requests) == 1 and model.remaining == 1
    assert not any("retry" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("model", "variable"), [("openai/gpt-4o-mini", "OPENAI_API_KEY"),
                                                  ("gpt-4o-mini", "OPENAI_API_KEY"),
                                                  ("gemini/gemini-2.0-flash", "GEMINI_API_KEY")])
async def test_a_provider_without_its_key_fails_without_retries(
        model: str, variable: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The real provider clients: they refuse before any request is sent (no network).
    for key in ("OPENAI_API_KEY", "OPENAI_ADMIN_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level(logging.WARNING, logger="immagent"), \
            pytest.raises(LLMError, match=f"set {variable} in the environment"):
        await complete(model, "sys", USER, max_retries=3, retry_delay=FAST)
    assert not any("retry" in r.getMessage() for r in caplog.records)


async def test_an_unknown_provider_is_named_and_not_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="immagent"), \
            pytest.raises(LLMError, match="foo/bar: unknown model or provider"):
        await complete("foo/bar", "sys", USER, max_retries=3, retry_delay=FAST)
    assert not any("retry" in r.getMessage() for r in caplog.records)


async def test_timeout_becomes_llm_error() -> None:
    # A first call pays LiteLLM's one-off work (its import, the provider's setup) outside
    # the timed attempt: a loaded machine would otherwise spend the whole bound on it,
    # before the request reached the model.
    await complete(Model.ECHO, "sys", USER)
    model = ScriptedModel([Reply(text="too late", delay=30)])
    with pytest.raises(LLMError, match=r"no reply within 0\.5 s") as info:
        await complete(model.model, "sys", USER, timeout=0.5, max_retries=0)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert len(model.requests) == 1


async def test_timed_out_attempt_is_retried() -> None:
    await complete(Model.ECHO, "sys", USER)  # LiteLLM's one-off work, as above
    model = ScriptedModel([Reply(text="too late", delay=30), "in time"])
    # The timeout bounds each attempt, the second included: it must leave a busy machine's
    # LiteLLM call path time to answer (0.05 s failed under load), far below the delay.
    reply = await complete(model.model, "sys", USER, timeout=2.0, max_retries=1,
                           retry_delay=FAST)
    assert reply.content == "in time"
    assert len(model.requests) == 2


async def test_exhausted_script_fails_without_retry() -> None:
    model = ScriptedModel(["only one"])
    await complete(model.model, "sys", USER)
    with pytest.raises(LLMError, match="script exhausted"):
        await complete(model.model, "sys", USER, max_retries=3, retry_delay=FAST)
    assert len(model.requests) == 2


async def test_unknown_offline_model_is_llm_error() -> None:
    with pytest.raises(LLMError, match="unknown offline model"):
        await complete("immagent/no-such-model", "sys", USER, max_retries=0)


@pytest.mark.parametrize("config", [{"stream": True}, {"api_key": "sk-secret"},
                                    {"num_retries": 5}, {"temperature": float("nan")},
                                    {"temperature": object()}, {1: 2}])
async def test_bad_config_is_rejected_before_any_call(config: dict[Any, Any]) -> None:
    model = ScriptedModel(["unused"])
    with pytest.raises(ValidationError) as info:
        await complete(model.model, "sys", USER, config=config)
    assert info.value.field.startswith("config")
    assert model.requests == []


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_retries": -1}, "max_retries"), ({"max_retries": True}, "max_retries"),
    ({"timeout": 0}, "timeout"), ({"timeout": float("inf")}, "timeout"),
    ({"retry_delay": -1.0}, "retry_delay"),
])
async def test_bad_call_parameters_are_rejected(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        await complete(Model.ECHO, "sys", USER, **kwargs)
    assert info.value.field == field


async def test_empty_model_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        await complete(" ", "sys", USER)
    assert info.value.field == "model"


async def test_bind_makes_a_complete_fn_and_validates_eagerly() -> None:
    model = ScriptedModel(["bound"])
    call = bind(model.model, "You are bound.", {"temperature": 0}, max_retries=0, timeout=5)
    reply = await call(USER, None)
    assert reply.content == "bound"
    assert reply.call_config == {"temperature": 0}
    assert model.requests[0].messages[0] == {"role": "system", "content": "You are bound."}
    with pytest.raises(ValidationError):
        bind(model.model, "sys", {"stream": True})
    with pytest.raises(ValidationError):
        bind(model.model, "sys", max_retries=-1)


def test_model_constants_match_the_seed() -> None:
    assert {m.name: m.value for m in Model} == {
        "CLAUDE_3_5_HAIKU": "anthropic/claude-3-5-haiku-20241022",
        "CLAUDE_SONNET_4": "anthropic/claude-sonnet-4-20250514",
        "CLAUDE_OPUS_4": "anthropic/claude-opus-4-20250514",
        "GPT_4O": "openai/gpt-4o",
        "GPT_4O_MINI": "openai/gpt-4o-mini",
        "O1": "openai/o1",
        "O1_MINI": "openai/o1-mini",
        "ECHO": "immagent/echo",
    }
    assert isinstance(Model.ECHO, str)  # usable wherever a model string is expected


def test_scripted_model_names_are_unique() -> None:
    first = ScriptedModel(name="unique-name-test")
    with pytest.raises(ValidationError):
        ScriptedModel(name="unique-name-test")
    assert first.model == "immagent/unique-name-test"
