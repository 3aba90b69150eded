"""``agents``, ``threads``, ``sessions``, ``conversations``: one row per conversation of
each client.

A conversation is a stream of states: an agent name (what ``chat --name`` continues), a
LangGraph thread, an Agents-SDK session, a pydantic-ai conversation. Its row shows its
newest state: turns (user messages), messages or items, how many states the stream
holds, its size (content bytes the newest state pins, whole history included) and its
last activity; newest activity first. The heads come from ``EventLog.stream_heads`` (one
index probe per stream); only the shown page's histories are read. ``--all`` lists every
state instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NamedTuple

from immagent.assets import Kind
from immagent.cli.clients import VIEWS, View, content_bytes
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK
from immagent.cli.refs import abbreviate
from immagent.cli.render import (
    Line,
    human_bytes,
    local_time,
    paint,
    plural,
    table,
)
from immagent.cli.spec import Command, count
from immagent.records import StateRow
from immagent.store import EventLog

__all__ = ["COMMANDS"]

#: Streams read per stream_heads call.
_PAGE = 1000


class Head(NamedTuple):
    """A conversation's newest state and what the listing says about it."""

    row: StateRow
    turns: int
    elements: int
    states: int
    size: int


def _arguments(view: View) -> Any:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--all", action="store_true",
                       help=f"every state, newest first, instead of one row per {view.client}")
        p.add_argument("--name", metavar="TEXT",
                       help=f"only {view.plural} whose {view.title.lower()} contains TEXT "
                            "(case-insensitive)")
        p.add_argument("--limit", type=count(1), default=50, help="rows per page (default 50)")
        p.add_argument("--offset", type=count(0), default=0, help="rows to skip")
    return add


def _run(view: View) -> Any:
    def run(ctx: Context, args: argparse.Namespace) -> int:
        if args.all:
            return _every_state(ctx, args, view)
        store = ctx.store()
        heads, total = ctx.run(_heads(store, view, args.name, args.offset, args.limit))
        ids = (ctx.run(abbreviate(store, [h.row.id for h in heads]))
               if heads and view.client != "thread" else {})
        if ctx.out.as_json:
            ctx.out.json({view.plural: [_head_json(view, h) for h in heads], "total": total,
                          "offset": args.offset, "limit": args.limit})
            return EXIT_OK
        if not heads:
            ctx.out.line(f"no {view.plural}" if total == 0 else
                         f"no {view.plural} at offset {args.offset} (there are {total})")
            return EXIT_OK
        ctx.out.lines(_head_table(view, heads, ids, ctx.out.width))
        ctx.out.line(f"({args.offset + 1}-{args.offset + len(heads)} of "
                     f"{plural(total, view.client)}; `immagent log {view.client}:"
                     f"{view.title}` shows one)")
        return EXIT_OK
    return run


async def _heads(store: EventLog, view: View, name: str | None, offset: int,
                 limit: int) -> tuple[list[Head], int]:
    """The page of conversations, newest activity first, and how many there are."""
    rows: list[StateRow] = []
    after: str | None = None
    needle = None if name is None else name.lower()
    while page := await store.stream_heads(view.kind, after=after, limit=_PAGE):
        rows += [r for r in page if view.is_head(r)
                 and (needle is None or needle in view.name(r).lower())]
        if len(page) < _PAGE:
            break
        after = page[-1].stream
    rows.sort(key=lambda r: r.seq, reverse=True)
    shown = rows[offset:offset + limit]
    sizes = await content_bytes(store, [d for r in shown for d in r.refs])
    heads = []
    for row in shown:
        head = view.conversation(row)
        elements = await store.get_chain(head, view.node_kind) if head is not None else ()
        turns = sum(1 for e in elements if view.said(e).turn)
        states = await store.count_states(view.kind, stream=row.stream)
        heads.append(Head(row, turns, len(elements), states,
                          sum(sizes[d] for d in row.refs)))
    return heads, len(rows)


def _head_json(view: View, head: Head) -> dict[str, Any]:
    return view.summary(head.row) | {
        "ref": view.ref(head.row), "turns": head.turns, view.elements: head.elements,
        "states": head.states, "bytes": head.size,
        "last_active": head.row.created_at.isoformat()}


def _head_table(view: View, heads: Sequence[Head], ids: dict[Any, str],
                width: int | None) -> list[tuple[str, ...]]:
    # A thread's checkpoint ids share the thread's 60-bit prefix: its name is the handle.
    with_id = view.client != "thread"
    headers = [*(["ID"] if with_id else []), view.title,
               *(["MODEL"] if view.client == "agent" else []),
               "TURNS", _short(view), "STATES", "SIZE", "LAST ACTIVE"]
    rows = []
    for h in heads:
        cells = [*([paint(ids[h.row.id], "id")] if with_id else []), view.name(h.row)]
        if view.client == "agent":
            cells.append(view.summary(h.row)["model"])
        cells += [str(h.turns), str(h.elements), str(h.states), human_bytes(h.size),
                  local_time(h.row.created_at, short=True)]
        rows.append(cells)
    n = len(headers)
    # On a narrow terminal: states, then the model, then the element count go first.
    drop = [n - 3, *([2] if view.client == "agent" else []), n - 4]
    return table(headers, rows, right=range(n - 5, n - 1),
                 shrink=range(1 if with_id else 0, n - 5), drop=drop, width=width)


def _short(view: View) -> str:
    return "MSGS" if view.elements == "messages" else view.elements.upper()


# -- every state ---------------------------------------------------------------------------


def _every_state(ctx: Context, args: argparse.Namespace, view: View) -> int:
    store = ctx.store()
    rows, total = ctx.run(_states(store, view, args.name, args.offset, args.limit))
    counts = ctx.run(_lengths(store, view, rows))
    if ctx.out.as_json:
        items = [view.summary(r) | {view.elements: n} for r, n in zip(rows, counts, strict=True)]
        ctx.out.json({"total": total, "offset": args.offset, "limit": args.limit,
                      view.plural: items})
        return EXIT_OK
    noun = f"{view.state_word} state" if view.client == "agent" else view.state_word
    if not rows:
        ctx.out.line(f"no {noun}s" if total == 0 else
                     f"no {noun}s at offset {args.offset} (there are {total})")
        return EXIT_OK
    ids = ctx.run(abbreviate(store, [r.id for r in rows]))
    headers = ["ID", view.title, *(["MODEL"] if view.client == "agent" else []),
               _short(view), "CREATED"]
    body: list[list[str]] = []
    for r, n in zip(rows, counts, strict=True):
        cells = [paint(ids[r.id], "id"), view.name(r)]
        if view.client == "agent":
            cells.append(view.summary(r)["model"])
        cells += ["?" if n is None else str(n), local_time(r.created_at)]
        body.append(cells)
    width = len(headers)
    lines: list[Line] = list(table(headers, body, right=(width - 2,),
                                   shrink=range(1, width - 2),
                                   drop=[*([2] if view.client == "agent" else []), width - 2],
                                   width=ctx.out.width))
    ctx.out.lines(lines)
    ctx.out.line(f"({args.offset + 1}-{args.offset + len(rows)} of {plural(total, noun)})")
    return EXIT_OK


async def _states(store: EventLog, view: View, name: str | None, offset: int,
                  limit: int) -> tuple[list[StateRow], int]:
    """A page of every state of the client, newest first, and how many match: by id for
    agents and sessions (time-ordered UUIDv7), thread by thread for checkpoints (their ids
    are derived from the thread, not the time)."""
    if view.kind != Kind.CHECKPOINT:
        total = await store.count_states(view.kind, contains=name)
        rows: list[StateRow] = []
        after = None
        while len(rows) < offset + limit:
            page = await store.scan_states(view.kind, after=after, limit=min(
                offset + limit - len(rows), 1000), newest_first=True, contains=name)
            rows += page
            if not page:
                break
            after = page[-1].id
        return rows[offset:offset + limit], total
    streams: list[StateRow] = []
    after_stream: str | None = None
    while page := await store.stream_heads(view.kind, after=after_stream, limit=_PAGE):
        streams += [r for r in page if name is None or name.lower() in view.name(r).lower()]
        if len(page) < _PAGE:
            break
        after_stream = page[-1].stream
    streams.sort(key=lambda r: r.seq, reverse=True)
    counts = [await store.count_states(view.kind, stream=s.stream) for s in streams]
    out: list[StateRow] = []
    skip = offset
    for head, n in zip(streams, counts, strict=True):
        if len(out) >= limit:
            break
        if skip >= n:
            skip -= n
            continue
        after_seq: int | None = None
        while len(out) < limit:
            page = await store.stream_states(view.kind, head.stream, after_seq=after_seq,
                                             limit=1000)
            if not page:
                break
            after_seq = page[-1].seq
            take = page[skip:]
            skip = max(0, skip - len(page))
            out += take[:limit - len(out)]
    return out, sum(counts)


async def _lengths(store: EventLog, view: View, rows: Sequence[StateRow]) -> list[int | None]:
    """How many elements each state's conversation holds (from its head node alone)."""
    from immagent.assets import ConversationNode

    heads = [view.conversation(r) for r in rows]
    wanted = [h for h in heads if h is not None]
    nodes = dict(zip(wanted, await store.get_assets(wanted, ConversationNode, "node"),
                     strict=True)) if wanted else {}
    return [None if h is None else nodes[h].length for h in heads]


_AGENTS, _THREADS, _SESSIONS, _CONVERSATIONS = (
    VIEWS[int(k)] for k in (Kind.AGENT_STATE, Kind.CHECKPOINT, Kind.SESSION_STATE,
                            Kind.CONVERSATION_STATE))

COMMANDS = [
    Command("agents", "one row per agent name: turns, messages, size, last activity",
            _run(_AGENTS), _arguments(_AGENTS), pages=True,
            description="One row per agent name (the lineage `chat --name` continues), newest "
                        "activity first: its newest state's id and model, turns (user "
                        "messages), messages, states of that name, size (content bytes of "
                        "its prompt and history) and last activity. --all: every agent "
                        "state instead, newest first."),
    Command("threads", "one row per LangGraph thread: turns, messages, size, last activity",
            _run(_THREADS), _arguments(_THREADS), pages=True,
            description="One row per LangGraph thread checkpointed by ImmAgentSaver, newest "
                        "activity first: turns (human messages of its messages channel), "
                        "messages, checkpoints, size (content bytes of its newest "
                        "checkpoint's channels) and last activity. --all: every checkpoint "
                        "instead, thread by thread, newest first."),
    Command("sessions", "one row per Agents SDK session: turns, items, size, last activity",
            _run(_SESSIONS), _arguments(_SESSIONS), pages=True,
            description="One row per OpenAI Agents SDK session kept by ImmAgentSession, "
                        "newest activity first: its newest state's id, turns (user items of "
                        "main), items, states, size (content bytes of every branch) and last "
                        "activity. --all: every session state instead, newest first."),
    Command("conversations", "one row per pydantic-ai conversation: turns, messages, size, "
                             "last activity",
            _run(_CONVERSATIONS), _arguments(_CONVERSATIONS), pages=True,
            description="One row per pydantic-ai conversation kept by "
                        "ImmAgentConversationStore (deleted ones left out), newest activity "
                        "first: its newest state's id, turns (requests with a user prompt), "
                        "messages, states, size (content bytes of its history and the "
                        "branches it left) and last activity. --all: every conversation "
                        "state instead, newest first."),
]
