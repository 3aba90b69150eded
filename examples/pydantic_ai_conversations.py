"""A pydantic-ai agent whose conversations live in an immagent store, offline:
``python examples/pydantic_ai_conversations.py [path.db | postgresql://…]``.

The agent answers two turns through the real ``Agent.run`` with pydantic-ai's offline
``FunctionModel`` (no API key, no network); ``ImmAgentConversationStore`` loads and saves
the conversation around each run, keeping every state. Then it titles the conversation,
forks it after the first turn to try another question (the fork shares the first turn's
entries), lists the user's conversations, and writes an audit bundle that verifies
offline.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import immagent
from immagent.integrations.pydantic_ai import ImmAgentConversationStore


def support_desk(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """What a model would answer in this demo: it counts the questions it has seen."""
    asked = sum(1 for m in messages if m.kind == "request")
    return ModelResponse(parts=[TextPart(f"Answer #{asked}: have you tried turning it off "
                                         "and on again?")])


async def demo(db: str) -> None:
    """The demo on the store at ``db``."""
    agent = Agent(FunctionModel(support_desk), instructions="You are a support desk.")
    async with ImmAgentConversationStore(db) as store:
        cid = "support-1"
        for question in ("My printer is jammed.", "It still is."):
            conversation = (await store.load(cid, scope="user-42")
                            or Conversation(conversation_id=cid))
            result = await agent.run(question, conversation=conversation)
            await store.save(result, scope="user-42")
            print(f"user: {question}\nagent: {result.output}")

        await store.update(cid, title="Printer trouble", expected_title=None)
        retry = await store.fork(cid, at=2, new_conversation_id="support-1-retry")
        result = await agent.run("Which paper should I use?", conversation=retry)
        await store.save(result)
        print(f"\nforked after the first turn: {result.output}")

        print("\nuser-42's conversations, most recent first:")
        for record in await store.list_conversations(scope="user-42"):
            states = await store.list_states(record.conversation_id)
            print(f"  {record.conversation_id}: {record.title or '(untitled)'}, "
                  f"model requests: {record.usage.requests}, {len(states)} stored states, "
                  f"digest {states[0].digest.hex()[:16]}…")

        bundle = Path(db).with_suffix(".bundle") if "://" not in db else None
        if bundle is not None:
            await store.export(cid, bundle)
            info = immagent.verify_bundle(bundle)
            print(f"\naudit bundle {bundle.name}: {len(info.agents)} states, {info.assets} "
                  "assets, verified offline")


def main(db: str | None = None) -> None:
    """Run the demo on ``db`` (default: a temporary SQLite file)."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(demo(db or str(Path(tmp) / "conversations.db")))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
