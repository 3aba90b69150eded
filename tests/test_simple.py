"""SimpleAgent: the in-memory agent, with the offline models (answered in-process; both call
paths are in test_llm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from immagent import Store
from immagent.exceptions import LLMError, ValidationError
from immagent.llm import Model
from immagent.simple import MessageList, SimpleAgent
from immagent.testing import Reply, ScriptedModel, litellm_error
from tests.conftest import example

ROOT = Path(__file__).resolve().parent.parent


async def test_conversation_with_the_echo_model() -> None:
    agent = SimpleAgent("Assistant", "You are helpful.", Model.ECHO)
    first = await agent.advance("Hello!")
    second = await first.advance("What's 2+2?")

    assert [(m.role, m.content) for m in second.messages] == [
        ("user", "Hello!"), ("assistant", "Echo: Hello!"),
        ("user", "What's 2+2?"), ("assistant", "Echo: What's 2+2?")]
    assert second.messages() == second.messages  # the seed's call form works too
    assert isinstance(second.messages, tuple)
    assert second.last_response() == "Echo: What's 2+2?"
    # Word counts: 3 + 1 words in, then 3 + 1 + 2 + 2 words in; 2 and 3 words out.
    assert second.token_usage() == (4 + 8, 2 + 3)
    assert second.model == "immagent/echo" and type(second.model) is str

    # Every step is a new agent; the old ones are untouched.
    assert agent.messages == () and agent.last_response() is None
    assert agent.token_usage() == (0, 0)
    assert len(first.messages) == 2
    assert second.name == agent.name and second.system_prompt == agent.system_prompt


def test_agent_is_immutable() -> None:
    agent = SimpleAgent("a", "p", Model.ECHO)
    with pytest.raises(AttributeError, match="immutable"):
        agent.name = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        agent._messages = MessageList()
    config = agent.model_config
    config["temperature"] = 2
    assert agent.model_config == {}
    assert agent == SimpleAgent("a", "p", "immagent/echo")
    assert hash(agent) == hash(SimpleAgent("a", "p", "immagent/echo"))


async def test_per_turn_overrides_reach_the_model() -> None:
    model = ScriptedModel(["one", "two"])
    agent = SimpleAgent("a", "p", model.model, model_config={"temperature": 0.5, "seed": 3})
    agent = await agent.advance("first")
    agent = await agent.advance("second", temperature=0.0, max_tokens=20, top_p=0.9)
    assert model.requests[0].params == {"temperature": 0.5, "seed": 3}
    assert model.requests[1].params == {"temperature": 0, "seed": 3, "max_tokens": 20,
                                        "top_p": 0.9}
    assistants = [m for m in agent.messages if m.role == "assistant"]
    assert assistants[0].call_config == {"temperature": 0.5, "seed": 3}
    assert assistants[1].call_config == {"temperature": 0, "seed": 3, "max_tokens": 20,
                                         "top_p": 0.9}
    assert agent.model_config == {"temperature": 0.5, "seed": 3}  # defaults unchanged


async def test_failed_turn_leaves_the_agent_unchanged() -> None:
    model = ScriptedModel(["fine", Reply.fail(litellm_error("auth", "bad key"))])
    agent = await SimpleAgent("a", "p", model.model).advance("one")
    with pytest.raises(LLMError, match="bad key"):
        await agent.advance("two")
    assert [m.content for m in agent.messages] == ["one", "fine"]


async def test_retry_and_timeout_settings_are_used() -> None:
    model = ScriptedModel([Reply(text="slow", delay=30),
                           Reply.fail(litellm_error("unavailable")), "ok"])
    agent = SimpleAgent("a", "p", model.model)
    # Each attempt is bounded, the answering one too: 2 s leaves a busy machine time.
    agent = await agent.advance("hi", timeout=2.0, max_retries=2, retry_delay=0.001)
    assert agent.last_response() == "ok"
    assert len(model.requests) == 3
    assert model.requests[0].timeout == 2.0


async def test_tokens_add_up_over_tool_rounds() -> None:
    model = ScriptedModel([Reply(tool_calls=[("x", {})], input_tokens=7, output_tokens=2),
                           Reply(text="done", input_tokens=11, output_tokens=1)])
    agent = await SimpleAgent("a", "p", model.model).advance("go")  # no tools: error result
    assert agent.token_usage() == (18, 3)
    assert agent.last_response() == "done"


@pytest.mark.parametrize(("args", "field"), [
    (("", "p", Model.ECHO), "name"),
    (("a", "  ", Model.ECHO), "system_prompt"),
    (("a", "p", ""), "model"),
    (("a" * 1001, "p", Model.ECHO), "name"),
    ((None, "p", Model.ECHO), "name"),
])
def test_invalid_settings_are_rejected(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        SimpleAgent(*args)
    assert info.value.field == field


def test_invalid_model_config_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        SimpleAgent("a", "p", Model.ECHO, model_config={"stream": True})
    assert info.value.field == "model_config"  # the argument's name, as create_agent says


@pytest.mark.parametrize(("name", "model", "field"), [
    ("evil\x1b]0;pwned\x07", Model.ECHO, "name"),
    ("a", "immagent/echo\x07", "model"),
])
async def test_control_characters_are_refused_as_create_agent_refuses_them(
        name: str, model: str, field: str) -> None:
    # One rule for an agent's fields: what create_agent refuses, SimpleAgent refuses.
    with pytest.raises(ValidationError) as info:
        SimpleAgent(name, "p", model)
    assert info.value.field == field
    async with await Store.connect("memory://") as store:
        await store.init_schema()
        with pytest.raises(ValidationError) as stored:
            await store.create_agent(name, "p", model)
    assert stored.value.field == field


@pytest.mark.parametrize("user_input", ["", " ", "x" * 1_000_001])
async def test_empty_or_oversized_input_is_rejected(user_input: str) -> None:
    model = ScriptedModel(["unused"])
    agent = SimpleAgent("a", "p", model.model)
    with pytest.raises(ValidationError) as info:
        await agent.advance(user_input)
    assert info.value.field == "user_input"
    assert model.requests == []


async def test_simple_chat_example_runs() -> None:
    with example("simple_chat") as module:
        agent = await module.main()
    assert agent.last_response() == "Echo: What's 2+2?"
