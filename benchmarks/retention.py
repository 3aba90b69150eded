"""Retention: a run over many states while writers advance, and the bytes keep_latest saves.

    uv run python -m benchmarks.retention [--full] [--dsn DSN] [--json FILE]

Three measurements (each in a scratch database or file of its own):

1. **Scale.** ``streams`` agents with ``per_stream`` states each (one message per state; a
   linear lineage, so each stream has one head), loaded in bulk (loading is not timed),
   then ``apply_retention(keep_latest=10)`` while 4 writer tasks keep advancing agents of
   those streams with ``Store.append``, each on a connection pool of its own (the run is
   timed without its gc; the gc after it is timed apart, the writers still going). Afterwards:
   every writer's newest state and every stream's head is stored and reads back its whole
   history (0 live states lost), ``verify()`` is clean (0 assets lost, nothing dangling),
   and the run's throughput: states judged per second (every state of a governed stream
   is judged) and states deleted per second. Quick: 100,000 states in 400 streams;
   ``--full``: 1,000,000 in 4,000. PostgreSQL (the target: 100k states/s), and SQLite
   at the quick size.
2. **The realistic corpus** (``benchmarks/corpus.py``, one agent state per turn): bytes
   before, after ``keep_latest=1`` and gc, and after compaction (PostgreSQL ``VACUUM
   FULL``; SQLite ``VACUUM INTO`` a copy). An agent's history is a hash chain its newest
   state pins whole, so keep_latest frees state rows, never content.
3. **A LangGraph thread** of 1,000 turns (quick: 200) through ``ImmAgentSaver`` (the graph
   of ``langgraph_baseline``): the same three figures for ``keep_latest=1`` on checkpoints
   (each older checkpoint, its writes and the values only it pins go).

Timings on this shared 2-core machine are noisy: read them as orders of magnitude, or
compare runs made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import corpus as corpora
from benchmarks import immagent_scenarios as ours
from benchmarks.common import (
    BACKENDS,
    Backend,
    compacted_sqlite_bytes,
    fmt_bytes,
    print_table,
    user_text,
    with_database,
)
from benchmarks.layout import pg_prefix_bytes
from immagent import Message, PersistentAgent, Store
from immagent.assets import EMPTY_CONVERSATION, SystemPrompt
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest
from immagent.retention import Policy, Rule
from immagent.rows import stored

#: The policy of the scale run: what most deployments would set.
KEEP = 10
#: Writers advancing agents during the scale run.
WRITERS = 4
#: Distinct message texts of the bulk-loaded states (shared, as real content is in part).
_VOCABULARY = [Message(role="user", content=f"bulk message {i}") for i in range(500)]


@dataclass
class ScaleResult:
    backend: str
    states: int
    streams: int
    deleted: int
    seconds: float
    judged_per_second: float
    deleted_per_second: float
    gc_seconds: float
    writer_states: int
    lost_states: int
    verify_ok: bool
    verify_seconds: float


@dataclass
class BytesResult:
    scenario: str
    backend: str
    states_before: int
    states_after: int
    bytes_before: int
    bytes_after: int
    bytes_compacted: int
    assets_removed: int


@dataclass
class Results:
    scale: list[ScaleResult] = field(default_factory=list)
    sizes: list[BytesResult] = field(default_factory=list)


# -- scale ---------------------------------------------------------------------------------


async def _bulk_load(store: Store, streams: int, per_stream: int) -> None:
    """``streams`` linear lineages of ``per_stream`` agent states, written in big batches
    straight through the backend (valid rows and digests; loading is not what is timed)."""
    backend = store._open()  # the benchmark's bulk loader
    prompt = SystemPrompt(text=ours.SYSTEM_PROMPT)
    await backend.write([stored(prompt), stored(EMPTY_CONVERSATION)], [])
    rng = random.Random(7)
    await backend.write([stored(m) for m in _VOCABULARY], [])
    batch_assets: list[Any] = []
    batch_states: list[Any] = []
    start = datetime.now(UTC) - timedelta(days=30)
    for s in range(streams):
        name = f"agent-{s:05d}"
        node = EMPTY_CONVERSATION
        parent = None
        for i in range(per_stream):
            if i:
                node = node.extend([rng.choice(_VOCABULARY)])
                batch_assets.append(stored(node))
            created = start + timedelta(seconds=i)
            digest = state_digest(name, ours.MODEL, prompt.digest, node.digest, {}, {})
            record = AgentRecord(id=uuid7(), parent_id=parent, created_at=created, name=name,
                                 model=ours.MODEL, system_prompt=prompt.digest,
                                 conversation=node.digest, model_config={}, metadata={},
                                 digest=digest)
            batch_states.append(record.to_row())
            parent = record.id
        if len(batch_states) >= 20_000 or s == streams - 1:
            await backend.write(batch_assets, batch_states)
            batch_assets, batch_states = [], []


async def run_scale(backend: Backend, dsn: str | None, workdir: Path, *, streams: int,
                    per_stream: int, log: Any) -> ScaleResult:
    label = f"retain_scale_{backend}"
    async with ours.open_store(backend, dsn, workdir, label) as (store, _):
        log(f"  loading {streams * per_stream:,} states in {streams:,} streams ({backend})")
        await _bulk_load(store, streams, per_stream)
        if backend == "postgres":
            # As autovacuum would after such a load: a store that grew over time has
            # statistics (with a half-loaded table's, the run's judgement stalled for
            # minutes while the writers ran; left for a follow-up).
            await _analyzed(with_database(dsn or "", ours.pg_database(label)))
        writer_dsn = _target(backend, dsn, ours.pg_database(label),
                             ours.store_path(workdir, label))
        names = [f"agent-{s:05d}" for s in range(streams)]
        stop = asyncio.Event()
        writing = asyncio.Event()
        expected: dict[str, tuple[PersistentAgent, int]] = {}
        written = 0

        async def writer(index: int) -> None:
            nonlocal written
            async with await Store.connect(writer_dsn, min_size=1, max_size=2) as mine:
                own = names[index::WRITERS]
                heads = {n: await mine.newest_by_name(n) for n in own[:50]}
                counts = {n: len(await a.get_messages()) for n, a in heads.items() if a}
                turn = 0
                while not stop.is_set():
                    name = own[turn % min(50, len(own))]
                    agent = heads[name]
                    assert agent is not None
                    agent = await mine.append(agent, [Message(role="user",
                                                              content=user_text(name, turn))])
                    heads[name] = agent
                    counts[name] += 1
                    expected[name] = (agent, counts[name])
                    written += 1
                    turn += 1
                    if written >= 10 * WRITERS:
                        writing.set()

        tasks = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
        await writing.wait()  # the writers are committing (past their first reads)
        policy = Policy.of(Rule.of(kinds="agents", keep_latest=KEEP))
        started = time.perf_counter()
        report = await store.apply_retention(policy, gc=False)
        seconds = time.perf_counter() - started
        log(f"  retention: {report.states_deleted:,} states deleted in {seconds:.1f} s; "
            f"writers committed {written:,} states meanwhile; gc")
        started = time.perf_counter()
        swept = await store.gc()  # what apply_retention runs after it, timed apart
        gc_seconds = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*tasks)
        log(f"  gc: {swept.assets_removed:,} assets removed in {gc_seconds:.1f} s; "
            f"writers committed {written:,} states in all")
        # Nothing live lost: every writer's newest state, every head, reads back whole.
        store.clear_cache()
        lost = 0
        for name, (agent, count) in expected.items():
            newest = await store.newest_by_name(name)
            if newest is None or newest.id != agent.id or \
                    len(await newest.get_messages()) != count:
                lost += 1
        for name in names[:: max(1, streams // 200)]:
            head = await store.newest_by_name(name)
            if head is None or len(await store.ancestors(head)) < 1:
                lost += 1
        started = time.perf_counter()
        verified = await store.verify()
        verify_seconds = time.perf_counter() - started
        total = streams * per_stream
        return ScaleResult(backend, total, streams, report.states_deleted, round(seconds, 2),
                           round(total / seconds), round(report.states_deleted / seconds),
                           round(gc_seconds, 1), written, lost, verified.ok,
                           round(verify_seconds, 1))


async def _analyzed(dsn: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE")


def _target(backend: Backend, dsn: str | None, database: str, path: Path) -> str:
    """The DSN of a scratch store: its database on the server of ``dsn``, or its file."""
    if backend == "postgres":
        assert dsn is not None
        return with_database(dsn, database)
    return f"sqlite:///{path}"


# -- bytes ---------------------------------------------------------------------------------


async def _vacuumed_pg(dsn: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("VACUUM FULL")
    return await pg_prefix_bytes(dsn, ours.PG_PREFIX)


async def _sizes(scenario: str, backend: Backend, store: Any, measure: Any, kind: str,
                 db: str) -> BytesResult:
    before = await measure()
    states = sum((await store.stats()).states_by_kind.values())
    report = await store.apply_retention(Policy.of(Rule.of(kinds=kind, keep_latest=1)))
    after = await measure()
    compacted = (await _vacuumed_pg(db) if backend == "postgres" else await
                 asyncio.to_thread(compacted_sqlite_bytes, Path(db.removeprefix("sqlite:///"))))
    left = sum((await store.stats()).states_by_kind.values())
    verified = await store.verify()
    if not verified.ok:
        raise RuntimeError(f"{scenario}: verify found problems after retention: "
                           f"{verified.lines()}")
    return BytesResult(scenario, backend, states, left, before, after, compacted,
                       report.assets_removed)


async def run_corpus_bytes(backend: Backend, dsn: str | None, workdir: Path,
                           conversations: int) -> BytesResult:
    label = f"retain_corpus_{backend}"
    corpus = corpora.generate(conversations)
    async with ours.open_store(backend, dsn, workdir, label) as (store, measure):
        await ours.run_corpus(backend, store, measure, corpus)
        db = _target(backend, dsn, ours.pg_database(label), ours.store_path(workdir, label))
        return await _sizes("realistic corpus", backend, store, measure, "agents", db)


async def run_thread_bytes(backend: Backend, dsn: str | None, workdir: Path,
                           turns: int) -> BytesResult:
    from benchmarks import immagent_saver as saver_bench
    from benchmarks import langgraph_baseline as theirs

    label = f"retain_thread_{backend}"
    async with saver_bench.open_saver(backend, dsn, workdir, label) as (saver, measure):
        graph = theirs.build_graph(saver)
        await saver_bench._advance(graph, "thread", range(turns))
        db = _target(backend, dsn, saver_bench._database(label),
                     workdir / f"saver-{label}.db")
        result = await _sizes(f"LangGraph thread, {turns} turns", backend, saver.store,
                              measure, "checkpoints", db)
        # The thread still answers: its newest checkpoint holds the whole conversation.
        state = await graph.aget_state({"configurable": {"thread_id": "thread"}})
        if len(state.values["messages"]) != 2 * turns:
            raise RuntimeError("the thread lost messages to retention")
        return result


# -- running -------------------------------------------------------------------------------


def print_results(results: Results) -> None:
    print_table(
        f"Retention at scale: keep_latest={KEEP} while {WRITERS} writers advance",
        ["backend", "states", "streams", "deleted", "seconds", "judged/s", "deleted/s",
         "then gc s", "writer states", "lost", "verify"],
        [[r.backend, f"{r.states:,}", f"{r.streams:,}", f"{r.deleted:,}", f"{r.seconds}",
          f"{r.judged_per_second:,}", f"{r.deleted_per_second:,}", f"{r.gc_seconds}",
          f"{r.writer_states:,}",
          r.lost_states, "clean" if r.verify_ok else "PROBLEMS"] for r in results.scale])
    print_table(
        "Bytes before and after keep_latest=1 (then gc; compacted: VACUUM FULL / VACUUM INTO)",
        ["scenario", "backend", "states", "after", "bytes", "after", "compacted",
         "assets freed"],
        [[r.scenario, r.backend, f"{r.states_before:,}", f"{r.states_after:,}",
          fmt_bytes(r.bytes_before), fmt_bytes(r.bytes_after), fmt_bytes(r.bytes_compacted),
          f"{r.assets_removed:,}"] for r in results.sizes])


async def run(dsn: str | None, *, full: bool, log: Any, only: str | None = None) -> Results:
    results = Results()
    streams, per_stream = (4000, 250) if full else (400, 250)
    with tempfile.TemporaryDirectory(prefix="immagent-retention-") as tmp:
        workdir = Path(tmp)
        backends: list[Backend] = [b for b in BACKENDS if dsn or b == "sqlite"]
        for backend in backends:
            # SQLite's one writer: the quick size even in a full run.
            scale = (400, 250) if backend == "sqlite" and full else (streams, per_stream)
            if only != "sizes":
                results.scale.append(await run_scale(backend, dsn, workdir,
                                                     streams=scale[0], per_stream=scale[1],
                                                     log=log))
            if only == "scale":
                continue
            log(f"  corpus ({backend})")
            results.sizes.append(await run_corpus_bytes(backend, dsn, workdir,
                                                        1000 if full else 200))
            log(f"  LangGraph thread ({backend})")
            results.sizes.append(await run_thread_bytes(backend, dsn, workdir,
                                                        1000 if full else 200))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1,000,000 states, 1,000 turns")
    parser.add_argument("--dsn", help="a PostgreSQL server DSN (else SQLite only)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", choices=["scale", "sizes"], help="one part only")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = asyncio.run(run(args.dsn, full=args.full, log=log, only=args.only))
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(results), indent=2))


if __name__ == "__main__":
    main()
