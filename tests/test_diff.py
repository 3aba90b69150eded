"""Diff of two states: their common ancestor, what each side added, what else changed; the
reads follow the divergence, never the history. Agents, sessions and LangGraph checkpoints
(every client's chains through the one log API)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import pytest

from immagent import Store
from immagent.assets import Asset, Digest, Item, Kind, Message
from immagent.audit.diff import StateDiff
from immagent.clients.sessions import SessionLog
from immagent.exceptions import AssetNotFoundError, ValidationError
from immagent.ids import uuid7
from immagent.offline import ECHO_MODEL
from tests.conftest import turn

PROMPT = "You are compared."


async def grow(store: Store, agent: Any, n: int, tag: str) -> Any:
    for i in range(n):
        agent = await store.append(agent, turn(i, tag))
    return agent


def texts(messages: Sequence[Asset]) -> list[str | None]:
    return [m.content for m in messages if isinstance(m, Message)]


async def test_two_forks_meet_at_their_fork_point(store: Store) -> None:
    base = await grow(store, await store.create_agent("d", PROMPT, ECHO_MODEL), 3, "base")
    left = await grow(store, base, 2, "L")
    right = await store.with_metadata(await grow(store, base, 1, "R"), {"reviewed": True})
    found = await store.diff(left, right)
    assert (found.left, found.right, found.kind) == (left.id, right.id, Kind.AGENT_STATE)
    assert found.ancestor == base.id and not found.same_content
    (chain,) = found.chains
    assert chain.ref == "conversation" and chain.base == base.conversation_digest
    assert chain.base_length == 6
    assert texts(chain.left) == ["q0L", "a0L", "q1L", "a1L"]
    assert texts(chain.right) == ["q0R", "a0R"]
    assert [(c.field, c.left, c.right) for c in found.changes] == [
        ("metadata", {}, {"reviewed": True})]
    # The other way round, the sides swap.
    back = await store.diff(right.id, left.id)
    assert texts(back.chains[0].left) == ["q0R", "a0R"] and back.ancestor == base.id


async def test_a_state_and_its_descendant_and_a_state_with_itself(store: Store) -> None:
    base = await grow(store, await store.create_agent("e", PROMPT, ECHO_MODEL), 2, "b")
    later = await grow(store, base, 2, "x")
    found = await store.diff(base, later)
    assert found.ancestor == base.id
    assert found.chains[0].left == () and texts(found.chains[0].right) == [
        "q0x", "a0x", "q1x", "a1x"]
    same = await store.diff(later, later)
    assert same.same_content and same.ancestor == later.id
    assert same.chains[0].same and same.changes == ()
    clone = await store.clone(later)  # a sibling: same content, the same parent
    twin = await store.diff(later, clone)
    assert twin.same_content and twin.ancestor == later.parent_id and twin.changes == ()


async def test_unrelated_agents_differ_in_prompt_model_config_and_history(
        store: Store) -> None:
    a = await grow(store, await store.create_agent(
        "a", PROMPT, ECHO_MODEL, model_config={"temperature": 0.1}), 1, "a")
    b = await grow(store, await store.create_agent(
        "b", "You are someone else.", "openai/gpt-4o-mini", metadata={"team": "x"}), 1, "b")
    found = await store.diff(a, b)
    assert found.ancestor is None
    assert found.chains[0].base_length == 0  # they meet at the empty conversation
    assert texts(found.chains[0].left) == ["q0a", "a0a"]
    changes = {c.field: (c.left, c.right) for c in found.changes}
    assert changes == {"system_prompt": (PROMPT, "You are someone else."),
                       "name": ("a", "b"), "model": (ECHO_MODEL, "openai/gpt-4o-mini"),
                       "model_config": ({"temperature": 0.1}, {}),
                       "metadata": ({}, {"team": "x"})}


async def test_bad_pairs_are_refused(store: Store) -> None:
    agent = await store.create_agent("f", PROMPT, ECHO_MODEL)
    with pytest.raises(AssetNotFoundError, match="right state"):
        await store.diff(agent, uuid7())
    with pytest.raises(ValidationError, match="left"):
        await store.diff("not a uuid", agent)
    session = SessionLog(store, "s-bad")
    state = await session.append([Item.of({"role": "user", "content": "hi"})])
    assert state is not None
    with pytest.raises(ValidationError, match="one kind"):
        await store.diff(agent.id, state.id)


class CountingLog:
    """The store's reads, counted (every call goes to the real store)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.assets = 0
        self.states = 0
        self.calls = 0  # round trips, whatever they ask for

    async def get_states(self, ids: Sequence[UUID]) -> list[Any]:
        return await self.store.get_states(ids)

    async def get_assets(self, digests: Sequence[Digest]) -> list[Asset]:
        self.assets += len(digests)
        self.calls += 1
        return await self.store.get_assets(digests)

    async def read_nodes(self, nodes: Sequence[Digest]) -> list[Any]:
        self.assets += len(nodes)  # each node's own row, with the elements it adds
        self.calls += 1
        return await self.store.read_nodes(nodes)

    async def state_lineage(self, state_id: UUID, limit: int | None = None) -> list[Any]:
        assert limit is not None  # never a whole lineage
        self.states += limit
        self.calls += 1
        return await self.store.state_lineage(state_id, limit)


async def test_the_reads_follow_the_divergence_not_the_history(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from immagent.audit.diff import diff_states

    # Reading a node with its context (what extending it needs) is a round trip of its
    # own, behind the log's methods: a diff needs none.
    contexts: list[bytes] = []
    read_node = store._read_node

    async def counted(digest: bytes) -> Any:
        contexts.append(digest)
        return await read_node(digest)

    monkeypatch.setattr(store, "_read_node", counted)
    counts = []
    for history in (20, 200):
        base = await grow(store, await store.create_agent(f"h{history}", PROMPT, ECHO_MODEL),
                          history, "h")
        left, right = await grow(store, base, 5, "L"), await grow(store, base, 3, "R")
        store.clear_cache()
        log = CountingLog(store)
        found: StateDiff = await diff_states(log, left.id, right.id)
        assert len(found.chains[0].left) == 10 and len(found.chains[0].right) == 6
        assert found.ancestor == base.id
        counts.append((log.assets, log.states, log.calls, len(contexts)))
        contexts.clear()
    assert counts[0] == counts[1]  # ten times the history, the same reads
    assert counts[0][0] <= 40
    # Round trips: the two first lineage stretches, then one each, then the nodes the
    # walked states name in one batch (schema 3 stores nodes apart: get_assets would read
    # each node's context, one round trip a node).
    assert counts[0][2] <= 6 and counts[0][3] == 0, counts


async def test_diff_agrees_with_whole_histories_on_random_trees(store: Store) -> None:
    rng = random.Random(24)
    root = await store.create_agent("tree", PROMPT, ECHO_MODEL)
    states = [root]
    for step in range(40):
        parent = rng.choice(states)
        if rng.random() < 0.2:
            child = await store.clone(parent)
        else:
            child = await store.append(parent, turn(step, "t")[: rng.choice((1, 2))])
        states.append(child)
    for _ in range(25):
        a, b = rng.choice(states), rng.choice(states)
        found = await store.diff(a, b)
        ma, mb = await a.get_messages(), await b.get_messages()
        common = 0
        while common < min(len(ma), len(mb)) and ma[common] == mb[common]:
            common += 1
        chain = found.chains[0]
        # The common node may end before the common prefix (two nodes adding the same
        # messages are still two nodes, unless their content is equal).
        assert chain.base_length <= common
        assert (*ma[:chain.base_length], *chain.left) == ma
        assert (*mb[:chain.base_length], *chain.right) == mb
        lineage_a = {s.id for s in await store.state_lineage(a.id)}
        expected = next((s.id for s in await store.state_lineage(b.id)
                         if s.id in lineage_a), None)
        assert found.ancestor == expected


async def test_sessions_diff_by_branch(store: Store) -> None:
    log = SessionLog(store, "s-1")
    user = [Item.of({"role": "user", "content": f"u{i}"}) for i in range(4)]
    await log.append(user[:2])
    first = await log.newest()
    fork = SessionLog(store, "s-2")
    assert first is not None
    other = await log.fork("s-2")
    await log.append(user[2:3])
    await fork.append(user[3:4])
    left, right = await log.newest(), await fork.newest()
    assert left is not None and right is not None
    found = await store.diff(left.id, right.id)
    assert found.ancestor == first.id and other.parent_id == first.id
    (main,) = found.chains
    assert main.ref == "main" and main.base_length == 2
    assert [i.value["content"] for i in main.left if isinstance(i, Item)] == ["u2"]
    assert [i.value["content"] for i in main.right if isinstance(i, Item)] == ["u3"]
    assert ("stream", "s-1", "s-2") in {(c.field, c.left, c.right) for c in found.changes}


async def test_langgraph_checkpoints_diff_by_channel(store: Store) -> None:
    pytest.importorskip("langgraph")
    from langgraph.graph import END, START, MessagesState, StateGraph

    from immagent.integrations.langgraph import ImmAgentSaver

    def reply(state: MessagesState) -> dict[str, Any]:
        return {"messages": [("ai", f"echo {len(state['messages'])}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    saver = ImmAgentSaver(store)
    graph = builder.compile(checkpointer=saver)
    config: Any = {"configurable": {"thread_id": "t-1"}}
    graph_any: Any = graph  # LangGraph's overloads want its own message types
    await graph_any.ainvoke({"messages": [("user", "one")]}, config)
    middle = await saver.aget_tuple(config)
    assert middle is not None
    await graph_any.ainvoke({"messages": [("user", "two")]}, config)
    fork: Any = {"configurable": {**middle.config["configurable"]}}
    forked = await graph_any.ainvoke({"messages": [("user", "three")]}, fork)
    assert forked
    newest = [r for r in await store.stream_states(Kind.CHECKPOINT, "t-1", limit=20)]
    left, right = newest[0], newest[3]  # the fork's newest, the main line's newest
    found = await store.diff(left.id, right.id)
    from immagent.checkpoints import checkpoint_state_id

    assert found.ancestor == checkpoint_state_id(
        "t-1", "", middle.config["configurable"]["checkpoint_id"])
    messages = {c.ref: c for c in found.chains}["messages"]
    # Both sides added a user message and a reply to the two they share.
    assert (messages.base_length, len(messages.left), len(messages.right)) == (2, 2, 2)
    assert {c.field for c in found.changes} >= {"checkpoint_id", "ts"}
