"""The benchmark scenarios on immagent's own stores (PostgreSQL and SQLite).

Every conversation turn goes through the real path: ``agent.advance(text)`` calls the
offline model ``immagent/echo`` through LiteLLM, and the store commits the new state.
Only the store-only commit cost and the gc/verify corpus use ``Store.append`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Backend,
    ForkResult,
    LinearPoint,
    Timer,
    drop_database,
    filler,
    fresh_database,
    percentile,
    pg_relation_bytes,
    remove_sqlite_files,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from immagent import Message, PersistentAgent, Store

__all__ = [
    "Latency",
    "Maintenance",
    "SharedPrompts",
    "Throughput",
    "advance_rate",
    "backend_available",
    "commit_latency",
    "grow",
    "maintenance",
    "open_store",
    "pg_database",
    "read_latency",
    "run_forks",
    "run_linear",
    "shared_prompts",
    "warm_up",
]

MODEL = "immagent/echo"
SYSTEM_PROMPT = "You are the benchmark agent. Answer every message."
#: immagent's PostgreSQL tables; all of them count as stored bytes.
PG_TABLES = ("immagent_assets", "immagent_states", "immagent_schema")


def pg_database(label: str) -> str:
    """Scratch database of one store: per process and label, dropped when the store closes."""
    return f"immagent_bench_{os.getpid()}_{label}"


Measure = Callable[[], Awaitable[int]]


def backend_available(backend: Backend) -> bool:
    """Whether this checkout has the immagent backend module for ``backend``."""
    return importlib.util.find_spec(f"immagent.store.{backend}") is not None


@contextlib.asynccontextmanager
async def open_store(backend: Backend, dsn: str | None, workdir: Path,
                     label: str) -> AsyncIterator[tuple[Store, Measure]]:
    """A fresh, empty store (its own database or file, named by ``label``) and a function
    measuring its bytes. Stores open at the same time need different labels."""
    if backend == "postgres":
        if dsn is None:
            raise ValueError("the postgres backend needs a DSN")
        db_dsn = await fresh_database(dsn, pg_database(label))
        try:
            async with await Store.connect(db_dsn) as store:
                await store.init_schema()

                async def pg_measure() -> int:
                    return await pg_relation_bytes(db_dsn, PG_TABLES)

                yield store, pg_measure
        finally:
            await drop_database(dsn, pg_database(label))
    else:
        path = workdir / f"immagent-{label}.db"
        remove_sqlite_files(path)
        try:
            async with await Store.connect(f"sqlite:///{path}") as store:
                await store.init_schema()

                async def sqlite_measure() -> int:
                    return await asyncio.to_thread(sqlite_file_bytes, path)

                yield store, sqlite_measure
        finally:
            remove_sqlite_files(path)


async def warm_up(store: Store) -> None:
    """One advance, so LiteLLM's import (seconds) is never inside a timed block."""
    agent = await store.create_agent(name="warm-up", system_prompt=SYSTEM_PROMPT, model=MODEL)
    await agent.advance("warm up")


async def grow(agent: PersistentAgent, thread: str, turns: range) -> PersistentAgent:
    """Advance ``agent`` once per turn with that turn's user text; returns the last state."""
    for turn in turns:
        agent = await agent.advance(user_text(thread, turn))
    return agent


# --- scenario 1 and 2: storage growth and forks ---------------------------------------


async def run_linear(backend: Backend, store: Store, measure: Measure,
                     points: Sequence[int]) -> tuple[list[LinearPoint], PersistentAgent]:
    """One agent advanced to max(points) turns, measured in the empty store and at each
    point. Returns the points and the final state, for the speed scenarios."""
    results = [LinearPoint("immagent", backend, 0, await measure(), 0.0)]
    agent = await store.create_agent(name="linear", system_prompt=SYSTEM_PROMPT, model=MODEL)
    done = 0
    elapsed = 0.0
    for point in sorted(points):
        with Timer() as timer:
            agent = await grow(agent, "linear", range(done, point))
        elapsed += timer.seconds
        done = point
        results.append(LinearPoint("immagent", backend, point, await measure(), elapsed))
    await _check_payload(agent, "linear", done)
    return results, agent


async def _check_payload(agent: PersistentAgent, thread: str, turns: int) -> None:
    """Fail loudly if the offline model's replies drifted from what LangGraph's node stores."""
    messages = await agent.get_messages()
    expected = [text for t in range(turns) for u in [user_text(thread, t)]
                for text in (u, reply_text(u))]
    if [m.content for m in messages] != expected:
        raise RuntimeError("immagent/echo replies differ from benchmarks.common.reply_text; "
                           "the two systems would not store the same payload")


async def run_forks(backend: Backend, store: Store, measure: Measure, *, base_turns: int = 100,
                    forks: int = 50, fork_turns: int = 5) -> ForkResult:
    """A base agent, then ``forks`` clones of its last state, each advanced ``fork_turns``."""
    base = await store.create_agent(name="base", system_prompt=SYSTEM_PROMPT, model=MODEL)
    with Timer() as timer:
        base = await grow(base, "base", range(base_turns))
        base_bytes = await measure()
        for index in range(forks):
            await grow(await base.clone(), f"fork{index}", range(fork_turns))
    total = await measure()
    return ForkResult("immagent", backend, base_turns, forks, fork_turns, base_bytes, total,
                      timer.seconds)


# --- scenario 3: shared system prompts ------------------------------------------------


@dataclass(frozen=True)
class SharedPrompts:
    """``agents`` agents, each advanced ``turns`` times, sharing one prompt or not."""

    backend: Backend
    agents: int
    turns: int
    prompt_bytes: int
    shared_bytes: int
    unique_bytes: int
    seconds: float

    @property
    def saved_bytes(self) -> int:
        return self.unique_bytes - self.shared_bytes

    @property
    def ratio(self) -> float:
        """Stored bytes with one shared prompt / with a distinct prompt per agent."""
        return self.shared_bytes / self.unique_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_bytes": self.saved_bytes, "ratio": self.ratio}


async def _prompt_fleet(store: Store, agents: int, turns: int, prompt: Callable[[int], str],
                        tasks: int = 8) -> None:
    """Create ``agents`` agents and advance each ``turns`` times, ``tasks`` at a time."""
    queue = list(range(agents))

    async def worker() -> None:
        while queue:
            index = queue.pop()
            agent = await store.create_agent(name=f"agent{index}", system_prompt=prompt(index),
                                             model=MODEL)
            await grow(agent, f"agent{index}", range(turns))

    await asyncio.gather(*(worker() for _ in range(tasks)))


async def shared_prompts(backend: Backend, dsn: str | None, workdir: Path, *, agents: int,
                         turns: int = 3, prompt_bytes: int = 4096) -> SharedPrompts:
    """Scenario 3: the same fleet twice, once with one shared prompt, once with distinct
    prompts of the same size (what a store without deduplication holds)."""
    shared = filler("shared prompt", prompt_bytes)
    sizes: list[int] = []
    with Timer() as timer:
        for distinct in (False, True):
            label = "distinct" if distinct else "shared"
            async with open_store(backend, dsn, workdir, label) as (store, measure):
                before = await measure()

                def prompt(index: int, distinct: bool = distinct) -> str:
                    return filler(f"prompt {index}", prompt_bytes) if distinct else shared

                await _prompt_fleet(store, agents, turns, prompt)
                sizes.append(await measure() - before)
    return SharedPrompts(backend, agents, turns, prompt_bytes, sizes[0], sizes[1], timer.seconds)


# --- scenario 4: speed ----------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Advances per second of ``tasks`` concurrent tasks at a given history length."""

    backend: Backend
    history_turns: int
    tasks: int
    advances: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.advances / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "advances_per_second": self.per_second}


@dataclass(frozen=True)
class Latency:
    """Latency samples of one operation, in seconds."""

    backend: Backend
    operation: str
    history_turns: int
    samples: tuple[float, ...]

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "operation": self.operation,
                "history_turns": self.history_turns, "count": len(self.samples),
                "p50_s": self.p50, "p99_s": self.p99,
                "mean_s": sum(self.samples) / len(self.samples)}


async def advance_rate(backend: Backend, agent: PersistentAgent, history_turns: int, *,
                       tasks: int, steps: int) -> Throughput:
    """``tasks`` clones of ``agent`` advanced ``steps`` times each, concurrently.

    The clones share the whole history, so every task starts at the same length; the
    store's cache is warm, as in a process that keeps serving its agents.
    """
    clones = [await agent.clone() for _ in range(tasks)]
    for index, clone in enumerate(clones):  # one untimed step each: history into the cache
        clones[index] = await clone.advance(user_text(f"speed{index}", 0))
    with Timer() as timer:
        await asyncio.gather(*(grow(clone, f"speed{index}", range(1, steps + 1))
                               for index, clone in enumerate(clones)))
    return Throughput(backend, history_turns, tasks, tasks * steps, timer.seconds)


async def commit_latency(backend: Backend, store: Store, agent: PersistentAgent,
                         history_turns: int, samples: int) -> Latency:
    """The store-only cost of one step: ``Store.append`` of a user message and its reply
    (no model call), sequentially on one agent."""
    times: list[float] = []
    for turn in range(samples):
        text = user_text("commit", turn)
        step = [Message(role="user", content=text),
                Message(role="assistant", content=reply_text(text))]
        start = time.perf_counter()
        agent = await store.append(agent, step)
        times.append(time.perf_counter() - start)
    return Latency(backend, "commit one step (store only)", history_turns, tuple(times))


async def read_latency(backend: Backend, store: Store, agent: PersistentAgent,
                       history_turns: int, samples: int) -> list[Latency]:
    """``get_messages`` and ``get_lineage`` on ``agent``, each after ``clear_cache()``;
    and ``get_messages`` warm, for contrast."""
    results: list[Latency] = []
    operations: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("get_messages (cold)", agent.get_messages),
        ("get_lineage (cold)", agent.get_lineage),
        ("get_messages (warm)", agent.get_messages),
    ]
    for name, call in operations:
        times: list[float] = []
        for _ in range(samples):
            if "cold" in name:
                store.clear_cache()
            start = time.perf_counter()
            await call()
            times.append(time.perf_counter() - start)
        results.append(Latency(backend, name, history_turns, tuple(times)))
    return results


# --- scenario 5: gc and verify --------------------------------------------------------


@dataclass(frozen=True)
class Maintenance:
    """Throughput of one whole-store operation."""

    backend: Backend
    operation: str
    assets: int
    body_bytes: int
    seconds: float
    detail: str

    @property
    def assets_per_second(self) -> float:
        return self.assets / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.body_bytes / 1e6 / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "assets_per_second": self.assets_per_second,
                "mb_per_second": self.mb_per_second}


async def _build_corpus(store: Store, lineages: int, steps: int,
                        messages_per_step: int) -> list[PersistentAgent]:
    """``lineages`` agents of ``steps`` committed steps of ``messages_per_step`` messages."""
    heads: list[PersistentAgent] = []
    for lineage in range(lineages):
        agent = await store.create_agent(name=f"corpus{lineage}", system_prompt=SYSTEM_PROMPT,
                                         model=MODEL)
        for step in range(steps):
            batch = [Message(role="user", content=user_text(f"c{lineage}s{step}", m))
                     for m in range(messages_per_step)]
            agent = await store.append(agent, batch)
        heads.append(agent)
    return heads


async def maintenance(backend: Backend, dsn: str | None, workdir: Path, *, lineages: int,
                      steps: int = 50, messages_per_step: int = 100) -> list[Maintenance]:
    """Scenario 5: verify a corpus of lineages*steps*(messages_per_step+1) assets, then
    delete every state of half the lineages and gc (sweeping about half the assets)."""
    results: list[Maintenance] = []
    async with open_store(backend, dsn, workdir, "corpus") as (store, _measure):
        heads = await _build_corpus(store, lineages, steps, messages_per_step)
        stats = await store.stats()
        with Timer() as timer:
            report = await store.verify()
        detail = "ok" if report.ok else f"{report.problems} problems"
        results.append(Maintenance(backend, "verify", report.assets_checked,
                                   report.bytes_checked, timer.seconds, detail))
        for head in heads[: lineages // 2]:
            await store.delete_lineage(head)
        with Timer() as timer:
            swept = await store.gc()
        results.append(Maintenance(
            backend, "gc", swept.assets_removed + swept.assets_kept, stats.payload_bytes,
            timer.seconds, f"removed {swept.assets_removed}, kept {swept.assets_kept}"))
    return results

