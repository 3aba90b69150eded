"""ImmAgentStore beside LangGraph's own stores, on the same memories, in one run.

LangGraph's ``AsyncSqliteStore`` (and ``AsyncPostgresStore`` when a server is given) and
ImmAgentStore on the same backend hold the same workload: ``users`` users with ``keys``
memories each (namespace ``("memories", user)``, a JSON object of about 200 bytes), every
memory then updated ``updates`` times (LangGraph's stores overwrite it in place; ImmAgentStore
keeps every version as a state). Then, sample by sample and alternating which side goes
first (so load from elsewhere on the machine falls on both alike):

* **put**: an update of one existing memory (a new value);
* **get**: one memory by key (no TTL, so no refresh write);
* **search**: the newest 10 memories of one user, and the same with a ``filter``;
* **bytes**: the SQLite file after a WAL checkpoint (PostgreSQL: the tables and indexes
  of each store), after the workload.

Latencies are p50 and p99 over the samples. Ours keeps every version, theirs only the
latest, so its bytes and its searches (which read a key's history) grow with ``updates``.

Run alone: ``python -m benchmarks.langgraph_store [--users 50] [--dsn postgresql://…]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Backend,
    Latency,
    drop_database,
    fmt_bytes,
    fresh_database,
    pg_relation_bytes,
    print_table,
    sqlite_file_bytes,
)

__all__ = ["StoreResults", "report", "run"]

_IMMAGENT_TABLES = ("immagent_assets", "immagent_states", "immagent_schema")
_LANGGRAPH_TABLES = ("store", "store_migrations")


@dataclass
class StoreResults:
    """Every figure of one run."""

    users: int
    keys: int
    updates: int
    samples: int
    sizes: dict[str, int] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"users": self.users, "keys": self.keys, "updates": self.updates,
                "samples": self.samples, "bytes": self.sizes,
                "latency": [lat.as_dict() for lat in self.latency]}


def memory(user: int, key: int, version: int) -> dict[str, Any]:
    """One memory as an application keeps it: some text and a few fields."""
    rng = random.Random(f"{user}/{key}/{version}")
    words = " ".join(rng.choice(("tea", "Lyon", "cats", "jazz", "rain", "bikes", "maths"))
                     for _ in range(20))
    return {"text": f"user {user} said: {words}", "kind": rng.choice(("fact", "preference")),
            "confidence": round(rng.random(), 3), "version": version}


@asynccontextmanager
async def _langgraph(backend: Backend, where: str) -> AsyncIterator[Any]:
    if backend == "sqlite":
        from langgraph.store.sqlite.aio import AsyncSqliteStore

        async with AsyncSqliteStore.from_conn_string(where) as store:
            await store.setup()
            yield store
    else:
        from langgraph.store.postgres.aio import AsyncPostgresStore

        async with AsyncPostgresStore.from_conn_string(where) as store:
            await store.setup()
            yield store


@asynccontextmanager
async def _immagent(where: str) -> AsyncIterator[Any]:
    from immagent.integrations.langgraph_store import ImmAgentStore

    async with ImmAgentStore.from_conn_string(where) as store:
        await store.asetup()
        yield store


async def _fill(store: Any, res: StoreResults) -> None:
    for version in range(res.updates + 1):
        for user in range(res.users):
            for key in range(res.keys):
                await store.aput(("memories", str(user)), f"m{key}", memory(user, key, version))


def _operations(user: str, key: str, value: dict[str, Any]
                ) -> dict[str, Callable[[Any], Awaitable[object]]]:
    """The measured calls of one sample, on either store."""
    namespace = ("memories", user)
    return {
        "put (update)": lambda s: s.aput(namespace, key, value),
        "get": lambda s: s.aget(namespace, key),
        "search (10 newest)": lambda s: s.asearch(namespace, limit=10),
        "search (filter)": lambda s: s.asearch(namespace, filter={"kind": "fact"}, limit=10),
    }


async def _measure(res: StoreResults, backend: Backend, ours: Any, theirs: Any) -> None:
    rng = random.Random(7)
    samples: dict[tuple[str, str], list[float]] = {}
    for i in range(res.samples):
        user, key = rng.randrange(res.users), rng.randrange(res.keys)
        calls = _operations(str(user), f"m{key}", memory(user, key, res.updates + 1 + i))
        for name, call in calls.items():
            pair = (("immagent", ours), ("langgraph", theirs))
            for system, store in pair if i % 2 else pair[::-1]:
                start = time.perf_counter()
                await call(store)
                samples.setdefault((system, name), []).append(time.perf_counter() - start)
    for (system, name), values in samples.items():
        res.latency.append(Latency(backend, name, res.updates, tuple(values),
                                   "immagent" if system == "immagent" else "langgraph"))


async def run(*, users: int = 50, keys: int = 10, updates: int = 4, samples: int = 50,
              dsn: str | None = None) -> StoreResults:
    """Both stores on SQLite (and on PostgreSQL when ``dsn`` names a server)."""
    res = StoreResults(users, keys, updates, samples)
    with tempfile.TemporaryDirectory(prefix="immagent-store-bench-") as tmp:
        work = Path(tmp)
        ours_path, theirs_path = work / "immagent.db", work / "langgraph.db"
        async with _immagent(str(ours_path)) as ours, \
                _langgraph("sqlite", str(theirs_path)) as theirs:
            for store in (ours, theirs):
                await _fill(store, res)
            res.sizes["immagent, sqlite"] = sqlite_file_bytes(ours_path)
            res.sizes["langgraph, sqlite"] = sqlite_file_bytes(theirs_path)
            await _measure(res, "sqlite", ours, theirs)
    if dsn:
        ours_dsn = await fresh_database(dsn, "immagent_bench_store_ours")
        theirs_dsn = await fresh_database(dsn, "immagent_bench_store_theirs")
        try:
            async with _immagent(ours_dsn) as ours, _langgraph("postgres", theirs_dsn) as theirs:
                for store in (ours, theirs):
                    await _fill(store, res)
                res.sizes["immagent, postgres"] = await pg_relation_bytes(ours_dsn,
                                                                          _IMMAGENT_TABLES)
                res.sizes["langgraph, postgres"] = await pg_relation_bytes(theirs_dsn,
                                                                           _LANGGRAPH_TABLES)
                await _measure(res, "postgres", ours, theirs)
        finally:
            await drop_database(dsn, "immagent_bench_store_ours")
            await drop_database(dsn, "immagent_bench_store_theirs")
    return res


def report(res: StoreResults) -> None:
    """Print the tables: latencies side by side with their ratio, then bytes."""
    rows = []
    for backend in ("sqlite", "postgres"):
        for name in ("put (update)", "get", "search (10 newest)", "search (filter)"):
            found = {lat.system: lat for lat in res.latency
                     if lat.backend == backend and lat.operation == name}
            if len(found) < 2:
                continue
            ours, theirs = found["immagent"], found["langgraph"]
            rows.append((backend, name, f"{ours.p50 * 1e3:.2f}", f"{theirs.p50 * 1e3:.2f}",
                         f"{ours.p50 / theirs.p50:.2f}x", f"{ours.p99 * 1e3:.2f}",
                         f"{theirs.p99 * 1e3:.2f}"))
    print_table(f"LangGraph BaseStore: ImmAgentStore beside LangGraph's store ({res.users} "
                f"users x {res.keys} memories, each put {res.updates + 1} times; "
                f"{res.samples} samples, alternating)",
                ("backend", "operation", "ours p50 ms", "theirs p50 ms", "ratio",
                 "ours p99 ms", "theirs p99 ms"), rows)
    size_rows = []
    for backend in ("sqlite", "postgres"):
        mine = res.sizes.get(f"immagent, {backend}")
        other = res.sizes.get(f"langgraph, {backend}")
        if mine is not None and other is not None:
            size_rows.append((backend, fmt_bytes(mine), fmt_bytes(other),
                              f"{mine / other:.2f}x"))
    print_table("LangGraph BaseStore: bytes after the workload (ours keeps every version)",
                ("backend", "immagent", "langgraph", "ratio"), size_rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.langgraph_store",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--dsn", help="a PostgreSQL server (both stores run there too)")
    args = parser.parse_args()
    report(asyncio.run(run(users=args.users, keys=args.keys, updates=args.updates,
                           samples=args.samples, dsn=args.dsn)))


if __name__ == "__main__":
    main()
