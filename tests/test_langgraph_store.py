"""ImmAgentStore with the real LangGraph, on PostgreSQL and SQLite: the BaseStore API
(sync and async), batches, TTL, the sync bridge, opening from a connection string, a graph
that keeps its checkpoints and its memory in one immagent database, and the layering (no
LangGraph needed to audit what it wrote; a missing extra says how to install it)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime
from langgraph.store.base import (
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    PutOp,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore

import immagent
from immagent import Store, ValidationError
from immagent.assets import Kind
from immagent.integrations.langgraph import ImmAgentSaver
from immagent.integrations.langgraph_store import ImmAgentStore, SyncCallError
from tests.conftest import count_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "langgraph_memory.py"


def item_states(dsn: str) -> int:
    return count_rows(dsn, "immagent_states", f"kind = {int(Kind.STORE_ITEM)}")


# -- the BaseStore API --------------------------------------------------------------------


async def test_the_async_api_round_trip(store: Store, store_dsn: str) -> None:
    memory = ImmAgentStore(store)
    await memory.aput(("users", "1"), "prefs", {"theme": "dark", "n": 1})
    await memory.aput(("users", "1"), "prefs", {"theme": "light", "n": 2})
    await memory.aput(("users", "2"), "prefs", {"theme": "dark", "n": 1})
    item = await memory.aget(("users", "1"), "prefs")
    assert isinstance(item, Item)
    assert (item.namespace, item.key, item.value) == (("users", "1"), "prefs",
                                                      {"theme": "light", "n": 2})
    assert item.created_at < item.updated_at
    found = await memory.asearch(("users",), filter={"theme": "dark"})
    assert [(i.namespace, i.score) for i in found] == [(("users", "2"), None)]
    assert await memory.alist_namespaces(prefix=("users",)) == [("users", "1"),
                                                                 ("users", "2")]
    await memory.adelete(("users", "1"), "prefs")
    assert await memory.aget(("users", "1"), "prefs") is None
    assert item_states(store_dsn) == 4  # three puts and a delete, every one kept
    history = await memory.ahistory(("users", "1"), "prefs")
    assert [v.change for v in history] == ["delete", "put", "put"]
    assert (await store.verify()).ok


async def test_a_batch_reads_before_it_writes_as_langgraph_stores_do(store: Store) -> None:
    memory = ImmAgentStore(store)
    reference = InMemoryStore()
    ops: list[Any] = [
        PutOp(("t", "a"), "k1", {"v": 1}), PutOp(("t", "b"), "k2", {"v": 2}),
    ]
    second: list[Any] = [
        GetOp(("t", "a"), "k1"), PutOp(("t", "a"), "k1", {"v": 10}),
        SearchOp(("t",), filter={"v": 2}), ListNamespacesOp(
            match_conditions=(MatchCondition("prefix", ("t",)),), max_depth=None),
        PutOp(("t", "a"), "k1", {"v": 11}), GetOp(("t", "c"), "missing"),
        PutOp(("t", "b"), "k2", None),
    ]
    for each in (reference, memory):
        await each.abatch(ops)
    theirs, ours = await reference.abatch(second), await memory.abatch(second)

    def shape(results: list[Any]) -> list[Any]:
        return [r.value if isinstance(r, Item) else
                [(i.key, i.value) for i in r] if isinstance(r, list) and r
                and isinstance(r[0], Item) else r for r in results]

    assert shape(ours) == shape(theirs)
    assert shape(ours)[0] == {"v": 1} and shape(ours)[2] == [("k2", {"v": 2})]
    after = [GetOp(("t", "a"), "k1"), GetOp(("t", "b"), "k2")]
    assert shape(await memory.abatch(after)) == shape(await reference.abatch(after)) == [
        {"v": 11}, None]


async def test_gathered_calls_are_merged_and_every_put_lands(store: Store,
                                                             store_dsn: str) -> None:
    # LangGraph's test_large_batches_async at a small scale: concurrent single calls used
    # to be one transaction per put and one scan of the heads per search (60,000 calls
    # did not finish in 13 minutes on PostgreSQL). They are merged now: a few
    # transactions, and still every put a state of its own.
    memory = ImmAgentStore(store)
    await memory.aput(("race", "0"), "seed", {"writer": -1})
    keys, writers = 10, 12
    calls: list[Any] = []
    for w in range(writers):
        for k in range(keys):
            calls += [memory.aput(("race", str(k % 2)), f"k{k}", {"writer": w}),
                      memory.aget(("race", str(k % 2)), f"k{k}"),
                      memory.asearch(("race",)), memory.alist_namespaces(max_depth=2)]
    results = await asyncio.gather(*calls)
    assert len(results) == len(calls)
    stats = memory.write_stats()
    assert stats["commits"] <= 1 + 4, stats  # one per merged group, not one per put
    assert stats["retries"] == 0
    assert item_states(store_dsn) == 1 + keys * writers
    for k in range(keys):
        history = await memory.ahistory(("race", str(k % 2)), f"k{k}")
        assert sorted(v.value["writer"] for v in history if v.value) == list(range(writers))
        assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    # Identical reads ran once, but each caller holds its own copy of what they found.
    searches = [r for r in results[2::4] if r]
    assert len(searches) == keys * writers
    searches[0][0].value["writer"] = "edited"
    assert all(s[0].value["writer"] != "edited" for s in searches[1:])
    assert (await store.verify()).ok


async def test_a_bad_call_among_gathered_ones_fails_alone(store: Store,
                                                          store_dsn: str) -> None:
    memory = ImmAgentStore(store)
    await memory.aput(("warm",), "up", {"v": 0})
    outcomes = await asyncio.gather(
        *(memory.aput(("ok",), f"k{i}", {"v": i}) for i in range(5)),
        memory.aput(("ok",), "bad", {"v": float("nan")}),
        *(memory.aput(("ok",), f"k{i}", {"v": i + 10}) for i in range(5)),
        return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 5 + [
        "ValidationError"] + ["NoneType"] * 5
    assert item_states(store_dsn) == 11
    assert await memory.aget(("ok",), "bad") is None


async def test_namespaces_and_values_are_checked_before_anything_is_written(
        store: Store, store_dsn: str) -> None:
    memory = ImmAgentStore(store)
    with pytest.raises(InvalidNamespaceError):
        await memory.aput(("a.b",), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        await memory.abatch([PutOp(("ok",), "k", {"v": 1}), PutOp(("x.y",), "k", {})])
    with pytest.raises(ValidationError) as caught:
        await memory.abatch([PutOp(("ok",), "k", {"v": 1}),
                             PutOp(("bad",), "k", {"v": float("inf")})])
    assert caught.value.field == "puts[1].value.v"
    with pytest.raises(ValidationError) as caught:
        await memory.aput(("a\x1fb",), "k", {})
    assert caught.value.field == "puts[0].namespace[0]"
    assert item_states(store_dsn) == 0


async def test_vector_search_is_refused_and_a_query_without_an_index_is_ignored(
        store: Store) -> None:
    with pytest.raises(ValidationError) as caught:
        ImmAgentStore(store, index={"dims": 3, "embed": lambda texts: [[0.0] * 3]})
    assert caught.value.field == "index"
    memory = ImmAgentStore(store)
    await memory.aput(("d",), "k", {"text": "hello"})
    assert [i.key for i in await memory.asearch(("d",), query="anything")] == ["k"]


async def test_ttl_refresh_on_read_and_the_sweep(store: Store, store_dsn: str) -> None:
    # refresh_slack=0: every read with refresh_ttl renews the expiry (a new state).
    memory = ImmAgentStore(store, ttl={"default_ttl": 10}, refresh_slack=0)
    await memory.aput(("ttl",), "default", {"v": 1})
    await memory.aput(("ttl",), "none", {"v": 2}, ttl=None)
    await memory.aget(("ttl",), "default")  # refresh_on_read defaults to True
    await memory.aget(("ttl",), "default", refresh_ttl=False)
    await memory.aget(("ttl",), "none")  # no TTL: nothing to refresh
    await memory.asearch(("ttl",))
    history = await memory.ahistory(("ttl",), "default")
    assert [(v.change, v.ttl) for v in history] == [("refresh", 10), ("refresh", 10),
                                                    ("put", 10)]
    assert history[0].expires_at is not None and history[-1].expires_at is not None
    assert history[0].expires_at > history[-1].expires_at
    assert len(await memory.ahistory(("ttl",), "none")) == 1
    quiet = ImmAgentStore(store, ttl={"default_ttl": 10, "refresh_on_read": False})
    await quiet.aget(("ttl",), "default")
    assert len(await memory.ahistory(("ttl",), "default")) == 3
    assert await memory.asweep_ttl() == 0
    assert item_states(store_dsn) == 4


async def test_the_async_sweeper_task_deletes_what_expired(store: Store) -> None:
    memory = ImmAgentStore(store)
    await memory.aput(("sw",), "gone", {"v": 1}, ttl=0.5 / 60)  # half a second
    await memory.aput(("sw",), "kept", {"v": 2})
    task = await memory.astart_ttl_sweeper(sweep_interval_minutes=0.2 / 60)
    assert await memory.astart_ttl_sweeper() is task  # one sweeper
    for _ in range(600):  # a minute at most: the sweep runs every 0.2 s
        if not await memory.ahistory(("sw",), "gone"):
            break
        await asyncio.sleep(0.1)
    assert await memory.ahistory(("sw",), "gone") == []  # the whole history went
    assert await memory.astop_ttl_sweeper() is True and task.done()
    assert [i.key for i in await memory.asearch(("sw",))] == ["kept"]


# -- sync and async, threads and loops ----------------------------------------------------


async def test_sync_calls_on_the_stores_loop_raise_instead_of_deadlocking(
        store: Store) -> None:
    memory = ImmAgentStore(store)
    calls: list[Callable[[], Any]] = [
        lambda: memory.put(("a",), "k", {"v": 1}), lambda: memory.get(("a",), "k"),
        lambda: memory.search(("a",)), lambda: memory.list_namespaces(),
        lambda: memory.delete(("a",), "k"), lambda: memory.batch([GetOp(("a",), "k")])]
    for call in calls:
        with pytest.raises(SyncCallError) as caught:
            call()
        assert isinstance(caught.value, asyncio.InvalidStateError)
    # From another thread the same calls run on the store's loop.
    await asyncio.to_thread(memory.put, ("a",), "k", {"v": 1})
    item = await asyncio.to_thread(memory.get, ("a",), "k")
    assert item is not None and item.value == {"v": 1}


def test_sync_code_opens_the_store_with_from_conn_string(store_dsn: str,
                                                          tmp_path: Path) -> None:
    dsns = [store_dsn, str(tmp_path / "memory"), ":memory:"]  # a suffix-less path too
    for dsn in dsns:
        with ImmAgentStore.from_conn_string(dsn) as memory:
            memory.setup()
            memory.put(("s",), "k", {"dsn": dsn})
            memory.put(("s",), "k2", {"dsn": dsn}, ttl=5)
            item = memory.get(("s",), "k")
            assert item is not None and item.value == {"dsn": dsn}
            assert [i.key for i in memory.search(("s",))] == ["k2", "k"]

            async def from_a_loop() -> Any:  # async methods from another loop hop over
                await memory.aput(("s",), "k3", {"v": 3})
                return await memory.aget(("s",), "k3")

            assert asyncio.run(from_a_loop()).value == {"v": 3}
            threads = [threading.Thread(target=memory.put, args=(("t",), f"k{i}", {"i": i}))
                       for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(memory.search(("t",))) == 4
            opened = memory.store
            assert opened.closed is False
        assert opened.closed is True
        with pytest.raises(immagent.StoreClosedError):
            memory.get(("s",), "k")
    assert (tmp_path / "memory").exists()


def test_the_sync_sweeper_thread(tmp_path: Path) -> None:
    every = cast(int, 0.2 / 60)  # TTLConfig says int; any number of minutes works
    with ImmAgentStore.from_conn_string(tmp_path / "ttl.db",
                                        ttl={"sweep_interval_minutes": every}) as memory:
        memory.setup()
        memory.put(("s",), "gone", {"v": 1}, ttl=0.5 / 60)
        future = memory.start_ttl_sweeper()
        deadline = 600  # a minute: the machine may be busy; the sweep runs every 0.2 s
        while memory.history(("s",), "gone") and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
        assert memory.history(("s",), "gone") == []
        assert memory.stop_ttl_sweeper(timeout=5) is True
        assert future.result(timeout=5) is None


async def test_async_with_opens_on_this_loop(store_dsn: str) -> None:
    async with ImmAgentStore.from_conn_string(store_dsn) as memory:
        await memory.asetup()
        await memory.aput(("a",), "k", {"v": 1})
        assert (await memory.aget(("a",), "k")) is not None
        with pytest.raises(SyncCallError):
            memory.get(("a",), "k")
    assert memory.store.closed


# -- one database for the checkpointer and the store ---------------------------------------


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class User(TypedDict):
    user: str


async def _remember(state: Chat, runtime: Runtime[User]) -> dict[str, Any]:
    """Keep every user message as a memory of the user, and answer with how many the
    user has told us so far, across threads."""
    assert runtime.store is not None and runtime.context is not None
    user = ("memories", runtime.context["user"])
    text = str(state["messages"][-1].content)
    await runtime.store.aput(user, f"m{len(await runtime.store.asearch(user, limit=100))}",
                             {"text": text})
    known = await runtime.store.asearch(user, limit=100)
    return {"messages": [AIMessage(content=f"I know {len(known)} things about you")]}


def _graph(saver: Any, memory: Any) -> Any:
    builder = StateGraph(Chat, context_schema=User)
    builder.add_node("remember", _remember)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", END)
    return builder.compile(checkpointer=saver, store=memory)


async def test_a_graph_keeps_checkpoints_and_memory_in_one_database(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    graph = _graph(ImmAgentSaver(store), ImmAgentStore(store))
    replies = []
    for thread, text in (("t1", "I like tea"), ("t1", "I live in Lyon"),
                         ("t2", "I have a cat")):
        out = await graph.ainvoke({"messages": [HumanMessage(content=text)]},
                                  {"configurable": {"thread_id": thread}},
                                  context={"user": "ada"})
        replies.append(out["messages"][-1].content)
    # The memory crosses threads; each thread's checkpoints hold only its own messages.
    assert replies == ["I know 1 things about you", "I know 2 things about you",
                       "I know 3 things about you"]
    state = await graph.aget_state({"configurable": {"thread_id": "t2"}})
    assert [m.content for m in state.values["messages"]] == ["I have a cat",
                                                             "I know 3 things about you"]
    assert item_states(store_dsn) == 3
    assert count_rows(store_dsn, "immagent_states", f"kind = {int(Kind.CHECKPOINT)}") > 0
    # One verify and one gc cover both clients.
    assert (await store.verify()).ok
    await store.gc()
    memory = ImmAgentStore(store)
    assert sorted(i.value["text"] for i in await memory.asearch(("memories", "ada"))) == [
        "I have a cat", "I like tea", "I live in Lyon"]
    path = tmp_path / "ada.bundle"
    await memory.aexport(path, ("memories", "ada"))
    assert immagent.verify_bundle(path).assets == 3


def test_a_sync_graph_with_both_opened_from_one_file(tmp_path: Path) -> None:
    """The embedded default: one SQLite file, a sync graph, the saver on its own store."""
    path = tmp_path / "app.db"
    with ImmAgentStore.from_conn_string(path) as memory:
        memory.setup()
        host = memory.store

        async def build_and_run() -> list[str]:
            # The saver shares the memory store's database through its own Store.
            async with ImmAgentSaver.from_conn_string(str(path)) as saver:
                graph = _graph(saver, memory)
                out = []
                for thread in ("a", "b"):
                    result = await graph.ainvoke(
                        {"messages": [HumanMessage(content=f"hello from {thread}")]},
                        {"configurable": {"thread_id": thread}}, context={"user": "bo"})
                    out.append(result["messages"][-1].content)
                return out

        assert asyncio.run(build_and_run()) == ["I know 1 things about you",
                                                "I know 2 things about you"]
        assert len(memory.search(("memories", "bo"))) == 2
        assert not host.closed


@pytest.mark.skipif(importlib.util.find_spec("langgraph") is None, reason="needs langgraph")
def test_the_example_runs_on_the_embedded_default(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "ex.db")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "I know 2 things about you" in out.stdout
    assert "verify: OK" in out.stdout


# -- layering -----------------------------------------------------------------------------


def test_without_langgraph_the_store_is_audited_and_the_adapter_names_the_extra(
        tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    with ImmAgentStore.from_conn_string(path) as memory:
        memory.setup()
        memory.put(("u",), "k", {"v": 1}, ttl=5)
        memory.put(("u",), "k", {"v": 2})
        memory.delete(("u",), "k")
    code = f"""
import asyncio, sys
sys.modules["langgraph"] = None  # LangGraph is not installed here
import immagent
from immagent.clients.store_items import ItemLog
try:
    import immagent.integrations.langgraph_store
except immagent.ImmAgentError as e:
    assert isinstance(e, ImportError)
    print("missing:", e)
async def main():
    store = await immagent.Store.connect({str(path)!r})
    report = await store.verify()
    print("verify:", report.ok, report.agents_checked)
    print("history:", [v.change for v in await ItemLog(store).history(("u",), "k")])
    await store.close()
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'immagent-core[langgraph]'" in out.stdout
    assert "verify: True 3" in out.stdout
    assert "history: ['delete', 'put', 'put']" in out.stdout


def test_importing_the_client_imports_no_langgraph() -> None:
    code = ("import sys, immagent.clients.store_items, immagent.kv, immagent.store.hosting;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('langgraph', 'langchain_core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
