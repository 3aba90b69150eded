"""Run LangGraph's own store tests against ImmAgentStore, beside LangGraph's stores, in one run.

    python scripts/peer_langgraph_store.py --repo PATH [--dsn POSTGRES] [--json FILE]

``--repo`` is a clone (or bare git directory) of github.com/langchain-ai/langgraph; the
tests are taken from it at the tag of the installed ``langgraph-checkpoint-sqlite`` and
``langgraph-checkpoint-postgres``; when the clone lacks that tag, from the sdist of the
installed release on PyPI (its ``tests/`` folder is the tag's), else from the newest tag of
that library the clone holds (said loudly). They are unpacked to a temporary directory,
never copied into this repository.

Each test module runs twice in one pytest process: once as LangGraph wrote it (its
``SqliteStore``/``AsyncSqliteStore``/``PostgresStore``/``AsyncPostgresStore``) and once
with those names bound to ImmAgentStore on the same backend (SQLite files; a fresh
PostgreSQL database per test). No test changes. Two fixtures do, for ImmAgentStore only:
LangGraph's PostgreSQL ``store`` fixtures run each test three times ("default", "pipe",
"pool": how PostgresStore uses psycopg), which would be the same ImmAgentStore three
times, so it runs once; and the async one drops PostgresStore's migrations table through
its private cursor, a step ImmAgentStore's fixture leaves out (``_postgres_fixture``).
ImmAgentStore is one class for sync and async code, so the stand-in for LangGraph's async
classes maps their async ``setup``/``sweep_ttl``/``start_ttl_sweeper``/
``stop_ttl_sweeper`` to its ``a``-prefixed methods. LangGraph marks its timing-sensitive
TTL tests ``flaky(retries=3)`` for pytest-retry; that plugin is not installed here, so
they run once, on both sides alike.

The report counts, per module, what passes on each side and names every test that passes
with LangGraph's store and fails with ImmAgentStore; ``NOT_APPLICABLE`` says which tests
cannot apply and why (vector search, LangGraph's SQL internals).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: library directory -> (tag prefix, installed distribution, test modules)
TARGETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "checkpoint-sqlite": ("checkpointsqlite", "langgraph-checkpoint-sqlite",
                          ("test_store.py", "test_async_store.py", "test_ttl.py")),
    "checkpoint-postgres": ("checkpointpostgres", "langgraph-checkpoint-postgres",
                            ("test_store.py", "test_async_store.py")),
}
STORE_CLASSES = ("SqliteStore", "AsyncSqliteStore", "PostgresStore", "AsyncPostgresStore")

_VECTOR = "vector search (index=...): not in ImmAgentStore's first version"
_SQL = "LangGraph's SQL internals (its tables, cursors, query builders), not the BaseStore API"
_HELPER = "a helper of LangGraph's SQL store, tested without any store"
_SQLITE_VECTOR = ("test_vector_store_initialization", "test_vector_insert_with_auto_embedding",
                  "test_vector_update_with_embedding", "test_vector_search_with_filters",
                  "test_vector_search_pagination", "test_vector_search_edge_cases",
                  "test_embed_with_path", "test_search_items")
_PG_VECTOR = (*_SQLITE_VECTOR[:6], "test_embed_with_path_operation_config", "test_scores",
              "test_non_ascii")
#: "library/module::test" (parameters left out) that cannot apply to ImmAgentStore, and why.
NOT_APPLICABLE: dict[str, str] = {
    **{f"checkpoint-sqlite/test_store::{t}": _VECTOR for t in (
        *_SQLITE_VECTOR, "test_embed_with_path_operation_config", "test_scores",
        "test_non_ascii", "test_basic_store_operations", "test_list_namespaces_operations")},
    **{f"checkpoint-sqlite/test_async_store::{t}": _VECTOR for t in (
        *_SQLITE_VECTOR, "test_basic_store_ops", "test_list_namespaces")},
    **{f"checkpoint-postgres/test_store::{t}": _VECTOR for t in (
        *_PG_VECTOR, "test_embed_with_path_sync")},
    **{f"checkpoint-postgres/test_async_store::{t}": _VECTOR for t in (
        *_PG_VECTOR[:6], "test_embed_with_path", "test_search_sorting")},
    **{f"checkpoint-sqlite/test_store::{t}": _SQL for t in (
        "test_nonnull_migrations", "test_list_namespaces_prefix_uses_indexable_condition",
        "test_sql_injection_vulnerability")},
    **{f"checkpoint-postgres/test_store::{t}": _SQL for t in (
        "test_nonnull_migrations", "test_omit_expired_filters_read_paths",
        "test_omit_expired_disabled_preserves_expired_rows",
        "test_omit_expired_refresh_ttl_only_refreshes_live_rows",
        "test_omit_expired_search_pagination")},
    **{f"checkpoint-postgres/test_async_store::{t}": _SQL for t in (
        "test_abatch_uses_single_pool_checkout", "test_omit_expired_filters_read_paths",
        "test_omit_expired_disabled_preserves_expired_rows",
        "test_omit_expired_refresh_ttl_only_refreshes_live_rows",
        "test_omit_expired_search_pagination")},
    **{f"checkpoint-sqlite/test_store::{t}": _HELPER for t in (
        "test_escape_glob_literal", "test_namespace_match_pattern")},
    **{f"checkpoint-postgres/test_store::{t}": _HELPER for t in (
        "test_escape_like_literal", "test_namespace_match_pattern")},
}
#: Tests whose expectation is one LangGraph store's own choice where ImmAgentStore
#: deliberately follows LangGraph's documented contract instead (docs/langgraph-store.md).
BY_DESIGN: dict[str, str] = {
    "checkpoint-sqlite/test_ttl::test_ttl_override_default": (
        "SqliteStore renews a TTL on read only when TTLConfig sets refresh_on_read; "
        "BaseStore documents True as the default and PostgresStore applies it, as does "
        "ImmAgentStore, so the item read at 2 s lives 5 s from then"),
    "checkpoint-postgres/test_store::test_batch_list_namespaces_ops": (
        "the test passes a plain string as MatchCondition.path; PostgresStore reads it as one "
        "label per character and matches nothing (the test's all() holds on an empty list); "
        "ImmAgentStore refuses it with a ValidationError naming the field, as it refuses "
        "every malformed namespace pattern"),
}


# -- the stand-ins (imported by the generated modules, inside pytest) ----------------------

def _peer_dsn(conn_string: str) -> str:
    """What an ImmAgentStore opens where LangGraph's store would open ``conn_string``:
    ``":memory:"`` becomes a fresh SQLite file (so every test of the SQLite library runs on
    the SQLite backend), a path stays that file, a PostgreSQL URI that database."""
    if conn_string == ":memory:":
        folder = os.environ.get("IMMAGENT_PEER_TMP") or tempfile.gettempdir()
        return f"sqlite:///{Path(folder) / f'memory-{uuid.uuid4().hex}.db'}"
    if conn_string.startswith(("postgres://", "postgresql://")):
        return conn_string
    return f"sqlite:///{conn_string}"


def _stand_ins() -> dict[str, type]:
    from immagent.integrations.langgraph_store import ImmAgentStore

    class PeerStore(ImmAgentStore):
        """ImmAgentStore where LangGraph's sync store class is named."""

        @classmethod
        def from_conn_string(cls, conn_string: Any, *, ttl: Any = None,
                             index: Any = None, pipeline: bool = False,
                             pool_config: Any = None, **_: Any) -> Any:
            # pipeline / pool_config tune LangGraph's psycopg use; the immagent Store has
            # its own pool, so they change nothing here.
            return super().from_conn_string(_peer_dsn(str(conn_string)), ttl=ttl,
                                            index=index)

    class AsyncPeerStore(PeerStore):
        """ImmAgentStore where LangGraph's async store class is named: its async method
        names are ImmAgentStore's a-prefixed ones."""

        async def setup(self) -> None:  # type: ignore[override]
            await self.asetup()

        async def sweep_ttl(self) -> int:  # type: ignore[override]
            return await self.asweep_ttl()

        async def start_ttl_sweeper(self, sweep_interval_minutes: Any = None  # type: ignore[override]
                                    ) -> Any:
            return await self.astart_ttl_sweeper(sweep_interval_minutes)

        async def stop_ttl_sweeper(self, timeout: Any = None) -> bool:  # type: ignore[override]
            return await self.astop_ttl_sweeper(timeout)

    return {"SqliteStore": PeerStore, "PostgresStore": PeerStore,
            "AsyncSqliteStore": AsyncPeerStore, "AsyncPostgresStore": AsyncPeerStore}


def _postgres_fixture(module: Any, stand_in: Any, sync: bool) -> Any:
    """LangGraph's PostgreSQL ``store`` fixture for ImmAgentStore: a fresh database, the
    same TTL settings, ``setup`` twice (idempotence), the sweeper running. Two changes:
    one parametrisation instead of LangGraph's three ("default", "pipe", "pool" tune how
    its store uses psycopg: ImmAgentStore has its own pool, so all three would run the same
    store), and, in the async one, no dropping of PostgresStore's migrations table through
    its private cursor."""
    import psycopg
    import pytest

    def names() -> tuple[str, str, dict[str, Any]]:
        admin = module.DEFAULT_URI
        base, _, tail = admin.rpartition("/")
        query = "?" + tail.split("?", 1)[1] if "?" in tail else ""
        database = f"test_{uuid.uuid4().hex[:16]}"
        ttl = {"default_ttl": module.TTL_MINUTES, "refresh_on_read": True,
               "sweep_interval_minutes": module.TTL_MINUTES / 2}
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        return admin, database, {"conn_string": f"{base}/{database}{query}", "ttl": ttl}

    def drop(admin: str, database: str) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {database} WITH (FORCE)")

    if sync:
        @pytest.fixture(scope="function", params=["default"])
        def store(request: Any) -> Iterator[Any]:
            admin, database, args = names()
            try:
                with stand_in.from_conn_string(**args) as s:
                    s.setup()
                    s.setup()
                    s.start_ttl_sweeper()
                    yield s
                    s.stop_ttl_sweeper()
            finally:
                drop(admin, database)

        return store

    @pytest.fixture(scope="function", params=["default"])
    async def astore(request: Any) -> AsyncIterator[Any]:
        admin, database, args = names()
        try:
            async with stand_in.from_conn_string(**args) as s:
                await s.setup()
                await s.setup()
                await s.start_ttl_sweeper()
                yield s
                await s.stop_ttl_sweeper()
        finally:
            drop(admin, database)

    return astore


def variant(path: str, name: str, which: str) -> dict[str, Any]:
    """A fresh copy of LangGraph's test module at ``path`` (its own globals, so the two
    variants never share a binding), with the PostgreSQL URI pointed at our server and,
    for ``which == "immagent"``, LangGraph's store classes bound to the stand-ins."""
    spec = importlib.util.spec_from_file_location(f"tests._peer_{name}_{which}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "tests"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    uri = os.environ.get("IMMAGENT_PEER_PG_URI")
    if uri:
        for target in (module, sys.modules.get("tests.conftest")):
            if target is not None and hasattr(target, "DEFAULT_URI"):
                setattr(target, "DEFAULT_URI", uri)  # noqa: B010
    if which == "immagent":
        stand_ins = _stand_ins()
        for cls in STORE_CLASSES:
            if hasattr(module, cls):
                setattr(module, cls, stand_ins[cls])
        for cls, sync in (("PostgresStore", True), ("AsyncPostgresStore", False)):
            if cls in vars(module) and hasattr(module, "store"):
                setattr(module, "store",  # noqa: B010
                        _postgres_fixture(module, stand_ins[cls], sync))
    return {k: v for k, v in vars(module).items() if not k.startswith("__")}


# -- the runner ----------------------------------------------------------------------------

_WRAPPER = '''\
# Generated by immagent's scripts/peer_langgraph_store.py: LangGraph's {module} ({which}).
import importlib.util as _u
import os as _os
import sys as _sys

_shim = _sys.modules.get("immagent_peer_shim")
if _shim is None:
    _spec = _u.spec_from_file_location("immagent_peer_shim", _os.environ["IMMAGENT_PEER_SHIM"])
    _shim = _u.module_from_spec(_spec)
    _sys.modules["immagent_peer_shim"] = _shim
    _spec.loader.exec_module(_shim)
globals().update(_shim.variant({path!r}, {name!r}, {which!r}))
'''

_INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
markers =
    flaky: LangGraph's retry mark (pytest-retry is not installed: no retries here)
filterwarnings =
    ignore::DeprecationWarning
"""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True,
                          check=False)


def _tag(repo: Path, prefix: str, distribution: str) -> tuple[str, str]:
    """(the tag to run, a note): the installed version's tag, else the newest one of that
    library the clone holds."""
    version = importlib.metadata.version(distribution)
    wanted = f"{prefix}=={version}"
    if _git(repo, "rev-parse", "--verify", "--quiet", f"refs/tags/{wanted}").returncode == 0:
        return wanted, f"{wanted} (the installed version)"
    tags = _git(repo, "tag", "-l", f"{prefix}==*").stdout.decode().split()
    releases = [t for t in tags if re.fullmatch(rf"{prefix}==\d+\.\d+\.\d+", t)]
    if not releases:
        raise SystemExit(f"the clone at {repo} has no {prefix}== tag: fetch its tags")
    newest = max(releases, key=lambda t: tuple(int(p) for p in t.split("==")[1].split(".")))
    return newest, (f"{newest} (the clone lacks {wanted}, the installed version: its newest "
                    f"tag of this library was used)")


def _has_tag(repo: Path, tag: str) -> bool:
    return _git(repo, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}").returncode == 0


def _sdist(distribution: str, release: str, into: Path) -> Path | None:
    """The unpacked sdist of ``distribution`` ``release`` from PyPI (pip, the registry's own
    client): its ``tests/`` folder is the tag's ``libs/<lib>/tests``. None if unavailable."""
    into.mkdir(parents=True, exist_ok=True)
    uv = os.environ.get("UV") or shutil.which("uv")
    pip = [uv] if uv else [sys.executable, "-m", "uv"]
    done = subprocess.run([*pip, "run", "--no-project", "--with", "pip", "python", "-m",
                           "pip", "download", "--quiet", "--no-deps",
                           "--no-binary", ":all:", f"{distribution}=={release}", "-d",
                           str(into)], capture_output=True, check=False)
    archives = list(into.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        print(f"... no sdist of {distribution} {release}: {done.stderr.decode()[-200:]}",
              file=sys.stderr)
        return None
    with tarfile.open(archives[0]) as tar:
        tar.extractall(into, filter="data")
    roots = [p for p in into.iterdir() if (p / "tests").is_dir()]
    return roots[0] if roots else None


def _export(repo: Path, tag: str, lib: str, into: Path) -> Path:
    archive = _git(repo, "archive", "--format=tar", tag, f"libs/{lib}/tests")
    if archive.returncode != 0:
        raise SystemExit(f"git archive {tag} failed: {archive.stderr.decode()}")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "libs" / lib


def _outcomes(report: Path) -> dict[tuple[str, str, str], str]:
    """(module, variant, test id) -> passed | failed | skipped, from a JUnit XML report."""
    found: dict[tuple[str, str, str], str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        match = re.search(r"(test_\w+?)__(langgraph|immagent)(?:\.(\w+))?$",
                          case.get("classname", ""))
        if not match:
            continue
        module, which, cls = match.groups()
        test = f"{cls}::{case.get('name')}" if cls else str(case.get("name"))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        found[(module, which, test)] = outcome
    return found


def _reason(where: str, test: str) -> tuple[str, str] | None:
    """("not applicable" | "by design", why) for a test of ``where`` (library/module)."""
    name = f"{where}::{test.split('[', 1)[0]}"
    if name in NOT_APPLICABLE:
        return "not applicable", NOT_APPLICABLE[name]
    if name in BY_DESIGN:
        return "by design", BY_DESIGN[name]
    return None


@contextlib.contextmanager
def _pg_admin(dsn: str | None) -> Iterator[str | None]:
    """A database of our own on the server for LangGraph's PostgreSQL fixtures to start
    from (they create and drop one database per test); dropped afterwards."""
    if not dsn:
        yield None
        return
    import psycopg

    name = f"immagent_peer_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    auth = str(info.get("user", "postgres"))
    if info.get("password"):
        auth += f":{info['password']}"
    uri = f"postgresql://{auth}@{info.get('host', 'localhost')}:{info.get('port', 5432)}/{name}"
    try:
        yield uri
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(repo: Path, dsn: str | None, select: str | None, verbose: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"libraries": {}}
    with tempfile.TemporaryDirectory(prefix="immagent-peer-") as tmp, _pg_admin(dsn) as uri:
        for lib, (prefix, distribution, modules) in TARGETS.items():
            if lib == "checkpoint-postgres" and uri is None:
                print(f"{lib}: skipped (no PostgreSQL: pass --dsn)")
                continue
            release = importlib.metadata.version(distribution)
            if not _has_tag(repo, f"{prefix}=={release}") and \
                    (root := _sdist(distribution, release, Path(tmp) / lib)) is not None:
                note = (f"the sdist of {distribution} {release} (the installed version; "
                        f"the clone lacks its tag {prefix}=={release})")
            else:
                tag, note = _tag(repo, prefix, distribution)
                root = _export(repo, tag, lib, Path(tmp) / lib)
            print(f"{lib}: tests from {note}", flush=True)
            targets = []
            for module in modules:
                source = root / "tests" / module
                stem = module.removesuffix(".py")
                for which in ("langgraph", "immagent"):
                    wrapper = root / "tests" / f"{stem}__{which}.py"
                    wrapper.write_text(_WRAPPER.format(module=module, path=str(source),
                                                       name=stem, which=which))
                    targets.append(str(wrapper.relative_to(root)))
            (root / "pytest.ini").write_text(_INI)
            report = Path(tmp) / f"{lib}.xml"
            env = {**os.environ, "IMMAGENT_PEER_SHIM": str(Path(__file__).resolve()),
                   "IMMAGENT_PEER_TMP": tmp, "IMMAGENT_PEER_PG_URI": uri or ""}
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "--junitxml", str(report), "-o", "junit_family=xunit1",
                       *(["-k", select] if select else []), *targets]
            subprocess.run(command, cwd=root, env=env, check=False,
                           stdout=None if verbose else subprocess.DEVNULL)
            summary["libraries"][lib] = {"tests_from": note,
                                         "results": _summarise(lib, _outcomes(report))}
    return summary


def _same_store(test: str) -> str:
    """The id ImmAgentStore runs a LangGraph test under: its PostgreSQL fixture has one
    parametrisation where LangGraph's has three (see ``_postgres_fixture``)."""
    return re.sub(r"(?<=[\[-])(pipe|pool)(?=[\]-])", "default", test)


def _summarise(lib: str, outcomes: dict[tuple[str, str, str], str]) -> dict[str, Any]:
    by_module: dict[str, Any] = {}
    for module in sorted({m for m, _, _ in outcomes}):
        row: dict[str, int] = defaultdict(int)
        excluded: dict[str, tuple[str, str, str]] = {}
        for (m, which, test), outcome in sorted(outcomes.items()):
            if m != module:
                continue
            if which == "langgraph":
                row[f"langgraph_{outcome}"] += 1
                continue
            reason = _reason(f"{lib}/{module}", test)
            if reason is not None:
                row[f"immagent_{reason[0].replace(' ', '_')}"] += 1
                excluded[test] = (*reason, outcome)
            else:
                row[f"immagent_{outcome}"] += 1
        differences = sorted({
            _same_store(t) for (m, which, t), outcome in outcomes.items()
            if m == module and which == "langgraph" and outcome == "passed"
            and _reason(f"{lib}/{module}", t) is None
            and outcomes.get((module, "immagent", _same_store(t)), "missing") != "passed"})
        by_module[module] = {"counts": dict(row), "differences": differences,
                             "excluded": excluded}
    return by_module


def _print(summary: dict[str, Any]) -> None:
    print()
    print(f"{'library / module':42} {'LangGraph':>16} {'ImmAgentStore':>20} {'n/a':>4} "
          f"{'by design':>9}")
    print(f"{'':42} {'passed of tests':>16} {'passed of applicable':>20}")
    for lib, data in summary["libraries"].items():
        for module, result in data["results"].items():
            c = result["counts"]
            theirs = sum(v for k, v in c.items() if k.startswith("langgraph_"))
            na, design = c.get("immagent_not_applicable", 0), c.get("immagent_by_design", 0)
            ours = sum(v for k, v in c.items() if k.startswith("immagent_")) - na - design
            print(f"{lib + ' / ' + module:42} "
                  f"{str(c.get('langgraph_passed', 0)) + ' of ' + str(theirs):>16} "
                  f"{str(c.get('immagent_passed', 0)) + ' of ' + str(ours):>20} "
                  f"{na:>4} {design:>9}")
    for lib, data in summary["libraries"].items():
        for module, result in data["results"].items():
            for test in result["differences"]:
                print(f"  DIFFERENCE {lib}/{module}::{test}: passes with LangGraph's store, "
                      "not with ImmAgentStore")
    reasons: dict[str, set[str]] = defaultdict(set)
    for data in summary["libraries"].values():
        for result in data["results"].values():
            for test, (what, why, _) in result["excluded"].items():
                reasons[f"{what}: {why}"].add(test.split("[", 1)[0])
    for reason, tests in reasons.items():
        print(f"  {reason}:\n    {', '.join(sorted(tests))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=os.environ.get("LANGGRAPH_REPO"),
                        help="a clone or git directory of github.com/langchain-ai/langgraph "
                        "(default: $LANGGRAPH_REPO)")
    parser.add_argument("--dsn", default=os.environ.get("IMMAGENT_TEST_DSN"),
                        help="a PostgreSQL server DSN (default: $IMMAGENT_TEST_DSN)")
    parser.add_argument("-k", dest="select", help="pytest -k selection")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    args = parser.parse_args(argv)
    # A terminated run still drops its PostgreSQL database and its temporary files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.repo is None:
        parser.error("--repo (or $LANGGRAPH_REPO): clone "
                     "https://github.com/langchain-ai/langgraph first")
    summary = run(args.repo.resolve(), args.dsn, args.select, args.verbose)
    _print(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
