"""An OpenAI Agents SDK agent whose memory is an immagent session, offline:
``python examples/openai_agents_session.py [path.db | postgresql://…]``.

The agent runs three turns (one calls a tool) through the real ``Runner.run`` with the
SDK's offline ``ScriptedModel`` (no API key, no network); ``ImmAgentSession`` keeps every
state of the conversation. Then it undoes the last answer with ``pop_item`` (the earlier
state stays stored) and forks the session at turn 2, sharing its items.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from agents import Agent, RunConfig, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from immagent.integrations.openai_agents import ImmAgentSession


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def offline_model() -> ScriptedModel:
    """What a model would answer in this demo: a greeting, a tool call, then its result."""
    return ScriptedModel([
        [assistant_message("Hello! Ask me some arithmetic.")],
        [function_call("add", {"a": 2, "b": 3}, call_id="call_1")],
        [assistant_message("2 + 3 = 5")],
        [assistant_message("Goodbye!")],
    ])


async def main(db: str | None = None) -> ImmAgentSession:
    """Run the demo on ``db`` (default: a temporary SQLite file); returns the session,
    closed."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ImmAgentSession("demo-user", db or str(Path(tmp) / "sessions.db"))
        try:
            agent = Agent(name="Calculator", instructions="Be brief.", model=offline_model(),
                          tools=[add])
            for text in ("Hi!", "What is 2 + 3?", "Thanks, bye."):
                result = await Runner.run(agent, text, session=session,
                                          run_config=RunConfig(tracing_disabled=True))
                print(f"user: {text}\nagent: {result.final_output}")

            items = await session.get_items()
            print(f"\nthe session holds {len(items)} items")
            undone = await session.pop_item()
            print(f"pop_item() took back: {undone}")
            states = await session.list_states()
            print(f"{len(states)} states stored; the one before the pop still holds "
                  f"{len(await session.get_state_items(states[1]))} items")

            fork = await session.fork("demo-user-retry", at_turn=2)
            print(f"a fork at turn 2 holds {len(await fork.get_items())} items, sharing them")
            state = await fork.current_state()
            assert state is not None
            print(f"the fork's state digest: {state.digest.hex()[:16]}…")
            fork.close()
        finally:
            session.close()
    return session


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
