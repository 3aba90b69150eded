"""The ``immagent`` command line, run in-process through ``main()`` and as a real console
script, on SQLite files and on PostgreSQL, offline (the echo model)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import immagent
from immagent.cli import main
from immagent.cli.chat import default_model
from immagent.cli.render import Progress, human_bytes, table
from tests.conftest import node_record, write_record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("immagent")
PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "IMMAGENT_MODEL")


@dataclass
class Result:
    """What one CLI run produced."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as JSON."""
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key and no IMMAGENT_DB from the caller's shell: the echo model, --db."""
    for key in (*PROVIDER_KEYS, "IMMAGENT_DB"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Path of a (not yet existing) SQLite database."""
    return str(tmp_path / "agents.db")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], db: str) -> Any:
    """Run ``immagent --db <db> ARGS`` in-process; returns a Result."""
    def run(*args: str, database: str | None = db) -> Result:
        argv = (["--db", database] if database is not None else []) + list(args)
        code = main(argv)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


def one_error_line(result: Result, code: int, *fragments: str) -> None:
    """The run failed with ``code`` and exactly one ``immagent: error:`` line on stderr."""
    assert result.code == code, result
    assert result.err.startswith("immagent: error: "), result.err
    assert result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


def agent_id(result: Result) -> str:
    """The id on the ``agent <id>`` line a chat prints last."""
    last = result.out.strip().splitlines()[-1]
    assert last.startswith("agent "), result.out
    return last.removeprefix("agent ")


def sqlite_rows(path: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows read behind the CLI's back."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


# -- chat and lineage ----------------------------------------------------------------------

def test_chat_twice_continues_the_same_lineage(cli: Any) -> None:
    first = cli("chat", "Hello")
    assert first.code == 0, first
    assert first.out.splitlines()[0] == "Echo: Hello"
    second = cli("chat", "Hello", "again")  # unquoted words are one message
    assert second.code == 0, second
    assert second.out.splitlines()[0] == "Echo: Hello again"
    lineage = cli("log", agent_id(second), "--json").json()["lineage"]
    assert [e["id"] for e in lineage][:2] == [agent_id(second), agent_id(first)]
    assert [e["messages"] for e in lineage] == [4, 2, 0]
    assert lineage[0]["parent_id"] == agent_id(first)
    assert [m["content"] for m in lineage[0]["added"]] == ["Hello again", "Echo: Hello again"]


def test_log_reads_like_git_log_newest_first(cli: Any) -> None:
    cli("chat", "one")
    head = agent_id(cli("chat", "two"))
    log = cli("log", head)
    assert log.code == 0
    assert log.out.startswith(f"agent {head}\n")
    assert log.out.index("user: two") < log.out.index("user: one") < log.out.index("(created)")
    oneline = cli("log", "--oneline", head).out.splitlines()
    # git's habit: a unique prefix of the id (at least 8 hex digits), then the change.
    short = oneline[0].split()[0]
    assert len(oneline) == 3 and head.startswith(short) and len(short) >= 8
    assert "Echo: two" in oneline[0]
    assert cli("show", short, "--json").json()["id"] == head
    assert len(cli("log", "-n", "1", head).out.split("\nagent ")) == 1


def test_log_and_show_default_to_the_newest_state_of_a_name(cli: Any) -> None:
    cli("chat", "one")
    head = agent_id(cli("chat", "two"))
    other = agent_id(cli("chat", "--name", "other", "three"))
    assert cli("log", "--json").json()["lineage"][0]["id"] == head
    assert cli("show", "--name", "other", "--json").json()["id"] == other
    one_error_line(cli("log", "--name", "nobody"), 1, "no agent named 'nobody'")


def test_chat_by_agent_id_forks_and_by_name_keeps_lineages_apart(cli: Any) -> None:
    root = agent_id(cli("chat", "start"))
    fork = agent_id(cli("chat", "--agent", root, "fork"))
    other = agent_id(cli("chat", "--name", "other", "--system", "Be brief.", "hi"))
    assert cli("log", fork, "--json").json()["lineage"][1]["id"] == root
    shown = cli("show", other, "--json").json()
    assert shown["name"] == "other" and shown["system_prompt"] == "Be brief."
    assert len(cli("log", other, "--json").json()["lineage"]) == 2
    # The newest "assistant" state is the fork, so the next plain chat continues it.
    nxt = agent_id(cli("chat", "next"))
    assert cli("show", nxt, "--json").json()["parent_id"] == fork


def test_chat_refuses_options_it_would_ignore(cli: Any) -> None:
    cli("chat", "hi")
    one_error_line(cli("chat", "--model", "openai/gpt-4o", "hi"), 2, "--model")
    one_error_line(cli("chat", "--system", "Other.", "hi"), 2, "--system")
    one_error_line(cli("chat", "   "), 2, "empty")
    assert cli("agents", "--all", "--json").json()["total"] == 2


def test_default_model_is_echo_without_provider_keys() -> None:
    assert default_model({}) == "immagent/echo"
    assert default_model({"OPENAI_API_KEY": "k"}).startswith("openai/")
    assert default_model({"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "k"}).startswith(
        "anthropic/")
    assert default_model({"IMMAGENT_MODEL": "x/y", "OPENAI_API_KEY": "k"}) == "x/y"


def test_interactive_loop_reads_one_turn_per_line(cli: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\n   \nThere\n"))
    result = cli("chat")
    assert result.code == 0, result
    assert result.out.splitlines()[:2] == ["Echo: Hi", "Echo: There"]
    lineage = cli("log", agent_id(result), "--json").json()["lineage"]
    assert [e["messages"] for e in lineage] == [4, 2, 0]


def test_interactive_loop_prints_json_lines(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    lines = cli("chat", "--json").out.splitlines()
    turns = [json.loads(line) for line in lines]
    assert [t["reply"] for t in turns] == ["Echo: a", "Echo: b"]
    assert turns[1]["agent"]["parent_id"] == turns[0]["agent"]["id"]


def test_interactive_loop_with_no_input_creates_nothing(cli: Any, db: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = cli("chat")
    assert result.code == 0 and result.out == ""
    assert sqlite_rows(db, "SELECT count(*) FROM immagent_states") == [(0,)]


# -- browsing ------------------------------------------------------------------------------

def test_agents_lists_one_row_per_name_newest_activity_first(cli: Any) -> None:
    ids = [agent_id(cli("chat", "--name", f"bot{i}", f"m{i}")) for i in range(3)]
    ids[0] = agent_id(cli("chat", "--name", "bot0", "again"))  # bot0 is the newest now
    table_out = cli("agents").out.splitlines()
    assert table_out[0].split() == ["ID", "NAME", "MODEL", "TURNS", "MSGS", "STATES", "SIZE",
                                    "LAST", "ACTIVE"]
    rows = table_out[1:-1]
    assert [r.split()[1] for r in rows] == ["bot0", "bot2", "bot1"]
    assert table_out[-1].startswith("(1-3 of 3 agents;")
    assert len({r.index("immagent/echo") for r in rows}) == 1  # columns line up
    assert [r.split()[3:6] for r in rows] == [["2", "4", "3"], ["1", "2", "2"], ["1", "2", "2"]]
    heads = cli("agents", "--json").json()
    assert [a["id"] for a in heads["agents"]] == [ids[0], ids[2], ids[1]]
    assert heads["agents"][0] | {"turns": 2, "messages": 4, "states": 3,
                                 "ref": "agent:bot0"} == heads["agents"][0]
    page = cli("agents", "--limit", "1", "--offset", "1", "--json").json()
    assert page["total"] == 3 and [a["name"] for a in page["agents"]] == ["bot2"]
    # --name: a case-insensitive substring, as the help says.
    assert [a["name"] for a in cli("agents", "--name", "BOT1", "--json").json()["agents"]] \
        == ["bot1"]


def test_agents_all_lists_every_state_newest_first(cli: Any) -> None:
    ids = [agent_id(cli("chat", "--name", f"bot{i}", f"m{i}")) for i in range(3)]
    table_out = cli("agents", "--all").out.splitlines()
    assert table_out[0].split() == ["ID", "NAME", "MODEL", "MSGS", "CREATED"]
    rows = table_out[1:-1]
    # Created states, then their first turns: 6 states; columns start at the same offsets.
    assert len(rows) == 6 and table_out[-1] == "(1-6 of 6 agent states)"
    assert len({r.index("immagent/echo") for r in rows}) == 1
    page = cli("agents", "--all", "--limit", "2", "--offset", "1", "--json").json()
    assert page["total"] == 6 and len(page["agents"]) == 2
    named = cli("agents", "--all", "--name", "bot1", "--json").json()["agents"]  # newest first
    assert [a["messages"] for a in named] == [2, 0] and named[0]["id"] == ids[1]


def test_agents_on_an_empty_store(cli: Any) -> None:
    cli("chat", "hi")
    assert cli("agents", "--name", "nobody").out == "no agents\n"
    assert cli("agents", "--all", "--name", "nobody").out == "no agent states\n"


def test_show_prints_fields_digests_prompt_and_messages(cli: Any) -> None:
    head = agent_id(cli("chat", "--system", "Answer in French.", "--name", "fr", "Bonjour"))
    data = cli("show", head, "--json").json()
    assert data["id"] == head and data["messages"] == 2 and len(data["digest"]) == 64
    assert [m["role"] for m in data["conversation"]] == ["user", "assistant"]
    assert data["conversation"][1]["model"] == "immagent/echo"
    text = cli("show", head).out
    for expected in (head, data["digest"], data["system_prompt_digest"], "Answer in French.",
                     "[1] user", "Bonjour", "[2] assistant", "Echo: Bonjour"):
        assert expected in text


def test_clone_shares_content_and_delete_removes_states(cli: Any, db: str) -> None:
    head = agent_id(cli("chat", "hi"))
    clone = cli("clone", head).out.strip()
    original, copy = cli("show", head, "--json").json(), cli("show", clone, "--json").json()
    # A sibling: same parent, same content.
    assert copy["parent_id"] == original["parent_id"] and copy["digest"] == original["digest"]
    assert cli("delete", clone, "--yes").code == 0
    one_error_line(cli("show", clone), 1, "not found", clone)
    planned = cli("delete", head, "--lineage", "--dry-run", "--json").json()["delete"]
    assert sqlite_rows(db, "SELECT count(*) FROM immagent_states") == [(2,)]
    deleted = cli("delete", head, "--lineage", "--yes", "--json").json()["deleted"]
    assert deleted == planned and deleted[0] == head and len(deleted) == 2
    assert sqlite_rows(db, "SELECT count(*) FROM immagent_states") == [(0,)]


# -- storage and audit ---------------------------------------------------------------------

def test_stats_reports_sizes_and_sharing(cli: Any) -> None:
    for word in ("a", "b", "c"):
        cli("chat", word * 500)  # long enough that sharing the history pays
    stats = cli("stats", "--json").json()
    assert stats["agents"] == 4
    assert stats["assets_by_kind"]["message"]["count"] == 6
    assert stats["saved_bytes"] == stats["logical_bytes"] - stats["payload_bytes"] > 0
    assert stats["sharing_ratio"] > 1 and stats["disk_bytes"] > stats["payload_bytes"]
    text = cli("stats").out
    assert "sharing saves" in text and "KiB" in text and "message" in text


def test_gc_frees_what_deleted_states_held(cli: Any) -> None:
    head = agent_id(cli("chat", "--name", "gone", "bye"))
    cli("chat", "--name", "kept", "stay")
    assert cli("gc", "--json").json()["assets_removed"] == 0  # nothing to ask about
    cli("delete", head, "--lineage", "--yes")
    planned = cli("gc", "--dry-run", "--json").json()
    assert planned["dry_run"] is True and planned["assets_removed"] == 3
    one_error_line(cli("gc"), 2, "without confirmation", "--yes")  # no terminal to ask on
    result = cli("gc", "--yes", "--json").json()
    assert result["assets_removed"] == 3 and result["bytes_freed"] > 0  # 2 messages + 1 node
    assert result["bytes_freed"] == planned["bytes_freed"]
    assert "removed 0 assets" in cli("gc").out


def test_verify_passes_then_lists_a_corrupt_asset(cli: Any, db: str) -> None:
    head = agent_id(cli("chat", "hi"))
    ok = cli("verify")
    assert ok.code == 0 and ok.out.strip().endswith("OK") and ok.err == ""
    assert cli("verify", head, "--json").json()["ok"] is True
    with sqlite3.connect(db) as conn:  # find the turn's node (it holds the messages)
        (digest,) = conn.execute(
            "SELECT digest FROM immagent_nodes WHERE count > 0 LIMIT 1").fetchone()
    record = node_record(f"sqlite:///{db}", digest)  # flip one byte of a message in it
    write_record(f"sqlite:///{db}", digest, record[:-1] + bytes([record[-1] ^ 1]))
    bad = cli("verify")
    assert bad.code == 1 and f"corrupt {bytes(digest).hex()}" in bad.out
    one_error_line(bad, 1, "1 problem")
    report = cli("verify", "--json").json()
    assert report["ok"] is False and report["corrupt"][0]["digest"] == bytes(digest).hex()


def test_export_verify_bundle_and_import_elsewhere(cli: Any, tmp_path: Path) -> None:
    head = agent_id(cli("chat", "hi"))
    bundle = tmp_path / "agent.imab"
    exported = cli("export", head, str(bundle), "--json").json()
    assert exported["head"] == head and len(exported["agents"]) == 2
    one_error_line(cli("export", head, str(bundle)), 1, "already exists")
    one_error_line(cli("export", head, str(tmp_path)), 1, "is a directory")
    # verify-bundle needs no database: point --db at one that does not exist.
    checked = cli("verify-bundle", str(bundle), database=str(tmp_path / "none.db"))
    assert checked.code == 0 and checked.out.startswith(f"{bundle}: OK")
    assert not (tmp_path / "none.db").exists()
    other = str(tmp_path / "other.db")
    assert cli("import", str(bundle), database=other).out.strip() == head
    original = cli("show", head, "--json").json()
    assert cli("show", head, "--json", database=other).json() == original


def test_tampered_bundle_fails_with_one_line(cli: Any, tmp_path: Path) -> None:
    head = agent_id(cli("chat", "hi"))
    bundle = tmp_path / "agent.imab"
    cli("export", head, str(bundle))
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    one_error_line(cli("verify-bundle", str(bundle)), 1, str(bundle))
    one_error_line(cli("import", str(bundle), database=str(tmp_path / "x.db")), 1)
    one_error_line(cli("verify-bundle", str(tmp_path / "missing")), 4, "no bundle file")


# -- output --------------------------------------------------------------------------------

def test_every_command_speaks_json(cli: Any, tmp_path: Path) -> None:
    head = agent_id(cli("chat", "hi"))
    bundle = str(tmp_path / "b.imab")
    clone = cli("clone", head, "--json").json()["id"]
    runs = [("chat", "again"), ("agents",), ("show", head), ("log", head), ("clone", head),
            ("stats",), ("gc",), ("verify",), ("verify", head), ("export", head, bundle),
            ("verify-bundle", bundle), ("delete", clone, "--yes"), ("threads",), ("sessions",),
            ("gc", "--dry-run"), ("delete", head, "--dry-run")]
    for args in runs:
        result = cli("--json", *args)  # --json before the command name works as well
        assert result.code == 0, (args, result)
        assert isinstance(result.json(), dict), args
    assert cli("import", bundle, "--json", database=str(tmp_path / "o.db")).json()["id"] == head


def test_human_helpers() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB"]
    lines = table(("A", "NUM"), [("x", "1"), ("long", "100")], right=(1,))
    assert ["".join(line) for line in lines] == ["A     NUM", "x       1", "long  100"]
    # Fitted to a width: the shrinkable column gives way, with an ellipsis.
    fitted = table(("NAME", "N"), [("a" * 30, "1")], shrink=(0,), width=12)
    assert ["".join(line) for line in fitted] == ["NAME       N", "aaaaaaaa…  1"]


def test_progress_is_drawn_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    piped, tty = io.StringIO(), Terminal()
    for stream in (piped, tty):
        progress = Progress("verified", stream)
        progress(5)
        progress.finish()
    assert piped.getvalue() == ""
    assert "verified: 5" in tty.getvalue()


def test_version_and_help(cli: Any) -> None:
    version = cli("--version", database=None)
    assert version.code == 0 and version.out.strip() == f"immagent {immagent.__version__}"
    assert cli("--help", database=None).code == 0
    assert "--agent" in cli("chat", "--help").out


# -- bad input -----------------------------------------------------------------------------

def test_usage_errors_exit_2_with_one_line(cli: Any) -> None:
    one_error_line(cli(database=None), 2, "COMMAND")
    one_error_line(cli("frobnicate"), 2, "invalid choice")
    one_error_line(cli("show", "thread:"), 2, "thread: needs a name")
    one_error_line(cli("agents", "--limit", "0"), 2, "at least 1")
    one_error_line(cli("chat", "--agent", "01900000-0000-7000-8000-000000000000", "--name",
                       "y", "hi"), 2, "not allowed")
    one_error_line(cli("agents", database="mysql://h/db"), 2, "mysql")
    one_error_line(cli("agents", database=""), 2, "empty")


def test_unknown_agent_id_exits_1(cli: Any) -> None:
    cli("chat", "hi")
    missing = "01900000-0000-7000-8000-000000000000"
    for args in (("show", missing), ("log", missing), ("clone", missing), ("delete", missing),
                 ("verify", missing), ("chat", "--agent", missing, "hi")):
        one_error_line(cli(*args), 1, "not found", missing)


def test_read_commands_need_an_existing_database(cli: Any, db: str) -> None:
    one_error_line(cli("agents"), 1, "no database at", db)
    assert not Path(db).exists()


def test_bad_database_files_are_refused_untouched(cli: Any, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    one_error_line(cli("agents", database=str(text)), 1, "not an SQLite database")
    one_error_line(cli("chat", "hi", database=str(text)), 1, "not an SQLite database")
    assert text.read_text() == "not a database\n"
    one_error_line(cli("agents", database=str(tmp_path)), 1, "is a directory")
    one_error_line(cli("chat", "hi", database=str(tmp_path / "no" / "x.db")), 1,
                   "does not exist")
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x)")
    one_error_line(cli("agents", database=str(foreign)), 1, "holds no immagent store")
    assert sqlite_rows(str(foreign), "SELECT name FROM sqlite_master") == [("notes",)]


def test_newer_schema_version_is_refused_and_nothing_written(cli: Any, db: str) -> None:
    cli("chat", "hi")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO immagent_schema (version) VALUES (99)")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = Path(db).read_bytes()
    for args in (("agents",), ("chat", "hi"), ("gc",), ("import", db)):
        one_error_line(cli(*args), 1, "schema version 99")
    assert Path(db).read_bytes() == before


def test_unreachable_postgres_is_one_line(cli: Any) -> None:
    one_error_line(cli("agents", database="postgresql://nobody@127.0.0.1:1/nothing"), 1,
                   "cannot connect")


def test_debug_shows_the_traceback(cli: Any) -> None:
    cli("chat", "hi")
    result = cli("--debug", "show", "01900000-0000-7000-8000-000000000000")
    assert result.code == 1 and "Traceback" in result.err
    assert result.err.strip().splitlines()[-1].startswith(
        "immagent: error: state 01900000-0000-7000-8000-000000000000 not found")


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that can be read but not written."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


def run_unprivileged(*args: str) -> Result:
    """The console script without the power to ignore file permissions (as root, the
    capabilities that bypass them are dropped, so root gets what any user would)."""
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    prefix = drop if os.geteuid() == 0 else []
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([*prefix, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=120)
    return Result(done.returncode, done.stdout, done.stderr)


def test_read_only_directory_is_refused_before_writing(readonly_dir: Path) -> None:
    target = readonly_dir / "new.db"
    one_error_line(run_unprivileged("--db", str(target), "chat", "hi"), 1, "read-only")
    assert list(readonly_dir.iterdir()) == []


def test_existing_database_in_read_only_directory(tmp_path: Path, cli: Any, db: str) -> None:
    cli("chat", "hi")
    with sqlite3.connect(db) as conn:  # leave no -wal/-shm beside it
        conn.execute("PRAGMA journal_mode = DELETE")
    Path(db).parent.chmod(0o555)
    try:
        one_error_line(run_unprivileged("--db", db, "chat", "hi"), 1, "read-only")
    finally:
        Path(db).parent.chmod(0o755)
    assert cli("agents", "--all", "--json").json()["total"] == 2


def test_unreadable_database_file(cli: Any, db: str) -> None:
    cli("chat", "hi")
    Path(db).chmod(0)
    try:
        one_error_line(run_unprivileged("--db", db, "agents"), 1, "not readable", db)
    finally:
        Path(db).chmod(0o644)


# -- the real console script ---------------------------------------------------------------

def script(*args: str, cwd: Path, env: dict[str, str] | None = None,
           stdin: str | None = None) -> Result:
    """Run the installed ``immagent`` entry point in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in (*PROVIDER_KEYS, "IMMAGENT_DB")}
    full_env.update(env or {}, LITELLM_LOCAL_MODEL_COST_MAP="True")
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, input=stdin, timeout=180)
    return Result(done.returncode, done.stdout, done.stderr)


def test_console_script_default_database_chat_twice_and_log(tmp_path: Path, cli: Any) -> None:
    first = script("chat", "Hello", cwd=tmp_path)  # the entry point, as a user runs it
    assert first.code == 0, first
    assert first.out.splitlines()[0] == "Echo: Hello"
    default_db = tmp_path / "immagent.db"  # no --db, no IMMAGENT_DB: ./immagent.db
    assert default_db.is_file()
    second = cli("chat", "Hello", database=str(default_db))  # in-process
    log = script("log", "--oneline", agent_id(second), cwd=tmp_path)
    lines = log.out.splitlines()
    assert log.code == 0 and len(lines) == 3
    assert agent_id(second).startswith(lines[0].split()[0])
    assert agent_id(first).startswith(lines[1].split()[0])
    module = subprocess.run([sys.executable, "-m", "immagent.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert module.stdout.strip() == f"immagent {immagent.__version__}"


def test_chat_on_postgres(pg_store_dsn: str, cli: Any, tmp_path: Path) -> None:
    first = cli("chat", "Hello", database=pg_store_dsn)
    second = cli("--json", "chat", "Hello", database=pg_store_dsn)
    assert first.code == 0 and second.code == 0, (first, second)
    assert second.json()["agent"]["parent_id"] == agent_id(first)
    lineage = cli("log", agent_id(first), "--json", database=pg_store_dsn).json()["lineage"]
    assert [e["messages"] for e in lineage] == [2, 0]
    stats = cli("stats", "--json", database=pg_store_dsn).json()
    # Two turns' messages, each held by its turn's node (small bodies are not shared).
    assert stats["agents"] == 3 and stats["assets_by_kind"]["message"]["count"] == 4
    assert cli("verify", database=pg_store_dsn).code == 0
    assert cli("agents", database=pg_store_dsn).out.count("immagent/echo") == 1
    assert cli("agents", "--all", database=pg_store_dsn).out.count("immagent/echo") == 3


class HangingServer:
    """A TCP server that accepts connections and never answers (a model stuck mid-call)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.connected.set()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def hanging() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.close()


def interrupt_mid_turn(args: list[str], cwd: Path, server: HangingServer,
                       stdin: str | None = None) -> Result:
    """Start a chat against the hanging model, press Ctrl-C once the call is in flight."""
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_KEYS}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", OPENAI_API_KEY="sk-test",
               OPENAI_BASE_URL=f"http://127.0.0.1:{server.port}/v1",
               OPENAI_API_BASE=f"http://127.0.0.1:{server.port}/v1")
    proc = subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.flush()
        # LiteLLM's import comes first: minutes on a loaded machine, seconds on a quiet one.
        assert server.connected.wait(300), "the model call never started"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return Result(proc.returncode, out, err)


def agent_rows(path: Path) -> int:
    return int(sqlite_rows(str(path), "SELECT count(*) FROM immagent_states")[0][0])


# Ctrl-C during the first turn of a new agent (streamed to a terminal, where the made
# agent must be removed again): test_chat_stream.py.


def test_ctrl_c_mid_turn_of_an_existing_agent(tmp_path: Path, hanging: HangingServer) -> None:
    db = tmp_path / "immagent.db"

    async def create() -> str:
        async with await immagent.Store.connect(str(db)) as store:
            await store.init_schema()
            agent = await store.create_agent("slow", "Hi.", "openai/gpt-4o-mini")
            return str(agent.id)

    existing = asyncio.run(create())
    result = interrupt_mid_turn(["chat", "--agent", existing], tmp_path, hanging,
                                stdin="Hello\n")
    assert result.code == 130, result
    assert result.out.strip() == f"agent {existing}"  # the last saved state
    assert agent_rows(db) == 1
    assert sqlite_rows(str(db), "SELECT count(*) FROM immagent_assets WHERE kind = 2") == [(0,)]


class CtrlCAfter:
    """stdin that delivers its lines, then behaves as if Ctrl-C was pressed at the prompt."""

    def __init__(self, text: str) -> None:
        self._lines = io.StringIO(text)

    def readline(self) -> str:
        line = self._lines.readline()
        if not line:
            raise KeyboardInterrupt
        return line

    def isatty(self) -> bool:
        return False


def test_ctrl_c_at_the_prompt_exits_cleanly(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", CtrlCAfter("Hello\n"))
    result = cli("chat")
    assert result.code == 0, result
    assert result.out.splitlines()[0] == "Echo: Hello" and result.err == ""
    assert len(cli("log", agent_id(result), "--json").json()["lineage"]) == 2
