"""The install flavours: what each distribution requires, and that the lean ones work.

``immagent-core`` (the root pyproject) holds the code and requires only what the store
needs; ``immagent`` (packages/immagent) is immagent-core[llm] at the same version, with the
same extras forwarded. Here: the two stay in step, LiteLLM's compromised releases are
excluded and absent from the lock, and each lean flavour (core, core + one framework)
passes tests/flavour_probe.py in this environment with every other distribution hidden.
``make test-install`` (scripts/install_flavours.py) runs the same probe in real
virtualenvs installed from freshly built wheels.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

import immagent

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "flavour_probe.py"
BAD_LITELLM = ("1.82.7", "1.82.8")  # compromised releases (a .pth credential stealer)
#: What the store needs; everything else is an extra (README, "Install").
CORE_DEPENDENCIES = {"psycopg", "msgspec", "blake3", "zstandard"}


def pyproject(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


CORE = pyproject(ROOT / "pyproject.toml")
FULL = pyproject(ROOT / "packages" / "immagent" / "pyproject.toml")


def requirements(project: dict[str, Any]) -> list[Requirement]:
    """Every requirement a pyproject states: dependencies, extras, groups, overrides."""
    lines = [*project["project"]["dependencies"]]
    for extra in project["project"].get("optional-dependencies", {}).values():
        lines += extra
    for group in project.get("dependency-groups", {}).values():
        lines += [g for g in group if isinstance(g, str)]
    lines += project.get("tool", {}).get("uv", {}).get("override-dependencies", [])
    return [Requirement(line) for line in lines]


def test_the_store_requires_no_model_tool_or_framework_package() -> None:
    names = {Requirement(r).name for r in CORE["project"]["dependencies"]}
    assert names == CORE_DEPENDENCIES
    assert {Requirement(r).name for r in CORE["project"]["optional-dependencies"]["llm"]} == {
        "litellm", "mcp"}


def test_immagent_is_immagent_core_with_llm_at_the_same_version() -> None:
    version = CORE["project"]["version"]
    assert FULL["project"]["version"] == version == immagent.__version__
    assert (CORE["project"]["name"], FULL["project"]["name"]) == ("immagent-core", "immagent")
    assert FULL["project"]["dependencies"] == [f"immagent-core[llm]=={version}"]
    assert FULL["project"]["requires-python"] == CORE["project"]["requires-python"]


def test_immagent_forwards_every_extra_of_immagent_core() -> None:
    version = CORE["project"]["version"]
    core_extras = set(CORE["project"]["optional-dependencies"]) - {"llm"}
    forwarded = FULL["project"]["optional-dependencies"]
    assert set(forwarded) == core_extras, (
        "packages/immagent/pyproject.toml must forward each extra of immagent-core")
    for extra, reqs in forwarded.items():
        assert reqs == [f"immagent-core[{extra}]=={version}"], (extra, reqs)


def test_no_requirement_allows_a_compromised_litellm() -> None:
    litellm = [r for r in requirements(CORE) + requirements(FULL) if r.name == "litellm"]
    assert litellm, "no requirement names litellm"
    for req in litellm:
        for bad in BAD_LITELLM:
            assert not req.specifier.contains(bad, prereleases=True), (str(req), bad)


def test_the_lock_holds_no_compromised_litellm() -> None:
    lock = pyproject(ROOT / "uv.lock")
    versions = [p["version"] for p in lock["package"] if p["name"] == "litellm"]
    assert versions and not set(versions) & set(BAD_LITELLM), versions
    members = {p["name"]: p for p in lock["package"] if p["name"].startswith("immagent")}
    assert set(members) == {"immagent", "immagent-core"}  # both distributions resolve
    assert {d["name"] for d in members["immagent-core"]["dependencies"]} >= CORE_DEPENDENCIES
    assert not {d["name"] for d in members["immagent-core"]["dependencies"]} & {
        "litellm", "mcp"}


def test_the_wheel_ships_the_schema_file() -> None:
    wheel = CORE["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["immagent"]
    assert wheel["force-include"] == {"schema.sql": "immagent/store/schema.sql"}
    assert (ROOT / "schema.sql").is_file()


@pytest.mark.parametrize("extras", ["", "langgraph", "openai-agents", "pydantic-ai", "sign"],
                         ids=["core", "langgraph", "openai-agents", "pydantic-ai", "sign"])
def test_a_lean_flavour_works_without_what_it_leaves_out(extras: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(PROBE), str(tmp_path), "--extras", extras,
                           "--simulate"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"flavour \[.*\]: ok\n", done.stdout), done.stdout


def test_the_probe_fails_on_a_module_level_import_of_an_sdk(tmp_path: Path) -> None:
    """A module of the package importing an SDK the flavour lacks fails the probe (as a
    raw ImportError), wherever in the package it is."""
    extra_dir = tmp_path / "more"
    extra_dir.mkdir()
    (extra_dir / "careless.py").write_text("import pydantic  # no lean core has it\n")
    done = subprocess.run(
        [sys.executable, "-c",
         "import runpy, sys, immagent; "
         f"immagent.__path__.append({str(extra_dir)!r}); "  # the walk finds it there
         f"sys.argv = ['probe', {str(tmp_path / 'work')!r}, '--simulate']; "
         f"runpy.run_path({str(PROBE)!r}, run_name='__main__')"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "No module named 'pydantic'" in done.stderr, done.stderr[-3000:]
    assert "immagent.careless" in done.stderr or "careless.py" in done.stderr


# -- the install commands users are told --------------------------------------------------

README = (ROOT / "README.md").read_text(encoding="utf-8")
#: Every "pip install <an immagent distribution>" in prose, code and docstrings (the
#: command may wrap onto the next line in Markdown and docstrings).
INSTALL = re.compile(r"pip\s+install\s+((['\"]?)immagent[\w-]*(?:\[[^\]\s]+\])?\2)")
#: Extras that are no user's: the benchmarks' peers.
NOT_FOR_USERS = {"bench"}


def install_table() -> set[str]:
    """The commands of the README's Install table (its "install" column)."""
    section = README.split("\n## Install\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\|[^|]+\| `(pip install [^`]+)` \|", section, re.MULTILINE))


def test_a_missing_extra_names_the_command_the_install_table_gives() -> None:
    table = install_table()
    assert "pip install immagent" in table and len(table) == 6, table
    extras = set(CORE["project"]["optional-dependencies"]) - NOT_FOR_USERS
    assert extras == {"llm", "langgraph", "openai-agents", "pydantic-ai", "sign"}
    for extra in extras:
        error = immagent.ExtraNotInstalledError("this", extra)
        assert error.install in table, (extra, error.install)
        assert str(error).endswith(f": {error.install}"), error


def test_every_install_command_users_are_told_is_one_the_install_table_gives() -> None:
    table = install_table() | {"pip install 'immagent-core[<extra>]'"}  # the rule, stated
    rule = ROOT / "immagent" / "exceptions.py"  # builds them: the test above checks it
    places = [ROOT / "README.md", ROOT / "packages" / "immagent" / "README.md",
              *(ROOT / "docs").rglob("*.md"),
              *(p for p in (ROOT / "immagent").rglob("*.py") if p != rule)]
    told = {(str(path.relative_to(ROOT)), f"pip install {found[1]}")
            for path in places
            for found in INSTALL.finditer(path.read_text(encoding="utf-8"))}
    assert len(told) > 10  # the pattern finds them
    assert {(where, command) for where, command in told if command not in table} == set()
