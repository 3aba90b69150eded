"""ImmAgentSession as the OpenAI Agents SDK's sessions promise to behave, on PostgreSQL and
SQLite, over a shared Store and over a store the session opens from a DSN; then with the
real Runner (run, run_streamed, run_sync, several threads) and the SDK's offline model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, SQLiteSession, function_tool
from agents.memory import Session, SessionSettings
from agents.testing import ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseReasoningItem
from openai.types.responses.response_reasoning_item import Summary

import immagent
from immagent import Store, StoreClosedError, ValidationError, chains
from immagent.assets import Kind
from immagent.integrations.openai_agents import ImmAgentSession
from tests.conftest import count_rows, example, stored_elements

NO_TRACING = RunConfig(tracing_disabled=True)
Make = Callable[..., ImmAgentSession]


def user(text: object) -> Any:  # a TResponseInputItem (a TypedDict union)
    return {"role": "user", "content": text}


def reply(text: str, item_id: str = "msg_1") -> Any:
    return {"id": item_id, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def states(dsn: str) -> int:
    return count_rows(dsn, "immagent_states", f"kind = {int(Kind.SESSION_STATE)}")


def assets(dsn: str, kind: Kind | None = None) -> int:
    return count_rows(dsn, "immagent_assets", "TRUE" if kind is None else f"kind = {int(kind)}")


@pytest.fixture(params=["shared", "owned"])
async def make(request: pytest.FixtureRequest, store: Store,
               store_dsn: str) -> AsyncIterator[Make]:
    """Sessions over the test's Store (shared) or over a store each opens from the DSN."""
    made: list[ImmAgentSession] = []

    def factory(session_id: str, **kwargs: Any) -> ImmAgentSession:
        db: Store | str = store if request.param == "shared" else store_dsn
        session = ImmAgentSession(session_id, db, **kwargs)
        made.append(session)
        return session

    yield factory
    for s in made:
        await s.aclose()


@pytest.fixture
async def shared(store: Store) -> Make:
    """Sessions over the test's Store only: for what does not depend on where it runs."""

    def factory(session_id: str, **kwargs: Any) -> ImmAgentSession:
        return ImmAgentSession(session_id, store, **kwargs)

    return factory


# -- the protocol ---------------------------------------------------------------------------


async def test_is_an_sdk_session_and_keeps_order(make: Make) -> None:
    session = make("chat")
    assert isinstance(session, Session)
    typed: Session = session  # mypy checks the protocol structurally
    assert typed.session_id == "chat" and await session.get_items() == []
    batch1 = [user("one"), reply("uno")]
    batch2 = [user("two"), reply("dos", "msg_2"), user("three")]
    await session.add_items(batch1)
    await session.add_items([])
    await session.add_items(batch2)
    assert await session.get_items() == batch1 + batch2


async def test_limit_returns_the_latest_in_order(make: Make) -> None:
    session = make("limits")
    items = [user(f"m{i}") for i in range(6)]
    await session.add_items(items[:2])
    await session.add_items(items[2:])
    assert await session.get_items(limit=2) == items[-2:]
    assert await session.get_items(limit=1) == items[-1:]
    assert await session.get_items(limit=100) == items
    assert await session.get_items(limit=0) == []
    assert await session.get_items(limit=-1) == items  # the SDK SQLite session's negative limit
    with pytest.raises(ValidationError) as err:
        await session.get_items(limit="3")  # type: ignore[arg-type]
    assert err.value.field == "limit"


async def test_session_settings_limit(make: Make) -> None:
    session = make("settings", session_settings=SessionSettings(limit=3))
    items = [user(f"m{i}") for i in range(5)]
    await session.add_items(items)
    assert await session.get_items() == items[-3:]
    assert await session.get_items(limit=1) == items[-1:]  # an explicit limit wins
    as_dict = make("settings", session_settings={"limit": 2})
    assert as_dict.session_settings == SessionSettings(limit=2)
    assert await as_dict.get_items() == items[-2:]


async def test_pop_item(make: Make, store_dsn: str) -> None:
    session = make("pop")
    assert await session.pop_item() is None
    assert states(store_dsn) == 0  # popping nothing writes nothing
    await session.add_items([user("a"), reply("b")])
    await session.add_items([user("c")])
    assert await session.pop_item() == user("c")
    assert await session.pop_item() == reply("b")
    assert await session.get_items() == [user("a")]
    assert await session.pop_item() == user("a")
    assert await session.pop_item() is None
    assert await session.get_items() == []


async def test_clear_session(make: Make, store_dsn: str) -> None:
    session = make("clear")
    await session.clear_session()
    assert states(store_dsn) == 0
    await session.add_items([user("a"), user("b")])
    await session.clear_session()
    assert await session.get_items() == []
    await session.clear_session()  # already empty: no new state
    assert states(store_dsn) == 2
    await session.add_items([user("again")])
    assert await session.get_items() == [user("again")]


async def test_sessions_in_one_store_are_separate(make: Make, store_dsn: str) -> None:
    a, b = make("alice"), make("bob")
    await a.add_items([user("for alice")])
    await b.add_items([user("for bob"), user("hello")])
    await b.pop_item()
    await a.clear_session()
    assert await a.get_items() == []
    assert await b.get_items() == [user("for bob")]
    # A second object on the same session id sees the same items.
    assert await make("bob").get_items() == [user("for bob")]


async def test_an_object_never_trusts_what_it_saw_last(make: Make) -> None:
    mine, other = make("two-views"), make("two-views")
    assert await mine.get_items() == [] and await mine.pop_item() is None  # seen empty
    await other.add_items([user("added elsewhere")])
    assert await mine.pop_item() == user("added elsewhere")
    await other.add_items([user("again")])
    await mine.clear_session()
    assert await other.get_items() == []
    await other.add_items([user("q1"), user("q2")])
    assert await mine.create_branch_from_turn(2, "side") == "side"
    assert await mine.get_items() == [user("q1")]


@pytest.mark.parametrize("session_id", [
    "ünïcødé 🧪 セッション", "'; DROP TABLE immagent_states; --", "%_\\", "a" * 500,
    "O'Reilly \"quoted\" `tick`"])
async def test_unicode_and_sql_like_strings(shared: Make, session_id: str) -> None:
    session = shared(session_id)
    items = [user(session_id), {"type": "function_call_output", "call_id": "c'1",
                                "output": "SELECT * FROM x WHERE y = '%'; -- ☃ \x00 end"}]
    await session.add_items(items)
    assert await session.get_items() == items
    assert await shared(session_id).get_items() == items
    assert await shared(session_id + " ").get_items() == []


async def test_items_come_back_as_json_carries_them(make: Make) -> None:
    item: Any = {"type": "message", "role": "user", "z": 1, "a": 1.0, "neg": -0.0,
            "big": 2**63, "nested": {"list": [1, 2.5, None, True, "x"], "t": (1, 2)},
            "content": [{"type": "input_text", "text": "hi"}]}
    session = make("json")
    await session.add_items([item])
    (got,) = list[Any](await session.get_items())
    assert got == item | {"nested": {"list": [1, 2.5, None, True, "x"], "t": [1, 2]}}
    assert list(got) == sorted(item)  # canonical: keys in sorted order
    assert type(got["z"]) is int and type(got["a"]) is float
    assert math.copysign(1, got["neg"]) == -1
    assert json.dumps(got, sort_keys=True) == json.dumps(
        item | {"nested": {"list": [1, 2.5, None, True, "x"], "t": [1, 2]}}, sort_keys=True)
    got["content"].append("mutated")  # the caller's copy, not the stored item
    again: list[Any] = await session.get_items()
    assert again[0]["content"] == [{"type": "input_text", "text": "hi"}]


def _cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize("bad", [
    float("nan"), float("inf"), {1, 2}, b"bytes", object(), {1: "int key"}, 2**64,
    "\ud800", {"k": _cycle()}, {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}])
async def test_bad_items_write_nothing(shared: Make, store_dsn: str, bad: object) -> None:
    session = shared("bad")
    await session.add_items([user("kept")])
    before = (states(store_dsn), assets(store_dsn))
    with pytest.raises(ValidationError) as err:
        await session.add_items([user("fine"), user(bad)])
    assert err.value.field.startswith("items[1]")
    assert (states(store_dsn), assets(store_dsn)) == before
    assert await session.get_items() == [user("kept")]


async def test_items_must_be_a_list(make: Make) -> None:
    session = make("shape")
    for bad in (user("not in a list"), "text", None, 42):
        with pytest.raises(ValidationError) as err:
            await session.add_items(bad)  # type: ignore[arg-type]
        assert err.value.field == "items"
    with pytest.raises(ValidationError):
        ImmAgentSession("", "x.db")
    with pytest.raises(ValidationError):
        ImmAgentSession("ok", "mysql://nope")


async def test_repeated_items_are_stored_once(make: Make, store_dsn: str) -> None:
    # An item larger than chains.INLINE_MAX is an asset of its own, stored once whatever
    # holds it; small ones are held by each link that adds them.
    pasted = user("a pasted page " * (chains.INLINE_MAX // 10))
    for name in ("s1", "s2", "s3"):
        await make(name).add_items([pasted, reply("hi!"), pasted])
    # The three sessions' links are one node (the same items on the same root): it holds
    # the reply and names the pasted item twice.
    assert assets(store_dsn, Kind.ITEM) == 1
    assert stored_elements(store_dsn, Kind.ITEM) == 2
    assert count_rows(store_dsn, "immagent_nodes", f"kind = {int(Kind.ITEM_NODE)}") == 2


async def test_concurrent_add_items_lose_nothing_and_are_totally_ordered(
        make: Make, store_dsn: str) -> None:
    first, second = make("busy"), make("busy")  # two objects: they race through the head

    async def writer(session: ImmAgentSession, w: int) -> None:
        for j in range(4):
            await session.add_items([user(f"w{w}-{j}"), reply(f"r{w}-{j}", f"msg_{w}_{j}")])

    await asyncio.gather(*(writer(first if w % 2 else second, w) for w in range(12)))
    items: list[Any] = await first.get_items()
    assert len(items) == 12 * 4 * 2
    for w in range(12):
        mine = [i["content"] for i in items if i.get("role") == "user"
                and i["content"].startswith(f"w{w}-")]
        assert mine == [f"w{w}-{j}" for j in range(4)]  # each writer's calls, in its order
    for k in range(0, len(items), 2):  # each call's items stay together
        assert items[k]["content"][1:] == items[k + 1]["content"][0]["text"][1:]
    history = await first.list_states(limit=1000)
    assert len(history) == 48 == states(store_dsn)
    for newer, older in itertools.pairwise(history):
        assert newer.parent_id == older.id and newer.seq > older.seq  # one chain, one order
    assert history[-1].parent_id is None


async def test_a_cancelled_write_finishes_before_the_cancellation(make: Make) -> None:
    session = make("cancel")
    await session.get_items()  # opened
    task = asyncio.create_task(session.add_items([user("landed")]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await session.get_items() == [user("landed")]


async def test_close(store_dsn: str, store: Store) -> None:
    owned = ImmAgentSession("closing", store_dsn)
    await owned.add_items([user("x")])
    assert any(t.name == "immagent-session" for t in threading.enumerate())
    owned.close()
    owned.close()
    assert not any(t.name == "immagent-session" for t in threading.enumerate())
    for call in (owned.get_items(), owned.add_items([user("y")]), owned.add_items([]),
                 owned.pop_item(), owned.clear_session()):
        with pytest.raises(StoreClosedError):
            await call
    shared = ImmAgentSession("closing", store)
    await shared.aclose()
    assert not store.closed and await ImmAgentSession("closing", store).get_items() == [
        user("x")]


async def test_the_example_runs(store_dsn: str) -> None:
    with example("openai_agents_session") as module:
        await module.main(store_dsn)
    reader = ImmAgentSession("demo-user", store_dsn)
    try:
        items: list[Any] = await reader.get_items()
        assert [i.get("type", i.get("role")) for i in items] == [
            "user", "message", "user", "function_call", "function_call_output", "message",
            "user"]  # the last answer was popped
        assert len(await ImmAgentSession("demo-user-retry", store_dsn).get_items()) == 2
    finally:
        await reader.aclose()


async def test_a_bare_db_path_and_memory(tmp_path: Path) -> None:
    for db in (str(tmp_path / "bare.db"), tmp_path / "path-object.sqlite", "memory://"):
        session = ImmAgentSession("bare", db)
        try:
            await session.add_items([user(str(db))])
            assert await session.get_items() == [user(str(db))]
        finally:
            await session.aclose()
    assert (tmp_path / "bare.db").exists()


def test_import_immagent_does_not_import_the_sdk() -> None:
    code = ("import sys, immagent, immagent.clients.sessions, immagent.integrations; "
            "assert 'agents' not in sys.modules and 'openai' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'openai'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "ImmAgentSession" not in immagent.__all__


# -- the real Runner, offline ---------------------------------------------------------------


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def _script() -> ScriptedModel:
    return ScriptedModel([
        [assistant_message("Hello!", item_id="msg_a")],
        [ResponseReasoningItem(id="rs_1", type="reasoning",
                               summary=[Summary(text="needs the tool", type="summary_text")]),
         function_call("add", {"a": 2, "b": 3}, call_id="call_1")],
        [assistant_message("2 + 3 = 5", item_id="msg_b")],
        [assistant_message("Bye.", item_id="msg_c")],
    ])


async def _converse(session: Session) -> tuple[list[str], ScriptedModel]:
    model = _script()
    agent = Agent(name="helper", instructions="Be brief.", model=model, tools=[add])
    outputs = []
    for text in ("hi", "what is 2 + 3?", "bye"):
        result = await Runner.run(agent, text, session=session, run_config=NO_TRACING)
        outputs.append(str(result.final_output))
    return outputs, model


async def test_runner_across_turns_stores_what_sqlite_session_stores(
        make: Make, tmp_path: Path) -> None:
    ours = make("runner")
    outputs, model = await _converse(ours)
    assert outputs == ["Hello!", "2 + 3 = 5", "Bye."]
    baseline = SQLiteSession("runner", tmp_path / "sdk.db")
    try:
        await _converse(baseline)
        expected = await baseline.get_items()
    finally:
        baseline.close()
    items = await ours.get_items()
    assert items == expected
    kinds = [i.get("type", i.get("role")) for i in items]
    assert kinds == ["user", "message", "user", "reasoning", "function_call",
                     "function_call_output", "message", "user", "message"]
    # The last model call saw the whole history the session kept.
    last_input = model.last_call.input if model.last_call else None
    assert isinstance(last_input, list) and len(last_input) == len(items) - 1
    assert await make("runner").get_items() == items  # durable: a new object reads it


async def test_runner_run_streamed(make: Make) -> None:
    session = make("streamed")
    model = ScriptedModel([[assistant_message("first", item_id="m1")],
                           [assistant_message("second", item_id="m2")]])
    agent = Agent(name="streamer", model=model)
    for text in ("one", "two"):
        result = Runner.run_streamed(agent, text, session=session, run_config=NO_TRACING)
        events = [e async for e in result.stream_events()]
        assert events
    items: list[Any] = await session.get_items()
    assert [i.get("content") if i.get("role") == "user" else i["content"][0]["text"]
            for i in items] == ["one", "first", "two", "second"]


def _sync_chat(session: ImmAgentSession, tag: str, turns: int) -> list[str]:
    """Runner.run_sync for ``turns`` turns, called from a new thread: run_sync runs the
    thread's default event loop (in the main thread that would be pytest-asyncio's)."""
    model = ScriptedModel([[assistant_message(f"{tag}-answer-{i}", item_id=f"{tag}{i}")]
                           for i in range(turns)])
    agent = Agent(name=tag, model=model)
    return [str(Runner.run_sync(agent, f"{tag}-question-{i}", session=session,
                                run_config=NO_TRACING).final_output) for i in range(turns)]


def _in_threads(work: Callable[[str], object], tags: list[str]) -> list[object]:
    """``work(tag)`` in one new thread per tag, at once; their results in order. Each
    thread closes the event loop run_sync left open for it."""
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            results[tag] = work(tag)
        except BaseException as e:  # reported by the test thread
            errors.append(e)
        finally:
            with contextlib.suppress(RuntimeError):
                asyncio.get_event_loop_policy().get_event_loop().close()

    workers = [threading.Thread(target=run, args=(tag,)) for tag in tags]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    return [results[tag] for tag in tags]


def test_runner_run_sync(store_dsn: str) -> None:
    session = ImmAgentSession("sync", store_dsn)
    try:
        (answers,) = _in_threads(lambda tag: _sync_chat(session, tag, 3), ["s"])
        assert answers == ["s-answer-0", "s-answer-1", "s-answer-2"]
        # Another thread, so another loop: the session serves them all.
        (again,) = _in_threads(lambda tag: _sync_chat(session, tag, 1), ["s2"])
        assert again == ["s2-answer-0"]
        items = asyncio.run(session.get_items())  # yet another loop
        assert len(items) == 8 and items[0] == user("s-question-0")
    finally:
        session.close()


def _threads_share(session: ImmAgentSession, threads: int, turns: int) -> None:
    _in_threads(lambda tag: _sync_chat(session, tag, turns), [f"t{k}" for k in range(threads)])


def _check_threads(items: list[Any], threads: int, turns: int) -> None:
    assert len(items) == threads * turns * 2
    for k in range(threads):
        questions = [i["content"] for i in items
                     if i.get("role") == "user" and i["content"].startswith(f"t{k}-")]
        assert questions == [f"t{k}-question-{i}" for i in range(turns)]


def test_one_session_from_several_threads(store_dsn: str) -> None:
    session = ImmAgentSession("threads", store_dsn)
    try:
        _threads_share(session, threads=4, turns=3)
        _check_threads(asyncio.run(session.get_items()), 4, 3)
    finally:
        session.close()


async def test_a_shared_store_from_several_threads(store: Store) -> None:
    session = ImmAgentSession("shared-threads", store)  # this loop is the store's
    await asyncio.to_thread(_threads_share, session, 3, 2)  # this loop keeps running
    _check_threads(await session.get_items(), 3, 2)
