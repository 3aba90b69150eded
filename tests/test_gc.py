"""Garbage collection and lineage deletion: exactness, safety under concurrency (a stress
run and every interleaving of the dedup race on two PostgreSQL connections), and a
hypothesis state machine (gc, lineage deletion and retention runs among writes) checked
against a plain in-memory model."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
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
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, Digest, SystemPrompt
from immagent.retention import Policy, Rule
from tests import crafted
from tests.conftest import raw_sql
from tests.conftest import turn as support_turn
from tests.test_verify import assert_clean, delete_asset, stored_digests

T = TypeVar("T")

PROMPT = "You collect garbage."


def turn(i: int, tag: str = "") -> list[Message]:
    return support_turn(i, tag, tokens=None)


# -- exactness and lineage deletion (both backends) ---------------------------------------


async def test_gc_removes_exactly_the_unreachable(store: Store, store_dsn: str) -> None:
    base = await store.create_agent("bot", PROMPT, "m")
    kept = await store.append(base, turn(1))
    doomed = await store.append(kept, turn(2, "x"))
    fork = await store.append(kept, turn(2, "y"))
    await store.delete(doomed)
    assert (await store.gc()).assets_removed == 3  # doomed's node and its two messages
    present = stored_digests(store_dsn)
    # Every asset is still reachable from some live row except doomed's node and messages.
    only_doomed = {doomed.conversation_digest, *(m.digest for m in turn(2, "x"))}
    assert not only_doomed & present
    assert {fork.conversation_digest, kept.conversation_digest} <= present
    await store.delete(fork)
    await store.delete(kept)
    result = await store.gc()
    assert result.assets_removed == 6 and result.bytes_freed > 0  # two turns: 2 nodes, 4 msgs
    assert result.assets_kept == len(stored_digests(store_dsn)) == 2  # prompt + empty node
    assert (await store.gc()).assets_removed == 0  # idempotent
    assert await (await store.load_agent(base.id)).get_messages() == ()
    assert_clean(await store.verify())


async def test_gc_refuses_to_sweep_when_a_live_agent_dangles(
        store: Store, store_dsn: str) -> None:
    # git's lesson: an unreadable root is not an absent root. The head node is gone, so gc
    # cannot know what it would have kept; it must delete nothing rather than the history.
    head = await store.append(await store.create_agent("bot", PROMPT, "m"), turn(1))
    orphan = await store.append(await store.create_agent("other", "p2", "m"), turn(9))
    await store.delete(orphan)  # leaves unreachable assets a normal gc would sweep
    delete_asset(store_dsn, head.conversation_digest)
    before = stored_digests(store_dsn)
    with pytest.raises(immagent.IntegrityError, match=head.conversation_digest.hex()):
        await store.gc()
    assert stored_digests(store_dsn) == before


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


async def _orphaned_turn(store: Store) -> tuple[PersistentAgent, list[Message]]:
    """A deleted state whose turn (node + 2 messages) is now reachable from nothing."""
    messages = turn(1, "orphan")
    agent = await store.append(await store.create_agent("old", PROMPT, "m"), messages)
    await store.delete(agent)
    return agent, messages


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
    # W has deduplicated onto the unreferenced message M (no row lock taken) and is frozen
    # before commit; G starts. G must wait for W, then see W's node and keep M.
    writer, collector = two_pg_stores
    _, (m, other) = await _orphaned_turn(writer)
    fresh = await writer.create_agent("new", PROMPT, "m")
    node = EMPTY_CONVERSATION.extend([m])
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        # X inserts W's future node uncommitted: W's own insert of it queues behind X.
        await x.execute("INSERT INTO immagent_assets (digest, kind, refs, body) "
                        "VALUES (%s, %s, %s, %s)",
                        (node.digest, int(node.kind), b"".join(node.refs()), node.body))
        w = await _started(writer.append(fresh, [m]))
        await _until_queued(pg_store_dsn, "transactionid", w)
        g = await _started(collector.gc())
        await _until_queued(pg_store_dsn, "advisory", g)
        await x.rollback()
        new = await w
        swept = await g
    finally:
        await x.close()
    assert swept.assets_removed == 2  # the old node and the other message, never M
    assert m.digest in stored_digests(pg_store_dsn)
    assert other.digest not in stored_digests(pg_store_dsn)
    collector.clear_cache()
    assert await (await collector.load_agent(new.id)).get_messages() == (m,)
    assert_clean(await collector.verify())


async def test_race_gc_in_flight_when_writer_dedups(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # G has marked (M unreachable) and is frozen before deleting M; W starts and would dedup
    # onto M. W must wait for G, then find M gone and insert it again.
    writer, collector = two_pg_stores
    _, (m, _) = await _orphaned_turn(writer)
    fresh = await writer.create_agent("new", PROMPT, "m")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("SELECT 1 FROM immagent_assets WHERE digest = %s FOR UPDATE", (m.digest,))
        g = await _started(collector.gc())
        await _until_queued(pg_store_dsn, "transactionid", g)  # G's DELETE queued behind X
        w = await _started(writer.append(fresh, [m]))
        await _until_queued(pg_store_dsn, "advisory", w)  # W queued behind G
        await x.commit()
        swept = await g
        new = await w
    finally:
        await x.close()
    assert swept.assets_removed == 3
    assert m.digest in stored_digests(pg_store_dsn)  # re-inserted by W after the sweep
    collector.clear_cache()
    assert await (await collector.load_agent(new.id)).get_messages() == (m,)
    assert_clean(await collector.verify())


async def test_race_gc_sweeps_the_parent_a_writer_extends(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # W extends a deleted state whose node N it read before its transaction; G sweeps N while
    # W waits. W must re-check N under the lock and fail cleanly, writing nothing.
    writer, collector = two_pg_stores
    dead, _ = await _orphaned_turn(writer)
    await writer.get_messages(dead)  # N is in W's cache: W will not read it again
    extra = Message(role="user", content="too late")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("SELECT 1 FROM immagent_assets WHERE digest = %s FOR UPDATE",
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
    assert extra.digest not in stored_digests(pg_store_dsn)
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
    in a while, a sound one that must import exactly."""

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
        self.assets: dict[Digest, tuple[Digest, ...]] = {}  # what must be stored: refs
        self.nodes: dict[Digest, ConversationNode] = {EMPTY_CONVERSATION.digest:
                                                      EMPTY_CONVERSATION}
        self.prompts: dict[Digest, str] = {}
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
        new = self.run(self.store.append(agent, messages))
        node = self.nodes[agent.conversation_digest].extend(messages)
        assert new.conversation_digest == node.digest
        self.nodes[node.digest] = node
        self.assets.update({m.digest: () for m in messages})
        self.assets[node.digest] = node.refs()
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
        else:
            with pytest.raises(immagent.AssetNotFoundError):
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

    @rule()
    def gc(self) -> None:
        roots = [d for i in self.parent for d in (self.handles[i].system_prompt_digest,
                                                  self.handles[i].conversation_digest)]
        doomed = set(self.assets) - reachable(roots, self.assets)
        result = self.run(self.store.gc())
        assert result.assets_removed == len(doomed)
        for digest in doomed:
            del self.assets[digest]
        assert set(self.assets) == reachable(roots, self.assets)
        self.store.clear_cache()
        for agent_id in self.parent:
            agent = self.run(self.store.load_agent(agent_id))
            assert self.run(agent.get_messages()) == self.history[agent_id]

    # -- corrupt a row ----------------------------------------------------------------------

    def _roots(self) -> list[Digest]:
        return [d for i in self.parent for d in (self.handles[i].system_prompt_digest,
                                                 self.handles[i].conversation_digest)]

    def _stored(self) -> set[Digest]:
        return {bytes(r[0]) for r in self.raw.rows("SELECT digest FROM immagent_assets")}

    def _damage(self, agent: PersistentAgent, how: str, pick: int) -> Callable[[], None] | None:
        """Damage one row reached from ``agent``; return how to restore it (None: ``how``
        does not apply to this agent)."""
        head = agent.conversation_digest
        history = self.history[agent.id]
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
        if how == "message_body_flipped":
            if not history:
                return None
            target = history[pick % len(history)].digest
        (row,) = self.raw.rows_for("SELECT kind, refs, body, codec FROM immagent_assets "
                                   "WHERE digest = %s", [target])
        kind, refs, body, codec = int(row[0]), bytes(row[1] or b""), bytes(row[2]), row[3]
        if how in ("node_refs_truncated", "node_parent_to_root", "node_refs_emptied") \
                and not refs:
            return None  # the empty node has no refs to damage
        new_kind, new_refs, new_body = kind, refs, body
        if how == "node_refs_truncated":
            new_refs = refs[:-32]
        elif how == "node_refs_emptied":
            new_refs = b""
        elif how == "node_parent_to_root":
            if refs[:32] == EMPTY_CONVERSATION.digest:
                return None  # its parent is the root already
            new_refs = EMPTY_CONVERSATION.digest + refs[32:]
        elif how == "node_disguised":  # a leaf's kind and no refs: looks like a message
            new_kind, new_refs = 2, b""
        else:
            new_body = body[:-1] + bytes([body[-1] ^ 1])
        self._set_asset(target, new_kind, new_refs, new_body, codec)
        return lambda: self._set_asset(target, kind, refs, body, codec)

    def _set_asset(self, digest: Digest, kind: int, refs: bytes, body: bytes,
                   codec: Any) -> None:
        empty: bytes | None = refs if refs or self.dsn.startswith("sqlite:///") else None
        self.raw.execute("UPDATE immagent_assets SET kind = %s, refs = %s, body = %s, "
                         "codec = %s WHERE digest = %s", [kind, empty, body, codec, digest])

    def _reads_are_true_or_refused(self) -> None:
        """Every live agent reads back what was stored, or its read raises IntegrityError:
        never other data, never another exception, never a hang."""
        self.store.clear_cache()
        for agent_id in self.parent:
            try:
                agent = self.run(asyncio.wait_for(self.store.load_agent(agent_id), 30))
                assert agent.digest == self.handles[agent_id].digest
                assert self.run(asyncio.wait_for(agent.get_messages(), 30)) \
                    == self.history[agent_id]
                assert self.run(asyncio.wait_for(agent.get_system_prompt(), 30)) \
                    == self.prompts[agent.system_prompt_digest]
                lineage = self.run(asyncio.wait_for(agent.get_lineage(), 30))
                assert lineage[-1].id == agent_id
            except immagent.IntegrityError:
                pass

    @precondition(lambda self: self.parent)
    @rule(index=st.integers(0, 50), pick=st.integers(0, 50), how=st.sampled_from([
        "node_refs_truncated", "node_refs_emptied", "node_parent_to_root", "node_disguised",
        "message_body_flipped", "state_refs_swapped", "state_body_flipped", "state_cycle"]))
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
                assert how in ("message_body_flipped", "state_cycle"), how
                assert before - self._stored() == doomed
                assert result.assets_removed == len(doomed)
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
                            **{m.digest: () for m in messages}, head.digest: head.refs()})
        self._keep(agent, tuple(messages))

    @invariant()
    def store_matches_model(self) -> None:
        assert {bytes(r[0]) for r in self.raw.rows("SELECT digest FROM immagent_assets")} \
            == set(self.assets)
        rows = self.raw.rows("SELECT id FROM immagent_states")
        ids = {r[0] if isinstance(r[0], UUID) else UUID(bytes=r[0]) for r in rows}
        assert ids == set(self.parent)


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
            raw_sql(dsn, "TRUNCATE immagent_assets, immagent_states")
            return dsn
        return f"sqlite:///{tmp_path / f'm{next(counter)}.db'}"

    started = time.monotonic()
    class Machine(GCMachine):
        def __init__(self) -> None:
            super().__init__(open_dsn)

    run_state_machine_as_test(Machine, settings=settings(stateful_step_count=30))
    assert time.monotonic() - started < 120
