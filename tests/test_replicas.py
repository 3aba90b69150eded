"""Read replicas on real servers: a primary and a hot standby streaming from it
(tests/pg_cluster.py). Which server answered is counted with pg_stat_statements on each, so
every routing claim is checked on the server that ran the statement."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import cast

import psycopg
import pytest
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata

from immagent import AgentNotFoundError, IntegrityError, Message, PersistentAgent, Store
from immagent.cli.app import main
from immagent.cli.database import resolve
from immagent.cli.errors import CLIError
from immagent.exceptions import ValidationError
from immagent.integrations.langgraph import ImmAgentSaver
from immagent.store.replicas import least_busy
from tests.cluster_store import CHAIN, GET_STATES, LINEAGE, SCAN, empty_store
from tests.conftest import raw_sql, turn
from tests.pg_cluster import PgCluster
from tests.test_langgraph import _checkpoint, _config


@pytest.fixture
def cluster(pg_cluster_db: PgCluster) -> PgCluster:
    """The cluster with an empty immagent store, replayed on the standby."""
    return empty_store(pg_cluster_db)


async def replicated(cluster: PgCluster, *replicas: str) -> Store:
    return await Store.connect(cluster.primary, replicas=list(replicas) or [cluster.standby],
                               min_size=1, max_size=4)


async def agent_with_turns(store: Store, name: str, turns: int = 3) -> PersistentAgent:
    agent = await store.create_agent(name, f"You are {name}.", "immagent/echo")
    for i in range(turns):
        agent = await store.append(agent, turn(i, name))
    return agent


async def read_all(store: Store, ids: list[uuid.UUID]) -> list[tuple[Message, ...]]:
    """Cold reads: the states, their conversations and their lineages."""
    store.clear_cache()
    agents = await store.load_agents(ids)
    for agent in agents:
        assert len(await store.ancestors(agent)) >= 1
    return [await agent.get_messages() for agent in agents]


# -- the policy -----------------------------------------------------------------------------


def test_the_least_busy_replica_is_chosen_and_ties_rotate() -> None:
    assert least_busy([3, 1, 2], 0) == 1
    assert least_busy([None, 5, None], 0) == 1  # only usable ones count, however busy
    assert least_busy([None, None], 1) is None
    # Ties go to the first at or after the turn, so a rotating turn is round robin.
    assert [least_busy([0, 0, 0], turn) for turn in range(4)] == [0, 1, 2, 0]
    assert least_busy([1, 0, 0], 0) == 1 and least_busy([1, 0, 0], 2) == 2


# -- routing ----------------------------------------------------------------------------


async def test_reads_are_served_by_the_replica_and_lag_blind_ones_by_the_primary(
        cluster: PgCluster) -> None:
    async with await replicated(cluster) as store:
        agents = [await agent_with_turns(store, f"r{i}") for i in range(4)]
        expected = [await a.get_messages() for a in agents]
        cluster.wait_caught_up()
        cluster.reset_stats()
        assert await read_all(store, [a.id for a in agents]) == expected
        assert len(await store.list_agents()) == 16  # every state of the 4 agents
    assert cluster.calls("standby", GET_STATES) == 1  # one batched load_agents
    assert cluster.calls("standby", CHAIN) == 4
    assert cluster.calls("standby", LINEAGE) == 4
    for pattern in (GET_STATES, CHAIN, LINEAGE):
        assert cluster.calls("primary", pattern) == 0, pattern
    # A scan could not tell a stale page from a whole one: it stays on the primary.
    assert cluster.calls("primary", SCAN) >= 1 and cluster.calls("standby", SCAN) == 0


async def test_without_replicas_the_standby_serves_nothing(cluster: PgCluster) -> None:
    async with await Store.connect(cluster.primary, min_size=1, max_size=2) as store:
        agent = await agent_with_turns(store, "solo")
        cluster.wait_caught_up()
        cluster.reset_stats()
        await read_all(store, [agent.id])
    assert cluster.calls("standby", CHAIN) == 0 and cluster.calls("primary", CHAIN) == 1


async def test_ties_between_replicas_rotate(cluster: PgCluster) -> None:
    # The primary stands in as a second replica (it is never behind): sequential reads
    # alternate between the two.
    async with await replicated(cluster, cluster.standby, cluster.primary) as store:
        agent = await agent_with_turns(store, "rr")
        cluster.wait_caught_up()
        cluster.reset_stats()
        for _ in range(6):
            await read_all(store, [agent.id])
    assert cluster.calls("standby", GET_STATES) == 3
    assert cluster.calls("primary", GET_STATES) == 3


# -- lag: read-your-writes ------------------------------------------------------------------


async def test_what_was_just_written_is_found_through_the_primary_while_replay_lags(
        cluster: PgCluster) -> None:
    async with await replicated(cluster) as store:
        with cluster.replay_paused():
            agent = await agent_with_turns(store, "fresh")
            expected = await agent.get_messages()
            cluster.reset_stats()
            (history,) = await read_all(store, [agent.id])
            assert history == expected
            line = await store.ancestors(agent.id)
            assert line[0].id == agent.id and len(line) == 4  # created + 3 steps
    # Each read was tried on the standby, missed there, and answered by the primary.
    assert cluster.calls("standby", LINEAGE) == cluster.calls("primary", LINEAGE) == 2
    for pattern in (GET_STATES, CHAIN):
        assert cluster.calls("standby", pattern) == 1, pattern
        assert cluster.calls("primary", pattern) == 1, pattern


async def test_a_deleted_state_is_not_read_back_from_a_lagging_replica(
        cluster: PgCluster) -> None:
    async with await replicated(cluster) as store:
        gone, kept = (await agent_with_turns(store, "gone"), await agent_with_turns(store, "kept"))
        cluster.wait_caught_up()
        with cluster.replay_paused():
            await store.delete(gone)
            store.clear_cache()
            cluster.reset_stats()
            with pytest.raises(AgentNotFoundError):
                await store.load_agent(gone.id)  # the standby still has it
            await read_all(store, [kept.id])
            # Behind the delete, the replica serves nothing; its replay position was read.
            assert cluster.calls("standby", GET_STATES) == 0
            assert cluster.calls("standby", CHAIN) == 0
            assert cluster.calls("primary", GET_STATES) == 2
        cluster.wait_caught_up()

        deadline = time.monotonic() + 20  # a quiet primary may need its next WAL record
        while True:
            cluster.reset_stats()
            await read_all(store, [kept.id])
            if cluster.calls("standby", GET_STATES) == 1:
                break
            assert time.monotonic() < deadline, "the replica never served reads again"
            await asyncio.sleep(0.1)
        with pytest.raises(AgentNotFoundError):
            await store.load_agent(gone.id)


async def test_a_replaced_checkpoint_is_not_read_back_from_a_lagging_replica(
        cluster: PgCluster) -> None:
    async with await replicated(cluster) as store:
        checkpoint = _checkpoint({"x": 1}, {"x": 1})
        md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
        config = await ImmAgentSaver(store).aput(_config("t"), checkpoint, md, {"x": 1})
        cluster.wait_caught_up()
        with cluster.replay_paused():
            changed = cast(Checkpoint, {**checkpoint, "channel_values": {"x": 2}})
            await ImmAgentSaver(store).aput(_config("t"), changed, md, {"x": 1})
            cluster.reset_stats()
            got = await ImmAgentSaver(store).aget_tuple(config)  # the standby has the old row
            assert got is not None and got.checkpoint["channel_values"] == {"x": 2}
            assert cluster.calls("standby", GET_STATES) == 0
        cluster.wait_caught_up()


# -- failures ---------------------------------------------------------------------------


async def test_a_replica_stopped_mid_run_never_fails_a_read(cluster: PgCluster) -> None:
    async with await replicated(cluster) as store:
        agents = [await agent_with_turns(store, f"s{i}") for i in range(4)]
        expected = [await a.get_messages() for a in agents]
        ids = [a.id for a in agents]
        cluster.wait_caught_up()
        assert await read_all(store, ids) == expected  # pools hold live standby connections
        with cluster.standby_stopped():
            store.clear_cache()
            for _ in range(3):  # concurrent cold reads over dead replica connections
                results = await asyncio.gather(*(read_all(store, ids) for _ in range(8)))
                assert all(r == expected for r in results)
            more = await store.append(agents[0], turn(7, "while down"))
            assert len(await (await store.load_agent(more.id)).get_messages()) == 8
        deadline = time.monotonic() + 60  # reconnect backoff: 0.5 s doubling
        while True:
            cluster.reset_stats()
            assert await read_all(store, ids) is not None
            if cluster.calls("standby", GET_STATES) == 1:
                break
            assert time.monotonic() < deadline, "the replica was never used again"
            await asyncio.sleep(0.2)


async def test_an_unreachable_replica_at_connect_is_no_error(cluster: PgCluster) -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/nowhere"
    started = time.monotonic()
    async with await replicated(cluster, nowhere) as store:
        agent = await agent_with_turns(store, "alone")
        (history,) = await read_all(store, [agent.id])
        assert history == await agent.get_messages()
    assert time.monotonic() - started < 10


async def test_replica_dsns_are_checked_before_connecting() -> None:
    cases: list[tuple[object, str]] = [
        ("postgresql://x@127.0.0.1:1/db", "replicas"),
        (["mysql://x"], "replicas[0]"),
        (["postgresql://x@127.0.0.1:1/db", "replica.db"], "replicas[1]"),
        (["postgresql://x@127.0.0.1:1/db?prepare_threshold=soon"], "replicas[0]"),
    ]
    for replicas, field in cases:
        with pytest.raises(ValidationError) as info:
            await Store.connect("postgresql://x@127.0.0.1:1/db",
                                replicas=replicas)  # type: ignore[arg-type]
        assert info.value.field == field, (replicas, info.value)
    with pytest.raises(ValidationError, match="need a postgresql:// primary") as info:
        await Store.connect("memory://", replicas=["postgresql://x@127.0.0.1:1/db"])
    assert info.value.field == "replicas"


# -- a bad replica cannot answer wrongly ------------------------------------------------


@pytest.fixture
def impostor(cluster: PgCluster) -> Iterator[str]:
    """Another database on the primary's server posing as a replica: rows can be made to
    differ from the primary's there, as a broken or tampered replica would."""
    name = f"immagent_fake_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.primary, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    fake = cluster.with_database(name)
    empty_store(fake)
    yield fake.primary
    with psycopg.connect(cluster.primary, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def copy_rows(source: str, target: str) -> None:
    for table, columns in (("immagent_assets", "digest, kind, codec, refs, body"),
                           ("immagent_nodes", "loc, kind, codec, count, depth, digest, "
                                              "parent, refs, peaks, body"),
                           ("immagent_states", "id, parent_id, kind, stream, refs, digest, "
                                               "created_at, body")):
        rows = raw_sql(source, f"SELECT {columns} FROM {table}")
        marks = ", ".join(["%s"] * len(columns.split(",")))
        for row in rows:
            raw_sql(target, f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row))


async def test_a_tampered_replica_row_fails_loudly(cluster: PgCluster, impostor: str) -> None:
    async with await replicated(cluster, impostor) as store:
        agent = await agent_with_turns(store, "victim")
        copy_rows(cluster.primary, impostor)
        raw_sql(impostor, "UPDATE immagent_nodes SET body = body || '\\x00'::bytea "
                          "WHERE count > 0")  # the rows holding the messages
        store.clear_cache()
        loaded = await store.load_agent(agent.id)
        with pytest.raises(IntegrityError):
            await loaded.get_messages()


async def test_a_replica_missing_rows_is_completed_by_the_primary(
        cluster: PgCluster, impostor: str) -> None:
    async with await replicated(cluster, impostor) as store:
        agent = await agent_with_turns(store, "holes", turns=4)
        expected = await agent.get_messages()
        copy_rows(cluster.primary, impostor)
        # A chain with a hole in the middle, and the state's parent gone.
        (node,) = raw_sql(impostor, "SELECT loc FROM immagent_nodes WHERE digest = %s",
                          [agent.conversation_digest])
        raw_sql(impostor, "DELETE FROM immagent_nodes WHERE loc = %s", [int(node[0]) - 1])
        raw_sql(impostor, "DELETE FROM immagent_states WHERE id = %s", [agent.parent_id])
        store.clear_cache()
        loaded = await store.load_agent(agent.id)
        assert await loaded.get_messages() == expected
        assert len(await store.ancestors(agent.id)) == 5


# -- the command line -------------------------------------------------------------------


def test_cli_replicas_belong_to_the_database_they_come_with() -> None:
    primary, other = "postgresql://u@p/db", "postgresql://u@o/db"
    r1, r2 = "postgresql://u@r1/db", "postgresql://u@r2/db"
    env = {"IMMAGENT_DB": primary, "IMMAGENT_REPLICAS": f" {r1}\n{r2} "}
    assert resolve(None, env).replicas == (r1, r2)
    assert resolve(other, env).replicas == ()  # --db names another primary
    assert resolve(other, env, [r1]).replicas == (r1,)
    assert resolve(None, {"IMMAGENT_DB": primary}).replicas == ()
    for value, environ, replicas in (("x.db", {}, [r1]), (None, {**env, "IMMAGENT_DB": "x.db"},
                                                           None), (primary, {}, ["y.db"])):
        with pytest.raises(CLIError) as info:
            resolve(value, environ, replicas)
        assert info.value.code == 2


async def test_cli_reads_through_the_replica(cluster: PgCluster,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    async with await replicated(cluster) as store:
        agent = await agent_with_turns(store, "cli")
    cluster.wait_caught_up()
    cluster.reset_stats()
    # The command line runs its own event loop: in a thread, as from a shell.
    code = await asyncio.to_thread(main, ["--db", cluster.primary, "--replica",
                                          cluster.standby, "show", str(agent.id)])
    assert code == 0 and "a2cli" in capsys.readouterr().out
    assert cluster.calls("standby", CHAIN) == 1 and cluster.calls("primary", CHAIN) == 0
