"""Scale-out benchmarks on the replication cluster of ``scripts/pg-cluster.sh``.

    uv run python -m benchmarks.scale [--full] [--json FILE]      (make bench-scale)

1. Read throughput: cold reads (load a state, then its whole conversation with
   ``get_messages``, after ``clear_cache()``) of many agents from many tasks, on a Store
   with no replica and on one reading from the hot standby. pg_stat_statements on each
   server says who ran the reads and how much execution time they cost it.
2. Advance throughput: ``agent.advance`` (the real LiteLLM path, offline model
   ``immagent/echo``) from many tasks, connected straight to the primary and through
   PgBouncer in transaction pooling mode; also straight with prepared statements off, to
   separate the pooler's hop from the cost of not preparing.

Every run uses a scratch database on the cluster (created and dropped here). The cluster
runs on this machine: primary, standby, PgBouncer and this client share its cores, so a
replica here cannot add capacity; the numbers show routing's cost and where the work goes,
which is what carries over to separate machines (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import (
    Timer,
    drop_database,
    fresh_database,
    percentile,
    print_table,
    reply_text,
    user_text,
    with_database,
)
from immagent import Message, PersistentAgent, Store

REPO = Path(__file__).resolve().parent.parent
MODEL = "immagent/echo"
DATABASE = f"immagent_bench_scale_{os.getpid()}"


@dataclass(frozen=True)
class Sizes:
    """Quick sizes keep ``make bench-scale`` to a minute or two on 2 cores."""

    agents: int = 200
    turns: int = 20
    read_tasks: int = 16
    read_rounds: int = 2
    advance_tasks: int = 16
    advance_steps: int = 8
    pool: int = 8
    #: Runs of each configuration, interleaved (A B A B …), so a burst of load on the
    #: shared machine or a cold cache does not land on one configuration only.
    repeats: int = 3

    @classmethod
    def full(cls) -> Sizes:
        return cls(agents=1000, turns=50, read_rounds=2, advance_steps=25)


@dataclass
class Row:
    """One configuration: every run's (operations, seconds), the pooled latencies, and the
    work each server did per run (pg_stat_statements)."""

    scenario: str
    setup: str
    runs: list[tuple[int, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list, repr=False)
    servers: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, operations: int, seconds: float, latencies: Sequence[float],
            work: dict[str, dict[str, float]] | None = None) -> None:
        self.runs.append((operations, seconds))
        self.latencies.extend(latencies)
        for server, numbers in (work or {}).items():
            mine = self.servers.setdefault(server, {})
            for key, value in numbers.items():
                mine[key] = mine.get(key, 0.0) + value

    @property
    def rates(self) -> list[float]:
        return sorted(n / t for n, t in self.runs)

    @property
    def rate(self) -> float:
        """The median run's rate."""
        return percentile(self.rates, 50)

    def per_run(self, server: str, key: str) -> float:
        return self.servers.get(server, {}).get(key, 0.0) / max(1, len(self.runs))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies")
        data.update(rate=self.rate, rates=self.rates,
                    p50_ms=percentile(self.latencies, 50) * 1000,
                    p95_ms=percentile(self.latencies, 95) * 1000)
        return data


# --- the cluster ------------------------------------------------------------------------


def cluster() -> dict[str, str]:
    """Start the cluster (or find it running); its DSNs by part."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "pg-cluster.sh"), "up"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"pg-cluster.sh up failed:\n{out.stderr}")
    found = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {part: found[f"PGCLUSTER_{part.upper()}"]
            for part in ("primary", "standby", "bouncer")}


def wait_replayed() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "pg-cluster.sh"), "wait-replay", "120"],
                   check=True, capture_output=True)


def reset_stats() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "pg-cluster.sh"), "reset-stats"],
                   check=True, capture_output=True)


def server_work(dsn: str, database: str) -> dict[str, float]:
    """Statements of immagent's tables this server ran for ``database`` since the last
    reset, and their execution milliseconds."""
    with psycopg.connect(with_database(dsn, "postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(s.calls), 0), coalesce(sum(s.total_exec_time), 0) "
            "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = %s AND s.query LIKE '%%immagent_%%'", (database,)).fetchone()
    assert row is not None
    return {"statements": float(row[0]), "exec_ms": float(row[1])}


# --- the scenarios ------------------------------------------------------------------------


async def populate(dsn: str, sizes: Sizes) -> list[PersistentAgent]:
    """``sizes.agents`` agents of ``sizes.turns`` turns each (store-only appends)."""
    async with await Store.connect(dsn, min_size=2, max_size=sizes.pool) as store:
        await store.init_schema()
        gate = asyncio.Semaphore(sizes.pool)

        async def one(index: int) -> PersistentAgent:
            async with gate:
                agent = await store.create_agent(f"agent{index}", "You answer.", MODEL)
                for turn in range(sizes.turns):
                    text = user_text(f"a{index}", turn)
                    agent = await store.append(agent, [Message(role="user", content=text),
                                                       Message(role="assistant",
                                                               content=reply_text(text))])
                return agent

        return list(await asyncio.gather(*(one(i) for i in range(sizes.agents))))


async def cold_reads(dsn: str, replicas: Sequence[str], agents: Sequence[PersistentAgent],
                     sizes: Sizes) -> tuple[int, float, list[float]]:
    """Every agent read ``read_rounds`` times, cold, by ``read_tasks`` tasks (each its own
    share of the agents, so no read finds another's result in the cache)."""
    async with await Store.connect(dsn, replicas=list(replicas), min_size=sizes.pool,
                                   max_size=sizes.pool) as store:
        shares = [[a.id for a in agents[i::sizes.read_tasks]] for i in range(sizes.read_tasks)]
        latencies: list[float] = []
        expected = 2 * sizes.turns

        async def reader(ids: Sequence[Any]) -> None:
            for _ in range(sizes.read_rounds):
                for agent_id in ids:
                    start = time.perf_counter()
                    store.clear_cache()
                    agent = await store.load_agent(agent_id)
                    if len(await agent.get_messages()) != expected:
                        raise AssertionError(f"{agent_id}: wrong history length")
                    latencies.append(time.perf_counter() - start)

        await reader(shares[0][:2])  # connections warm, plans cached
        latencies.clear()
        with Timer() as timer:
            await asyncio.gather(*(reader(share) for share in shares))
        return len(latencies), timer.seconds, latencies


async def advances(dsn: str, agents: Sequence[PersistentAgent], sizes: Sizes,
                   tag: str) -> tuple[int, float, list[float]]:
    """``advance_tasks`` agents advanced ``advance_steps`` times each, concurrently."""
    async with await Store.connect(dsn, min_size=sizes.pool, max_size=sizes.pool) as store:
        latencies: list[float] = []
        mine = await store.load_agents([a.id for a in agents[:sizes.advance_tasks]])
        await mine[0].get_messages()

        async def chat(agent: PersistentAgent) -> None:
            await agent.get_messages()  # history cached, as in a process serving it
            for step in range(sizes.advance_steps):
                start = time.perf_counter()
                agent = await agent.advance(user_text(f"{tag}-{agent.name}", step))
                latencies.append(time.perf_counter() - start)

        with Timer() as timer:
            await asyncio.gather(*(chat(a) for a in mine))
        return len(latencies), timer.seconds, latencies


async def run(sizes: Sizes) -> list[Row]:
    dsns = cluster()
    primary = await fresh_database(dsns["primary"], DATABASE)
    standby = with_database(dsns["standby"], DATABASE)
    bouncer = with_database(dsns["bouncer"], DATABASE) + "?prepare_threshold=none"
    rows: list[Row] = []
    try:
        print(f"populating {sizes.agents} agents x {sizes.turns} turns ...", flush=True)
        agents = await populate(primary, sizes)
        wait_replayed()
        reads = {"primary only": Row("cold reads", "primary only"),
                 "1 replica": Row("cold reads", "1 replica")}
        for _ in range(sizes.repeats):
            for setup, replicas in (("primary only", []), ("1 replica", [standby])):
                reset_stats()
                count, seconds, latencies = await cold_reads(primary, replicas, agents, sizes)
                reads[setup].add(count, seconds, latencies,
                                 {name: server_work(dsn, DATABASE)
                                  for name, dsn in (("primary", primary), ("standby", standby))})
        rows.extend(reads.values())
        async with await Store.connect(primary, min_size=1, max_size=1) as store:
            warm = await store.create_agent("warm-up", "You answer.", MODEL)
            await warm.advance("warm up")  # LiteLLM's import, outside every timed block
        targets = {"direct": primary,
                   "direct, prepare_threshold=none": primary + "?prepare_threshold=none",
                   "PgBouncer (transaction mode)": bouncer}
        steps = {setup: Row("advance", setup) for setup in targets}
        for run in range(sizes.repeats):
            for index, (setup, dsn) in enumerate(targets.items()):
                count, seconds, latencies = await advances(dsn, agents, sizes,
                                                           f"r{run}c{index}")
                steps[setup].add(count, seconds, latencies)
        rows.extend(steps.values())
    finally:
        await drop_database(dsns["primary"], DATABASE)
    return rows


def report(rows: Sequence[Row], sizes: Sizes) -> None:
    print_table(
        f"Cold reads: load_agent + get_messages of {sizes.agents} agents x {2 * sizes.turns} "
        f"messages, {sizes.read_tasks} tasks, pool {sizes.pool}; median of {sizes.repeats} "
        "interleaved runs (range), statements and execution time per run",
        ["setup", "reads/s", "range", "p50", "p95", "primary stmts", "primary exec",
         "standby stmts", "standby exec"],
        [[r.setup, f"{r.rate:,.0f}/s", _range(r), _ms(percentile(r.latencies, 50)),
          _ms(percentile(r.latencies, 95)),
          f"{r.per_run('primary', 'statements'):,.0f}",
          f"{r.per_run('primary', 'exec_ms') / 1000:,.1f} s",
          f"{r.per_run('standby', 'statements'):,.0f}",
          f"{r.per_run('standby', 'exec_ms') / 1000:,.1f} s"]
         for r in rows if r.scenario == "cold reads"])
    print_table(
        f"Advance: {sizes.advance_tasks} tasks x {sizes.advance_steps} steps "
        f"(agent.advance, immagent/echo, {sizes.turns}-turn histories), pool {sizes.pool}; "
        f"median of {sizes.repeats} interleaved runs (range)",
        ["setup", "advances/s", "range", "p50", "p95"],
        [[r.setup, f"{r.rate:,.0f}/s", _range(r), _ms(percentile(r.latencies, 50)),
          _ms(percentile(r.latencies, 95))] for r in rows if r.scenario == "advance"])


def _range(row: Row) -> str:
    return f"{row.rates[0]:,.0f}-{row.rates[-1]:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, run both scenarios, print (and optionally save) the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full sizes (slower)")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sizes = Sizes.full() if args.full else Sizes()
    rows = asyncio.run(run(sizes))
    report(rows, sizes)
    if args.json:
        args.json.write_text(json.dumps({"sizes": asdict(sizes),
                                         "rows": [r.as_dict() for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
