"""The command line on stores written by all three clients (PersistentAgent, LangGraph's
ImmAgentSaver, the Agents SDK's ImmAgentSession, the real packages), on PostgreSQL and
SQLite: one row per conversation, every reference form, show/log/export/verify/delete for
each kind, stats counting every client, and ``--json`` (errors included) as a script
reads it, through a pipe."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import immagent
from immagent.assets import ConversationNode, Kind
from immagent.audit.bundle import FORMAT_VERSION
from immagent.cli import main
from tests.test_cli import PROVIDER_KEYS, Result
from tests.three_clients import (
    AGENT_TURNS,
    LONG,
    SESSION_TURNS,
    SHARED,
    THREAD_TURNS,
    Written,
    copy_store,
    three_clients,
)

__all__ = ["three_clients"]  # the module-scoped fixture, used by name

SCRIPT = Path(sys.executable).with_name("immagent")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], three_clients: Written) -> Any:
    """``immagent --db <the three clients' store> ARGS`` in-process."""
    def run(*args: str, db: str | None = None) -> Result:
        code = main(["--db", db or three_clients.dsn, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


@pytest.fixture
def private(three_clients: Written, tmp_path: Path) -> Iterator[str]:
    """A copy of the store, for a test that changes it."""
    yield from copy_store(three_clients, tmp_path)


def piped(*args: str) -> Result:
    """The console script with stdout and stderr on pipes, as a script runs it."""
    env = {k: v for k, v in os.environ.items() if k not in (*PROVIDER_KEYS, "IMMAGENT_DB")}
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)
    return Result(done.returncode, done.stdout, done.stderr)


# -- one row per conversation ----------------------------------------------------------------


def test_each_client_lists_one_row_per_conversation(cli: Any) -> None:
    agents = cli("agents", "--json").json()
    assert {a["name"]: a["turns"] for a in agents["agents"]} == AGENT_TURNS
    assert {a["name"]: a["messages"] for a in agents["agents"]} == {
        n: 2 * t for n, t in AGENT_TURNS.items()}
    # A state per turn plus the created one; sizes in content bytes, the long one largest.
    assert {a["name"]: a["states"] for a in agents["agents"]} == {"assistant": 4, "helper": 2}
    sizes = {a["name"]: a["bytes"] for a in agents["agents"]}
    assert sizes["assistant"] > 2 * len(LONG) > sizes["helper"]
    threads = cli("threads", "--json").json()
    assert {t["thread"]: t["turns"] for t in threads["threads"]} == {**THREAD_TURNS, SHARED: 1}
    # LangGraph: three checkpoints a turn (input, after the input task, after the node).
    assert {t["thread"]: t["states"] for t in threads["threads"]} == {
        "t-1": 9, "t-2": 3, SHARED: 3}
    assert {t["thread"]: t["messages"] for t in threads["threads"]}["t-1"] == 6
    sessions = cli("sessions", "--json").json()
    assert {s["session"]: s["turns"] for s in sessions["sessions"]} == {**SESSION_TURNS,
                                                                       SHARED: 1}
    # user-42: 4 items, one popped; its states: 4 adds, the pop, the branch.
    assert {s["session"]: (s["items"], s["states"]) for s in sessions["sessions"]}[
        "user-42"] == (3, 6)
    # Newest activity first: the last conversation written of each client leads.
    assert threads["threads"][0]["thread"] == SHARED
    assert sessions["sessions"][0]["session"] == SHARED
    assert agents["agents"][0]["name"] == "helper"
    text = cli("threads").out.splitlines()
    assert text[0].split()[:4] == ["THREAD", "TURNS", "MSGS", "STATES"]
    assert [line.split()[0] for line in text[1:-1]] == [SHARED, "t-2", "t-1"]


def test_all_lists_every_state_of_a_client(cli: Any) -> None:
    every = cli("threads", "--all", "--json").json()
    assert every["total"] == 15 and len(every["threads"]) == 15
    assert [c["thread"] for c in every["threads"]][:3] == [SHARED] * 3  # thread by thread
    page = cli("threads", "--all", "--offset", "4", "--limit", "3", "--json").json()
    assert [c["id"] for c in page["threads"]] == [c["id"] for c in every["threads"][4:7]]
    sessions = cli("sessions", "--all", "--name", "USER-4", "--json").json()
    assert sessions["total"] == 6 and {s["session"] for s in sessions["sessions"]} == {
        "user-42"}
    assert [s["items"] for s in sessions["sessions"]] == [3, 3, 4, 3, 2, 1]  # newest first


# -- references ------------------------------------------------------------------------------


def test_every_reference_form_names_a_state(cli: Any, three_clients: Written) -> None:
    head = three_clients.agents["assistant"]
    listed = cli("agents").out.splitlines()
    short = next(line.split()[0] for line in listed if " assistant " in line)
    assert head.startswith(short) and len(short) < len(head)
    for ref in ("agent:assistant", "assistant", head, short, head[:-4].upper()):
        assert cli("show", ref, "--json").json()["id"] == head, ref
    thread = cli("show", "thread:t-1", "--json").json()
    assert thread["kind"] == "checkpoint" and thread["thread"] == "t-1"
    assert cli("show", "t-1", "--json").json()["id"] == thread["id"]
    assert cli("show", thread["id"], "--json").json()["id"] == thread["id"]
    session = cli("show", "session:user-42", "--json").json()
    assert session["kind"] == "session_state" and session["session"] == "user-42"
    assert cli("show", session["id"][:-3], "--json").json()["id"] == session["id"]


def test_ambiguous_and_unknown_references_name_what_they_match(
        cli: Any, three_clients: Written) -> None:
    both = cli("show", SHARED)
    assert both.code == 2 and both.err.count("\n") == 1
    assert f"thread:{SHARED}" in both.err and f"session:{SHARED}" in both.err
    # Two agent states whose ids share a prefix: the prefix names both, with their kind.
    # (UUIDv7 ids made seconds apart share their first 4 hex digits for 50 days at a time.)
    a, b = three_clients.first_agent_state, three_clients.agents["assistant"]
    common = a[:next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)]
    clash = cli("show", common)
    assert clash.code == 2 and "is ambiguous" in clash.err and "agent 'assistant'" in clash.err
    missing = cli("show", "thread:nope")
    assert missing.code == 1 and "no thread 'nope'" in missing.err
    assert cli("show", "ffffffff-ffff").code == 1
    assert cli("show", "agent:").code == 2  # a name is needed after the colon


# -- show / log for each client --------------------------------------------------------------


def test_show_prints_each_clients_conversation(cli: Any) -> None:
    thread = cli("show", "thread:t-1", "--json").json()
    assert [(m["role"], m["text"]) for m in thread["conversation"]][:2] == [
        ("human", "t-1 turn 0"), ("ai", "Echo: t-1 turn 0")]
    assert thread["messages"] == 6 and thread["channels"][0]["name"] == "messages"
    # A LangGraph value is shown as data: its class named, never constructed.
    assert thread["conversation"][0]["value"]["cls"].endswith("HumanMessage")
    session = cli("show", "session:user-42", "--json").json()
    assert [b["name"] for b in session["branches"]] == ["main", "retry"]
    assert [(i["role"], i["text"]) for i in session["conversation"]] == [
        ("user", "user-42 asks 0"), ("assistant", "Reply 0"), ("user", "user-42 asks 1")]
    text = cli("show", "session:user-42").out
    assert "branches       main (3 items), retry (2 items)" in text
    assert "[3] user\n    user-42 asks 1" in text
    agent = cli("show", "agent:assistant").out
    assert "system prompt:\n    Be nice." in agent and "[6] assistant" in agent


def test_log_says_what_each_state_added_for_every_client(cli: Any) -> None:
    thread = cli("log", "thread:t-1", "--json").json()["lineage"]
    assert len(thread) == 9  # every checkpoint of the thread, newest first
    added = [[m["text"] for m in e["added"]] for e in thread]
    assert added[:3] == [["Echo: t-1 turn 2"], ["t-1 turn 2"], []]
    assert [e["step"] for e in thread] == list(range(7, -2, -1))
    session = cli("log", "session:user-42", "--json").json()["lineage"]
    assert [e["items"] for e in session] == [3, 3, 4, 3, 2, 1]
    assert session[1]["added"] is None and session[1]["removed"] == 1  # the pop
    one = cli("log", "--oneline", "-n", "3", "session:user-42").out.splitlines()
    assert len(one) == 3 and "(branch retry made)" in one[0] and "(removed 1 item)" in one[1]
    assert one[2].endswith("assistant: Reply 1")
    agent = cli("log", "agent:helper").out
    assert agent.index("user: Help me") < agent.index("(created)")


# -- audits ----------------------------------------------------------------------------------


def test_stats_count_every_clients_content(cli: Any, three_clients: Written) -> None:
    stats = cli("stats", "--json").json()
    assert stats["states_by_kind"] | {"agent_state": 6, "checkpoint": 15,
                                      "session_state": 10} == stats["states_by_kind"]
    assert stats["agents"] == 6
    # The logical size, computed here the long way: every state's refs, a chain by reading
    # its elements (not the node's counters the store sums).
    assert stats["logical_bytes"] == asyncio.run(_logical(three_clients.dsn))
    assert stats["saved_bytes"] == stats["logical_bytes"] - stats["payload_bytes"] > 0
    text = cli("stats").out
    assert "checkpoints" in text and "session states" in text and "sharing saves" in text


async def _logical(dsn: str) -> int:
    total = 0
    async with await immagent.Store.connect(dsn) as store:
        rows = await store.scan_states(None, limit=10_000)
        for row in rows:
            if row.kind == Kind.COMPRESSION:
                continue
            for asset in await store.get_assets(list(row.refs)):
                if isinstance(asset, ConversationNode):
                    elements = await store.get_chain(asset.digest, int(asset.kind))
                    total += sum(len(e.body) for e in elements)
                else:
                    total += len(asset.body)
    return total


def test_export_verify_and_import_a_thread_and_a_session(
        cli: Any, tmp_path: Path, three_clients: Written) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for ref, what, listing in (("thread:t-1", "t-1", "threads"),
                               ("session:user-42", "user-42", "sessions")):
        bundle = str(tmp_path / f"{what}.bundle")
        exported = cli("export", ref, bundle, "--json").json()
        checked = cli("verify-bundle", bundle, "--json").json()
        assert checked["asset_bytes"] == exported["asset_bytes"] > 0
        assert cli("verify", ref).code == 0
        imported = cli("import", bundle, "--json", db=other).json()
        assert imported["ref"] == f"{listing[:-1]}:{what}"
        back = cli(listing, "--json", db=other).json()[listing]
        original = cli(listing, "--json").json()[listing]
        assert [h for h in back if h["ref"] == f"{listing[:-1]}:{what}"] == \
            [h for h in original if h["ref"] == f"{listing[:-1]}:{what}"]
    # The thread's bundle holds every checkpoint and write: a set of states, not a lineage.
    thread = cli("verify-bundle", str(tmp_path / "t-1.bundle"), "--json").json()
    assert (thread["version"], thread["lineage"]) == (FORMAT_VERSION, False)


def test_export_and_verify_of_one_state_count_the_same_bytes(
        cli: Any, tmp_path: Path, three_clients: Written) -> None:
    # The long message is stored compressed: both count it uncompressed (content bytes).
    head = three_clients.agents["assistant"]
    exported = cli("export", head, str(tmp_path / "a.bundle"), "--json").json()
    verified = cli("verify", head, "--json").json()
    assert exported["asset_bytes"] == verified["bytes_checked"] > len(LONG)
    lines = cli("verify", head).out.splitlines()
    # The prompt; 4 nodes (the empty one and a node a turn) holding the 6 messages.
    assert lines[0].startswith(f"verified state {head} (agent 'assistant'): 1 asset and "
                               "4 chain nodes (")
    assert lines[-1] == "OK"


def test_delete_a_whole_thread_and_a_session_after_a_dry_run(cli: Any, private: str) -> None:
    planned = cli("delete", "thread:t-2", "--dry-run", "--json", db=private).json()
    assert planned["dry_run"] is True and len(planned["delete"]) == 5  # 3 checkpoints, 2 writes
    assert len(cli("threads", "--json", db=private).json()["threads"]) == 3  # nothing gone
    refused = cli("delete", "thread:t-2", db=private)
    assert refused.code == 2 and "--yes" in refused.err
    gone = cli("delete", "thread:t-2", "--yes", "--json", db=private).json()["deleted"]
    assert sorted(gone) == sorted(planned["delete"])
    assert {t["thread"] for t in cli("threads", "--json", db=private).json()["threads"]} == {
        "t-1", SHARED}
    assert len(cli("delete", "session:user-7", "--yes", "--json", db=private).json()[
        "deleted"]) == 2
    with_lineage = cli("delete", "--lineage", "session:user-42", db=private)
    assert with_lineage.code == 2 and "--lineage takes a state id" in with_lineage.err
    # gc: the dry run says what the real one removes; afterwards the store verifies.
    dry = cli("gc", "--dry-run", "--json", db=private).json()
    assert dry["assets_removed"] > 0
    real = cli("gc", "--yes", "--json", db=private).json()
    assert real["assets_removed"] == dry["assets_removed"]
    assert cli("verify", db=private).code == 0


# -- --json through a pipe -------------------------------------------------------------------


def test_json_errors_are_json_on_stderr_with_the_same_exit_codes(
        cli: Any, three_clients: Written) -> None:
    db = three_clients.dsn
    cases = [(["show", "thread:nope"], 1), (["show", SHARED], 2), (["frobnicate"], 2),
             (["agents", "--limit", "0"], 2), (["delete", "thread:t-1"], 2)]
    for args, code in cases:
        plain = cli(*args)  # in-process: the same code path as the script's
        as_json = piped("--db", db, "--json", *args)
        assert plain.code == as_json.code == code, (args, plain, as_json)
        assert as_json.out == ""
        error = json.loads(as_json.err)["error"]
        assert error["exit_code"] == code and error["message"] in plain.err, (args, error)
    ok = piped("--db", db, "--json", "threads")
    assert ok.code == 0 and json.loads(ok.out)["total"] == 3 and ok.err == ""


# -- the fourth client: pydantic-ai conversations --------------------------------------------


def test_pydantic_ai_conversations_are_listed_shown_and_deleted(
        store_dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/pydantic_ai_conversations.py (the real pydantic-ai, offline): two turns, a
    title, a fork; then the command line on the store it wrote, on each backend."""
    from tests.conftest import example

    monkeypatch.chdir(tmp_path)  # the example writes a bundle beside a DSN without "://"
    with example("pydantic_ai_conversations") as demo:
        asyncio.run(demo.demo(store_dsn))
    capsys.readouterr()

    def cli(*args: str) -> Result:
        code = main(["--db", store_dsn, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    rows = cli("conversations", "--json").json()["conversations"]
    assert [(r["conversation"], r["turns"], r["messages"]) for r in rows] == [
        ("support-1-retry", 2, 4), ("support-1", 2, 4)]
    shown = cli("show", "conversation:support-1", "--json").json()
    assert shown["title"] == "Printer trouble" and shown["scope"] == "user-42"
    assert [(m["role"], m["text"]) for m in shown["conversation"]][:2] == [
        ("user", "My printer is jammed."),
        ("assistant", "Answer #1: have you tried turning it off and on again?")]
    assert "forked from         support-1" in cli("show", "support-1-retry").out
    assert cli("verify", "conversation:support-1-retry").code == 0
    gone = cli("delete", "conversation:support-1-retry", "--yes", "--json").json()["deleted"]
    assert len(gone) == 3  # its two states and its scope entry
    assert [r["conversation"] for r in cli("conversations", "--json").json()[
        "conversations"]] == ["support-1"]
    assert cli("gc", "--yes").code == 0 and cli("verify").code == 0


# -- how each client's elements read, tool calls and results included -----------------------


def test_each_clients_tool_calls_and_results_read_alike() -> None:
    """A reply with text and a call, and the call's result, as each client stores them: the
    calls read ``[calls name(args)]`` after the text, a result's role names its call."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from immagent.assets import Entry, Item, Message, ToolCall, Value
    from immagent.cli.clients import VIEWS

    def read(kind: Kind, element: Any) -> tuple[str, str, bool]:
        said = VIEWS[kind].said(element)
        return said.role, said.text, said.turn

    agent = [Message(role="assistant", content="Adding.",
                     tool_calls=(ToolCall("c1", "add", '{"a": 1}'),)),
             Message(role="tool", content="3", tool_call_id="c1", is_error=True)]
    assert [read(Kind.AGENT_STATE, m) for m in agent] == [
        ("assistant", 'Adding. [calls add({"a": 1})]', False), ("tool error c1", "3", False)]
    serde = JsonPlusSerializer()
    thread = [Value(*serde.dumps_typed(AIMessage(
                  content="Adding.", tool_calls=[{"name": "add", "args": {"a": 1},
                                                  "id": "c1"}]))),
              Value(*serde.dumps_typed(ToolMessage(content="3", tool_call_id="c1")))]
    assert [read(Kind.CHECKPOINT, v) for v in thread] == [
        ("ai", 'Adding. [calls add({"a": 1})]', False), ("tool c1", "3", False)]
    session = [Item.of({"type": "function_call", "name": "add", "arguments": '{"a": 1}',
                        "call_id": "c1"}),
               Item.of({"type": "function_call_output", "call_id": "c1", "output": "3"})]
    assert [read(Kind.SESSION_STATE, i) for i in session] == [
        ("assistant", '[calls add({"a": 1})]', False), ("tool c1", "3", False)]
    conversation = [
        Entry.of("e1", json.dumps({"kind": "response", "parts": [
            {"part_kind": "text", "content": "Adding."},
            {"part_kind": "tool-call", "tool_name": "add", "args": {"a": 1},
             "tool_call_id": "c1"}]}).encode()),
        Entry.of("e2", json.dumps({"kind": "request", "parts": [
            {"part_kind": "tool-return", "tool_name": "add", "content": "3",
             "tool_call_id": "c1"}]}).encode())]
    assert [read(Kind.CONVERSATION_STATE, e) for e in conversation] == [
        ("assistant", 'Adding.\n[calls add({"a": 1})]', False), ("tool c1", "3", False)]
