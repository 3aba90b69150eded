"""A step costs the same at turn 600 as at turn 10 in one long-running process (issue 20,
item 4): appending used to walk the chain cache once per earlier step (a run per append,
``AssetCache._parts``), so a process's appends slowed down linearly while a fresh process
appended at full speed.

Work is counted, not timed: the Python calls one append makes (a profile hook, on the
in-memory backend, where nothing else runs), and the rows a history read fetches from a
real backend after a long run of appends (none: it is served from the cache)."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from immagent import Message, PersistentAgent, Store
from tests.conftest import turn
from tests.test_log_scaling import counting_store


async def _calls_of_one_append(store: Store, agent: PersistentAgent,
                               i: int) -> tuple[int, PersistentAgent]:
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        agent = await store.append(agent, turn(i))
    finally:
        sys.setprofile(None)
    return calls, agent


async def test_an_append_costs_the_same_at_turn_600_as_at_turn_10() -> None:
    async with await Store.connect("memory://") as store:
        await store.init_schema()
        agent = await store.create_agent("long", "You go on.", "m")
        costs: dict[int, int] = {}
        for i in range(601):
            if i in (10, 11, 300, 600):
                costs[i], agent = await _calls_of_one_append(store, agent, i)
            else:
                agent = await store.append(agent, turn(i))
        # Before: 10 -> ~450 calls, 600 -> ~11,000 (one cache walk step per earlier turn).
        # Now flat but for the accumulator's merges (as many as the trailing zero bits of
        # the new leaf count: amortised one per leaf) and a span hash every SPAN steps.
        assert max(costs.values()) <= 1.1 * min(costs.values()), costs


async def test_a_long_lineages_history_is_served_from_memory(store_dsn: str) -> None:
    async with counting_store(store_dsn) as (store, counting):
        agent = await store.create_agent("long", "You go on.", "m")
        for i in range(300):
            agent = await store.append(agent, turn(i))
        counting.rows.clear()
        history = await agent.get_messages()
        # Every step extended one cached run: no database read (before: the whole chain).
        assert counting.total == 0, counting.rows
        assert len(history) == 600 and history[-1] == turn(299)[-1]
        store.clear_cache()
        assert await (await store.load_agent(agent.id)).get_messages() == history
        # A fork from the middle, and an append to the old head again, share the prefix.
        middle = (await store.ancestors(agent, 151))[-1]
        fork = await store.append(middle, [Message(role="user", content="fork")])
        again = await store.append(agent, [Message(role="user", content="more")])
        counting.rows.clear()
        assert (await fork.get_messages())[-1].content == "fork"
        assert len(await fork.get_messages()) == 301
        assert (await again.get_messages())[:-1] == history
        assert counting.total == 0, counting.rows
