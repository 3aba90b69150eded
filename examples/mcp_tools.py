"""An agent that uses MCP tools, offline: ``python examples/mcp_tools.py``.

It starts ``calculator_server.py`` (an MCP stdio server next to this file) and drives it
with a ScriptedModel, the offline test double that plays back a script: first it asks for
``multiply(6, 7)``, then it answers with the tool's result. With a real model you would
pass its LiteLLM string instead and let it choose the tools itself.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from immagent.mcp import MCPManager
from immagent.simple import SimpleAgent
from immagent.testing import Reply, Request, ScriptedModel

SERVER = Path(__file__).with_name("calculator_server.py")


def _answer(request: Request) -> str:
    # The scripted "model" reads the tool result it was sent, as a real model would.
    return f"6 times 7 is {request.last_message['content']}."


async def main() -> SimpleAgent:
    """Run one tool-using turn, print the conversation, return the final agent."""
    model = ScriptedModel([Reply.call("multiply", a=6, b=7), _answer])
    async with MCPManager() as mcp:
        tools = await mcp.connect("calculator", sys.executable, [str(SERVER)])
        print(f"tools: {', '.join(tools)}")
        agent = SimpleAgent("Calculator", "Use the tools for arithmetic.", model.model)
        agent = await agent.advance("What is 6 times 7?", mcp=mcp)
    for msg in agent.messages:
        calls = ", ".join(f"{c.name}({c.arguments})" for c in msg.tool_calls or ())
        print(f"{msg.role}: {msg.content if msg.content is not None else calls}")
    return agent


if __name__ == "__main__":
    asyncio.run(main())
