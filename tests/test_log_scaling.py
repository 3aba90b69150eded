"""``immagent log`` and the chain cache scale linearly: ``log -n N`` reads about N states'
worth of rows whatever the lineage's length, a whole log reads each row about once, and a
lineage's histories share their common prefix in a byte-bounded cache. The command line's
listings and references cost what they show: one row per conversation listed, an id
prefix resolved by a range read of a few rows, whatever the store holds.

Rows are counted by a pass-through around a real backend (every call is forwarded to
SQLite or PostgreSQL; nothing is simulated), so the tests measure work, not time."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from immagent import Message, PersistentAgent, Store
from immagent.assets import Kind
from immagent.cli.clients import AgentView
from immagent.cli.history import _lineage
from immagent.cli.refs import Ref, abbreviate, resolve
from immagent.store.backend import Backend
from immagent.store.cache import AssetCache


class CountingBackend:
    """Forwards every call to ``inner`` and counts the rows each read returns."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.rows: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("get_chain", "get_nodes", "get_assets", "get_states", "lineage",
                        "scan_states", "stream_states", "stream_heads"):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            if name in ("get_chain", "get_nodes"):
                self.rows[name] += len(result[0]) + len(result[1])
            else:
                self.rows[name] += len(result)
            return result
        return counted

    @property
    def total(self) -> int:
        return sum(self.rows.values())


@contextlib.asynccontextmanager
async def counting_store(dsn: str) -> AsyncIterator[tuple[Store, CountingBackend]]:
    if dsn.startswith("sqlite:///"):
        from immagent.store.sqlite import SQLiteBackend

        inner: Backend = await SQLiteBackend.open(dsn.removeprefix("sqlite:///"))
    else:
        from immagent.store.postgres import PostgresBackend

        inner = await PostgresBackend.open(dsn, min_size=1, max_size=2)
    counting = CountingBackend(inner)
    store = Store(cast(Backend, counting))
    try:
        await store.init_schema()
        yield store, counting
    finally:
        await store.close()


async def grow(store: Store, states: int) -> PersistentAgent:
    agent = await store.create_agent("long", "You go on.", "m")
    for i in range(states - 1):
        agent = await store.append(agent, [Message(role="user", content=f"q{i}"),
                                           Message(role="assistant", content=f"a{i}")])
    return agent


async def rows_read(store: Store, counting: CountingBackend, head: PersistentAgent,
                    limit: int | None) -> int:
    store.clear_cache()
    (row,) = await store.get_states([head.id])
    counting.rows.clear()
    entries = await _lineage(store, AgentView(), row, limit)
    assert entries[0].count is not None
    assert len(entries) == (limit or entries[0].count // 2 + 1)
    assert [len(e.added or ()) for e in entries[:2]] == [2, 2]  # what each step added
    return counting.total


async def test_log_reads_what_it_shows_not_the_whole_lineage(store_dsn: str) -> None:
    async with counting_store(store_dsn) as (store, counting):
        short = await grow(store, 50)
        long = await grow(store, 400)
        n2 = [await rows_read(store, counting, h, 2) for h in (short, long)]
        # -n 2: 3 states and their head nodes (each holding its messages); before, the
        # full history of each of the 3 states (~400 messages and nodes apiece).
        assert n2[0] == n2[1] <= 6, n2
        whole = [await rows_read(store, counting, h, None) for h in (short, long)]
        # The whole log: every state, node and message about once; before, every state's
        # whole history, quadratic (1,000 states: 36 s and 928 MB).
        assert whole[1] < 8 * 400, whole
        assert whole[1] / whole[0] < 9.6, whole  # linear: 8x the states, ~8x the rows


async def test_every_history_of_a_lineage_is_read_from_one_chain_read(store_dsn: str) -> None:
    async with counting_store(store_dsn) as (store, counting):
        head = await grow(store, 200)
        lineage = await store.ancestors(head)
        store.clear_cache()
        lineage = await store.load_agents([a.id for a in lineage])
        counting.rows.clear()
        histories = [await a.get_messages() for a in lineage]  # newest first
        assert [len(h) for h in histories] == [2 * i for i in range(199, -1, -1)]
        # One chain query for the newest state (one row per node, each holding its
        # messages) fills the cache with every node's segment; the 199 older states are
        # answered from it, sharing its prefix.
        assert counting.rows["get_chain"] == 200
        assert counting.total == counting.rows["get_chain"]


def _chain(nodes: int, per_node: int = 2, size: int = 100) -> list[tuple[bytes, list[Any]]]:
    from immagent.assets import EMPTY_CONVERSATION

    node = EMPTY_CONVERSATION
    out: list[tuple[bytes, list[Any]]] = [(EMPTY_CONVERSATION.digest, [])]
    for i in range(nodes):
        added = [Message(role="user", content=f"{i}:{j}:" + "x" * size) for j in range(per_node)]
        node = node.extend(added)
        out.append((node.digest, added))
    return out


def test_the_chain_cache_shares_prefixes_and_counts_bytes() -> None:
    cache = AssetCache(history_bytes=4 << 20)
    chain = _chain(500)
    for (digest, added), (parent, _) in zip(chain[1:], chain, strict=False):
        cache.put_segment(digest, parent, tuple(added))
    cache.put_segment(chain[0][0], None, ())
    segments_only = cache.history_bytes
    body = sum(len(m.body) for _, added in chain for m in added)
    # Each message is counted once, in its node's segment: O(total), not O(N²).
    assert body <= segments_only < 2 * body
    for i in (10, 250, 500):
        assert len(cache.history(chain[i][0]) or ()) == 2 * i
    assert cache.history_bytes <= 4 << 20


def test_the_chain_cache_never_exceeds_its_byte_budget() -> None:
    budget = 256 << 10
    cache = AssetCache(history_bytes=budget)
    chain = _chain(2_000, size=200)
    cache.put_segment(chain[0][0], None, ())
    for (digest, added), (parent, _) in zip(chain[1:], chain, strict=False):
        cache.put_segment(digest, parent, tuple(added))
        cache.history(digest)  # a flat copy too, as a hot head gets
        assert cache.history_bytes <= budget
    # The oldest segments were evicted: the head's history is a miss, never a wrong answer.
    assert cache.history(chain[-1][0]) is None


@pytest.fixture
def sqlite_only(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_cli_log_limit_counts_states(sqlite_only: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from immagent.cli.app import main

    async def build() -> str:
        async with await Store.connect(sqlite_only) as store:
            await store.init_schema()
            return str((await grow(store, 30)).id)

    head = asyncio.run(build())
    assert main(["--db", sqlite_only, "log", "-n", "2", "--oneline", head]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("+2" in line for line in lines)


async def test_listings_and_references_read_what_they_name_not_the_store(
        store_dsn: str) -> None:
    async with counting_store(store_dsn) as (store, counting):
        heads = [await grow(store, n) for n in (3, 50, 400)]
        # One row per stream, whatever its length: the loose index scan.
        counting.rows.clear()
        found = await store.stream_heads(Kind.AGENT_STATE)
        assert [r.id for r in found] == [heads[-1].id]  # all three are called "long"
        assert counting.total == 1
        # An id prefix: a range read from the prefix's lowest id, at most 11 rows.
        counting.rows.clear()
        short = (await abbreviate(store, [heads[1].id]))[heads[1].id]
        assert counting.rows["scan_states"] <= 2  # its two neighbours
        counting.rows.clear()
        assert (await resolve(store, Ref("", short))).row.id == heads[1].id
        assert counting.rows["scan_states"] <= 11 and counting.rows["get_chain"] == 0
        assert counting.total <= 11 + 3  # and one probe per client for the name
