"""Real LangGraph graphs checkpointed by ImmAgentSaver, on PostgreSQL and SQLite: a long
chat interrupted in one process and resumed in another, forks, gc, concurrency."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, StateSnapshot, interrupt

from immagent import Store
from immagent.assets import Kind
from immagent.integrations.langgraph import ImmAgentSaver, SyncCallError
from tests.conftest import count_rows, distinct_elements, example

ROOT = Path(__file__).resolve().parents[1]


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _reply(state: ChatState) -> dict[str, list[Any]]:
    """Echo the last message; "[pause]" asks a human first (an interrupt); "[trim]" drops
    the two oldest messages; "[fix]" rewrites the previous reply in place (same id)."""
    last = state["messages"][-1]
    text = str(last.content)
    if "[pause]" in text:
        text = f"{text} ({interrupt({'question': text})})"
    out: list[Any] = [AIMessage(content=f"Echo: {text}")]
    if "[trim]" in text:
        out = [RemoveMessage(id=str(m.id)) for m in state["messages"][:2]] + out
    if "[fix]" in text:
        previous = state["messages"][-2]
        out = [AIMessage(content=f"{previous.content} (fixed)", id=previous.id), *out]
    return {"messages": out}


def build(saver: ImmAgentSaver) -> Any:
    builder = StateGraph(ChatState)
    builder.add_node("reply", _reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


def config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


def text(thread: str, turn: int) -> str:
    return f"[{thread}] message {turn}: " + "lorem ipsum " * 5


async def chat(graph: Any, thread: str, turns: range) -> None:
    for turn in turns:
        await graph.ainvoke({"messages": [HumanMessage(content=text(thread, turn))]},
                            config(thread))


async def messages(graph: Any, thread: str) -> list[str]:
    state = await graph.aget_state(config(thread))
    return [str(m.content) for m in state.values.get("messages", [])]


def expected(thread: str, turns: range) -> list[str]:
    return [t for turn in turns for u in [text(thread, turn)] for t in (u, f"Echo: {u}")]


def _values(dsn: str, kind: Kind) -> int:
    """Distinct values stored (held by their chain's links, or assets of their own), or
    links."""
    if kind == Kind.VALUE_NODE:
        return count_rows(dsn, "immagent_nodes", f"kind = {int(kind)}")
    return distinct_elements(dsn, kind)


# -- interrupted in one process, resumed in another -----------------------------------------


def first_process(dsn: str, thread: str, turns: int) -> None:
    """The child: ``turns`` turns, then one that stops at an interrupt; then it dies without
    closing anything, as a worker waiting for a human might."""

    async def run() -> None:
        async with ImmAgentSaver.from_conn_string(dsn) as saver:
            await saver.setup()
            graph = build(saver)
            await chat(graph, thread, range(turns))
            out = await graph.ainvoke(
                {"messages": [HumanMessage(content=text(thread, turns) + " [pause]")]},
                config(thread))
            assert "__interrupt__" in out
            print("interrupted", flush=True)
            os._exit(0)

    asyncio.run(run())


async def test_a_100_turn_chat_interrupted_and_resumed_in_a_new_process(
        store_dsn: str) -> None:
    thread, before = "chat", 50
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "from tests.test_langgraph_graph import first_process; "
         f"first_process({store_dsn!r}, {thread!r}, {before})"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 0 and "interrupted" in child.stdout, child.stderr
    async with ImmAgentSaver.from_conn_string(store_dsn) as saver:
        graph = build(saver)
        state = await graph.aget_state(config(thread))
        assert state.next == ("reply",)
        assert [i.value for t in state.tasks for i in t.interrupts] == [
            {"question": text(thread, before) + " [pause]"}]
        assert len(state.values["messages"]) == 2 * before + 1
        await graph.ainvoke(Command(resume="approved"), config(thread))
        await chat(graph, thread, range(before + 1, 100))
        got = await messages(graph, thread)
        paused = text(thread, before) + " [pause]"
        assert got == [*expected(thread, range(before)), paused, f"Echo: {paused} (approved)",
                       *expected(thread, range(before + 1, 100))]
        # Every message is one asset, wherever it appears (channel, input, writes); besides
        # them: the shared None, the interrupt and the resume value.
        assert _values(store_dsn, Kind.VALUE) == 200 + 3
        newest = [s async for s in graph.aget_state_history(config(thread), limit=4)]
        assert [len(s.values["messages"]) for s in newest] == [200, 199, 198, 198]
        assert await saver.store.count_states(Kind.CHECKPOINT) >= 300
        assert (await saver.store.verify()).ok


# -- forks share everything ---------------------------------------------------------------


async def test_forks_share_rows(store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    graph = build(saver)
    await chat(graph, "base", range(20))
    values, nodes = _values(store_dsn, Kind.VALUE), _values(store_dsn, Kind.VALUE_NODE)
    assert values == 40 + 1
    history = [s async for s in graph.aget_state_history(config("base"))]
    at_ten = next(s for s in history if len(s.values["messages"]) == 20 and not s.next)

    # Time travel: a new branch from turn 10 of the same thread adds its own turn only.
    await graph.ainvoke({"messages": [HumanMessage(content="a branch")]}, at_ten.config)
    assert _values(store_dsn, Kind.VALUE) == values + 2
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 2
    branch = await messages(graph, "base")
    assert branch == [*expected("base", range(10)), "a branch", "Echo: a branch"]

    # copy_thread: rows only, no asset.
    states = await store.count_states(Kind.CHECKPOINT)
    assets = count_rows(store_dsn, "immagent_assets")
    await saver.acopy_thread("base", "copy")
    assert count_rows(store_dsn, "immagent_assets") == assets
    assert await store.count_states(Kind.CHECKPOINT) == 2 * states
    assert await messages(graph, "copy") == branch

    # LangGraph's usual fork (the state copied into a new thread) finds the chain it has.
    snapshot = await graph.aget_state(config("copy"))
    await graph.aupdate_state(config("fork"), snapshot.values, as_node="reply")
    assert count_rows(store_dsn, "immagent_assets") == assets
    await chat(graph, "fork", range(2))
    assert _values(store_dsn, Kind.VALUE) == values + 2 + 4
    assert await messages(graph, "fork") == [*branch, *expected("fork", range(2))]
    assert (await store.verify()).ok


async def test_add_messages_removing_and_replacing_through_a_graph(store: Store,
                                                                   store_dsn: str) -> None:
    graph = build(ImmAgentSaver(store))
    await chat(graph, "t", range(3))
    await graph.ainvoke({"messages": [HumanMessage(content="now [fix]")]}, config("t"))
    fixed = await messages(graph, "t")
    assert fixed[5] == f"Echo: {text('t', 2)} (fixed)" and fixed[-1] == "Echo: now [fix]"
    values = _values(store_dsn, Kind.VALUE)
    await graph.ainvoke({"messages": [HumanMessage(content="now [trim]")]}, config("t"))
    trimmed = await messages(graph, "t")
    assert trimmed == [*fixed[2:], "now [trim]", "Echo: now [trim]"]
    # New: the two messages and the two RemoveMessage markers the node wrote; the kept
    # messages are the assets they were.
    assert _values(store_dsn, Kind.VALUE) == values + 4
    cold = build(ImmAgentSaver(store))  # a fresh saver reads what the first one wrote
    assert await messages(cold, "t") == trimmed
    assert (await store.verify()).ok


# -- deletion and gc --------------------------------------------------------------------------


async def test_gc_after_delete_thread_keeps_other_threads(store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    graph = build(saver)
    await chat(graph, "a", range(5))
    await saver.acopy_thread("a", "b")
    await chat(graph, "b", range(5, 8))
    await saver.adelete_thread("a")
    result = await store.gc()
    assert result.assets_removed == 0  # b holds all of a's history
    assert await messages(graph, "a") == []
    assert await messages(graph, "b") == [*expected("a", range(5)), *expected("b", range(5, 8))]
    await chat(graph, "b", range(8, 9))
    assert (await store.verify()).ok
    await saver.aprune(["b"])  # keep_latest, then gc: the history before it is still reachable
    await store.gc()
    assert len(await messages(graph, "b")) == 18
    await saver.adelete_thread("b")
    await store.gc()
    assert count_rows(store_dsn, "immagent_assets") == 0
    assert count_rows(store_dsn, "immagent_states") == 0


async def test_concurrent_graphs_and_gc_on_one_store(store: Store) -> None:
    saver = ImmAgentSaver(store)
    graph = build(saver)
    threads = [f"t{i}" for i in range(6)]
    running = True

    async def collector() -> int:
        runs = 0
        while running:
            await store.gc()
            runs += 1
            await asyncio.sleep(0)
        return runs

    gc_task = asyncio.create_task(collector())
    # Turn 0's text is the same in every thread: one shared asset, deduplicated by writers
    # racing each other and gc.
    await asyncio.gather(*(graph.ainvoke({"messages": [HumanMessage(content="hello")]},
                                         config(t)) for t in threads))
    await asyncio.gather(*(chat(graph, t, range(1, 6)) for t in threads))
    running = False
    assert await gc_task > 0
    for t in threads:
        assert await messages(graph, t) == ["hello", "Echo: hello", *expected(t, range(1, 6))]
    assert (await store.verify()).ok


# -- the sync interface -----------------------------------------------------------------------


async def test_a_sync_graph_runs_from_a_worker_thread(store: Store) -> None:
    graph = build(ImmAgentSaver(store))
    for turn in range(3):
        await asyncio.to_thread(graph.invoke, {"messages": [HumanMessage(content=f"s{turn}")]},
                                config("sync"))
    assert await messages(graph, "sync") == [x for i in range(3) for x in (f"s{i}", f"Echo: s{i}")]
    with pytest.raises(SyncCallError):
        graph.invoke({"messages": [HumanMessage(content="on the loop")]}, config("sync"))


async def test_the_example_runs_offline(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with example("langgraph_chat") as module:
        forked = await module.main(f"sqlite:///{tmp_path / 'chat.db'}")
    assert forked == ["Hello!", "Echo: Hello!", "Another path?", "Echo: Another path?"]
    out = capsys.readouterr().out
    assert "verified" in out and "store verify: OK" in out


def _inner(state: ChatState) -> dict[str, list[Any]]:
    return {"messages": [AIMessage(content=f"inner {interrupt('go on?')}")]}


async def test_a_subgraph_checkpoints_in_its_own_namespace(store: Store) -> None:
    sub = StateGraph(ChatState)
    sub.add_node("inner", _inner)
    sub.add_edge(START, "inner")
    sub.add_edge("inner", END)
    outer = StateGraph(ChatState)
    outer.add_node("sub", sub.compile())
    outer.add_node("reply", _reply)
    outer.add_edge(START, "sub")
    outer.add_edge("sub", "reply")
    outer.add_edge("reply", END)
    saver = ImmAgentSaver(store)
    graph = outer.compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage(content="hi")]}, config("t"))
    state = await graph.aget_state(config("t"), subgraphs=True)
    (task,) = state.tasks
    inner = task.state
    assert isinstance(inner, StateSnapshot)
    inner_ns = inner.config["configurable"]["checkpoint_ns"]
    assert inner_ns.startswith("sub:") and inner.next == ("inner",)
    await graph.ainvoke(Command(resume="yes"), config("t"))
    assert await messages(graph, "t") == ["hi", "inner yes", "Echo: inner yes"]
    listed = [t.config["configurable"]["checkpoint_ns"]
              async for t in saver.alist({"configurable": {"thread_id": "t"}})]
    assert set(listed) == {"", inner_ns}
    await saver.acopy_thread("t", "u")
    await saver.aprune(["t"])
    assert await messages(graph, "t") == await messages(graph, "u")
    assert (await store.verify()).ok
