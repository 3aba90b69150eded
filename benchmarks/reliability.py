"""What the reliability checks of issue 14 cost, and the lineage walks they made linear.

    uv run python -m benchmarks.reliability [--dsn DSN] [--backends postgres sqlite]
                                            [--full] [--json FILE]

1. **gc's checks.** Two corpus shapes where nothing is unreachable, so every run does the
   same work: lineages of 50 steps of 100 messages (few, large nodes; quick: 4 lineages,
   full: 20) and chat-like lineages of 250 steps of 2 messages (a node per turn, and a
   state per turn; quick: 20, full: 100). The backend's sweep with a no-op check against
   ``Store.gc()``, which re-hashes every state, every node and every row a state or a node
   links to inside the sweep's transaction.
2. **verify's new queries.** ``Store.verify()`` on the same corpus, and alone the two
   database facts it gained: references of the wrong kind (``misfit_refs``) and parent
   cycles (``cyclic_states``).
3. **log.** ``immagent log`` (the installed console script, a fresh process as a user runs
   it) over a 1,000-state lineage and ``log -n 2`` over a 3,001-state one on SQLite: wall
   time and the process's peak RSS. Before the fix: 36 s and 928 MB, and more than 100 s
   and 5.4 GB (killed).

Without ``--dsn`` the project's throwaway PostgreSQL is started (scripts/ensure-postgres.sh).
Numbers, not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, drop_database, fresh_database, print_table, user_text
from immagent import Message, PersistentAgent, Store
from immagent.assets import ref_kind_table
from immagent.store.backend import Backend

SCRIPT = Path(sys.executable).with_name("immagent")
ROOT = Path(__file__).resolve().parents[1]
RUNS = 3


async def _backend(name: str, dsn: str | None, workdir: Path, label: str) -> Backend:
    if name == "postgres":
        from immagent.store.postgres import PostgresBackend

        assert dsn is not None
        return await PostgresBackend.open(await fresh_database(dsn, label))
    from immagent.store.sqlite import SQLiteBackend

    return await SQLiteBackend.open(str(workdir / f"{label}.db"))


async def _corpus(store: Store, lineages: int, steps: int, per_step: int) -> int:
    for lineage in range(lineages):
        agent = await store.create_agent(f"corpus{lineage}", "You are measured.", "m")
        for step in range(steps):
            agent = await store.append(agent, [
                Message(role="user", content=user_text(f"r{lineage}s{step}", m))
                for m in range(per_step)])
    return lineages * (steps * (per_step + 1) + 2)


def _median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


async def checks(name: str, dsn: str | None, workdir: Path, lineages: int, steps: int,
                 per_step: int) -> dict[str, Any]:
    """Scenarios 1 and 2 on one backend and corpus shape."""
    label = f"immagent_bench_rel_{name}_{per_step}"
    backend = await _backend(name, dsn, workdir, label)
    store = Store(backend)
    try:
        await store.init_schema()
        assets = await _corpus(store, lineages, steps, per_step)
        await store.gc()  # warm: the first pass reads the tables into the caches
        plain, checked = [], []
        for _ in range(RUNS):
            with Timer() as t:
                await backend.sweep(lambda rows: None)
            plain.append(t.seconds)
            with Timer() as t:
                result = await store.gc()
            checked.append(t.seconds)
            assert result.assets_removed == 0
        verify, kinds, cycles = [], [], []
        for _ in range(RUNS):
            with Timer() as t:
                report = await store.verify()
            verify.append(t.seconds)
            assert report.ok, report.lines()
            with Timer() as t:
                await backend.audits().misfit_refs(ref_kind_table())
            kinds.append(t.seconds)
            with Timer() as t:
                await backend.audits().cyclic_states()
            cycles.append(t.seconds)
    finally:
        await store.close()
        if name == "postgres" and dsn is not None:
            await drop_database(dsn, label)
    return {"backend": name, "shape": f"{lineages}x{steps}x{per_step}", "assets": assets,
            "states": lineages * (steps + 1), "gc_unchecked_s": _median(plain),
            "gc_checked_s": _median(checked), "verify_s": _median(verify),
            "misfit_refs_s": _median(kinds), "cyclic_states_s": _median(cycles)}


async def _lineage(path: Path, states: int) -> str:
    async with await Store.connect(f"sqlite:///{path}") as store:
        await store.init_schema()
        agent: PersistentAgent = await store.create_agent("long", "You go on.", "m")
        for i in range(states - 1):
            agent = await store.append(agent, [Message(role="user", content=f"q{i}"),
                                               Message(role="assistant", content=f"a{i}")])
        return str(agent.id)


def _cli(args: Sequence[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one console-script run (which must succeed)."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(SCRIPT), *args], check=True,
                          capture_output=True, text=True)
    return time.perf_counter() - started, int(done.stdout.strip()) * 1024


def log_scaling(workdir: Path) -> list[dict[str, Any]]:
    """Scenario 3 (SQLite)."""
    rows = []
    for states, limit in ((1_000, None), (3_001, 2)):
        path = workdir / f"log{states}.db"
        head = asyncio.run(_lineage(path, states))
        args = ["--db", str(path), "log", head] + ([] if limit is None else ["-n", str(limit)])
        runs = [_cli(args) for _ in range(RUNS)]
        rows.append({"states": states, "limit": limit,
                     "seconds": _median([r[0] for r in runs]),
                     "peak_rss": max(r[1] for r in runs)})
    return rows


def _ensure_postgres() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-postgres.sh")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL server DSN (default: the project's own)")
    parser.add_argument("--backends", nargs="+", default=["postgres", "sqlite"])
    parser.add_argument("--full", action="store_true", help="5x the lineages")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    dsn = args.dsn or (_ensure_postgres() if "postgres" in args.backends else None)
    scale = 5 if args.full else 1
    shapes = [(4 * scale, 50, 100), (20 * scale, 250, 2)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gc_rows = [asyncio.run(checks(b, dsn, work, *shape))
                   for shape in shapes for b in args.backends]
        log_rows = log_scaling(work)
    print_table("1-2. gc's checks and verify's new queries (median of 3)",
                ["backend", "lineages x steps x msgs", "assets", "states", "gc, no checks",
                 "gc, checked", "overhead", "verify", "misfit_refs", "cyclic_states"],
                [[r["backend"], r["shape"], r["assets"], r["states"],
                  f"{r['gc_unchecked_s'] * 1000:.0f} ms",
                  f"{r['gc_checked_s'] * 1000:.0f} ms",
                  f"{(r['gc_checked_s'] / r['gc_unchecked_s'] - 1) * 100:+.0f}%",
                  f"{r['verify_s'] * 1000:.0f} ms", f"{r['misfit_refs_s'] * 1000:.0f} ms",
                  f"{r['cyclic_states_s'] * 1000:.1f} ms"] for r in gc_rows])
    print_table("3. immagent log (SQLite, a fresh process per run, median of 3)",
                ["states", "command", "wall", "peak RSS"],
                [[r["states"], "log" if r["limit"] is None else f"log -n {r['limit']}",
                  f"{r['seconds']:.2f} s", f"{r['peak_rss'] / 2**20:.0f} MiB"]
                 for r in log_rows])
    if args.json:
        args.json.write_text(json.dumps({"checks": gc_rows, "log": log_rows}, indent=2))


if __name__ == "__main__":
    main()
