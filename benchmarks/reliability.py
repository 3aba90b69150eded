"""What the reliability checks cost, and the walks and steps they made linear.

    uv run python -m benchmarks.reliability [--dsn DSN] [--backends postgres sqlite]
                                            [--full] [--only SCENARIO ...] [--json FILE]

(``make bench-reliability`` runs it at full size.)

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
4. **fan-out** (issue 20, item 3). One append of 80,000 distinct messages (quick: 20,000):
   ``verify()``, ``verify(agent)`` and ``gc()``; and a bundle whose node lists one message
   80,000 times: ``import_states`` and the ``verify()`` after it. Before (the probe):
   SQLite verify 485 s, gc 67-80 s; the bundle imported in 0.2 s, then verify took 237 s.
5. **delete_lineage** (item 5) of a lineage of 100,001 states (quick: 20,001), built with
   batched commits. Before: PostgreSQL 13.3 s at 20,001, 455 s at 100,001; SQLite 2.2 s.
6. **steps over a long run** (item 4): one process makes 15,000 turns (quick: 3,000) of
   one lineage for each client: ``store.append`` alone; ``append`` then ``get_messages``
   (what ``advance`` does around its model call); an ``ImmAgentSession`` ``add_items``.
   Steps per second in the first 1,000 turns and in the last 1,000. Before: appends fell
   from 394/s to 44/s over 15,000 turns (90 % of it the cache's history walk).

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


async def fan_out(name: str, dsn: str | None, workdir: Path, refs: int) -> dict[str, Any]:
    """Scenario 4 on one backend."""
    from immagent.assets import EMPTY_CONVERSATION
    from immagent.ids import uuid7
    from immagent.records import AgentRecord, state_digest

    label = f"immagent_bench_rel_fan_{name}"
    backend = await _backend(name, dsn, workdir, label)
    store = Store(backend)
    out: dict[str, Any] = {"backend": name, "refs": refs}
    try:
        await store.init_schema()
        agent = await store.create_agent("wide", "You are wide.", "m")
        agent = await store.append(agent, [Message(role="user", content=f"message {i}")
                                           for i in range(refs)])
        for key, call in (("verify_s", store.verify), ("verify_agent_s",
                                                       lambda: store.verify(agent)),
                          ("gc_s", store.gc)):
            with Timer() as t:
                result = await call()
            out[key] = t.seconds
            assert getattr(result, "ok", True), result
        # The crafted shape: one node listing one message `refs` times, as a bundle.
        async with await Store.connect("memory://") as maker:
            await maker.init_schema()
            prompt = await maker.create_agent("crafted", "You are crafted.", "m")
            again = Message(role="user", content="again")
            node = EMPTY_CONVERSATION.extend([again] * refs)
            await maker.commit([again, node])
            r = prompt.record
            record = AgentRecord(id=uuid7(), parent_id=None, created_at=r.created_at,
                                 name="crafted", model="m", system_prompt=r.system_prompt,
                                 conversation=node.digest, model_config={}, metadata={},
                                 digest=state_digest("crafted", "m", r.system_prompt,
                                                     node.digest, {}, {}))
            await maker.commit([], [record.to_row()])
            bundle = workdir / f"crafted-{name}.bundle"
            await maker.export(record.id, bundle)
        with Timer() as t:
            await store.import_states(bundle)
        out["import_s"] = t.seconds
        with Timer() as t:
            report = await store.verify()
        out["verify_after_import_s"] = t.seconds
        assert report.ok, report.lines()
    finally:
        await store.close()
        if name == "postgres" and dsn is not None:
            await drop_database(dsn, label)
    return out


async def delete_lineage(name: str, dsn: str | None, workdir: Path,
                         states: int) -> dict[str, Any]:
    """Scenario 5 on one backend."""
    from datetime import UTC, datetime

    from immagent.ids import uuid7
    from immagent.records import AgentRecord, state_digest

    label = f"immagent_bench_rel_lineage_{name}"
    backend = await _backend(name, dsn, workdir, label)
    store = Store(backend)
    try:
        await store.init_schema()
        agent = await store.create_agent("long", "You go on.", "m")
        record, batch = agent.record, []
        for i in range(states - 1):
            record = AgentRecord(
                id=uuid7(), parent_id=record.id, created_at=datetime.now(UTC),
                name=record.name, model=record.model, system_prompt=record.system_prompt,
                conversation=record.conversation, model_config={}, metadata={"i": i},
                digest=state_digest(record.name, record.model, record.system_prompt,
                                    record.conversation, {}, {"i": i}))
            batch.append(record.to_row())
            if len(batch) == 2000:
                await store.commit([], batch)
                batch = []
        await store.commit([], batch)
        with Timer() as t:
            deleted = await store.delete_lineage(record.id)
        assert len(deleted) == states
    finally:
        await store.close()
        if name == "postgres" and dsn is not None:
            await drop_database(dsn, label)
    return {"backend": name, "states": states, "seconds": t.seconds}


_WINDOW = 1000


async def long_run(name: str, dsn: str | None, workdir: Path, turns: int) -> list[dict[str, Any]]:
    """Scenario 6 on one backend: steps per second in the first and the last window."""
    label = f"immagent_bench_rel_steps_{name}"
    backend = await _backend(name, dsn, workdir, label)
    store = Store(backend)
    rows: list[dict[str, Any]] = []
    try:
        await store.init_schema()

        async def windows(client: str, step: Any) -> None:
            rates: list[float] = []
            started = time.perf_counter()
            for turn in range(turns):
                await step(turn)
                if (turn + 1) % _WINDOW == 0:
                    now = time.perf_counter()
                    rates.append(_WINDOW / (now - started))
                    started = now
            rows.append({"backend": name, "client": client, "turns": turns,
                         "first_per_s": rates[0], "last_per_s": rates[-1],
                         "last_over_first": rates[-1] / rates[0]})

        state: dict[str, Any] = {}
        state["a"] = await store.create_agent("appends", "You go on.", "m")

        async def append(turn: int) -> None:
            state["a"] = await store.append(state["a"], _turn("append", turn))

        await windows("store.append", append)
        state["b"] = await store.create_agent("reads", "You go on.", "m")

        async def append_and_read(turn: int) -> None:
            state["b"] = await store.append(state["b"], _turn("read", turn))
            assert len(await state["b"].get_messages()) == 2 * turn + 2

        await windows("append + get_messages", append_and_read)
        from benchmarks.openai_agents_baseline import turn_items
        from immagent.integrations.openai_agents import ImmAgentSession

        session = ImmAgentSession("long", store)

        async def add_items(turn: int) -> None:
            user = user_text("session", turn)
            await session.add_items(turn_items("session", turn, user, "Echo: " + user))

        await windows("session add_items", add_items)
        session.close()
    finally:
        await store.close()
        if name == "postgres" and dsn is not None:
            await drop_database(dsn, label)
    return rows


def _turn(thread: str, turn: int) -> list[Message]:
    user = user_text(thread, turn)
    return [Message(role="user", content=user), Message(role="assistant", content="Echo: " + user)]


def _ensure_postgres() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-postgres.sh")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


SCENARIOS = ("checks", "log", "fan-out", "lineage", "steps")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL server DSN (default: the project's own)")
    parser.add_argument("--backends", nargs="+", default=["postgres", "sqlite"])
    parser.add_argument("--full", action="store_true",
                        help="full sizes: 5x the lineages, 80,000 refs, 100,001 states, "
                             "15,000 turns")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    dsn = args.dsn or (_ensure_postgres() if "postgres" in args.backends else None)
    scale = 5 if args.full else 1
    shapes = [(4 * scale, 50, 100), (20 * scale, 250, 2)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "checks" in args.only:
            results["checks"] = [asyncio.run(checks(b, dsn, work, *shape))
                                 for shape in shapes for b in args.backends]
        if "log" in args.only:
            results["log"] = log_scaling(work)
        if "fan-out" in args.only:
            results["fan_out"] = [asyncio.run(fan_out(b, dsn, work,
                                                      80_000 if args.full else 20_000))
                                  for b in args.backends]
        if "lineage" in args.only:
            results["lineage"] = [asyncio.run(delete_lineage(
                b, dsn, work, 100_001 if args.full else 20_001)) for b in args.backends]
        if "steps" in args.only:
            results["steps"] = [row for b in args.backends for row in asyncio.run(
                long_run(b, dsn, work, 15_000 if args.full else 3_000))]
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _print(results: dict[str, Any]) -> None:
    if "checks" in results:
        print_table("1-2. gc's checks and verify's new queries (median of 3)",
                    ["backend", "lineages x steps x msgs", "assets", "states", "gc, no checks",
                     "gc, checked", "overhead", "verify", "misfit_refs", "cyclic_states"],
                    [[r["backend"], r["shape"], r["assets"], r["states"],
                      f"{r['gc_unchecked_s'] * 1000:.0f} ms",
                      f"{r['gc_checked_s'] * 1000:.0f} ms",
                      f"{(r['gc_checked_s'] / r['gc_unchecked_s'] - 1) * 100:+.0f}%",
                      f"{r['verify_s'] * 1000:.0f} ms", f"{r['misfit_refs_s'] * 1000:.0f} ms",
                      f"{r['cyclic_states_s'] * 1000:.1f} ms"] for r in results["checks"]])
    if "log" in results:
        print_table("3. immagent log (SQLite, a fresh process per run, median of 3)",
                    ["states", "command", "wall", "peak RSS"],
                    [[r["states"], "log" if r["limit"] is None else f"log -n {r['limit']}",
                      f"{r['seconds']:.2f} s", f"{r['peak_rss'] / 2**20:.0f} MiB"]
                     for r in results["log"]])
    if "fan_out" in results:
        print_table("4. one node of N refs: one append of N messages; a bundle listing one "
                    "message N times",
                    ["backend", "N", "verify", "verify(agent)", "gc", "import bundle",
                     "verify after import"],
                    [[r["backend"], f"{r['refs']:,}", f"{r['verify_s']:.2f} s",
                      f"{r['verify_agent_s']:.2f} s", f"{r['gc_s']:.2f} s",
                      f"{r['import_s']:.2f} s", f"{r['verify_after_import_s']:.2f} s"]
                     for r in results["fan_out"]])
    if "lineage" in results:
        print_table("5. delete_lineage", ["backend", "states", "seconds"],
                    [[r["backend"], f"{r['states']:,}", f"{r['seconds']:.2f} s"]
                     for r in results["lineage"]])
    if "steps" in results:
        print_table(f"6. steps of one lineage in one process (per {_WINDOW:,}-turn window)",
                    ["backend", "client", "turns", "first window", "last window", "last/first"],
                    [[r["backend"], r["client"], f"{r['turns']:,}",
                      f"{r['first_per_s']:.0f}/s", f"{r['last_per_s']:.0f}/s",
                      f"{r['last_over_first']:.2f}"] for r in results["steps"]])


if __name__ == "__main__":
    main()
