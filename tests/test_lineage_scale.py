"""Deleting a long lineage is linear (issue 20, item 5): PostgreSQL's one-statement
``delete_states(stop_at_shared=True)`` looked up each position's predecessor with a
subquery over the whole line, so 100,001 states took 455 s. Measured as the rows its plan
processed (``tests.pg_work``), never as seconds; the rule itself (stop at the first
ancestor another state descends from) is checked on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

from immagent import PersistentAgent, Store
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest
from tests.pg_work import explained_store, statement, work


async def _lineage(store: Store, states: int) -> PersistentAgent:
    """A lineage of ``states`` agent states (metadata steps: one row each, no assets),
    committed in batches."""
    agent = await store.create_agent("long", "You go on.", "m")
    record = agent.record
    batch = []
    for i in range(states - 1):
        record = AgentRecord(
            id=uuid7(), parent_id=record.id, created_at=datetime.now(UTC), name=record.name,
            model=record.model, system_prompt=record.system_prompt,
            conversation=record.conversation, model_config={}, metadata={"i": i},
            digest=state_digest(record.name, record.model, record.system_prompt,
                                record.conversation, {}, {"i": i}))
        batch.append(record.to_row())
        if len(batch) == 1000:
            await store.commit([], batch)
            batch = []
    await store.commit([], batch)
    return await store.load_agent(record.id)


async def test_deleting_a_lineage_stops_at_a_shared_ancestor(store: Store) -> None:
    head = await _lineage(store, 1_500)
    line = await store.ancestors(head)
    branch = await store.with_metadata(line[1_000], {"branch": True})  # a second child
    deleted = await store.delete_lineage(head)
    assert deleted == [s.id for s in line[:1_000]]  # newest first, up to the shared one
    assert [a.id for a in await store.ancestors(branch)][1:] == [s.id for s in line[1_000:]]


async def _delete_work(dsn: str, states: int) -> int:
    async with explained_store(dsn) as (store, plans):
        head = await _lineage(store, states)
        assert len(await store.delete_lineage(head)) == states
        return work(statement(plans, "DELETE FROM immagent_states s USING line"))


async def test_postgres_lineage_deletion_processes_rows_linearly(pg_store_dsn: str) -> None:
    small = await _delete_work(pg_store_dsn, 500)
    large = await _delete_work(pg_store_dsn, 2_000)
    # Before: ~n²/2 rows (a scan of the line per position): 4x the states, ~16x the rows.
    assert large < 6 * small, (small, large)
    assert large < 40 * 2_000, large
