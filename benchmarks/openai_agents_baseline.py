"""The append-only baseline: the OpenAI Agents SDK's ``SQLiteSession``, same texts.

``SQLiteSession`` is the simplest thing a user would pick: one table of JSON items per
session, appended to, never versioned (it keeps only the latest state). A turn is what
``Runner.run`` adds for one exchange: the user's input item and the assistant's output
message, in the SDK's item format (checked against a real ``Runner.run`` with the SDK's
offline ``ScriptedModel`` before anything is measured). The assistant item carries a
Responses-API style id (``msg_`` + 48 hex digits), as a real provider's does.

Stored bytes: the SQLite file after ``PRAGMA wal_checkpoint(TRUNCATE)``, as for immagent.
Store only: no model call; compare with immagent's ``Store.append`` figures.

Run alone: ``python -m benchmarks.openai_agents_baseline --turns 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from agents import SQLiteSession, TResponseInputItem

from benchmarks.common import (
    CorpusStored,
    Latency,
    LinearPoint,
    Timer,
    compacted_sqlite_bytes,
    curve_points,
    fmt_bytes,
    print_table,
    remove_sqlite_files,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from benchmarks.corpus import Corpus

__all__ = [
    "add_latency",
    "assistant_item",
    "check_item_format",
    "grow",
    "open_session_file",
    "read_latency",
    "run_corpus",
    "run_linear",
    "user_item",
]

Item = TResponseInputItem
Measure = Callable[[], Awaitable[int]]


def user_item(text: str) -> Item:
    """The input item ``Runner.run(agent, text, session=...)`` stores for the user."""
    return {"content": text, "role": "user"}


def assistant_item(text: str, item_id: str) -> Item:
    """The output message item ``Runner.run`` stores for an assistant text reply."""
    return {"id": item_id,
            "content": [{"annotations": [], "text": text, "type": "output_text",
                         "logprobs": []}],
            "role": "assistant", "status": "completed", "type": "message"}


def _item_id(thread: str, turn: int) -> str:
    return "msg_" + hashlib.sha256(f"{thread}/{turn}".encode()).hexdigest()[:48]


def turn_items(thread: str, turn: int, user: str, reply: str) -> list[Item]:
    """One exchange as the SDK stores it: user input item, assistant output item."""
    return [user_item(user), assistant_item(reply, _item_id(thread, turn))]


async def check_item_format() -> None:
    """Fail loudly unless ``turn_items`` is what the SDK itself stores for one turn."""
    from agents import Agent, RunConfig, Runner
    from agents.testing import ScriptedModel, assistant_message

    session = SQLiteSession("format-check")
    try:
        model = ScriptedModel([[assistant_message("reply", item_id="msg_x")]])
        await Runner.run(Agent(name="format-check", model=model), "hello", session=session,
                         run_config=RunConfig(tracing_disabled=True))
        stored = await session.get_items()
    finally:
        session.close()
    ours = [user_item("hello"), assistant_item("reply", "msg_x")]
    if stored != ours:
        raise RuntimeError(f"the SDK stores {stored!r} for one turn, the benchmark would "
                           f"store {ours!r}: update benchmarks/openai_agents_baseline.py")


@contextlib.asynccontextmanager
async def open_session_file(workdir: Path, label: str) -> AsyncIterator[tuple[Path, Measure]]:
    """A fresh SQLite file for sessions (schema created, as the first session does) and a
    function measuring its bytes."""
    path = workdir / f"openai-agents-{label}.db"
    remove_sqlite_files(path)
    SQLiteSession("schema", path).close()  # creates the tables, like any first session

    async def measure() -> int:
        return await asyncio.to_thread(sqlite_file_bytes, path)

    try:
        yield path, measure
    finally:
        remove_sqlite_files(path)


async def grow(session: SQLiteSession, thread: str, turns: range) -> None:
    """One ``add_items`` per turn, the benchmark's synthetic texts."""
    for turn in turns:
        user = user_text(thread, turn)
        await session.add_items(turn_items(thread, turn, user, reply_text(user)))


async def run_linear(path: Path, measure: Measure,
                     points: Sequence[int]) -> list[LinearPoint]:
    """Scenario 1 for SQLiteSession: one session grown to max(points) turns, measured empty
    and at each point (session "linear", the same texts as immagent's linear agent)."""
    results = [LinearPoint("openai-agents", "sqlite", 0, await measure(), 0.0)]
    session = SQLiteSession("linear", path)
    try:
        done = 0
        elapsed = 0.0
        for point in sorted(points):
            with Timer() as timer:
                await grow(session, "linear", range(done, point))
            elapsed += timer.seconds
            done = point
            results.append(LinearPoint("openai-agents", "sqlite", point, await measure(),
                                       elapsed))
    finally:
        session.close()
    return results


async def add_latency(path: Path, session_id: str, history_turns: int,
                      samples: int) -> Latency:
    """``add_items`` of one turn (user item + assistant item), sequentially, on a session
    that already holds ``history_turns`` turns (grown here if it holds none)."""
    session = SQLiteSession(session_id, path)
    try:
        if not await session.get_items(limit=1):
            await grow(session, session_id, range(history_turns))
        times: list[float] = []
        for turn in range(samples):
            text = user_text("commit", turn)
            items = turn_items(session_id, history_turns + turn, text, reply_text(text))
            start = time.perf_counter()
            await session.add_items(items)
            times.append(time.perf_counter() - start)
    finally:
        session.close()
    return Latency("sqlite", "add_items, one turn", history_turns, tuple(times),
                   "openai-agents")


async def read_latency(path: Path, session_id: str, history_turns: int,
                       samples: int) -> list[Latency]:
    """``get_items()`` of the whole session: cold (a new session object each time, so a new
    connection, as in a new process or request) and on one session object."""
    cold: list[float] = []
    for _ in range(samples):
        session = SQLiteSession(session_id, path)
        try:
            start = time.perf_counter()
            items = await session.get_items()
            cold.append(time.perf_counter() - start)
        finally:
            session.close()
        if len(items) != 2 * history_turns:
            raise RuntimeError(f"session {session_id} holds {len(items)} items, "
                               f"expected {2 * history_turns}")
    same: list[float] = []
    session = SQLiteSession(session_id, path)
    try:
        await session.get_items()
        for _ in range(samples):
            start = time.perf_counter()
            await session.get_items()
            same.append(time.perf_counter() - start)
    finally:
        session.close()
    return [Latency("sqlite", "get_items (new session)", history_turns, tuple(cold),
                    "openai-agents"),
            Latency("sqlite", "get_items (same session)", history_turns, tuple(same),
                    "openai-agents")]


async def run_corpus(corpus: Corpus, workdir: Path) -> CorpusStored:
    """The realistic corpus: one session per conversation, one ``add_items`` per turn."""
    async with open_session_file(workdir, "corpus") as (path, measure):
        empty = await measure()
        with Timer() as timer:
            for conversation in corpus.conversations:
                session = SQLiteSession(conversation.name, path)
                try:
                    for turn, (user, answer) in enumerate(conversation.turns):
                        await session.add_items(turn_items(conversation.name, turn, user,
                                                           answer))
                finally:
                    session.close()
        stored = await measure()
        compacted = await asyncio.to_thread(compacted_sqlite_bytes, path)
        last = corpus.conversations[-1]
        check = SQLiteSession(last.name, path)
        try:
            items = await check.get_items()
        finally:
            check.close()
        if items != [i for t, (u, a) in enumerate(last.turns)
                     for i in turn_items(last.name, t, u, a)]:
            raise RuntimeError(f"SQLiteSession {last.name} differs from the corpus")
    return CorpusStored("openai-agents", "sqlite", len(corpus.conversations), corpus.turns,
                        corpus.raw_bytes, empty, stored, timer.seconds, compacted)


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000, help="longest session")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args(argv)
    await check_item_format()
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp:
        async with open_session_file(Path(tmp), "linear") as (path, measure):
            points = await run_linear(path, measure, curve_points(args.turns))
            print_table("SQLiteSession linear", ["N", "stored", "bytes/turn", "s"],
                        [[p.turns, fmt_bytes(p.stored_bytes), f"{p.bytes_per_turn:,.0f}",
                          f"{p.seconds:.2f}"] for p in points])
            # Reads first: add_latency appends to the session it measures.
            latencies = await read_latency(path, "linear", args.turns, args.samples)
            latencies += [await add_latency(path, "short", 10, args.samples),
                          await add_latency(path, "linear", args.turns, args.samples)]
            print_table("SQLiteSession latency", ["operation", "turns", "p50 ms", "p99 ms"],
                        [[lat.operation, lat.history_turns, f"{lat.p50 * 1e3:.2f}",
                          f"{lat.p99 * 1e3:.2f}"] for lat in latencies])


if __name__ == "__main__":
    asyncio.run(_main())
