"""ImmAgentSaver for sync LangGraph code, opened the ways LangGraph's savers are: ``with
from_conn_string(...)`` beside ``SqliteSaver`` (file paths with any suffix, ``":memory:"``),
on PostgreSQL, over an existing Store or a psycopg pool or connection you own; the host
between threads and loops (no deadlock on the store's loop, no leaked thread or loop);
the install hint when LangGraph is missing."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, TypedDict

import psycopg
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import immagent
from immagent import Store, ValidationError
from immagent.integrations.langgraph import ImmAgentSaver, SyncCallError

ROOT = Path(__file__).resolve().parents[1]


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _reply(state: ChatState) -> dict[str, list[Any]]:
    text = str(state["messages"][-1].content)
    if "[ask]" in text:
        text = f"{text} ({interrupt('ok?')})"
    return {"messages": [AIMessage(content=f"Echo: {text}")]}


def build(saver: Any) -> Any:
    builder = StateGraph(ChatState)
    builder.add_node("reply", _reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


def config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


def run_app(saver: Any) -> list[Any]:
    """What a sync application does: turns, an interrupt resumed, history, time travel.
    Returns what it observed, to compare savers."""
    graph = build(saver)
    seen: list[Any] = []
    for turn in range(3):
        graph.invoke({"messages": [HumanMessage(content=f"turn {turn}")]}, config("a"))
    graph.invoke({"messages": [HumanMessage(content="[ask] sure")]}, config("a"))
    seen.append(graph.get_state(config("a")).next)
    graph.invoke(Command(resume="yes"), config("a"))
    seen.append([m.content for m in graph.get_state(config("a")).values["messages"]])
    history = list(graph.get_state_history(config("a")))
    seen.append([h.metadata["step"] for h in history if h.metadata is not None])
    past = next(h for h in history if h.metadata is not None and h.metadata["step"] == 2)
    graph.invoke({"messages": [HumanMessage(content="forked")]}, past.config)
    seen.append([m.content for m in graph.get_state(config("a")).values["messages"]])
    seen.append(len(list(graph.get_state_history(config("a")))))
    return seen


def test_a_sync_app_sees_what_it_sees_with_sqlitesaver(tmp_path: Path) -> None:
    with SqliteSaver.from_conn_string(str(tmp_path / "theirs.sqlite")) as theirs:
        theirs.setup()
        reference = run_app(theirs)
    with ImmAgentSaver.from_conn_string(str(tmp_path / "ours.sqlite")) as ours:
        ours.setup()
        assert run_app(ours) == reference
    assert ours.store.closed
    with ImmAgentSaver.from_conn_string(str(tmp_path / "ours.sqlite")) as reopened:
        state = build(reopened).get_state(config("a"))
        assert [m.content for m in state.values["messages"]] == reference[3]


def test_sync_graphs_on_postgresql(pg_store_dsn: str) -> None:
    with SqliteSaver.from_conn_string(":memory:") as theirs:
        reference = run_app(theirs)
    with ImmAgentSaver.from_conn_string(pg_store_dsn) as saver:
        saver.setup()
        assert run_app(saver) == reference
    with ImmAgentSaver.from_conn_string(pg_store_dsn) as reopened:
        state = build(reopened).get_state(config("a"))
        assert [m.content for m in state.values["messages"]] == reference[3]


def test_paths_and_memory_behave_as_langgraph_savers(tmp_path: Path) -> None:
    # A path without a suffix is a SQLite file of exactly that name, as SqliteSaver makes
    # it; ":memory:" is a fresh, empty store each time it is opened.
    for name in ("checkpoints", "state.sqlite3", "data.bin"):
        path = tmp_path / name
        with ImmAgentSaver.from_conn_string(str(path)) as saver:
            saver.setup()
            build(saver).invoke({"messages": [HumanMessage(content="hi")]}, config("t"))
        assert path.is_file() and path.read_bytes()[:16] == b"SQLite format 3\x00"
        with ImmAgentSaver.from_conn_string(path) as again:  # a PathLike too
            assert again.get_tuple(config("t")) is not None
    for _ in range(2):
        with ImmAgentSaver.from_conn_string(":memory:") as memory:
            memory.setup()
            graph = build(memory)
            assert graph.get_state(config("t")).values == {}
            graph.invoke({"messages": [HumanMessage(content="hi")]}, config("t"))
            assert len(graph.get_state(config("t")).values["messages"]) == 2


def test_async_calls_from_any_loop_reach_a_sync_opened_saver(tmp_path: Path) -> None:
    with ImmAgentSaver.from_conn_string(str(tmp_path / "c.db")) as saver:
        saver.setup()
        graph = build(saver)
        graph.invoke({"messages": [HumanMessage(content="sync")]}, config("t"))

        async def elsewhere() -> list[str]:
            await saver.setup()  # awaitable from async code, too
            await graph.ainvoke({"messages": [HumanMessage(content="async")]}, config("t"))
            listed = [t async for t in saver.alist(config("t"), limit=2)]
            assert len(listed) == 2
            state = await graph.aget_state(config("t"))
            return [str(m.content) for m in state.values["messages"]]

        assert asyncio.run(elsewhere()) == ["sync", "Echo: sync", "async", "Echo: async"]
        assert asyncio.run(elsewhere())[-2:] == ["async", "Echo: async"]


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def _settles_to(before: set[str]) -> bool:
    """The threads are ``before`` again within a few seconds (a closed SQLite backend's
    worker threads end just after its close returns)."""
    for _ in range(250):
        if _threads() <= before:
            return True
        threading.Event().wait(0.02)
    return False


def test_closing_leaves_no_thread_and_no_loop_behind(tmp_path: Path) -> None:
    before = _threads()
    for _ in range(3):
        with ImmAgentSaver.from_conn_string(str(tmp_path / "c.db")) as saver:
            saver.setup()
            loop = saver.loop
            assert loop is not None and "immagent-store" in _threads()
            saver.close()  # closing twice (here and at the end of the with) is fine
        assert loop.is_closed() and saver.store.closed
    assert _settles_to(before), _threads() - before
    # A saver dropped without close() does not keep its thread.
    dropped = ImmAgentSaver.from_conn_string(str(tmp_path / "c.db")).__enter__()
    dropped.setup()
    del dropped
    gc.collect()
    assert _settles_to(before), _threads() - before


def test_a_failed_open_leaves_no_thread(tmp_path: Path) -> None:
    before = _threads()
    with pytest.raises(immagent.ImmAgentError), \
            ImmAgentSaver.from_conn_string(str(tmp_path)):  # a directory
        pass
    with pytest.raises(ValidationError), ImmAgentSaver.from_conn_string("mysql://x"):
        pass
    assert _settles_to(before), _threads() - before


async def test_a_shared_store_serves_sync_calls_from_other_threads(store: Store) -> None:
    saver = ImmAgentSaver(store)  # shared: on this test's loop, never closed by the saver
    await saver.setup()
    graph = build(saver)
    await graph.ainvoke({"messages": [HumanMessage(content="async")]}, config("t"))
    await asyncio.to_thread(graph.invoke, {"messages": [HumanMessage(content="from a thread")]},
                            config("t"))
    state = await graph.aget_state(config("t"))
    assert [m.content for m in state.values["messages"]][-2:] == ["from a thread",
                                                                 "Echo: from a thread"]
    # On the store's own loop a sync call would wait for itself: it says so at once.
    with pytest.raises(SyncCallError, match="wait for itself") as err:
        graph.invoke({"messages": [HumanMessage(content="x")]}, config("t"))
    assert isinstance(err.value, asyncio.InvalidStateError)
    saver.close()
    assert not store.closed


def test_a_saver_made_outside_a_loop_says_so() -> None:
    store = asyncio.run(Store.connect("memory://"))
    saver = ImmAgentSaver(store)
    with pytest.raises(SyncCallError, match="none is running"):
        saver.get_tuple(config("t"))


@pytest.mark.parametrize("lent", ["pool", "connection", "connection in transactions"])
async def test_a_psycopg_pool_or_connection_you_own(pg_store_dsn: str, lent: str) -> None:
    # Configured the way LangGraph's docs configure one for AsyncPostgresSaver (or left
    # in psycopg's default: every statement in a transaction the caller must end).
    kwargs: dict[str, Any] = {"autocommit": lent != "connection in transactions",
                              "row_factory": dict_row}
    if lent == "pool":
        owned: Any = AsyncConnectionPool(pg_store_dsn, kwargs=kwargs, open=False,
                                         max_size=4)
        await owned.open()
    else:
        owned = await psycopg.AsyncConnection.connect(pg_store_dsn, **kwargs)
    try:
        saver = ImmAgentSaver(owned)
        await saver.setup()
        graph = build(saver)
        for turn in range(3):
            await graph.ainvoke({"messages": [HumanMessage(content=f"t{turn}")]},
                                config("own"))
        await asyncio.to_thread(graph.invoke, {"messages": [HumanMessage(content="sync")]},
                                config("own"))
        state = await graph.aget_state(config("own"))
        assert len(state.values["messages"]) == 8
        assert (await saver.store.verify()).ok
        await saver.aclose()
        # Still ours, still open, rows as we configured them.
        if lent == "pool":
            async with owned.connection() as conn:
                row = await (await conn.execute("SELECT count(*) AS n FROM immagent_states")
                             ).fetchone()
        else:
            assert owned.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            row = await (await owned.execute("SELECT count(*) AS n FROM immagent_states")
                         ).fetchone()
        assert row is not None and row["n"] > 0
    finally:
        await owned.close()


def test_a_sync_psycopg_pool_is_refused_with_the_reason(pg_store_dsn: str) -> None:
    with ConnectionPool(pg_store_dsn, open=True, min_size=1, max_size=1) as pool:
        with pytest.raises(ValidationError, match="AsyncConnectionPool") as err:
            ImmAgentSaver(pool)
        assert err.value.field == "conn"
    with pytest.raises(ValidationError) as bad:
        ImmAgentSaver("postgresql://not-a-store")
    assert bad.value.field == "conn"


def test_a_missing_extra_names_the_install_command() -> None:
    code = ("import sys; sys.modules['langgraph'] = None; sys.modules['langchain_core'] = None\n"
            "from immagent.exceptions import ImmAgentError\n"
            "try:\n"
            "    import immagent.integrations.langgraph\n"
            "except ImmAgentError as e:\n"
            "    print(type(e).__name__, isinstance(e, ImportError), e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.startswith("ExtraNotInstalledError True ")
    assert "pip install 'immagent-core[langgraph]'" in out.stdout
