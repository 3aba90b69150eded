"""ImmAgentConversationStore beside pydantic-ai-harness's SQLite conversation store.

The peer is the SQLite store pydantic-ai-harness ships for conversations
(``step_persistence.conversations.SqliteConversationStore``: one row per conversation
holding its whole message list, rewritten by every save). pydantic-ai's own
``InMemoryConversationStore`` is timed beside both, for reference (it holds Python
objects: no bytes, no I/O). Every store is given the same messages: one turn is a
``ModelRequest`` (a user prompt of ``USER_BYTES``) and a ``ModelResponse`` (its reply)
with the fields a real ``Agent.run`` gives them (the templates come from one run with
pydantic-ai's ``FunctionModel``), saved after each turn as an application saves around
``agent.run``: ours and the in-memory one through ``ConversationStore.save`` (only the new
messages), the harness's through its ``save`` (the whole list: its API).

Measured at N turns (default 1000), on one SQLite file each:

* **bytes**: the file after ``PRAGMA wal_checkpoint(TRUNCATE)``; ours keeps every state
  (each save loadable), the harness only the latest list; and compacted (``VACUUM INTO``),
  since page fill differs (ours inserts by digest, in random key order);
* **cold load** of the whole conversation (p50/p99), as a new process would: ours a new
  ``ImmAgentConversationStore`` on an open store whose cache is cleared first (and, for
  information, one opening its store from the path each time), the harness a new
  ``SqliteConversationStore`` (it opens a connection per call anyway); samples alternate,
  one side then the other, so load from elsewhere on the machine falls on all alike;
* **save** of one more turn on the N-turn conversation (p50), alternating likewise.

The harness's save rewrites the whole list (about a second at 1000 turns here), so growing
it turn by turn takes minutes: ``make bench`` saves it every 10th turn (the same 1000
turns, 100 rewrites instead of 1000: its file then holds fewer free pages than it would),
``make bench-full`` every turn.

Run alone: ``python -m benchmarks.pydantic_ai_conversations [--turns 1000] [--samples 30]
[--harness-every 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationStore, InMemoryConversationStore
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai_harness.step_persistence.conversations import (
    ConversationSummary,
    SqliteConversationStore,
)

from benchmarks.common import (
    Latency,
    System,
    compacted_sqlite_bytes,
    fmt_bytes,
    print_table,
    reply_text,
    sqlite_file_bytes,
    user_text,
)
from immagent import Store
from immagent.ids import uuid7
from immagent.integrations.pydantic_ai import ImmAgentConversationStore

__all__ = ["ConversationResults", "report", "run"]

CID = "bench"
OURS, HARNESS, MEMORY = "immagent", "pydantic-ai-harness sqlite", "pydantic-ai in-memory"
_SYSTEMS: dict[str, System] = {OURS: "immagent", HARNESS: "pydantic-ai-harness",
                               MEMORY: "pydantic-ai"}


def _timing(store: str, operation: str, turns: int, samples: list[float]) -> Latency:
    return Latency("sqlite", operation, turns, tuple(samples), _SYSTEMS[store])


@dataclass
class ConversationResults:
    """Every figure of one run: bytes by label, then latencies."""

    turns: int
    samples: int
    harness_every: int = 1
    sizes: dict[str, int] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"turns": self.turns, "samples": self.samples,
                "harness_saved_every": self.harness_every, "bytes": self.sizes,
                "latency": [t.as_dict() for t in self.latency]}


def _templates() -> tuple[ModelRequest, ModelResponse]:
    """A request and a response as a real run makes them (every field filled in)."""

    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("template")])

    agent = Agent(FunctionModel(reply, model_name="support"), instructions="Be brief.")
    result = agent.run_sync("template", conversation=Conversation(conversation_id=CID))
    request, response = result.new_messages()
    assert isinstance(request, ModelRequest) and isinstance(response, ModelResponse)
    return request, response


def turn_messages(templates: tuple[ModelRequest, ModelResponse], turn: int
                  ) -> list[ModelMessage]:
    """Turn ``turn``'s request and response: the templates with this turn's texts, times
    and run id."""
    request, response = templates
    now, run_id = datetime.now(UTC), str(uuid7())
    user = user_text(CID, turn)
    prompt = request.parts[0]
    assert isinstance(prompt, UserPromptPart)
    return [
        dataclasses.replace(request, timestamp=now, run_id=run_id, parts=[
            dataclasses.replace(prompt, content=user, timestamp=now)]),
        dataclasses.replace(response, timestamp=now, request_timestamp=now, run_id=run_id,
                            parts=[TextPart(reply_text(user))]),
    ]


class _Harness:
    """The harness store and the summary its next save must start from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteConversationStore(database=path)
        self.summary = ConversationSummary(id=CID, workspace=str(path.parent))
        self.messages: list[ModelMessage] = []

    async def save(self, messages: Sequence[ModelMessage], *, write: bool = True) -> None:
        """Add ``messages``; save the whole list (its API) unless ``write`` is False."""
        self.messages.extend(messages)
        if write:
            self.summary = await self.store.save(summary=self.summary, messages=self.messages)


async def _save_ours(store: ConversationStore, conversation: Conversation,
                     messages: Sequence[ModelMessage]) -> None:
    conversation.messages.extend(messages)
    await store.save(conversation)


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def run(turns: int = 1000, samples: int = 30,
              harness_every: int = 1) -> ConversationResults:
    """Grow the conversation to ``turns`` turns in every store (the harness's saved every
    ``harness_every`` turns, and after the last), then measure."""
    res = ConversationResults(turns, samples, harness_every)
    templates = await asyncio.to_thread(_templates)
    with tempfile.TemporaryDirectory(prefix="immagent-pydantic-ai-") as tmp:
        ours_path, theirs_path = Path(tmp) / "immagent.db", Path(tmp) / "harness.db"
        harness = _Harness(theirs_path)
        memory = InMemoryConversationStore()
        mem_conversation = Conversation(conversation_id=CID)
        async with await Store.connect(ours_path) as opened:
            await opened.init_schema()
            ours = ImmAgentConversationStore(opened)
            conversation = Conversation(conversation_id=CID)
            for turn in range(turns):
                messages = turn_messages(templates, turn)
                await _save_ours(ours, conversation, messages)
                await harness.save(messages, write=(turn + 1) % harness_every == 0
                                   or turn == turns - 1)
                await _save_ours(memory, mem_conversation, messages)
            res.sizes[f"{OURS}, {turns} turns"] = sqlite_file_bytes(ours_path)
            res.sizes[f"{HARNESS}, {turns} turns"] = sqlite_file_bytes(theirs_path)
            res.sizes[f"{OURS}, {turns} turns, compacted"] = compacted_sqlite_bytes(ours_path)
            res.sizes[f"{HARNESS}, {turns} turns, compacted"] = compacted_sqlite_bytes(
                theirs_path)

            async def ours_cold() -> None:
                opened.clear_cache()
                loaded = await ImmAgentConversationStore(opened).load(CID)
                assert loaded is not None and len(loaded.messages) == 2 * turns

            async def ours_opening() -> None:
                async with ImmAgentConversationStore(ours_path) as fresh:
                    loaded = await fresh.load(CID)
                    assert loaded is not None and len(loaded.messages) == 2 * turns

            async def theirs_cold() -> None:
                saved = await SqliteConversationStore(database=theirs_path).get(
                    conversation_id=CID)
                assert len(saved.messages) == 2 * turns

            async def memory_load() -> None:
                loaded = await memory.load(CID)
                assert loaded is not None and len(loaded.messages) == 2 * turns

            cold: dict[str, list[float]] = {OURS: [], HARNESS: [], MEMORY: [], "opening": []}
            await ours_cold()  # warm imports and code paths; not a sample
            await theirs_cold()
            for _ in range(samples):
                cold[OURS].append(await _timed(ours_cold))
                cold[HARNESS].append(await _timed(theirs_cold))
                cold[MEMORY].append(await _timed(memory_load))
            for _ in range(max(3, samples // 5)):
                cold["opening"].append(await _timed(ours_opening))
            res.latency += [_timing(OURS, "cold load", turns, cold[OURS]),
                            _timing(OURS, "cold load, opening the store", turns,
                                    cold["opening"]),
                            _timing(HARNESS, "cold load", turns, cold[HARNESS]),
                            _timing(MEMORY, "load", turns, cold[MEMORY])]

            saves: dict[str, list[float]] = {OURS: [], HARNESS: []}
            for extra in range(samples):
                messages = turn_messages(templates, turns + extra)
                saves[OURS].append(await _timed(
                    lambda m=messages: _save_ours(ours, conversation, m)))  # type: ignore[misc]
                saves[HARNESS].append(await _timed(lambda m=messages: harness.save(m)))  # type: ignore[misc]
            res.latency += [_timing(OURS, "save one turn", turns, saves[OURS]),
                            _timing(HARNESS, "save one turn", turns, saves[HARNESS])]
            assert (await opened.verify()).ok
    return res


def _peer_operation(operation: str) -> str:
    """The harness's operation a timing is compared with."""
    return operation if operation == "save one turn" else "cold load"


def report(res: ConversationResults) -> None:
    """Print the tables."""
    n = res.turns
    ours, theirs = res.sizes[f"{OURS}, {n} turns"], res.sizes[f"{HARNESS}, {n} turns"]
    every = "" if res.harness_every == 1 else f"; harness saved every {res.harness_every} turns"
    print_table(f"pydantic-ai conversations: bytes after {n} turns (SQLite file{every})",
                ["store", "file", "compacted", "per turn", "vs harness"], [
                    [name, fmt_bytes(res.sizes[f"{name}, {n} turns"]),
                     fmt_bytes(res.sizes[f"{name}, {n} turns, compacted"]),
                     fmt_bytes(res.sizes[f"{name}, {n} turns"] / n),
                     f"{res.sizes[f'{name}, {n} turns'] / theirs:.2f}x"]
                    for name in (OURS, HARNESS)])
    base = {t.operation: t.p50 for t in res.latency if t.system == "pydantic-ai-harness"}
    rows = [[t.system, t.operation, f"{t.p50 * 1000:.1f}", f"{t.p99 * 1000:.1f}",
             f"{t.p50 / base[_peer_operation(t.operation)]:.2f}x"] for t in res.latency]
    print_table(f"pydantic-ai conversations: latency at {n} turns, ms (samples alternate)",
                ["system", "operation", "p50", "p99", "p50 vs harness"], rows)
    print(f"(ours keeps all {n} saved states, each loadable; the harness keeps the latest "
          f"list: {ours / theirs:.2f}x its bytes)")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pydantic_ai_conversations")
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--harness-every", type=int, default=1,
                        help="save the harness's store every N turns while growing it")
    args = parser.parse_args(argv)
    report(asyncio.run(run(args.turns, args.samples, args.harness_every)))


if __name__ == "__main__":
    main()
