"""PersistentAgent.advance end to end: the offline models (in-process; both call paths are
in test_llm.py), a real MCP stdio server, and both storage backends. A failed turn must
leave no trace."""

from __future__ import annotations

import asyncio

import pytest

import immagent
from immagent import MCPManager, PersistentAgent, Store
from immagent.testing import Reply, Request, ScriptedModel, litellm_error
from immagent.validate import MAX_INPUT_BYTES
from tests.conftest import count_rows


def rows(dsn: str) -> tuple[int, int]:
    return count_rows(dsn, "immagent_states"), count_rows(dsn, "immagent_assets")


async def new_agent(store: Store, model: str) -> PersistentAgent:
    return await store.create_agent("bot", "You are helpful.", model,
                                    model_config={"temperature": 0.5})


def answer_with_result(request: Request) -> str:
    return f"The answer is {request.last_message['content']}."


async def test_tool_round_trip_is_stored_and_reloads(
        store: Store, calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("multiply", a=6, b=7), answer_with_result])
    agent = await new_agent(store, model.model)
    new = await agent.advance("What is 6 times 7?", mcp=calc, max_tokens=50,
                              retry_delay=0.001)
    assert new.parent_id == agent.id
    store.clear_cache()
    reloaded = await store.load_agent(new.id)
    messages = await reloaded.get_messages()
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    call = messages[1].tool_calls[0]  # type: ignore[index]
    assert call.name == "multiply" and messages[2].tool_call_id == call.id
    assert messages[2].content == "42" and not messages[2].is_error
    assert messages[3].content == "The answer is 42."
    # Audit: every reply records the model and the parameters that produced it.
    for reply in (messages[1], messages[3]):
        assert reply.model == model.model
        assert reply.call_config == {"temperature": 0.5, "max_tokens": 50}
    assert model.requests[0].params.get("max_tokens") == 50


async def test_a_failing_tool_is_stored_as_an_error_result(
        store: Store, calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("divide", a=1, b=0), "cannot divide by zero"])
    new = await (await new_agent(store, model.model)).advance("1/0?", mcp=calc)
    tool = (await new.get_messages())[2]
    assert tool.role == "tool" and tool.is_error and tool.content


async def test_transient_errors_are_retried_then_saved(store: Store) -> None:
    model = ScriptedModel([Reply.fail(litellm_error("rate_limit")),
                           Reply.fail(litellm_error("unavailable")), "finally"])
    new = await (await new_agent(store, model.model)).advance("hi", retry_delay=0.001)
    assert (await new.get_messages())[-1].content == "finally"
    assert len(model.requests) == 3


@pytest.mark.parametrize("failure", ["auth", "timeout", "exhausted", "bad_input", "huge"])
async def test_a_failed_turn_writes_nothing(store: Store, store_dsn: str, failure: str) -> None:
    script = {
        "auth": [Reply.fail(litellm_error("auth"))],
        "timeout": [Reply(text="late", delay=5.0)],
        "exhausted": [Reply.fail(litellm_error("connection"))] * 3,
    }.get(failure, ["unused"])
    model = ScriptedModel(script)
    agent = await new_agent(store, model.model)
    before = rows(store_dsn)
    text = {"bad_input": "   ", "huge": "x" * (MAX_INPUT_BYTES + 1)}.get(failure, "hello")
    expected = immagent.ValidationError if failure in ("bad_input", "huge") else immagent.LLMError
    with pytest.raises(expected) as err:
        await agent.advance(text, timeout=0.3, max_retries=2, retry_delay=0.001)
    assert rows(store_dsn) == before
    assert await agent.get_messages() == ()
    if failure == "auth":
        assert len(model.requests) == 1  # never retried
        assert err.value.__cause__ is not None
    if failure == "exhausted":
        assert len(model.requests) == 3  # the first try and two retries
    if failure == "bad_input":
        assert isinstance(err.value, immagent.ValidationError) and err.value.field == "user_input"


async def test_max_tool_rounds_ends_the_turn_cleanly(store: Store, calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=1)] * 3)
    new = await (await new_agent(store, model.model)).advance(
        "loop", mcp=calc, max_tool_rounds=2)
    messages = await new.get_messages()
    assert len(model.requests) == 3
    assert messages[-1].role == "tool" and messages[-1].is_error
    assert "limit" in (messages[-1].content or "")


async def test_fifty_concurrent_advances_all_saved_with_their_parents(
        store: Store, store_dsn: str) -> None:
    root = await store.create_agent("bot", "You echo.", immagent.Model.ECHO)
    first = await asyncio.gather(*(root.advance(f"branch {i}") for i in range(25)))
    second = await asyncio.gather(*(a.advance(f"again {i}") for i, a in enumerate(first)))
    assert all(a.parent_id == root.id for a in first)
    assert all(b.parent_id == a.id for a, b in zip(first, second, strict=True))
    assert count_rows(store_dsn, "immagent_states") == 51
    store.clear_cache()
    for i, b in enumerate(await store.load_agents([b.id for b in second])):
        texts = [m.content for m in await b.get_messages()]
        assert texts == [f"branch {i}", f"Echo: branch {i}", f"again {i}", f"Echo: again {i}"]


async def test_replies_with_lone_surrogates_are_stored_readably(store: Store) -> None:
    model = ScriptedModel(["bad \ud800 text"])
    new = await (await new_agent(store, model.model)).advance("hi")
    store.clear_cache()
    reply = (await (await store.load_agent(new.id)).get_messages())[-1]
    assert reply.content == "bad \ufffd text"
