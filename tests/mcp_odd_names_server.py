"""An MCP stdio server whose tool names need fixing for OpenAI-style APIs (test helper)."""

from __future__ import annotations

from mcp.server import MCPServer

server: MCPServer = MCPServer("odd-names", log_level="WARNING")


def _shout(text: str) -> str:
    return text.upper()


def _long() -> str:
    return "long"


# Dots are not allowed in OpenAI tool names; 70 characters are too many.
server.add_tool(_shout, name="text.shout", description="Upper-case some text.")
server.add_tool(_long, name="x" * 70, description="A tool with a very long name.")

if __name__ == "__main__":
    server.run("stdio")
