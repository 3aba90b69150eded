"""Re-puts of a checkpoint id (LangGraph's savers upsert) racing other writes of one thread:
nothing acknowledged is ever written over, the order stays LangGraph's (newest id first),
and no writer gets a spurious error. PostgreSQL interleavings are forced as tests/test_gc.py
forces them: a raw connection X freezes one writer at a chosen statement, a third one
watches pg_locks until the other writer has run or queued."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import psycopg
import pytest
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    empty_checkpoint,
)
from langgraph.checkpoint.base.id import uuid6

from immagent import Store, checkpoints
from immagent.assets import Kind, Value
from immagent.integrations.langgraph import ImmAgentSaver

MD: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}


def _config(checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": "t", "checkpoint_ns": ""}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(x: int) -> Checkpoint:
    c = empty_checkpoint()
    c["id"] = str(uuid6(clock_seq=-1))
    c["channel_values"] = {"x": x}
    c["channel_versions"] = cast(ChannelVersions, {"x": 1})
    return c


async def _write(saver: ImmAgentSaver, checkpoint: Checkpoint, x: int) -> None:
    """Put ``checkpoint``'s id (again) with ``x`` as its value."""
    changed = cast(Checkpoint, {**checkpoint, "channel_values": {"x": x}})
    await saver.aput(_config(), changed, MD, cast(ChannelVersions, {"x": 1}))


async def _thread(saver: ImmAgentSaver) -> list[tuple[str, int]]:
    """(checkpoint id, x) of the thread, as listed (newest first)."""
    return [(t.checkpoint["id"], t.checkpoint["channel_values"]["x"])
            async for t in saver.alist(_config())]


async def _seeded(store: Store, n: int) -> list[Checkpoint]:
    saver = ImmAgentSaver(store)
    made = [_checkpoint(i) for i in range(n)]
    for c in made:
        await _write(saver, c, int(c["channel_values"]["x"]))
    return made


# -- both backends: savers on two connections, interleaved by the event loop ---------------


async def test_a_reput_never_writes_back_another_checkpoints_older_content(
        store: Store, store_dsn: str) -> None:
    # Each saver re-puts its own checkpoint again and again; a re-put of one id must never
    # write the other's content back as it read it (the other's acknowledged writes win).
    first, second, third = await _seeded(store, 3)
    async with await Store.connect(store_dsn, min_size=1, max_size=2) as elsewhere:
        savers = [ImmAgentSaver(store), ImmAgentSaver(elsewhere), ImmAgentSaver(store)]

        async def reputs(saver: ImmAgentSaver, checkpoint: Checkpoint, base: int) -> None:
            for i in range(15):
                await _write(saver, checkpoint, base + i)
                await asyncio.sleep(0)

        await asyncio.gather(reputs(savers[0], first, 100), reputs(savers[1], second, 200),
                             reputs(savers[2], third, 300))
    assert await _thread(ImmAgentSaver(store)) == [
        (third["id"], 314), (second["id"], 214), (first["id"], 114)]
    assert (await store.verify()).ok


async def test_many_savers_reputting_and_putting_at_once_never_conflict(
        store: Store, store_dsn: str) -> None:
    # Load: four savers (two connections) put new checkpoints and re-put random ones of one
    # thread at once. No ConflictError or StaleStreamError reaches a caller; every id ends
    # with a value one of its writers wrote last; the thread lists newest id first.
    seeded = await _seeded(store, 4)
    rng = random.Random(7)
    last: dict[str, dict[int, int]] = {c["id"]: {} for c in seeded}  # id -> writer -> x
    made: list[Checkpoint] = list(seeded)
    errors: list[BaseException] = []
    async with await Store.connect(store_dsn, min_size=1, max_size=3) as elsewhere:

        async def writer(n: int, saver: ImmAgentSaver) -> None:
            for i in range(20):
                x = 1000 * (n + 1) + i
                if n == 0 and i % 3 == 0:  # one writer adds checkpoints, as a graph run does
                    made.append(fresh := _checkpoint(x))
                    last[fresh["id"]] = {}
                    target = fresh
                else:
                    target = rng.choice(made)
                try:
                    await _write(saver, target, x)
                except Exception as e:  # the assertion below names it
                    errors.append(e)
                    return
                last[target["id"]][n] = x
                await asyncio.sleep(0)

        await asyncio.gather(*(writer(n, ImmAgentSaver(store if n % 2 else elsewhere))
                               for n in range(4)))
    assert not errors, errors
    listed = await _thread(ImmAgentSaver(store))
    assert [i for i, _ in listed] == sorted(last, reverse=True)
    for checkpoint_id, x in listed:
        assert x in last[checkpoint_id].values() or not last[checkpoint_id], checkpoint_id
    assert (await store.verify()).ok


# -- PostgreSQL: every interleaving of two writers, forced ----------------------------------
#
# Four operations on a seeded thread (c0 < c1 < c2 by id): N puts a new checkpoint; R0
# re-puts c0 by the saver that wrote it (it knows the row: it replaces at once); R1 re-puts
# c1; F0 puts c0 again from a new saver (its plain insert conflicts, then it replaces). The
# first operation is frozen by X at one of its statements, the second runs to its end or
# until it queues, then X lets go.

#: Where X freezes the first writer: inserting its value asset (before it touches a state
#: row), deleting the row it replaces (holding its id's lock), or inserting its new state
#: row (N only: its log position is already taken).
FREEZES = {"N": ("asset", "insert"), "R0": ("asset", "delete"), "R1": ("asset", "delete"),
           "F0": ("asset",)}
CASES = [(op, at, other) for op, points in FREEZES.items() for at in points
         for other in FREEZES if other != op or op != "N"]


@pytest.fixture
async def two_stores(pg_store_dsn: str) -> AsyncIterator[list[Store]]:
    stores = [await Store.connect(pg_store_dsn, min_size=1, max_size=2) for _ in range(2)]
    await stores[0].init_schema()
    yield stores
    for s in stores:
        await s.close()


#: Sessions of this test's database waiting for a lock (the server is shared: sessions of
#: other databases must not count).
_WAITING = ("SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE NOT l.granted AND a.datname = current_database()")


async def _until_queued(dsn: str, task: asyncio.Task[Any]) -> None:
    """Wait until some session of this database waits for a lock, or ``task`` has
    finished."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(1000):
            cur = await conn.execute(_WAITING)
            row = await cur.fetchone()
            if (row is not None and row[0] > 0) or task.done():
                return
            await asyncio.sleep(0.01)
    raise AssertionError("nobody queued on a lock")


async def _freeze(x: psycopg.AsyncConnection[Any], saver: ImmAgentSaver, at: str,
                  checkpoint: Checkpoint, value: int) -> None:
    """Make X hold what the write of ``checkpoint`` with ``value`` will wait for."""
    if at == "asset":  # X inserts the write's new value asset, uncommitted
        kind, data = saver.serde.dumps_typed(value)
        leaf = Value(type=kind, data=data)
        await x.execute("INSERT INTO immagent_assets (digest, kind, refs, body) "
                        "VALUES (%s, %s, NULL, %s)", (leaf.digest, int(leaf.kind), leaf.body))
    elif at == "delete":  # X locks the row the write replaces
        state_id = checkpoints.checkpoint_state_id("t", "", checkpoint["id"])
        await x.execute("SELECT 1 FROM immagent_states WHERE id = %s FOR UPDATE", (state_id,))
    else:  # X inserts the write's own state id, uncommitted: the write waits at its insert
        state_id = checkpoints.checkpoint_state_id("t", "", checkpoint["id"])
        await x.execute("INSERT INTO immagent_states (id, kind, stream, refs, digest, "
                        "created_at, body) VALUES (%s, %s, 't', '', %s, now(), '')",
                        (state_id, int(Kind.CHECKPOINT), b"\x00" * 32))


@pytest.mark.parametrize(("first", "at", "second"), CASES,
                         ids=[f"{a}@{b}-then-{c}" for a, b, c in CASES])
async def test_two_writers_in_every_forced_order(
        two_stores: list[Store], pg_store_dsn: str, first: str, at: str,
        second: str) -> None:
    one, two = two_stores
    seeded = await _seeded(one, 3)
    knowing = [ImmAgentSaver(one), ImmAgentSaver(two)]
    for saver in knowing:  # both know every row, as the savers that wrote them would
        await _thread(saver)
    new = _checkpoint(-1)
    values = {"N": 500, "R0": 600, "R1": 700, "F0": 800}
    targets = {"N": new, "R0": seeded[0], "R1": seeded[1], "F0": seeded[0]}

    def run(op: str, side: int) -> Callable[[], Awaitable[None]]:
        value = values[op] + side
        saver = ImmAgentSaver(two_stores[side]) if op == "F0" else knowing[side]
        return lambda: _write(saver, targets[op], value)

    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await _freeze(x, knowing[0], at, targets[first], values[first])
        frozen = asyncio.ensure_future(run(first, 0)())
        await _until_queued(pg_store_dsn, frozen)
        assert not frozen.done(), "X did not freeze the first writer"
        other = asyncio.ensure_future(run(second, 1)())
        # The second writer either finishes or queues behind the first (or behind X).
        for _ in range(500):
            if other.done() or await _waiting(pg_store_dsn) >= 2:
                break
            await asyncio.sleep(0.01)
        second_done_first = other.done()
        await x.rollback()
        await asyncio.gather(frozen, other)
    finally:
        await x.close()
    # What each id must hold: the seeded value, then each write in commit order (the
    # second writer committed first exactly when it finished while the first was frozen).
    expected = {c["id"]: int(c["channel_values"]["x"]) for c in seeded}
    order = [(second, 1), (first, 0)] if second_done_first else [(first, 0), (second, 1)]
    for op, side in order:
        expected[targets[op]["id"]] = values[op] + side
    listed = await _thread(ImmAgentSaver(one))
    assert listed == sorted(expected.items(), reverse=True)
    assert (await one.verify()).ok


async def _waiting(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(_WAITING)
        row = await cur.fetchone()
        return 0 if row is None else int(row[0])


async def test_readers_see_the_old_checkpoint_while_a_reput_is_frozen(
        two_stores: list[Store], pg_store_dsn: str) -> None:
    one, two = two_stores
    (c0,) = await _seeded(one, 1)
    writer, reader = ImmAgentSaver(one), ImmAgentSaver(two)
    await _thread(writer)
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await _freeze(x, writer, "delete", c0, 9)
        put = asyncio.ensure_future(_write(writer, c0, 9))
        await _until_queued(pg_store_dsn, put)
        got = await reader.aget_tuple(_config(c0["id"]))
        newest = await reader.aget_tuple(_config())
        assert got is not None and got.checkpoint["channel_values"] == {"x": 0}
        assert newest is not None and newest.checkpoint["id"] == c0["id"]
        await x.rollback()
        await put
    finally:
        await x.close()
    got = await reader.aget_tuple(_config(c0["id"]))
    assert got is not None and got.checkpoint["channel_values"] == {"x": 9}
