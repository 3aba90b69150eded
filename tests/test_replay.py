"""Exact replay: every reply records the request its model call was given (tools offered
included, as one deduplicated asset); the store rebuilds it and proves it; a replay sends
it again and shows what changed. Messages written before requests were recorded say so."""

from __future__ import annotations

import msgspec
import pytest

from immagent import Message, Store
from immagent.assets import Kind, Tools, encode
from immagent.exceptions import IntegrityError, ValidationError
from immagent.mcp import MCPManager
from immagent.offline import ECHO_MODEL, Reply, ScriptedModel
from immagent.replay import rebuild, rebuild_from, replay
from immagent.requests import REQUEST_VERSION, build
from tests.conftest import count_rows, turn

PROMPT = "You are replayed."


async def test_a_reply_records_its_request_and_the_store_proves_it(store: Store) -> None:
    agent = await store.create_agent("r", PROMPT, ECHO_MODEL, model_config={"top_p": 0.5})
    one = await agent.advance("first", temperature=0.2)
    two = await one.advance("second")
    store.clear_cache()
    rebuilt = await rebuild(store, two.id)
    messages = await two.get_messages()
    assert rebuilt.index == 3 and rebuilt.message == messages[3]
    assert rebuilt.known and rebuilt.proven
    assert rebuilt.sent == messages[:3]
    assert rebuilt.request.params == {"top_p": 0.5}
    assert rebuilt.request.model == ECHO_MODEL and rebuilt.tools is None
    first = await rebuild(store, two.id, 1)  # an older reply, with its turn's parameters
    assert first.proven and first.request.params == {"temperature": 0.2, "top_p": 0.5}
    assert first.sent == messages[:1]
    # Any other part gives another digest: the record pins every part.
    assert not rebuild_from("You are someone else.", messages, 3).proven
    other = (*messages[:2], Message(role="user", content="second!"), messages[3])
    assert not rebuild_from(PROMPT, other, 3).proven
    altered = msgspec.structs.replace(messages[3], call_config={"top_p": 0.6})
    assert not rebuild_from(PROMPT, (*messages[:3], altered), 3).proven


async def test_replay_sends_the_same_request_and_shows_what_changed(store: Store) -> None:
    model = ScriptedModel(["Six.", "Seven.", "Six."])
    agent = await (await store.create_agent("s", PROMPT, model.model)).advance("How many?")
    rebuilt = await rebuild(store, agent.id)
    changed = await replay(rebuilt)
    assert not changed.same
    assert [c.field for c in changed.changes] == ["content"]
    assert (changed.changes[0].recorded, changed.changes[0].replayed) == ("Six.", "Seven.")
    assert changed.answer.request == rebuilt.digest
    # The model was sent exactly what it was sent the first time.
    assert model.requests[1].messages == model.requests[0].messages
    assert model.requests[1].params == model.requests[0].params
    assert (await replay(rebuilt)).same


async def test_tools_offered_are_one_shared_asset_kept_while_a_reply_needs_it(
        store: Store, store_dsn: str, calc: MCPManager) -> None:
    model = ScriptedModel([Reply.call("multiply", a=6, b=7), "42.", "Done."])
    agent = await store.create_agent("t", PROMPT, model.model)
    one = await agent.advance("6 times 7?", mcp=calc)
    two = await one.advance("thanks", mcp=calc)
    replies = [m for m in await two.get_messages() if m.role == "assistant"]
    assert len({m.tools for m in replies}) == 1 and replies[0].tools is not None
    assert count_rows(store_dsn, "immagent_assets", f"kind = {int(Kind.TOOLS)}") == 1
    store.clear_cache()
    rebuilt = await rebuild(store, two.id, 1)
    assert rebuilt.proven
    assert rebuilt.tools is not None
    assert [t["function"]["name"] for t in rebuilt.tools] == \
        [t["function"]["name"] for t in calc.tool_schemas()]
    # gc keeps the schemas while a reply references them, and only then.
    await store.gc()
    assert count_rows(store_dsn, "immagent_assets", f"kind = {int(Kind.TOOLS)}") == 1
    await store.delete_lineage(two)
    await store.gc()
    assert count_rows(store_dsn, "immagent_assets", f"kind = {int(Kind.TOOLS)}") == 0
    assert (await store.verify()).ok


async def test_a_streamed_reply_records_the_request_a_whole_one_does(store: Store) -> None:
    agent = await store.create_agent("st", PROMPT, ECHO_MODEL)
    whole = await agent.advance("hello", temperature=0.3)
    async with agent.stream("hello", temperature=0.3) as s:
        async for _ in s:
            pass
    streamed = s.agent
    a, b = (await whole.get_messages())[-1], (await streamed.get_messages())[-1]
    assert a.request is not None and a.request == b.request
    assert a.digest == b.digest
    assert (await rebuild(store, streamed.id)).proven


async def test_a_reply_cut_short_records_the_request_it_answered(store: Store) -> None:
    model = ScriptedModel([Reply(chunks=["The ", "answer ", "is"])])
    agent = await store.create_agent("cut", PROMPT, model.model)
    async with agent.stream("tell me", keep_partial=True) as s:
        async for event in s:
            if getattr(event, "text", None) == "answer ":
                break
    rebuilt = await rebuild(store, s.agent.id)
    assert rebuilt.message.interrupted and rebuilt.proven


async def test_messages_written_before_requests_were_recorded_are_unknown(
        store: Store) -> None:
    agent = await store.create_agent("old", PROMPT, ECHO_MODEL)
    old = await store.append(agent, turn(1, model=ECHO_MODEL))
    rebuilt = await rebuild(store, old.id)
    assert not rebuilt.known and not rebuilt.proven and rebuilt.recorded is None
    with pytest.raises(ValidationError, match="unknown"):
        await replay(rebuilt)
    assert (await store.verify()).ok  # nothing breaks


async def test_a_request_the_store_no_longer_holds_exactly_is_not_replayed(
        store: Store) -> None:
    agent = await (await store.create_agent("x", PROMPT, ECHO_MODEL)).advance("hi")
    messages = await agent.get_messages()
    forged = rebuild_from("another prompt", messages)
    with pytest.raises(IntegrityError, match="does not hash"):
        await replay(forged)


async def test_bad_positions_and_tools_are_refused(store: Store) -> None:
    agent = await (await store.create_agent("b", PROMPT, ECHO_MODEL)).advance("hi")
    for index, match in [(0, "user message"), (7, "no message 7"), (-1, "no message"),
                         (True, "int")]:
        with pytest.raises(ValidationError, match=match):
            await rebuild(store, agent.id, index)
    fresh = await store.create_agent("empty", PROMPT, ECHO_MODEL)
    with pytest.raises(ValidationError, match="no assistant message"):
        await rebuild(store, fresh.id)
    messages = await agent.get_messages()
    with pytest.raises(ValidationError, match="tools"):
        rebuild_from(PROMPT, messages, 1, Tools.of([{"type": "function"}]))


def test_the_request_record_is_canonical_and_holds_no_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-9f8e7d6c5b4a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    history = [Message(role="user", content="hi")]
    tools = Tools.of([{"type": "function", "function": {"name": "f", "parameters": {}}}])
    record = build("m", "p", history, tools, {"temperature": 0.5})
    assert record.version == REQUEST_VERSION
    assert secret.encode() not in encode(record)
    # Key order does not matter (JSON objects are unordered); values do.
    assert Tools.of([{"function": {"parameters": {}, "name": "f"}, "type": "function"}]
                    ).digest == tools.digest
    assert build("m", "p", history, tools, {"temperature": 0.5}).digest == record.digest
    assert build("m", "p", history, None, {"temperature": 0.5}).digest != record.digest
    assert build("m", "p", history, tools, {"temperature": 0.6}).digest != record.digest


async def test_tool_schemas_that_are_no_json_are_refused_before_the_call(
        store: Store) -> None:
    class Odd:
        def tool_schemas(self) -> list[dict[str, object]]:
            return [{"type": "function", "bad": float("nan")}]

        async def execute(self, name: str, arguments: dict[str, object]) -> str:
            return ""

    model = ScriptedModel(["never"])
    agent = await store.create_agent("odd", PROMPT, model.model)
    with pytest.raises(ValidationError, match="tools"):
        await agent.advance("hi", mcp=Odd())
    assert model.requests == []
