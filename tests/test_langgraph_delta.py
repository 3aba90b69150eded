"""LangGraph's DeltaChannel on ImmAgentSaver, on PostgreSQL and SQLite, beside InMemorySaver:
reconstruction (``get_delta_channel_history``), snapshots stored as chains, a fork that
must not replay the branch it left, and ``prune`` keeping what reconstruction needs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from immagent import Store
from immagent.assets import Kind
from immagent.integrations.langgraph import ImmAgentSaver
from tests.conftest import count_rows

SNAPSHOT_EVERY = 3


def _add_all(state: Any, writes: Sequence[Any]) -> Any:
    for write in writes:
        state = add_messages(state, write)
    return state


class DeltaState(TypedDict):
    messages: Annotated[list[AnyMessage], DeltaChannel(_add_all,
                                                       snapshot_frequency=SNAPSHOT_EVERY)]


def _reply(state: DeltaState) -> dict[str, list[AnyMessage]]:
    return {"messages": [AIMessage(content=f"re: {state['messages'][-1].content}")]}


def build(saver: Any) -> Any:
    builder = StateGraph(DeltaState)
    builder.add_node("reply", _reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


def config(thread: str = "t") -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


async def chat(graph: Any, texts: Sequence[str], at: RunnableConfig | None = None,
               thread: str = "t") -> None:
    for text in texts:
        await graph.ainvoke({"messages": [HumanMessage(content=text, id=f"id-{text}")]},
                            at or config(thread))
        at = None


async def contents(graph: Any, at: RunnableConfig | None = None) -> list[str]:
    state = await graph.aget_state(at or config())
    return [str(m.content) for m in state.values.get("messages", [])]


async def history(graph: Any) -> list[tuple[int, list[str]]]:
    """Every checkpoint of the thread as LangGraph rebuilds it: (step, messages)."""
    return [(h.metadata["step"] if h.metadata else -2,
             [str(m.content) for m in h.values.get("messages", [])])
            async for h in graph.aget_state_history(config())]


async def test_a_delta_thread_rebuilds_every_checkpoint_as_inmemorysaver_does(
        store: Store) -> None:
    seen = []
    for saver in (InMemorySaver(), ImmAgentSaver(store)):
        graph = build(saver)
        await chat(graph, [f"m{i}" for i in range(8)])
        seen.append((await contents(graph), await history(graph)))
    assert seen[0] == seen[1]
    assert len(seen[1][0]) == 16 and len(seen[1][1]) == 3 * 8
    # A new saver (nothing in memory) rebuilds it from the store alone.
    assert await contents(build(ImmAgentSaver(store))) == seen[0][0]
    assert (await store.verify()).ok


async def test_history_is_the_ancestors_writes_back_to_the_nearest_snapshot(
        store: Store) -> None:
    saver = ImmAgentSaver(store)
    graph = build(saver)
    await chat(graph, [f"m{i}" for i in range(5)])
    head = await saver.aget_tuple(config())
    assert head is not None and "messages" not in head.checkpoint["channel_values"]
    found = await saver.aget_delta_channel_history(config=head.config,
                                                   channels=["messages"])
    seed = found["messages"]["seed"]
    assert isinstance(seed, _DeltaSnapshot)
    replayed = _add_all(list(seed.value), [v for _, _, v in found["messages"]["writes"]])
    assert [m.content for m in replayed] == await contents(graph)
    assert len(found["messages"]["writes"]) < SNAPSHOT_EVERY
    # The sync form, from another thread, says the same; unknown channels start empty.
    again = await asyncio.to_thread(lambda: saver.get_delta_channel_history(
        config=head.config, channels=["messages", "nothing"]))
    assert again["messages"] == found["messages"]
    assert again["nothing"] == {"writes": []}


async def test_snapshots_are_chains_sharing_every_message(store: Store,
                                                          store_dsn: str) -> None:
    graph = build(ImmAgentSaver(store))
    await chat(graph, [f"m{i}" for i in range(12)])
    # 24 messages; 8 snapshots (every 3 updates) of up to 24 messages each. As chains
    # they add a link per new message: far fewer nodes than the messages they list.
    nodes = count_rows(store_dsn, "immagent_assets", f"kind = {int(Kind.VALUE_NODE)}")
    listed = sum(range(3, 25, 3))
    assert nodes <= 24 + 8 + 1 < listed
    cold = ImmAgentSaver(store)
    snapshots = [t.checkpoint["channel_values"]["messages"] async for t in cold.alist(config())
                 if "messages" in t.checkpoint["channel_values"]]
    # (a checkpoint after a snapshot that did not touch the channel holds it too, as
    # LangGraph's savers keep a blob per channel version)
    assert all(isinstance(s, _DeltaSnapshot) for s in snapshots)
    assert len({len(s.value) for s in snapshots}) == 8
    assert len(snapshots[0].value) in range(22, 25)


async def test_a_fork_never_replays_the_branch_it_left(store: Store) -> None:
    # Fork from the middle of a thread, continue the fork; the abandoned branch's later
    # writes must not appear in the fork's state (a reported failure of delta replay).
    seen = []
    for saver in (InMemorySaver(), ImmAgentSaver(store)):
        graph = build(saver)
        await chat(graph, [f"m{i}" for i in range(7)])
        states = [h async for h in graph.aget_state_history(config())]
        middle = next(h for h in states if not h.next and len(h.values["messages"]) == 8)
        await chat(graph, ["fork a", "fork b"], at=middle.config)
        head = await contents(graph)
        assert head == [*(f"{p}m{i}" for i in range(4) for p in ("", "re: ")),
                        "fork a", "re: fork a", "fork b", "re: fork b"]
        assert not any(text.endswith(("m4", "m5", "m6")) for text in head)
        seen.append((head, await history(graph)))
    assert seen[0] == seen[1]


async def test_prune_keeps_what_the_newest_checkpoint_is_rebuilt_from(store: Store) -> None:
    saver = ImmAgentSaver(store)
    graph = build(saver)
    await chat(graph, [f"m{i}" for i in range(7)])
    states = [h async for h in graph.aget_state_history(config())]
    middle = next(h for h in states if not h.next and len(h.values["messages"]) == 6)
    await chat(graph, ["fork"], at=middle.config)  # an abandoned branch: m3..m6
    before = await contents(graph)
    checkpoints = await store.count_states(Kind.CHECKPOINT)
    await saver.aprune(["t"])
    # Fewer rows, none of the abandoned branch, but the newest reads back as before,
    # from a new saver too.
    kept = [t async for t in ImmAgentSaver(store).alist(config())]
    assert 1 < len(kept) <= 3 * SNAPSHOT_EVERY < checkpoints
    assert await contents(build(ImmAgentSaver(store))) == before
    # Later checkpoints (their snapshot included) are rebuilt through what was kept.
    reference = build(InMemorySaver())
    await chat(reference, [f"m{i}" for i in range(3)] + ["fork", "x", "y", "z"])
    await chat(graph, ["x", "y", "z"])
    assert await contents(graph) == await contents(reference)
    assert await contents(build(ImmAgentSaver(store))) == await contents(reference)
    assert (await store.verify()).ok
    await store.gc()
    assert await contents(build(ImmAgentSaver(store))) == await contents(reference)


async def test_prune_of_a_delta_thread_with_writes_since_its_snapshot_seeded_at_head(
        store: Store) -> None:
    # The newest checkpoint holding the snapshot itself needs nothing older.
    saver = ImmAgentSaver(store)
    graph = build(saver)
    await chat(graph, ["a"])
    while True:
        head = await saver.aget_tuple(config())
        assert head is not None
        if "messages" in head.checkpoint["channel_values"]:
            break
        await chat(graph, ["more"])
    before = await contents(graph)
    await saver.aprune(["t"])
    assert len([t async for t in saver.alist(config())]) == 1
    assert await contents(build(ImmAgentSaver(store))) == before


# -- the two fork reports against LangGraph's delta replay (langgraph#8443, #8551) ----------


def _append(current: Any, writes: Sequence[Any]) -> list[Any]:
    out = list(current or [])
    for write in writes:
        out.extend(write if isinstance(write, list) else [write])
    return out


class LogState(TypedDict):
    log: Annotated[list[str], DeltaChannel(_append, snapshot_frequency=1000)]


def log_graph(saver: Any, tag: str) -> Any:
    async def node(state: LogState) -> dict[str, list[str]]:
        return {"log": [f"{tag}-out"]}

    builder = StateGraph(LogState)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    return builder.compile(checkpointer=saver)


async def _forks(saver: Any) -> list[list[str]]:
    """A run, a second run, then a third run addressed at the first one's checkpoint (a
    fork), and an update_state against that shared base; what each reads back."""
    at = config("forks")
    await log_graph(saver, "first").ainvoke({"log": ["in-1"]}, at)
    base = (await log_graph(saver, "x").aget_state(at)).config
    await log_graph(saver, "second").ainvoke({"log": ["in-2"]}, at)
    second = (await log_graph(saver, "x").aget_state(at)).config
    live = (await log_graph(saver, "third").ainvoke({"log": ["in-3"]}, base))["log"]
    reloaded = (await log_graph(saver, "x").aget_state(at)).values["log"]
    await log_graph(saver, "x").aupdate_state(base, {"log": ["edit"]})
    edited = (await log_graph(saver, "x").aget_state(at)).values["log"]
    old_branch = (await log_graph(saver, "x").aget_state(second)).values["log"]
    return [live, reloaded, edited, old_branch]


async def test_forks_of_a_shared_base_see_their_own_branch_only(store: Store) -> None:
    theirs, ours = await _forks(InMemorySaver()), await _forks(ImmAgentSaver(store))
    assert ours == theirs == [["in-1", "first-out", "in-3", "third-out"],
                              ["in-1", "first-out", "in-3", "third-out"],
                              ["in-1", "first-out", "edit"],
                              ["in-1", "first-out", "in-2", "second-out"]]
    # A new saver (nothing in memory) reads the same.
    cold = ImmAgentSaver(store)
    assert (await log_graph(cold, "x").aget_state(config("forks"))).values["log"] == \
        ["in-1", "first-out", "edit"]
