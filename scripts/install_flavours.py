"""Install each flavour of immagent in a fresh virtualenv from this checkout's own wheels,
then check it (``check``, what CI runs) or measure it (``measure``, the README's table).

    python scripts/install_flavours.py check   [--uv "uv"] [--jobs 2] [--keep DIR]
    python scripts/install_flavours.py measure [--uv "uv"] [--runs 5]

Both build immagent-core and immagent with ``uv build`` into a temporary directory and
install every flavour from those wheel files (``--find-links`` the same directory, so our
own packages never come from an index), the third-party packages at the versions of
uv.lock (``uv export`` as constraints: what the tests ran against, from uv's cache).

``check``, per flavour: the installed ``immagent`` package is byte for byte this
checkout's (``schema.sql`` included); the distributions it must leave out are absent;
tests/flavour_probe.py passes in it (every module imports or names its extra, the store
round trip, signing or its error, the errors without LiteLLM or MCP); the flavour's README
example runs. ``--jobs`` flavours at a time (default: one per core, at most 2): each is
mostly one interpreter compiling and importing its packages, so two cores halve the wall
time; the installs share uv's cache, which CI's bootstrap has just filled from the same
lock. The last line is ``N passed, N failed``.

``measure``, per flavour: installed distributions, their size on disk (site-packages with
the bytecode pip would compile at install, apparent size), and the median CPU time (user +
system) of a fresh interpreter importing ``immagent`` and what the flavour adds, less that
of an empty one. CPU time, because wall time on a shared machine mostly measures the other
users (on a quiet machine an import's wall time is about its CPU time); the load average
is printed beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "flavour_probe.py"


@dataclass(frozen=True)
class Flavour:
    """One way to install immagent."""

    name: str
    #: What a user types after ``pip install``.
    command: str
    #: The extras of immagent-core it holds (``immagent`` is immagent-core[llm]).
    extras: tuple[str, ...]
    #: Distributions that must not be installed.
    absent: tuple[str, ...]
    #: The README example that runs on it, offline (None: the probe's checks are its use).
    example: str | None
    #: What the flavour adds, imported for the import-time figure (besides ``immagent``).
    adds: str
    adds_label: str

    @property
    def key(self) -> str:
        """A short name for its directories."""
        return "-".join(self.extras) or "core"


FRAMEWORKS = ("langgraph", "openai-agents", "pydantic-ai-slim")
FLAVOURS = (
    Flavour("core", "immagent-core", (), ("litellm", "mcp", *FRAMEWORKS),
            "examples/stream_chat.py", "", "-"),
    Flavour("core + LangGraph", "'immagent-core[langgraph]'", ("langgraph",),
            ("litellm", "mcp", "openai-agents", "pydantic-ai-slim"),
            "examples/langgraph_chat.py", "import immagent.integrations.langgraph",
            "`immagent.integrations.langgraph`"),
    # The Agents SDK requires mcp itself (for its own MCP tools): not ours to leave out.
    Flavour("core + Agents SDK", "'immagent-core[openai-agents]'", ("openai-agents",),
            ("litellm", "langgraph", "pydantic-ai-slim"),
            "examples/openai_agents_session.py", "import immagent.integrations.openai_agents",
            "`immagent.integrations.openai_agents`"),
    Flavour("core + pydantic-ai", "'immagent-core[pydantic-ai]'", ("pydantic-ai",),
            ("litellm", "mcp", "langgraph", "openai-agents"),
            "examples/pydantic_ai_conversations.py", "import immagent.integrations.pydantic_ai",
            "`immagent.integrations.pydantic_ai`"),
    # For auditors: signed bundles and trust policies, and still no model or tool layer.
    # The probe signs, exports and verifies under a trust policy (library and command line).
    Flavour("core + signing", "'immagent-core[sign]'", ("sign",),
            ("litellm", "mcp", *FRAMEWORKS), None,
            "import immagent.audit.keys as k; k.require_signing('x')",
            "`cryptography` (a key's first use)"),
    Flavour("immagent (everything 0.1.2 had)", "immagent", ("llm",), FRAMEWORKS,
            "examples/mcp_tools.py", "import immagent.lazy_litellm as l; l.load()",
            "LiteLLM (a provider model's first call)"),
)


class Failed(Exception):
    """A check of a flavour failed; the message says which."""


# -- building and installing ---------------------------------------------------------------


class Builder:
    """The wheels and the constraints, built once, in ``workdir``."""

    def __init__(self, uv: Sequence[str], workdir: Path) -> None:
        self.uv = list(uv)
        self.workdir = workdir
        self.wheels = workdir / "wheels"
        run([*self.uv, "build", "--all-packages", "--quiet", "--out-dir", str(self.wheels)],
            cwd=ROOT)
        self.core_wheel = one(self.wheels.glob("immagent_core-*.whl"))
        self.full_wheel = one(self.wheels.glob("immagent-*.whl"))
        self.constraints = workdir / "constraints.txt"
        run([*self.uv, "export", "--frozen", "--all-extras", "--no-hashes",
             "--no-emit-workspace", "--no-header", "--quiet", "-o", str(self.constraints)],
            cwd=ROOT)

    def install(self, flavour: Flavour, *, compile_bytecode: bool = False) -> Path:
        """A new virtualenv holding ``flavour``; its directory. ``compile_bytecode``: write
        the .pyc files at install, as pip does."""
        venv = self.workdir / "venvs" / flavour.key
        shutil.rmtree(venv, ignore_errors=True)
        run([*self.uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
        core = f"immagent-core[{','.join(flavour.extras)}] @ {self.core_wheel.as_uri()}"
        wanted = [core]
        if "llm" in flavour.extras:  # as a user gets it: through the immagent distribution
            wanted = [f"immagent @ {self.full_wheel.as_uri()}",
                      f"immagent-core @ {self.core_wheel.as_uri()}"]
        run([*self.uv, "pip", "install", "--quiet", "--python", str(python(venv)),
             "--find-links", str(self.wheels), "--constraints", str(self.constraints),
             *(["--compile-bytecode"] if compile_bytecode else []), *wanted])
        return venv


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def clean_env() -> dict[str, str]:
    """The environment of a program run in a flavour: nothing of this checkout's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # LiteLLM must not fetch its price map
    return env


def run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd,
                          env=clean_env(), timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise Failed(f"{shlex.join(cmd)} exited {done.returncode}:\n  " + "\n  ".join(tail))
    return done.stdout


def one(paths: Iterable[Path]) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise Failed(f"expected exactly one, found {found}")
    return found[0]


def distributions(venv: Path) -> dict[str, str]:
    """Installed distribution name (normalised) -> version."""
    code = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', "
            "'-', d.metadata['Name']).lower(): d.version for d in m.distributions()}))")
    found: dict[str, str] = json.loads(run([str(python(venv)), "-c", code]))
    return found


def site_packages(venv: Path) -> Path:
    return one((venv / "lib").glob("python*/site-packages"))


# -- check ---------------------------------------------------------------------------------


def check(flavour: Flavour, venv: Path, workdir: Path) -> None:
    installed = distributions(venv)
    present = sorted(set(flavour.absent) & set(installed))
    if present:
        raise Failed(f"installed, but this flavour must leave them out: {present}")
    check_same_code(venv)
    work = workdir / "run" / flavour.key
    work.mkdir(parents=True, exist_ok=True)
    # Run as a script from a directory outside the checkout: only the venv's immagent
    # can be imported (the script's own directory, tests/, holds no package of ours).
    out = run([str(python(venv)), str(PROBE), str(work), "--extras",
               ",".join(flavour.extras)], cwd=work)
    if not out.strip().endswith(": ok"):
        raise Failed(f"the probe said {out!r}")
    if flavour.example is not None:
        run([str(python(venv)), str(ROOT / flavour.example)], cwd=work, timeout=300)


def check_same_code(venv: Path) -> None:
    """The venv's immagent package is this checkout's, file for file, schema.sql included."""
    installed = site_packages(venv) / "immagent"
    ours = {p.relative_to(ROOT / "immagent") for p in (ROOT / "immagent").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    theirs = {p.relative_to(installed) for p in installed.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    schema = Path("store") / "schema.sql"
    if theirs != ours | {schema}:
        raise Failed(f"installed files differ: missing {sorted(map(str, ours | {schema} - theirs))}"
                     f", extra {sorted(map(str, theirs - ours - {schema}))}")
    for rel in ours:
        if (installed / rel).read_bytes() != (ROOT / "immagent" / rel).read_bytes():
            raise Failed(f"installed {rel} is not this checkout's")
    if (installed / schema).read_bytes() != (ROOT / "schema.sql").read_bytes():
        raise Failed("installed schema.sql is not this checkout's")


def check_one(builder: Builder, flavour: Flavour) -> str | None:
    """Install and check ``flavour``: its line of the report, ``None`` when it passed."""
    started = time.perf_counter()
    try:
        venv = builder.install(flavour)
        check(flavour, venv, builder.workdir)
        packages = len(distributions(venv))
    except (Failed, subprocess.TimeoutExpired) as e:
        print(f"FAILED {flavour.name}: {e}", flush=True)
        return f"FAILED {flavour.name}"
    print(f"ok     {flavour.name} ({packages} packages, "
          f"{time.perf_counter() - started:.0f} s)", flush=True)
    return None


def run_check(builder: Builder, jobs: int) -> int:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda f: check_one(builder, f), FLAVOURS))
    failed = sum(r is not None for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


# -- measure -------------------------------------------------------------------------------


def size_of(directory: Path) -> int:
    return sum(p.lstat().st_size for p in directory.rglob("*") if p.is_file())


def cpu(venv: Path, code: str, runs: int) -> float:
    """Median CPU seconds (user + system) of a fresh interpreter of ``venv`` running
    ``code`` (the children's usage before and after: runs are one at a time)."""
    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run([str(python(venv)), "-c", code])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times)


def run_measure(builder: Builder, runs: int) -> int:
    rows = []
    for flavour in FLAVOURS:
        venv = builder.install(flavour, compile_bytecode=True)
        size = size_of(site_packages(venv))
        empty = cpu(venv, "pass", runs)
        base = cpu(venv, "import immagent", runs) - empty
        adds = "-"
        if flavour.adds:
            adds = f"{cpu(venv, flavour.adds, runs) - empty:.2f} s"
        rows.append((flavour.name, f"`pip install {flavour.command}`",
                     str(len(distributions(venv))),
                     f"{size / 1e6:.0f} MB", f"{base:.2f} s",
                     f"{flavour.adds_label}: {adds}" if flavour.adds else "-"))
        print(f"measured {flavour.name}", file=sys.stderr, flush=True)
    header = ("flavour", "install", "packages", "installed size", "`import immagent`",
              "importing what it adds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nImport figures: CPU seconds (user + system), median of {runs} fresh "
          f"interpreters, less an empty one's; Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, load average {load} at the end.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("check", "measure"))
    parser.add_argument("--uv", default="uv", help="the uv command (default: uv)")
    parser.add_argument("--runs", type=int, default=5, help="measure: runs per figure")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="check: flavours at a time (default: cores, at most 2)")
    parser.add_argument("--keep", type=Path, help="build and install here, and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="immagent-flavours-") as tmp:
        workdir = args.keep or Path(tmp)
        try:
            builder = Builder(shlex.split(args.uv), workdir)
        except Failed as e:
            print(f"FAILED building the wheels: {e}\n0 passed, 1 failed")
            return 1
        if args.mode == "check":
            return run_check(builder, args.jobs)
        return run_measure(builder, args.runs)


if __name__ == "__main__":
    sys.exit(main())
