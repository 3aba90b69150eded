"""Garbage collection and lineage deletion: exactness, safety under concurrency (a stress
run and every interleaving of the dedup race on two PostgreSQL connections), and a
hypothesis state machine (gc, lineage deletion and retention runs among writes) checked
against a plain in-memory model."""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import immagent
from immagent import Message, PersistentAgent, Store
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, Digest, Kind, SystemPrompt
from immagent.redaction import redacted
from immagent.retention import Policy, Rule
from tests import crafted
from tests.conftest import raw_sql
from tests.conftest import turn as support_turn
from tests.test_verify import assert_clean, stored_digests

T = TypeVar("T")

PROMPT = "You collect garbage."


def turn(i: int, tag: str = "") -> list[Message]:
    return support_turn(i, tag, tokens=None)


# -- exactness and lineage deletion (both backends) ---------------------------------------


def stored(dsn: str) -> set[Digest]:
    """Every stored asset and chain node."""
    return stored_digests(dsn) | {bytes(r[0]) for r in raw_sql(
        dsn, "SELECT digest FROM immagent_nodes")}


async def test_gc_removes_exactly_the_unreachable(store: Store, store_dsn: str) -> None:
    base = await store.create_agent("bot", PROMPT, "m")
    kept = await store.append(base, turn(1))
    doomed = await store.append(kept, turn(2, "x"))
    fork = await store.append(kept, turn(2, "y"))
    await store.delete(doomed)
    result = await store.gc()
    # doomed's node, counted with the two messages it held.
    assert result.assets_removed == 3 and result["conversations"] == 1
    assert result["messages"] == 2
    present = stored(store_dsn)
    assert doomed.conversation_digest not in present
    assert {fork.conversation_digest, kept.conversation_digest} <= present
    await store.delete(fork)
    await store.delete(kept)
    result = await store.gc()
    assert result.assets_removed == 6 and result.bytes_freed > 0  # two turns: 2 nodes, 4 msgs
    assert result.assets_kept == len(stored(store_dsn)) == 2  # prompt + empty node
    assert (await store.gc()).assets_removed == 0  # idempotent
    assert await (await store.load_agent(base.id)).get_messages() == ()
    assert_clean(await store.verify())


async def test_gc_after_deletes_in_the_middle_of_a_run(store: Store, store_dsn: str) -> None:
    # One run of 40 nodes; a fork hangs from node 10 (a run of its own). Deleting the
    # states of nodes 11..40 leaves the run's tail unreachable: gc cuts the run there,
    # keeps the fork's run and the prefix it shares, and the freed slot is reused.
    states = [await store.create_agent("long", PROMPT, "m")]
    for i in range(40):
        states.append(await store.append(states[-1], turn(i)))
    fork = await store.append(states[10], turn(99, " fork"))
    await store.delete_states([s.id for s in states[11:]])
    result = await store.gc()
    assert result["conversations"] == 30 and result["messages"] == 60
    runs = "SELECT count(*) FROM immagent_nodes WHERE depth IS NOT NULL"  # first rows
    assert raw_sql(store_dsn, runs)[0][0] == 2  # the trunk and the fork
    store.clear_cache()
    assert len(await (await store.load_agent(fork.id)).get_messages()) == 22
    assert len(await (await store.load_agent(states[10].id)).get_messages()) == 20
    # Extending node 10 again continues the cut run (the slot after it is free).
    again = await store.append(states[10], turn(11, " again"))
    assert raw_sql(store_dsn, runs)[0][0] == 2
    store.clear_cache()
    assert len(await (await store.load_agent(again.id)).get_messages()) == 22
    assert_clean(await store.verify())


async def test_gc_refuses_to_sweep_when_a_live_agent_dangles(
        store: Store, store_dsn: str) -> None:
    # git's lesson: an unreadable root is not an absent root. The head node is gone, so gc
    # cannot know what it would have kept; it must delete nothing rather than the history.
    head = await store.append(await store.create_agent("bot", PROMPT, "m"), turn(1))
    orphan = await store.append(await store.create_agent("other", "p2", "m"), turn(9))
    await store.delete(orphan)  # leaves unreachable rows a normal gc would sweep
    raw_sql(store_dsn, "DELETE FROM immagent_nodes WHERE digest = %s",
            [head.conversation_digest])
    before = stored(store_dsn)
    with pytest.raises(immagent.IntegrityError, match=head.conversation_digest.hex()):
        await store.gc()
    assert stored(store_dsn) == before


async def test_delete_lineage_stops_at_a_shared_ancestor(store: Store) -> None:
    #  root ── a1 ── a2 ── a3        delete_lineage(a3) removes a3, a2 (a2's only child is a3)
    #           └── b2               and stops at a1, which b2 still descends from.
    root = await store.create_agent("bot", PROMPT, "m")
    a1 = await store.append(root, turn(1))
    a2 = await store.append(a1, turn(2))
    a3 = await store.append(a2, turn(3))
    b2 = await a1.with_metadata({"branch": "b"})  # a child of a1
    c4 = await store.append(a3, turn(4))  # a child of a3: delete_lineage still deletes a3
    assert await store.delete_lineage(a3) == [a3.id, a2.id]
    for gone in (a3, a2):
        with pytest.raises(immagent.AgentNotFoundError):
            await store.load_agent(gone.id)
    # The orphan keeps its parent_id; its lineage walk stops cleanly at the deleted parent.
    orphan = await store.load_agent(c4.id)
    assert orphan.parent_id == a3.id
    assert [a.id for a in await orphan.get_lineage()] == [c4.id]
    assert len(await orphan.get_messages()) == 8
    assert [a.id for a in await b2.get_lineage()] == [root.id, a1.id, b2.id]
    # Now b2's lineage goes all the way up: nothing else descends from a1 or root.
    assert await store.delete_lineage(b2.id) == [b2.id, a1.id, root.id]
    assert [a.id for a in await store.list_agents()] == [c4.id]
    await store.gc()
    assert_clean(await store.verify())
    assert len(await (await store.load_agent(c4.id)).get_messages()) == 8


async def test_delete_lineage_of_siblings_at_once_removes_their_parent(store: Store) -> None:
    parent = await store.append(await store.create_agent("bot", PROMPT, "m"), turn(1))
    kids = [await parent.with_metadata({"kid": i}) for i in range(6)]
    results = await asyncio.gather(*(store.delete_lineage(k) for k in kids))
    # Serialised: exactly one call (the last one) sees no sibling left and takes the parent
    # and its own parent with it.
    assert sorted(len(r) for r in results) == [1, 1, 1, 1, 1, 3]
    assert await store.count_agents() == 0


async def test_delete_lineage_rejects_bad_input(store: Store) -> None:
    with pytest.raises(immagent.AgentNotFoundError):
        await store.delete_lineage(UUID(int=1))
    with pytest.raises(immagent.ValidationError) as bad:
        await store.delete_lineage("nope")
    assert bad.value.field == "agent" and "nope" in str(bad.value)


# -- concurrency stress (both backends, two stores = two pools) ----------------------------

VOCAB = [Message(role=r, content=f"{r} {i}") for i in range(5) for r in ("user", "assistant")]
STRESS_SECONDS = 3.0


async def test_stress_writes_clones_deletes_while_gc_loops(store_dsn: str) -> None:
    stores = [await Store.connect(store_dsn, min_size=2, max_size=4) for _ in range(2)]
    await stores[0].init_schema()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STRESS_SECONDS
    live: dict[UUID, tuple[Message, ...]] = {}
    stats: Counter[str] = Counter()

    def running() -> bool:
        # At least STRESS_SECONDS, and on until gc has run and swept something (a busy
        # machine does less in the time; the race needs sweeps to be exercised), within
        # a cap that fails the run rather than hang it.
        now = loop.time()
        return now < deadline or (now < deadline + 300
                                  and not (stats["gc"] >= 4 and stats["swept"] > 0))

    async def worker(store: Store, seed: int) -> None:
        # Each worker touches only its own agents but shares every asset with the others:
        # one prompt, a ten-message vocabulary, hence identical nodes across lineages. Deleted
        # states go to a graveyard; appending to one dedups onto unreferenced assets (the race).
        rng = random.Random(seed)
        mine: dict[UUID, tuple[PersistentAgent, tuple[Message, ...]]] = {}
        graveyard: list[tuple[PersistentAgent, tuple[Message, ...]]] = []
        while running():
            op = rng.random()
            if not mine or op < 0.1:
                agent = await store.create_agent(f"w{seed}", PROMPT, "m")
                mine[agent.id] = (agent, ())
                continue
            agent, history = mine[rng.choice(list(mine))]
            if op < 0.45:
                added = rng.choices(VOCAB, k=rng.randint(1, 3))
                new = await store.append(agent, added)
                mine[new.id] = (new, (*history, *added))
            elif op < 0.55:
                new = await agent.clone()
                mine[new.id] = (new, history)
            elif op < 0.7:
                await store.delete(agent)
                graveyard.append(mine.pop(agent.id))
            elif op < 0.8:
                for gone in await store.delete_lineage(agent):
                    graveyard.append(mine.pop(gone))  # ancestors are this worker's too
            elif graveyard:
                dead, dead_history = rng.choice(graveyard)
                added = [rng.choice(VOCAB)]
                try:
                    new = await store.append(dead, added)
                except immagent.AssetNotFoundError:
                    stats["refused"] += 1  # gc swept its history first: clean refusal
                else:
                    stats["revived"] += 1
                    mine[new.id] = (new, (*dead_history, *added))
        live.update({i: h for i, (_, h) in mine.items()})

    async def collector(store: Store) -> None:
        while running():
            result = await store.gc()
            stats["gc"] += 1
            stats["swept"] += result.assets_removed
            await asyncio.sleep(0.005)

    try:
        await asyncio.gather(*(worker(stores[i % 2], i) for i in range(4)),
                             *(collector(s) for s in stores))
        await stores[1].gc()
        assert_clean(await stores[0].verify())
        assert stats["gc"] >= 4 and stats["swept"] > 0, stats
        assert await stores[0].count_agents() == len(live)
        fresh = await Store.connect(store_dsn, min_size=1, max_size=2)
        try:
            for agent in await fresh.load_agents(list(live)):
                assert await agent.get_messages() == live[agent.id]
        finally:
            await fresh.close()
    finally:
        for s in stores:
            await s.close()


# -- every interleaving of the dedup race, two PostgreSQL connections ----------------------
#
# A raw connection X holds a row lock to freeze one side mid-transaction at a chosen point;
# pg_locks tells when the other side is queued behind it. Without the shared/exclusive gc
# lock (or the writer's re-check of what it points at) each of these ends with a dangling
# reference, which verify() would report.


async def _until_queued(dsn: str, locktype: str, task: asyncio.Task[Any]) -> None:
    """Wait until some session is queued for a lock of ``locktype`` (the interleaving is in
    place), or ``task`` has finished without waiting (a broken locking scheme: the test goes
    on and its integrity checks fail)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            # This database's sessions only: the server is shared with other test runs.
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.locktype = %s "
                "AND a.datname = current_database()", (locktype,))
            row = await cur.fetchone()
            if (row is not None and row[0] > 0) or task.done():
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"nobody queued on a {locktype} lock")


async def _orphaned_turns(store: Store) -> tuple[PersistentAgent, Message, Message]:
    """Two nodes (one message each, M then O) reachable from nothing: their states were
    deleted. A new conversation starting with M is the first of them again."""
    m, other = turn(1, "orphan")
    base = await store.create_agent("old", PROMPT, "m")
    one = await store.append(base, [m])
    two = await store.append(one, [other])
    await store.delete_states([two.id, one.id])
    return one, m, other


@pytest.fixture
async def two_pg_stores(pg_store_dsn: str) -> AsyncIterator[list[Store]]:
    stores = [await Store.connect(pg_store_dsn, min_size=1, max_size=2) for _ in range(2)]
    await stores[0].init_schema()
    yield stores
    for s in stores:
        await s.close()


async def _started(coro: Awaitable[T]) -> asyncio.Task[T]:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return task


async def test_race_writer_in_flight_when_gc_marks(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # W has deduplicated onto the unreferenced node N (M's) and is frozen before commit; G
    # starts. G must wait for W, then see W's state and keep N.
    writer, collector = two_pg_stores
    one, m, _ = await _orphaned_turns(writer)
    fresh = await writer.create_agent("new", PROMPT, "m")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        # X holds the states table against inserts: W's state insert queues behind it,
        # after W found N stored (and took the shared gc lock).
        await x.execute("LOCK TABLE immagent_states IN SHARE MODE")
        w = await _started(writer.append(fresh, [m]))
        await _until_queued(pg_store_dsn, "relation", w)
        g = await _started(collector.gc())
        await _until_queued(pg_store_dsn, "advisory", g)
        await x.rollback()
        new = await w
        swept = await g
    finally:
        await x.close()
    assert new.conversation_digest == one.conversation_digest  # the same node: shared
    # O's node and message, never N.
    assert swept.assets_removed == 2 and swept["conversations"] == 1
    assert one.conversation_digest in stored(pg_store_dsn)
    collector.clear_cache()
    assert await (await collector.load_agent(new.id)).get_messages() == (m,)
    assert_clean(await collector.verify())


async def test_race_gc_in_flight_when_writer_dedups(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # G has marked (N unreachable) and is frozen before deleting it; W starts and would
    # dedup onto N. W must wait for G, then find N gone and insert it again.
    writer, collector = two_pg_stores
    one, m, _ = await _orphaned_turns(writer)
    fresh = await writer.create_agent("new", PROMPT, "m")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("SELECT 1 FROM immagent_nodes WHERE digest = %s FOR UPDATE",
                        (one.conversation_digest,))
        g = await _started(collector.gc())
        await _until_queued(pg_store_dsn, "transactionid", g)  # G's DELETE queued behind X
        w = await _started(writer.append(fresh, [m]))
        await _until_queued(pg_store_dsn, "advisory", w)  # W queued behind G
        await x.commit()
        swept = await g
        new = await w
    finally:
        await x.close()
    assert swept["conversations"] == 2 and swept["messages"] == 2
    assert one.conversation_digest in stored(pg_store_dsn)  # re-inserted by W after the sweep
    collector.clear_cache()
    assert await (await collector.load_agent(new.id)).get_messages() == (m,)
    assert_clean(await collector.verify())


async def test_race_gc_sweeps_the_parent_a_writer_extends(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # W extends a deleted state whose node N it read before its transaction; G sweeps N while
    # W waits. W must re-check N under the lock and fail cleanly, writing nothing.
    writer, collector = two_pg_stores
    dead, _, _ = await _orphaned_turns(writer)
    await writer.get_messages(dead)  # N is in W's cache: W will not read it again
    extra = Message(role="user", content="too late")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("SELECT 1 FROM immagent_nodes WHERE digest = %s FOR UPDATE",
                        (dead.conversation_digest,))
        g = await _started(collector.gc())
        await _until_queued(pg_store_dsn, "transactionid", g)
        w = await _started(writer.append(dead, [extra]))
        await _until_queued(pg_store_dsn, "advisory", w)
        await x.commit()
        await g
        with pytest.raises(immagent.AssetNotFoundError, match=dead.conversation_digest.hex()):
            await w
    finally:
        await x.close()
    assert dead.conversation_digest not in stored(pg_store_dsn)
    assert await collector.count_agents() == 1  # the created base state; nothing added
    assert_clean(await collector.verify())


# -- property test: random operations against an in-memory model --------------------------

TEXTS = st.sampled_from([Message(role="user", content=t) for t in ("hi", "yes", "no")]
                        + [Message(role="assistant", content=t) for t in ("ok", "hi")])


def reachable(roots: list[Digest], refs: dict[Digest, tuple[Digest, ...]]) -> set[Digest]:
    """The model's definition of what gc keeps: everything the roots reach through refs."""
    seen: set[Digest] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest not in seen:
            seen.add(digest)
            stack.extend(refs.get(digest, ()))
    return seen


class GCMachine(RuleBasedStateMachine):
    """The store must hold exactly the model's assets and agent rows after every step, and
    after each gc exactly what the live rows reach (computed here, in Python).

    Two adversarial steps: *corrupt a row* damages one stored row behind the
    store's back, checks that gc never deletes an asset a valid live state reaches, that no
    read returns data other than what was stored, and that nothing hangs, then restores the
    row; *import a crafted bundle* offers a bundle that must be refused (a parent cycle with
    stored rows, a wrong kind, a bad counter, a credential, an unreferenced asset) or, once
    in a while, a sound one that must import exactly. A *redaction* erases one message a live
    state holds (by position or digest): nothing stored appears or disappears, every read
    gives its marker, verify lists it, and from then on every write of it (an append, a
    sound bundle) is refused."""

    def __init__(self, open_dsn: Callable[[], str]) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()  # stateful rules cannot be async
        self.dsn = open_dsn()
        self.raw = _RawReader(self.dsn)
        self.store = self.run(Store.connect(self.dsn, min_size=1, max_size=2))
        self.run(self.store.init_schema())
        self.handles: dict[UUID, PersistentAgent] = {}
        self.history: dict[UUID, tuple[Message, ...]] = {}
        self.parent: dict[UUID, UUID | None] = {}  # live rows only
        self.dead: list[UUID] = []
        # What must be stored, by digest: prompts (no edges) and chain nodes (their parent:
        # a node holds its messages, so a lineage is what gc keeps).
        self.assets: dict[Digest, tuple[Digest, ...]] = {}
        self.nodes: dict[Digest, ConversationNode] = {EMPTY_CONVERSATION.digest:
                                                      EMPTY_CONVERSATION}
        self.prompts: dict[Digest, str] = {}
        self.redacted: set[Digest] = set()  # messages whose bodies were erased
        self.files = tempfile.TemporaryDirectory()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.raw.close()
        self.run(self.store.close())
        self.loop.close()
        self.files.cleanup()

    def _pick(self, ids: list[UUID], index: int) -> PersistentAgent:
        return self.handles[ids[index % len(ids)]]

    def _keep(self, agent: PersistentAgent, history: tuple[Message, ...]) -> None:
        self.handles[agent.id] = agent
        self.history[agent.id] = history
        self.parent[agent.id] = agent.parent_id

    @rule(prompt=st.sampled_from(["p0", "p1"]))
    def create(self, prompt: str) -> None:
        agent = self.run(self.store.create_agent("a", prompt, "m"))
        self._keep(agent, ())
        self.assets[SystemPrompt(text=prompt).digest] = ()
        self.prompts[SystemPrompt(text=prompt).digest] = prompt
        self.assets[EMPTY_CONVERSATION.digest] = ()

    def _append(self, agent: PersistentAgent, messages: list[Message]) -> None:
        if any(m.digest in self.redacted for m in messages):
            before = self._stored()
            with pytest.raises(immagent.RedactedError):
                self.run(self.store.append(agent, messages))
            assert self._stored() == before
            return
        new = self.run(self.store.append(agent, messages))
        node = self.nodes[agent.conversation_digest].extend(messages)
        if new.conversation_digest != node.digest:
            # A redacted body in the window of a span depth: the store cannot make the span
            # (the model, which kept the body, can). Everything else is the model's.
            assert self.redacted and node.span is not None
            found = self.run(self.store.get_assets([new.conversation_digest]))[0]
            assert isinstance(found, ConversationNode)
            assert (found.parent, found.messages, found.length, found.size, found.acc,
                    found.span) == (node.parent, node.messages, node.length, node.size,
                                    node.acc, None)
            node = found
        self.nodes[node.digest] = node
        self.assets[node.digest] = node.refs()[:1]
        self._keep(new, (*self.history[agent.id], *messages))

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50), messages=st.lists(TEXTS, min_size=1, max_size=3))
    def append(self, index: int, messages: list[Message]) -> None:
        self._append(self._pick(list(self.parent), index), messages)

    @precondition(lambda self: self.dead)
    @rule(index=st.integers(0, 50), message=TEXTS)
    def append_to_deleted(self, index: int, message: Message) -> None:
        # Allowed exactly while what it points at (prompt, head node) is still stored.
        agent = self._pick(self.dead, index)
        if {agent.system_prompt_digest, agent.conversation_digest} <= set(self.assets):
            self._append(agent, [message])
        else:  # refused; a redacted message may be refused for that first
            with pytest.raises((immagent.AssetNotFoundError, immagent.RedactedError)):
                self.run(self.store.append(agent, [message]))

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50))
    def clone(self, index: int) -> None:
        agent = self._pick(list(self.parent), index)
        self._keep(self.run(agent.clone()), self.history[agent.id])

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50))
    def delete(self, index: int) -> None:
        agent = self._pick(list(self.parent), index)
        self.run(self.store.delete(agent))
        del self.parent[agent.id]
        self.dead.append(agent.id)

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50))
    def delete_lineage(self, index: int) -> None:
        agent = self._pick(list(self.parent), index)
        expected, child, cursor = [agent.id], agent.id, self.parent[agent.id]
        while cursor in self.parent and not any(
                p == cursor and c != child for c, p in self.parent.items()):
            expected.append(cursor)
            child, cursor = cursor, self.parent[cursor]
        assert self.run(self.store.delete_lineage(agent)) == expected
        for gone in expected:
            del self.parent[gone]
            self.dead.append(gone)

    @precondition(lambda self: self.parent)
    @rule(keep=st.integers(1, 3), drop=st.booleans())
    def retain(self, keep: int, drop: bool) -> None:
        # The model's retention: per agent name, the newest ``keep`` states and every head
        # (no live child) stay; a drop takes whole streams. Content stays until gc.
        streams: dict[str, list[UUID]] = {}
        for state_id in self.parent:  # log order
            streams.setdefault(self.handles[state_id].name, []).append(state_id)
        parents = set(self.parent.values())
        doomed = [i for ids in streams.values()
                  for i in (ids if drop else [i for i in ids[:-keep] if i in parents])]
        policy = Policy.of(Rule.of(kinds="agents", drop=True, idle_for=0) if drop
                           else Rule.of(kinds="agents", keep_latest=keep))
        report = self.run(self.store.apply_retention(policy, gc=False))
        assert report.states_deleted == len(doomed)
        for gone in doomed:
            del self.parent[gone]
            self.dead.append(gone)  # what the survivors read is checked by the gc step

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50), pick=st.integers(0, 50), by_digest=st.booleans())
    def redact(self, index: int, pick: int, by_digest: bool) -> None:
        # The body goes from every node holding it; every digest, state and count stays.
        agent = self._pick(list(self.parent), index)
        history = self.history[agent.id]
        if not history:
            return
        message = history[pick % len(history)]
        before = self._stored()
        if by_digest:
            report = self.run(self.store.redact(message.digest, reason=f"r{pick}"))
        else:
            report = self.run(self.store.redact(state=agent.id,
                                                position=pick % len(history) + 1,
                                                reason=f"r{pick}"))
        assert report.digest == message.digest
        assert report.already == (message.digest in self.redacted)
        self.redacted.add(message.digest)
        assert self._stored() == before
        self._reads_are_true_or_refused(refused=False)
        verified = self.run(self.store.verify())
        # Every redacted message a live state holds is listed (gc may have swept others).
        live = {m.digest for i in self.parent for m in self.history[i]} & self.redacted
        assert verified.ok and live <= {r.digest for r in verified.redacted} <= self.redacted

    def _same(self, read: tuple[Message, ...], history: tuple[Message, ...]) -> bool:
        """Whether ``read`` is ``history`` with every redacted message a marker for it."""
        def view(m: Message) -> object:
            gone = redacted(m)
            return ("marker", gone.digest, m.role) if gone is not None else m

        return list(map(view, read)) == [("marker", m.digest, m.role)
                                         if m.digest in self.redacted else m
                                         for m in history]

    @rule()
    def gc(self) -> None:
        roots = [d for i in self.parent for d in (self.handles[i].system_prompt_digest,
                                                  self.handles[i].conversation_digest)]
        doomed = set(self.assets) - reachable(roots, self.assets)
        result = self.run(self.store.gc())
        assert result.assets_removed == self._removed(doomed)
        for digest in doomed:
            del self.assets[digest]
        assert set(self.assets) == reachable(roots, self.assets)
        self.store.clear_cache()
        for agent_id in self.parent:
            agent = self.run(self.store.load_agent(agent_id))
            assert self._same(self.run(agent.get_messages()), self.history[agent_id])

    def _removed(self, doomed: set[Digest]) -> int:
        """What gc counts for removing ``doomed``: each row, and each node's messages."""
        return len(doomed) + sum(len(self.nodes[d].messages) for d in doomed
                                 if d in self.nodes)

    # -- corrupt a row ----------------------------------------------------------------------

    def _roots(self) -> list[Digest]:
        return [d for i in self.parent for d in (self.handles[i].system_prompt_digest,
                                                 self.handles[i].conversation_digest)]

    def _stored(self) -> set[Digest]:
        return {bytes(r[0]) for r in self.raw.rows(
            "SELECT digest FROM immagent_assets UNION ALL SELECT digest FROM immagent_nodes")}

    def _damage(self, agent: PersistentAgent, how: str, pick: int) -> Callable[[], None] | None:
        """Damage one row reached from ``agent``; return how to restore it (None: ``how``
        does not apply to this agent)."""
        head = agent.conversation_digest
        if how.startswith("state"):
            (row,) = self.raw.rows_for("SELECT refs, body, parent_id FROM immagent_states "
                                       "WHERE id = %s", [agent.id])
            refs, body, parent = bytes(row[0]), bytes(row[1]), row[2]
            if how == "state_refs_swapped":
                self.raw.execute("UPDATE immagent_states SET refs = %s WHERE id = %s",
                                 [refs[32:] + refs[:32], agent.id])
            elif how == "state_body_flipped":
                self.raw.execute("UPDATE immagent_states SET body = %s WHERE id = %s",
                                 [bytes([body[0] ^ 1]) + body[1:], agent.id])
            else:  # a parent cycle
                self.raw.execute("UPDATE immagent_states SET parent_id = id WHERE id = %s",
                                 [agent.id])
            return lambda: self.raw.execute(
                "UPDATE immagent_states SET refs = %s, body = %s, parent_id = %s "
                "WHERE id = %s", [refs, body, parent, agent.id])
        target = head
        if how == "history_node_flipped":
            lineage = [d for d, n in self._lineage(head)]
            target = lineage[pick % len(lineage)]
        (row,) = self.raw.rows_for("SELECT loc, kind, codec, body FROM immagent_nodes "
                                   "WHERE digest = %s", [target])
        loc, kind, codec, body = int(row[0]), row[1], row[2], bytes(row[3])
        if how in ("node_flipped", "history_node_flipped"):
            # A tombstone's reason and time (a record's last bytes when its last message
            # is redacted) are outside the digest: verify checks them against the
            # redaction record (test_redaction.py), gc need not. Flip the first byte then.
            at = 0 if set(self.nodes[target].messages) & self.redacted else len(body) - 1
            self.raw.execute("UPDATE immagent_nodes SET body = %s WHERE loc = %s",
                             [body[:at] + bytes([body[at] ^ 1]) + body[at + 1:], loc])
        elif how == "node_kind_changed":  # a leaf's kind: looks like a message
            self.raw.execute("UPDATE immagent_nodes SET kind = 2 WHERE loc = %s", [loc])
        elif how == "node_moved":  # further along its run: its parent is gone from before it
            if not self.nodes[target].messages:
                return None  # the empty root: nothing stored before it to lose
            self.raw.execute("UPDATE immagent_nodes SET loc = %s WHERE loc = %s",
                             [loc + 4096, loc])
            return lambda: self.raw.execute(
                "UPDATE immagent_nodes SET loc = %s WHERE loc = %s", [loc, loc + 4096])
        else:  # run_reparented: a fork's run hung from the empty root instead
            (first,) = self.raw.rows_for("SELECT parent FROM immagent_nodes WHERE loc = %s",
                                         [loc])
            parent = None if first[0] is None else bytes(first[0])
            if parent is None or parent == EMPTY_CONVERSATION.digest:
                return None  # not the first node of a fork's run
            self.raw.execute("UPDATE immagent_nodes SET parent = %s WHERE loc = %s",
                             [EMPTY_CONVERSATION.digest, loc])
            return lambda: self.raw.execute(
                "UPDATE immagent_nodes SET parent = %s WHERE loc = %s", [parent, loc])
        return lambda: self.raw.execute(
            "UPDATE immagent_nodes SET kind = %s, codec = %s, body = %s WHERE loc = %s",
            [kind, codec, body, loc])

    def _lineage(self, head: Digest) -> list[tuple[Digest, ConversationNode]]:
        """The nodes from ``head`` back to the root (the model's)."""
        out: list[tuple[Digest, ConversationNode]] = []
        digest: Digest | None = head
        while digest is not None:
            node = self.nodes[digest]
            out.append((digest, node))
            digest = node.parent
        return out

    def _reads_are_true_or_refused(self, refused: bool = True) -> None:
        """Every live agent reads back what was stored, or (``refused``) its read raises
        IntegrityError: never other data, never another exception, never a hang."""
        self.store.clear_cache()
        for agent_id in self.parent:
            try:
                agent = self.run(asyncio.wait_for(self.store.load_agent(agent_id), 30))
                assert agent.digest == self.handles[agent_id].digest
                assert self._same(self.run(asyncio.wait_for(agent.get_messages(), 30)),
                                  self.history[agent_id])
                assert self.run(asyncio.wait_for(agent.get_system_prompt(), 30)) \
                    == self.prompts[agent.system_prompt_digest]
                lineage = self.run(asyncio.wait_for(agent.get_lineage(), 30))
                assert lineage[-1].id == agent_id
            except immagent.IntegrityError:
                if not refused:
                    raise

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50), pick=st.integers(0, 50), how=st.sampled_from([
        "node_flipped", "history_node_flipped", "node_kind_changed", "node_moved",
        "run_reparented", "state_refs_swapped", "state_body_flipped", "state_cycle"]))
    def corrupt_a_row(self, index: int, pick: int, how: str) -> None:
        agent = self._pick(list(self.parent), index)
        restore = self._damage(agent, how, pick)
        if restore is None:
            return
        try:
            before = self._stored()
            doomed = set(self.assets) - reachable(self._roots(), self.assets)
            try:
                result = self.run(asyncio.wait_for(self.store.gc(), 30))
            except immagent.IntegrityError:
                assert self._stored() == before  # aborted: nothing deleted at all
            else:
                # It swept: only what no valid live state reaches (the damage kept gc from
                # seeing no more than the truth), and exactly that.
                assert how == "state_cycle", how
                assert before - self._stored() == doomed
                assert result.assets_removed == self._removed(doomed)
                for digest in doomed:
                    del self.assets[digest]
            self._reads_are_true_or_refused()
            assert not self.run(asyncio.wait_for(self.store.verify(), 30)).ok
        finally:
            restore()
            self.store.clear_cache()
        assert self.run(self.store.verify()).ok

    # -- import a crafted bundle ----------------------------------------------------------

    @rule(how=st.sampled_from(["cycle", "wrong_kind", "bad_counter", "credential",
                               "unreferenced", "sound"]),
          messages=st.lists(TEXTS, min_size=1, max_size=3))
    def import_a_crafted_bundle(self, how: str, messages: list[Message]) -> None:
        prompt = SystemPrompt(text="p0")
        head = EMPTY_CONVERSATION.extend(messages)
        assets: list[Any] = [prompt, EMPTY_CONVERSATION, *messages, head]
        fields: dict[str, Any] = {}
        orphan = next((i for i, p in self.parent.items()
                       if p is not None and p not in self.parent), None)
        if how == "cycle" and orphan is not None:
            # A live state whose parent was deleted: a bundle bringing that parent back
            # with the live state as *its* parent would close a cycle.
            fields = {"id": self.parent[orphan], "parent_id": orphan}
        elif how in ("cycle", "wrong_kind"):
            head = prompt  # type: ignore[assignment]  # the conversation is a prompt
        elif how == "bad_counter":
            head = ConversationNode(parent=head.parent, messages=head.messages,
                                    length=head.length + 1, size=head.size)
            assets[-1] = head
        elif how == "credential":
            fields = {"model_config": {"extra_body": {"API_KEY": "sk-crafted"}}}
        elif how == "unreferenced":
            assets.append(Message(role="user", content="nobody points at me"))
        record = crafted.agent_state(prompt.digest, head.digest, name="crafted", model="m",
                                     **fields)
        path = crafted.write(Path(self.files.name) / f"{record.id}.bundle", [record], assets)
        states_before = self.raw.rows("SELECT id FROM immagent_states")
        if how == "sound" and any(m.digest in self.redacted for m in messages):
            before = self._stored()
            with pytest.raises(immagent.RedactedError):  # a bundle never brings it back
                self.run(asyncio.wait_for(self.store.import_bundle(path), 30))
            assert self._stored() == before
            assert self.raw.rows("SELECT id FROM immagent_states") == states_before
            return
        if how != "sound":
            before = self._stored()
            with pytest.raises(immagent.BundleError):
                self.run(asyncio.wait_for(self.store.import_bundle(path), 30))
            assert self._stored() == before
            assert self.raw.rows("SELECT id FROM immagent_states") == states_before
            return
        agent = self.run(asyncio.wait_for(self.store.import_bundle(path), 30))
        assert agent.digest == record.digest
        self.nodes[head.digest] = head
        self.prompts[prompt.digest] = prompt.text
        self.assets.update({prompt.digest: (), EMPTY_CONVERSATION.digest: (),
                            head.digest: head.refs()[:1]})
        self._keep(agent, tuple(messages))

    @invariant()
    def store_matches_model(self) -> None:
        assert self._stored() == set(self.assets)
        rows = self.raw.rows(f"SELECT id FROM immagent_states WHERE kind <> {Kind.REDACTION}")
        ids = {r[0] if isinstance(r[0], UUID) else UUID(bytes=r[0]) for r in rows}
        assert ids == set(self.parent)
        assert len(self.raw.rows("SELECT id FROM immagent_states WHERE kind = "
                                 f"{Kind.REDACTION}")) == len(self.redacted)


class _RawReader:
    """One connection behind the Store's back, kept for a whole example (reconnecting for
    each of hundreds of invariant checks would dominate the run time)."""

    def __init__(self, dsn: str) -> None:
        if dsn.startswith("sqlite:///"):
            import sqlite3

            self._sqlite: Any = sqlite3.connect(dsn.removeprefix("sqlite:///"),
                                                isolation_level=None)
            self._pg: psycopg.Connection[Any] | None = None
        else:
            self._sqlite = None
            self._pg = psycopg.connect(dsn, autocommit=True)

    def rows(self, sql: str) -> list[Any]:
        return self.rows_for(sql, [])

    def rows_for(self, sql: str, params: list[Any]) -> list[Any]:
        """``sql`` with PostgreSQL placeholders (%s) on either backend."""
        if self._pg is not None:
            return self._pg.execute(sql.encode(), params).fetchall()
        args = [p.bytes if isinstance(p, UUID) else p for p in params]
        return list(self._sqlite.execute(sql.replace("%s", "?"), args).fetchall())

    def execute(self, sql: str, params: list[Any]) -> None:
        """One write behind the store's back (autocommitted)."""
        if self._pg is not None:
            self._pg.execute(sql.encode(), params)
        else:
            args = [p.bytes if isinstance(p, UUID) else p for p in params]
            self._sqlite.execute(sql.replace("%s", "?"), args)

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        else:
            self._sqlite.close()


def test_gc_state_machine(backend_name: str, request: pytest.FixtureRequest,
                          tmp_path: Path) -> None:
    counter = iter(range(1_000_000))

    def open_dsn() -> str:
        if backend_name == "postgres":
            dsn = str(request.getfixturevalue("pg_store_dsn"))
            raw_sql(dsn, "TRUNCATE immagent_assets, immagent_states, immagent_nodes")
            return dsn
        return f"sqlite:///{tmp_path / f'm{next(counter)}.db'}"

    class Machine(GCMachine):
        def __init__(self) -> None:
            super().__init__(open_dsn)

    run_state_machine_as_test(Machine, settings=settings(stateful_step_count=30))
