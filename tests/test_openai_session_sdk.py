"""ImmAgentSession beside the SDK's own sessions: the SDK's base class and spellings (default
database, sync ``with``, awaitable ``close``, the errors SDK callers catch, a logger that is
used), AdvancedSQLiteSession's usage, turn and search methods, session listing per owner,
and compaction by the SDK's own OpenAIResponsesCompactionSession (offline: a local stand-in
for the OpenAI client's ``responses.compact``) that keeps every replaced item in a state.
Both backends wherever a store is involved."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, SQLiteSession
from agents.memory import OpenAIResponsesCompactionSession
from agents.memory.session import SessionABC
from agents.testing import ScriptedModel, assistant_message
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from immagent import (
    ImmAgentError,
    SessionClosedError,
    Store,
    StoreClosedError,
    UnsupportedTypeError,
    ValidationError,
    verify_bundle,
)
from immagent.integrations.openai_agents import ImmAgentSession

NO_TRACING = RunConfig(tracing_disabled=True)


def user(text: object) -> Any:  # a TResponseInputItem (a TypedDict union)
    return {"role": "user", "content": text}


def answer(text: str) -> Any:
    return {"role": "assistant", "type": "message",
            "content": [{"type": "output_text", "text": text}]}


def turn(i: int, tag: str = "") -> list[Any]:
    return [user(f"q{i}{tag}"), answer(f"a{i}{tag}")]


def run_result(requests: int, tokens: tuple[int, int], cached: int = 0) -> Any:
    """What store_run_usage reads of a RunResult: its context's token usage."""
    given, taken = tokens
    usage = Usage(requests=requests, input_tokens=given, output_tokens=taken,
                  total_tokens=given + taken,
                  input_tokens_details=InputTokensDetails.model_validate(
                      {"cached_tokens": cached, "cache_write_tokens": 0}),
                  output_tokens_details=OutputTokensDetails(reasoning_tokens=1))
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=usage))


# -- the SDK's base class and spellings ----------------------------------------------------


async def test_a_session_abc_with_a_private_in_memory_default() -> None:
    first, second = ImmAgentSession("same-id"), ImmAgentSession("same-id", ":memory:")
    try:
        assert isinstance(first, SessionABC)
        await first.add_items([user("only in the first")])
        assert await first.get_items() == [user("only in the first")]
        assert await second.get_items() == []  # each default store is its own, like :memory:
        fork = await first.fork("forked")  # a fork shares its source's private store
        assert await fork.get_items() == [user("only in the first")]
        assert [s.session_id for s in await first.list_sessions()] == ["forked", "same-id"]
        fork.close()
    finally:
        first.close()
        second.close()


async def test_sync_with_and_close_in_both_spellings(tmp_path: Path) -> None:
    with ImmAgentSession("sync-with", tmp_path / "s.db") as session:
        await session.add_items([user("x")])
    with pytest.raises(SessionClosedError):
        await session.get_items()
    awaited = ImmAgentSession("awaited", tmp_path / "s.db")
    assert await awaited.get_items() == []
    await awaited.close()  # as AsyncSQLiteSession's
    await awaited.close()  # idempotent
    assert not any(t.name == "immagent-session" for t in threading.enumerate())
    plain = ImmAgentSession("plain", tmp_path / "s.db")
    await plain.add_items([user("y")])
    plain.close()  # as SQLiteSession's: done when it returns
    assert not any(t.name == "immagent-session" for t in threading.enumerate())


async def test_a_closed_session_raises_what_sdk_callers_catch(store: Store) -> None:
    session = ImmAgentSession("closed", store)
    session.close()
    for call in (session.get_items(), session.add_items([user("y")]),
                 session.add_items([]), session.pop_item(), session.clear_session()):
        with pytest.raises(RuntimeError) as err:
            await call
        assert isinstance(err.value, StoreClosedError) and isinstance(err.value, ImmAgentError)
    sdk = SQLiteSession("closed")
    sdk.close()
    with pytest.raises(RuntimeError):  # the same except clause catches the SDK's own
        await sdk.add_items([user("y")])


@pytest.mark.parametrize("bad", [{1, 2}, b"bytes", object(), {1: "int key"},
                                 {("tuple", "key"): 1}])
async def test_a_non_json_item_is_a_type_error(store: Store, bad: object) -> None:
    session = ImmAgentSession("types", store)
    with pytest.raises(TypeError) as err:
        await session.add_items([user("fine"), user(bad)])
    assert isinstance(err.value, UnsupportedTypeError) and isinstance(err.value,
                                                                      ValidationError)
    assert err.value.field.startswith("items[1]")
    assert await session.get_items() == []
    sdk = SQLiteSession("types")
    try:
        if not isinstance(bad, dict) or not isinstance(next(iter(bad)), int):
            with pytest.raises(TypeError):  # json.dumps turns int keys into str, no error
                await sdk.add_items([user(bad)])
    finally:
        sdk.close()
    with pytest.raises(ValueError):  # a value of a JSON type that JSON cannot carry
        await session.add_items([user(float("nan"))])


async def test_reading_a_deleted_branch_returns_nothing(store: Store) -> None:
    session = ImmAgentSession("deleted-branch", store)
    for i in range(3):
        await session.add_items(turn(i))
    await session.create_branch_from_turn(2, "side")
    await session.switch_to_branch("main")
    await session.delete_branch("side")
    assert await session.get_items(branch_id="side") == []
    assert await session.get_items(branch_id="never-made") == []
    other = ImmAgentSession("deleted-branch", store)
    await other.switch_to_branch("main")
    await session.create_branch_from_turn(3, "gone-under-me")
    await other.delete_branch("gone-under-me")
    assert await session.get_items() == []  # its own branch, deleted by another object
    with pytest.raises(ValidationError):
        await session.add_items([user("a write never recreates it")])


async def test_the_logger_is_used(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    mine = logging.getLogger("test.sessions.mine")
    session = ImmAgentSession("logged", store, logger=mine)
    with caplog.at_level(logging.DEBUG, logger="test.sessions.mine"):
        await session.add_items(turn(0))
        await session.create_branch_from_turn(1, "b")
        await session.switch_to_branch("main")
        await session.delete_branch("b")
    records = [r for r in caplog.records if r.name == "test.sessions.mine"]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG, logging.INFO]
    assert "deleted branch 'b'" in records[-1].getMessage()
    with pytest.raises(ValidationError) as err:
        ImmAgentSession("logged", store, logger="not a logger")
    assert err.value.field == "logger"


# -- AdvancedSQLiteSession's usage, turns and search ---------------------------------------


async def test_usage_per_turn_as_the_advanced_session_keeps_it(store: Store) -> None:
    session = ImmAgentSession("usage", store)
    await session.store_run_usage(run_result(1, (5, 5)))  # no turn yet: nothing recorded
    assert await session.get_session_usage() is None and await session.list_states() == []
    await session.add_items(turn(0))
    await session.store_run_usage(run_result(1, (50, 30), cached=10))
    await session.add_items(turn(1))
    await session.store_run_usage(run_result(9, (9, 9)))
    await session.store_run_usage(run_result(2, (75, 45), cached=20))  # turn 2 again: replaced
    assert await session.get_session_usage() == {
        "requests": 3, "input_tokens": 125, "output_tokens": 75, "total_tokens": 200,
        "total_turns": 2}
    one = await session.get_turn_usage(1)
    assert isinstance(one, dict) and one["total_tokens"] == 80
    assert one["input_tokens_details"]["cached_tokens"] == 10
    assert one["output_tokens_details"] == {"reasoning_tokens": 1}
    every = await session.get_turn_usage()
    assert isinstance(every, list)
    assert [(u["user_turn_number"], u["requests"]) for u in every] == [(1, 1), (2, 2)]
    assert await session.get_turn_usage(7) == {}
    # A new branch starts without usage; usage recorded there is its own.
    await session.create_branch_from_turn(2, "alt")
    assert await session.get_turn_usage() == []
    await session.add_items(turn(1, "-alt"))
    await session.store_run_usage(run_result(4, (1, 1)))
    assert await session.get_session_usage(branch_id="alt") == {
        "requests": 4, "input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
        "total_turns": 1}
    assert (await session.get_session_usage() or {})["requests"] == 7  # every branch
    # Popping a turn's answer keeps its usage; popping its question drops it.
    await session.switch_to_branch("main")
    assert await session.pop_item() == answer("a1")
    assert len(await session.get_turn_usage()) == 2
    assert await session.pop_item() == user("q1")
    assert [u["user_turn_number"] for u in await session.get_turn_usage()] == [1]  # type: ignore[index]
    await session.clear_session()
    assert await session.get_session_usage() is None
    # Every record stays in the earlier states, verifiable.
    assert (await store.verify()).ok


async def test_store_run_usage_never_fails_a_run(store: Store,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    session = ImmAgentSession("usage-errors", store)
    await session.add_items(turn(0))
    session.close()
    with caplog.at_level(logging.ERROR, logger="immagent.sessions"):
        await session.store_run_usage(run_result(1, (1, 1)))
    assert "failed to store run usage" in caplog.text and "SessionClosedError" in caplog.text


async def test_turns_search_and_branch_from_content(store: Store) -> None:
    session = ImmAgentSession("search", store)
    parts: Any = [{"type": "input_text", "text": "and ROME too"},
                  {"type": "input_image", "image_url": "x"}]
    await session.add_items([user("Plan a trip to Paris"), answer("ok"), user(parts),
                             answer("fine"), user("café ß 100%_done " + "x" * 120)])
    turns = await session.get_conversation_turns()
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["content"] == "Plan a trip to Paris" and turns[0]["can_branch"]
    assert turns[2]["content"].endswith("...") and len(turns[2]["content"]) == 103
    assert turns[2]["full_content"].endswith("x" * 120)
    assert "timestamp" in turns[0]
    assert [t["turn"] for t in await session.find_turns_by_content("rome")] == [2]
    assert [t["turn"] for t in await session.find_turns_by_content("PARIS")] == [1]
    assert [t["turn"] for t in await session.find_turns_by_content("100%_")] == [3]
    assert await session.find_turns_by_content("CAFÉ") == []  # ASCII-only folding, as SQLite's
    assert await session.find_turns_by_content("input_image") == []  # text only, not JSON
    name = await session.create_branch_from_content("rome", "from-rome")
    assert name == "from-rome" and await session.get_items() == [user("Plan a trip to Paris"),
                                                                  answer("ok")]
    with pytest.raises(ValueError):
        await session.create_branch_from_content("nowhere")
    assert await session.get_conversation_turns(branch_id="main") == turns


# -- sessions per owner --------------------------------------------------------------------


async def test_list_sessions_per_owner(store: Store) -> None:
    alice = ImmAgentSession("a-1", store, owner="alice")
    await alice.add_items(turn(0))
    await alice.add_items(turn(1))
    await ImmAgentSession("a-2", store, owner="alice").add_items(turn(0))
    await ImmAgentSession("b-1", store, owner="bob").add_items(turn(0))
    await ImmAgentSession("nobody", store).add_items(turn(0))
    await alice.fork("a-1-fork")  # a fork belongs to its source's owner
    listed = await alice.list_sessions()
    assert [(s.session_id, s.owner, s.states) for s in listed] == [
        ("a-1", "alice", 2), ("a-1-fork", "alice", 1), ("a-2", "alice", 1),
        ("b-1", "bob", 1), ("nobody", None, 1)]
    assert [s.session_id for s in await alice.list_sessions(owner="bob")] == ["b-1"]
    assert listed[0].created_at <= listed[0].updated_at == listed[0].newest.created_at
    # Every later state keeps the owner; another owner's object may not write.
    await ImmAgentSession("a-1", store).add_items([user("anyone may write unowned")])
    assert (await alice.current_state()).owner == "alice"  # type: ignore[union-attr]
    with pytest.raises(ValidationError) as err:
        await ImmAgentSession("a-1", store, owner="mallory").add_items([user("mine now")])
    assert err.value.field == "owner"


# -- compaction by the SDK's own compaction session ----------------------------------------


class Compactor:
    """Stands in for the OpenAI client: ``responses.compact`` returns a fixed summary and
    records what it was asked to compact (the SDK's compaction code is the real one)."""

    def __init__(self, summary: list[Any]) -> None:
        self.summary = summary
        self.inputs: list[Any] = []
        self.responses = self

    async def compact(self, **kwargs: Any) -> Any:
        self.inputs.append(kwargs.get("input"))
        return SimpleNamespace(output=list(self.summary), usage=None)


SUMMARY: list[Any] = [{"type": "compaction", "id": "cmp_1",
                       "encrypted_content": "summary of it all"}]


async def test_compaction_is_one_more_state_and_loses_nothing(
        store: Store, tmp_path: Path) -> None:
    session = ImmAgentSession("compacted", store)
    for i in range(6):
        await session.add_items(turn(i))
    await session.create_branch_from_turn(3, "kept-branch")
    await session.switch_to_branch("main")
    before = await session.get_items()
    states_before = await session.list_states()
    client = Compactor(SUMMARY)
    compaction = OpenAIResponsesCompactionSession(
        "compacted", session, client=client, model="gpt-4.1")  # type: ignore[arg-type]
    await compaction.run_compaction({"force": True})
    assert client.inputs == [before]  # the SDK compacted the whole history it read
    assert await session.get_items() == SUMMARY
    states = await session.list_states()
    assert len(states) == len(states_before) + 1  # one state: no clear, then no re-add
    compaction_state = states[0]
    assert compaction_state.parent_id == states_before[0].id
    assert await session.get_state_items(compaction_state.parent_id) == before
    assert [b.name for b in compaction_state.branches] == ["main", "kept-branch"]
    assert await session.get_items(branch_id="kept-branch") == [*turn(0), *turn(1)]
    info = await session.export(tmp_path / "compacted.bundle")
    assert verify_bundle(info.path).head == compaction_state.id
    assert (await store.verify()).ok
    async with await Store.connect(f"sqlite:///{tmp_path / 'elsewhere.db'}") as other:
        await other.init_schema()
        await other.import_states(info.path)
        there = ImmAgentSession("compacted", other)
        assert await there.get_items() == SUMMARY
        assert await there.get_state_items(compaction_state.parent_id) == before


async def test_automatic_compaction_during_a_run_replaces_a_suffix_in_one_state(
        store: Store) -> None:
    session = ImmAgentSession("auto", store, session_settings={"limit": 4})
    for i in range(3):
        await session.add_items(turn(i))
    client = Compactor(SUMMARY)
    compaction = OpenAIResponsesCompactionSession(
        "auto", session, client=client, model="gpt-4.1",  # type: ignore[arg-type]
        compaction_mode="input", should_trigger_compaction=lambda _: True)
    model = ScriptedModel([[assistant_message("done", item_id="msg_done")]])
    agent = Agent(name="worker", model=model)
    config = RunConfig(tracing_disabled=True, session_settings={"limit": 1})
    await Runner.run(agent, "continue", session=compaction, run_config=config)
    states = await session.list_states()
    assert len(client.inputs) == 1
    compacted = client.inputs[0]
    assert compacted[0] == user("continue")  # the model saw only the suffix: it was compacted
    items = await session.get_items(limit=-1)
    assert items == [*turn(0), *turn(1), *turn(2), *SUMMARY]  # the prefix is kept as it was
    before = await session.get_state_items(states[0].parent_id, limit=-1)  # type: ignore[arg-type]
    assert before[:6] == items[:6] and before[6] == user("continue") and len(before) == 8
    assert states[1].id == states[0].parent_id  # the run's own writes, then one compaction


async def test_a_stale_snapshot_replaces_nothing(store: Store) -> None:
    session = ImmAgentSession("stale", store)
    await session.add_items(turn(0))
    snapshot = await session._get_compaction_snapshot(10)
    assert snapshot is not None and snapshot.complete and snapshot.items == turn(0)
    await ImmAgentSession("stale", store).add_items([user("newer")])
    assert not await snapshot.replace_suffix(0, SUMMARY)
    assert await session.get_items() == [*turn(0), user("newer")]
    fresh = await session._get_compaction_snapshot(2)
    assert fresh is not None and not fresh.complete and fresh.items == [answer("a0"),
                                                                          user("newer")]
    assert await fresh.replace_suffix(1, SUMMARY)
    assert await session.get_items() == [*turn(0), *SUMMARY]
    assert not await fresh.replace_suffix(2, SUMMARY)  # nothing left to replace


async def test_compaction_keeps_usage_of_kept_turns_only(store: Store) -> None:
    session = ImmAgentSession("usage-compacted", store)
    for i in range(3):
        await session.add_items(turn(i))
        await session.store_run_usage(run_result(1, (i, i)))
    snapshot = await session._get_compaction_snapshot(3)
    assert snapshot is not None
    assert await snapshot.replace_suffix(1, SUMMARY)  # replaces turn 3 (q2, a2)
    assert [u["user_turn_number"] for u in await session.get_turn_usage()] == [1, 2]  # type: ignore[index]
    assert await session._atomic_replace_items(SUMMARY)
    assert await session.get_turn_usage() == []
    states = await session.list_states()
    assert await session.get_state_items(states[2]) == [*turn(0), *turn(1), *turn(2)]


def test_owner_and_session_id_rules() -> None:
    with pytest.raises(ValidationError):
        ImmAgentSession("x", owner=" ")
    with pytest.raises(ValidationError):
        ImmAgentSession("x", "mysql://nope")


async def test_compaction_from_another_thread_loop(tmp_path: Path) -> None:
    session = ImmAgentSession("threaded-compaction", tmp_path / "t.db")
    try:
        await session.add_items(turn(0))

        def compact() -> None:
            compaction = OpenAIResponsesCompactionSession(
                "threaded-compaction", session, client=Compactor(SUMMARY),  # type: ignore[arg-type]
                model="gpt-4.1")
            asyncio.run(compaction.run_compaction({"force": True}))

        await asyncio.to_thread(compact)
        assert await session.get_items() == SUMMARY
    finally:
        await session.close()


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### OpenAI Agents SDK", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["Hello!", "Bye."]
    assert "'turn': 2" in lines[2] and "'full_content': 'Bye!'" in lines[2]
    assert lines[3] == "[{'content': 'Summary: said hi.', 'role': 'user'}]"
    assert lines[4].count("'role': 'user'") == 2 and "Hello!" in lines[4]  # before the pop
    assert lines[5] == "['user-42', 'user-42-retry']"
    assert (tmp_path / "sessions.db").exists()


async def test_a_snapshot_that_prunes_expired_items_keeps_them_in_the_state_before(
        store: Store) -> None:
    session = ImmAgentSession("pruned", store)
    await session.add_items([user("expired 1"), user("expired 2"), *turn(0), *turn(1)])
    snapshot = await session._get_compaction_snapshot(
        2, prune_prefix=lambda item: str(item.get("content")).startswith("expired"))
    assert snapshot is not None and snapshot.items == turn(1)
    assert await snapshot.replace_suffix(0, SUMMARY)
    assert await session.get_items() == [*turn(0), *SUMMARY]  # the expired prefix is gone
    newest = await session.current_state()
    assert newest is not None and newest.parent_id is not None
    assert await session.get_state_items(newest.parent_id) == [
        user("expired 1"), user("expired 2"), *turn(0), *turn(1)]  # and kept before it
