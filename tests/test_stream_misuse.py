"""Streamed turns used in ways they should survive (issue 20, items 8 and 9): a cancellation
that lands after the turn's write committed, two consumers of one stream, a stream left
without ``async with`` right after a tool result, and a credential passed as a turn
option. Each tells the caller the truth with a clear ImmAgentError, or works."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any, cast

import pytest

from immagent import (
    ImmAgentError,
    SimpleAgent,
    Store,
    StreamBusyError,
    TurnIncompleteError,
    ValidationError,
)
from immagent.store.backend import Backend
from immagent.stream import ToolResult, TurnDone
from immagent.testing import Reply, ScriptedModel
from tests.conftest import count_rows
from tests.test_stream import SlowTools, new_agent, rows


class GatedBackend:
    """A pass-through around a real backend whose writes, once committed, wait for
    ``release`` before returning: the moment a caller can be cancelled after its write
    is in the store (the reply still on its way back)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.committed = asyncio.Event()
        self.release = asyncio.Event()
        self.gated = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.inner.write(*args, **kwargs)
        if self.gated:
            self.committed.set()
            await self.release.wait()
        return result


async def _gated_store(dsn: str) -> tuple[Store, GatedBackend]:
    if dsn.startswith("sqlite:///"):
        from immagent.store.sqlite import SQLiteBackend

        inner: Backend = await SQLiteBackend.open(dsn.removeprefix("sqlite:///"))
    else:
        from immagent.store.postgres import PostgresBackend

        inner = await PostgresBackend.open(dsn, min_size=1, max_size=2)
    gated = GatedBackend(inner)
    store = Store(cast(Backend, gated))
    await store.init_schema()
    return store, gated


async def test_a_stream_cancelled_after_its_write_committed_tells_the_truth(
        store_dsn: str) -> None:
    store, gated = await _gated_store(store_dsn)
    try:
        model = ScriptedModel(["Saved, then cancelled."])  # held: models are held weakly
        agent = await new_agent(store, model.model)
        stream = agent.stream("go")

        async def consume() -> None:
            async with stream:
                async for _ in stream:
                    pass

        gated.gated = True
        task = asyncio.create_task(consume())
        committed = asyncio.ensure_future(gated.committed.wait())
        await asyncio.wait([committed, task], return_when=asyncio.FIRST_COMPLETED)
        assert committed.done(), task  # the new state is in the store (else: why not)
        task.cancel()
        await asyncio.sleep(0)
        gated.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        saved = stream.agent  # before: TurnIncompleteError "not saved", which was false
        assert saved.parent_id == agent.id
        store.clear_cache()
        reloaded = await store.load_agent(saved.id)
        assert [m.content for m in await reloaded.get_messages()] == [
            "go", "Saved, then cancelled."]
        assert count_rows(store_dsn, "immagent_states") == 2
    finally:
        await store.close()


async def test_a_stream_cancelled_before_its_write_says_it_was_not_saved(
        store: Store, store_dsn: str) -> None:
    model = ScriptedModel([Reply(chunks=["slow ", "reply"], chunk_delay=0.2)])
    agent = await new_agent(store, model.model)
    stream = agent.stream("go")

    async def consume() -> None:
        async with stream:
            async for _ in stream:
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(TurnIncompleteError, match="not been saved"):
        _ = stream.agent
    assert count_rows(store_dsn, "immagent_states") == 1


async def test_two_consumers_of_one_stream_get_a_clear_error(store: Store,
                                                             store_dsn: str) -> None:
    model = ScriptedModel([Reply(chunks=["one ", "two ", "three"], chunk_delay=0.02)] * 2)
    agent = await new_agent(store, model.model)
    stream = agent.stream("count")

    async def consume() -> list[object]:
        return [event async for event in stream]

    first, second = await asyncio.gather(consume(), consume(), return_exceptions=True)
    refused = second if isinstance(second, BaseException) else first
    events = first if refused is second else second
    assert isinstance(refused, StreamBusyError), refused
    assert isinstance(refused, ImmAgentError) and isinstance(refused, RuntimeError)
    assert "one consumer" in str(refused)
    assert isinstance(events, list) and isinstance(events[-1], TurnDone)
    assert stream.agent.parent_id == agent.id
    # Closing it while another task waits for its next event is refused the same way.
    late = agent.stream("count again")
    reader = asyncio.ensure_future(anext(late))
    await asyncio.sleep(0.005)
    with pytest.raises(StreamBusyError, match="closing"):
        await late.aclose()
    await reader
    await late.aclose()
    assert count_rows(store_dsn, "immagent_states") == 2


async def test_leaving_a_stream_after_a_tool_result_without_closing_it_is_quiet(
        store: Store, store_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    model = ScriptedModel([Reply.calls(("fast", {}), ("slow", {})), "never reached"])
    agent = await new_agent(store, model.model)
    tools = SlowTools()
    before = rows(store_dsn)

    async def leave_early() -> None:
        stream = agent.stream("run both", mcp=tools)
        async for event in stream:
            if isinstance(event, ToolResult):  # fast is done, slow still running
                break
        # No async with, no aclose(): the stream is simply dropped here.

    await leave_early()
    gc.collect()
    for _ in range(20):  # let asyncio close what was dropped
        await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0.05)
    problems = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert problems == [], problems  # before: "Task exception was never retrieved", twice
    assert tools.cancelled == 1  # the slow tool did not keep running
    assert rows(store_dsn) == before


async def test_a_credential_as_a_turn_option_is_a_validation_error(store: Store) -> None:
    agent = await new_agent(store, ScriptedModel(["hi"]).model)
    for call in (lambda: agent.advance("hi", api_key="sk-secret"),  # type: ignore[call-arg]
                 lambda: SimpleAgent(name="s", system_prompt="p",
                                     model=ScriptedModel(["hi"]).model).advance(
                     "hi", api_key="sk-secret")):  # type: ignore[call-arg]
        with pytest.raises(ValidationError) as caught:
            await call()
        assert caught.value.field == "api_key" and "environment" in str(caught.value)
        assert "sk-secret" not in str(caught.value)
    with pytest.raises(ValidationError, match="temprature: is not a turn option"):
        agent.stream("hi", temprature=0.2)  # type: ignore[call-arg]
    assert await agent.get_messages() == ()
