"""Browsing and editing agent states: ``agents``, ``show``, ``log``, ``clone``, ``delete``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from immagent.agent import PersistentAgent
from immagent.assets import ConversationNode, Message
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK, CLIError
from immagent.cli.render import clip, local_time, message_json, message_line, table
from immagent.cli.summary import agent_json, message_counts, newest
from immagent.clients.agents import Store

__all__ = ["agents", "clone", "delete", "log", "show", "target"]


# -- agents --------------------------------------------------------------------------------

def agents(ctx: Context, args: argparse.Namespace) -> int:
    """List agent states, newest first, a page at a time."""
    store = ctx.store()
    page, counts, total = ctx.run(_page(store, args.limit, args.offset, args.name))
    if ctx.out.as_json:
        ctx.out.json({"total": total, "offset": args.offset, "limit": args.limit,
                      "agents": [agent_json(a, n) for a, n in zip(page, counts, strict=True)]})
        return EXIT_OK
    if not page:
        ctx.out.line("no agent states" if total == 0 else
                     f"no agent states at offset {args.offset} (there are {total})")
        return EXIT_OK
    rows = [(str(a.id), clip(a.name, 24), clip(a.model, 32), "?" if n is None else str(n),
             local_time(a.created_at)) for a, n in zip(page, counts, strict=True)]
    ctx.out.lines(table(("ID", "NAME", "MODEL", "MSGS", "CREATED"), rows, right=(3,)))
    first = args.offset + 1
    ctx.out.line(f"({first}-{args.offset + len(page)} of {total} agent states)")
    return EXIT_OK


async def _page(store: Store, limit: int, offset: int,
                name: str | None) -> tuple[list[PersistentAgent], list[int | None], int]:
    page = await store.list_agents(limit=limit, offset=offset, name=name)
    return page, await message_counts(store, page), await store.count_agents(name)


# -- show ----------------------------------------------------------------------------------

def target(ctx: Context, args: argparse.Namespace) -> PersistentAgent:
    """The state named by ID, else the newest state called --name (like git's HEAD)."""
    if args.id is not None:
        return ctx.load(args.id)
    found = ctx.run(newest(ctx.store(), args.name))
    if found is None:
        raise CLIError(f"no agent named {args.name!r} yet (start one with `immagent chat`, "
                       "or give an ID)")
    return found


def show(ctx: Context, args: argparse.Namespace) -> int:
    """Print one state: its fields, digests, system prompt and every message."""
    agent = target(ctx, args)
    prompt, messages = ctx.run(_content(agent))
    if ctx.out.as_json:
        ctx.out.json(agent_json(agent, len(messages)) | {
            "system_prompt_digest": agent.system_prompt_digest.hex(),
            "conversation_digest": agent.conversation_digest.hex(),
            "model_config": dict(agent.model_config), "metadata": dict(agent.metadata),
            "system_prompt": prompt, "conversation": [message_json(m) for m in messages]})
        return EXIT_OK
    ctx.out.lines(_show_lines(agent, prompt, messages))
    return EXIT_OK


async def _content(agent: PersistentAgent) -> tuple[str, tuple[Message, ...]]:
    return await agent.get_system_prompt(), await agent.get_messages()


def _show_lines(agent: PersistentAgent, prompt: str,
                messages: tuple[Message, ...]) -> Iterator[str]:
    fields = [
        ("agent", str(agent.id)),
        ("parent", str(agent.parent_id) if agent.parent_id else "-"),
        ("name", agent.name),
        ("model", agent.model),
        ("created", local_time(agent.created_at)),
        ("digest", agent.digest.hex()),
        ("prompt", agent.system_prompt_digest.hex()),
        ("conversation", f"{agent.conversation_digest.hex()} ({len(messages)} messages)"),
    ]
    if agent.model_config:
        fields.append(("model config", json.dumps(dict(agent.model_config), sort_keys=True)))
    if agent.metadata:
        fields.append(("metadata", json.dumps(dict(agent.metadata), sort_keys=True)))
    width = max(len(k) for k, _ in fields)
    yield from (f"{k.ljust(width)}  {v}" for k, v in fields)
    yield ""
    yield "system prompt:"
    yield from _indented(prompt)
    yield ""
    yield f"messages ({len(messages)}):"
    for i, m in enumerate(messages, 1):
        yield from _message_block(i, m)


def _indented(text: str, prefix: str = "    ") -> Iterator[str]:
    for line in text.splitlines() or [""]:
        yield f"{prefix}{line}".rstrip()


def _message_block(index: int, m: Message) -> Iterator[str]:
    """A message in full: role, content, tool calls and token usage."""
    head = f"[{index}] {m.role}"
    if m.role == "tool":
        head += f" ({m.tool_call_id}{', error' if m.is_error else ''})"
    if m.input_tokens is not None or m.output_tokens is not None:
        head += f"  tokens in/out {m.input_tokens}/{m.output_tokens}"
    if m.interrupted:
        head += "  (interrupted: cut short, kept)"
    yield head
    if m.content:
        yield from _indented(m.content)
    for call in m.tool_calls or ():
        yield f"    -> {call.name}({call.arguments})  id {call.id}"


# -- log -----------------------------------------------------------------------------------

def log(ctx: Context, args: argparse.Namespace) -> int:
    """Print a state and its ancestors, newest first, with the messages each one added."""
    agent = target(ctx, args)
    entries = ctx.run(_lineage(ctx.store(), agent, args.limit))
    if ctx.out.as_json:
        ctx.out.json({"lineage": [e.to_json() for e in entries]})
    elif args.oneline:
        ctx.out.lines(e.oneline() for e in entries)
    else:
        ctx.out.lines(_log_lines(entries))
    return EXIT_OK


class _Entry:
    """One state in a lineage and what it changed relative to its parent."""

    def __init__(self, agent: PersistentAgent, count: int,
                 added: tuple[Message, ...] | None, parent_missing: bool) -> None:
        self.agent, self.count, self.added = agent, count, added
        self.parent_missing = parent_missing

    def oneline(self) -> str:
        """``<id> <date> +N <last added message>``."""
        plus = "?" if self.added is None else f"+{len(self.added)}"
        return f"{self.agent.id}  {local_time(self.agent.created_at)}  {plus:>3}  {self.change()}"

    def change(self) -> str:
        """A short account of what this state changed."""
        if self.added is None:
            return "(parent deleted)" if self.parent_missing else "(conversation replaced)"
        if self.added:
            return message_line(self.added[-1], 72)
        return "(created)" if self.agent.parent_id is None else "(no new messages)"

    def to_json(self) -> dict[str, Any]:
        """The state, its message count and the messages it added (null if unknown)."""
        added = None if self.added is None else [message_json(m) for m in self.added]
        return agent_json(self.agent, self.count) | {"added": added}


async def _lineage(store: Store, agent: PersistentAgent,
                   limit: int | None) -> list[_Entry]:
    """The newest ``limit`` states of the lineage and what each one added to its parent.

    Reads ``limit + 1`` states (the last one tells what the oldest shown one added), their
    head nodes in one batch and only the messages each state added: a step of a lineage
    adds one node to its parent's chain (or none, for a clone or a metadata change), so
    what it added is that node's messages, and the cost is linear in what is shown, not in
    the lineage's length times its history.
    """
    states = await store.ancestors(agent, None if limit is None else limit + 1)
    shown = states if limit is None else states[:limit]
    heads = list(dict.fromkeys(a.conversation_digest for a in states))
    nodes = dict(zip(heads, await store.get_assets(heads, ConversationNode,
                                                   "conversation node"), strict=True))
    parents: list[PersistentAgent | None] = [*states[1:], None]
    direct = [d for a, p in zip(shown, parents, strict=False) if p is not None
              and nodes[a.conversation_digest].parent == p.conversation_digest
              for d in nodes[a.conversation_digest].messages]
    messages = dict(zip(direct, await store.get_assets(direct, Message, "message"),
                        strict=True))
    entries: list[_Entry] = []
    for state, parent in zip(shown, parents, strict=False):
        node = nodes[state.conversation_digest]
        missing = state.parent_id is not None and parent is None
        added: tuple[Message, ...] | None
        if missing:
            added = None
        elif parent is None:  # a root: everything it holds is its own
            added = await state.get_messages()
        elif node.digest == parent.conversation_digest:
            added = ()
        elif node.parent == parent.conversation_digest:
            added = tuple(messages[d] for d in node.messages)
        else:  # not one step (a crafted or imported lineage): compare whole histories
            added = _added(await state.get_messages(), await parent.get_messages())
        entries.append(_Entry(state, node.length, added, missing))
    return entries


def _added(messages: tuple[Message, ...],
           parent: tuple[Message, ...]) -> tuple[Message, ...] | None:
    """What a state appended to its parent's conversation; None when it is not an
    extension of it."""
    if messages[: len(parent)] != parent:
        return None
    return messages[len(parent):]


def _log_lines(entries: list[_Entry]) -> Iterator[str]:
    for i, e in enumerate(entries):
        if i:
            yield ""
        a = e.agent
        yield f"agent {a.id}"
        if a.parent_id:
            deleted = " (deleted)" if e.parent_missing else ""
            yield f"Parent: {a.parent_id}{deleted}"
        yield f"Date:   {local_time(a.created_at)}"
        yield f"Name:   {a.name}   Model: {a.model}   Messages: {e.count}"
        yield ""
        yield from _change_lines(e)


def _change_lines(e: _Entry) -> Iterator[str]:
    if e.added:
        yield from (f"    {message_line(m)}" for m in e.added)
    else:
        yield f"    {e.change()}"


# -- clone / delete ------------------------------------------------------------------------

def clone(ctx: Context, args: argparse.Namespace) -> int:
    """Make a new state with the same content whose parent is ID; print its id."""
    ctx.store(write=True)
    new = ctx.run(ctx.load(args.id).clone())
    if ctx.out.as_json:
        ctx.out.json(agent_json(new))
    else:
        ctx.out.line(str(new.id))
    return EXIT_OK


def delete(ctx: Context, args: argparse.Namespace) -> int:
    """Delete one state (or, with --lineage, it and its ancestors); content stays until gc."""
    store = ctx.store(write=True)
    if args.lineage:
        agent = ctx.load(args.id)
        deleted = [str(i) for i in ctx.run(store.delete_lineage(agent))]
    else:
        ctx.run(store.delete(args.id))
        deleted = [str(args.id)]
    if ctx.out.as_json:
        ctx.out.json({"deleted": deleted})
    else:
        ctx.out.lines(f"deleted {i}" for i in deleted)
        ctx.out.note("(their content stays stored until `immagent gc`)")
    return EXIT_OK
