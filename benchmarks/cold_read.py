"""The cold read of one long conversation alone, for iterating on the read path (issue 11).

A store-only agent of N turns (the synthetic texts, ``Store.append``, as
``immagent_scenarios.run_append_linear``) is read with ``get_messages`` after
``clear_cache()``, and SQLiteSession's ``get_items()`` of the same texts on a new session
object, the two alternating sample by sample so load from elsewhere on the machine falls
on both alike. ``--keep DIR`` keeps the stores (SQLite files in DIR, a PostgreSQL database
named after N and DIR) so that a run of another checkout can read the very same rows: compare two
versions by running each in turn, several times.

Run: ``python -m benchmarks.cold_read --turns 1000 --samples 200 [--dsn DSN] [--keep DIR]
[--profile FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import psycopg
from agents import SQLiteSession
from blake3 import blake3

from benchmarks.common import (
    drop_database,
    fresh_database,
    percentile,
    print_table,
    reply_text,
    user_text,
    with_database,
)
from benchmarks.openai_agents_baseline import grow
from immagent import Message, PersistentAgent, Store

__all__ = ["main"]

_NAME = "linear"


async def _build(store: Store, turns: int) -> PersistentAgent:
    """The store-only agent: one ``Store.append`` of a user and an assistant message a turn."""
    await store.init_schema()
    agent = await store.create_agent(name=_NAME, system_prompt="You are a benchmark.",
                                     model="immagent/echo")
    for turn in range(turns):
        text = user_text(_NAME, turn)
        agent = await store.append(agent, [Message(role="user", content=text),
                                           Message(role="assistant", content=reply_text(text))])
    return agent


async def _agent(target: str, turns: int, build: bool) -> tuple[Store, PersistentAgent]:
    store = await Store.connect(target)
    if build:
        agent = await _build(store, turns)
    else:
        found = await store.newest_by_name(_NAME)
        if found is None:
            raise SystemExit(f"{target} holds no agent {_NAME!r}: run without --keep first")
        agent = found
    return store, agent


def _pg_name(turns: int, keep: Path | None) -> str:
    """The benchmark's database on a server others use too: kept ones are named after the
    --keep directory (so every checkout given that directory reads the same rows, and
    other directories never collide), a throwaway one after this process."""
    if keep is None:
        return f"immagent_coldread_{turns}_{os.getpid()}_{secrets.token_hex(3)}"
    return f"immagent_coldread_{turns}_{blake3(str(keep.resolve()).encode()).hexdigest()[:8]}"


async def _pg_target(dsn: str, name: str, keep: bool) -> tuple[str, bool]:
    """The DSN of the benchmark's database, and whether it must be built."""
    if keep:
        async with await psycopg.AsyncConnection.connect(with_database(dsn, "postgres"),
                                                         autocommit=True) as conn:
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if await cur.fetchone() is not None:
                return with_database(dsn, name), False
    return await fresh_database(dsn, name), True


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def main(argv: Sequence[str] | None = None) -> None:
    """Build (or reuse) the stores, then time the cold reads and print p50/p99."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--dsn", help="PostgreSQL server (omitted: SQLite only)")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the stores here")
    parser.add_argument("--profile", type=Path, help="cProfile the immagent reads to FILE")
    args = parser.parse_args(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="immagent-coldread-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ours = workdir / f"immagent-{args.turns}.db"
    theirs = workdir / f"openai-agents-{args.turns}.db"
    targets = {"sqlite": (str(ours), not (args.keep and ours.exists()))}
    if args.dsn:
        pg_name = _pg_name(args.turns, args.keep)
        targets["postgres"] = await _pg_target(args.dsn, pg_name, args.keep is not None)
    if not (args.keep and theirs.exists()):
        theirs.unlink(missing_ok=True)
        session = SQLiteSession(_NAME, theirs)
        await grow(session, _NAME, range(args.turns))
        session.close()

    stores = {b: await _agent(t, args.turns, build) for b, (t, build) in targets.items()}
    # As run.py: what the imports left behind would make every full collection slow.
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {"openai-agents": [], **{b: [] for b in stores}}
    profile = cProfile.Profile() if args.profile else None

    async def sdk() -> None:
        session = SQLiteSession(_NAME, theirs)
        try:
            times["openai-agents"].append(await _timed(session.get_items))
        finally:
            session.close()

    def ours_read(backend: str) -> Callable[[], Awaitable[None]]:
        store, agent = stores[backend]

        async def read() -> None:
            store.clear_cache()
            if profile is not None:
                profile.enable()
            times[backend].append(await _timed(agent.get_messages))
            if profile is not None:
                profile.disable()

        return read

    try:
        for _, agent in stores.values():  # reader connections opened, plans cached
            if len(await agent.get_messages()) != 2 * args.turns:
                raise SystemExit("the stored agent does not hold the expected turns")
        reads = [sdk, *(ours_read(b) for b in stores)]
        for i in range(args.samples):
            for read in reads[i % len(reads):] + reads[:i % len(reads)]:
                await read()
    finally:
        for store, _ in stores.values():
            await store.close()
        if args.dsn and args.keep is None:
            await drop_database(args.dsn, pg_name)
    if profile is not None:
        profile.dump_stats(args.profile)
    base = percentile(times["openai-agents"], 50)
    print_table(f"cold read of {args.turns} turns, {args.samples} samples each (ms)",
                ["system", "p50", "p99", "p50 / SQLiteSession"],
                [[name, f"{percentile(t, 50) * 1e3:.2f}", f"{percentile(t, 99) * 1e3:.2f}",
                  f"{percentile(t, 50) / base:.2f}x"] for name, t in times.items()])


if __name__ == "__main__":
    asyncio.run(main())
