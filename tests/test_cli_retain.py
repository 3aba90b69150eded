"""``immagent retain``, ``pin`` and ``unpin`` (cli/retain.py): a dry run, the question,
the stored policy, pins, bad options, escaped output."""

from __future__ import annotations

from typing import Any

from tests.test_cli import _offline, agent_id, cli, db, one_error_line, sqlite_rows

__all__ = ["_offline", "cli", "db"]  # the fixtures test_cli.py defines, used here


def _chat(cli: Any, name: str, turns: int) -> list[str]:
    return [agent_id(cli("chat", "--name", name, f"{name} turn {i}")) for i in range(turns)]


def _agents(path: str) -> int:
    return int(sqlite_rows(path, "SELECT count(*) FROM immagent_states WHERE kind = 4")[0][0])


def test_retain_dry_run_asks_then_deletes_and_reports(cli: Any, db: str) -> None:
    ids = _chat(cli, "support", 4)
    _chat(cli, "triage", 2)
    assert _agents(db) == 8  # a created state, then one per turn
    dry = cli("retain", "--keep-latest", "2", "--dry-run", "--json").json()
    assert dry["dry_run"] and dry["states_deleted"] == 4 and dry["streams"] == 2
    assert _agents(db) == 8
    one_error_line(cli("retain", "--keep-latest", "2"), 2, "without confirmation", "--yes")
    assert _agents(db) == 8
    done = cli("retain", "--keep-latest", "2", "--yes")
    assert done.code == 0 and "deleted 4 state(s)" in done.out and "gc removed" in done.out
    assert _agents(db) == 4
    shown = cli("show", ids[-1])
    assert shown.code == 0 and "support turn 0" in shown.out  # the history is whole
    assert cli("verify").code == 0


def test_pin_keeps_a_state_and_unpin_lets_it_go(cli: Any, db: str) -> None:
    ids = _chat(cli, "a", 4)
    one_error_line(cli("pin", ids[0], "--tag", "\x1b[31mred"), 2, "tag", "U+001B")
    pinned = cli("pin", ids[0], "--tag", "red", "--note", "kept \x1b[31m here")
    assert pinned.code == 0 and "pinned agent 'a'" in pinned.out
    listed = cli("pin", "--list")
    assert ids[0] in listed.out and "\x1b[31m" not in listed.out  # escaped, never raw
    assert cli("pin", "--list", "--json").json()[0]["state"] == ids[0]
    assert cli("retain", "--keep-latest", "1", "--yes").code == 0
    assert _agents(db) == 2  # the pinned state and the head
    assert cli("unpin", ids[0]).out.startswith("removed 1 pin")
    assert cli("pin", "--list").err.strip() == "(no pins)"


def test_a_stored_policy_is_applied_by_retain_without_rules(cli: Any, db: str) -> None:
    _chat(cli, "a", 3)
    one_error_line(cli("retain", "--yes"), 2, "no retention policy is stored")
    saved = cli("retain", "--kind", "agents", "--keep-latest", "1", "--max-age", "30d",
                "--save")
    assert saved.code == 0 and "agents: keep the newest 1 + those younger than 30d" in saved.out
    assert _agents(db) == 4  # --save stores, deletes nothing
    assert cli("retain", "--yes").code == 0
    assert _agents(db) == 4  # everything is younger than 30 days
    cli("retain", "--kind", "agents", "--keep-latest", "1", "--save")
    assert cli("retain", "--yes", "--json").json()["states_deleted"] == 3


def test_retain_refuses_bad_options_with_one_line(cli: Any) -> None:
    _chat(cli, "a", 1)
    one_error_line(cli("retain", "--keep-latest", "0"), 2, "--keep-latest", "at least 1")
    one_error_line(cli("retain", "--max-age", "soon", "--yes"), 2, "max_age", "soon")
    one_error_line(cli("retain", "--streams", "a*", "--yes"), 2, "narrow a rule")
    one_error_line(cli("retain", "--drop", "--yes"), 2, "idle_for")
    one_error_line(cli("retain", "--kind", "emails", "--keep-latest", "1"), 2, "--kind")
    one_error_line(cli("pin"), 2, "pin needs the state")
