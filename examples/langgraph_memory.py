"""A LangGraph graph with long-term memory, offline: ``python examples/langgraph_memory.py [DSN]``.

The checkpointer (``ImmAgentSaver``: each thread's state) and the store (``ImmAgentStore``:
memories that cross threads) share one immagent database, here one ``Store``. The node
remembers what the user says and answers with how much it knows about them, so no API key
is needed. The default DSN is a SQLite file in the current directory; pass
``postgresql://…`` to use PostgreSQL.

Two threads talk to the same user; the second thread knows what the first was told.
Then the memory's history (every put is kept), a bundle of it verified offline, and one
``verify`` of the whole database (checkpoints and memories alike).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime

import immagent
from immagent.integrations.langgraph import ImmAgentSaver
from immagent.integrations.langgraph_store import ImmAgentStore


class ChatState(TypedDict):
    """A thread's state: its conversation."""

    messages: Annotated[list[AnyMessage], add_messages]


class User(TypedDict):
    """Who the graph talks to (LangGraph's run context)."""

    user: str


async def remember(state: ChatState, runtime: Runtime[User]) -> dict[str, Any]:
    """Keep the user's message as a memory and say how many memories there are."""
    assert runtime.store is not None
    namespace = ("memories", runtime.context["user"])
    known = await runtime.store.asearch(namespace, limit=100)
    await runtime.store.aput(namespace, f"fact-{len(known) + 1}",
                             {"text": str(state["messages"][-1].content)})
    return {"messages": [AIMessage(content=f"I know {len(known) + 1} things about you")]}


def build_graph(saver: ImmAgentSaver, memory: ImmAgentStore) -> Any:
    """START -> remember -> END, checkpointed by ``saver``, remembering in ``memory``."""
    builder = StateGraph(ChatState, context_schema=User)
    builder.add_node("remember", remember)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", END)
    return builder.compile(checkpointer=saver, store=memory)


async def main(dsn: str = "sqlite:///langgraph_memory.db") -> None:
    """Talk on two threads, then show the memories, their history and the audits."""
    async with await immagent.Store.connect(dsn) as store:
        await store.init_schema()
        memory = ImmAgentStore(store)
        graph = build_graph(ImmAgentSaver(store), memory)
        for thread, text in (("monday", "I like green tea"), ("tuesday", "I live in Lyon")):
            out = await graph.ainvoke({"messages": [HumanMessage(content=text)]},
                                      {"configurable": {"thread_id": thread}},
                                      context={"user": "ada"})
            print(f"[{thread}] {text} -> {out['messages'][-1].content}")

        for item in await memory.asearch(("memories", "ada")):
            print(f"memory {item.key}: {item.value['text']}")
        await memory.aput(("memories", "ada"), "fact-1", {"text": "I like black tea"})
        for version in await memory.ahistory(("memories", "ada"), "fact-1"):
            print(f"fact-1 {version.change} at {version.at:%H:%M:%S}: {version.value}")

        with tempfile.TemporaryDirectory() as tmp:
            info = await memory.aexport(Path(tmp) / "ada.bundle", ("memories", "ada"))
            checked = immagent.verify_bundle(info.path)
            print(f"bundle: {len(checked.agents)} states, {checked.assets} values, verified")
        report = await store.verify()
        print("verify:", "OK" if report.ok else report.lines())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
