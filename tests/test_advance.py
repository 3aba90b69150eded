"""advance(): one turn of orchestration, driven by the offline models (in-process; both call
paths are in test_llm.py).

The tool providers here are small real implementations of the ToolProvider protocol
(tools that add, fail, or wait for each other); MCP-backed tools are in test_mcp.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from immagent.advance import ToolProvider, advance
from immagent.assets import Message, ToolCall
from immagent.exceptions import LLMError, ToolExecutionError, ValidationError
from immagent.llm import Model, bind
from immagent.testing import Reply, Request, ScriptedModel, litellm_error
from immagent.validate import MAX_INPUT_BYTES


def _schema(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": name,
                                             "parameters": {"type": "object"}}}


class Tools:
    """A ToolProvider with an adder, a failing tool, a buggy tool and a rendezvous."""

    def __init__(self, meet: int = 3) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._barrier = asyncio.Barrier(meet)

    def tool_schemas(self) -> list[dict[str, Any]]:
        return [_schema(n) for n in ("add", "fail", "buggy", "meet")]

    async def execute(self, name: str, arguments: dict[str, Any]) -> str:
        self.calls.append((name, arguments))
        if name == "add":
            return str(arguments["a"] + arguments["b"])
        if name == "fail":
            raise ToolExecutionError("the disk is on fire")
        if name == "buggy":
            raise RuntimeError("a bug in the tool provider")
        if name == "meet":
            # Returns only when every caller of the round is waiting here at once:
            # sequential execution would time out instead.
            try:
                async with asyncio.timeout(5):
                    await self._barrier.wait()
            except TimeoutError:
                raise ToolExecutionError("the other calls never arrived") from None
            return "met"
        raise ToolExecutionError(f"unknown tool {name!r}")


def _answered(messages: list[Message]) -> bool:
    """Every tool call in ``messages`` has exactly one tool result (a valid history)."""
    asked = [c.id for m in messages for c in m.tool_calls or ()]
    answered = [m.tool_call_id or "" for m in messages if m.role == "tool"]
    return sorted(asked) == sorted(answered)


def _tool_result(request: Request) -> str:
    return f"result: {request.last_message['content']}"


async def test_returns_only_the_new_messages() -> None:
    history = [Message(role="user", content="earlier"),
               Message(role="assistant", content="Echo: earlier")]
    new = await advance(history=history, user_input="now",
                        complete=bind(Model.ECHO, "Be an echo."))
    assert [m.role for m in new] == ["user", "assistant"]
    assert new[0] == Message(role="user", content="now")
    assert new[1].content == "Echo: now"
    assert new[1].model == "immagent/echo"


async def test_history_and_system_prompt_reach_the_model() -> None:
    model = ScriptedModel(["hi"])
    history = [Message(role="user", content="first"), Message(role="assistant", content="ok")]
    await advance(history=history, user_input="second", complete=bind(model.model, "SYS"))
    assert [(m["role"], m["content"]) for m in model.requests[0].messages] == [
        ("system", "SYS"), ("user", "first"), ("assistant", "ok"), ("user", "second")]
    assert model.requests[0].tools is None  # no tool provider, no tools offered


async def test_tool_round_trip() -> None:
    model = ScriptedModel([Reply.call("add", a=2, b=3), _tool_result])
    tools = Tools()
    new = await advance(history=[], user_input="2+3?", complete=bind(model.model, "sys"),
                        tools=tools)
    assert [m.role for m in new] == ["user", "assistant", "tool", "assistant"]
    (call,) = new[1].tool_calls or ()
    assert (call.name, call.arguments) == ("add", '{"a": 2, "b": 3}')
    assert new[2] == Message(role="tool", content="5", tool_call_id=call.id)
    assert new[3].content == "result: 5"
    assert tools.calls == [("add", {"a": 2, "b": 3})]
    assert model.requests[0].tools == tools.tool_schemas()
    # The second call carried the assistant's tool call and its result.
    assert model.requests[1].messages[-1] == {"role": "tool", "tool_call_id": call.id,
                                              "content": "5"}


async def test_tool_calls_of_one_round_run_concurrently() -> None:
    model = ScriptedModel([Reply.calls(("meet", {}), ("meet", {}), ("meet", {})), "all met"])
    tools = Tools(meet=3)
    new = await advance(history=[], user_input="meet", complete=bind(model.model, "sys"),
                        tools=tools)
    results = [m for m in new if m.role == "tool"]
    assert [m.content for m in results] == ["met", "met", "met"]
    assert not any(m.is_error for m in results)
    # Results keep the order of the calls.
    assert [m.tool_call_id for m in results] == [c.id for c in new[1].tool_calls or ()]
    assert new[-1].content == "all met"


async def test_failing_tool_becomes_an_error_result_the_model_reads() -> None:
    model = ScriptedModel([Reply.calls(("fail", {}), ("add", {"a": 1, "b": 1})), _tool_result])
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                        tools=Tools())
    failed, added = new[2], new[3]
    assert failed.is_error and failed.content == "Error: the disk is on fire"
    assert not added.is_error and added.content == "2"
    sent = model.requests[1].messages
    assert {"role": "tool", "tool_call_id": failed.tool_call_id,
            "content": "Error: the disk is on fire"} in sent
    assert new[-1].content == "result: 2"


@pytest.mark.parametrize(("arguments", "expected"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
async def test_bad_json_arguments_become_error_results(arguments: str, expected: str) -> None:
    model = ScriptedModel([Reply(tool_calls=[ToolCall("c9", "add", arguments)]), "sorry"])
    tools = Tools()
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                        tools=tools)
    assert new[2].is_error and new[2].tool_call_id == "c9"
    assert expected in (new[2].content or "")
    assert tools.calls == []  # never reached the tool
    assert new[-1].content == "sorry"


async def test_empty_arguments_mean_no_arguments() -> None:
    model = ScriptedModel([Reply(tool_calls=[ToolCall("c1", "meet", "")]), "done"])
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                        tools=Tools(meet=1))
    assert new[2].content == "met"


async def test_unknown_tool_and_missing_provider_are_error_results() -> None:
    model = ScriptedModel([Reply.call("nope"), "ok"])
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                        tools=Tools())
    assert new[2].is_error and "unknown tool 'nope'" in (new[2].content or "")

    model = ScriptedModel([Reply.call("add", a=1, b=2), "ok"])
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"))
    assert new[2].is_error and "no tools are available" in (new[2].content or "")


async def test_a_bug_in_the_tool_provider_propagates() -> None:
    model = ScriptedModel([Reply.calls(("buggy", {}), ("add", {"a": 1, "b": 1}))])
    tools = Tools()
    with pytest.raises(RuntimeError, match="a bug in the tool provider"):
        await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                      tools=tools)
    assert ("add", {"a": 1, "b": 1}) in tools.calls  # the sibling call still finished


async def test_max_tool_rounds_reached(caplog: pytest.LogCaptureFixture) -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=1)] * 5)
    tools = Tools()
    with caplog.at_level(logging.WARNING, logger="immagent"):
        new = await advance(history=[], user_input="loop", complete=bind(model.model, "sys"),
                            tools=tools, max_tool_rounds=2)
    assert len(model.requests) == 3  # two rounds of tools, then one more model call
    assert len(tools.calls) == 2  # the third round was not run
    assert [m.role for m in new] == ["user", "assistant", "tool", "assistant", "tool",
                                     "assistant", "tool"]
    last = new[-1]
    assert last.is_error and "limit of 2 tool round(s)" in (last.content or "")
    assert _answered(new)
    assert any("limit of 2 tool round(s)" in r.getMessage() for r in caplog.records)


async def test_one_tool_round_then_the_limit() -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=1), Reply.call("add", a=2, b=2)])
    tools = Tools()
    new = await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                        tools=tools, max_tool_rounds=1)
    assert tools.calls == [("add", {"a": 1, "b": 1})]
    assert [m.role for m in new] == ["user", "assistant", "tool", "assistant", "tool"]
    assert new[-1].is_error and _answered(new)


@pytest.mark.parametrize("user_input", ["", "   \n", "a\x00b", "x" * (MAX_INPUT_BYTES + 1),
                                        "é" * (MAX_INPUT_BYTES // 2 + 1)])
async def test_empty_or_oversized_input_is_rejected(user_input: str) -> None:
    model = ScriptedModel(["unused"])
    with pytest.raises(ValidationError) as info:
        await advance(history=[], user_input=user_input, complete=bind(model.model, "sys"))
    assert info.value.field == "user_input"
    assert model.requests == []


async def test_input_at_the_size_limit_is_accepted() -> None:
    model = ScriptedModel(["fine"])
    new = await advance(history=[], user_input="x" * MAX_INPUT_BYTES,
                        complete=bind(model.model, "sys"))
    assert new[-1].content == "fine"


# 0 is rejected as in immagent 0.1.2: a turn may always run at least one round of tools.
@pytest.mark.parametrize("rounds", [0, -1, True, 1.5])
async def test_bad_max_tool_rounds_is_rejected(rounds: Any) -> None:
    model = ScriptedModel(["unused"])
    with pytest.raises(ValidationError) as info:
        await advance(history=[], user_input="hi", complete=bind(model.model, "sys"),
                      max_tool_rounds=rounds)
    assert info.value.field == "max_tool_rounds"
    assert model.requests == []


async def test_llm_error_propagates_and_nothing_is_returned() -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=2),
                           Reply.fail(litellm_error("auth", "key revoked"))])
    with pytest.raises(LLMError, match="key revoked"):
        await advance(history=[], user_input="go", complete=bind(model.model, "sys"),
                      tools=Tools())


async def test_tokens_are_recorded_per_assistant_message() -> None:
    model = ScriptedModel([Reply(tool_calls=[("add", {"a": 1, "b": 2})], input_tokens=10,
                                 output_tokens=4),
                           Reply(text="3", input_tokens=20, output_tokens=1)])
    new = await advance(history=[], user_input="1+2", complete=bind(model.model, "sys"),
                        tools=Tools())
    assistants = [m for m in new if m.role == "assistant"]
    assert [(m.input_tokens, m.output_tokens) for m in assistants] == [(10, 4), (20, 1)]
    assert all(m.input_tokens is None for m in new if m.role != "assistant")


def test_tools_satisfies_the_protocol() -> None:
    provider: ToolProvider = Tools()  # mypy checks the structural match
    assert provider.tool_schemas()
