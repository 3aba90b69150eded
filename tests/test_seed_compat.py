"""Seed compatibility: a program written for immagent 0.1.2 runs unchanged.

Written as a 0.1.2 user writes: imports from the 0.1.2 module paths, 0.1.2 spellings and
keyword names, on both backends (the ``store`` fixture). The only thing that is not 0.1.2
is the model: the project's offline models stand in for a provider.

Lines marked ``type: ignore`` call 0.1.2 names this package does not have yet; mypy's
strict mode reports each marker as unused once the name exists, so they go away with the
gap they mark.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import immagent
from immagent.assets import Asset, SystemPrompt
from immagent.exceptions import (
    AgentNotFoundError,
    AgentNotRegisteredError,
    AssetNotFoundError,
    ImmAgentError,
    LLMError,
    MessageNotFoundError,
    ToolExecutionError,
    ValidationError,
)
from immagent.llm import Model
from immagent.mcp import MCPManager
from immagent.messages import Conversation, Message, ToolCall
from immagent.persistent import PersistentAgent
from immagent.simple import SimpleAgent
from immagent.store import Store
from immagent.testing import Reply, ScriptedModel

PROMPT = "You are helpful."


async def new_agent(store: Store, model: str = Model.ECHO,
                    model_config: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> PersistentAgent:
    return await store.create_agent(name="Bot", system_prompt=PROMPT, model=model,
                                    model_config=model_config, metadata=metadata)


# -- module paths and the data model -----------------------------------------------------


def test_the_0_1_2_module_paths_name_the_public_types() -> None:
    assert immagent.Message is Message and immagent.ToolCall is ToolCall
    assert immagent.SystemPrompt is SystemPrompt
    assert immagent.PersistentAgent is PersistentAgent
    assert immagent.SimpleAgent is SimpleAgent and immagent.Store is Store
    assert immagent.Model is Model and immagent.MCPManager is MCPManager
    for error in (ValidationError, AssetNotFoundError, AgentNotFoundError,
                  MessageNotFoundError, AgentNotRegisteredError, LLMError,
                  ToolExecutionError):
        assert issubclass(error, ImmAgentError)
        assert getattr(immagent, error.__name__) is error
    assert issubclass(AgentNotFoundError, AssetNotFoundError)
    assert issubclass(MessageNotFoundError, AssetNotFoundError)


def test_message_constructors_and_fields() -> None:
    user = Message.user("Hello!")
    assert (user.role, user.content, user.tool_calls, user.tool_call_id) == \
        ("user", "Hello!", None, None)
    assert (user.input_tokens, user.output_tokens) == (None, None)
    assert isinstance(user.id, uuid.UUID)
    assert isinstance(user, Asset)

    call = ToolCall(id="call_1", name="add", arguments='{"a": 1, "b": 2}')
    reply = Message.assistant("Let me add.", tool_calls=(call,), input_tokens=7,
                              output_tokens=3)
    assert (reply.role, reply.content, reply.tool_calls) == ("assistant", "Let me add.",
                                                             (call,))
    assert (reply.input_tokens, reply.output_tokens) == (7, 3)
    assert reply.tool_call_id is None
    # Positional arguments in 0.1.2's order; tool calls as a list become a tuple.
    assert Message.assistant("Let me add.", [call], 7, 3) == reply
    bare = Message.assistant("Plain.")
    assert bare.tool_calls is None and bare.input_tokens is None

    result = Message.tool_result("call_1", "3")
    assert (result.role, result.content, result.tool_call_id) == ("tool", "3", "call_1")
    # 0.1.2's keyword names.
    assert Message.user(content="Hello!") == user
    assert Message.tool_result(tool_call_id="call_1", content="3") == result
    assert Message.assistant(content=None, tool_calls=[call]).content is None


async def test_constructed_messages_are_stored_and_read_back(store: Store) -> None:
    call = ToolCall(id="call_1", name="add", arguments='{"a": 1, "b": 2}')
    turn = [Message.user("1 + 2?"),
            Message.assistant(None, tool_calls=(call,), input_tokens=5, output_tokens=2),
            Message.tool_result("call_1", "3"),
            Message.assistant("3", input_tokens=9, output_tokens=1)]
    agent = await store.append(await new_agent(store), turn)
    store.clear_cache()
    loaded = await store.load_agent(agent.id)
    assert await loaded.get_messages() == tuple(turn)


async def test_conversation_id_is_the_agents_conversation_id(store: Store) -> None:
    agent = await new_agent(store)
    assert Conversation.create().id == agent.conversation_id
    assert Conversation.create().message_ids == ()
    one = await agent.advance("Hello!")
    two = await one.advance("Again")
    history = await two.get_messages()

    # One with_messages per advance: the same hash chain the store wrote.
    first = Conversation.create().with_messages(*history[:2])
    conversation = first.with_messages(*history[2:])
    assert first.id == one.conversation_id
    assert conversation.id == two.conversation_id
    assert conversation.message_ids == tuple(m.id for m in history)
    assert conversation.messages == history
    assert Conversation.create(history[:2]) == first
    # The id pins the steps, not only the messages: one step of four is another chain.
    assert Conversation.create(history).id != two.conversation_id
    assert (await two.clone()).conversation_id == conversation.id


def test_conversation_rejects_messages_that_are_not_its_history() -> None:
    full = Conversation.create([Message.user("a"), Message.assistant("b")])
    with pytest.raises(ValidationError) as err:
        Conversation(head=full.head, messages=(Message.user("a"), Message.assistant("c")))
    assert err.value.field == "messages"
    with pytest.raises(ValidationError):
        full.with_messages()


# -- PersistentAgent -----------------------------------------------------------------------


async def test_messages_is_get_messages_oldest_first(store: Store) -> None:
    agent = await new_agent(store)
    assert await agent.messages() == ()
    new = await agent.advance("Hello!")
    messages = await new.messages()
    assert isinstance(messages, tuple)
    assert [(m.role, m.content) for m in messages] == [("user", "Hello!"),
                                                       ("assistant", "Echo: Hello!")]
    assert await new.get_messages() == messages


async def test_lineage_is_root_first(store: Store) -> None:
    root = await new_agent(store)
    one = await root.advance("one")
    two = await one.advance("two")
    assert [a.id for a in await two.lineage()] == [root.id, one.id, two.id]
    assert [a.id for a in await root.lineage()] == [root.id]


async def test_get_lineage_is_root_first(store: Store) -> None:
    root = await new_agent(store)
    one = await root.advance("one")
    two = await one.advance("two")
    assert [a.id for a in await two.get_lineage()] == [root.id, one.id, two.id]


async def test_last_response(store: Store) -> None:
    agent = await new_agent(store)
    assert await agent.last_response() is None
    new = await agent.advance("Hello!")
    assert await new.last_response() == "Echo: Hello!"
    # The newest assistant message *with text*: a tool-call-only reply is skipped.
    call = ToolCall(id="call_1", name="lookup", arguments="{}")
    later = await store.append(new, [Message.user("Look it up"),
                                     Message.assistant(None, tool_calls=[call]),
                                     Message.tool_result("call_1", "found")])
    assert await later.last_response() == "Echo: Hello!"


async def test_token_usage_sums_the_assistant_messages(store: Store) -> None:
    model = ScriptedModel([Reply(text="a", input_tokens=10, output_tokens=2),
                           Reply(text="b", input_tokens=15, output_tokens=3)])
    agent = await new_agent(store, model.model)
    assert await agent.token_usage() == (0, 0)
    one = await agent.advance("one")
    two = await one.advance("two")
    assert await two.token_usage() == (25, 5)
    assert await one.token_usage() == (10, 2)


async def test_clone_is_a_sibling(store: Store) -> None:
    root = await new_agent(store, model_config={"temperature": 0.5}, metadata={"team": "a"})
    child = await root.advance("Hello!")
    twin = await child.clone()
    assert twin.id not in (child.id, root.id)
    assert twin.parent_id == child.parent_id == root.id  # a sibling, not a child
    assert twin.conversation_id == child.conversation_id
    assert twin.system_prompt_id == child.system_prompt_id
    assert (twin.name, twin.model) == (child.name, child.model)
    assert dict(twin.model_config) == {"temperature": 0.5}
    assert dict(twin.metadata) == {"team": "a"}
    assert (await root.clone()).parent_id is None  # a root's sibling is a root

    # Exploring two branches from the same point.
    option_a = await twin.advance("Option A")
    option_b = await child.advance("Option B")
    assert option_a.parent_id == twin.id and option_b.parent_id == child.id
    assert [m.content for m in await option_a.get_messages()][:2] == \
        [m.content for m in await option_b.get_messages()][:2]


async def test_with_metadata_is_a_new_state(store: Store) -> None:
    agent = await new_agent(store, metadata={"v": 1})
    new = await agent.with_metadata({"v": 2, "tags": ["x"]})
    assert new.id != agent.id and new.parent_id == agent.id
    assert dict(new.metadata) == {"v": 2, "tags": ["x"]} and dict(agent.metadata) == {"v": 1}
    assert new.conversation_id == agent.conversation_id


async def test_advance_takes_the_0_1_2_keywords(store: Store) -> None:
    model = ScriptedModel(["Hi there."])
    agent = await new_agent(store, model.model)
    new = await agent.advance(user_input="Hello!", mcp=None, max_retries=0,
                              timeout=30.0, max_tool_rounds=3, temperature=0.2,
                              max_tokens=50, top_p=0.9)
    assert new.parent_id == agent.id
    assert model.requests[0].params == {"temperature": 0.2, "max_tokens": 50, "top_p": 0.9}
    assert model.requests[0].timeout == 30.0
    assert [m.content for m in await new.get_messages()] == ["Hello!", "Hi there."]


BAD_TURNS = [
    ({"user_input": ""}, "user_input"),
    ({"user_input": "   "}, "user_input"),
    ({"max_tool_rounds": 0}, "max_tool_rounds"),
    ({"max_tool_rounds": -1}, "max_tool_rounds"),
    ({"max_retries": -1}, "max_retries"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -1.5}, "timeout"),
]


@pytest.mark.parametrize(("arguments", "field"), BAD_TURNS)
async def test_bad_advance_arguments_fail_before_any_model_call(
        store: Store, arguments: dict[str, object], field: str) -> None:
    model = ScriptedModel(["never sent"])
    agent = await new_agent(store, model.model)
    arguments = dict(arguments)
    text = arguments.pop("user_input", "Hello!")
    with pytest.raises(ValidationError) as err:
        await agent.advance(text, **arguments)  # type: ignore[arg-type]
    assert err.value.field == field
    assert model.requests == []  # the model was never called
    assert await store.count_agents() == 1  # and nothing was written


# -- SimpleAgent ---------------------------------------------------------------------------


async def test_simple_agent_as_0_1_2_programs_use_it() -> None:
    model = ScriptedModel([Reply(text="Hello to you.", input_tokens=6, output_tokens=3),
                           Reply(text="4", input_tokens=11, output_tokens=1)])
    agent = SimpleAgent(name="Assistant", system_prompt=PROMPT, model=model.model,
                        model_config={"temperature": 0.5}, metadata={"team": "a"})
    assert (agent.name, agent.system_prompt, agent.model) == ("Assistant", PROMPT,
                                                              model.model)
    assert agent.model_config == {"temperature": 0.5}
    assert agent.metadata == {"team": "a"}
    assert agent.messages() == () and agent.last_response() is None
    assert await agent.token_usage() == (0, 0)

    agent = await agent.advance("Hello!")
    agent = await agent.advance(user_input="What's 2+2?", top_p=0.9)
    for msg in agent.messages:  # the README's attribute form
        assert msg.role in ("user", "assistant")
    assert [(m.role, m.content) for m in agent.messages()] == [
        ("user", "Hello!"), ("assistant", "Hello to you."),
        ("user", "What's 2+2?"), ("assistant", "4")]
    assert isinstance(agent.messages(), tuple)
    assert agent.last_response() == "4"
    assert await agent.token_usage() == (17, 4)
    assert agent.token_usage() == (17, 4)  # this project's plain call gives the same
    assert model.requests[1].params == {"temperature": 0.5, "top_p": 0.9}
    assert agent.metadata == {"team": "a"}  # carried along, never sent to the model


async def test_simple_agent_clone_and_with_metadata() -> None:
    agent = await SimpleAgent(name="Bot", system_prompt=PROMPT, model=Model.ECHO,
                              metadata={"v": 1}).advance("Hello!")
    twin = agent.clone()
    assert twin is not agent and twin == agent
    assert twin.messages() == agent.messages() and twin.metadata == {"v": 1}
    branch = await twin.advance("Option A")
    assert len(branch.messages()) == 4 and len(agent.messages()) == 2

    tagged = agent.with_metadata({"v": 2})
    assert tagged.metadata == {"v": 2} and agent.metadata == {"v": 1}
    assert tagged.messages() == agent.messages() and tagged != agent
    with pytest.raises(ValidationError) as err:
        agent.with_metadata({"v": float("nan")})
    assert err.value.field == "metadata.v"


@pytest.mark.parametrize(("arguments", "field"), BAD_TURNS)
async def test_simple_agent_bad_advance_arguments_fail_before_any_model_call(
        arguments: dict[str, object], field: str) -> None:
    model = ScriptedModel(["never sent"])
    agent = SimpleAgent(name="Bot", system_prompt=PROMPT, model=model.model)
    arguments = dict(arguments)
    text = arguments.pop("user_input", "Hello!")
    with pytest.raises(ValidationError) as err:
        await agent.advance(text, **arguments)  # type: ignore[arg-type]
    assert err.value.field == field
    assert model.requests == []


@pytest.mark.parametrize(("arguments", "field"), [
    ({"name": ""}, "name"), ({"system_prompt": " "}, "system_prompt"), ({"model": ""}, "model"),
])
def test_simple_agent_rejects_empty_settings(arguments: dict[str, str], field: str) -> None:
    settings: dict[str, Any] = {"name": "Bot", "system_prompt": PROMPT, "model": Model.ECHO,
                                **arguments}
    with pytest.raises(ValidationError) as err:
        SimpleAgent(**settings)
    assert err.value.field == field


# -- Store -------------------------------------------------------------------------------


async def test_connect_with_pool_settings_and_async_with(store_dsn: str) -> None:
    async with await Store.connect(store_dsn, min_size=1, max_size=2,
                                   max_inactive_connection_lifetime=60) as store:
        await store.init_schema()
        assert await store.ping()
        agent = await new_agent(store)
        assert (await store.load_agent(agent.id)).id == agent.id
    assert not await store.ping()  # closed by async with


async def test_list_agents_is_newest_first(store: Store) -> None:
    first = await new_agent(store)
    second = await store.create_agent(name="Other", system_prompt=PROMPT, model=Model.ECHO)
    third = await first.advance("Hello!")
    assert [a.id for a in await store.list_agents()] == [third.id, second.id, first.id]
    assert [a.id for a in await store.list_agents(limit=2)] == [third.id, second.id]
    assert [a.id for a in await store.list_agents(limit=2, offset=2)] == [first.id]


NAMES = ["TestBot", "OtherAgent", "50%_off", "50 percent", "a_b", "axb", "back\\slash"]


@pytest.mark.parametrize(("pattern", "expected"), [
    ("Bot", {"TestBot"}),
    ("bot", {"TestBot"}),             # case-insensitive
    ("TESTBOT", {"TestBot"}),
    ("agent", {"OtherAgent"}),
    ("%", {"50%_off"}),               # % is a character, not a wildcard
    ("_", {"50%_off", "a_b"}),        # _ too
    ("%_", {"50%_off"}),
    ("a_b", {"a_b"}),
    ("\\", {"back\\slash"}),          # and so is the escape character
    ("k\\s", {"back\\slash"}),
    ("nobody", set()),
])
async def test_name_filter_is_a_literal_case_insensitive_substring(
        store: Store, pattern: str, expected: set[str]) -> None:
    for name in NAMES:
        await store.create_agent(name=name, system_prompt=PROMPT, model=Model.ECHO)
    assert {a.name for a in await store.list_agents(name=pattern)} == expected
    assert await store.count_agents(name=pattern) == len(expected)
    assert await store.count_agents() == len(NAMES)


async def test_find_by_name_is_exact(store: Store) -> None:
    await store.create_agent(name="TestBot", system_prompt=PROMPT, model=Model.ECHO)
    await store.create_agent(name="TestBot", system_prompt="Different prompt.",
                             model=Model.ECHO)
    await store.create_agent(name="TestBot2", system_prompt=PROMPT, model=Model.ECHO)
    found = await store.find_by_name("TestBot")
    assert len(found) == 2 and all(a.name == "TestBot" for a in found)
    assert await store.find_by_name("testbot") == []  # case-sensitive
    assert await store.find_by_name("Bot") == []  # not a substring match


async def test_find_by_name_is_newest_first(store: Store) -> None:
    older = await store.create_agent(name="TestBot", system_prompt=PROMPT, model=Model.ECHO)
    newer = await older.advance("Hello!")
    assert [a.id for a in await store.find_by_name("TestBot")] == [newer.id, older.id]


def deleted(result: immagent.GCResult) -> tuple[int, int, int]:
    """0.1.2's gc figures: deleted system prompts, conversations and messages."""
    return (result["text_assets"], result["conversations"],
            result["messages"])


async def test_gc_result_has_the_0_1_2_keys(store: Store) -> None:
    agent = await new_agent(store)
    await store.delete(agent)
    result = await store.gc()
    assert deleted(result) == (1, 1, 0)
    # This project's figures stay on the same object.
    assert result.assets_removed == 2 and result.bytes_freed > 0 and result.assets_kept == 0


async def test_gc_counts_messages_and_keeps_what_is_shared(store: Store) -> None:
    root = await new_agent(store)
    new = await root.advance("Hello!")
    await store.delete(new)
    result = await store.gc()  # root keeps the prompt and the empty conversation
    assert deleted(result) == (0, 1, 2)
    assert result.assets_removed == 3 and result.assets_kept == 2

    await root.clone()
    await store.delete(root)
    assert deleted(await store.gc()) == (0, 0, 0)  # the clone still uses everything


async def test_load_agent_returns_the_live_object(store: Store) -> None:
    agent = await new_agent(store)
    assert await store.load_agent(agent.id) is agent  # created
    new = await agent.advance("Hello!")
    assert await store.load_agent(new.id) is new  # advanced
    twin = await new.clone()
    loaded = await store.load_agents([twin.id, agent.id, new.id])
    assert loaded[0] is twin and loaded[1] is agent and loaded[2] is new

    store.clear_cache()  # drops the guarantee: the next load reads the database
    again = await store.load_agent(agent.id)
    assert again is not agent
    assert (again.id, again.digest) == (agent.id, agent.digest)
    assert await store.load_agent(agent.id) is again  # loaded, so now the live one
    assert (await store.load_agents([agent.id]))[0] is again


async def test_listing_returns_the_live_objects(store: Store) -> None:
    # 0.1.2 builds every agent it returns through its cache, listings included.
    agent = await new_agent(store)
    assert (await store.list_agents())[0] is agent
    assert (await store.find_by_name("Bot"))[0] is agent


async def test_a_deleted_agent_is_not_loaded_while_its_object_lives(store: Store) -> None:
    agent = await new_agent(store)
    await store.delete(agent)
    with pytest.raises(AgentNotFoundError):
        await store.load_agent(agent.id)
    with pytest.raises(AgentNotFoundError):
        await store.load_agents([agent.id])


# -- the rest of 0.1.2's public module names, and its errors --------------------------------


def test_system_prompt_create_and_the_id_and_time_helpers() -> None:
    from immagent.assets import new_id, now

    prompt = SystemPrompt.create("You are terse.")
    assert isinstance(prompt, SystemPrompt) and prompt.text == "You are terse."
    assert SystemPrompt.create("You are terse.").id == prompt.id  # content-derived
    first, second = new_id(), new_id()
    assert isinstance(first, uuid.UUID) and first != second
    before = datetime.now(UTC)
    stamp = now()
    assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert before <= stamp <= datetime.now(UTC)


def test_message_to_litellm_dict_is_the_request_dict() -> None:
    call = ToolCall(id="c1", name="add", arguments='{"a": 1}')
    assert Message.user("hi").to_litellm_dict() == {"role": "user", "content": "hi"}
    assert Message.assistant(None, [call]).to_litellm_dict() == {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 1}'}}]}
    assert Message.tool_result("c1", "2").to_litellm_dict() == {
        "role": "tool", "content": "2", "tool_call_id": "c1"}


def test_tool_to_openai_format_takes_an_mcp_tool_or_its_dict() -> None:
    import mcp.types

    from immagent.mcp import tool_to_openai_format

    schema = {"type": "object", "properties": {"a": {"type": "number"}}}
    expected = {"type": "function", "function": {
        "name": "add", "description": "Add numbers.", "parameters": schema}}
    tool = mcp.types.Tool(name="add", description="Add numbers.", input_schema=schema)
    assert tool_to_openai_format(tool) == expected
    # 0.1.2 passed tool.model_dump(): the MCP wire names.
    assert tool_to_openai_format({"name": "add", "description": "Add numbers.",
                                  "inputSchema": schema}) == expected
    bare = tool_to_openai_format({"name": "ping"})
    assert bare["function"] == {"name": "ping", "description": "",
                                "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(ValidationError):
        tool_to_openai_format({"description": "no name"})


async def test_the_registry_binds_agents_to_their_store(store: Store) -> None:
    from immagent import registry

    agent = await new_agent(store)
    assert registry.get_store(agent) is store
    loose = PersistentAgent(agent.record)  # a record wrapped by hand: bound to nothing
    with pytest.raises(AgentNotRegisteredError):
        registry.get_store(loose)
    with pytest.raises(AgentNotRegisteredError):
        await loose.get_messages()
    assert registry.register_agent(loose, store) is loose
    assert registry.get_store(loose) is store
    newer = await loose.advance("Hello!")
    assert registry.get_store(newer) is store
    assert [m.content for m in await newer.get_messages()] == ["Hello!", "Echo: Hello!"]


@pytest.mark.parametrize("hook", ["from_row", "to_insert_params"])
def test_0_1_2_persistence_hooks_say_what_to_use_instead(hook: str) -> None:
    conversation = Conversation.create([Message.user("a")])
    targets: list[Any] = [Asset, Message, SystemPrompt, Conversation]
    instances: list[Any] = [Message.user("a"), SystemPrompt.create("p"), conversation]
    for target in targets if hook == "from_row" else instances:
        with pytest.raises(ImmAgentError) as err:
            if hook == "from_row":
                target.from_row({"id": uuid.uuid4()})  # a row of 0.1.2's tables
            else:
                target.to_insert_params()
        assert hook in str(err.value) and "store.get_assets" in str(err.value)


def test_conversation_with_messages_takes_message_ids() -> None:
    first, second = Message.user("Hi"), Message.assistant("Hello")
    by_objects = Conversation.create().with_messages(first, second)
    by_ids = Conversation.create().with_messages(first.id, str(second.id))
    assert by_ids == by_objects and by_ids.message_ids == (first.id, second.id)
    with pytest.raises(ValidationError) as err:
        by_ids.with_messages(uuid.uuid4())  # the id of no message this process holds
    assert err.value.field == "messages[0]" and "pass the Message object" in str(err.value)
    with pytest.raises(ValidationError):
        by_ids.with_messages(42)  # type: ignore[arg-type]


def test_tool_execution_error_carries_the_tool_name() -> None:
    seed = ToolExecutionError("search", "Unknown tool")  # 0.1.2's two-argument form
    assert seed.tool_name == "search" and str(seed) == "Tool 'search' failed: Unknown tool"
    ours = ToolExecutionError("the disk is on fire", tool_name="fs")
    assert ours.tool_name == "fs" and str(ours) == "the disk is on fire"
    assert ToolExecutionError("connection aborted").tool_name is None


async def test_an_unknown_tool_says_unknown_tool_and_names_it() -> None:
    async with MCPManager() as mcp:
        with pytest.raises(ToolExecutionError) as err:
            await mcp.execute("sqrt", {"x": 4})
    assert err.value.tool_name == "sqrt" and "Unknown tool" in str(err.value)
