"""MCPManager: tools from MCP stdio servers, offered to the model and run on its behalf.

Each server connection lives in its own background task that enters and exits the MCP
transport and session. anyio cancel scopes (inside ``stdio_client`` and ``ClientSession``)
must be exited by the task that entered them; owning them in a dedicated task means
``connect``, ``execute`` and ``close`` may be called from any task (``advance`` runs tool
calls in concurrent tasks) without breaking that rule. A server that dies is marked
stopped, its tools are withdrawn, and every failure reaches the caller as a
ToolExecutionError.

The MCP SDK is optional (the ``llm`` extra of ``immagent-core``; ``immagent`` always has
it): without it this module still imports, so ``from immagent import *`` works, and
``MCPManager()`` raises ``ExtraNotInstalledError`` naming ``pip install immagent``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TextIO

from immagent.exceptions import ExtraNotInstalledError, ToolExecutionError, ValidationError
from immagent.validate import MAX_NAME_BYTES, check_text, scrub_text

try:
    import anyio
    import mcp_types
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.shared.exceptions import MCPError
except ImportError as e:  # no MCP SDK: MCPManager() says how to install it
    _missing: ImportError | None = e
else:
    _missing = None

__all__ = ["MCPManager", "tool_to_openai_format"]

logger = logging.getLogger("immagent")

# OpenAI (and so most LiteLLM providers) accept tool names matching ^[a-zA-Z0-9_-]{1,64}$.
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_TOOL_NAME = 64


@dataclass(eq=False)
class _Server:
    """One connected server: its session, the task that owns it, and how to stop it."""

    name: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Created here, entered by the owning task: cancelling it unwinds the transport the
    # anyio way, so stdio_client's shielded shutdown still reaps the process.
    scope: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope())
    task: asyncio.Task[None] | None = None
    session: ClientSession | None = None
    #: Why the server can no longer be used (None while it is running).
    stopped: str | None = None


class MCPManager:
    """Connects to MCP stdio servers and exposes their tools (an ``advance.ToolProvider``).

    Usage::

        async with MCPManager() as mcp:
            await mcp.connect("calc", sys.executable, ["examples/calculator_server.py"])
            agent = await agent.advance("What is 2 + 2?", mcp=mcp)

    Tool names are unique across servers: a tool keeps its own name unless an earlier
    server took it, then it becomes ``<server>__<tool>``. Names are also made valid for
    OpenAI-style APIs (``[a-zA-Z0-9_-]``, at most 64 characters).
    """

    def __init__(self, *, connect_timeout: float = 30.0, tool_timeout: float | None = 60.0,
                 errlog: TextIO | None = None) -> None:
        """``errlog`` receives the servers' stderr (default: this process's stderr).
        ExtraNotInstalledError if the MCP SDK is not installed."""
        if _missing is not None:
            raise ExtraNotInstalledError("MCPManager", "llm", needs="the MCP SDK",
                                         cause=_missing)
        self._connect_timeout = connect_timeout
        self._tool_timeout = tool_timeout
        self._errlog = errlog
        self._servers: dict[str, _Server] = {}
        # exposed tool name -> (server name, the server's own tool name)
        self._routes: dict[str, tuple[str, str]] = {}
        self._schemas: dict[str, dict[str, Any]] = {}
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def servers(self) -> tuple[str, ...]:
        """Names of the servers that are connected and running."""
        return tuple(n for n, s in self._servers.items() if s.stopped is None)

    @property
    def tools(self) -> Mapping[str, tuple[str, str]]:
        """Exposed tool name -> (server name, the tool's name on that server)."""
        return dict(self._routes)

    async def connect(self, name: str, command: str, args: Sequence[str] = (),
                      env: Mapping[str, str] | None = None, *,
                      cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """Start ``command args`` as an MCP stdio server, list its tools, return their names.

        ``env`` is added to a minimal inherited environment (PATH, HOME, ...). Raises
        ToolExecutionError if the server cannot be started or does not answer in time.
        """
        check_text("name", name, max_bytes=MAX_NAME_BYTES)
        check_text("command", command)
        if self._closed:
            raise ToolExecutionError(f"cannot connect {name!r}: the MCPManager is closed")
        if name in self._servers:
            raise ValidationError("name", f"an MCP server named {name!r} is already connected",
                                  name)
        params = StdioServerParameters(command=command, args=list(args),
                                       env=dict(env) if env is not None else None,
                                       cwd=os.fspath(cwd) if cwd is not None else None)
        server = _Server(name)
        ready: asyncio.Future[list[mcp_types.Tool]] = asyncio.get_running_loop().create_future()
        server.task = asyncio.create_task(self._serve(server, params, ready),
                                          name=f"immagent-mcp-{name}")
        self._servers[name] = server
        try:
            async with asyncio.timeout(self._connect_timeout):
                # shield: a timeout here must not cancel the future the owner task resolves.
                tools = await asyncio.shield(ready)
        except BaseException as exc:
            del self._servers[name]
            server.scope.cancel()
            await asyncio.wait([server.task])
            if not ready.cancelled():  # retrieved here, or asyncio logs it as never retrieved
                ready.exception()
            if isinstance(exc, TimeoutError):
                raise ToolExecutionError(f"MCP server {name!r} ({command}) did not start within "
                                         f"{self._connect_timeout} s") from exc
            if isinstance(exc, Exception):
                raise ToolExecutionError(f"MCP server {name!r} ({command}) failed to start: "
                                         f"{_describe(exc)}") from exc
            raise
        if self._closed or name not in self._servers:  # close() ran while we waited
            raise ToolExecutionError(f"cannot connect {name!r}: the MCPManager was closed")
        exposed = [self._add_tool(name, tool) for tool in tools]
        logger.info("MCP server %r connected with %d tool(s): %s", name, len(exposed), exposed)
        return exposed

    async def _serve(self, server: _Server, params: StdioServerParameters,
                     ready: asyncio.Future[list[mcp_types.Tool]]) -> None:
        """Own one server connection from start to shutdown (runs as its own task)."""
        try:
            with server.scope:
                async with (stdio_client(params, errlog=self._errlog or sys.stderr) as streams,
                            ClientSession(*streams) as session):
                    await session.initialize()
                    tools = await _list_tools(session)
                    server.session = session
                    if not ready.done():
                        ready.set_result(tools)
                    await server.stop.wait()
        except Exception as exc:  # a dying server often surfaces here as an ExceptionGroup
            if not ready.done():
                ready.set_exception(exc)
            else:
                logger.warning("MCP server %r ended with an error: %s", server.name,
                               _describe(exc))
        finally:
            server.stopped = server.stopped or "it has been shut down"
            if not ready.done():
                ready.set_exception(ToolExecutionError("connection aborted"))

    def _add_tool(self, server: str, tool: mcp_types.Tool) -> str:
        exposed = _unique_name(tool.name, server, self._routes)
        self._routes[exposed] = (server, tool.name)
        self._schemas[exposed] = tool_to_openai_format(tool, name=exposed)
        return exposed

    def tool_schemas(self) -> list[dict[str, Any]]:
        """LiteLLM/OpenAI function tool schemas of every tool on a running server."""
        return [schema for exposed, schema in self._schemas.items()
                if self._servers[self._routes[exposed][0]].stopped is None]

    def get_all_tools(self) -> list[dict[str, Any]]:
        """Same as ``tool_schemas()`` (the name immagent 0.1 used)."""
        return self.tool_schemas()

    async def execute(self, name: str, arguments: dict[str, Any]) -> str:
        """Call tool ``name`` and return its text output.

        Raises ToolExecutionError for an unknown tool, a tool that reports an error, a
        timeout, or a server that is gone.
        """
        if self._closed:
            raise ToolExecutionError(f"cannot run tool {name!r}: the MCPManager is closed",
                                     tool_name=name)
        route = self._routes.get(name)
        if route is None:
            raise ToolExecutionError(f"Unknown tool {name!r}; available: "
                                     f"{', '.join(sorted(self._routes)) or 'none'}",
                                     tool_name=name)
        server = self._servers[route[0]]
        if server.stopped is not None or server.session is None:
            raise ToolExecutionError(f"tool {name!r}: MCP server {server.name!r} is not running "
                                     f"({server.stopped})", tool_name=name)
        logger.debug("MCP call: tool=%s server=%s", name, server.name)
        try:
            result = await server.session.call_tool(route[1], dict(arguments),
                                                    read_timeout_seconds=self._tool_timeout)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                server.stopped = "its connection closed (the server exited or crashed)"
                logger.warning("MCP server %r: %s", server.name, server.stopped)
            raise ToolExecutionError(f"tool {name!r} on MCP server {server.name!r}: "
                                     f"{exc}", tool_name=name) from exc
        except Exception as exc:  # transport errors, including ExceptionGroups
            raise ToolExecutionError(f"tool {name!r} on MCP server {server.name!r}: "
                                     f"{_describe(exc)}", tool_name=name) from exc
        text = _result_text(result)
        if result.is_error:
            raise ToolExecutionError(f"tool {name!r} reported an error: {text}",
                                     tool_name=name)
        return text

    async def close(self) -> None:
        """Stop every server (idempotent). Never raises for a server that already died."""
        self._closed = True
        servers = list(self._servers.values())
        for server in servers:
            server.stop.set()
        # Owner tasks log their own errors; shut the servers down in parallel.
        await asyncio.gather(*(s.task for s in servers if s.task is not None),
                             return_exceptions=True)
        self._servers.clear()
        self._routes.clear()
        self._schemas.clear()


def tool_to_openai_format(tool: mcp_types.Tool | Mapping[str, Any], *,
                          name: str | None = None) -> dict[str, Any]:
    """An MCP tool description (an ``mcp.types.Tool``, or its dict as 0.1.2 took it, with
    ``inputSchema`` or ``input_schema``) as a LiteLLM / OpenAI function tool; ``name`` is
    the name to offer it under (default: the tool's own)."""
    if _missing is None and isinstance(tool, mcp_types.Tool):
        own, description, schema = tool.name, tool.description, tool.input_schema
    elif isinstance(tool, Mapping) and isinstance(tool.get("name"), str):
        own, description = tool["name"], tool.get("description")
        schema = tool.get("inputSchema", tool.get("input_schema"))
    else:
        raise ValidationError("tool", "must be an MCP Tool or a mapping with a 'name'", None)
    return {
        "type": "function",
        "function": {
            "name": own if name is None else name,
            "description": description or "",
            "parameters": schema or {"type": "object", "properties": {}},
        },
    }


async def _list_tools(session: ClientSession) -> list[mcp_types.Tool]:
    """Every tool of a server, following pagination."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _unique_name(tool: str, server: str, taken: Mapping[str, object]) -> str:
    """A valid tool name not yet in ``taken``: the tool's own, else server-prefixed."""
    for candidate in (tool, f"{server}__{tool}"):
        name = _BAD_NAME_CHARS.sub("_", candidate)[:_MAX_TOOL_NAME] or "tool"
        if name not in taken:
            return name
    n = 2
    while True:
        suffix = f"_{n}"
        name = _BAD_NAME_CHARS.sub("_", f"{server}__{tool}")[:_MAX_TOOL_NAME - len(suffix)]
        if name + suffix not in taken:
            return name + suffix
        n += 1


def _result_text(result: mcp_types.CallToolResult) -> str:
    """The text of a tool result: text blocks joined; other blocks as JSON."""
    parts = [block.text if isinstance(block, mcp_types.TextContent)
             else block.model_dump_json(exclude_none=True)
             for block in result.content]
    if not parts and result.structured_content is not None:
        return scrub_text(json.dumps(result.structured_content, ensure_ascii=False,
                                     default=str))
    return scrub_text("\n".join(parts))


def _describe(exc: BaseException) -> str:
    """One line naming every leaf of a (possibly nested) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
