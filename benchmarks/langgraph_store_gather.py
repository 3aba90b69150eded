"""LangGraph's ``test_large_batches_async`` workload on ImmAgentStore beside its own stores.

LangGraph's store suite (``test_async_store.py::test_large_batches_async``) gathers
``rounds`` x ``keys`` x 6 calls at once: for every key, two puts, a get, a delete, a
``list_namespaces`` and a ``search``, over two namespaces (``rounds`` 10, ``keys`` 1000 in
LangGraph's test: 60,000 calls). This times the same workload on a fresh database per store,
LangGraph's store and ours on the same backend in one run (the order alternates between
repeats, so load from elsewhere falls on both alike), and counts what ImmAgentStore did:
transactions committed, and retries after another writer moved a key on.

Run alone: ``python -m benchmarks.langgraph_store_gather [--keys 1000] [--rounds 10]
[--dsn postgresql://…]`` (SQLite files without ``--dsn``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import drop_database, fresh_database, print_table

__all__ = ["gather_calls", "run"]


def gather_calls(store: Any, keys: int, rounds: int) -> list[Awaitable[Any]]:
    """The calls of LangGraph's test, in its order (not yet awaited)."""
    calls: list[Awaitable[Any]] = []
    for m in range(rounds):
        namespace = ("test", "foo", "bar", "baz", str(m % 2))
        for i in range(keys):
            calls += [store.aput(namespace, f"key{i}", value={"foo": f"bar{i}"}),
                      store.aget(namespace, f"key{i}"),
                      store.alist_namespaces(prefix=None, max_depth=m + 1),
                      store.asearch(("test",)),
                      store.aput(namespace, f"key{i}", value={"foo": f"bar{i}"}),
                      store.adelete(namespace, f"key{i}")]
    return calls


@asynccontextmanager
async def _open(side: str, where: str) -> AsyncIterator[Any]:
    if side == "immagent":
        from immagent.integrations.langgraph_store import ImmAgentStore

        async with ImmAgentStore.from_conn_string(where) as store:
            await store.asetup()
            yield store
    elif where.startswith("postgresql://"):
        from langgraph.store.postgres.aio import AsyncPostgresStore

        async with AsyncPostgresStore.from_conn_string(where) as theirs:
            await theirs.setup()
            yield theirs
    else:
        from langgraph.store.sqlite.aio import AsyncSqliteStore

        async with AsyncSqliteStore.from_conn_string(where) as theirs:
            await theirs.setup()
            yield theirs


async def _one(side: str, where: str, keys: int, rounds: int) -> dict[str, Any]:
    async with _open(side, where) as store:
        calls = gather_calls(store, keys, rounds)
        started = time.perf_counter()
        results = await asyncio.gather(*calls)
        seconds = time.perf_counter() - started
        assert len(results) == rounds * keys * 6
        figures: dict[str, Any] = {"seconds": seconds}
        if side == "immagent":
            stats = store.write_stats()
            figures |= {"commits": stats["commits"], "retries": stats["retries"],
                        "states": stats["states"]}
        return figures


async def run(*, keys: int = 1000, rounds: int = 10, repeats: int = 1,
              dsn: str | None = None) -> list[dict[str, Any]]:
    """Time the workload ``repeats`` times on each side; returns one row per run."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for side in (("immagent", "langgraph") if r % 2 else ("langgraph", "immagent")):
                name = f"lgs_gather_{side}_{r}"
                where = (await fresh_database(dsn, name) if dsn
                         else str(Path(tmp) / f"{name}.db"))
                try:
                    rows.append({"side": side, "repeat": r,
                                 **await _one(side, where, keys, rounds)})
                finally:
                    if dsn:
                        await drop_database(dsn, name)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dsn", default=None, help="PostgreSQL server (else SQLite files)")
    args = parser.parse_args()
    rows = asyncio.run(run(keys=args.keys, rounds=args.rounds, repeats=args.repeats,
                           dsn=args.dsn))
    backend = "PostgreSQL" if args.dsn else "SQLite"
    print_table(f"{args.rounds * args.keys * 6:,} gathered calls on {args.keys} keys x 2 "
                f"namespaces ({backend})",
                ["store", "repeat", "seconds", "commits", "retries", "states"],
                [[("ImmAgentStore" if r["side"] == "immagent" else "LangGraph's"), r["repeat"],
                  f"{r['seconds']:.2f}", r.get("commits", "-"), r.get("retries", "-"),
                  r.get("states", "-")] for r in rows])


if __name__ == "__main__":
    main()
