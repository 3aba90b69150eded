"""LangGraph's DeltaChannel mode as a baseline: ImmAgentSaver beside LangGraph's own savers.

LangGraph 1.2 ships ``DeltaChannel`` (beta), its own answer to checkpoints that copy the
whole message list at every step: a delta channel stores only the writes, plus a full
snapshot every ``snapshot_frequency`` (100) updates, and rebuilds the value by replaying
the writes since the nearest snapshot (``get_delta_channel_history``). This module runs the
same chat graph in both of LangGraph's modes on each saver, one thread built turn by turn
with one ``ainvoke`` per turn as an application builds it (never one ``aupdate_state`` of
the whole history):

* ``default``: ``messages: Annotated[list, add_messages]`` (every checkpoint holds the
  whole list: quadratic bytes on LangGraph's savers);
* ``delta``: ``messages: Annotated[list, DeltaChannel(add_messages over a batch)]``.

Savers: ``AsyncSqliteSaver`` and ``AsyncPostgresSaver`` (system ``langgraph``), and
``ImmAgentSaver`` on an immagent store on the same SQLite / PostgreSQL (``immagent-saver``).
Measured per (system, backend, mode), each configuration alone, one after another:

* per-invoke latency: at each history length (10, 100 and 1000 turns; quick mode stops
  the default-mode threads at 300), the median of a few timed ``ainvoke`` calls continuing
  the thread;
* stored bytes at the longest thread (PostgreSQL: the saver's relations; SQLite: the file
  after a WAL checkpoint);
* cold ``aget_state``: a NEW saver (new connection, nothing cached) opened on the store,
  then the time of ``graph.aget_state`` alone, repeated with a fresh saver each time;
* sync ``invoke`` latency (SQLite only): ``SqliteSaver`` and ``ImmAgentSaver`` used
  synchronously, as scripts and web apps use them, at 10 and 1000 turns.

The targets are issue 22's for the saver (printed PASS/MISS; same run, same machine):
per-invoke latency <= LangGraph's saver on the same backend in the same mode; bytes <= 0.5x
LangGraph's DeltaChannel mode on the same backend; cold ``aget_state`` <= AsyncSqliteSaver's
default and delta modes (on PostgreSQL: within 1.2x of AsyncPostgresSaver's).

Run alone: ``python -m benchmarks.langgraph_delta [--full] [--dsn postgresql://...]``;
``benchmarks.run`` calls ``run`` and ``report`` at the end, when nothing else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from benchmarks.common import (
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
from benchmarks.layout import pg_prefix_bytes

__all__ = ["Run", "Sizes", "check_targets", "report", "run", "run_and_report"]

Mode = Literal["default", "delta"]
MODES: Final[tuple[Mode, ...]] = ("default", "delta")
SAVER: Final = "immagent-saver"
PEER: Final = "langgraph"
#: LangGraph's tables (AsyncPostgresSaver.setup) and immagent's relation prefix.
PG_TABLES: Final = ("checkpoints", "checkpoint_blobs", "checkpoint_writes",
                    "checkpoint_migrations")
PG_PREFIX: Final = "immagent_"
#: Bytes target: ImmAgentSaver <= this x LangGraph's DeltaChannel mode (issue 22).
BYTES_VS_DELTA: Final = 0.5
#: Cold-read target on PostgreSQL: within this factor of AsyncPostgresSaver (issue 22).
PG_READ_FACTOR: Final = 1.2


@dataclass(frozen=True)
class Sizes:
    """History lengths and sample counts. Quick mode (``make bench``) builds delta threads
    and the sync threads to 1000 turns (issue 23's lengths) but the async default-mode
    threads only to 300: LangGraph's default mode stores the whole list at every
    checkpoint (~1.2 GB and ~8 min at 1000 turns on SQLite), which ``--full`` pays."""

    points: tuple[int, ...] = (10, 100, 300)
    delta_points: tuple[int, ...] = (10, 100, 1000)
    samples: int = 5
    cold_reads: int = 5
    sync_points: tuple[int, ...] = (10, 1000)

    @classmethod
    def full(cls) -> Sizes:
        return cls(points=(10, 100, 1000), delta_points=(10, 100, 1000), samples=9,
                   cold_reads=9, sync_points=(10, 1000))

    def points_of(self, mode: Mode) -> tuple[int, ...]:
        """The history lengths timed in ``mode``."""
        return self.delta_points if mode == "delta" else self.points


# -- the graph --------------------------------------------------------------------------


def _add_all(state: Any, writes: Sequence[Any]) -> Any:
    """``add_messages`` over a batch of writes: the batching-invariant reducer a
    ``DeltaChannel`` requires (applying two batches in turn = applying them at once)."""
    for write in writes:
        state = add_messages(state, write)
    return state


class DefaultState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class DeltaState(TypedDict):
    messages: Annotated[list[AnyMessage], DeltaChannel(_add_all)]


def _reply(state: dict[str, Any]) -> dict[str, list[AnyMessage]]:
    """The only node: the canned reply to the last user message (benchmarks.common)."""
    return {"messages": [AIMessage(content=reply_text(str(state["messages"][-1].content)))]}


def build_graph(checkpointer: BaseCheckpointSaver[Any], mode: Mode) -> Any:
    """START -> reply -> END over ``messages`` in ``mode``, checkpointed by ``checkpointer``."""
    builder: Any = StateGraph(DeltaState if mode == "delta" else DefaultState)
    builder.add_node("reply", _reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=checkpointer)


THREAD: Final = "chat"


def _config() -> RunnableConfig:
    return {"configurable": {"thread_id": THREAD}}


def _turn_input(turn: int) -> dict[str, list[AnyMessage]]:
    return {"messages": [HumanMessage(content=user_text(THREAD, turn))]}


def _expected(turns: int) -> list[str]:
    return [text for t in range(turns) for u in [user_text(THREAD, t)]
            for text in (u, reply_text(u))]


# -- savers: a fresh store per configuration, and new savers on it ------------------------


@dataclass
class _Place:
    """Where one configuration stores its thread: a scratch database or file."""

    system: str
    backend: str
    dsn: str | None  # the scratch database (PostgreSQL)
    path: Path  # the scratch file (SQLite)

    @contextlib.asynccontextmanager
    async def saver(self) -> AsyncIterator[BaseCheckpointSaver[Any]]:
        """A NEW async saver on this place (its own connection, nothing cached)."""
        if self.system == SAVER:
            from immagent.integrations.langgraph import ImmAgentSaver

            target = self.dsn if self.backend == "postgres" else f"sqlite:///{self.path}"
            assert target is not None
            async with ImmAgentSaver.from_conn_string(target) as ours:
                await ours.setup()
                yield ours
        elif self.backend == "postgres":
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

            assert self.dsn is not None
            async with AsyncPostgresSaver.from_conn_string(self.dsn) as pg:
                await pg.setup()
                yield pg
        else:
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            async with AsyncSqliteSaver.from_conn_string(str(self.path)) as lite:
                await lite.setup()
                yield lite

    @contextlib.contextmanager
    def sync_saver(self) -> Iterator[BaseCheckpointSaver[Any]]:
        """A NEW sync saver on this place (SQLite)."""
        if self.system == SAVER:
            from immagent.integrations.langgraph import ImmAgentSaver

            with ImmAgentSaver.from_conn_string(f"sqlite:///{self.path}") as ours:
                ours.setup()
                yield ours
        else:
            from langgraph.checkpoint.sqlite import SqliteSaver

            with SqliteSaver.from_conn_string(str(self.path)) as lite:
                lite.setup()
                yield lite

    async def stored_bytes(self) -> int:
        if self.backend == "postgres":
            assert self.dsn is not None
            if self.system == SAVER:
                return await pg_prefix_bytes(self.dsn, PG_PREFIX)
            return await pg_relation_bytes(self.dsn, PG_TABLES)
        return await asyncio.to_thread(sqlite_file_bytes, self.path)


@contextlib.asynccontextmanager
async def _place(system: str, backend: str, dsn: str | None, workdir: Path,
                 label: str) -> AsyncIterator[_Place]:
    name = f"immagent_bench_{os.getpid()}_delta_{label}"
    path = workdir / f"{name}.db"
    if backend == "postgres":
        if dsn is None:
            raise ValueError("the postgres backend needs a DSN")
        place = _Place(system, backend, await fresh_database(dsn, name), path)
        try:
            yield place
        finally:
            await drop_database(dsn, name)
    else:
        remove_sqlite_files(path)
        try:
            yield _Place(system, backend, None, path)
        finally:
            remove_sqlite_files(path)


# -- one configuration ---------------------------------------------------------------------


@dataclass
class Run:
    """Everything measured for one (system, backend, mode)."""

    system: str
    backend: str
    mode: str
    turns: int = 0
    #: history turns -> seconds of each timed invoke there
    invoke: dict[int, list[float]] = field(default_factory=dict)
    stored_bytes: int = 0
    cold_read: list[float] = field(default_factory=list)
    #: history turns -> seconds of each timed sync invoke (SQLite)
    sync_invoke: dict[int, list[float]] = field(default_factory=dict)
    note: str = ""

    def p50(self, turns: int, *, sync: bool = False) -> float | None:
        samples = (self.sync_invoke if sync else self.invoke).get(turns)
        return statistics.median(samples) if samples else None

    @property
    def cold(self) -> float | None:
        return statistics.median(self.cold_read) if self.cold_read else None

    @property
    def label(self) -> str:
        name = {SAVER: "ImmAgentSaver", PEER: {"postgres": "AsyncPostgresSaver",
                                               "sqlite": "AsyncSqliteSaver"}[self.backend]}
        return f"{name[self.system]} {self.mode}"


async def run_one(system: str, backend: str, mode: Mode, sizes: Sizes, *, dsn: str | None,
                  workdir: Path) -> Run:
    """Build the thread turn by turn, timing invokes at each history length; then its bytes,
    the cold reads, and (SQLite, default mode) the sync invokes."""
    result = Run(system, backend, mode)
    async with _place(system, backend, dsn, workdir, f"{system}_{mode}") as place:
        async with place.saver() as saver:
            graph = build_graph(saver, mode)
            done = 0
            for point in sizes.points_of(mode):
                while done < point:
                    await graph.ainvoke(_turn_input(done), _config())
                    done += 1
                times = []
                for _ in range(sizes.samples):
                    start = time.perf_counter()
                    await graph.ainvoke(_turn_input(done), _config())
                    times.append(time.perf_counter() - start)
                    done += 1
                result.invoke[point] = times
            result.turns = done
        result.stored_bytes = await place.stored_bytes()
        for _ in range(sizes.cold_reads):
            async with place.saver() as fresh:
                graph = build_graph(fresh, mode)
                start = time.perf_counter()
                state = await graph.aget_state(_config())
                result.cold_read.append(time.perf_counter() - start)
            got = [m.content for m in state.values["messages"]]
            if got != _expected(done):
                raise RuntimeError(f"{result.label} on {backend} gave {len(got)} messages back, "
                                   f"not the {2 * done} it was given")
    return result


def sync_run(system: str, sizes: Sizes, workdir: Path) -> Run:
    """Sync ``invoke`` latency on SQLite (default mode), the thread built turn by turn with
    sync invokes. Runs outside any event loop, as a sync application does."""
    result = Run(system, "sqlite", "default")
    path = workdir / f"immagent_bench_{os.getpid()}_sync_{system}.db"
    remove_sqlite_files(path)
    place = _Place(system, "sqlite", None, path)
    try:
        with place.sync_saver() as saver:
            graph = build_graph(saver, "default")
            done = 0
            for point in sizes.sync_points:
                while done < point:
                    graph.invoke(_turn_input(done), _config())
                    done += 1
                times = []
                for _ in range(sizes.samples):
                    start = time.perf_counter()
                    graph.invoke(_turn_input(done), _config())
                    times.append(time.perf_counter() - start)
                    done += 1
                result.sync_invoke[point] = times
            result.turns = done
            state = graph.get_state(_config())
            if [m.content for m in state.values["messages"]] != _expected(done):
                raise RuntimeError(f"sync {system} lost messages")
        result.stored_bytes = sqlite_file_bytes(path)
    finally:
        remove_sqlite_files(path)
    return result


async def run(backends: Sequence[str], sizes: Sizes, *, dsn: str | None, workdir: Path,
              log: Callable[[str], None] = lambda _: None) -> list[Run]:
    """Every configuration, one after another (nothing else should run meanwhile)."""
    runs: list[Run] = []
    for backend in backends:
        for mode in MODES:
            for system in (PEER, SAVER):
                log(f"{system}/{backend}/{mode}: thread to {sizes.points_of(mode)[-1]} turns")
                runs.append(await run_one(system, backend, mode, sizes, dsn=dsn,
                                          workdir=workdir))
    if "sqlite" in backends:
        for system in (PEER, SAVER):
            log(f"{system}/sqlite: sync invoke to {sizes.sync_points[-1]} turns")
            runs.append(await asyncio.to_thread(sync_run, system, sizes, workdir))
    return runs


# -- targets and tables -------------------------------------------------------------------


def _find(runs: Sequence[Run], system: str, backend: str, mode: str, *,
          sync: bool = False) -> Run | None:
    return next((r for r in runs if (r.system, r.backend, r.mode) == (system, backend, mode)
                 and bool(r.sync_invoke) == sync and not r.note), None)


def _target(name: str, ok: bool | None, detail: str) -> dict[str, str]:
    return {"target": name, "status": "PASS" if ok else "MISS" if ok is not None else "N/A",
            "detail": detail}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def check_targets(runs: Sequence[Run]) -> list[dict[str, str]]:
    """Issue 22's saver targets, per backend and ImmAgentSaver mode."""
    out: list[dict[str, str]] = []
    for backend in sorted({r.backend for r in runs if r.system == SAVER and not r.note}):
        delta_peer = _find(runs, PEER, backend, "delta")
        default_peer = _find(runs, PEER, backend, "default")
        for mode in MODES:
            ours = _find(runs, SAVER, backend, mode)
            peer = _find(runs, PEER, backend, mode)
            if ours is None or peer is None:
                continue
            tag = f"[{backend}] ImmAgentSaver ({mode} graph)"
            for point in sorted(set(ours.invoke) & set(peer.invoke)):
                a, b = ours.p50(point), peer.p50(point)
                assert a is not None and b is not None
                out.append(_target(f"{tag} per-invoke at {point} turns <= {peer.label}",
                                   a <= b, f"p50 {_ms(a)} vs {_ms(b)} ms ({a / b:.2f}x)"))
            # Bytes only compare at one length (quick mode stops default threads early).
            if delta_peer is not None and delta_peer.turns == ours.turns:
                ratio = ours.stored_bytes / delta_peer.stored_bytes
                out.append(_target(
                    f"{tag} bytes <= {BYTES_VS_DELTA}x {delta_peer.label}",
                    ratio <= BYTES_VS_DELTA,
                    f"{ratio:.2f}x ({fmt_bytes(ours.stored_bytes)} vs "
                    f"{fmt_bytes(delta_peer.stored_bytes)} at {ours.turns} turns)"))
            factor = 1.0 if backend == "sqlite" else PG_READ_FACTOR
            for reference in (default_peer, delta_peer):
                if reference is None or ours.cold is None or reference.cold is None \
                        or reference.turns != ours.turns:
                    continue
                bound = "<=" if factor == 1.0 else f"<= {factor}x"
                out.append(_target(
                    f"{tag} cold aget_state {bound} {reference.label}",
                    ours.cold <= factor * reference.cold,
                    f"{_ms(ours.cold)} vs {_ms(reference.cold)} ms, a new saver each time, "
                    f"{ours.turns} turns"))
    return out


def report(runs: Sequence[Run]) -> list[dict[str, str]]:
    """Print the tables and the targets; return the targets."""
    points = sorted({p for r in runs for p in r.invoke})
    rows = [[r.label, r.backend, r.turns, fmt_bytes(r.stored_bytes), _ms(r.cold),
             *(_ms(r.p50(p)) for p in points)]
            for r in runs if r.invoke]
    print_table("10. LangGraph's DeltaChannel mode beside its default mode, every saver "
                "(one thread built turn by turn; each configuration alone)",
                ["saver / mode", "backend", "turns", "stored", "cold aget_state ms",
                 *(f"invoke p50 ms @{p}" for p in points)], rows)
    sync_points = sorted({p for r in runs for p in r.sync_invoke})
    sync_rows = [[r.label.replace("Async", "").replace(" default", ""), r.turns,
                  *(_ms(r.p50(p, sync=True)) for p in sync_points), r.note]
                 for r in runs if r.sync_invoke or (r.note and r.backend == "sqlite")]
    if sync_rows:
        print_table("    sync graph.invoke on SQLite (default mode), thread built turn by turn",
                    ["saver", "turns", *(f"invoke p50 ms @{p}" for p in sync_points), "note"],
                    sync_rows)
    targets = check_targets(runs)
    print_table("DeltaChannel baseline targets (issue 22)", ["status", "target", "detail"],
                [[t["status"], t["target"], t["detail"]] for t in targets])
    return targets


def as_dict(runs: Sequence[Run], targets: Sequence[dict[str, str]]) -> dict[str, Any]:
    return {"runs": [asdict(r) for r in runs], "targets": list(targets)}


def run_and_report(*, full: bool, dsn: str | None, backends: Sequence[str]) -> dict[str, Any]:
    """``benchmarks.run``'s hook: every configuration (PostgreSQL when ``dsn`` is given),
    the tables and targets printed; the numbers for its JSON."""
    chosen = [b for b in backends if b == "sqlite" or (b == "postgres" and dsn)]
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp:
        runs = asyncio.run(run(chosen, Sizes.full() if full else Sizes(), dsn=dsn,
                               workdir=Path(tmp),
                               log=lambda m: print(f"... {m}", file=sys.stderr, flush=True)))
    return as_dict(runs, report(runs))


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server DSN (scratch databases are used)")
    parser.add_argument("--full", action="store_true", help="1000 turns (slow: ~40 min)")
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgres"),
                        default=["sqlite", "postgres"])
    args = parser.parse_args(argv)
    backends = [b for b in args.backends if b == "sqlite" or args.dsn]
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp:
        runs = await run(backends, Sizes.full() if args.full else Sizes(), dsn=args.dsn,
                         workdir=Path(tmp), log=lambda m: print(f"... {m}", flush=True))
    report(runs)


if __name__ == "__main__":
    asyncio.run(_main())
