"""A two-turn chat with SimpleAgent, offline: ``python examples/simple_chat.py [model]``.

The default model is ``immagent/echo``, the offline test double that answers
"Echo: <your input>"; pass a real LiteLLM model string (and set its API key) to talk to
a real model instead.
"""

from __future__ import annotations

import asyncio
import sys

from immagent.llm import Model
from immagent.simple import SimpleAgent


async def main(model: str = Model.ECHO) -> SimpleAgent:
    """Chat twice, print the conversation and token usage, return the final agent."""
    agent = SimpleAgent("Assistant", "You are helpful.", model)
    agent = await agent.advance("Hello!")
    agent = await agent.advance("What's 2+2?", temperature=0.2)
    for msg in agent.messages:
        print(f"{msg.role}: {msg.content}")
    input_tokens, output_tokens = agent.token_usage()
    print(f"tokens: {input_tokens} in, {output_tokens} out")
    return agent


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
