"""The store through PgBouncer in transaction pooling mode (tests/pg_cluster.py): advance,
gc and verify from many tasks, and no session state left behind on the server sessions
other clients get next. Plus the DSN parameter that turns prepared statements off."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal

import psycopg
import pytest

from immagent import PersistentAgent, Store
from immagent.exceptions import ValidationError
from immagent.store.postgres import client_options
from tests.cluster_store import empty_store
from tests.conftest import turn
from tests.pg_cluster import PgCluster


@pytest.fixture
def cluster(pg_cluster_db: PgCluster) -> PgCluster:
    return empty_store(pg_cluster_db)


def pooled(cluster: PgCluster) -> str:
    """The PgBouncer DSN with prepared statements off (they belong to one server session)."""
    return f"{cluster.bouncer} prepare_threshold=none"


def transactions(cluster: PgCluster) -> Decimal:
    """Transactions PgBouncer has passed to this cluster database so far (it lists a
    database once a client has used it)."""
    return sum((Decimal(r["total_xact_count"]) for r in cluster.bouncer_admin("SHOW STATS")
                if r["database"] == cluster.dbname), Decimal(0))


async def test_advance_gc_and_verify_through_pgbouncer_from_many_tasks(
        cluster: PgCluster) -> None:
    before = transactions(cluster)
    tasks, steps = 12, 5
    async with await Store.connect(pooled(cluster), min_size=2, max_size=6) as store:
        agents = [await store.create_agent(f"p{i}", "You answer.", "immagent/echo")
                  for i in range(tasks)]
        stop = asyncio.Event()

        async def chat(agent: PersistentAgent) -> PersistentAgent:
            for i in range(steps):
                agent = await agent.advance(f"hello {agent.name} {i}")
            return agent

        async def churn() -> int:  # lineages made and deleted while gc loops
            made = 0
            while not stop.is_set():
                tmp = await store.create_agent("tmp", f"temporary {made}", "immagent/echo")
                await store.delete_lineage(await store.append(tmp, turn(made, "tmp")))
                made += 1
            return made

        async def collect() -> int:
            removed = 0
            while not stop.is_set():
                removed += (await store.gc()).assets_removed
                await asyncio.sleep(0.01)
            return removed

        background = [asyncio.create_task(churn()), asyncio.create_task(collect())]
        try:
            finals = await asyncio.gather(*(chat(a) for a in agents))
        finally:
            stop.set()
            made, removed = await asyncio.gather(*background)
        removed += (await store.gc()).assets_removed
        assert made > 0 and removed > 0
        report = await store.verify()
        assert report.problems == 0, report
        store.clear_cache()
        for agent in finals:
            messages = await (await store.load_agent(agent.id)).get_messages()
            assert [m.content for m in messages[-2:]] == [
                f"hello {agent.name} {steps - 1}", f"Echo: hello {agent.name} {steps - 1}"]
            assert len(messages) == 2 * steps
        clients = [c for c in cluster.bouncer_admin("SHOW CLIENTS")
                   if c["database"] == cluster.dbname]
        assert clients, "the store's connections are not PgBouncer clients"
    assert transactions(cluster) - before >= tasks * steps


async def test_the_store_leaves_no_session_state_on_the_server_connections(
        cluster: PgCluster) -> None:
    async with await Store.connect(pooled(cluster), min_size=4, max_size=4) as store:
        agent = await store.create_agent("s", "You answer.", "immagent/echo")
        for i in range(8):  # enough repeats for psycopg to prepare, were it allowed to
            agent = await store.append(agent, turn(i))
            await store.load_agents([agent.id])
        await store.gc()
        assert (await store.verify()).problems == 0
    # Every server connection PgBouncer holds, each pinned by an open transaction of a
    # client of its own: none kept a setting or a prepared statement of ours.
    with contextlib.ExitStack() as stack:
        seen = []
        for _ in range(20):  # PgBouncer's pool size in pg-cluster.sh
            conn = stack.enter_context(psycopg.connect(cluster.bouncer, prepare_threshold=None))
            row = conn.execute("SELECT pg_backend_pid(), current_setting('jit'), "
                               "(SELECT count(*) FROM pg_prepared_statements)").fetchone()
            assert row is not None
            seen.append(row)
        assert len({pid for pid, _, _ in seen}) == len(seen)  # all distinct sessions
        assert {(jit, prepared) for _, jit, prepared in seen} == {("on", 0)}


def test_prepare_threshold_is_read_from_the_dsn_and_hidden_from_libpq() -> None:
    assert client_options("postgresql://u@h:6432/db?prepare_threshold=none") == (
        "postgresql://u@h:6432/db", {"prepare_threshold": None})
    assert client_options("postgresql://u@h/db?sslmode=disable&prepare_threshold=0&x=1") == (
        "postgresql://u@h/db?sslmode=disable&x=1", {"prepare_threshold": 0})
    assert client_options("host=h prepare_threshold='None' dbname=db") == (
        "host=h dbname=db", {"prepare_threshold": None})
    assert client_options("prepare_threshold=7 host=h") == ("host=h", {"prepare_threshold": 7})
    assert client_options("postgresql://u@h/db") == ("postgresql://u@h/db", {})
    assert client_options("host=h dbname=my_prepare_threshold=1") == (
        "host=h dbname=my_prepare_threshold=1", {})
    for bad in ("postgresql://h/db?prepare_threshold=-1", "host=h prepare_threshold=off"):
        with pytest.raises(ValidationError) as info:
            client_options(bad)
        assert info.value.field == "dsn"


async def test_a_bad_prepare_threshold_fails_before_connecting() -> None:
    with pytest.raises(ValidationError, match="prepare_threshold"):
        await Store.connect("postgresql://x@127.0.0.1:1/db?prepare_threshold=yes")
