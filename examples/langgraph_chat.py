"""A LangGraph chat checkpointed by immagent, offline: ``python examples/langgraph_chat.py [DSN]``.

The graph is what a LangGraph user writes (a ``messages`` channel with ``add_messages``,
one node); the only immagent line is ``checkpointer=saver``. The node echoes instead of
calling a model, so no API key is needed. The default DSN is a SQLite file in the current
directory; pass ``postgresql://…`` to use PostgreSQL.

It chats three turns, forks the thread from its first turn (LangGraph's time travel: the
fork shares every stored message), prints both threads' histories and the checkpoint
digest, exports the thread as an audit bundle and verifies it offline.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

import immagent
from immagent.integrations.langgraph import ImmAgentSaver


class ChatState(TypedDict):
    """The graph's state: the conversation."""

    messages: Annotated[list[AnyMessage], add_messages]


def reply(state: ChatState) -> dict[str, list[AnyMessage]]:
    """The node: answer the last message (a real graph would call a model here)."""
    return {"messages": [AIMessage(content=f"Echo: {state['messages'][-1].content}")]}


def build_graph(saver: ImmAgentSaver) -> Any:
    """START -> reply -> END, checkpointed by ``saver``."""
    builder = StateGraph(ChatState)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


async def main(dsn: str = "sqlite:///langgraph_chat.db") -> list[str]:
    """Chat, fork, audit; returns the forked thread's messages."""
    thread: RunnableConfig = {"configurable": {"thread_id": "demo"}}
    async with ImmAgentSaver.from_conn_string(dsn) as saver:
        await saver.setup()
        graph = build_graph(saver)
        for text in ("Hello!", "What can you do?", "Thanks."):
            await graph.ainvoke({"messages": [HumanMessage(content=text)]}, thread)

        # Time travel: continue from the end of the first turn instead of the last.
        history = [s async for s in graph.aget_state_history(thread)]
        first_turn = next(s for s in reversed(history) if len(s.values["messages"]) == 2)
        forked = await graph.ainvoke({"messages": [HumanMessage(content="Another path?")]},
                                     first_turn.config)

        for m in forked["messages"]:
            print(f"{m.type}: {m.content}")
        digest = await saver.adigest(thread)
        assert digest is not None
        print(f"newest checkpoint digest: {digest.hex()}")

        with tempfile.TemporaryDirectory() as tmp:
            info = await saver.aexport("demo", Path(tmp) / "demo.bundle")
            checked = immagent.verify_bundle(info.path)
            print(f"bundle: {len(checked.agents)} states, {checked.assets} assets, verified")
        report = await saver.store.verify()
        print("store verify:", "OK" if report.ok else report.lines())
        return [str(m.content) for m in forked["messages"]]


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
