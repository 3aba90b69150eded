"""A store written by all three clients, with the real packages: PersistentAgent (the echo
model), a LangGraph graph checkpointed by ImmAgentSaver, and the OpenAI Agents SDK's
Runner with ImmAgentSession (its own offline ScriptedModel). Built once per backend per
test module; tests that change it work on a copy (``copy_store``)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

import psycopg
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

import immagent

#: What the store holds, by conversation: turns (user messages) and messages/items.
AGENT_TURNS = {"assistant": 3, "helper": 1}
THREAD_TURNS = {"t-1": 3, "t-2": 1}
#: user-42: two turns, then pop_item (3 items left), then a branch at turn 2.
SESSION_TURNS = {"user-42": 2, "user-7": 1}
#: A name both a thread and a session use: a bare reference to it is ambiguous.
SHARED = "shared"
LONG = "A long question that repeats itself so that it compresses. " * 20


@dataclass
class Written:
    """A store written by the three clients, and the ids the tests need."""

    dsn: str
    backend: str
    agents: dict[str, str] = field(default_factory=dict)  # name -> newest state id
    first_agent_state: str = ""  # the oldest state of "assistant"


class ChatState(TypedDict):
    """A LangGraph chat's state: its messages."""

    messages: Annotated[list[AnyMessage], add_messages]


def _reply(state: ChatState) -> dict[str, list[AnyMessage]]:
    return {"messages": [AIMessage(content=f"Echo: {state['messages'][-1].content}")]}


def _graph(saver: Any) -> Any:
    builder = StateGraph(ChatState)
    builder.add_node("reply", _reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


async def _write(dsn: str, written: Written) -> None:
    from agents import Agent, RunConfig, Runner
    from agents.testing import ScriptedModel, assistant_message

    from immagent.integrations.langgraph import ImmAgentSaver
    from immagent.integrations.openai_agents import ImmAgentSession

    async with await immagent.Store.connect(dsn) as store:
        await store.init_schema()
        # PersistentAgent: "assistant" (3 turns, one of them long), "helper" (1 turn).
        agent = await store.create_agent("assistant", "Be nice.", immagent.Model.ECHO)
        written.first_agent_state = str(agent.id)
        for text in ("Hello", LONG, "Bye"):
            agent = await agent.advance(text)
        written.agents["assistant"] = str(agent.id)
        helper = await (await store.create_agent("helper", "Help.", immagent.Model.ECHO)
                        ).advance("Help me")
        written.agents["helper"] = str(helper.id)
        # LangGraph: threads t-1 (3 turns), t-2 (1 turn), "shared" (1 turn).
        graph = _graph(ImmAgentSaver(store))
        for thread, turns in [*THREAD_TURNS.items(), (SHARED, 1)]:
            for i in range(turns):
                await graph.ainvoke({"messages": [HumanMessage(content=f"{thread} turn {i}")]},
                                    {"configurable": {"thread_id": thread}})
        # Agents SDK: user-42 (2 turns, a pop, a branch), user-7 (1 turn), "shared".
        config = RunConfig(tracing_disabled=True)
        for session_id, turns in [*SESSION_TURNS.items(), (SHARED, 1)]:
            session = ImmAgentSession(session_id, store)
            model = ScriptedModel([[assistant_message(f"Reply {i}")] for i in range(turns)])
            agent_sdk = Agent(name="A", model=model)
            for i in range(turns):
                await Runner.run(agent_sdk, f"{session_id} asks {i}", session=session,
                                 run_config=config)
            if session_id == "user-42":
                await session.pop_item()
                await session.create_branch_from_turn(2, "retry")
            session.close()


def build(dsn: str, backend: str) -> Written:
    """Write the three clients' conversations into the (empty) store at ``dsn``."""
    written = Written(dsn, backend)
    asyncio.run(_write(dsn, written))
    return written


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def three_clients(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Written]:
    """A store written by all three clients, once per backend for the module."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("three") / "three.db"
        yield build(f"sqlite:///{path}", "sqlite")
        return
    from tests.conftest import _server_dsn

    server = _server_dsn()
    name = f"immagent_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(server)
    params["dbname"] = name
    try:
        yield build(psycopg.conninfo.make_conninfo(**params), "postgres")  # type: ignore[arg-type]
    finally:
        _drop(server, name)


def copy_store(written: Written, tmp_path: Path) -> Iterator[str]:
    """A DSN of a private copy of ``written``'s store (for tests that change it)."""
    if written.backend == "sqlite":
        source = Path(written.dsn.removeprefix("sqlite:///"))
        with sqlite3.connect(source) as conn:  # fold the WAL in, so the file is whole
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        target = tmp_path / "copy.db"
        shutil.copyfile(source, target)
        yield f"sqlite:///{target}"
        return
    from tests.conftest import _server_dsn

    server = _server_dsn()
    source_name = psycopg.conninfo.conninfo_to_dict(written.dsn)["dbname"]
    name = f"immagent_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source_name}"')
    params = psycopg.conninfo.conninfo_to_dict(server)
    params["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        _drop(server, name)


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
