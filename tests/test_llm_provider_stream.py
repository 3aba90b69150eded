"""A real LiteLLM provider (``openai/...``) streaming from a local OpenAI-compatible HTTP
server: server-sent events, usage in the stream, tool-call fragments, a connection that
drops mid-reply. The streamed reply must be the same Message as the whole one."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from immagent.assets import Message, ToolCall
from immagent.exceptions import LLMError
from immagent.llm import complete, stream

# LiteLLM reads pydantic attributes the deprecated way when it rebuilds tool calls.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

USER = [Message(role="user", content="hello")]
MODEL = "openai/gpt-4o-mini"


class FakeOpenAI(ThreadingHTTPServer):
    """Answers /v1/chat/completions with ``reply`` (whole or as SSE chunks)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.text: list[str] = ["Hel", "lo ", "there"]
        self.calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces
        self.usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        self.drop_after: int | None = None  # chunks sent before the connection drops

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def whole(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": "".join(a)}}
                for i, n, a in self.calls]
        return {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if self.calls else "stop"}],
                "usage": self.usage}

    def chunks(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                    "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        for piece in self.text:
            yield chunk({"content": piece})
        for index, (call_id, name, pieces) in enumerate(self.calls):
            for j, piece in enumerate(pieces):
                head = {"id": call_id, "type": "function"} if j == 0 else {}
                function = {"name": name, "arguments": piece} if j == 0 else {"arguments": piece}
                yield chunk({"tool_calls": [{"index": index, **head, "function": function}]})
        yield chunk({}, "tool_calls" if self.calls else "stop")
        if include_usage:
            yield {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-4o-mini", "choices": [], "usage": self.usage}


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if not body.get("stream"):
            data = json.dumps(self.server.whole()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        for n, chunk in enumerate(self.server.chunks(include)):
            if self.server.drop_after is not None and n == self.server.drop_after:
                self.wfile.flush()
                self.connection.shutdown(2)  # the line goes dead mid-reply
                return
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_BASE", fake.url)
    yield fake
    fake.shutdown()
    fake.server_close()


async def streamed(**kwargs: Any) -> tuple[list[str], Message]:
    items = [item async for item in stream(MODEL, "Be brief.", USER, max_retries=0, **kwargs)]
    message = items[-1]
    assert isinstance(message, Message)
    return [i for i in items[:-1] if isinstance(i, str)], message


async def test_a_provider_stream_gives_the_message_a_whole_reply_gives(
        server: FakeOpenAI) -> None:
    pieces, message = await streamed(config={"temperature": 0.5})
    whole = await complete(MODEL, "Be brief.", USER, max_retries=0,
                           config={"temperature": 0.5})
    assert pieces == ["Hel", "lo ", "there"]
    assert (message.content, message.input_tokens, message.output_tokens) == ("Hello there",
                                                                              5, 3)
    assert message == whole and message.digest == whole.digest
    asked = server.requests[0]
    assert asked["stream"] is True and asked["stream_options"] == {"include_usage": True}
    assert asked["temperature"] == 0.5 and "stream" not in server.requests[1]


async def test_provider_tool_call_fragments_are_joined(server: FakeOpenAI) -> None:
    server.text = []
    server.calls = [("call_a", "add", ['{"a": ', '1, "b"', ': 2}']),
                    ("call_b", "neg", ['{"x": 3}'])]
    pieces, message = await streamed()
    whole = await complete(MODEL, "Be brief.", USER, max_retries=0)
    assert pieces == [] and message.content is None
    assert message.tool_calls == (ToolCall("call_a", "add", '{"a": 1, "b": 2}'),
                                  ToolCall("call_b", "neg", '{"x": 3}'))
    assert message == whole and message.digest == whole.digest


async def test_a_provider_stream_that_drops_mid_reply_is_an_llm_error(
        server: FakeOpenAI) -> None:
    server.drop_after = 3  # the role chunk and two pieces of text
    seen: list[str] = []
    with pytest.raises(LLMError, match="broke off after 2 chunk"):
        async for item in stream(MODEL, "Be brief.", USER, max_retries=2, retry_delay=0.001):
            if isinstance(item, str):
                seen.append(item)
    assert seen == ["Hel", "lo "]
    assert len(server.requests) == 1  # not retried once text was handed out
