"""The behavioural contract every backend must pass (runs on PostgreSQL and SQLite)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

import immagent
from immagent import Message, PersistentAgent, Store
from immagent.assets import Kind
from immagent.clients.sessions import SessionLog, check_items
from immagent.records import AgentRecord
from immagent.store.backend import SCHEMA_VERSION
from tests import crafted
from tests.conftest import count_rows, raw_sql, stored_elements, turn

#: Also through PgBouncer and with a read replica (tests/conftest.py).
pytestmark = pytest.mark.on_cluster

PROMPT = "You are helpful."


def assets(dsn: str, kind: Kind | None = None) -> int:
    return count_rows(dsn, "immagent_assets", "TRUE" if kind is None else f"kind = {int(kind)}")


def nodes(dsn: str) -> int:
    return count_rows(dsn, "immagent_nodes")


async def test_create_and_load_round_trip(store: Store) -> None:
    agent = await store.create_agent("bot", PROMPT, "immagent/echo",
                                     model_config={"temperature": 0.5}, metadata={"team": "a"})
    assert agent.parent_id is None and agent.id.version == 7
    assert agent.created_at.tzinfo is not None
    store.clear_cache()
    loaded = await store.load_agent(str(agent.id))
    for field in ("id", "created_at", "name", "parent_id", "model", "digest",
                  "system_prompt_id", "conversation_id"):
        assert getattr(loaded, field) == getattr(agent, field), field
    assert dict(loaded.model_config) == {"temperature": 0.5}
    assert dict(loaded.metadata) == {"team": "a"}
    assert await loaded.get_system_prompt() == PROMPT
    assert await loaded.get_messages() == ()


async def test_step_is_a_new_state_and_stores_only_what_it_adds(
        store: Store, store_dsn: str) -> None:
    agent = await store.create_agent("bot", PROMPT, "immagent/echo")
    before = assets(store_dsn), nodes(store_dsn)
    step = await store.append(agent, turn(1))
    assert step.id != agent.id and step.parent_id == agent.id and step.digest != agent.digest
    # One node row holding the turn's two messages; no other row.
    assert stored_elements(store_dsn, Kind.MESSAGE) == 2
    assert (assets(store_dsn), nodes(store_dsn)) == (before[0], before[1] + 1)
    step2 = await store.append(step, turn(2))
    assert (assets(store_dsn), nodes(store_dsn)) == (before[0], before[1] + 2)
    assert count_rows(store_dsn, "immagent_states") == 3
    store.clear_cache()
    assert await step2.get_messages() == (*turn(1), *turn(2))
    # The old state is unchanged.
    assert await (await store.load_agent(agent.id)).get_messages() == ()


async def test_same_prompt_is_stored_once_for_1000_agents(store: Store, store_dsn: str) -> None:
    await asyncio.gather(*(store.create_agent(f"a{i}", PROMPT, "m") for i in range(1000)))
    assert await store.count_agents() == 1000
    assert assets(store_dsn, Kind.SYSTEM_PROMPT) == 1
    assert nodes(store_dsn) == 1  # the shared empty conversation


async def test_clone_adds_no_assets(store: Store, store_dsn: str) -> None:
    agent = await store.append(await store.create_agent("bot", PROMPT, "m"), turn(1))
    before = assets(store_dsn)
    clone = await agent.clone()
    assert assets(store_dsn) == before
    assert clone.id != agent.id and clone.parent_id == agent.parent_id  # a sibling
    assert clone.digest == agent.digest and clone.conversation_id == agent.conversation_id
    assert await clone.get_messages() == await agent.get_messages()


async def test_forks_share_history_and_identical_messages(store: Store, store_dsn: str) -> None:
    base = await store.create_agent("bot", PROMPT, "m")
    for i in range(5):
        base = await store.append(base, turn(i))
    before, msgs = nodes(store_dsn), stored_elements(store_dsn, Kind.MESSAGE)
    a = await store.append(base, turn(99, " fork"))
    b = await store.append(base, turn(99, " fork"))  # identical content, another lineage
    assert a.id != b.id and a.digest == b.digest
    # One node (the same digest is stored once), holding the two messages.
    assert stored_elements(store_dsn, Kind.MESSAGE) == msgs + 2
    assert nodes(store_dsn) == before + 1


async def test_metadata_change_is_a_new_state(store: Store) -> None:
    agent = await store.create_agent("bot", PROMPT, "m", metadata={"v": 1})
    changed = await agent.with_metadata({"v": 2})
    assert changed.parent_id == agent.id and changed.digest != agent.digest
    assert dict(changed.metadata) == {"v": 2} and dict(agent.metadata) == {"v": 1}
    with pytest.raises(immagent.ValidationError) as err:
        await agent.with_metadata({"v": float("nan")})
    assert err.value.field == "metadata.v"


async def test_lineage_list_count_find(store: Store) -> None:
    a = await store.create_agent("bot", PROMPT, "m")
    b = await store.append(a, turn(1))
    c = await store.append(b, turn(2))
    other = await store.create_agent("other", PROMPT, "m")
    assert [x.id for x in await c.get_lineage()] == [a.id, b.id, c.id]  # root first
    assert [x.id for x in await store.ancestors(c)] == [c.id, b.id, a.id]
    assert [x.id for x in await store.ancestors(c, limit=2)] == [c.id, b.id]
    assert [x.id for x in await store.list_agents()] == [other.id, c.id, b.id, a.id]
    assert [x.id for x in await store.list_agents(limit=1, offset=1)] == [c.id]
    assert [x.id for x in await store.list_agents(name="BO")] == [c.id, b.id, a.id]
    assert await store.count_agents() == 4
    assert await store.count_agents(name="bot") == 3
    assert [x.id for x in await store.find_by_name("bot")] == [c.id, b.id, a.id]
    assert await store.find_by_name("nobody") == []
    loaded = await store.load_agents([c.id, a.id])
    assert [x.id for x in loaded] == [c.id, a.id]


async def test_delete_keeps_other_agents_intact(store: Store) -> None:
    a = await store.create_agent("bot", PROMPT, "m")
    b = await store.append(a, turn(1))
    c = await store.append(b, turn(2))
    await store.delete(b)
    with pytest.raises(immagent.AgentNotFoundError):
        await store.load_agent(b.id)
    assert [x.id for x in await c.get_lineage()] == [c.id]  # stops at the deleted parent
    store.clear_cache()
    assert len(await c.get_messages()) == 4
    with pytest.raises(immagent.AgentNotFoundError):
        await store.delete(b.id)


async def test_commit_replace_swaps_states_in_one_write(store: Store) -> None:
    a = await store.create_agent("bot", PROMPT, "m")
    b = await store.create_agent("other", PROMPT, "m")
    renamed = crafted.agent_state(a.system_prompt_digest, a.conversation_digest,
                                  name="renamed", id=a.id).to_row()
    # Without replace the id is taken; with it, the old row is gone and the new one is read
    # (not the live object loaded before).
    with pytest.raises(immagent.ConflictError):
        await store.commit([], [renamed])
    await store.commit([], [renamed], replace=[a.id, uuid.uuid4()])
    assert (await store.load_agent(a.id)).name == "renamed"
    assert [x.id for x in await store.find_by_name("bot")] == []
    # An id not in replace still conflicts, and then nothing is replaced.
    other = crafted.agent_state(b.system_prompt_digest, b.conversation_digest,
                                name="taken", id=b.id).to_row()
    back = crafted.agent_state(a.system_prompt_digest, a.conversation_digest,
                               name="bot", id=a.id).to_row()
    with pytest.raises(immagent.ConflictError):
        await store.commit([], [back, other], replace=[a.id])
    assert [(await store.load_agent(i)).name for i in (a.id, b.id)] == ["renamed", "other"]


async def test_concurrent_steps_from_one_agent_make_siblings(store: Store) -> None:
    agent = await store.create_agent("bot", PROMPT, "m")
    steps = await asyncio.gather(*(store.append(agent, turn(i)) for i in range(50)))
    assert len({s.id for s in steps}) == 50
    assert all(s.parent_id == agent.id for s in steps)
    store.clear_cache()
    for i, s in enumerate(await store.load_agents([s.id for s in steps])):
        assert await s.get_messages() == tuple(turn(i))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"name": 42}, "name"),
    ({"system_prompt": ""}, "system_prompt"),
    ({"system_prompt": "x\x00"}, "system_prompt"),
    ({"model": " "}, "model"),
    ({"model": None}, "model"),
    ({"model_config": {"temperature": float("inf")}}, "model_config.temperature"),
    ({"model_config": ["not", "a", "map"]}, "model_config"),
    ({"model_config": {"api_key": "sk-secret"}}, "model_config"),
    ({"metadata": {1: "x"}}, "metadata"),
])
async def test_bad_input_is_rejected_and_writes_nothing(
        store: Store, store_dsn: str, kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"name": "bot", "system_prompt": PROMPT, "model": "m", **kwargs}
    with pytest.raises(immagent.ValidationError) as err:
        await store.create_agent(**args)  # type: ignore[arg-type]
    assert err.value.field == field and field.split(".")[0] in str(err.value)
    assert count_rows(store_dsn, "immagent_states") == 0 and assets(store_dsn) == 0


async def test_unknown_and_malformed_ids(store: Store) -> None:
    with pytest.raises(immagent.AgentNotFoundError) as err:
        await store.load_agent(uuid.uuid4())
    assert "agent not found" in str(err.value)
    with pytest.raises(immagent.ValidationError) as bad:
        await store.load_agent("not-a-uuid")
    assert bad.value.field == "agent_id" and "not-a-uuid" in str(bad.value)
    with pytest.raises(immagent.ValidationError):
        await store.list_agents(limit=0)
    with pytest.raises(immagent.ValidationError):
        await store.list_agents(offset=-1)


async def test_step_onto_a_swept_history_fails_cleanly(store: Store, store_dsn: str) -> None:
    agent = await store.append(await store.create_agent("bot", PROMPT, "m"), turn(1))
    await store.delete(agent)
    await store.gc()
    store.clear_cache()
    rows = count_rows(store_dsn, "immagent_states")
    with pytest.raises(immagent.AssetNotFoundError):
        await store.append(agent, turn(2))
    assert count_rows(store_dsn, "immagent_states") == rows


async def test_unbound_agent_and_closed_store(store_dsn: str) -> None:
    loose = PersistentAgent(AgentRecord(
        id=uuid.uuid4(), created_at=datetime.now(UTC), name="x", parent_id=None, model="m",
        model_config={}, metadata={}, digest=b"0" * 32, system_prompt=b"1" * 32,
        conversation=b"2" * 32))
    with pytest.raises(immagent.AgentNotRegisteredError):
        await loose.get_messages()
    s = await Store.connect(store_dsn, min_size=1, max_size=2)
    await s.init_schema()
    agent = await s.create_agent("bot", PROMPT, "m")
    assert await s.ping()
    await s.close()
    await s.close()  # idempotent
    assert not await s.ping()
    with pytest.raises(immagent.StoreClosedError):
        await agent.clone()
    with pytest.raises(immagent.StoreClosedError):
        await s.create_agent("bot", PROMPT, "m")


async def test_init_schema_is_idempotent_and_refuses_unknown_versions(
        store: Store, store_dsn: str) -> None:
    await store.init_schema()
    await store.init_schema()
    await _set_schema_version(store_dsn, 999)
    try:
        with pytest.raises(immagent.SchemaVersionError) as err:
            await store.init_schema()
        assert "999" in str(err.value)
    finally:
        await _set_schema_version(store_dsn, None)


async def _set_schema_version(dsn: str, version: int | None) -> None:
    raw_sql(dsn, f"DELETE FROM immagent_schema WHERE version <> {SCHEMA_VERSION}"
            if version is None
            else f"INSERT INTO immagent_schema (version) VALUES ({version})")


async def test_stats_report_sharing(store: Store) -> None:
    base = await store.create_agent("bot", PROMPT, "m")
    for i in range(10):
        base = await store.append(base, turn(i))
    for _ in range(5):
        await base.clone()
    assert await store.message_counts([base, (await base.get_lineage())[0]]) == [20, 0]
    stats = await store.stats()
    assert stats.agents == 16
    assert stats.assets_by_kind["message"][0] == 20
    assert stats.logical_bytes > 5 * stats.assets_by_kind["message"][1]
    assert stats.sharing_ratio > 1 and stats.disk_bytes > 0
    assert stats.states_by_kind == {"agent_state": 16}
    # States of other clients are counted by kind, not as agents, and their content is
    # part of the logical size: a copy per state of the items it holds.
    log = SessionLog(store, "s-1")
    hi, hello = check_items([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}])
    await log.append([hi])
    await log.append([hello])
    before = stats.logical_bytes
    stats = await store.stats()
    assert stats.agents == 16
    assert stats.states_by_kind == {"agent_state": 16, "session_state": 2}
    assert stats.logical_bytes == before + len(hi.body) + len(hi.body) + len(hello.body)


async def test_connect_errors_are_clear_and_hide_the_password() -> None:
    with pytest.raises(immagent.StoreConnectionError) as err:
        await Store.connect("postgresql://bob:s3cret@127.0.0.1:1/nowhere")
    assert "s3cret" not in str(err.value) and "127.0.0.1:1" in str(err.value)
    assert err.value.__cause__ is None  # the driver error (and its DSN) is not chained
    with pytest.raises(immagent.ValidationError) as bad:
        await Store.connect("mysql://x")
    assert bad.value.field == "dsn"
    with pytest.raises(immagent.ValidationError):
        await Store.connect("")


async def test_tables_missing_gives_schema_error(pg_dsn: str) -> None:
    import psycopg

    name = f"immagent_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=name)
        async with await Store.connect(dsn, min_size=1) as s:
            with pytest.raises(immagent.SchemaMissingError) as err:
                await s.create_agent("bot", PROMPT, "m")
            assert "init_schema" in str(err.value)
            with pytest.raises(immagent.SchemaMissingError):
                await s.check_schema()
            await s.init_schema()
            await s.check_schema()
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


@pytest.mark.parametrize("bad", [
    [Message(role="system", content="x")],  # type: ignore[arg-type]
    [Message(role="user", content=3)],  # type: ignore[arg-type]
    [Message(role="user", content="\ud800")],
    [{"role": "user", "content": "x"}],
    Message(role="user", content="x"),
    [],
])
async def test_append_rejects_what_could_not_be_read_back(
        store: Store, store_dsn: str, bad: object) -> None:
    agent = await store.create_agent("bot", PROMPT, "m")
    before = (count_rows(store_dsn, "immagent_states"), assets(store_dsn))
    with pytest.raises(immagent.ValidationError) as err:
        await store.append(agent, bad)  # type: ignore[arg-type]
    assert err.value.field.startswith("messages")
    assert (count_rows(store_dsn, "immagent_states"), assets(store_dsn)) == before


async def test_unsupported_dsn_never_echoes_a_password() -> None:
    with pytest.raises(immagent.ValidationError) as err:
        await Store.connect("postgresql+psycopg://bob:S3cretPW@db.example/prod")
    assert "S3cretPW" not in str(err.value) and err.value.value is None
    assert "postgresql+psycopg://" in str(err.value)


async def test_batches_larger_than_the_cache_are_served(store_dsn: str) -> None:
    # A cache far smaller than one batch of heads.
    async with await Store.connect(store_dsn, cache_entries=3) as store:
        await store.init_schema()
        agents = [await store.create_agent("bot", f"prompt {i}", "m") for i in range(12)]
        steps = [await store.append(a, turn(i)) for i, a in enumerate(agents)]
        store.clear_cache()
        assert await store.message_counts(steps) == [2] * 12
        assert (await store.stats(page_size=5)).agents == 24


async def test_cyclic_or_too_deep_metadata_is_rejected(store: Store) -> None:
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    deep: dict[str, object] = {}
    node = deep
    for _ in range(100):
        node["x"] = node = {}
    for bad in (cyclic, deep):
        with pytest.raises(immagent.ValidationError) as err:
            await store.create_agent("bot", PROMPT, "m", metadata=bad)
        assert err.value.field.startswith("metadata")
    with pytest.raises(immagent.ValidationError) as secret:
        await store.create_agent("bot", PROMPT, "m", model_config={"api_base": "http://x"})
    assert secret.value.field == "model_config" and "api_base" in str(secret.value)
