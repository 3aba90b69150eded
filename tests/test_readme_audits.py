"""The README's Audits walk-through runs as written: every ``$ immagent ...`` command of its
console block, in order, in an empty directory, in process through ``main()`` with the
offline model; each shown exit status (``; echo "exit $?"``, else 0) and each shown output
line (``...`` stands for lines left out) must match what the command printed, ids, digests,
key ids, times and sizes aside. The README's ids are mapped to this run's as they appear."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from immagent.cli import main
from tests.test_cli import _offline

__all__ = ["_offline"]  # the fixture test_cli.py defines (no provider key, no IMMAGENT_DB)

README = Path(__file__).resolve().parent.parent / "README.md"
#: What differs from run to run: ids, digests, key ids (hex runs), then any number.
_HEX = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,64}")
_NUMBER = re.compile(r"\d+(\.\d+)?")
_EXIT = '; echo "exit $?"'


def _walkthrough() -> list[tuple[str, list[str]]]:
    """(command, shown output lines) of the Audits section's console block."""
    text = README.read_text()
    section = text[text.index("\n## Audits\n"):]
    block = section[section.index("```console\n") + 11:]
    block = block[:block.index("```")]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def _shape(line: str) -> str:
    return _NUMBER.sub("#", _HEX.sub("<id>", line.rstrip()))


def test_the_readme_audits_walkthrough_runs_as_written(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    steps = _walkthrough()
    assert len(steps) >= 15 and any(c.startswith("immagent verify-proof") for c, _ in steps)
    ids: dict[str, str] = {}  # the README's ids and digests -> this run's
    for command, shown in steps:
        expected_code = 0
        if command.endswith(_EXIT):
            command = command.removesuffix(_EXIT)
            expected_code = int(shown.pop().removeprefix("exit "))
        for old, new in ids.items():
            command = command.replace(old, new)
        argv = shlex.split(command, comments=True)
        assert argv[0] == "immagent", command
        code = main(argv[1:])
        out = capsys.readouterr()
        printed = (out.out + out.err).splitlines()
        assert code == expected_code, (command, out)
        for line in shown:
            if line.strip() == "...":
                continue
            matches = [p for p in printed if _shape(p) == _shape(line)]
            assert matches, (command, line, printed)
            _learn(ids, _HEX.findall(line), _HEX.findall(matches[0]), command)


def _learn(ids: dict[str, str], olds: list[str], news: list[str], command: str) -> None:
    """Map the README's tokens of one line to this run's: those already known must be
    there (in any order: key ids are listed sorted), the others pair up in order."""
    rest = list(news)
    for old in olds:
        if old in ids:
            assert ids[old] in rest, (command, old, ids[old], news)
            rest.remove(ids[old])
    unknown = [o for o in olds if o not in ids]
    assert len(unknown) == len(rest), (command, olds, news)
    ids.update(zip(unknown, rest, strict=True))
