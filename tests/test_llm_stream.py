"""immagent.llm.stream: streamed replies become the same Message as whole ones. Every test
runs on both paths: offline models answered in-process and through LiteLLM's real
streaming path (``acompletion(stream=True)``, its CustomStreamWrapper, usage in the stream)."""

from __future__ import annotations

from typing import Any

import pytest

from immagent.assets import Message, ToolCall
from immagent.exceptions import LLMError, ValidationError
from immagent.llm import Model, bind, complete, stream, to_litellm_messages
from immagent.testing import Reply, ScriptedModel, litellm_error
from tests.conftest import FAST, USER

pytestmark = pytest.mark.usefixtures("offline_path")  # every test on both paths


async def streamed(model: str, **kwargs: Any) -> tuple[list[str], Message]:
    """The pieces of one streamed reply and its Message (which must come last, once)."""
    pieces: list[str] = []
    messages: list[Message] = []
    async for item in stream(model, "sys", kwargs.pop("messages", USER), **kwargs):
        if isinstance(item, Message):
            messages.append(item)
        else:
            assert not messages, "text after the Message"
            pieces.append(item)
    assert len(messages) == 1
    return pieces, messages[0]


async def test_echo_streams_word_by_word_into_the_message_complete_gives() -> None:
    pieces, message = await streamed(Model.ECHO, config={"temperature": 0.5})
    assert pieces == ["Echo:", " hello", " there"]
    whole = await complete(Model.ECHO, "sys", USER, config={"temperature": 0.5})
    assert message == whole
    assert message.digest == whole.digest
    assert (message.input_tokens, message.output_tokens) == (3, 3)
    assert message.call_config == {"temperature": 0.5}


async def test_scripted_chunks_and_usage_arrive_as_scripted() -> None:
    model = ScriptedModel([Reply(chunks=["Hel", "lo, ", "world"], input_tokens=7,
                                 output_tokens=9)])
    pieces, message = await streamed(model.model, config={"temperature": 0.5})
    assert pieces == ["Hel", "lo, ", "world"]
    assert message.content == "Hello, world"
    assert (message.input_tokens, message.output_tokens) == (7, 9)
    (request,) = model.requests
    assert request.stream is True
    # stream and stream_options are set by immagent, not model parameters of the user's.
    assert request.params == {"temperature": 0.5}


async def test_streamed_tool_calls_are_joined_from_their_fragments() -> None:
    reply = Reply(text="Let me work.", tool_calls=[ToolCall("c1", "add", '{"a": 1, "b": 2}'),
                                                   ToolCall("c2", "neg", '{"x": 3}')])
    model = ScriptedModel([reply, reply])
    pieces, message = await streamed(model.model)
    whole = await complete(model.model, "sys", USER)
    assert "".join(pieces) == "Let me work."
    assert message.tool_calls == whole.tool_calls == (
        ToolCall("c1", "add", '{"a": 1, "b": 2}'), ToolCall("c2", "neg", '{"x": 3}'))
    assert message == whole and message.digest == whole.digest


async def test_a_reply_with_only_tool_calls_has_no_content() -> None:
    model = ScriptedModel([Reply.call("add", a=1, b=2)])
    pieces, message = await streamed(model.model)
    assert pieces == []
    assert message.content is None
    assert message.tool_calls is not None and message.tool_calls[0].name == "add"


async def test_a_stream_that_breaks_after_text_is_an_llm_error_not_retried() -> None:
    model = ScriptedModel([Reply(chunks=["partial ", "reply"],
                                 error=litellm_error("rate_limit", "the line went dead")),
                           "never sent"])
    with pytest.raises(LLMError, match=r"broke off after 2 chunk\(s\)") as info:
        await streamed(model.model, max_retries=3, retry_delay=FAST)
    assert "the line went dead" in str(info.value)
    assert len(model.requests) == 1 and model.remaining == 1


async def test_a_failure_before_the_first_piece_is_retried() -> None:
    model = ScriptedModel([Reply.fail(litellm_error("unavailable", "busy")), "recovered"])
    pieces, message = await streamed(model.model, max_retries=1, retry_delay=FAST)
    assert pieces == ["recovered"] and message.content == "recovered"
    assert len(model.requests) == 2


async def test_a_permanent_failure_is_not_retried() -> None:
    model = ScriptedModel([Reply.fail(litellm_error("auth", "invalid x-api-key")), "never"])
    with pytest.raises(LLMError, match="invalid x-api-key"):
        await streamed(model.model, max_retries=3, retry_delay=FAST)
    assert model.remaining == 1


async def test_timeout_bounds_each_chunk_not_the_whole_stream() -> None:
    # LiteLLM's first call in a process sets itself up (lazy imports, a tokenizer: about a
    # second) inside that call's first wait; done here, so only the scripted gaps are timed.
    await streamed(Model.ECHO)
    # 12 chunks 0.1 s apart: the stream takes twice the timeout, each gap a sixth of it.
    slow = ScriptedModel([Reply(chunks=["x"] * 12, chunk_delay=0.1)])
    pieces, _ = await streamed(slow.model, timeout=0.6, max_retries=0)
    assert len(pieces) == 12
    # Three chunks at once, then one gap over the timeout: the stream breaks there.
    stalled = ScriptedModel([Reply(chunks=["a", "b", "c", "d"], chunk_delays=[0, 0, 0, 30])])
    with pytest.raises(LLMError, match=r"broke off after 3 chunk\(s\): no reply within 0\.6 s"):
        await streamed(stalled.model, timeout=0.6, max_retries=0)
    stuck = ScriptedModel([Reply(chunks=["a", "b"], chunk_delay=30)])
    with pytest.raises(LLMError, match=r"failed after 1 attempt\(s\): no reply within 0\.05 s"):
        await streamed(stuck.model, timeout=0.05, max_retries=0)


def test_uneven_gaps_are_one_number_of_seconds_per_chunk() -> None:
    assert Reply(chunks=["a", "", "b"], chunk_delays=[0.5, 0]).text == "ab"
    for gaps in ([0.1], [0.1, 0.1, 0.1], [0.1, -1], [0.1, float("nan")]):
        with pytest.raises(ValidationError, match=r"chunk_delays.*per chunk \(2\)"):
            Reply(chunks=["a", "b"], chunk_delays=gaps)


async def test_echo_delay_makes_the_echo_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMAGENT_ECHO_DELAY", "0.001")
    pieces, message = await streamed(Model.ECHO)
    assert pieces == ["Echo:", " hello", " there"] and message.content == "Echo: hello there"
    monkeypatch.setenv("IMMAGENT_ECHO_DELAY", "soon")
    with pytest.raises(LLMError, match="IMMAGENT_ECHO_DELAY"):
        await streamed(Model.ECHO, max_retries=0)


@pytest.mark.parametrize("config", [{"stream": True}, {"stream_options": {"x": 1}}])
async def test_stream_keys_stay_reserved(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        await streamed(Model.ECHO, config=config)
    assert info.value.field == "config"


async def test_bound_model_streams_and_builds_the_interrupted_message() -> None:
    bound = bind(Model.ECHO, "sys", {"temperature": 0})
    items = [item async for item in bound.stream(USER, None)]
    assert items[:-1] == ["Echo:", " hello", " there"]
    assert items[-1] == await bound(USER, None)
    cut = bound.interrupted("Echo: hel")
    assert (cut.content, cut.interrupted, cut.model, cut.call_config) == (
        "Echo: hel", True, "immagent/echo", {"temperature": 0})
    assert bound.interrupted("").content is None


def test_an_assistant_message_without_text_or_calls_is_not_sent() -> None:
    cut = Message(role="assistant", interrupted=True)
    kept = Message(role="assistant", content="half a rep", interrupted=True)
    sent = to_litellm_messages("", [USER[0], cut, kept])
    assert sent == [{"role": "user", "content": "hello there"},
                    {"role": "assistant", "content": "half a rep"}]
