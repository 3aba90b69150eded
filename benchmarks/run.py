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
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import immagent_scenarios as ours
from benchmarks.common import (
    BACKENDS,
    REPLY_BYTES,
    TURN_PAYLOAD,
    USER_BYTES,
    Backend,
    ForkResult,
    LinearPoint,
    curve_points,
    fmt_bytes,
    growth_exponent,
    pg_breakdown,
    print_table,
    with_database,
)
from immagent import PersistentAgent, Store

REPO = Path(__file__).resolve().parent.parent
KIB = 1024


@dataclass(frozen=True)
class Sizes:
    """Scenario sizes; quick mode keeps ``make bench`` to a few minutes on 2 cores."""

    linear_turns: int = 1000
    langgraph_sqlite_turns: int = 300
    base_turns: int = 100
    forks: int = 50
    fork_turns: int = 5
    prompt_agents: int = 100
    speed_advances: int = 40
    commit_samples: int = 50
    read_samples: int = 20
    corpus_lineages: int = 4

    @classmethod
    def full(cls) -> Sizes:
        return cls(langgraph_sqlite_turns=1000, prompt_agents=1000, speed_advances=200,
                   commit_samples=300, read_samples=100, corpus_lineages=20)


@dataclass
class Results:
    """Everything one run measured (what ``--json`` writes)."""

    mode: str
    sizes: Sizes
    environment: dict[str, str]
    linear: list[LinearPoint] = field(default_factory=list)
    forks: list[ForkResult] = field(default_factory=list)
    shared: list[ours.SharedPrompts] = field(default_factory=list)
    throughput: list[ours.Throughput] = field(default_factory=list)
    latency: list[ours.Latency] = field(default_factory=list)
    maintenance: list[ours.Maintenance] = field(default_factory=list)
    #: immagent's PostgreSQL tables after the linear run: (table, rows, table B, index B).
    breakdown: list[tuple[str, int, int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sizes": asdict(self.sizes),
            "environment": self.environment,
            "text_bytes": {"user": USER_BYTES, "reply": REPLY_BYTES, "turn": TURN_PAYLOAD},
            "linear": [p.as_dict() for p in self.linear],
            "forks": [f.as_dict() for f in self.forks],
            "shared_prompts": [s.as_dict() for s in self.shared],
            "throughput": [t.as_dict() for t in self.throughput],
            "latency": [lat.as_dict() for lat in self.latency],
            "maintenance": [m.as_dict() for m in self.maintenance],
            "postgres_breakdown": [
                {"table": t, "rows": n, "table_bytes": tb, "index_bytes": ib}
                for t, n, tb, ib in self.breakdown],
            "ratios": ratios(self),
            "targets": self.targets,
            "notes": self.notes,
        }


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
                    "langgraph-checkpoint-sqlite", "psycopg"):
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


async def storage_phase(backend: Backend, res: Results, dsn: str | None, work: Path,
                        stack: contextlib.AsyncExitStack) -> tuple[Store, PersistentAgent]:
    """Scenarios 1-3 on one immagent backend. The linear store stays open (on ``stack``);
    it and its long agent are returned, for the timed phase."""
    s = res.sizes
    log(f"immagent/{backend}: linear to {s.linear_turns} turns")
    store, measure = await stack.enter_async_context(
        ours.open_store(backend, dsn, work, "linear"))
    points, long_agent = await ours.run_linear(backend, store, measure,
                                               curve_points(s.linear_turns))
    res.linear.extend(points)
    if backend == "postgres" and dsn is not None:
        res.breakdown = await pg_breakdown(with_database(dsn, ours.pg_database("linear")),
                                           ours.PG_TABLES)

    log(f"immagent/{backend}: forks")
    async with ours.open_store(backend, dsn, work, "forks") as (fork_store, fork_measure):
        res.forks.append(await ours.run_forks(backend, fork_store, fork_measure,
                                              base_turns=s.base_turns, forks=s.forks,
                                              fork_turns=s.fork_turns))

    log(f"immagent/{backend}: shared prompts, {s.prompt_agents} agents")
    res.shared.append(await ours.shared_prompts(backend, dsn, work, agents=s.prompt_agents))
    return store, long_agent


async def timed_phase(backend: Backend, res: Results, store: Store, long_agent: PersistentAgent,
                      dsn: str | None, work: Path) -> None:
    """Scenarios 4 and 5 on one immagent backend, with nothing else running."""
    s = res.sizes
    log(f"immagent/{backend}: speed and latency")
    res.latency.extend(await ours.read_latency(backend, store, long_agent, s.linear_turns,
                                               s.read_samples))
    short = await ours.grow(await store.create_agent(
        name="short", system_prompt=ours.SYSTEM_PROMPT, model=ours.MODEL), "short", range(10))
    for agent, turns in ((short, 10), (long_agent, s.linear_turns)):
        for tasks in (1, 8):
            res.throughput.append(await ours.advance_rate(
                backend, agent, turns, tasks=tasks, steps=max(1, s.speed_advances // tasks)))
        res.latency.append(await ours.commit_latency(backend, store, await agent.clone(),
                                                     turns, s.commit_samples))

    log(f"immagent/{backend}: verify and gc, {s.corpus_lineages} lineages")
    res.maintenance.extend(await ours.maintenance(backend, dsn, work, lineages=s.corpus_lineages))


async def langgraph_all(backends: Sequence[Backend], sizes: Sizes, dsn: str | None,
                        work: Path) -> tuple[list[LinearPoint], list[ForkResult]]:
    """Scenario 6: linear and forks through LangGraph's checkpointers."""
    from benchmarks import langgraph_baseline as theirs  # needs the `bench` extra

    linear: list[LinearPoint] = []
    forks: list[ForkResult] = []
    for backend in backends:
        turns = sizes.linear_turns if backend == "postgres" else sizes.langgraph_sqlite_turns
        log(f"langgraph/{backend}: linear to {turns} turns (separate process)")
        linear.extend(await theirs.run_linear(backend, curve_points(turns), dsn=dsn,
                                              workdir=work))
        log(f"langgraph/{backend}: forks (separate process)")
        forks.append(await theirs.run_forks(backend, dsn=dsn, workdir=work,
                                            base_turns=sizes.base_turns, forks=sizes.forks,
                                            fork_turns=sizes.fork_turns))
    return linear, forks


def langgraph_process(backends: Sequence[Backend], sizes: Sizes, dsn: str | None,
                      work: Path) -> tuple[list[LinearPoint], list[ForkResult]]:
    """``langgraph_all`` in a process of its own (the storage phase uses both cores)."""
    return asyncio.run(langgraph_all(backends, sizes, dsn, work))


async def run_all(args: argparse.Namespace) -> Results:
    """Every scenario, every backend asked for.

    Storage phase: immagent's scenarios 1-3 here while LangGraph's run in a second
    process (bytes do not depend on timing; on 2 cores this halves the wall time).
    Timed phase, alone: scenario 4 on the long agents kept open, then scenario 5.
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
    with tempfile.TemporaryDirectory(prefix="immagent-bench-") as tmp, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        work = Path(tmp)
        if ours_backends:  # LiteLLM's import takes seconds: never inside a timed block
            async with ours.open_store(ours_backends[0], dsn, work, "warmup") as (store, _):
                await ours.warm_up(store)
        theirs_future = None
        if not args.no_langgraph:
            theirs_future = asyncio.get_running_loop().run_in_executor(
                pool, langgraph_process, backends, sizes, dsn, work)
        async with contextlib.AsyncExitStack() as stack:
            kept = {b: await storage_phase(b, res, dsn, work, stack) for b in ours_backends}
            if theirs_future is not None:
                log("waiting for LangGraph")
                lg_linear, lg_forks = await theirs_future
                res.linear.extend(lg_linear)
                res.forks.extend(lg_forks)
            for backend, (store, agent) in kept.items():
                await timed_phase(backend, res, store, agent, dsn, work)
    res.notes.append("the storage phase runs immagent and LangGraph side by side (two "
                     "processes): its seconds are not speed results; scenarios 4-5 run alone")
    if not args.full:
        res.notes.append(
            f"quick mode: LangGraph SQLite linear stops at {sizes.langgraph_sqlite_turns} turns, "
            f"shared prompts use {sizes.prompt_agents} agents (full: 1000), the gc/verify corpus "
            f"has ~{sizes.corpus_lineages * 50 * 101:,} assets (full: ~101,000); use --full")
    res.targets = check_targets(res)
    return res


# --- derived numbers and targets ------------------------------------------------------


def _point(res: Results, system: str, backend: str, turns: int) -> LinearPoint | None:
    return next((p for p in res.linear
                 if (p.system, p.backend, p.turns) == (system, backend, turns)), None)


def _fork(res: Results, system: str, backend: str) -> ForkResult | None:
    return next((f for f in res.forks if (f.system, f.backend) == (system, backend)), None)


def ratios(res: Results) -> list[dict[str, Any]]:
    """immagent / LangGraph stored bytes for every comparable measurement."""
    rows: list[dict[str, Any]] = []
    for p in res.linear:
        other = _point(res, "langgraph", p.backend, p.turns)
        if p.system == "immagent" and p.turns and other is not None:
            rows.append({"backend": p.backend, "scenario": f"linear N={p.turns}",
                         "immagent_bytes": p.stored_bytes, "langgraph_bytes": other.stored_bytes,
                         "ratio": p.stored_bytes / other.stored_bytes})
    for f in res.forks:
        other_fork = _fork(res, "langgraph", f.backend)
        if f.system == "immagent" and other_fork is not None:
            rows.append({"backend": f.backend, "scenario": "bytes per fork",
                         "immagent_bytes": f.bytes_per_fork,
                         "langgraph_bytes": other_fork.bytes_per_fork,
                         "ratio": f.bytes_per_fork / other_fork.bytes_per_fork})
    return rows


def _target(name: str, ok: bool | None, detail: str) -> dict[str, str]:
    status = "PASS" if ok else "MISS" if ok is not None else "N/A"
    return {"target": name, "status": status, "detail": detail}


def check_targets(res: Results) -> list[dict[str, str]]:
    """The issue's targets, per immagent backend, with the numbers behind each verdict."""
    out: list[dict[str, str]] = []
    n = res.sizes.linear_turns
    for backend in sorted({p.backend for p in res.linear if p.system == "immagent"}):
        tag = f"[{backend}]"
        lo, hi = _point(res, "immagent", backend, 100), _point(res, "immagent", backend, n)
        empty = _point(res, "immagent", backend, 0)
        if lo and hi and empty:
            k = growth_exponent(lo.turns, lo.stored_bytes, hi.turns, hi.stored_bytes)
            k_net = growth_exponent(lo.turns, lo.stored_bytes - empty.stored_bytes,
                                    hi.turns, hi.stored_bytes - empty.stored_bytes)
            out.append(_target(f"{tag} growth exponent N=100..{n} <= 1.05", k <= 1.05,
                               f"k = {k:.3f}; {k_net:.3f} without the empty store's "
                               f"{fmt_bytes(empty.stored_bytes)}"))
            limit = TURN_PAYLOAD + KIB
            net = (hi.stored_bytes - empty.stored_bytes) / hi.turns
            out.append(_target(
                f"{tag} bytes/turn at N={n} <= payload + 1 KiB", hi.bytes_per_turn <= limit,
                f"{hi.bytes_per_turn:.0f} B/turn ({net:.0f} without the empty store) vs limit "
                f"{limit} B ({TURN_PAYLOAD} B payload); the rest is asset and agent rows, "
                "their indexes and page slack"))
        fork = _fork(res, "immagent", backend)
        if fork:
            limit = fork.fork_turns * (TURN_PAYLOAD + KIB)
            copy = fork.base_turns * TURN_PAYLOAD
            out.append(_target(
                f"{tag} a fork costs only its own messages", fork.bytes_per_fork <= limit,
                f"{fork.bytes_per_fork:.0f} B/fork = {fork.bytes_per_fork / fork.fork_turns:.0f}"
                f" B per own turn of {TURN_PAYLOAD} B payload (limit {limit} B: + 1 KiB per "
                f"turn, as for bytes/turn); a copy of the base would add >= {copy} B"))
        lg = _point(res, "langgraph", backend, n)
        if hi and lg:
            factor = lg.stored_bytes / hi.stored_bytes
            required = backend == "postgres"
            out.append(_target(
                f"{tag} >= 100x less storage than LangGraph at N={n}"
                + ("" if required else " (informational)"), factor >= 100,
                f"{factor:.0f}x ({fmt_bytes(hi.stored_bytes)} vs {fmt_bytes(lg.stored_bytes)})"))
        commits = {lat.history_turns: lat.p50 for lat in res.latency
                   if lat.backend == backend and lat.operation.startswith("commit")}
        store_share = (f"; store-only commit p50 {commits[10] * 1e3:.2f} ms at N=10, "
                       f"{commits[n] * 1e3:.2f} ms at N={n}" if {10, n} <= commits.keys() else "")
        for tasks in (1, 8):
            short = _rate(res, backend, 10, tasks)
            long = _rate(res, backend, n, tasks)
            if short and long:
                out.append(_target(
                    f"{tag} advance throughput at N={n} within 20% of N=10, {tasks} task(s)",
                    long >= 0.8 * short,
                    f"{long:.0f}/s vs {short:.0f}/s ({long / short - 1:+.0%}); the model call "
                    f"(LiteLLM + offline model) handles the whole history" + store_share))
        reads = next((lat for lat in res.latency if lat.backend == backend
                      and lat.operation == "get_messages (cold)"), None)
        if reads:
            out.append(_target(
                f"{tag} get_messages on {reads.history_turns} turns < 10 ms cold (p50)",
                reads.p50 < 0.010, f"p50 {reads.p50 * 1e3:.2f} ms, p99 {reads.p99 * 1e3:.2f} ms"))
    return out


def _rate(res: Results, backend: str, turns: int, tasks: int) -> float | None:
    return next((t.per_second for t in res.throughput
                 if (t.backend, t.history_turns, t.tasks) == (backend, turns, tasks)), None)


# --- output ---------------------------------------------------------------------------


def report(res: Results) -> None:
    """Print every table and the target checks."""
    print(f"immagent benchmarks ({res.mode} mode); texts: user {USER_BYTES} B, reply "
          f"{REPLY_BYTES} B, {TURN_PAYLOAD} B of payload per turn")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in res.environment.items()))

    print_table("1. Linear: one conversation advanced N times",
                ["system", "backend", "N", "stored", "payload", "bytes/turn", "seconds"],
                [[p.system, p.backend, p.turns, fmt_bytes(p.stored_bytes),
                  fmt_bytes(p.payload_bytes), f"{p.bytes_per_turn:,.0f}" if p.turns else "-",
                  f"{p.seconds:.1f}"] for p in res.linear])
    exponents: list[list[object]] = []
    for system, backend in sorted({(p.system, p.backend) for p in res.linear}):
        pts = sorted((p for p in res.linear if (p.system, p.backend) == (system, backend)),
                     key=lambda p: p.turns)
        lo = next((p for p in pts if p.turns == 100), None)
        empty = next((p for p in pts if p.turns == 0), None)
        if lo and empty and pts[-1].turns > 100:
            hi, before = pts[-1], pts[-2]
            k = growth_exponent(100, lo.stored_bytes, hi.turns, hi.stored_bytes)
            k_net = growth_exponent(100, lo.stored_bytes - empty.stored_bytes,
                                    hi.turns, hi.stored_bytes - empty.stored_bytes)
            marginal = (hi.stored_bytes - before.stored_bytes) / (hi.turns - before.turns)
            exponents.append([system, backend, f"100..{hi.turns}", f"{k:.3f}", f"{k_net:.3f}",
                              f"{marginal:,.0f}", fmt_bytes(empty.stored_bytes)])
    print_table("   growth: stored ~ N**k; net = minus the empty store; marginal = last segment",
                ["system", "backend", "N range", "k", "k net", "marginal B/turn", "empty store"],
                exponents)

    if res.breakdown:
        n = max(p.turns for p in res.linear if p.system == "immagent")
        print_table(f"   where immagent's PostgreSQL bytes go at N={n}",
                    ["table", "rows", "table+TOAST", "indexes", "bytes/turn"],
                    [[t, f"{rows:,}", fmt_bytes(tb), fmt_bytes(ib), f"{(tb + ib) / n:,.0f}"]
                     for t, rows, tb, ib in res.breakdown])

    print_table("2. Forks: base conversation, then forks each advanced a few turns",
                ["system", "backend", "base", "forks x turns", "bytes/fork", "own payload",
                 "bytes/fork / payload"],
                [[f.system, f.backend, f"{f.base_turns} turns = {fmt_bytes(f.base_bytes)}",
                  f"{f.forks} x {f.fork_turns}", f"{f.bytes_per_fork:,.0f}",
                  f"{f.fork_payload_bytes:,}", f"{f.bytes_per_fork / f.fork_payload_bytes:.1f}"]
                 for f in res.forks])

    print_table("3. Shared prompts: agents with one 4 KiB prompt vs a distinct prompt each",
                ["backend", "agents x turns", "shared prompt", "distinct prompts", "saved",
                 "shared / distinct"],
                [[s.backend, f"{s.agents} x {s.turns}", fmt_bytes(s.shared_bytes),
                  fmt_bytes(s.unique_bytes), fmt_bytes(s.saved_bytes), f"{s.ratio:.2f}"]
                 for s in res.shared])

    print_table("4a. Speed: advances per second (offline model, warm cache)",
                ["backend", "history turns", "tasks", "advances", "seconds", "advances/s"],
                [[t.backend, t.history_turns, t.tasks, t.advances, f"{t.seconds:.2f}",
                  f"{t.per_second:,.0f}"] for t in res.throughput])
    print_table("4b. Speed: latency", ["backend", "operation", "history turns", "samples",
                                       "p50 ms", "p99 ms"],
                [[lat.backend, lat.operation, lat.history_turns, len(lat.samples),
                  _ms(lat.p50), _ms(lat.p99)] for lat in res.latency])

    print_table("5. gc and verify throughput",
                ["backend", "operation", "assets", "body MB", "seconds", "assets/s", "MB/s",
                 "result"],
                [[m.backend, m.operation, f"{m.assets:,}", f"{m.body_bytes / 1e6:.1f}",
                  f"{m.seconds:.2f}", f"{m.assets_per_second:,.0f}", f"{m.mb_per_second:.1f}",
                  m.detail] for m in res.maintenance])

    if ratios(res):
        print_table("6. immagent vs LangGraph checkpointer, same texts, same server",
                    ["backend", "scenario", "immagent", "langgraph", "ours/theirs", "x less"],
                    [[r["backend"], r["scenario"], fmt_bytes(r["immagent_bytes"]),
                      fmt_bytes(r["langgraph_bytes"]), f"{r['ratio']:.4f}",
                      f"{1 / r['ratio']:,.0f}x"] for r in ratios(res)])

    print_table("Targets", ["status", "target", "detail"],
                [[t["status"], t["target"], t["detail"]] for t in res.targets])
    for note in res.notes:
        print(f"note: {note}")


def _ms(seconds: float) -> str:
    """Milliseconds, with a third decimal for sub-0.1 ms values (warm cache hits)."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def plot(res: Results, path: Path) -> None:
    """Stored bytes against N, log-log, one curve per system and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for system, backend in sorted({(p.system, p.backend) for p in res.linear}):
        pts = sorted((p for p in res.linear if (p.system, p.backend) == (system, backend)),
                     key=lambda p: p.turns)
        pts = [p for p in pts if p.turns]  # log axis: the empty store is not drawn
        ax.plot([p.turns for p in pts], [p.stored_bytes for p in pts], marker="o",
                linestyle="-" if system == "immagent" else "--", label=f"{system} / {backend}")
    turns = sorted({p.turns for p in res.linear if p.turns})
    ax.plot(turns, [t * TURN_PAYLOAD for t in turns], color="grey", linestyle=":",
            label="logical payload")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("turns (N)")
    ax.set_ylabel("stored bytes")
    ax.set_title("Storage growth of one conversation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--no-langgraph", action="store_true", help="skip the comparison")
    parser.add_argument("--no-sessions", action="store_true",
                        help="skip ImmAgentSession beside the OpenAI Agents SQLiteSession")
    args = parser.parse_args(argv)
    res = asyncio.run(run_all(args))
    report(res)
    numbers = res.as_dict()
    if not args.no_sessions:
        from benchmarks import immagent_session

        pg = (args.dsn or ensure_postgres()) if "postgres" in args.backends else None
        sessions = asyncio.run(immagent_session.run(samples=50 if args.full else 30, dsn=pg))
        immagent_session.report(sessions)
        numbers["openai_agents_sessions"] = sessions.as_dict()
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
