"""What the audit features cost: signing and verifying a bundle, diffing two forks,
proving one message.

    uv run python -m benchmarks.audits [--dsn DSN] [--backends postgres sqlite] [--full]

1. **Signed bundles.** A 1,000-turn agent (400-byte user messages, their echoed replies)
   exported without and with an Ed25519 signature, then checked by ``verify_bundle`` alone
   and under a trust policy: the signature's cost is the difference, measured side by side
   in one run (the unsigned export and verify are the baseline). Also one signature and
   one check alone.
2. **Diff.** A 10,000-turn agent and two forks of it, 5 turns each: ``store.diff`` of the
   two fork heads, cold (the cache cleared: nothing of either history in memory) and
   warm. The goal is at most 5 ms: the time follows the divergence (5 turns a side), not
   the history. Beside it, one primary-key read of a state in the same run: a diff makes
   three sequential round trips (the two lineage stretches together, the nodes they name,
   the elements), so on a loaded server its time is read best in those units.

3. **Inclusion proofs.** An agent of 1,000 then 10,000 turns: ``store.prove`` of its
   first, middle and last message (the first sits lowest in the largest subtree: the
   longest path), the document's size without the message's body (the O(log n) digests and
   the state's own fields; goal <= 1 KB) and with it, and ``verify_proof`` against the
   state's digest (median of 300 checks; goal <= 1 ms). Beside it, the bytes per turn the
   accumulator adds to the store (goal <= 64): every node's ``acc`` field (measured on a
   stored node: its encoded fields with and without it) plus the ``peaks`` column kept at
   every 16th node (summed from the table).

The goals are printed PASS/MISS (``targets``). Numbers, not tests: nothing here asserts a
timing. ``make bench`` prints these tables
after the storage benchmarks (``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import drop_database, fresh_database, print_table, user_text
from immagent import Message, PersistentAgent, Store, verify_proof
from immagent.assets import ConversationNode, NodeFields, encode
from immagent.attestations import Statement, Subject
from immagent.audit.bundle import verify_bundle
from immagent.audit.keys import generate_key, verify_signed
from immagent.audit.trust import TrustPolicy
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest

PROMPT = "You are measured."
MODEL = "immagent/echo"


@dataclass
class BundleTimes:
    backend: str
    turns: int
    file_bytes: int
    export_ms: float
    export_signed_ms: float
    verify_ms: float
    verify_trusted_ms: float
    sign_us: float
    check_us: float


@dataclass
class DiffTimes:
    backend: str
    history: int
    divergence: int
    cold_best_ms: float
    cold_ms: float
    cold_p95_ms: float
    warm_ms: float
    probe_ms: float  # one primary-key read of a state, same run: the round trip's cost
    cold_in_probes: float  # the cold median in round trips of that size


@dataclass
class ProofTimes:
    backend: str
    turns: int
    proof_bytes: int  # the largest of the positions proved, without the message's body
    proof_body_bytes: int  # the same proof with the body (a 400-byte user message)
    prove_ms: float  # Store.prove, median (reads the chain: what a read of it costs)
    verify_us: float  # verify_proof against the state digest, median
    acc_field_bytes: int  # the acc field in one node's encoded fields
    peaks_bytes_per_turn: float  # the peaks column, summed over the table, per turn

    @property
    def acc_bytes_per_turn(self) -> float:
        return round(self.acc_field_bytes + self.peaks_bytes_per_turn, 1)


#: Issue 24's goals.
PROOF_BYTES_GOAL = 1000
PROOF_VERIFY_US_GOAL = 1000.0
ACC_BYTES_PER_TURN_GOAL = 64
DIFF_MS_GOAL = 5.0


@dataclass
class AuditResults:
    bundles: list[BundleTimes] = field(default_factory=list)
    diffs: list[DiffTimes] = field(default_factory=list)
    proofs: list[ProofTimes] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"bundles": [asdict(b) for b in self.bundles],
                "diffs": [asdict(d) for d in self.diffs],
                "proofs": [asdict(p) | {"acc_bytes_per_turn": p.acc_bytes_per_turn}
                           for p in self.proofs],
                "targets": targets(self)}


async def grow(store: Store, agent: PersistentAgent, turns: int, tag: str,
               batch: int = 500) -> PersistentAgent:
    """``turns`` steps on ``agent``, committed ``batch`` states at a time (the states a
    step-by-step ``append`` would write, in far fewer transactions)."""
    record = agent.record
    (node,) = await store.get_assets([record.conversation], ConversationNode)
    for start in range(0, turns, batch):
        assets: list[Any] = []
        rows = []
        for i in range(start, min(turns, start + batch)):
            text = user_text(tag, i)
            messages = [Message(role="user", content=text),
                        Message(role="assistant", content=f"Echo: {text}", model=MODEL,
                                input_tokens=1, output_tokens=1)]
            node = node.extend(messages)
            record = AgentRecord(
                id=uuid7(), parent_id=record.id, created_at=datetime.now(UTC),
                name=record.name, model=record.model, system_prompt=record.system_prompt,
                conversation=node.digest, model_config={}, metadata={},
                digest=state_digest(record.name, record.model, record.system_prompt,
                                    node.digest, {}, {}))
            assets += [*messages, node]
            rows.append(record.to_row())
        await store.commit(assets, rows)
    return await store.load_agent(record.id)


async def _timed(fn: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _median(times: Sequence[float]) -> float:
    return round(statistics.median(times), 3)


def _p95(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3)


async def bundle_times(backend: str, dsn: str, work: Path, turns: int,
                       samples: int) -> BundleTimes:
    key = generate_key(work / f"key-{backend}")
    policy = TrustPolicy([key.public])
    async with await Store.connect(dsn) as store:
        await store.init_schema()
        agent = await grow(store, await store.create_agent("bundle", PROMPT, MODEL), turns,
                           "b")
        plain, signed = work / f"{backend}.bundle", work / f"{backend}-signed.bundle"

        async def export() -> None:
            plain.unlink(missing_ok=True)
            await store.export(agent, plain)

        async def export_signed() -> None:
            signed.unlink(missing_ok=True)
            await store.export(agent, signed, sign=[key])

        export_ms = await _timed(export, samples)
        export_signed_ms = await _timed(export_signed, samples)

    async def check() -> None:
        verify_bundle(plain)

    async def check_trusted() -> None:
        verify_bundle(signed, trust=policy)

    verify_ms = await _timed(check, samples)
    verify_trusted_ms = await _timed(check_trusted, samples)
    statement = Statement(purpose="bundle", subjects=(Subject(agent.id, 4, agent.digest),),
                          format=4, checksum=b"\x00" * 32)
    start = time.perf_counter()
    made = [key.sign(statement) for _ in range(200)]
    sign_us = (time.perf_counter() - start) / 200 * 1e6
    start = time.perf_counter()
    assert all(verify_signed(s) for s in made)
    check_us = (time.perf_counter() - start) / 200 * 1e6
    return BundleTimes(backend, turns, signed.stat().st_size, _median(export_ms),
                       _median(export_signed_ms), _median(verify_ms),
                       _median(verify_trusted_ms), round(sign_us, 1), round(check_us, 1))


async def diff_times(backend: str, dsn: str, history: int, divergence: int,
                     samples: int) -> DiffTimes:
    async with await Store.connect(dsn) as store:
        await store.init_schema()
        base = await grow(store, await store.create_agent("diff", PROMPT, MODEL), history, "d")
        left = await grow(store, base, divergence, "L", batch=1)
        right = await grow(store, base, divergence, "R", batch=1)
        found = await store.diff(left, right)
        assert found.ancestor == base.id and len(found.chains[0].left) == 2 * divergence
    async with await Store.connect(dsn) as reader:
        await reader.diff(left.id, right.id)  # the connection and its pool warmed up
        cold = []
        for _ in range(samples):  # nothing of either history cached
            reader.clear_cache()
            start = time.perf_counter()
            await reader.diff(left.id, right.id)
            cold.append((time.perf_counter() - start) * 1000)
        warm = await _timed(lambda: reader.diff(left.id, right.id), samples)
        # The yardstick, same run: one primary-key read of a state (a round trip).
        probe = await _timed(lambda: reader.get_states([left.id]), samples)
    return DiffTimes(backend, history, divergence, round(min(cold), 3), _median(cold),
                     _p95(cold), _median(warm), _median(probe),
                     round(statistics.median(cold) / statistics.median(probe), 1))


async def _peaks_bytes(dsn: str) -> int:
    """The bytes of the accumulator peaks kept beside nodes (the ``peaks`` column)."""
    sql = "SELECT coalesce(sum(length(peaks)), 0) FROM immagent_nodes"
    if dsn.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(dsn.removeprefix("sqlite:///"))) as conn:
            return int(conn.execute(sql).fetchone()[0])
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql)
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def proof_times(backend: str, dsn: str, sizes: Sequence[int], samples: int
                      ) -> list[ProofTimes]:
    """Proofs of one growing agent at each size (turns), on its own store."""
    out = []
    async with await Store.connect(dsn) as store:
        await store.init_schema()
        agent = await store.create_agent("proved", PROMPT, MODEL)
        grown = 0
        for turns in sizes:
            agent = await grow(store, agent, turns - grown, f"p{turns}")
            grown = turns
            (head,) = await store.get_assets([agent.record.conversation], ConversationNode)
            n = head.length
            sizes_seen, with_body, prove_ms, verify_us = [], [], [], []
            for index in (0, n // 2, n - 2):  # user messages: first, middle, last
                start = time.perf_counter()
                bare = await store.prove(agent, element=index, include_body=False)
                prove_ms.append((time.perf_counter() - start) * 1000)
                full_doc = await store.prove(agent, element=index)
                sizes_seen.append(len(bare))
                with_body.append(len(full_doc))
                for _ in range(samples):
                    start = time.perf_counter()
                    verify_proof(bare, agent.digest)
                    verify_us.append((time.perf_counter() - start) * 1e6)
            fields = NodeFields(length=head.length, size=head.size, acc=head.acc,
                                span=head.span)
            acc_field = len(encode(fields)) - len(encode(
                msgspec.structs.replace(fields, acc=None)))
            peaks = await _peaks_bytes(dsn)
            out.append(ProofTimes(backend, turns, max(sizes_seen), max(with_body),
                                  _median(prove_ms), round(statistics.median(verify_us), 1),
                                  acc_field, round(peaks / turns, 1)))
    return out


def targets(res: AuditResults) -> list[dict[str, str]]:
    """Issue 24's goals, PASS/MISS, with the numbers behind each."""
    def target(name: str, ok: bool, detail: str) -> dict[str, str]:
        return {"target": name, "status": "PASS" if ok else "MISS", "detail": detail}

    out = []
    for p in res.proofs:
        out.append(target(f"{p.backend}: proof at {p.turns:,} turns <= 1 KB",
                          p.proof_bytes <= PROOF_BYTES_GOAL,
                          f"{p.proof_bytes} B without the message's body "
                          f"({p.proof_body_bytes} B with it)"))
        out.append(target(f"{p.backend}: proof verifies at {p.turns:,} turns in <= 1 ms",
                          p.verify_us <= PROOF_VERIFY_US_GOAL,
                          f"{p.verify_us / 1000:.3f} ms (median)"))
    for p in res.proofs:
        if p.turns == max(q.turns for q in res.proofs if q.backend == p.backend):
            out.append(target(f"{p.backend}: accumulator <= 64 B/turn at {p.turns:,} turns",
                              p.acc_bytes_per_turn <= ACC_BYTES_PER_TURN_GOAL,
                              f"{p.acc_bytes_per_turn} B/turn: acc field {p.acc_field_bytes}"
                              f" B a node + peaks {p.peaks_bytes_per_turn} B/turn"))
    for d in res.diffs:
        out.append(target(f"{d.backend}: diff of 5-turn forks at {d.history:,} turns <= 5 ms",
                          d.cold_ms <= DIFF_MS_GOAL,
                          f"cold median {d.cold_ms} ms (best {d.cold_best_ms}, warm "
                          f"{d.warm_ms}; one state read {d.probe_ms} ms)"))
    return out


async def run(*, full: bool = False, dsn: str | None = None,
              backends: Sequence[str] = ("postgres", "sqlite")) -> AuditResults:
    """Both measures on each backend asked for (PostgreSQL only with ``dsn``)."""
    res = AuditResults()
    samples = 20 if full else 7
    with tempfile.TemporaryDirectory(prefix="immagent-audits-") as tmp:
        work = Path(tmp)
        for backend in backends:
            if backend == "postgres" and dsn is None:
                continue
            target = (await fresh_database(dsn, "immagent_bench_audits")
                      if backend == "postgres" and dsn is not None
                      else f"sqlite:///{work / 'audits.db'}")
            try:
                res.bundles.append(await bundle_times(backend, target, work, 1000, samples))
                target = (await fresh_database(dsn, "immagent_bench_audits")
                          if backend == "postgres" and dsn is not None
                          else f"sqlite:///{work / 'diff.db'}")
                res.diffs.append(await diff_times(backend, target, 10_000, 5,
                                                  samples * 3))
                target = (await fresh_database(dsn, "immagent_bench_audits")
                          if backend == "postgres" and dsn is not None
                          else f"sqlite:///{work / 'proofs.db'}")
                res.proofs += await proof_times(backend, target, (1000, 10_000),
                                                300 if full else 100)
            finally:
                if backend == "postgres" and dsn is not None:
                    await drop_database(dsn, "immagent_bench_audits")
    return res


def report(res: AuditResults) -> None:
    """Print the two tables."""
    print_table(
        "Signed bundles: a 1,000-turn agent, export and verify (ms, median; the unsigned "
        "export and verify beside them, same run)",
        ["backend", "turns", "file", "export", "export+sign", "verify", "verify+trust",
         "sign (us)", "check (us)"],
        [(b.backend, b.turns, b.file_bytes, b.export_ms, b.export_signed_ms, b.verify_ms,
          b.verify_trusted_ms, b.sign_us, b.check_us) for b in res.bundles])
    print_table(
        "Diff of two 5-turn forks of a 10,000-turn agent (ms; cold: nothing of either "
        "history cached; goal <= 5 ms; on a shared machine the best run is the cost, the "
        "median includes waiting for the cores)",
        ["backend", "history", "each side", "cold best", "cold median", "cold p95",
         "warm median", "1 read", "cold/read"],
        [(d.backend, d.history, d.divergence, d.cold_best_ms, d.cold_ms, d.cold_p95_ms,
          d.warm_ms, d.probe_ms, d.cold_in_probes) for d in res.diffs])
    print_table(
        "Inclusion proofs: one message of an agent (the largest of its first, middle and "
        "last message's; bytes, ms, us median) and what the accumulator adds per turn",
        ["backend", "turns", "proof", "with body", "prove (ms)", "verify (us)",
         "acc B/turn", "(acc field", "+ peaks)"],
        [(p.backend, p.turns, p.proof_bytes, p.proof_body_bytes, p.prove_ms, p.verify_us,
          p.acc_bytes_per_turn, p.acc_field_bytes, p.peaks_bytes_per_turn)
         for p in res.proofs])
    print("\nIssue 24's goals")
    for t in targets(res):
        print(f"  {t['status']}  {t['target']}: {t['detail']}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audits")
    parser.add_argument("--full", action="store_true", help="more samples")
    parser.add_argument("--dsn", help="PostgreSQL server (default: the project's throwaway "
                        "one, scripts/ensure-postgres.sh)")
    parser.add_argument("--backends", nargs="+", choices=("postgres", "sqlite"),
                        default=["postgres", "sqlite"])
    args = parser.parse_args(argv)
    dsn = args.dsn
    if dsn is None and "postgres" in args.backends:
        from benchmarks.run import ensure_postgres

        dsn = ensure_postgres()
    report(asyncio.run(run(full=args.full, dsn=dsn, backends=args.backends)))


if __name__ == "__main__":
    main()
