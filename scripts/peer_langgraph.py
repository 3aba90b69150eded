"""Run LangGraph's own tests against ImmAgentSaver, beside LangGraph's own savers.

    python scripts/peer_langgraph.py graph [--src DIR] [--savers ...] [--dsn DSN]
                                           [-k EXPR] [--files ...] [--count N]
                                           [--results FILE]
    python scripts/peer_langgraph.py compare FILE...
    python scripts/peer_langgraph.py conformance [--src DIR] [--dsn DSN]

``graph``: LangGraph's graph tests (``libs/langgraph/tests``: the pregel tests and every
other file that asks for a checkpointer) at the release of langgraph installed here, with
``scripts/peer_langgraph_plugin.py`` adding ``immagent_sqlite`` and ``immagent_postgres`` to
LangGraph's checkpointer fixtures, in the same run as InMemorySaver and LangGraph's SQLite
and PostgreSQL savers. It prints passed / failed / skipped per saver and every test that
passes with LangGraph's saver on a backend but not with ours on the same backend; a test in
``DELIBERATE`` (below, each with its reason, see docs/langgraph.md) is listed apart. The
exit status is 1 when any other difference remains.

``conformance``: the capabilities of LangGraph's checkpoint conformance suite from the
repository's main branch (``libs/checkpoint-conformance``, which holds capabilities not yet
released, e.g. ``delta_channel_history``) on ImmAgentSaver over SQLite and PostgreSQL. Exit
status 1 unless every capability passes on both.

Where LangGraph's source comes from (never copied into this repository): ``--src`` (or
``$LANGGRAPH_SRC``) names a checkout or a git repository of langchain-ai/langgraph (bare is
fine: the needed tree is exported with ``git archive``), a ``libs/langgraph`` folder or an
unpacked sdist. Without it, the tag of the installed release (``graph``) or ``main``
(``conformance``) is cloned into ``.peer/``; when that fails (no network to GitHub), the
``graph`` run takes the sdist of the installed release from PyPI with pip, whose
``tests/`` folder is the tag's ``libs/langgraph/tests`` (checked byte for byte for 1.2.11).

``--dsn`` (or ``$IMMAGENT_TEST_DSN``, else ``scripts/ensure-postgres.sh``) is the PostgreSQL
server: each PostgreSQL test creates and drops its own database there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / ".peer"
REPOSITORY = "https://github.com/langchain-ai/langgraph.git"
#: LangGraph's test dependencies the graph tests import (beyond this checkout's venv).
TEST_REQUIREMENTS = ("pytest-mock", "syrupy", "redis", "pycryptodome", "pytest-repeat",
                     "pytest-timeout")
#: Fixture params of LangGraph's savers and ours, by backend.
PEERS = {"sqlite": ("sqlite", "sqlite_aio"), "postgres": ("postgres", "postgres_aio")}
OURS = {"sqlite": "immagent_sqlite", "postgres": "immagent_postgres"}
DEFAULT_SAVERS = ("memory", "sqlite", "postgres", "immagent_sqlite", "immagent_postgres")
#: Tests whose outcome differs on ImmAgentSaver by design: test name -> why.
DELIBERATE: dict[str, str] = {}


def _uv() -> list[str]:
    """uv, as the Makefile finds it (``$UV``), on PATH, or as this Python's module."""
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def _export(repository: Path, ref: str, subdir: str, into: Path) -> bool:
    """``subdir`` of ``ref`` of a git repository (bare or not) into ``into``."""
    if _run(["git", "--git-dir", str(_git_dir(repository)), "cat-file", "-e",
             f"{ref}:{subdir}"]).returncode != 0:
        return False
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "--git-dir", str(_git_dir(repository)), "archive",
                                ref, subdir], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(into, filter="data")
    return archive.wait() == 0


def _git_dir(path: Path) -> Path:
    return path / ".git" if (path / ".git").exists() else path


def _is_repository(path: Path) -> bool:
    return _run(["git", "--git-dir", str(_git_dir(path)), "rev-parse"]).returncode == 0


def _source(src: str | None, ref: str, subdir: str, marker: str) -> Path | None:
    """The folder holding ``subdir`` of langchain-ai/langgraph at ``ref``."""
    given = src or os.environ.get("LANGGRAPH_SRC")
    target = PEER / f"langgraph-{ref}"
    if (target / subdir / marker).exists():
        return target / subdir
    if given:
        path = Path(given).resolve()
        for candidate in (path / subdir, path):
            if (candidate / marker).exists() and not _is_repository(candidate):
                return candidate
        if (path / subdir / marker).exists() and not (path / ".git").exists():
            return path / subdir
        if _is_repository(path):
            if (path / subdir / marker).exists() and _head_is(path, ref):
                return path / subdir
            if _export(path, ref, subdir, target):
                return target / subdir
            print(f"... {path} has no {ref}:{subdir}", file=sys.stderr)
            return None
        sys.exit(f"{path} is neither a langgraph checkout nor a git repository of it")
    PEER.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PEER) as tmp:
        clone = Path(tmp) / "clone"
        done = _run(["git", "clone", "--quiet", "--depth", "1", "--branch", ref, REPOSITORY,
                     str(clone)])
        if done.returncode == 0 and (clone / subdir / marker).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(str(clone / subdir), str(target / subdir))
            return target / subdir
    print(f"... cannot clone {REPOSITORY} at {ref}", file=sys.stderr)
    return None


def _head_is(path: Path, ref: str) -> bool:
    head = _run(["git", "-C", str(path), "rev-parse", "HEAD"]).stdout.strip()
    wanted = _run(["git", "-C", str(path), "rev-parse", f"{ref}^{{commit}}"]).stdout.strip()
    return bool(head) and head == wanted


def _sdist(release: str) -> Path:
    """The sdist of langgraph ``release`` from PyPI (pip, the registry's own client)."""
    target = PEER / f"langgraph-sdist-{release}"
    if (target / "tests" / "conftest.py").exists():
        return target
    PEER.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PEER) as tmp:
        done = _run([*_uv(), "run", "--no-project", "--with", "pip", "python", "-m", "pip",
                     "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                     f"langgraph=={release}", "-d", tmp])
        archives = list(Path(tmp).glob("langgraph-*.tar.gz"))
        if done.returncode != 0 or not archives:
            sys.exit(f"cannot download the sdist of langgraph {release} "
                     f"({done.stderr.strip()[:200]}); pass --src DIR")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(str(Path(tmp) / f"langgraph-{release}"), str(target))
    return target


def _server(dsn: str | None) -> str:
    dsn = dsn or os.environ.get("IMMAGENT_TEST_DSN")
    if dsn:
        return dsn
    out = _run(["bash", str(REPO / "scripts" / "ensure-postgres.sh")])
    if out.returncode != 0:
        sys.exit(f"no PostgreSQL: {out.stderr.strip()[:300]}")
    return out.stdout.strip().splitlines()[-1]


# -- graph tests ------------------------------------------------------------------------------


def _test_files(tests: Path) -> list[str]:
    """LangGraph's test files that ask for a checkpointer fixture."""
    return sorted(p.name for p in tests.glob("test_*.py")
                  if "sync_checkpointer" in (text := p.read_text(encoding="utf-8"))
                  or "async_checkpointer" in text)


def graph(args: argparse.Namespace) -> int:
    release = version("langgraph")
    source = _source(args.src, release, "libs/langgraph", "tests/conftest.py")
    if source is None:
        print(f"... taking langgraph {release}'s sdist from PyPI instead", file=sys.stderr)
        source = _sdist(release)
    files = args.files or _test_files(source / "tests")
    results = Path(args.results).resolve()
    results.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "IMMAGENT_PEER_DSN": _server(args.dsn),
           "IMMAGENT_PEER_SAVERS": ",".join(args.savers), "IMMAGENT_PEER_RESULTS": str(results),
           "NO_DOCKER": "true", "LANGGRAPH_TEST_FAST": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), str(source)])}
    cmd = [*_uv(), "run", "--no-sync", "--project", str(REPO),
           *(x for r in TEST_REQUIREMENTS for x in ("--with", r)),
           "pytest", *(f"tests/{f}" for f in files), "-p", "peer_langgraph_plugin",
           "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-x" if args.exitfirst else "-q",
           "--timeout", str(args.timeout), "-W", "ignore::DeprecationWarning"]
    if args.k:
        cmd += ["-k", args.k]
    if args.count > 1:
        cmd += ["--count", str(args.count)]
    print(f"... langgraph {release} tests from {source}: {len(files)} files, savers "
          f"{', '.join(args.savers)}", file=sys.stderr)
    done = subprocess.run(cmd, cwd=source, env=env)
    if not results.exists():
        print("no results were written (pytest failed before running tests)", file=sys.stderr)
        return 1
    return _compare(json.loads(results.read_text()), done.returncode)


def compare(args: argparse.Namespace) -> int:
    """The comparison over several runs' results (e.g. a run split by ``--files``)."""
    items: list[dict[str, str]] = []
    for path in args.results:
        items += json.loads(Path(path).read_text())
    return _compare(items, 0)


def _compare(items: list[dict[str, str]], pytest_status: int) -> int:
    """Counts per saver; tests passing on LangGraph's saver but not ours, same backend."""
    by_key: dict[str, dict[str, dict[str, str]]] = {}
    counts: dict[str, Counter[str]] = {}
    for item in items:
        by_key.setdefault(item["key"], {})[item["saver"]] = item
        counts.setdefault(item["saver"], Counter())[item["outcome"]] += 1
    print("\nLangGraph's graph tests, per checkpointer (same run)")
    for saver in sorted(counts):
        c = counts[saver]
        print(f"  {saver:20} passed {c['passed']:5}  failed {c['failed']:4}  "
              f"skipped {c['skipped']:4}  not run {c['not run']:3}  total {sum(c.values()):5}")
    differences: list[tuple[str, str, str, str]] = []
    deliberate: list[tuple[str, str, str]] = []
    for _, savers in sorted(by_key.items()):
        for backend, ours in OURS.items():
            mine = savers.get(ours)
            theirs = next((savers[p] for p in PEERS[backend] if p in savers), None)
            if mine is None or theirs is None or theirs["outcome"] != "passed" \
                    or mine["outcome"] == "passed":
                continue
            name = mine["name"]
            if name in DELIBERATE:
                deliberate.append((mine["nodeid"], mine["outcome"], DELIBERATE[name]))
            else:
                differences.append((mine["nodeid"], mine["outcome"], theirs["saver"],
                                    mine.get("message", "")))
    for backend, ours in OURS.items():
        pairs = [(s[ours], next(s[p] for p in PEERS[backend] if p in s))
                 for s in by_key.values()
                 if ours in s and any(p in s for p in PEERS[backend])]
        both = sum(1 for m, t in pairs if m["outcome"] == t["outcome"] == "passed")
        theirs_ok = sum(1 for _, t in pairs if t["outcome"] == "passed")
        if pairs:
            print(f"  {ours}: passes {both} of the {theirs_ok} tests LangGraph's {backend} "
                  f"saver passes ({len(pairs)} paired)")
    if deliberate:
        print(f"\nDeliberate differences ({len(deliberate)}; docs/langgraph.md):")
        for nodeid, outcome, why in deliberate:
            print(f"  {outcome:7} {nodeid}: {why}")
    if differences:
        print(f"\nPass with LangGraph's saver, not with ImmAgentSaver ({len(differences)}):")
        for nodeid, outcome, peer, message in differences:
            print(f"  {outcome:7} {nodeid} (passes on {peer}) {message[:200]}")
        return 1
    print("\nEvery test that passes with LangGraph's saver on a backend passes with "
          "ImmAgentSaver on it" + (" (apart from the deliberate ones)" if deliberate else ""))
    return 0 if pytest_status in (0, 1) else pytest_status


# -- the conformance suite ------------------------------------------------------------------


CONFORMANCE = """
import asyncio, sys
from langgraph.checkpoint import conformance
from langgraph.checkpoint.conformance import checkpointer_test, validate
from immagent.integrations.langgraph import ImmAgentSaver

print("conformance suite:", conformance.__file__, flush=True)

async def main(targets):
    failed = 0
    for name, target in targets:
        @checkpointer_test(name=f"ImmAgentSaver ({name})")
        async def factory():
            async with ImmAgentSaver.from_conn_string(target) as saver:
                await saver.setup()
                yield saver
        report = await validate(factory)
        report.print_report()
        for cap, result in sorted(report.results.items(), key=lambda kv: str(kv[0])):
            ok = result.passed is True
            failed += not ok
            print(f"  {name:9} {str(getattr(cap, 'value', cap)):24} "
                  f"{'PASS' if ok else 'FAIL'} {result.tests_passed} tests passed", flush=True)
    return failed

targets = [(sys.argv[i], sys.argv[i + 1]) for i in range(1, len(sys.argv), 2)]
sys.exit(1 if asyncio.run(main(targets)) else 0)
"""


def conformance(args: argparse.Namespace) -> int:
    source = _source(args.src, "main", "libs/checkpoint-conformance",
                     "langgraph/checkpoint/conformance/__init__.py")
    if source is None:
        sys.exit("pass --src DIR: a checkout or git repository of langchain-ai/langgraph")
    server = _server(args.dsn)
    import psycopg

    name = f"immagent_conformance_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(server)
    info["dbname"] = name
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PYTHONPATH": str(source)}
            done = subprocess.run(
                [sys.executable, "-c", CONFORMANCE, "sqlite", f"sqlite:///{tmp}/c.db",
                 "postgres", psycopg.conninfo.make_conninfo(**info)],  # type: ignore[arg-type]
                env=env)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("graph", help="LangGraph's graph tests with ImmAgentSaver fixtures")
    g.add_argument("--src", help="langchain-ai/langgraph: a checkout, a git repository, "
                   "libs/langgraph or an unpacked sdist")
    g.add_argument("--savers", nargs="+", default=list(DEFAULT_SAVERS),
                   help="fixture params to run (memory, sqlite, postgres: LangGraph's; "
                   "immagent_sqlite, immagent_postgres: ours)")
    g.add_argument("--files", nargs="+", help="test files (default: every one that asks "
                   "for a checkpointer)")
    g.add_argument("-k", help="pytest -k expression")
    g.add_argument("--count", type=int, default=1, help="repeat each test (pytest-repeat)")
    g.add_argument("--timeout", type=int, default=300, help="seconds per test")
    g.add_argument("-x", "--exitfirst", action="store_true")
    g.add_argument("--dsn", help="PostgreSQL server")
    g.add_argument("--results", default=str(PEER / "langgraph-results.json"),
                   help="where the outcomes go (JSON; one file per run, e.g. per --files batch)")
    g.set_defaults(run=graph)
    m = sub.add_parser("compare", help="the comparison over the results of one or more runs")
    m.add_argument("results", nargs="+", help="JSON files written by `graph --results`")
    m.set_defaults(run=compare)
    c = sub.add_parser("conformance", help="the conformance suite of LangGraph's main branch")
    c.add_argument("--src", help="langchain-ai/langgraph: a checkout or git repository")
    c.add_argument("--dsn", help="PostgreSQL server")
    c.set_defaults(run=conformance)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
