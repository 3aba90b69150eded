"""Run every benchmark scenario, print the tables and the target checks.

    uv run python -m benchmarks.run [--full] [--json FILE] [--plot FILE.png] [--dsn DSN]

Without ``--dsn`` the project's throwaway PostgreSQL is started with
``scripts/ensure-postgres.sh``. Each scenario runs in a scratch database of its own on
that server (created and dropped here) or in a scratch SQLite file, so nothing else is
measured. See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psycopg

from benchmarks import corpus as corpora
from benchmarks import immagent_scenarios as ours
from benchmarks.common import (
    BACKENDS,
    Backend,
    CorpusStored,
    ForkResult,
    LinearPoint,
    compacted_sqlite_bytes,
    curve_points,
    with_database,
)
from benchmarks.layout import dbstat_available, pg_relations, sqlite_relations
from benchmarks.report import plot, report
from benchmarks.results import Breakdown, Results, Sizes
from benchmarks.targets import check_targets
from immagent import PersistentAgent, Store, testing

REPO = Path(__file__).resolve().parent.parent
#: Seed of the realistic corpus: every run, and both processes of a run, store the same one.
CORPUS_SEED = 11


# --- running --------------------------------------------------------------------------


def ensure_postgres() -> str:
    """Start (or find) the project's throwaway PostgreSQL and return its DSN."""
    env = {**os.environ, "PGDATABASE": os.environ.get("PGDATABASE", "immagent_bench")}
    out = subprocess.run(["bash", str(REPO / "scripts" / "ensure-postgres.sh")], check=True,
                         capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1]


async def environment(dsn: str | None) -> dict[str, str]:
    """Versions that the numbers depend on."""
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": str(os.cpu_count())}
    for package in ("immagent", "langgraph", "langgraph-checkpoint-postgres",
                    "langgraph-checkpoint-sqlite", "openai-agents", "psycopg"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = "not installed"
    if dsn:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SHOW server_version")
            row = await cur.fetchone()
            env["postgresql"] = str(row[0]) if row else "?"
    import sqlite3

    env["sqlite"] = sqlite3.sqlite_version
    return env


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"... {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Kept:
    """The stores and agents of one immagent backend that the timed phase reuses."""

    store: Store
    long_agent: PersistentAgent  # the linear conversation, through advance
    append_store: Store
    append_agent: PersistentAgent  # the same texts through Store.append


async def breakdown(res: Results, backend: Backend, dsn: str | None, work: Path, label: str,
                    scenario: str, turns: int) -> None:
    """Every relation of the store ``label`` into ``res.breakdowns``."""
    if backend == "postgres" and dsn is not None:
        relations = await pg_relations(with_database(dsn, ours.pg_database(label)),
                                       ours.PG_PREFIX)
    elif backend == "sqlite" and dbstat_available():
        relations = await asyncio.to_thread(sqlite_relations, ours.store_path(work, label))
    else:
        res.notes.append(f"no per-relation breakdown for {backend}: this SQLite has no dbstat")
        return
    res.breakdowns.append(Breakdown(scenario, backend, turns, tuple(relations)))


async def storage_phase(backend: Backend, res: Results, dsn: str | None, work: Path,
                        stack: contextlib.AsyncExitStack, corpus: corpora.Corpus) -> Kept:
    """Scenarios 1-3 and the realistic corpus on one immagent backend. The linear stores
    stay open (on ``stack``) for the timed phase."""
    s = res.sizes
    log(f"immagent/{backend}: linear to {s.linear_turns} turns")
    store, measure = await stack.enter_async_context(
        ours.open_store(backend, dsn, work, "linear"))
    points, long_agent = await ours.run_linear(backend, store, measure,
                                               curve_points(s.linear_turns))
    res.linear.extend(points)
    await breakdown(res, backend, dsn, work, "linear", "linear", s.linear_turns)

    log(f"immagent/{backend}: linear to {s.linear_turns} turns, store only")
    append_store, append_measure = await stack.enter_async_context(
        ours.open_store(backend, dsn, work, "append"))
    append_points, append_agent = await ours.run_append_linear(
        backend, append_store, append_measure, curve_points(s.linear_turns))
    res.linear.extend(append_points)

    log(f"immagent/{backend}: forks")
    async with ours.open_store(backend, dsn, work, "forks") as (fork_store, fork_measure):
        res.forks.append(await ours.run_forks(backend, fork_store, fork_measure,
                                              base_turns=s.base_turns, forks=s.forks,
                                              fork_turns=s.fork_turns))

    log(f"immagent/{backend}: shared prompts, {s.prompt_agents} agents")
    res.shared.append(await ours.shared_prompts(backend, dsn, work, agents=s.prompt_agents))

    log(f"immagent/{backend}: realistic corpus, {len(corpus.conversations)} conversations")
    async with ours.open_store(backend, dsn, work, "corpus") as (corpus_store, corpus_measure):
        stored = await ours.run_corpus(backend, corpus_store, corpus_measure, corpus)
        if backend == "sqlite":
            stored = dataclasses.replace(stored, compacted_bytes=await asyncio.to_thread(
                compacted_sqlite_bytes, ours.store_path(work, "corpus")))
        res.corpus_stored.append(stored)
        await breakdown(res, backend, dsn, work, "corpus", "corpus", corpus.turns)
    return Kept(store, long_agent, append_store, append_agent)


async def timed_phase(backend: Backend, res: Results, kept: Kept, dsn: str | None,
                      work: Path) -> None:
    """Scenarios 4 and 5 on one immagent backend, with nothing else running."""
    s = res.sizes
    n = s.linear_turns
    store, long_agent = kept.store, kept.long_agent
    log(f"immagent/{backend}: speed and latency")
    res.latency.extend(await ours.read_latency(backend, store, long_agent, n, s.read_samples))
    res.latency.append(await ours.cold_messages(backend, kept.append_store, kept.append_agent,
                                                n, s.read_samples))
    short = await ours.grow(await store.create_agent(
        name="short", system_prompt=ours.SYSTEM_PROMPT, model=ours.MODEL), "short", range(10))
    for agent, turns in ((short, 10), (long_agent, n)):
        for tasks in (1, 8):
            res.throughput.append(await ours.advance_rate(
                backend, agent, turns, tasks=tasks, steps=max(1, s.speed_advances // tasks)))
        res.latency.append(await ours.commit_latency(backend, store, await agent.clone(),
                                                     turns, s.commit_samples))
        for cold in (False, True):
            res.overhead.append(await ours.advance_overhead(
                backend, store, agent, turns, s.overhead_samples, cold=cold))

    log(f"immagent/{backend}: verify and gc, {s.corpus_lineages} lineages")
    res.maintenance.extend(await ours.maintenance(backend, dsn, work, lineages=s.corpus_lineages))


async def sessions_storage(res: Results, work: Path, stack: contextlib.AsyncExitStack,
                           corpus: corpora.Corpus) -> Path:
    """SQLiteSession: the linear conversation (store only) and the realistic corpus; the
    linear file stays open for ``sessions_timed``."""
    from benchmarks import openai_agents_baseline as sessions  # needs the `bench` extra

    await sessions.check_item_format()
    n = res.sizes.linear_turns
    log(f"openai-agents/sqlite: SQLiteSession to {n} turns")
    path, measure = await stack.enter_async_context(sessions.open_session_file(work, "linear"))
    res.linear.extend(await sessions.run_linear(path, measure, curve_points(n)))
    log(f"openai-agents/sqlite: realistic corpus, {len(corpus.conversations)} conversations")
    res.corpus_stored.append(await sessions.run_corpus(corpus, work))
    return path


async def sessions_timed(res: Results, path: Path) -> None:
    """SQLiteSession's reads (first: the session must hold exactly N turns) and appends."""
    from benchmarks import openai_agents_baseline as sessions

    s = res.sizes
    log("openai-agents/sqlite: latency")
    res.latency.extend(await sessions.read_latency(path, "linear", s.linear_turns,
                                                   s.read_samples))
    res.latency.append(await sessions.add_latency(path, "short", 10, s.commit_samples))
    res.latency.append(await sessions.add_latency(path, "linear", s.linear_turns,
                                                  s.commit_samples))


LangGraphResults = tuple[list[LinearPoint], list[ForkResult], list[CorpusStored]]


async def langgraph_all(backends: Sequence[Backend], sizes: Sizes, dsn: str | None,
                        work: Path, corpus: corpora.Corpus | None) -> LangGraphResults:
    """Scenario 6 and the realistic corpus through LangGraph's checkpointers."""
    from benchmarks import langgraph_baseline as theirs  # needs the `bench` extra

    linear: list[LinearPoint] = []
    forks: list[ForkResult] = []
    stored: list[CorpusStored] = []
    for backend in backends:
        turns = sizes.linear_turns if backend == "postgres" else sizes.langgraph_sqlite_turns
        log(f"langgraph/{backend}: linear to {turns} turns (separate process)")
        linear.extend(await theirs.run_linear(backend, curve_points(turns), dsn=dsn,
                                              workdir=work))
        log(f"langgraph/{backend}: forks (separate process)")
        forks.append(await theirs.run_forks(backend, dsn=dsn, workdir=work,
                                            base_turns=sizes.base_turns, forks=sizes.forks,
                                            fork_turns=sizes.fork_turns))
        if corpus is not None:
            log(f"langgraph/{backend}: realistic corpus (separate process)")
            stored.append(await theirs.run_corpus(backend, corpus, dsn=dsn, workdir=work))
    return linear, forks, stored


def langgraph_process(backends: Sequence[Backend], sizes: Sizes, dsn: str | None,
                      work: Path, corpus: corpora.Corpus | None) -> LangGraphResults:
    """``langgraph_all`` in a process of its own (the storage phase uses both cores)."""
    return asyncio.run(langgraph_all(backends, sizes, dsn, work, corpus))


async def run_all(args: argparse.Namespace) -> Results:
    """Every scenario, every backend asked for.

    Storage phase: immagent's scenarios 1-3, the realistic corpus and SQLiteSession here
    while LangGraph's run in a second process (bytes do not depend on timing; on 2 cores
    this halves the wall time). Timed phase, alone: scenario 4 on the long agents kept
    open, then scenario 5, then SQLiteSession's latencies.
    """
    sizes = Sizes.full() if args.full else Sizes()
    backends: list[Backend] = [b for b in BACKENDS if b in args.backends]
    dsn: str | None = None
    if "postgres" in backends:
        dsn = args.dsn or ensure_postgres()
    res = Results("full" if args.full else "quick", sizes, await environment(dsn))
    ours_backends = [b for b in backends if ours.backend_available(b)]
    res.notes.extend(f"immagent's {b} backend is not in this checkout: skipped"
                     for b in backends if b not in ours_backends)
    log(f"realistic corpus: generating {sizes.conversations} conversations")
    corpus = corpora.generate(sizes.conversations, CORPUS_SEED)
    res.corpus = corpus.summary()
    with_sessions = not args.no_openai_agents and "sqlite" in backends
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        work = Path(tmp)
        if ours_backends:  # LiteLLM's import takes seconds: never inside a timed block
            async with ours.open_store(ours_backends[0], dsn, work, "warmup") as (store, _):
                await ours.warm_up(store)
        if with_sessions:
            import benchmarks.openai_agents_baseline  # noqa: F401  (its import, before freeze)
        # The imports of LiteLLM and the Agents SDK leave a heap of long-lived objects; every
        # generation-2 collection walked it (~250 ms, measured), which was most of every
        # p99 here. Frozen objects are never scanned again; what the benchmark allocates is.
        gc.collect()
        gc.freeze()
        theirs_future = None
        if not args.no_langgraph:
            theirs_future = asyncio.get_running_loop().run_in_executor(
                pool, langgraph_process, backends, sizes, dsn, work, corpus)
        async with contextlib.AsyncExitStack() as stack:
            kept = {b: await storage_phase(b, res, dsn, work, stack, corpus)
                    for b in ours_backends}
            if not args.no_langgraph:  # LangGraph with ImmAgentSaver (the `bench` extra)
                from benchmarks import immagent_saver

                saver_turns = {b: sizes.linear_turns if args.full or b == "postgres"
                               else min(sizes.linear_turns, 500) for b in ours_backends}
                linear, forks = await immagent_saver.run_storage(
                    saver_turns, dsn=dsn, workdir=work, base_turns=sizes.base_turns,
                    forks=sizes.forks, fork_turns=sizes.fork_turns, log=log)
                res.linear.extend(linear)
                res.forks.extend(forks)
            session_path = (await sessions_storage(res, work, stack, corpus)
                            if with_sessions else None)
            if theirs_future is not None:
                log("waiting for LangGraph")
                lg_linear, lg_forks, lg_corpus = await theirs_future
                res.linear.extend(lg_linear)
                res.forks.extend(lg_forks)
                res.corpus_stored.extend(lg_corpus)
            for backend, stores in kept.items():
                await timed_phase(backend, res, stores, dsn, work)
            if session_path is not None:
                await sessions_timed(res, session_path)
            if not args.no_langgraph:
                res.latency.extend(await immagent_saver.run_latency(
                    ours_backends, dsn=dsn, workdir=work, history=(10, sizes.linear_turns),
                    samples=min(sizes.read_samples, 40), log=log))
    res.notes.append("the storage phase runs immagent and LangGraph side by side (two "
                     "processes): its seconds are not speed results; scenarios 4-5 and the "
                     "SQLiteSession latencies run alone")
    if not args.full:
        res.notes.append(
            f"quick mode: LangGraph SQLite linear stops at {sizes.langgraph_sqlite_turns} turns, "
            f"shared prompts use {sizes.prompt_agents} agents (full: 1000), the gc/verify corpus "
            f"has ~{sizes.corpus_lineages * 50 * 101:,} assets (full: ~101,000), the realistic "
            f"corpus {sizes.conversations} conversations (full: 3000); use --full")
    res.targets = check_targets(res)
    if not args.no_langgraph:
        res.targets += immagent_saver.check_targets(res.linear, res.forks, res.latency)
    return res


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="immagent storage and speed benchmarks")
    parser.add_argument("--full", action="store_true", help="full sizes (slower)")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw the storage growth curves (PNG)")
    parser.add_argument("--dsn", help="PostgreSQL server to use (default: start the "
                        "project's throwaway server with scripts/ensure-postgres.sh)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--no-langgraph", action="store_true", help="skip LangGraph")
    parser.add_argument("--no-openai-agents", action="store_true",
                        help="skip the OpenAI Agents SDK's SQLiteSession (and ImmAgentSession "
                        "beside it)")
    parser.add_argument("--no-pydantic-ai", action="store_true",
                        help="skip ImmAgentConversationStore beside pydantic-ai-harness's store")
    parser.add_argument("--no-audits", action="store_true",
                        help="skip signing, verifying and diffing (benchmarks/audits.py)")
    parser.add_argument("--no-retention", action="store_true",
                        help="skip retention at scale and keep_latest's savings "
                             "(benchmarks/retention.py)")
    args = parser.parse_args(argv)
    # Advances go through LiteLLM's real call path, as a provider model's do (the offline
    # models are otherwise answered in-process): per-advance overhead is then measured as
    # everything but the time inside litellm.acompletion.
    testing.route_through_litellm(True)
    res = asyncio.run(run_all(args))
    report(res)
    numbers = res.as_dict()
    if not args.no_openai_agents:
        from benchmarks import immagent_session

        pg = (args.dsn or ensure_postgres()) if "postgres" in args.backends else None
        sessions = asyncio.run(immagent_session.run(samples=50 if args.full else 30, dsn=pg))
        immagent_session.report(sessions)
        numbers["openai_agents_sessions"] = sessions.as_dict()
    if not args.no_langgraph:  # ImmAgentStore beside LangGraph's stores
        from benchmarks import langgraph_store

        pg = (args.dsn or ensure_postgres()) if "postgres" in args.backends else None
        memory = asyncio.run(langgraph_store.run(samples=50 if args.full else 30, dsn=pg))
        langgraph_store.report(memory)
        numbers["langgraph_store"] = memory.as_dict()
    if not args.no_pydantic_ai:
        from benchmarks import pydantic_ai_conversations as conversations

        found = asyncio.run(conversations.run(harness_every=1 if args.full else 10))
        conversations.report(found)
        numbers["pydantic_ai_conversations"] = found.as_dict()
    if not args.no_audits:
        from benchmarks import audits

        pg = (args.dsn or ensure_postgres()) if "postgres" in args.backends else None
        found_audits = asyncio.run(audits.run(full=args.full, dsn=pg, backends=args.backends))
        audits.report(found_audits)
        numbers["audits"] = found_audits.as_dict()
    if not args.no_retention:
        from benchmarks import retention

        pg = (args.dsn or ensure_postgres()) if "postgres" in args.backends else None
        kept = asyncio.run(retention.run(pg, full=args.full, log=log))
        retention.print_results(kept)
        numbers["retention"] = dataclasses.asdict(kept)

    if not args.no_langgraph:  # DeltaChannel baselines, alone at the end (issues 22, 23)
        from benchmarks import langgraph_delta

        numbers["langgraph_delta"] = langgraph_delta.run_and_report(
            full=args.full, backends=args.backends,
            dsn=(args.dsn or ensure_postgres()) if "postgres" in args.backends else None)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
