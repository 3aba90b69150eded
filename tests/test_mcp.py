"""MCPManager against real MCP stdio server processes (examples/calculator_server.py).

Starting a server costs about a second, so one calculator is shared by the module; tests
that kill a server start their own.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from immagent.advance import advance
from immagent.exceptions import ToolExecutionError, ValidationError
from immagent.llm import bind
from immagent.mcp import MCPManager
from immagent.simple import SimpleAgent
from immagent.testing import Reply, Request, ScriptedModel
from tests.conftest import CALCULATOR, example

ROOT = Path(__file__).resolve().parent.parent
ODD_NAMES = str(Path(__file__).with_name("mcp_odd_names_server.py"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reply_with_result(request: Request) -> str:
    return f"The answer is {request.last_message['content']}."


async def test_tools_are_discovered_as_litellm_schemas(calc: MCPManager) -> None:
    schemas = {s["function"]["name"]: s for s in calc.tool_schemas()}
    assert {"add", "multiply", "divide", "rendezvous", "pid", "crash"} <= set(schemas)
    add = schemas["add"]
    assert add["type"] == "function"
    assert add["function"]["description"] == "Add two numbers."
    params = add["function"]["parameters"]
    assert params["type"] == "object"
    assert set(params["required"]) == {"a", "b"}
    assert calc.get_all_tools() == calc.tool_schemas()
    assert calc.tools["add"] == ("calc", "add")
    assert calc.servers == ("calc",)


async def test_execute_returns_text(calc: MCPManager) -> None:
    assert await calc.execute("add", {"a": 2, "b": 3}) == "5"
    assert await calc.execute("divide", {"a": 1, "b": 4}) == "0.25"


async def test_tool_error_raises_tool_execution_error(calc: MCPManager) -> None:
    with pytest.raises(ToolExecutionError, match="division by zero"):
        await calc.execute("divide", {"a": 1, "b": 0})
    with pytest.raises(ToolExecutionError, match="validation error"):
        await calc.execute("add", {"a": "two"})
    with pytest.raises(ToolExecutionError, match="Unknown tool 'sqrt'"):
        await calc.execute("sqrt", {"x": 4})
    assert await calc.execute("add", {"a": 1, "b": 1}) == "2"  # still usable


async def test_calls_on_one_server_run_concurrently(calc: MCPManager) -> None:
    # rendezvous answers only when all three calls are in flight at the same time.
    args = {"key": "direct", "count": 3, "timeout": 5}
    results = await asyncio.gather(*(calc.execute("rendezvous", args) for _ in range(3)))
    assert results == ["met 3"] * 3


async def test_tool_round_trip_through_advance(calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("multiply", a=6, b=7), _reply_with_result])
    new = await advance(history=[], user_input="6*7?", complete=bind(model.model, "sys"),
                        tools=calc)
    assert [m.role for m in new] == ["user", "assistant", "tool", "assistant"]
    assert new[2].content == "42" and not new[2].is_error
    assert new[3].content == "The answer is 42."
    offered = {t["function"]["name"] for t in model.requests[0].tools or []}
    assert "multiply" in offered


async def test_concurrent_tool_calls_in_one_round(calc: MCPManager) -> None:
    meet = ("rendezvous", {"key": "advance", "count": 3, "timeout": 5})
    model = ScriptedModel([Reply.calls(meet, meet, meet), "done"])
    new = await advance(history=[], user_input="meet", complete=bind(model.model, "sys"),
                        tools=calc)
    results = [m for m in new if m.role == "tool"]
    assert [(m.content, m.is_error) for m in results] == [("met 3", False)] * 3


async def test_tool_error_reaches_the_model(calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("divide", a=1, b=0), "cannot divide"])
    new = await advance(history=[], user_input="1/0", complete=bind(model.model, "sys"),
                        tools=calc)
    assert new[2].is_error
    assert "division by zero" in (new[2].content or "")
    assert "division by zero" in model.requests[1].last_message["content"]


async def test_simple_agent_with_mcp(calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("add", a=40, b=2), _reply_with_result])
    agent = await SimpleAgent("calc", "Use tools.", model.model).advance("40+2?", mcp=calc)
    assert agent.last_response() == "The answer is 42."
    assert [m.role for m in agent.messages] == ["user", "assistant", "tool", "assistant"]


async def test_crashed_server_gives_tool_errors_and_closes_cleanly(
        caplog: pytest.LogCaptureFixture) -> None:
    mcp = MCPManager()
    await mcp.connect("first", sys.executable, [CALCULATOR])
    await mcp.connect("doomed", sys.executable, [CALCULATOR])
    # Same tool names on both servers: the second server's tools get its prefix.
    assert mcp.tools["add"] == ("first", "add")
    assert mcp.tools["doomed__add"] == ("doomed", "add")
    assert await mcp.execute("doomed__add", {"a": 1, "b": 2}) == "3"
    doomed_pid = int(await mcp.execute("doomed__pid", {}))
    first_pid = int(await mcp.execute("pid", {}))
    assert doomed_pid != first_pid

    # The crash happens during a turn: the model gets an error result, not an exception,
    # and the dead server's tools are no longer offered on the next call.
    model = ScriptedModel([Reply.call("doomed__crash"), "the server died"])
    new = await advance(history=[], user_input="crash", complete=bind(model.model, "sys"),
                        tools=mcp)
    assert new[2].is_error and "doomed__crash" in (new[2].content or "")
    assert new[-1].content == "the server died"
    offered = [{t["function"]["name"] for t in r.tools or []} for r in model.requests]
    assert "doomed__add" in offered[0] and "doomed__add" not in offered[1]

    with pytest.raises(ToolExecutionError, match="not running"):
        await mcp.execute("doomed__add", {"a": 1, "b": 2})
    names = {s["function"]["name"] for s in mcp.tool_schemas()}
    assert "add" in names and not any(n.startswith("doomed__") for n in names)
    assert mcp.servers == ("first",)
    assert await mcp.execute("add", {"a": 1, "b": 2}) == "3"  # the other server lives on

    await mcp.close()  # must not raise although a server died
    await mcp.close()  # idempotent
    for _ in range(100):  # the process is reaped by close(); allow the kernel a moment
        if not _alive(first_pid):
            break
        await asyncio.sleep(0.02)
    assert not _alive(first_pid)
    assert not _alive(doomed_pid)
    with pytest.raises(ToolExecutionError, match="closed"):
        await mcp.connect("again", sys.executable, [CALCULATOR])
    with pytest.raises(ToolExecutionError, match="closed"):
        await mcp.execute("add", {"a": 1, "b": 2})


async def test_server_that_fails_to_start() -> None:
    async with MCPManager(connect_timeout=10) as mcp:
        with pytest.raises(ToolExecutionError, match="failed to start"):
            await mcp.connect("quitter", sys.executable, ["-c", "raise SystemExit(1)"])
        with pytest.raises(ToolExecutionError, match="failed to start"):
            await mcp.connect("missing", "/nonexistent/mcp-server")
        assert mcp.servers == ()
        assert mcp.tool_schemas() == []


async def test_server_that_never_answers_times_out() -> None:
    async with MCPManager(connect_timeout=0.5) as mcp:
        with pytest.raises(ToolExecutionError, match=r"did not start within 0\.5 s"):
            # Reads its stdin until EOF and never answers (and exits once we hang up).
            await mcp.connect("mute", sys.executable, ["-c", "import sys; sys.stdin.read()"])
        assert mcp.servers == ()


async def test_duplicate_or_empty_server_name_is_rejected(calc: MCPManager) -> None:
    with pytest.raises(ValidationError) as info:
        await calc.connect("calc", sys.executable, [CALCULATOR])
    assert info.value.field == "name"
    with pytest.raises(ValidationError):
        await calc.connect("", sys.executable, [CALCULATOR])


async def test_tool_names_are_made_valid_for_openai() -> None:
    async with MCPManager() as mcp:
        exposed = await mcp.connect("odd", sys.executable, [ODD_NAMES])
        assert "text_shout" in exposed
        assert mcp.tools["text_shout"] == ("odd", "text.shout")
        long_name = next(n for n in exposed if n.startswith("xxx"))
        assert len(long_name) == 64
        assert await mcp.execute("text_shout", {"text": "hi"}) == "HI"
        assert await mcp.execute(long_name, {}) == "long"


async def test_mcp_tools_example_runs() -> None:
    with example("mcp_tools") as module:
        agent = await module.main()
    assert agent.last_response() == "6 times 7 is 42."
