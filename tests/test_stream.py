"""Streamed turns (``agent.stream``) end to end on both storage backends: the same stored
state as ``advance``, nothing written on failure or cancellation, ``keep_partial``, tool
rounds through a real MCP stdio server, many streams at once; and SimpleAgent streaming."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from immagent import (
    LLMError,
    MCPManager,
    Message,
    PersistentAgent,
    SimpleAgent,
    Store,
    ToolCall,
    TurnIncompleteError,
    ValidationError,
)
from immagent.llm import Model
from immagent.stream import (
    AssistantReply,
    TextDelta,
    ToolCallRequest,
    ToolResult,
    TurnDone,
    TurnEvent,
)
from immagent.testing import Reply, Request, ScriptedModel
from tests.conftest import count_rows, example, unrecorded


def rows(dsn: str) -> tuple[int, int]:
    """(states, assets and chain nodes)."""
    return count_rows(dsn, "immagent_states"), (count_rows(dsn, "immagent_assets")
                                                + count_rows(dsn, "immagent_nodes"))


async def new_agent(store: Store, model: str) -> PersistentAgent:
    return await store.create_agent("bot", "You are helpful.", model,
                                    model_config={"temperature": 0.5})


async def collect(agent: PersistentAgent | SimpleAgent, text: str,
                  **kwargs: Any) -> tuple[list[TurnEvent], Any]:
    """Every event of one streamed turn, and the new agent."""
    async with agent.stream(text, **kwargs) as s:
        events = [event async for event in s]
    return events, s.agent


def answer_with_result(request: Request) -> str:
    return f"The answer is {request.last_message['content']}."


async def test_a_streamed_turn_stores_the_same_state_as_advance(
        store: Store, store_dsn: str) -> None:
    agent = await new_agent(store, Model.ECHO)
    whole = await agent.advance("hello streaming world")
    before = rows(store_dsn)
    events, streamed = await collect(agent, "hello streaming world")
    assert [e.text for e in events if isinstance(e, TextDelta)] == [
        "Echo:", " hello", " streaming", " world"]
    assert [type(e) for e in events[-2:]] == [AssistantReply, TurnDone]
    done = events[-1]
    assert isinstance(done, TurnDone)
    assert done.usage == (6, 4) and done.messages == await whole.get_messages()
    # The same content: same state digest, same conversation node, no new asset row.
    assert streamed.parent_id == agent.id and streamed.id != whole.id
    assert streamed.digest == whole.digest
    assert streamed.conversation_digest == whole.conversation_digest
    assert rows(store_dsn) == (before[0] + 1, before[1])
    store.clear_cache()
    reloaded = await store.load_agent(streamed.id)
    assert await reloaded.get_messages() == await whole.get_messages()


async def test_breaking_out_of_a_stream_writes_nothing(store: Store, store_dsn: str) -> None:
    model = ScriptedModel([Reply(chunks=["one ", "two ", "three"])])
    agent = await new_agent(store, model.model)
    before = rows(store_dsn)
    async with agent.stream("count") as s:
        async for event in s:
            if isinstance(event, TextDelta):
                break
    assert rows(store_dsn) == before
    assert not s.interrupted
    with pytest.raises(TurnIncompleteError, match="keep_partial=False"):
        _ = s.agent


async def test_cancelling_a_stream_writes_nothing(store: Store, store_dsn: str) -> None:
    model = ScriptedModel([Reply(chunks=["a ", "slow ", "reply"], chunk_delay=0.05)])
    agent = await new_agent(store, model.model)
    before = rows(store_dsn)
    first = asyncio.Event()

    async def consume() -> None:
        async with agent.stream("go") as s:
            async for _ in s:
                first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rows(store_dsn) == before


@pytest.mark.parametrize("keep_partial", [False, True])
async def test_a_stream_that_fails_mid_reply_writes_nothing(
        store: Store, store_dsn: str, keep_partial: bool) -> None:
    # (LiteLLM's own error classes mid-stream: test_llm_stream.py, on both call paths.)
    model = ScriptedModel([Reply(chunks=["half ", "a "],
                                 error=ConnectionResetError("connection reset by peer"))])
    agent = await new_agent(store, model.model)
    before = rows(store_dsn)
    seen: list[str] = []
    with pytest.raises(LLMError, match="broke off after 2 chunk"):
        async with agent.stream("hi", keep_partial=keep_partial, retry_delay=0.001) as s:
            async for event in s:
                if isinstance(event, TextDelta):
                    seen.append(event.text)
    assert seen == ["half ", "a "]  # the caller saw the text, and nothing was saved
    assert rows(store_dsn) == before
    with pytest.raises(TurnIncompleteError):
        _ = s.agent


async def test_keep_partial_saves_one_state_marked_interrupted(
        store: Store, store_dsn: str) -> None:
    model = ScriptedModel([Reply(chunks=["The ", "answer ", "is ", "long"]), "Sure."])
    agent = await new_agent(store, model.model)
    before = rows(store_dsn)
    async with agent.stream("tell me", keep_partial=True) as s:
        async for event in s:
            if isinstance(event, TextDelta) and event.text == "answer ":
                break
    assert s.interrupted
    partial = s.agent
    assert partial.parent_id == agent.id
    assert rows(store_dsn) == (before[0] + 1, before[1] + 1)  # 1 node holding 2 messages
    store.clear_cache()
    messages = await (await store.load_agent(partial.id)).get_messages()
    assert messages[-1].request is not None  # the call it answered is recorded
    assert unrecorded(messages) == (Message(role="user", content="tell me"),
                        Message(role="assistant", content="The answer ", model=model.model,
                                call_config={"temperature": 0.5}, interrupted=True))
    assert messages[-1].digest != Message(
        role="assistant", content="The answer ", model=model.model,
        call_config={"temperature": 0.5}).digest  # the mark is hashed
    # The conversation goes on from the partial state; the model sees what it had said.
    after = await partial.advance("go on")
    assert model.requests[-1].messages[-2] == {"role": "assistant", "content": "The answer "}
    assert await after.last_response() == "Sure."


async def test_keep_partial_on_cancel_before_any_text(store: Store) -> None:
    asked = asyncio.Event()

    def late(request: Request) -> Reply:
        asked.set()
        return Reply(text="late", delay=30)

    model = ScriptedModel([late])
    agent = await new_agent(store, model.model)

    async def consume() -> PersistentAgent:
        async with agent.stream("hello", keep_partial=True) as s:
            async for _ in s:
                pass
        return s.agent

    task = asyncio.create_task(consume())
    await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (partial,) = [a for a in await store.list_agents() if a.parent_id == agent.id]
    messages = await partial.get_messages()
    assert [(m.role, m.content, m.interrupted) for m in messages] == [
        ("user", "hello", False), ("assistant", None, True)]


class SlowTools:
    """``fast`` answers at once, ``slow`` waits until released (or is cancelled)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0

    def tool_schemas(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                for n in ("fast", "slow")]

    async def execute(self, name: str, arguments: dict[str, Any]) -> str:
        if name == "slow":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return f"{name} done"


async def test_tool_results_stream_as_calls_finish_and_are_stored_in_call_order(
        store: Store) -> None:
    model = ScriptedModel([Reply.calls(("slow", {}), ("fast", {})), "Both done."])
    agent = await new_agent(store, model.model)
    tools = SlowTools()
    order: list[str] = []
    async with agent.stream("run both", mcp=tools) as s:
        async for event in s:
            if isinstance(event, ToolCallRequest):
                order.append(f"ask {event.call.name}")
            elif isinstance(event, ToolResult):
                order.append(f"got {event.call.name}")
                tools.release.set()  # slow finishes only after fast has been seen
    assert order == ["ask slow", "ask fast", "got fast", "got slow"]
    messages = await s.agent.get_messages()
    assert [m.content for m in messages if m.role == "tool"] == ["slow done", "fast done"]


async def test_keep_partial_during_a_tool_round_answers_every_call(store: Store) -> None:
    model = ScriptedModel([Reply.calls(("fast", {}), ("slow", {}))])
    agent = await new_agent(store, model.model)
    tools = SlowTools()
    async with agent.stream("run both", mcp=tools, keep_partial=True) as s:
        async for event in s:
            if isinstance(event, ToolResult):  # fast is done, slow still running
                break
    assert tools.cancelled == 1  # no tool keeps running after the turn stopped
    messages = await s.agent.get_messages()
    asked = messages[1].tool_calls
    assert asked is not None and [m.role for m in messages] == ["user", "assistant", "tool",
                                                                 "tool"]
    assert not messages[1].interrupted  # the reply itself was whole
    fast, slow = messages[2], messages[3]
    assert (fast.tool_call_id, fast.content, fast.interrupted) == (asked[0].id, "fast done",
                                                                    False)
    assert slow.tool_call_id == asked[1].id and slow.is_error and slow.interrupted
    assert "interrupted" in (slow.content or "")


async def test_a_tool_round_trip_streams_and_reloads(
        store: Store, store_dsn: str, calc: MCPManager) -> None:
    model = ScriptedModel([Reply(text="Let me compute.", tool_calls=[
        ToolCall("c1", "multiply", '{"a": 6, "b": 7}')]), answer_with_result] * 2)
    agent = await new_agent(store, model.model)
    whole = await agent.advance("What is 6 times 7?", mcp=calc)
    events, streamed = await collect(agent, "What is 6 times 7?", mcp=calc)
    kinds = [(type(e).__name__, getattr(e, "round", None)) for e in events
             if not isinstance(e, TextDelta)]
    assert kinds == [("AssistantReply", 0), ("ToolCallRequest", 0), ("ToolResult", 0),
                     ("AssistantReply", 1), ("TurnDone", None)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "Let me compute.The answer is 42."
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.message.content == "42" and result.call.name == "multiply"
    assert streamed.digest == whole.digest
    store.clear_cache()
    reloaded = await store.load_agent(streamed.id)
    assert await reloaded.get_messages() == await whole.get_messages()
    assert len(await reloaded.get_messages()) == 4


async def test_the_tool_round_limit_holds_when_streaming(store: Store) -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=1)] * 2)
    agent = await new_agent(store, model.model)
    events, new = await collect(agent, "loop", mcp=SlowTools(), max_tool_rounds=1)
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(results) == 2 and "limit of 1 tool round" in (results[1].message.content or "")
    assert len(model.requests) == 2
    assert (await new.get_messages())[-1].is_error


async def test_many_concurrent_streams_on_one_store(store: Store, store_dsn: str) -> None:
    agent = await new_agent(store, Model.ECHO)
    others = [await new_agent(store, Model.ECHO) for _ in range(3)]
    before = rows(store_dsn)
    sources = [agent] * 8 + others * 4  # forks of one state and several lineages

    async def one(i: int, source: PersistentAgent) -> PersistentAgent:
        _, new = await collect(source, f"stream number {i}")
        return new  # type: ignore[no-any-return]

    results = await asyncio.gather(*(one(i, a) for i, a in enumerate(sources)))
    assert count_rows(store_dsn, "immagent_states") == before[0] + len(sources)
    store.clear_cache()
    for i, (source, new) in enumerate(zip(sources, results, strict=True)):
        messages = await (await store.load_agent(new.id)).get_messages()
        assert new.parent_id == source.id
        assert messages[-1].content == f"Echo: stream number {i}"


async def test_stream_checks_its_arguments_at_once(store: Store) -> None:
    agent = await new_agent(store, Model.ECHO)
    with pytest.raises(ValidationError) as info:
        agent.stream("  ")
    assert info.value.field == "user_input"
    with pytest.raises(ValidationError) as info:
        agent.stream("hi", max_tool_rounds=0)
    assert info.value.field == "max_tool_rounds"
    with pytest.raises(ValidationError) as info:
        agent.stream("hi", keep_partial="yes")  # type: ignore[arg-type]
    assert info.value.field == "keep_partial"


async def test_finish_drains_the_stream() -> None:
    agent = SimpleAgent("s", "Be brief.", Model.ECHO)
    new = await agent.stream("quick").finish()
    assert new.last_response() == "Echo: quick"


# -- SimpleAgent ----------------------------------------------------------------------------

async def test_simple_agent_streams_to_the_agent_advance_makes() -> None:
    agent = SimpleAgent("s", "Be brief.", Model.ECHO, metadata={"k": 1})
    events, streamed = await collect(agent, "hello there")
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Echo:", " hello",
                                                                     " there"]
    assert streamed == await agent.advance("hello there")
    assert agent.messages == ()  # the original is unchanged
    assert streamed.metadata == {"k": 1}


async def test_simple_agent_keep_partial_and_break() -> None:
    model = ScriptedModel([Reply(chunks=["a", "b", "c"])] * 2)
    agent = SimpleAgent("s", "sys", model.model)
    async with agent.stream("x") as s:
        async for _ in s:
            break
    with pytest.raises(TurnIncompleteError):
        _ = s.agent
    async with agent.stream("x", keep_partial=True) as s:
        async for event in s:
            if isinstance(event, TextDelta) and event.text == "b":
                break
    assert s.interrupted
    assert [(m.content, m.interrupted) for m in s.agent.messages] == [("x", False),
                                                                      ("ab", True)]


async def test_stream_chat_example_runs(tmp_path: Path) -> None:
    with example("stream_chat") as module:
        cut = await module.main(str(tmp_path / "stream.db"))
    assert (cut.content, cut.interrupted) == ("Echo: This reply will", True)
