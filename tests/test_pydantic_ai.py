"""ImmAgentConversationStore as pydantic-ai's conversation stores promise to behave, beside
pydantic-ai's own InMemoryConversationStore in the same tests, on PostgreSQL and SQLite,
over a shared Store and over a store it opens from a DSN; then with the real Agent and
pydantic-ai's offline models (TestModel, FunctionModel); then what only an immutable,
content-addressed store gives: every state kept, forks sharing their entries, conflicts
caught by the stream's head, bundles, verify and gc without pydantic-ai installed."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
    InMemoryConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.tools import DeferredToolRequests

import immagent
from immagent import ImmAgentError, IntegrityError, Store, StoreClosedError, ValidationError
from immagent.assets import NODE_KINDS, Kind
from immagent.integrations.pydantic_ai import (
    ImmAgentConversationConflict,
    ImmAgentConversationStore,
)
from tests.conftest import count_rows, raw_sql, stored_elements

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pydantic_ai_conversations.py"
Make = Callable[..., ImmAgentConversationStore]


def states(dsn: str, kind: Kind = Kind.CONVERSATION_STATE) -> int:
    return count_rows(dsn, "immagent_states", f"kind = {int(kind)}")


def assets(dsn: str, kind: Kind) -> int:
    """Links stored (chain node rows), or entries stored (held by links or on their own)."""
    if kind in NODE_KINDS:
        return count_rows(dsn, "immagent_nodes", f"kind = {int(kind)}")
    return stored_elements(dsn, kind)


@pytest.fixture(params=["shared", "owned"])
async def make(request: pytest.FixtureRequest, store: Store,
               store_dsn: str) -> AsyncIterator[Make]:
    """Conversation stores over the test's Store (shared) or each over its own store
    opened from the DSN (owned: a private event loop in a thread)."""
    made: list[ImmAgentConversationStore] = []

    def factory() -> ImmAgentConversationStore:
        made.append(ImmAgentConversationStore(store if request.param == "shared"
                                              else store_dsn))
        return made[-1]

    yield factory
    for s in made:
        await s.aclose()


@pytest.fixture
def shared(store: Store) -> Make:
    """Conversation stores over the test's Store only (what does not depend on where it
    runs)."""
    return lambda: ImmAgentConversationStore(store)


@pytest.fixture(params=["reference", "immagent"])
def beside(request: pytest.FixtureRequest, shared: Make) -> Callable[[], ConversationStore]:
    """pydantic-ai's InMemoryConversationStore, or ours: the same test must pass on both.
    (The reference keeps one dict per object, so "another object" is the same one.)"""
    if request.param == "reference":
        reference = InMemoryConversationStore()
        return lambda: reference
    return shared


async def chat(store: ConversationStore, cid: str, *prompts: str, scope: str | None = None,
               agent: Agent[None, Any] | None = None) -> Conversation:
    """Load (or start) ``cid``, run a turn per prompt, save after each; the conversation."""
    agent = agent or Agent(TestModel())
    conversation = await store.load(cid, scope=scope) or Conversation(conversation_id=cid)
    for prompt in prompts:
        result = await agent.run(prompt, conversation=conversation)
        await store.save(result, scope=scope)
        conversation = result.conversation
    return conversation


def texts(messages: list[ModelMessage]) -> list[str]:
    """What each message says (user prompts and text replies), for comparisons."""
    out = []
    for message in messages:
        for part in message.parts:
            if isinstance(part, UserPromptPart | TextPart):
                out.append(str(part.content))
    return out


# -- pydantic-ai's contract, beside its own in-memory store ---------------------------------


async def test_load_run_save_round_trip(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    assert await store.load("c1") is None
    conversation = await chat(store, "c1", "hello", "and again")
    loaded = await store.load("c1")
    assert loaded is not None
    assert loaded.messages == conversation.messages and len(loaded.messages) == 4
    assert loaded.usage == conversation.usage and loaded.usage.requests == 2
    assert loaded.revision == conversation.revision is not None
    assert loaded.new_message_index == 4
    entries = await beside().load_entries("c1")
    assert entries is not None and [e.message for e in entries] == loaded.messages
    assert [e.parent_id for e in entries] == [None, *(e.id for e in entries[:-1])]
    empty = await store.load("c1", limit=0)
    assert empty is not None and empty.messages == [] and empty.revision == loaded.revision
    window = await store.load("c1", limit=3)
    assert window is not None and window.messages == loaded.messages[-3:]


async def test_a_save_adds_only_what_is_new(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    agent = Agent(TestModel())
    first = await agent.run("one", conversation=Conversation(conversation_id="grow"))
    assert len(await store.save(first)) == 2
    assert await store.save(first) == []  # nothing new: nothing stored
    second = await agent.run("two", conversation=first.conversation)
    saved = await store.save(second)
    assert len(saved) == 2 and saved[0].parent_id == (await store.load_entries("grow") or [])[1].id


async def test_two_writers_one_wins(beside: Callable[[], ConversationStore]) -> None:
    await chat(beside(), "race", "start")
    a, b = beside(), beside()
    mine, theirs = await a.load("race"), await b.load("race")
    assert mine is not None and theirs is not None and mine.revision == theirs.revision
    agent = Agent(TestModel())
    await a.save(await agent.run("mine", conversation=mine))
    with pytest.raises(ConversationConflict):
        await b.save(await agent.run("theirs", conversation=theirs))
    loaded = await beside().load("race")
    assert loaded is not None and texts(loaded.messages)[2] == "mine" and len(loaded.messages) == 4


async def test_creating_an_existing_conversation_conflicts(
        beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "taken", "first")
    agent = Agent(TestModel())
    fresh = await agent.run("second", conversation=Conversation(conversation_id="taken"))
    with pytest.raises(ConversationConflict):
        await store.save(fresh)


async def test_branch_and_branch_back(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "b", "one", "two")
    loaded = await store.load("b")
    assert loaded is not None
    left = (await store.load_entries("b") or [])[-1].id
    branched = await store.branch("b", at=2, expected_revision=loaded.revision)
    assert texts(branched.messages) == texts(loaded.messages)[:2]
    result = await Agent(TestModel()).run("two, again", conversation=branched)
    await store.save(result)
    record = await store.read_record("b")
    assert record is not None and record.branches == [left]
    now = await store.load("b")
    assert now is not None and texts(now.messages)[2] == "two, again"
    back = await store.branch("b", from_entry=left, expected_revision=now.revision)
    assert texts(back.messages) == texts(loaded.messages)
    record = await store.read_record("b")
    assert record is not None and len(record.branches) == 1 and record.branches != [left]
    with pytest.raises(ConversationConflict):  # a stale revision
        await store.branch("b", at=1, expected_revision=loaded.revision)
    with pytest.raises(UserError):
        await store.branch("b", from_entry="no-such-entry", expected_revision=back.revision)


async def test_fork_keeps_the_source_going(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "src", "one", "two", scope="alice")
    fork = await store.fork("src", at=2, new_conversation_id="fork", scope="bob")
    assert len(fork.messages) == 2
    await chat(store, "fork", "elsewhere", scope="bob")
    await chat(store, "src", "three", scope="alice")
    record = await store.read_record("fork")
    assert record is not None and record.forked_from == "src" and record.scope == "bob"
    source = await store.load("src")
    forked = await store.load("fork")
    assert source is not None and forked is not None
    assert texts(forked.messages) == ["one", *texts(source.messages)[1:2], "elsewhere",
                                      texts(forked.messages)[-1]]
    assert len(source.messages) == 6
    whole = await store.fork("src")  # everything, with its usage
    assert whole.messages == source.messages and whole.usage == source.usage
    with pytest.raises(ConversationConflict):
        await store.fork("src", new_conversation_id="fork")


async def test_scope_isolates_and_lists(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "a1", "hi", scope="alice")
    await chat(store, "b1", "hi", scope="bob")
    await chat(store, "a2", "hi", scope="alice")
    await chat(store, "free", "hi")
    await chat(store, "a1", "more", scope="alice")  # a1 is now the most recently saved
    assert await store.load("a1", scope="bob") is None
    assert await store.load("a1", scope="alice") is not None
    listed = await store.list_conversations(scope="alice")
    assert [r.conversation_id for r in listed] == ["a1", "a2"]
    assert [r.conversation_id for r in await store.list_conversations(scope="alice", limit=1)
            ] == ["a1"]
    everything = [r.conversation_id for r in await store.list_conversations()]
    assert everything[0] == "a1" and sorted(everything) == ["a1", "a2", "b1", "free"]
    assert await store.list_conversations(scope="nobody") == []
    with pytest.raises(UserError):
        await store.list_conversations(limit=-1)
    with pytest.raises(ConversationConflict):  # saving it under another scope
        await chat(store, "a2", "steal", scope="bob")


async def test_update_title_and_metadata(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "t", "hi")
    loaded = await store.load("t")
    assert loaded is not None
    record = await store.update("t", title="Greeting", expected_title=None)
    assert record.title == "Greeting" and record.revision == loaded.revision
    with pytest.raises(ConversationConflict):
        await store.update("t", title="Other", expected_title=None)
    await store.update("t", metadata={"model": "test", "n": [1, 2.5, None]})
    # An update does not change the revision: a save from before it still succeeds and
    # keeps the title and metadata.
    await store.save(await Agent(TestModel()).run("later", conversation=loaded))
    record2 = await store.read_record("t")
    assert record2 is not None and record2.title == "Greeting"
    assert record2.metadata == {"model": "test", "n": [1, 2.5, None]}
    cleared = await store.update("t", title=None)
    assert cleared.title is None
    with pytest.raises(UserError):
        await store.update("missing", title="x")


async def test_delete_and_create_again(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "gone", "hi", scope="alice")
    old = await store.load("gone")
    assert old is not None
    await store.delete("gone", scope="bob")  # another scope: left as it is
    assert await store.load("gone") is not None
    await store.delete("gone")
    assert await store.load("gone") is None
    assert await store.list_conversations(scope="alice") == []
    await store.delete("gone")  # already gone: nothing to do
    again = await chat(store, "gone", "new life")
    assert again.revision != old.revision and len(again.messages) == 2
    with pytest.raises(ConversationConflict):  # a copy loaded before the delete
        await store.save(await Agent(TestModel()).run("stale", conversation=old))


async def test_a_rewritten_history_branches(beside: Callable[[], ConversationStore]) -> None:
    store = beside()
    await chat(store, "rw", "one", "two")
    loaded = await store.load("rw")
    assert loaded is not None
    rewritten = Conversation(conversation_id="rw", revision=loaded.revision,
                             messages=[*loaded.messages[:1],
                                       ModelResponse(parts=[TextPart("summary")])],
                             usage=loaded.usage)
    saved = await store.save(rewritten)
    assert len(saved) == 1  # branches off the first message, which both share
    record = await store.read_record("rw")
    assert record is not None and len(record.branches) == 1
    now = await store.load("rw")
    assert now is not None and texts(now.messages) == ["one", "summary"]


async def test_deferred_tool_requests_are_kept(beside: Callable[[], ConversationStore]) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart("deleted")])
        return ModelResponse(parts=[ToolCallPart("delete_file", {"path": "a.txt"},
                                                 tool_call_id="call-1")])

    agent: Agent[None, Any] = Agent(FunctionModel(model), output_type=[str, DeferredToolRequests])

    @agent.tool_plain(requires_approval=True)
    def delete_file(path: str) -> str:
        return f"deleted {path}"

    store = beside()
    paused = await agent.run("delete a.txt", conversation=Conversation(conversation_id="d"))
    assert isinstance(paused.output, DeferredToolRequests)
    await store.save(paused)
    loaded = await store.load("d")
    assert loaded is not None
    assert loaded.deferred_tool_requests == paused.conversation.deferred_tool_requests
    assert loaded.deferred_tool_requests is not None
    results = loaded.deferred_tool_requests.build_results(approvals={"call-1": True})
    done = await agent.run(conversation=loaded, deferred_tool_results=results)
    assert done.output == "deleted"
    await store.save(done)
    final = await store.load("d")
    assert final is not None and final.deferred_tool_requests is None
    assert final.usage.tool_calls == 1 and final.usage.requests == 2
    assert final.messages == done.conversation.messages


# -- the store primitives, directly ----------------------------------------------------------


async def test_write_record_checks_revision_and_head(shared: Make) -> None:
    store = shared()
    message = ModelRequest(parts=[UserPromptPart("hi")])
    entry = ConversationEntry(parent_id=None, message=message)
    record = ConversationRecord(conversation_id="raw", head_id=entry.id)
    await store.write_record(record, new_entries=[entry], expected_revision=None)
    with pytest.raises(ImmAgentConversationConflict) as err:
        await store.write_record(record, expected_revision=None)
    assert isinstance(err.value, ConversationConflict) and isinstance(err.value, ImmAgentError)
    dangling = ConversationRecord(conversation_id="raw", head_id="never-stored")
    with pytest.raises(ConversationConflict):
        await store.write_record(dangling, expected_revision=record.revision)
    assert (await store.read_entry(entry.id)).message == message
    assert await store.read_history(entry.id) == [ConversationEntry(
        id=entry.id, parent_id=None, message=message)]
    with pytest.raises(LookupError):
        await shared().read_entry("never-stored")
    out_of_order = [ConversationEntry(parent_id=None, message=message),
                    ConversationEntry(parent_id="elsewhere", message=message)]
    with pytest.raises(ValidationError) as bad:
        await store.write_record(ConversationRecord(conversation_id="raw2",
                                                    head_id=out_of_order[1].id),
                                 new_entries=out_of_order, expected_revision=None)
    assert bad.value.field == "new_entries[1].parent_id"
    assert await store.read_record("raw2") is None


@pytest.mark.parametrize(("field", "record"), [
    ("conversation_id", ConversationRecord(conversation_id="bad\x00id", head_id=None)),
    ("conversation_id", ConversationRecord(conversation_id="  ", head_id=None)),
    ("record.metadata.when", ConversationRecord(conversation_id="m", head_id=None,
                                                metadata={"when": object()})),
    ("record.scope", ConversationRecord(conversation_id="s", head_id=None, scope="a\x00b")),
])
async def test_bad_input_is_refused_before_anything_is_written(
        shared: Make, store_dsn: str, field: str, record: ConversationRecord) -> None:
    with pytest.raises(ValidationError) as err:
        await shared().write_record(record, expected_revision=None)
    assert err.value.field == field
    assert states(store_dsn) == 0 and states(store_dsn, Kind.CONVERSATION_SCOPE) == 0


async def test_write_details_refuses_what_it_does_not_store(shared: Make) -> None:
    store = shared()
    await chat(store, "d", "hi")
    record = await store.read_record("d")
    assert record is not None
    with pytest.raises(NotImplementedError):
        await store.write_details("d", {"colour": "blue"},  # type: ignore[typeddict-unknown-key]
                                  expected_revision=record.revision)


# -- the real Agent, offline, on every way of running -----------------------------------------


async def test_function_model_tools_and_usage(make: Make) -> None:
    calls = 0

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        calls += 1
        returned = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
        if returned:
            return ModelResponse(parts=[TextPart(f"sum is {returned[0].content}")])
        return ModelResponse(parts=[ToolCallPart("add", {"a": 2, "b": calls},
                                                 tool_call_id=f"call-{calls}")])

    agent: Agent[None, str] = Agent(FunctionModel(model))

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        return a + b

    store = make()
    conversation = await chat(store, "tools", "add", "again", agent=agent)
    reader = make()
    loaded = await reader.load("tools")
    assert loaded is not None and loaded.messages == conversation.messages
    assert loaded.usage == conversation.usage and loaded.usage.tool_calls == 2
    kinds = [type(p).__name__ for m in loaded.messages for p in m.parts]
    assert kinds.count("ToolCallPart") == 2 and kinds.count("ToolReturnPart") == 2
    # The model saw the whole stored history on the second turn.
    assert calls == 4


def _sync_turns(store: ImmAgentConversationStore, cid: str, turns: int) -> None:
    """Turns with Agent.run_sync and the store's methods through asyncio.run: each call
    in an event loop of its own, none of them the store's."""
    agent = Agent(TestModel())
    for i in range(turns):
        conversation = (asyncio.run(store.load(cid))
                        or Conversation(conversation_id=cid))
        result = agent.run_sync(f"{cid}-{i}", conversation=conversation)
        asyncio.run(store.save(result))


async def test_run_sync_and_threads(make: Make) -> None:
    store = make()
    errors: list[BaseException] = []

    def work(cid: str) -> None:
        try:
            _sync_turns(store, cid, 3)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"thread-{i}",)) for i in range(3)]

    def start_and_join() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    await asyncio.to_thread(start_and_join)
    assert not errors, errors
    for i in range(3):
        loaded = await store.load(f"thread-{i}")
        assert loaded is not None and texts(loaded.messages)[::2] == [
            f"thread-{i}-{n}" for n in range(3)]


async def test_concurrent_saves_from_one_revision(make: Make) -> None:
    await chat(make(), "crowd", "start")
    writers = [make() for _ in range(6)]
    loaded = [await w.load("crowd") for w in writers]
    agent = Agent(TestModel())
    results = [await agent.run(f"writer {i}", conversation=c)
               for i, c in enumerate(loaded) if c is not None]

    async def save(i: int) -> bool:
        try:
            await writers[i].save(results[i])
        except ConversationConflict:
            return False
        return True

    outcome = await asyncio.gather(*(save(i) for i in range(6)))
    assert outcome.count(True) == 1
    final = await make().load("crowd")
    assert final is not None and len(final.messages) == 4
    assert texts(final.messages)[2] == f"writer {outcome.index(True)}"


async def test_a_title_update_racing_a_save_loses_neither(make: Make) -> None:
    await chat(make(), "mix", "start")
    saver, titler = make(), make()
    loaded = await saver.load("mix")
    assert loaded is not None
    result = await Agent(TestModel()).run("go on", conversation=loaded)
    await asyncio.gather(saver.save(result), titler.update("mix", title="Named"))
    record = await make().read_record("mix")
    assert record is not None and record.title == "Named"
    assert record.revision == result.conversation.revision
    now = await make().load("mix")
    assert now is not None and len(now.messages) == 4


async def test_the_example_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pydantic_ai_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    db = tmp_path / "example.db"
    await asyncio.to_thread(example.main, str(db))
    with ImmAgentConversationStore(db) as store:
        listed = await store.list_conversations(scope="user-42")
        assert [r.conversation_id for r in listed] == ["support-1-retry", "support-1"]
        assert [r.title for r in listed] == [None, "Printer trouble"]
    async with await Store.connect(db) as opened:
        assert (await opened.verify()).ok


async def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.index("### pydantic-ai: a `ConversationStore`")
    start = readme.index("```python\n", section) + len("```python\n")
    code = readme[start:readme.index("```", start)]
    monkeypatch.chdir(tmp_path)  # it writes conversations.db where it runs
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out == "2 states kept\n['chat-1-retry', 'chat-1']\n"
    assert (tmp_path / "conversations.db").exists()


async def test_closed_and_default_stores(tmp_path: Path) -> None:
    default = ImmAgentConversationStore()  # a throwaway in-memory store, as pydantic-ai's
    await chat(default, "m", "hi")
    assert await default.load("m") is not None
    await default.aclose()
    await default.aclose()  # idempotent
    with pytest.raises(StoreClosedError):
        await default.load("m")
    with pytest.raises(ValidationError):
        ImmAgentConversationStore("nosuchscheme://x")
    bare = ImmAgentConversationStore(str(tmp_path / "bare.db"))
    try:
        await chat(bare, "b", "hi")
    finally:
        await bare.aclose()
    assert (tmp_path / "bare.db").exists()


# -- what the immutable store adds ---------------------------------------------------------------


async def test_every_change_is_a_state_and_rows_per_turn(shared: Make, store_dsn: str) -> None:
    store = shared()
    await chat(store, "rows", "one")
    assert states(store_dsn) == 1 and states(store_dsn, Kind.CONVERSATION_SCOPE) == 1
    assert assets(store_dsn, Kind.ENTRY) == 2
    assert assets(store_dsn, Kind.ENTRY_NODE) == 3  # the shared root and one link per entry
    await chat(store, "rows", "two")
    assert states(store_dsn) == 2 and assets(store_dsn, Kind.ENTRY) == 4
    await store.update("rows", title="Rows")
    loaded = await store.load("rows")
    assert loaded is not None
    await store.branch("rows", at=2, expected_revision=loaded.revision)
    assert states(store_dsn) == 4 and assets(store_dsn, Kind.ENTRY) == 4  # nothing re-stored
    history = await store.list_states("rows")
    assert [s.title for s in history] == ["Rows", "Rows", None, None]
    assert [s.head_id is not None for s in history] == [True] * 4
    old = await store.load_state(history[-1])
    assert texts(old.messages) == ["one", texts(loaded.messages)[1]]
    with pytest.raises(ConversationConflict):  # that state's revision is not the newest
        await store.save(await Agent(TestModel()).run("from the past", conversation=old))
    await store.delete("rows")
    assert states(store_dsn) == 5 and states(store_dsn, Kind.CONVERSATION_SCOPE) == 0
    assert (await store.list_states("rows", limit=1))[0].deleted


async def test_forks_and_branches_share_every_entry(shared: Make, store_dsn: str) -> None:
    store = shared()
    await chat(store, "trunk", *(f"turn {i}" for i in range(5)))
    entries, links = assets(store_dsn, Kind.ENTRY), assets(store_dsn, Kind.ENTRY_NODE)
    assert (entries, links) == (10, 11)
    for n in (3, 5, 10):
        await store.fork("trunk", at=n, new_conversation_id=f"fork-{n}")
    assert (assets(store_dsn, Kind.ENTRY), assets(store_dsn, Kind.ENTRY_NODE)) == (10, 11)
    # A fork's lineage continues into its source, so its bundle does too.
    fork_state = (await store.list_states("fork-3"))[0]
    trunk_newest = (await store.list_states("trunk"))[0]
    assert fork_state.parent_id == trunk_newest.id
    await chat(store, "fork-3", "divergent")
    assert assets(store_dsn, Kind.ENTRY) == 12
    # A second store object, cold: forks from the middle too, and reads it all back.
    other = shared()
    await other.fork("fork-3", at=4, new_conversation_id="fork-of-fork")
    forked = await other.load("fork-of-fork")
    source = await store.load("fork-3")
    assert forked is not None and source is not None
    assert forked.messages == source.messages[:4]
    assert assets(store_dsn, Kind.ENTRY_NODE) == 13


async def test_export_import_verify(shared: Make, store: Store, tmp_path: Path) -> None:
    writer = shared()
    await chat(writer, "audit", "one", "two", scope="alice")
    await writer.fork("audit", at=2, new_conversation_id="audit-fork")
    await chat(writer, "audit-fork", "three")
    await writer.update("audit-fork", title="Audited", metadata={"k": "v"})
    info = await writer.export("audit-fork", tmp_path / "fork.bundle")
    assert immagent.verify_bundle(tmp_path / "fork.bundle").head == info.head
    assert (await store.verify()).ok
    async with await Store.connect(f"sqlite:///{tmp_path / 'elsewhere.db'}") as other:
        await other.init_schema()
        imported = await other.import_states(tmp_path / "fork.bundle")
        assert imported.head == info.head
        reader = ImmAgentConversationStore(other)
        original = await writer.load("audit-fork")
        loaded = await reader.load("audit-fork")
        assert loaded is not None and original is not None
        assert loaded.messages == original.messages and loaded.revision == original.revision
        record = await reader.read_record("audit-fork")
        assert record is not None and record.title == "Audited" and record.forked_from == "audit"
        assert [r.conversation_id for r in await reader.list_conversations()] == ["audit-fork"]
        assert (await other.verify()).ok
        await other.import_states(tmp_path / "fork.bundle")  # idempotent


async def test_purge_then_gc_reclaims_what_no_fork_holds(shared: Make, store: Store,
                                                         store_dsn: str) -> None:
    conversations = shared()
    await chat(conversations, "doomed", "one", "two", "three")
    await conversations.fork("doomed", at=2, new_conversation_id="survivor")
    await conversations.delete("doomed")
    assert (await store.gc()).assets_removed == 0  # deleted, but its states still pin it
    assert await conversations.purge("doomed", scope="someone-else") == 0
    assert await conversations.purge("doomed") == 4  # 3 saves and the delete
    removed = await store.gc()
    assert removed.assets_removed == 8  # 4 entries and their 4 links; the fork keeps 2
    survivor = await shared().load("survivor")
    assert survivor is not None and texts(survivor.messages)[0] == "one"
    assert (await store.verify()).ok
    assert await conversations.load("doomed") is None


async def test_damage_is_caught_on_read_and_by_verify(shared: Make, store: Store,
                                                      store_dsn: str) -> None:
    await chat(shared(), "victim", "hello")
    # Each link's record (which holds its entry) is replaced by another valid-looking one.
    raw_sql(store_dsn, "UPDATE immagent_nodes SET codec = 0, body = %s "
            f"WHERE kind = {int(Kind.ENTRY_NODE)} AND count > 0",
            [b"\x92\x80\x91\x82\xa1i\xa1x\xa1m\xc4\x02{}"])
    store.clear_cache()
    with pytest.raises(IntegrityError):
        await shared().load("victim")
    report = await store.verify()
    assert not report.ok and len(report.corrupt) == 2


def test_verify_gc_and_bundles_without_pydantic_ai(tmp_path: Path) -> None:
    db, bundle = tmp_path / "written.db", tmp_path / "conversation.bundle"

    async def write() -> None:
        async with ImmAgentConversationStore(db) as store:
            await chat(store, "offline", "one", "two", scope="s")
            await store.fork("offline", at=2, new_conversation_id="offline-fork")
            await store.export("offline", bundle)
            await store.purge("offline-fork")

    asyncio.run(write())
    code = f"""
import asyncio, sys
sys.modules["pydantic_ai"] = None  # an import of it fails, as where it is not installed
import immagent
from immagent.exceptions import ExtraNotInstalledError

async def main():
    async with await immagent.Store.connect({str(db)!r}) as store:
        report = await store.verify()
        assert report.ok and report.agents_checked == 3, report.lines()
        stats = await store.stats()
        assert stats.states_by_kind == {{"conversation_state": 2, "conversation_scope": 1}}, stats
        assert (await store.gc()).assets_removed == 0
    other = {str(tmp_path / "other.db")!r}
    async with await immagent.Store.connect(other) as store:
        await store.init_schema()
        await store.import_states({str(bundle)!r})
        assert (await store.verify()).ok

assert len(immagent.verify_bundle({str(bundle)!r}).agents) == 3
asyncio.run(main())
try:
    import immagent.integrations.pydantic_ai
except ExtraNotInstalledError as e:
    assert "pip install 'immagent-core[pydantic-ai]'" in str(e) and isinstance(e, ImportError)
else:
    raise AssertionError("the integration imported without pydantic-ai")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_immagent_does_not_import_pydantic_ai() -> None:
    code = ("import sys, immagent, immagent.clients.conversations, immagent.integrations; "
            "import immagent.store.hosting; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic_ai'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert "ImmAgentConversationStore" not in immagent.__all__


async def test_records_keep_everything_pydantic_ai_gives_them(shared: Make) -> None:
    store = shared()
    await chat(store, "full", "hi", scope="team")
    record = await store.read_record("full")
    assert record is not None
    changed = dataclasses.replace(record, revision="r-2", branches=[record.head_id or ""])
    await store.write_record(changed, expected_revision=record.revision)
    back = await shared().read_record("full")
    assert back == dataclasses.replace(changed, title=None, metadata=None)
    assert back is not None and back.updated_at == record.updated_at
