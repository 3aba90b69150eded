"""LangGraph's scenarios with ImmAgentSaver as the checkpointer, beside LangGraph's own savers.

The graph, the texts and the fork method are exactly those of ``langgraph_baseline``
(``build_graph``): state ``{"messages": Annotated[list, add_messages]}``, one node appending
the canned reply, one ``ainvoke`` per turn with default durability (every super-step
checkpointed), forks by ``aupdate_state`` of the base thread's latest values into a new
thread. Only the checkpointer differs: ``ImmAgentSaver`` over an immagent store on the same
PostgreSQL server or a SQLite file. Results are ``LinearPoint``/``ForkResult`` of system
"immagent-saver" (so the run's linear table, growth exponents and plot show them) and
``Latency`` of operation "graph ainvoke".

Stored bytes: every relation whose name starts with ``immagent_`` on PostgreSQL (as for
immagent's own scenarios); the file after ``PRAGMA wal_checkpoint(TRUNCATE)`` on SQLite.

Per-invoke latency is measured alone (nothing else running) the same way for every
checkpointer: a thread is given N turns of history in one ``aupdate_state`` (so no saver
pays for growing it), one warm-up invoke, then the median of timed invokes. With any
saver, LangGraph rebuilds the whole message list from stored bytes on every invoke (about
57 us per LangChain message here), so every saver's latency grows with N; the comparison
shows what the saver adds or saves on top.

Run alone: ``python -m benchmarks.immagent_saver --dsn postgresql://... [--turns 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver

from benchmarks import immagent_scenarios as ours
from benchmarks import langgraph_baseline as theirs
from benchmarks.common import (
    BACKENDS,
    Backend,
    ForkResult,
    Latency,
    LinearPoint,
    System,
    Timer,
    curve_points,
    drop_database,
    fmt_bytes,
    fresh_database,
    growth_exponent,
    print_table,
    remove_sqlite_files,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from benchmarks.layout import pg_prefix_bytes
from immagent.integrations.langgraph import ImmAgentSaver

__all__ = [
    "OPERATION",
    "SYSTEM",
    "check_targets",
    "invoke_latency",
    "open_saver",
    "print_tables",
    "run_forks",
    "run_latency",
    "run_linear",
    "run_storage",
]

SYSTEM: Final = "immagent-saver"
#: The ``Latency.operation`` of one graph invoke.
OPERATION: Final = "graph ainvoke"
KIB = 1024

Measure = Callable[[], Awaitable[int]]


def _database(label: str) -> str:
    return f"immagent_bench_{os.getpid()}_saver_{label}"


@contextlib.asynccontextmanager
async def open_saver(backend: Backend, dsn: str | None, workdir: Path,
                     label: str) -> AsyncIterator[tuple[ImmAgentSaver, Measure]]:
    """An ImmAgentSaver over a fresh, empty store (its own database or file, named by
    ``label``) and a function measuring the store's bytes."""
    if backend == "postgres":
        if dsn is None:
            raise ValueError("the postgres backend needs a DSN")
        db_dsn = await fresh_database(dsn, _database(label))
        try:
            async with ImmAgentSaver.from_conn_string(db_dsn) as saver:
                await saver.setup()

                async def pg_measure() -> int:
                    return await pg_prefix_bytes(db_dsn, ours.PG_PREFIX)

                yield saver, pg_measure
        finally:
            await drop_database(dsn, _database(label))
    else:
        path = workdir / f"saver-{label}.db"
        remove_sqlite_files(path)
        try:
            async with ImmAgentSaver.from_conn_string(f"sqlite:///{path}") as saver:
                await saver.setup()

                async def sqlite_measure() -> int:
                    return await asyncio.to_thread(sqlite_file_bytes, path)

                yield saver, sqlite_measure
        finally:
            remove_sqlite_files(path)


def _config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


async def _advance(graph: Any, thread: str, turns: range) -> None:
    """What ``langgraph_baseline`` does: one ``ainvoke`` per turn with that turn's text."""
    for turn in turns:
        message = HumanMessage(content=user_text(thread, turn))
        await graph.ainvoke({"messages": [message]}, _config(thread))


async def run_linear(backend: Backend, points: Sequence[int], *, dsn: str | None,
                     workdir: Path) -> list[LinearPoint]:
    """Scenario 1: one thread advanced to max(points) turns, measured at each point; then
    the thread's messages and ``store.verify()`` are checked."""
    async with open_saver(backend, dsn, workdir, "linear") as (saver, measure):
        results = [LinearPoint(SYSTEM, backend, 0, await measure(), 0.0)]
        graph = theirs.build_graph(saver)
        done, elapsed = 0, 0.0
        for point in sorted(points):
            with Timer() as timer:
                await _advance(graph, "linear", range(done, point))
            elapsed += timer.seconds
            done = point
            results.append(LinearPoint(SYSTEM, backend, point, await measure(), elapsed))
        state = await graph.aget_state(_config("linear"))
        expected = [text for t in range(done) for u in [user_text("linear", t)]
                    for text in (u, reply_text(u))]
        if [m.content for m in state.values["messages"]] != expected:
            raise RuntimeError("ImmAgentSaver did not give the thread's messages back")
        report = await saver.store.verify()
        if not report.ok:
            raise RuntimeError("store.verify() found problems: " + "; ".join(report.lines()))
    return results


async def run_forks(backend: Backend, *, dsn: str | None, workdir: Path, base_turns: int = 100,
                    forks: int = 50, fork_turns: int = 5) -> ForkResult:
    """Scenario 2, as ``langgraph_baseline.run_forks``: a base thread, then forks of its
    latest state (``aupdate_state`` into a new thread), each advanced a little."""
    async with open_saver(backend, dsn, workdir, "forks") as (saver, measure):
        graph = theirs.build_graph(saver)
        with Timer() as timer:
            await _advance(graph, "base", range(base_turns))
            base_bytes = await measure()
            snapshot = await graph.aget_state(_config("base"))
            for index in range(forks):
                thread = f"fork{index}"
                await graph.aupdate_state(_config(thread), snapshot.values, as_node="reply")
                await _advance(graph, thread, range(fork_turns))
        total = await measure()
    return ForkResult(SYSTEM, backend, base_turns, forks, fork_turns, base_bytes, total,
                      timer.seconds)


async def run_storage(turns: dict[Backend, int], *, dsn: str | None, workdir: Path,
                      base_turns: int = 100, forks: int = 50, fork_turns: int = 5,
                      log: Callable[[str], None] = lambda _: None
                      ) -> tuple[list[LinearPoint], list[ForkResult]]:
    """Scenarios 1 and 2 with ImmAgentSaver, the linear one to ``turns[backend]``."""
    linear: list[LinearPoint] = []
    fork_results: list[ForkResult] = []
    for backend, n in turns.items():
        log(f"ImmAgentSaver/{backend}: linear to {n} turns")
        linear += await run_linear(backend, curve_points(n), dsn=dsn, workdir=workdir)
        log(f"ImmAgentSaver/{backend}: forks")
        fork_results.append(await run_forks(backend, dsn=dsn, workdir=workdir,
                                            base_turns=base_turns, forks=forks,
                                            fork_turns=fork_turns))
    return linear, fork_results


# --- per-invoke latency -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _checkpointer(system: System, backend: Backend, dsn: str | None,
                        workdir: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    if system == SYSTEM:
        async with open_saver(backend, dsn, workdir, "latency") as (saver, _):
            yield saver
    else:
        async with theirs.open_saver(backend, dsn, workdir) as (lg_saver, _):
            yield lg_saver


async def invoke_latency(system: System, backend: Backend, history_turns: int, *,
                         dsn: str | None, workdir: Path, samples: int = 15) -> Latency:
    """``ainvoke`` times of ``system`` ("immagent-saver" or "langgraph") on a thread given
    ``history_turns`` turns of history in one ``aupdate_state``."""
    async with _checkpointer(system, backend, dsn, workdir) as saver:
        graph = theirs.build_graph(saver)
        thread = f"latency{history_turns}"
        history: list[Any] = []
        for turn in range(history_turns):
            text = user_text(thread, turn)
            history += [HumanMessage(content=text), AIMessage(content=reply_text(text))]
        if history:
            await graph.aupdate_state(_config(thread), {"messages": history}, as_node="reply")
        await _advance(graph, thread, range(history_turns, history_turns + 1))  # warm up
        times: list[float] = []
        for turn in range(history_turns + 1, history_turns + 1 + samples):
            with Timer() as timer:
                await _advance(graph, thread, range(turn, turn + 1))
            times.append(timer.seconds)
    return Latency(backend, OPERATION, history_turns, tuple(times), system=system)


async def run_latency(backends: Sequence[Backend], *, dsn: str | None, workdir: Path,
                      history: Sequence[int] = (10, 1000), samples: int = 15,
                      log: Callable[[str], None] = lambda _: None) -> list[Latency]:
    """Per-invoke latency of ImmAgentSaver and of LangGraph's saver on each backend, at
    each history length (run it with nothing else running)."""
    out: list[Latency] = []
    for backend in backends:
        systems: tuple[System, ...] = (SYSTEM, "langgraph")
        for system in systems:
            for turns in history:
                log(f"{system}/{backend}: invoke latency at {turns} turns")
                out.append(await invoke_latency(system, backend, turns, dsn=dsn,
                                                workdir=workdir, samples=samples))
    return out


# --- targets and tables --------------------------------------------------------------------


def _at(points: Sequence[LinearPoint], system: str, backend: str,
        turns: int) -> LinearPoint | None:
    return next((p for p in points if (p.system, p.backend, p.turns) == (system, backend,
                                                                          turns)), None)


def _target(name: str, ok: bool | None, detail: str) -> dict[str, str]:
    return {"target": name, "status": "PASS" if ok else "MISS" if ok is not None else "N/A",
            "detail": detail}


def _agent_point(points: Sequence[LinearPoint], backend: str,
                 turns: int) -> LinearPoint | None:
    """PersistentAgent's bytes for the same conversation: through ``advance``, else
    through ``Store.append``."""
    return _at(points, "immagent", backend, turns) or _at(points, "immagent-append", backend,
                                                          turns)


def check_targets(linear: Sequence[LinearPoint], forks: Sequence[ForkResult],
                  latency: Sequence[Latency]) -> list[dict[str, str]]:
    """Issue 12's targets per backend, at the longest thread the saver ran there; the
    LangGraph ("langgraph") and PersistentAgent points come from the same run."""
    out: list[dict[str, str]] = []
    for backend in sorted({p.backend for p in linear if p.system == SYSTEM}):
        tag = f"[{backend}] ImmAgentSaver"
        n = max(p.turns for p in linear if (p.system, p.backend) == (SYSTEM, backend))
        hi, lo = _at(linear, SYSTEM, backend, n), _at(linear, SYSTEM, backend, 100)
        empty = _at(linear, SYSTEM, backend, 0)
        assert hi is not None
        versus = _at(linear, "langgraph", backend, n)
        required = backend == "postgres"
        if versus is not None:
            factor = versus.stored_bytes / hi.stored_bytes
            out.append(_target(
                f"{tag} >= 100x less storage than LangGraph's {backend} saver at N={n}"
                + ("" if required else " (informational)"), factor >= 100,
                f"{factor:,.0f}x ({fmt_bytes(hi.stored_bytes)} vs "
                f"{fmt_bytes(versus.stored_bytes)})"))
        else:
            out.append(_target(f"{tag} >= 100x less storage than LangGraph's {backend} saver"
                               f" at N={n}", None, f"LangGraph's {backend} saver did not run "
                               f"to N={n} in this mode"))
        agent = _agent_point(linear, backend, n)
        if agent is not None:
            ratio = hi.stored_bytes / agent.stored_bytes
            out.append(_target(
                f"{tag} <= 2x PersistentAgent's bytes at N={n}", ratio <= 2,
                f"{ratio:.2f}x ({fmt_bytes(hi.stored_bytes)} vs {fmt_bytes(agent.stored_bytes)}"
                f" through {agent.system}; {hi.bytes_per_turn:,.0f} vs "
                f"{agent.bytes_per_turn:,.0f} B/turn: LangGraph makes 5 rows a turn, "
                "PersistentAgent 1"))
        if lo is not None and empty is not None and n > 100:
            k = growth_exponent(lo.turns, lo.stored_bytes, hi.turns, hi.stored_bytes)
            k_net = growth_exponent(lo.turns, lo.stored_bytes - empty.stored_bytes,
                                    hi.turns, hi.stored_bytes - empty.stored_bytes)
            out.append(_target(f"{tag} growth exponent N=100..{n} <= 1.05", k <= 1.05,
                               f"k = {k:.3f}; {k_net:.3f} without the empty store's "
                               f"{fmt_bytes(empty.stored_bytes)}"))
        out += _latency_target(tag, backend, latency)
        fork = next((f for f in forks if (f.system, f.backend) == (SYSTEM, backend)), None)
        if fork is not None and empty is not None:
            per_turn = (hi.stored_bytes - empty.stored_bytes) / hi.turns
            limit = fork.fork_turns * per_turn + 2 * KIB
            out.append(_target(
                f"{tag} a fork costs its own messages only", fork.bytes_per_fork <= limit,
                f"{fork.bytes_per_fork:,.0f} B/fork for {fork.fork_turns} turns; limit "
                f"{limit:,.0f} B = {fork.fork_turns} x {per_turn:,.0f} B (a linear turn) + "
                f"2 KiB; a copy of the base would add >= {fork.base_turns * per_turn:,.0f} B"))
    return out


def _latency_target(tag: str, backend: str,
                    latency: Sequence[Latency]) -> list[dict[str, str]]:
    mine = {x.history_turns: x for x in latency
            if (x.system, x.backend, x.operation) == (SYSTEM, backend, OPERATION)}
    theirs_lat = {x.history_turns: x for x in latency
                  if (x.system, x.backend, x.operation) == ("langgraph", backend, OPERATION)}
    common = sorted(set(mine) & set(theirs_lat))
    if not common:
        return []
    n, short = common[-1], common[0]
    ours_n, lg_n = mine[n], theirs_lat[n]
    return [_target(
        f"{tag} per-invoke latency at N={n} <= LangGraph's {backend} saver",
        ours_n.p50 <= lg_n.p50,
        f"p50 {ours_n.p50 * 1e3:.1f} ms vs {lg_n.p50 * 1e3:.1f} ms (at N={short}: "
        f"{mine[short].p50 * 1e3:.1f} vs {theirs_lat[short].p50 * 1e3:.1f} ms); both grow "
        "with N because LangGraph decodes the whole message list on every invoke")]


def print_tables(linear: Sequence[LinearPoint], forks: Sequence[ForkResult],
                 latency: Sequence[Latency]) -> None:
    """The saver's numbers beside LangGraph's savers and PersistentAgent, same run."""
    rows: list[list[object]] = []
    for p in (p for p in linear if p.system == SYSTEM and p.turns):
        lg = _at(linear, "langgraph", p.backend, p.turns)
        agent = _agent_point(linear, p.backend, p.turns)
        rows.append([p.backend, p.turns, fmt_bytes(p.stored_bytes),
                     f"{p.bytes_per_turn:,.0f}",
                     fmt_bytes(agent.stored_bytes) if agent else "-",
                     f"{p.stored_bytes / agent.stored_bytes:.2f}" if agent else "-",
                     fmt_bytes(lg.stored_bytes) if lg else "-",
                     f"{lg.stored_bytes / p.stored_bytes:,.0f}x" if lg else "-"])
    if not rows:
        return
    print_table("9. ImmAgentSaver: LangGraph's linear scenario with immagent as the "
                "checkpointer", ["backend", "N", "saver", "bytes/turn", "PersistentAgent",
                                 "saver / agent", "LangGraph saver", "x less"], rows)
    fork_rows = []
    for f in (f for f in forks if f.system == SYSTEM):
        lg_fork = next((g for g in forks if (g.system, g.backend) == ("langgraph", f.backend)),
                       None)
        fork_rows.append([f.backend, f"{f.base_turns} turns = {fmt_bytes(f.base_bytes)}",
                          f"{f.forks} x {f.fork_turns}", f"{f.bytes_per_fork:,.0f}",
                          f"{lg_fork.bytes_per_fork:,.0f}" if lg_fork else "-"])
    print_table("   forks (aupdate_state into a new thread, as LangGraph's run)",
                ["backend", "base", "forks x turns", "saver bytes/fork",
                 "LangGraph bytes/fork"], fork_rows)
    print_table("   per-invoke latency, each checkpointer alone (history given in one update)",
                ["system", "backend", "history turns", "samples", "p50 ms", "p99 ms"],
                [[x.system, x.backend, x.history_turns, len(x.samples), f"{x.p50 * 1e3:.1f}",
                  f"{x.p99 * 1e3:.1f}"] for x in latency if x.operation == OPERATION])


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server DSN (scratch databases are used)")
    parser.add_argument("--turns", type=int, default=1000, help="longest thread")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--no-langgraph", action="store_true",
                        help="skip LangGraph's own runs (their storage numbers)")
    args = parser.parse_args(argv)
    backends: list[Backend] = [b for b in args.backends if b == "sqlite" or args.dsn]

    def log(message: str) -> None:
        print(f"... {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp:
        work = Path(tmp)
        linear, forks = await run_storage(dict.fromkeys(backends, args.turns), dsn=args.dsn,
                                          workdir=work, log=log)
        latency = await run_latency(backends, dsn=args.dsn, workdir=work,
                                    history=(10, args.turns), log=log)
        for backend in backends:
            log(f"PersistentAgent/{backend} (Store.append) and LangGraph/{backend}")
            async with ours.open_store(backend, args.dsn, work, "append") as (store, measure):
                points, _ = await ours.run_append_linear(backend, store, measure,
                                                         curve_points(args.turns))
            linear += points
            if not args.no_langgraph:
                linear += await theirs.run_linear(backend, curve_points(args.turns),
                                                  dsn=args.dsn, workdir=work)
                forks.append(await theirs.run_forks(backend, dsn=args.dsn, workdir=work))
    print_tables(linear, forks, latency)
    print_table("ImmAgentSaver targets", ["status", "target", "detail"],
                [[t["status"], t["target"], t["detail"]]
                 for t in check_targets(linear, forks, latency)])


if __name__ == "__main__":
    asyncio.run(_main())
