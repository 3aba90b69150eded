"""Run pydantic-ai's own conversation-store tests against ImmAgentConversationStore, beside
pydantic-ai's InMemoryConversationStore, and print the counts.

    python scripts/peer_pydantic_ai.py [--src DIR] [--backends sqlite postgres] [--dsn DSN]
    python scripts/peer_pydantic_ai.py --self-check

pydantic-ai's tests are read from a checkout of its repository at the release installed
here (``--src``, or ``$PYDANTIC_AI_SRC``; otherwise the tag is cloned into ``.peer/``):
never copied into this repository. Its test files that use ``pydantic_ai.conversation_store``
are run with pytest, in a virtualenv of their own (``.peer/venv``: this checkout, that
pydantic-ai release and pydantic-ai's test dependencies), once as they are and once per
backend with ``scripts/peer_pydantic_ai_plugin.py``, which puts ImmAgentConversationStore
in the place of InMemoryConversationStore. It prints passed / failed / skipped per run and
every test that passes on pydantic-ai's store but not on ours.

``--self-check`` proves the machinery without pydantic-ai's repository: it runs a
stand-in test file written here (a few tests of the store's contract, and one that looks
inside InMemoryConversationStore, which must show up as not applying to ours) in this
checkout's own virtualenv.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / ".peer"
REPOSITORY = "https://github.com/pydantic/pydantic-ai.git"
#: pydantic-ai's own packages (its workspace members): installed from PyPI at the release
#: under test, never from the checkout's dependency groups.
WORKSPACE = re.compile(r"^(pydantic-ai|pydantic_ai|pydantic-graph|pydantic-evals|clai|"
                       r"fasta2a|pydantic-ai-slim|pydantic-ai-examples)\b")


@dataclass
class Outcome:
    """One pytest run: counts, and each test's outcome (message for failures)."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    tests: dict[str, tuple[str, str]] = field(default_factory=dict)


def _read_junit(name: str, path: Path) -> Outcome:
    outcome = Outcome(name, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        result, message = "passed", ""
        for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                text = (found.get("message") or found.text or "").strip()
                result, message = label, text.splitlines()[0][:160] if text else ""
                break
        outcome.counts[result] += 1
        outcome.tests[test] = (result, message)
    return outcome


def _checkout(src: str | None, release: str) -> Path:
    """pydantic-ai's repository at ``v{release}``: given, or cloned once into .peer/."""
    given = src or os.environ.get("PYDANTIC_AI_SRC")
    if given:
        path = Path(given).resolve()
        if not (path / "tests").is_dir():
            sys.exit(f"{path} is not a checkout of pydantic-ai (no tests/ folder)")
        return path
    path = PEER / f"pydantic-ai-v{release}"
    if not (path / "tests").is_dir():
        PEER.mkdir(exist_ok=True)
        done = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch",
                               f"v{release}", REPOSITORY, str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"cannot clone pydantic-ai v{release} ({done.stderr.strip()[:200]}); "
                     "pass --src DIR (or set PYDANTIC_AI_SRC): a checkout of that tag")
    return path


def _test_files(src: Path) -> list[str]:
    """pydantic-ai's test files that exercise conversation stores."""
    found = [p for p in sorted((src / "tests").rglob("test_*.py"))
             if "conversation_store" in p.read_text(encoding="utf-8", errors="replace")]
    if not found:
        sys.exit(f"no test file under {src / 'tests'} uses pydantic_ai.conversation_store")
    return [str(p.relative_to(src)) for p in found]


def _test_requirements(src: Path) -> list[str]:
    """pydantic-ai's test dependencies (its ``dev`` dependency group, included groups
    resolved), without its own packages and without those only a URL provides."""
    project = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
    groups = project.get("dependency-groups", {})

    def expand(name: str, seen: set[str]) -> list[str]:
        out: list[str] = []
        for item in groups.get(name, []):
            if isinstance(item, dict) and "include-group" in item:
                if item["include-group"] not in seen:
                    out += expand(item["include-group"], seen | {item["include-group"]})
            elif isinstance(item, str) and not WORKSPACE.match(item) and " @ " not in item:
                out.append(item)  # (a direct URL reference needs more than a registry)
        return out

    return expand("dev", {"dev"})


def _venv(src: Path, release: str) -> Path:
    """.peer/venv: this checkout with the pydantic-ai extra, that release, its test deps."""
    venv = PEER / "venv"
    python = venv / "bin" / "python"
    uv = [sys.executable, "-m", "uv"]
    env = {**os.environ, "UV_SYSTEM_CERTS": "1", "UV_PYTHON_DOWNLOADS": "never"}
    if not python.exists():
        subprocess.run([*uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
                       check=True, env=env)
    subprocess.run([*uv, "pip", "install", "--quiet", "--python", str(python), "-e",
                    f"{REPO}[pydantic-ai]", f"pydantic-ai-slim=={release}",
                    *_test_requirements(src)], check=True, env=env)
    return python


def _run(name: str, python: Path, src: Path, files: list[str], out: Path,
         env: dict[str, str], plugin: bool) -> Outcome:
    junit = out / f"{name}.xml"
    args = [str(python), "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", f"--junitxml={junit}", "-W", "ignore::DeprecationWarning"]
    if plugin:
        args += ["-p", "peer_pydantic_ai_plugin"]
    print(f"\n== {name}: {' '.join(args[3:])}", flush=True)
    run_env = {**os.environ, **env,
               "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), str(REPO)])}
    subprocess.run(args, cwd=src, env=run_env)
    if not junit.exists():
        sys.exit(f"{name}: pytest wrote no report (collection failed?)")
    return _read_junit(name, junit)


def _report(outcomes: list[Outcome]) -> int:
    reference, ours = outcomes[0], outcomes[1:]
    print("\npydantic-ai's conversation-store tests")
    print(f"{'store':<40}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
    for o in outcomes:
        c = o.counts
        print(f"{o.name:<40}{c['passed']:>8}{c['failed']:>8}{c['errors']:>8}{c['skipped']:>9}")
    worse = 0
    for o in ours:
        lost = sorted(t for t, (result, _) in o.tests.items()
                      if reference.tests.get(t, ("",))[0] == "passed" and result != "passed")
        worse += len(lost)
        if lost:
            print(f"\npass on {reference.name}, not on {o.name}:")
            for t in lost:
                print(f"  {t}: {o.tests[t][1]}")
    return worse


_STANDIN = '''
"""A stand-in for pydantic-ai's tests (written by scripts/peer_pydantic_ai.py)."""
import pytest
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict, InMemoryConversationStore
from pydantic_ai.messages import ModelRequest, UserPromptPart


def messages(*texts):
    return [ModelRequest(parts=[UserPromptPart(t)]) for t in texts]


def said(conversation):
    return [m.parts[0].content for m in conversation.messages]


@pytest.mark.anyio
async def test_save_and_load():
    store = InMemoryConversationStore()
    await store.save(Conversation(conversation_id="c", messages=messages("a", "b")))
    loaded = await store.load("c")
    assert loaded is not None and said(loaded) == ["a", "b"]


@pytest.mark.anyio
async def test_conflict():
    store = InMemoryConversationStore()
    await store.save(Conversation(conversation_id="c", messages=messages("a")))
    with pytest.raises(ConversationConflict):
        await store.save(Conversation(conversation_id="c", messages=messages("b")))


@pytest.mark.anyio
async def test_fork_shares():
    store = InMemoryConversationStore()
    await store.save(Conversation(conversation_id="c", messages=messages("a", "b")))
    fork = await store.fork("c", at=1, new_conversation_id="f")
    assert said(fork) == ["a"]


@pytest.mark.anyio
async def test_looks_inside_the_in_memory_store():
    store = InMemoryConversationStore()
    await store.save(Conversation(conversation_id="c", messages=messages("a")))
    assert len(store._entries) == 1


@pytest.fixture
def anyio_backend():
    return "asyncio"
'''


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python scripts/peer_pydantic_ai.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="a checkout of pydantic-ai at the installed release")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                        choices=["sqlite", "postgres", "memory"])
    parser.add_argument("--dsn", help="PostgreSQL server for the postgres runs (default: "
                        "the project's throwaway server, scripts/ensure-postgres.sh)")
    parser.add_argument("--self-check", action="store_true",
                        help="run a stand-in test file instead of pydantic-ai's tests")
    args = parser.parse_args(argv)
    release = version("pydantic-ai-slim")
    dsn = ""
    if "postgres" in args.backends:
        dsn = args.dsn or subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure-postgres.sh")], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="immagent-peer-") as tmp:
        out = Path(tmp)
        if args.self_check:
            src = out / "standin"
            (src / "tests").mkdir(parents=True)
            (src / "tests" / "test_conversation_store_standin.py").write_text(_STANDIN)
            python, files = Path(sys.executable), _test_files(src)
        else:
            src = _checkout(args.src, release)
            files = _test_files(src)
            python = _venv(src, release)
        print(f"pydantic-ai {release}: {len(files)} test file(s): {', '.join(files)}")
        outcomes = [_run("pydantic-ai InMemoryConversationStore", python, src, files, out,
                         {}, plugin=False)]
        for backend in args.backends:
            outcomes.append(_run(f"ImmAgentConversationStore ({backend})", python, src,
                                 files, out, {"IMMAGENT_PEER_BACKEND": backend,
                                              "IMMAGENT_PEER_DSN": dsn}, plugin=True))
    worse = _report(outcomes)
    if args.self_check:
        # The stand-in's last test looks inside the in-memory store: it must not pass on
        # ours, and everything else must.
        expected = len(args.backends)
        ok = worse == expected and all(o.counts["passed"] == 3 for o in outcomes[1:])
        print(f"\nself-check {'passed' if ok else 'FAILED'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
