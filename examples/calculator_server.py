"""A small MCP stdio server (calculator) used by the examples and the test suite.

Run it as ``python examples/calculator_server.py``; an MCP client speaks JSON-RPC on its
stdin/stdout. It needs no network. Besides arithmetic it has tools that exist for tests:
``rendezvous`` (returns only once ``count`` calls with the same key are in flight, so it
proves that calls run concurrently without measuring time), ``pid`` and ``crash`` (kills
the process, to exercise a client's handling of a dead server).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# WARNING: keep the per-call INFO lines ("Tool ... failed") out of the client's stderr.
server: MCPServer = MCPServer("calculator", log_level="WARNING")

# Per key: callers waiting at the rendezvous, and the event that releases them.
_arrived: defaultdict[str, int] = defaultdict(int)
_released: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


@server.tool()
def add(a: float, b: float) -> str:
    """Add two numbers."""
    return _fmt(a + b)


@server.tool()
def multiply(a: float, b: float) -> str:
    """Multiply two numbers."""
    return _fmt(a * b)


@server.tool()
def divide(a: float, b: float) -> str:
    """Divide a by b; dividing by zero is a tool error the model can read."""
    if b == 0:
        raise ToolError("division by zero")
    return _fmt(a / b)


@server.tool()
async def rendezvous(key: str, count: int, timeout: float = 5.0) -> str:
    """Wait until ``count`` calls with this key have arrived, then return (test helper)."""
    _arrived[key] += 1
    if _arrived[key] >= count:
        _released[key].set()
    try:
        await asyncio.wait_for(_released[key].wait(), timeout)
    except TimeoutError:
        raise ToolError(f"only {_arrived[key]} of {count} calls arrived") from None
    return f"met {count}"


@server.tool()
def pid() -> str:
    """This server's process id (lets a test check the process is gone after close)."""
    return str(os.getpid())


@server.tool()
def crash(exit_code: int = 3) -> str:
    """Kill this server process at once (test helper for a dying server)."""
    os._exit(exit_code)


def _fmt(value: float) -> str:
    # Integral results print without ".0" so the model sees "4", not "4.0".
    return str(int(value)) if value.is_integer() else repr(value)


if __name__ == "__main__":
    server.run("stdio")
