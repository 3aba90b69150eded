"""Concurrent writers of shared content never fail with a deadlock on PostgreSQL (issue 29,
item 1): two graph runs writing the same assets at once could deadlock and the loser saw
``StoreConnectionError … deadlock detected``. Assets are inserted in digest order, so two
writers take their row locks in one order; a deadlock or serialization failure that still
happens (states keep their log order, so two batches of the same states can cross) is the
transient conflict it is: the transaction is run again, a bounded number of times, and
never reported as a connection error.

Each interleaving is forced: a raw connection holds uncommitted rows with the same keys,
both writers queue behind it (pg_locks says when), and its rollback releases them at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from immagent import Message, PersistentAgent, Store
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest
from immagent.rows import join_refs, stored


@pytest.fixture
async def two_stores(pg_store_dsn: str) -> AsyncIterator[list[Store]]:
    stores = [await Store.connect(pg_store_dsn, min_size=1, max_size=2) for _ in range(2)]
    await stores[0].init_schema()
    yield stores
    for s in stores:
        await s.close()


async def _queued(dsn: str, sessions: int, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until ``sessions`` sessions of this database wait for another transaction (or
    a task ended). Other databases' are not counted: the server is shared with other test
    runs, whose waiting sessions ended this wait before the writers had queued, and the
    interleaving was then left to chance."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(1000):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND l.locktype = 'transactionid' "
                "AND a.datname = current_database()")
            row = await cur.fetchone()
            if (row is not None and row[0] >= sessions) or any(t.done() for t in tasks):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the writers never queued behind the held rows")


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("retrying a transaction")]


async def _release_when_queued(dsn: str, held: psycopg.AsyncConnection[Any],
                               tasks: list[asyncio.Task[Any]]) -> list[Any]:
    await _queued(dsn, 2, tasks)
    await held.rollback()  # both writers wake at once
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_writers_of_the_same_assets_in_opposite_orders_do_not_deadlock(
        two_stores: list[Store], pg_store_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="immagent")
    a, b, middle = [Message(role="user", content=f"shared {i}") for i in range(3)]
    row = stored(middle)
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as held:
        await held.execute("INSERT INTO immagent_assets (digest, kind, codec, refs, body) "
                           "VALUES (%s, %s, 0, NULL, %s)", (row.digest, row.kind, row.body))
        # In the orders given, each writer inserts its first asset and queues behind the
        # held middle one; after the rollback, whoever gets it wants the other's first.
        tasks = [asyncio.ensure_future(two_stores[0].commit([a, middle, b])),
                 asyncio.ensure_future(two_stores[1].commit([b, middle, a]))]
        results = await _release_when_queued(pg_store_dsn, held, tasks)
    assert results == [None, None], results
    assert await two_stores[0].get_assets([a.digest, b.digest, middle.digest]) == [
        a, b, middle]
    assert (await two_stores[0].verify()).ok
    # Digest order: the second writer queued behind the first, nobody was rolled back.
    assert _retries(caplog) == []


async def test_a_deadlock_between_writers_is_retried_not_a_connection_error(
        two_stores: list[Store], pg_store_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="immagent")
    agent = await two_stores[0].create_agent("shared", "You are shared.", "m")
    base = agent.record
    records = [AgentRecord(id=uuid7(), parent_id=None, created_at=datetime.now(UTC),
                           name=f"copy{i}", model=base.model, system_prompt=base.system_prompt,
                           conversation=base.conversation, model_config={}, metadata={},
                           digest=state_digest(f"copy{i}", base.model, base.system_prompt,
                                               base.conversation, {}, {}))
               for i in range(3)]
    one, two, middle = (r.to_row() for r in records)
    async with await psycopg.AsyncConnection.connect(pg_store_dsn) as held:
        for s in (middle,):
            await held.execute(
                "INSERT INTO immagent_states (id, parent_id, kind, stream, refs, body, digest, "
                "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (s.id, s.parent_id, s.kind, s.stream, join_refs(s.refs), s.body, s.digest,
                 s.created_at))
        # States keep the order they are given (it is their log order), so these two
        # batches of the same rows cross: each writer inserts its first state and queues
        # behind the held middle one; after the rollback PostgreSQL rolls one back.
        tasks = [asyncio.ensure_future(two_stores[0].commit([], [one, middle, two])),
                 asyncio.ensure_future(two_stores[1].commit([], [two, middle, one]))]
        results = await _release_when_queued(pg_store_dsn, held, tasks)
    assert results == [None, None], results
    got = await two_stores[1].get_states([one.id, two.id, middle.id])
    assert sorted((s.id, s.digest) for s in got) == sorted(
        (s.id, s.digest) for s in (one, two, middle))
    # The deadlock did happen, and was absorbed by one retry of the loser.
    (retry,) = _retries(caplog)
    assert "deadlock detected" in retry


async def test_many_writers_of_overlapping_content_all_commit(
        two_stores: list[Store], caplog: pytest.LogCaptureFixture) -> None:
    """Eight writers on two stores commit turns drawn from one small vocabulary, each in
    its own random order: every write commits, none needed a retry (shared assets are
    locked in one order), and the store verifies."""
    caplog.set_level(logging.DEBUG, logger="immagent")
    vocabulary = [Message(role="user", content=f"word {i} " + "x" * 40) for i in range(40)]

    async def writer(n: int) -> PersistentAgent:
        rng = random.Random(n)
        store = two_stores[n % 2]
        agent = await store.create_agent(f"writer{n}", "You write.", "m")
        for _ in range(25):
            agent = await store.append(agent, rng.sample(vocabulary, 12))
        return agent

    agents = await asyncio.gather(*(writer(n) for n in range(8)))
    assert _retries(caplog) == []
    report = await two_stores[0].verify()
    assert report.ok, report.lines()
    for agent in agents:
        assert len(await agent.get_messages()) == 25 * 12
