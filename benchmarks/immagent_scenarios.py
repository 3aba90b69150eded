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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Backend,
    CorpusStored,
    ForkResult,
    Latency,
    LinearPoint,
    Timer,
    drop_database,
    filler,
    fresh_database,
    percentile,
    remove_sqlite_files,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from benchmarks.corpus import Corpus
from benchmarks.layout import pg_prefix_bytes
from immagent import Message, PersistentAgent, Store

__all__ = [
    "Latency",
    "Maintenance",
    "Overhead",
    "SharedPrompts",
    "Throughput",
    "advance_overhead",
    "advance_rate",
    "append_turns",
    "backend_available",
    "cold_messages",
    "commit_latency",
    "grow",
    "litellm_clock",
    "maintenance",
    "open_store",
    "pg_database",
    "read_latency",
    "run_append_linear",
    "run_corpus",
    "run_forks",
    "run_linear",
    "shared_prompts",
    "store_clock",
    "warm_up",
]

MODEL = "immagent/echo"
SYSTEM_PROMPT = "You are the benchmark agent. Answer every message."
#: The realistic corpus's conversations carry no system prompt of their own; every agent
#: gets this one (stored once).
CORPUS_PROMPT = "You are a helpful assistant."
#: Every relation whose name starts with this counts as immagent's stored bytes (found in
#: the catalog, so schema changes need no edit here).
PG_PREFIX = "immagent_"


def store_path(workdir: Path, label: str) -> Path:
    """The SQLite file of the store ``label`` (for the per-relation breakdown)."""
    return workdir / f"immagent-{label}.db"


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
                    return await pg_prefix_bytes(db_dsn, PG_PREFIX)

                yield store, pg_measure
        finally:
            await drop_database(dsn, pg_database(label))
    else:
        path = store_path(workdir, label)
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


def _turn(thread: str, turn: int) -> list[Message]:
    """One turn of the synthetic texts as plain messages (what ``Store.append`` stores)."""
    text = user_text(thread, turn)
    return [Message(role="user", content=text), Message(role="assistant",
                                                        content=reply_text(text))]


async def append_turns(store: Store, agent: PersistentAgent, thread: str,
                       turns: range) -> PersistentAgent:
    """``Store.append`` of one synthetic turn per step, no model call; the last state."""
    for turn in turns:
        agent = await store.append(agent, _turn(thread, turn))
    return agent


async def run_append_linear(backend: Backend, store: Store, measure: Measure,
                            points: Sequence[int]) -> tuple[list[LinearPoint], PersistentAgent]:
    """Scenario 1 store-only: the linear conversation's texts committed with
    ``Store.append`` (user and assistant Message, no token counts or model metadata), the
    same items SQLiteSession stores. Returns the points and the final state."""
    results = [LinearPoint("immagent-append", backend, 0, await measure(), 0.0)]
    agent = await store.create_agent(name="linear", system_prompt=SYSTEM_PROMPT, model=MODEL)
    done = 0
    elapsed = 0.0
    for point in sorted(points):
        with Timer() as timer:
            agent = await append_turns(store, agent, "linear", range(done, point))
        elapsed += timer.seconds
        done = point
        results.append(LinearPoint("immagent-append", backend, point, await measure(),
                                   elapsed))
    return results, agent


async def run_corpus(backend: Backend, store: Store, measure: Measure, corpus: Corpus, *,
                     tasks: int = 4) -> CorpusStored:
    """The realistic corpus: one agent per conversation (one shared system prompt), advanced
    turn by turn with ``Store.append`` of the user and the assistant message; every state
    is kept. ``tasks`` conversations are written at a time."""
    empty = await measure()
    queue = list(reversed(corpus.conversations))
    heads: dict[str, PersistentAgent] = {}

    async def worker() -> None:
        while queue:
            conversation = queue.pop()
            agent = await store.create_agent(name=conversation.name,
                                             system_prompt=CORPUS_PROMPT, model=MODEL)
            for user, answer in conversation.turns:
                agent = await store.append(agent, [Message(role="user", content=user),
                                                   Message(role="assistant", content=answer)])
            heads[conversation.name] = agent

    with Timer() as timer:
        await asyncio.gather(*(worker() for _ in range(tasks)))
    last = corpus.conversations[-1]
    store.clear_cache()
    if [m.content for m in await heads[last.name].get_messages()] != [
            t for turn in last.turns for t in turn]:
        raise RuntimeError(f"immagent's agent {last.name} differs from the corpus")
    return CorpusStored("immagent", backend, len(corpus.conversations), corpus.turns,
                        corpus.raw_bytes, empty, await measure(), timer.seconds)


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
        step = _turn("commit", turn)
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


async def cold_messages(backend: Backend, store: Store, agent: PersistentAgent,
                        history_turns: int, samples: int) -> Latency:
    """``get_messages`` after ``clear_cache()`` on the store-only agent (the conversation
    SQLiteSession's ``get_items`` reads)."""
    times: list[float] = []
    for _ in range(samples):
        store.clear_cache()
        start = time.perf_counter()
        messages = await agent.get_messages()
        times.append(time.perf_counter() - start)
    if len(messages) != 2 * history_turns:
        raise RuntimeError(f"agent holds {len(messages)} messages, expected {2 * history_turns}")
    return Latency(backend, "get_messages (cold)", history_turns, tuple(times),
                   "immagent-append")


class Clock:
    """Total time spent inside some wrapped coroutine functions and how often they ran."""

    seconds: float = 0.0
    calls: int = 0
    _depth: int = 0


@contextlib.contextmanager
def clock_on(owner: Any, names: Sequence[str]) -> Iterator[Clock]:
    """Wrap the coroutine functions ``owner.<name>`` for the duration, timing every call
    (a call made inside another wrapped call is not counted twice).

    The benchmark instruments its own process this way (tests never do): immagent calls
    ``litellm.acompletion`` through the module attribute and ``Store.advance`` calls the
    store's public methods through ``self``, so the wrappers see each call.
    """
    clock = Clock()
    originals = {name: getattr(owner, name) for name in names}

    def wrap(original: Any) -> Any:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            outer = clock._depth == 0
            clock._depth += 1
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                clock._depth -= 1
                if outer:
                    clock.seconds += time.perf_counter() - start
                    clock.calls += 1

        return timed

    for name, original in originals.items():
        setattr(owner, name, wrap(original))
    try:
        yield clock
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


def litellm_clock() -> contextlib.AbstractContextManager[Clock]:
    """Time every ``litellm.acompletion`` call (the model call, LiteLLM included)."""
    import litellm

    return clock_on(litellm, ["acompletion"])


def store_clock() -> contextlib.AbstractContextManager[Clock]:
    """Time the store calls an advance makes: read the history and the prompt, commit."""
    return clock_on(Store, ["get_messages", "get_system_prompt", "append"])


@dataclass(frozen=True)
class Overhead:
    """Per-advance samples, seconds: the whole ``advance``, the part inside LiteLLM, and
    the part inside the store's read and commit calls."""

    backend: Backend
    history_turns: int
    cache: str  # "warm": history in the store's cache; "cold": cleared before each advance
    advance: tuple[float, ...]
    model_call: tuple[float, ...]
    store_calls: tuple[float, ...]
    calls: int  # LiteLLM calls seen; 0 means the model was answered without LiteLLM
    store_call_count: int  # 0 means advance no longer goes through the public methods

    @property
    def overhead(self) -> tuple[float, ...]:
        """Everything but the model call: read history, build the request, commit."""
        return tuple(a - m for a, m in zip(self.advance, self.model_call, strict=True))

    def p(self, which: str, q: float) -> float:
        values: tuple[float, ...] = getattr(self, which)
        return percentile(values, q)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "history_turns": self.history_turns,
                               "cache": self.cache, "samples": len(self.advance),
                               "litellm_calls": self.calls,
                               "store_calls": self.store_call_count}
        for which in ("advance", "model_call", "overhead", "store_calls"):
            out[f"{which}_p50_s"] = self.p(which, 50)
            out[f"{which}_p99_s"] = self.p(which, 99)
        return out


async def advance_overhead(backend: Backend, store: Store, agent: PersistentAgent,
                           history_turns: int, samples: int, *, cold: bool) -> Overhead:
    """``samples`` sequential advances of a clone of ``agent`` with the echo model, each
    split into the time inside ``litellm.acompletion`` and the rest (immagent's own
    per-advance work). Warm: the history is in the cache, as in a serving process; cold:
    the cache is cleared before each advance, so the history is read from the database."""
    clone = await agent.clone()
    clone = await clone.advance(user_text("overhead", 0))  # history into the cache
    advance: list[float] = []
    model: list[float] = []
    in_store: list[float] = []
    with litellm_clock() as llm, store_clock() as stored:
        for turn in range(1, samples + 1):
            if cold:
                store.clear_cache()
            llm_before, store_before = llm.seconds, stored.seconds
            start = time.perf_counter()
            clone = await clone.advance(user_text("overhead", turn))
            advance.append(time.perf_counter() - start)
            model.append(llm.seconds - llm_before)
            in_store.append(stored.seconds - store_before)
    return Overhead(backend, history_turns, "cold" if cold else "warm", tuple(advance),
                    tuple(model), tuple(in_store), llm.calls, stored.calls)


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

