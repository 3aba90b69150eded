"""The comparison baseline: the same scenarios through LangGraph's checkpointers.

The graph is what a LangGraph user would write for a chat agent: the state is a messages
list with the ``add_messages`` reducer, and one node appends the assistant reply (a canned,
fixed-size text, the same one the immagent side stores). Each turn is one ``ainvoke`` with
the user message on the turn's thread, default durability ("async": every super-step is
checkpointed). A fork copies the base thread's latest state into a new thread with
``aupdate_state`` (LangGraph threads share no storage) and then advances that thread.

Stored bytes: PostgreSQL, the sum of ``pg_total_relation_size`` over the checkpointer's
tables in a database of their own; SQLite, the file size after
``PRAGMA wal_checkpoint(TRUNCATE)``.

Run alone: ``python -m benchmarks.langgraph_baseline --dsn postgresql://... --turns 100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from benchmarks.common import (
    BACKENDS,
    Backend,
    CorpusStored,
    ForkResult,
    LinearPoint,
    Timer,
    curve_points,
    drop_database,
    fmt_bytes,
    fresh_database,
    pg_relation_bytes,
    print_table,
    remove_sqlite_files,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from benchmarks.corpus import Corpus

__all__ = ["build_graph", "run_corpus", "run_forks", "run_linear"]

#: Tables AsyncPostgresSaver.setup() creates; all of them count as stored bytes.
PG_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes", "checkpoint_migrations")
#: Database of the PostgreSQL runs: per process, dropped and re-created per scenario.
PG_DATABASE = f"immagent_bench_{os.getpid()}_langgraph"


class ChatState(TypedDict):
    """The graph state: one messages channel with LangGraph's standard reducer."""

    messages: Annotated[list[AnyMessage], add_messages]


def _reply(state: ChatState) -> dict[str, list[AnyMessage]]:
    """The only node: append the canned reply to the last user message."""
    last = state["messages"][-1]
    return {"messages": [AIMessage(content=reply_text(str(last.content)))]}


def _corpus_reply(replies: Mapping[str, Sequence[str]]) -> Any:
    """The node for a recorded conversation: the thread's assistant message of this turn."""

    def reply(state: ChatState, config: RunnableConfig) -> dict[str, list[AnyMessage]]:
        thread = config["configurable"]["thread_id"]
        turn = sum(isinstance(m, HumanMessage) for m in state["messages"]) - 1
        return {"messages": [AIMessage(content=replies[thread][turn])]}

    return reply


def build_graph(checkpointer: BaseCheckpointSaver[Any],
                replies: Mapping[str, Sequence[str]] | None = None) -> Any:
    """START -> reply -> END, checkpointed by ``checkpointer``. The reply node echoes as
    ``immagent/echo`` does, or answers from ``replies`` (thread id -> assistant message per
    turn) when given."""
    builder = StateGraph(ChatState)
    builder.add_node("reply", _reply if replies is None else _corpus_reply(replies))
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=checkpointer)


@contextlib.asynccontextmanager
async def open_saver(
    backend: Backend, dsn: str | None, workdir: Path
) -> AsyncIterator[tuple[BaseCheckpointSaver[Any], Callable[[], Awaitable[int]]]]:
    """A fresh, empty checkpointer and a function that measures its stored bytes."""
    if backend == "postgres":
        if dsn is None:
            raise ValueError("the postgres backend needs a DSN")
        db_dsn = await fresh_database(dsn, PG_DATABASE)
        try:
            async with AsyncPostgresSaver.from_conn_string(db_dsn) as pg_saver:
                await pg_saver.setup()

                async def pg_measure() -> int:
                    return await pg_relation_bytes(db_dsn, PG_TABLES)

                yield pg_saver, pg_measure
        finally:
            await drop_database(dsn, PG_DATABASE)
    else:
        path = workdir / "langgraph.sqlite"
        remove_sqlite_files(path)
        try:
            async with AsyncSqliteSaver.from_conn_string(str(path)) as sqlite_saver:
                await sqlite_saver.setup()

                async def sqlite_measure() -> int:
                    return await asyncio.to_thread(sqlite_file_bytes, path)

                yield sqlite_saver, sqlite_measure
        finally:
            remove_sqlite_files(path)


def _config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


async def _advance(graph: Any, thread: str, turns: range) -> None:
    """One ``ainvoke`` per turn on ``thread``, each with that turn's user message."""
    for turn in turns:
        message = HumanMessage(content=user_text(thread, turn))
        await graph.ainvoke({"messages": [message]}, _config(thread))


async def run_linear(backend: Backend, points: Sequence[int], *, dsn: str | None,
                     workdir: Path) -> list[LinearPoint]:
    """Scenario 1: one thread advanced to max(points) turns, measured empty and at each point.

    Measuring one growing thread at N gives the same bytes as a fresh run of N turns
    (nothing is ever rewritten), at a fraction of the time.
    """
    async with open_saver(backend, dsn, workdir) as (saver, measure):
        results = [LinearPoint("langgraph", backend, 0, await measure(), 0.0)]
        graph = build_graph(saver)
        done = 0
        elapsed = 0.0
        for point in sorted(points):
            with Timer() as timer:
                await _advance(graph, "linear", range(done, point))
            elapsed += timer.seconds
            done = point
            results.append(LinearPoint("langgraph", backend, point, await measure(), elapsed))
    return results


async def run_forks(backend: Backend, *, dsn: str | None, workdir: Path, base_turns: int = 100,
                    forks: int = 50, fork_turns: int = 5) -> ForkResult:
    """Scenario 2: a base thread, then forks of its latest state, each advanced a little."""
    async with open_saver(backend, dsn, workdir) as (saver, measure):
        graph = build_graph(saver)
        with Timer() as timer:
            await _advance(graph, "base", range(base_turns))
            base_bytes = await measure()
            snapshot = await graph.aget_state(_config("base"))
            for index in range(forks):
                thread = f"fork{index}"
                await graph.aupdate_state(_config(thread), snapshot.values, as_node="reply")
                await _advance(graph, thread, range(fork_turns))
        total = await measure()
    return ForkResult("langgraph", backend, base_turns, forks, fork_turns, base_bytes, total,
                      timer.seconds)


async def run_corpus(backend: Backend, corpus: Corpus, *, dsn: str | None,
                     workdir: Path) -> CorpusStored:
    """The realistic corpus: one thread per conversation, one ``ainvoke`` per turn with the
    user message, the node answering with the recorded assistant message."""
    replies = {c.name: [answer for _, answer in c.turns] for c in corpus.conversations}
    async with open_saver(backend, dsn, workdir) as (saver, measure):
        empty = await measure()
        graph = build_graph(saver, replies)
        with Timer() as timer:
            for conversation in corpus.conversations:
                for user, _ in conversation.turns:
                    await graph.ainvoke({"messages": [HumanMessage(content=user)]},
                                        _config(conversation.name))
        stored = await measure()
        last = corpus.conversations[-1]
        state = await graph.aget_state(_config(last.name))
        if [m.content for m in state.values["messages"]] != [t for turn in last.turns
                                                             for t in turn]:
            raise RuntimeError(f"LangGraph's thread {last.name} differs from the corpus")
    return CorpusStored("langgraph", backend, len(corpus.conversations), corpus.turns,
                        corpus.raw_bytes, empty, stored, timer.seconds)


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server DSN (a scratch database is used)")
    parser.add_argument("--turns", type=int, default=100, help="longest thread")
    parser.add_argument("--forks", action="store_true", help="also run the fork scenario")
    args = parser.parse_args(argv)
    backends = [b for b in BACKENDS if b == "sqlite" or args.dsn]
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp:
        rows: list[list[object]] = []
        for backend in backends:
            points = curve_points(args.turns)
            for r in await run_linear(backend, points, dsn=args.dsn, workdir=Path(tmp)):
                rows.append([backend, r.turns, fmt_bytes(r.stored_bytes),
                             fmt_bytes(r.bytes_per_turn), f"{r.seconds:.2f}"])
        print_table("LangGraph linear", ["backend", "N", "stored", "bytes/turn", "s"], rows)
        if args.forks:
            fork_rows: list[list[object]] = []
            for backend in backends:
                f = await run_forks(backend, dsn=args.dsn, workdir=Path(tmp))
                fork_rows.append([backend, fmt_bytes(f.base_bytes), fmt_bytes(f.bytes_per_fork),
                                  fmt_bytes(f.fork_payload_bytes), f"{f.seconds:.2f}"])
            print_table("LangGraph forks", ["backend", "base", "per fork", "fork payload", "s"],
                        fork_rows)


if __name__ == "__main__":
    asyncio.run(_main())
