"""``immagent redact`` (cli/redact.py): a dry run, the question, by position and by digest,
the marker afterwards, verify's line, bad options, escaped output."""

from __future__ import annotations

from typing import Any

from immagent import Message
from tests.test_cli import _offline, agent_id, cli, db, one_error_line, sqlite_rows

__all__ = ["_offline", "cli", "db"]  # the fixtures test_cli.py defines, used here


def _redactions(path: str) -> int:
    return int(sqlite_rows(path, "SELECT count(*) FROM immagent_states WHERE kind = 33")[0][0])


def test_redact_asks_then_erases_the_message(cli: Any, db: str) -> None:
    first = agent_id(cli("chat", "--name", "bot", "my password is hunter2"))
    agent_id(cli("chat", "--name", "bot", "what is the weather"))
    assert "hunter2" in cli("show", "agent:bot").out
    dry = cli("redact", "agent:bot", "--message", "1", "--reason", "a password", "--dry-run")
    assert dry.code == 0 and "would erase message" in dry.out and "a password" in dry.out
    assert "hunter2" in cli("show", "agent:bot").out and _redactions(db) == 0
    one_error_line(cli("redact", "agent:bot", "--message", "1"), 2, "without confirmation",
                   "--yes")
    done = cli("redact", "agent:bot", "--message", "1", "--reason", "a \x1b[31mpassword",
               "--yes")
    assert done.code == 0 and "erased message" in done.out
    assert "\x1b[31m" not in done.out  # the reason is escaped, never raw
    # The offline model echoed it: message 2 goes too.
    assert cli("redact", "agent:bot", "--message", "2", "--yes").code == 0
    shown = cli("show", "agent:bot").out
    assert "hunter2" not in shown and "[redacted " in shown
    assert "hunter2" not in cli("show", first).out  # the older state too
    verified = cli("verify")
    assert verified.code == 0 and "redacted: 2 element(s)" in verified.out
    assert _redactions(db) == 2
    again = cli("--json", "redact", "agent:bot", "--message", "1", "--yes").json()
    assert again["already"] and again["nodes"] == 0


def test_redact_by_digest(cli: Any, db: str) -> None:
    agent_id(cli("chat", "--name", "bot", "card 4111 1111"))
    digest = Message(role="user", content="card 4111 1111").digest.hex()
    done = cli("--json", "redact", "--digest", digest.upper(), "--yes").json()
    assert done["digest"] == digest and done["nodes"] == 1 and not done["dry_run"]
    shown = cli("show", "agent:bot").out
    assert "[redacted " in shown
    # The echoed reply is another message: it stays.
    assert shown.count("4111 1111") == 1 and "Echo: card 4111 1111" in shown


def test_redact_refuses_bad_options(cli: Any, db: str) -> None:
    agent_id(cli("chat", "--name", "bot", "hello"))
    one_error_line(cli("redact", "--yes"), 2, "--message N, or --digest")
    one_error_line(cli("redact", "agent:bot", "--yes"), 2, "--message N")
    one_error_line(cli("redact", "--digest", "ab" * 32, "--message", "1", "--yes"), 2,
                   "--message goes with a state")
    one_error_line(cli("redact", "--digest", "zz", "--yes"), 2, "hex")
    one_error_line(cli("redact", "agent:bot", "--message", "9", "--yes"), 2, "position")
    one_error_line(cli("redact", "--digest", "ab" * 32, "--yes"), 1, "not found")
    assert _redactions(db) == 0
