"""Help texts say what the commands do: every claim a help text makes here is checked by
running the command (in-process, on a SQLite store, offline)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from immagent.cli import main
from immagent.cli.app import COMMANDS
from tests.test_cli import Result, agent_id


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    db = str(tmp_path / "help.db")
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at hyphens otherwise

    def run(*args: str) -> Result:
        code = main(["--db", db, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


def help_of(cli: Callable[..., Result], *command: str) -> str:
    shown = cli(*command, "--help")
    assert shown.code == 0, shown
    return " ".join(shown.out.split())


def test_the_command_list_is_every_command_with_its_help(cli: Callable[..., Result]) -> None:
    listed = help_of(cli)
    for command in COMMANDS:
        assert " ".join(f"{command.name} {command.help}".split()) in listed, command.name
        assert " ".join((command.description or command.help).split()) in help_of(
            cli, command.name)


def test_agents_newest_activity_first_and_a_case_insensitive_name(
        cli: Callable[..., Result]) -> None:
    text = help_of(cli, "agents")
    assert "newest activity first" in text
    assert "only agents whose name contains TEXT (case-insensitive)" in text
    cli("chat", "--name", "Alpha", "one")
    cli("chat", "--name", "beta", "two")
    cli("chat", "--name", "Alpha", "three")  # Alpha is active last
    rows = cli("agents", "--json").json()["agents"]
    assert [r["name"] for r in rows] == ["Alpha", "beta"]
    assert [r["name"] for r in cli("agents", "--name", "ALP", "--json").json()["agents"]] == [
        "Alpha"]
    assert "--all: every agent state instead, newest first" in " ".join(text.split())
    every = cli("agents", "--all", "--json").json()["agents"]
    assert [a["created_at"] for a in every] == sorted((a["created_at"] for a in every),
                                                     reverse=True)


def test_show_and_log_default_to_the_exact_name_and_log_is_newest_first(
        cli: Callable[..., Result]) -> None:
    assert "the agent (exact name) used when REF is left out" in help_of(cli, "show")
    assert "newest first" in help_of(cli, "log")
    first = agent_id(cli("chat", "--name", "Exact", "one"))
    second = agent_id(cli("chat", "--name", "Exact", "two"))
    assert cli("show", "--name", "Exact", "--json").json()["id"] == second
    assert cli("show", "--name", "exact").code == 1  # exact: no other case
    assert cli("show", "--name", "Exa").code == 1  # and no substring
    lineage = cli("log", "--name", "Exact", "--json").json()["lineage"]
    assert [e["id"] for e in lineage][:2] == [second, first]


def test_delete_and_gc_ask_first_and_dry_runs_change_nothing(
        cli: Callable[..., Result]) -> None:
    delete, gc = help_of(cli, "delete"), help_of(cli, "gc")
    assert "scripts pass --yes; --dry-run shows what would go" in delete
    assert "scripts pass --yes; --dry-run only says what would go" in gc
    head = agent_id(cli("chat", "bye"))
    assert cli("delete", head, "--lineage", "--dry-run").code == 0
    assert cli("delete", head, "--lineage").code == 2  # stdin is no terminal: no question
    assert cli("show", head).code == 0
    assert cli("delete", head, "--lineage", "--yes").code == 0
    removed = cli("gc", "--dry-run", "--json").json()["assets_removed"]
    assert removed > 0 and cli("gc", "--dry-run", "--json").json()["assets_removed"] == removed
    assert cli("gc", "--yes", "--json").json()["assets_removed"] == removed


def test_clone_is_a_sibling_and_chat_speaks_json_lines(
        cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch) -> None:
    assert "with REF's content and REF's parent (a sibling" in help_of(cli, "clone")
    assert "--json prints one JSON object per turn (JSON Lines)" in help_of(cli, "chat")
    head = agent_id(cli("chat", "hi"))
    twin = cli("clone", head, "--json").json()
    original = cli("show", head, "--json").json()
    assert twin["parent_id"] == original["parent_id"] and twin["digest"] == original["digest"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    lines = cli("--json", "chat").out.splitlines()
    assert [json.loads(line)["reply"] for line in lines] == ["Echo: a", "Echo: b"]


def test_verify_exits_1_on_a_problem_as_its_help_says(
        cli: Callable[..., Result], tmp_path: Path) -> None:
    import sqlite3

    assert "exits 1 if anything is" in help_of(cli, "verify")
    cli("chat", "hi")
    with sqlite3.connect(tmp_path / "help.db") as conn:  # a byte of the turn's node row
        loc, body = conn.execute(
            "SELECT loc, body FROM immagent_nodes WHERE count > 0 LIMIT 1").fetchone()
        conn.execute("UPDATE immagent_nodes SET body = ? WHERE loc = ?",
                     (body[:-1] + bytes([body[-1] ^ 1]), loc))
    assert cli("verify").code == 1


def test_global_options_do_what_they_say(cli: Callable[..., Result]) -> None:
    text = help_of(cli)
    assert "print results as JSON for scripts (errors too, on stderr)" in text
    failed = cli("--json", "show", "agent:nobody")
    error: Any = json.loads(failed.err)["error"]
    assert failed.code == error["exit_code"] == 1 and failed.out == ""
    assert "colour output: auto (default: on a terminal, unless NO_COLOR is set)" in text
    assert "never page output" in text  # the pty tests hold the pager and colour to it
