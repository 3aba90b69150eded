"""Retention policies (immagent.retention, audit/retain.py) on every backend: each rule,
rules combined, pins, the stored policy and its periodic task, the empty policy, a policy
that keeps nothing, dry runs, a crash in the middle of a run, LangGraph threads with a
pending interrupt, and the forced interleavings of a run with writers and pins on two
PostgreSQL connections (as gc's are tested)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from langchain_core.messages import HumanMessage
from langgraph.types import Command

import immagent
from immagent import Message, PersistentAgent, Store
from immagent.assets import EMPTY_CONVERSATION, Kind
from immagent.audit import retain
from immagent.exceptions import ValidationError
from immagent.integrations.langgraph import ImmAgentSaver
from immagent.retention import Policy, Rule, from_langgraph_ttl, parse_duration
from tests.test_gc import _started, _until_queued
from tests.test_langgraph_graph import build, chat, config
from tests.test_verify import assert_clean

PROMPT = "You keep what matters."
KEEP_1 = Policy.of(Rule.of(kinds="agents", keep_latest=1))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store on each backend, the in-memory one included."""
    if request.param == "memory":
        dsn = "memory://"
    elif request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        dsn = str(request.getfixturevalue("pg_store_dsn"))
    s = await Store.connect(dsn, min_size=1, max_size=4)
    await s.init_schema()
    try:
        yield s
    finally:
        await s.close()


def say(i: int, tag: str = "") -> list[Message]:
    return [Message(role="user", content=f"{tag} question {i}")]


async def line(store: Store, name: str, states: int) -> list[PersistentAgent]:
    """An agent of ``states`` states in one lineage, oldest first."""
    agents = [await store.create_agent(name, PROMPT, "m")]
    for i in range(states - 1):
        agents.append(await store.append(agents[-1], say(i, name)))
    return agents


async def alive(store: Store, agents: Sequence[PersistentAgent]) -> list[int]:
    """The positions (1 = oldest) of the states of ``agents`` still stored."""
    stored = {r.id for r in await store.get_states([a.id for a in agents])}
    return [i for i, a in enumerate(agents, start=1) if a.id in stored]


async def reads_whole(store: Store, agent: PersistentAgent, turns: int) -> None:
    store.clear_cache()
    loaded = await store.load_agent(agent.id)
    assert len(await loaded.get_messages()) == turns


# -- rules as data ---------------------------------------------------------------------------


def test_durations_and_rules_are_checked() -> None:
    assert parse_duration("d", "1d12h") == 36 * 3600
    assert parse_duration("d", timedelta(minutes=2)) == 120
    assert parse_duration("d", "90") == 90
    for bad in ("ten days", "-1s", "", float("nan"), True, "2000000w"):
        with pytest.raises(ValidationError, match=r"^d"):
            parse_duration("d", bad)
    with pytest.raises(ValidationError, match="keep_latest"):
        Rule.of(keep_latest=0)
    with pytest.raises(ValidationError, match="keep_every"):
        Rule.of(keep_every=-3)
    with pytest.raises(ValidationError, match="kinds"):
        Rule.of(kinds="emails", keep_latest=1)
    with pytest.raises(ValidationError, match="keeps something"):
        Rule.of(kinds="agents")
    with pytest.raises(ValidationError, match="idle_for"):
        Rule.of(drop=True)
    with pytest.raises(ValidationError, match="drop"):
        Rule.of(drop=True, idle_for="1d", keep_latest=2)
    with pytest.raises(ValidationError, match="conversations"):
        Rule.of(kinds="conversations", drop=True, idle_for=0)
    assert Policy().describe() == ["no rules: every state is kept"]
    assert Policy.of(Rule.of(kinds="threads", streams="t-*", keep_latest=2)).describe() == [
        "1. threads named t-*: keep the newest 2 (and every head and pinned state)"]


def test_langgraph_ttl_settings_map_onto_a_policy() -> None:
    policy, sweep = from_langgraph_ttl({"strategy": "delete", "default_ttl": 60 * 24,
                                        "sweep_interval_minutes": 10})
    assert policy == Policy.of(Rule.of(kinds="checkpoints", idle_for="1d", drop=True))
    assert sweep == 600
    policy, sweep = from_langgraph_ttl({"strategy": "keep_latest", "default_ttl": 30})
    assert policy == Policy.of(Rule.of(kinds="checkpoints", idle_for="30m", keep_latest=1))
    assert sweep is None
    assert from_langgraph_ttl({}) == (Policy(), None)  # no default_ttl: nothing expires
    for bad in ({"strategy": "archive", "default_ttl": 1}, {"ttl": 5},
                {"default_ttl": "soon"}):
        with pytest.raises(ValidationError, match="config"):
            from_langgraph_ttl(bad)


# -- every rule, every backend ---------------------------------------------------------------


async def test_keep_latest_keeps_the_newest_and_the_content_of_the_head(store: Store) -> None:
    agents = await line(store, "a", 10)
    planned = await store.apply_retention(KEEP_1, dry_run=True)
    assert planned.dry_run and planned.states == {"agent_state": 9}
    assert await alive(store, agents) == list(range(1, 11))  # a dry run deletes nothing
    report = await store.apply_retention(Policy.of(Rule.of(keep_latest=3)))
    assert report.states == {"agent_state": 7} and report.streams == 1
    assert report.state_bytes > 0 and report.assets_removed == 0  # a hash chain: all kept
    assert await alive(store, agents) == [8, 9, 10]
    await reads_whole(store, agents[-1], 9)
    assert (await store.apply_retention(Policy.of(Rule.of(keep_latest=3)))).states == {}
    assert_clean(await store.verify())


async def test_max_age_keeps_the_young(store: Store) -> None:
    agents = await line(store, "a", 4)
    await asyncio.sleep(0.01)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.01)
    agents.append(await store.append(agents[-1], say(9)))
    agents.append(await store.append(agents[-1], say(10)))
    later = cut + timedelta(hours=2)  # the run's clock: states after ``cut`` are < 2h old
    report = await store.apply_retention(Policy.of(Rule.of(max_age="2h")), now=later)
    assert report.states_deleted == 4
    assert await alive(store, agents) == [5, 6]
    report = await store.apply_retention(Policy.of(Rule.of(max_age="1h")), now=later)
    assert await alive(store, agents) == [6]  # the head stays, however old
    with pytest.raises(ValidationError, match="now"):
        await store.apply_retention(KEEP_1, now=datetime(2030, 1, 1))  # naive


async def test_keep_every_positions_hold_across_runs(store: Store) -> None:
    agents = await line(store, "a", 10)
    policy = Policy.of(Rule.of(keep_every=3, keep_latest=1))
    assert (await store.apply_retention(policy)).states_deleted == 6
    assert await alive(store, agents) == [3, 6, 9, 10]
    assert (await store.apply_retention(policy)).states_deleted == 0  # applied twice: same
    for i in range(5):
        agents.append(await store.append(agents[-1], say(100 + i)))
    await store.apply_retention(policy)
    # Positions count on from the oldest state, not from what is left: 12 and 15.
    assert await alive(store, agents) == [3, 6, 9, 12, 15]
    await reads_whole(store, agents[-1], 14)
    assert_clean(await store.verify())


async def test_rules_combine_first_match_wins_and_idle_for_selects(store: Store) -> None:
    keep = await line(store, "keep-1", 6)
    other = await line(store, "other", 6)
    idle = await line(store, "idle", 3)
    later = datetime.now(UTC) + timedelta(days=3)
    policy = Policy.of(
        Rule.of(streams="keep-*", keep_latest=4),
        Rule.of(streams="idle", idle_for="2d", drop=True),
        Rule.of(kinds="agents", keep_latest=1, max_age="4d"),  # 4 days: nothing is older
        Rule.of(keep_latest=1))  # never reached for agents: the rule above matches first
    report = await store.apply_retention(policy, now=later)
    assert report.streams == 3 and report.states == {"agent_state": 2 + 3}
    assert await alive(store, keep) == [3, 4, 5, 6]
    assert await alive(store, other) == [1, 2, 3, 4, 5, 6]
    assert await alive(store, idle) == []  # dropped whole: idle for 3 days
    # Not idle long enough: left alone.
    again = await line(store, "idle", 2)
    await store.apply_retention(policy, now=datetime.now(UTC) + timedelta(days=1))
    assert await alive(store, again) == [1, 2]


async def test_an_empty_policy_keeps_everything(store: Store) -> None:
    agents = await line(store, "a", 5)
    report = await store.apply_retention(Policy())
    assert report.streams == 0 and report.states == {} and report.assets_removed == 0
    assert await alive(store, agents) == [1, 2, 3, 4, 5]


async def test_a_policy_that_keeps_nothing_drops_streams_and_gc_frees_their_content(
        store: Store) -> None:
    agents = await line(store, "gone", 5)
    other = await line(store, "stays", 2)
    planned = await store.apply_retention(
        Policy.of(Rule.of(streams="gone", drop=True, idle_for=0)), dry_run=True)
    assert planned.states == {"agent_state": 5} and planned.assets_removed > 0
    report = await store.apply_retention(
        Policy.of(Rule.of(streams="gone", drop=True, idle_for=0)))
    assert report.states == {"agent_state": 5}
    assert report.assets == planned.assets and report.asset_bytes == planned.asset_bytes
    assert await alive(store, agents) == []
    assert await alive(store, other) == [1, 2]
    await reads_whole(store, other[-1], 1)
    assert_clean(await store.verify())


async def test_branches_keep_every_head(store: Store) -> None:
    root = await line(store, "a", 3)
    left = await store.append(root[-1], say(1, "left"))
    right = await store.append(root[-1], say(1, "right"))
    newest = await store.append(right, say(2, "right"))
    await store.apply_retention(KEEP_1)
    assert await alive(store, [*root, left, right, newest]) == [4, 6]  # both tips
    await reads_whole(store, left, 3)


async def test_pins_keep_states_and_their_content(store: Store) -> None:
    agents = await line(store, "a", 6)
    pin = await store.pin(agents[1].id, tag="release", note="shipped")
    assert await store.pin(agents[1].id, tag="release") == pin  # the same pin again
    await store.pin(agents[2].id)
    pins = await store.pins()
    assert [(p.state_id, p.tag, p.note) for p in pins] == [
        (agents[1].id, "release", "shipped"), (agents[2].id, None, None)]
    await store.apply_retention(KEEP_1)
    assert await alive(store, agents) == [2, 3, 6]
    # Deleted by hand, a pinned state's content stays with its pin.
    await store.delete_states([agents[1].id])
    await store.gc()
    assert_clean(await store.verify())
    assert await store.unpin(agents[1].id) == 1
    assert await store.unpin(agents[2].id, tag="other") == 0
    assert [p.state_id for p in await store.pins()] == [agents[2].id]
    with pytest.raises(immagent.AssetNotFoundError):
        await store.pin(agents[0].id)  # deleted by the run
    with pytest.raises(ValidationError, match="state"):
        await store.pin("not an id")


async def test_the_stored_policy_and_the_periodic_task(store: Store) -> None:
    assert await store.retention_policy() is None
    with pytest.raises(ValidationError, match="policy"):
        await store.apply_retention()
    with pytest.raises(ValidationError, match="policy"):
        await store.set_retention_policy("keep 1")  # type: ignore[arg-type]
    await store.set_retention_policy(Policy.of(Rule.of(keep_latest=5)))
    await store.set_retention_policy(KEEP_1)
    assert await store.retention_policy() == KEEP_1
    agents = await line(store, "a", 4)
    reports: list[retain.RetentionReport] = []
    task = asyncio.create_task(store.retain_periodically(0.05, on_report=reports.append))
    for _ in range(200):
        if len(reports) >= 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reports[0].states_deleted == 3 and reports[1].states_deleted == 0
    assert await alive(store, agents) == [4]
    with pytest.raises(ValidationError, match="interval"):
        await store.retain_periodically("0s")


async def test_a_crash_in_the_middle_leaves_whole_streams_and_the_next_run_finishes(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    streams = [await line(store, f"s{i}", 7) for i in range(3)]
    policy = Policy.of(Rule.of(keep_every=2, keep_latest=1))
    real = retain.mark_rows
    calls = 0

    def failing(now: datetime) -> Any:
        build = real(now)

        def crash_on_second_page(moved: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("the process dies here")
            return build(moved)
        return crash_on_second_page

    monkeypatch.setattr(retain, "mark_rows", failing)
    with pytest.raises(RuntimeError, match="dies"):
        await retain.apply(store._open(), policy, page=1)  # one stream per transaction
    monkeypatch.undo()
    kept = [await alive(store, s) for s in streams]
    assert kept[0] == [2, 4, 6, 7]  # the first page committed, the others untouched
    assert kept[1:] == [list(range(1, 8))] * 2
    assert_clean(await store.verify())
    report = await store.apply_retention(policy)
    assert report.states_deleted == 6  # the rest; the first stream is not thinned again
    assert [await alive(store, s) for s in streams] == [[2, 4, 6, 7]] * 3
    for s in streams:
        await reads_whole(store, s[-1], 6)
    assert_clean(await store.verify())


# -- LangGraph: threads keep their newest checkpoint and a pending interrupt --------------


async def test_langgraph_threads_keep_the_newest_and_a_pending_interrupt(
        store: Store) -> None:
    graph = build(ImmAgentSaver(store))
    await chat(graph, "done", range(5))
    await chat(graph, "paused", range(4))
    await graph.ainvoke({"messages": [HumanMessage(content="may I? [pause]")]},
                        config("paused"))
    writes_before = await store.count_states(Kind.CHECKPOINT_WRITES)
    report = await store.apply_retention(
        Policy.of(Rule.of(kinds="threads", keep_latest=1)))
    assert report.states.get("checkpoint", 0) > 0
    assert await store.count_states(Kind.CHECKPOINT_WRITES) < writes_before
    state = await graph.aget_state(config("paused"))
    assert state.next == ("reply",)
    assert [i.value for t in state.tasks for i in t.interrupts] == [
        {"question": "may I? [pause]"}]
    await graph.ainvoke(Command(resume="yes"), config("paused"))
    state = await graph.aget_state(config("paused"))
    assert str(state.values["messages"][-1].content) == "Echo: may I? [pause] (yes)"
    assert len(state.values["messages"]) == 10
    done = await graph.aget_state(config("done"))
    assert len(done.values["messages"]) == 10
    assert_clean(await store.verify())
    # LangGraph's "delete" TTL: idle threads go whole.
    policy, _ = from_langgraph_ttl({"strategy": "delete", "default_ttl": 1})
    await store.apply_retention(policy, now=datetime.now(UTC) + timedelta(minutes=5))
    assert await store.count_states(Kind.CHECKPOINT) == 0
    assert await store.count_states(Kind.CHECKPOINT_WRITES) == 0
    assert_clean(await store.verify())


# -- forced interleavings on two PostgreSQL connections --------------------------------------


@pytest.fixture
async def two_stores(pg_store_dsn: str) -> AsyncIterator[list[Store]]:
    stores = [await Store.connect(pg_store_dsn, min_size=1, max_size=2) for _ in range(2)]
    await stores[0].init_schema()
    yield stores
    for s in stores:
        await s.close()


async def test_race_a_pin_waits_for_a_run_and_finds_its_state_gone(
        two_stores: list[Store], pg_store_dsn: str) -> None:
    pinner, runner = two_stores
    agents = await line(pinner, "a", 4)
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as x:
        # X holds the doomed state's row: R judges, then its DELETE queues behind X.
        await x.execute("SELECT 1 FROM immagent_states WHERE id = %s FOR UPDATE",
                        (agents[1].id,))
        r = await _started(runner.apply_retention(KEEP_1))
        await _until_queued(pg_store_dsn, "transactionid", r)
        p = await _started(pinner.pin(agents[1].id))  # sees the state: R has not committed
        await _until_queued(pg_store_dsn, "advisory", p)  # the pin waits for R
        await x.commit()
        report = await r
        with pytest.raises(immagent.AssetNotFoundError, match=str(agents[1].id)):
            await p
    assert report.states_deleted == 3
    assert await pinner.pins() == []
    assert_clean(await runner.verify())


async def test_race_a_run_waits_for_a_pin_in_flight_and_keeps_its_state(
        two_stores: list[Store], pg_store_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pinner, runner = two_stores
    agents = await line(pinner, "a", 4)
    pin_id = UUID("01a25000-0000-7000-8000-000000000001")
    monkeypatch.setattr(retain, "uuid7", lambda: pin_id)
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as x:
        # X inserts a row with the pin's id: P, past its check (holding the shared side
        # of the retention lock), queues behind X on the key.
        await x.execute("INSERT INTO immagent_states (id, kind, stream, refs, body, digest, "
                        "created_at) VALUES (%s, 4, 'x', ''::bytea, ''::bytea, %s, now())",
                        (pin_id, bytes(32)))
        p = await _started(pinner.pin(agents[1].id))
        await _until_queued(pg_store_dsn, "transactionid", p)
        r = await _started(runner.apply_retention(KEEP_1))
        await _until_queued(pg_store_dsn, "advisory", r)  # R waits for the pin
        await x.rollback()
        assert await p == pin_id
        report = await r
    assert report.states_deleted == 2
    assert await alive(runner, agents) == [2, 4]
    assert_clean(await runner.verify())


async def test_race_a_writer_advances_a_stream_a_run_planned_to_drop(
        two_stores: list[Store], pg_store_dsn: str) -> None:
    writer, runner = two_stores
    agents = await line(writer, "a", 3)
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as x:
        # X holds the retention lock: R has planned the drop (head: the 3rd state) and waits.
        await x.execute("SELECT pg_advisory_xact_lock(%s)", (0x1A3A_6E70_0000_0004,))
        r = await _started(runner.apply_retention(
            Policy.of(Rule.of(kinds="agents", drop=True, idle_for=0))))
        await _until_queued(pg_store_dsn, "advisory", r)
        agents.append(await writer.append(agents[-1], say(3)))  # commits meanwhile
        await x.commit()
        report = await r
    assert report.states_deleted == 0  # written to since it was planned: left alone
    assert await alive(writer, agents) == [1, 2, 3, 4]
    await reads_whole(runner, agents[-1], 3)


async def test_race_a_writer_in_flight_keeps_its_parent_and_its_content(
        two_stores: list[Store], pg_store_dsn: str) -> None:
    writer, runner = two_stores
    agents = await line(writer, "a", 4)
    message = Message(role="user", content="in flight")
    node = EMPTY_CONVERSATION
    for i in range(3):
        node = node.extend(say(i, "a"))
    assert node.digest == agents[-1].conversation_digest
    node = node.extend([message])
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as x:
        # X inserts a chain node row with W's future node's digest, uncommitted, at a loc
        # no writer uses: W, holding gc's shared lock, queues on the unique digest.
        await x.execute("INSERT INTO immagent_nodes (loc, kind, codec, count, depth, digest, "
                        "body) VALUES (%s, %s, 0, 4, 3, %s, %s)",
                        (1 << 60, int(node.kind), node.digest, node.body))
        w = await _started(writer.append(agents[-1], [message]))
        await _until_queued(pg_store_dsn, "transactionid", w)
        # R judges without W's state (its parent is the head, kept), commits, and its gc
        # waits for W.
        r = await _started(runner.apply_retention(KEEP_1))
        await _until_queued(pg_store_dsn, "advisory", r)
        await x.rollback()
        new = await w
        report = await r
    assert report.states_deleted == 3
    assert await alive(runner, [*agents, new]) == [4, 5]
    await reads_whole(runner, new, 4)
    assert_clean(await runner.verify())
