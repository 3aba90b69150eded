"""``show`` and ``log``: one state in full, or a lineage newest first, for every client.

Both take a reference (``cli.refs``): an agent state, a checkpoint (``thread:ID`` is its
thread's newest), a session state (``session:ID``) or a pydantic-ai conversation state
(``conversation:ID``); without one, the newest state of
the agent ``--name`` (what ``chat`` would continue, like git's HEAD).

``log`` reads ``-n N`` + 1 states (the last tells what the oldest shown one added), their
head nodes in one batch and only the elements each state added: a step adds one node to
its parent's chain (or none), so the cost is linear in what is shown, not in the
lineage's length times its history.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

from immagent.assets import Asset, ConversationNode, Digest, Message
from immagent.cli import chat
from immagent.cli.clients import Said, View, view_of
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK
from immagent.cli.refs import REF_HELP, Ref, abbreviate, add_ref
from immagent.cli.render import Line, clip, columns, local_time, paint, plural
from immagent.cli.spec import Command, count
from immagent.records import StateRow
from immagent.store import EventLog

__all__ = ["COMMANDS", "add_target", "target"]

#: Width of a one-line summary when stdout has none (piped).
_PIPED_WIDTH = 100


def add_target(p: argparse.ArgumentParser) -> None:
    add_ref(p, optional=True, help=f"the state to show: {REF_HELP} (default: the newest "
                                   "state of the agent --name)")
    p.add_argument("--name", default=chat.DEFAULT_NAME,
                   help=f"the agent (exact name) used when REF is left out (default "
                        f"{chat.DEFAULT_NAME!r})")


def target(ctx: Context, args: argparse.Namespace) -> StateRow:
    """The state REF names, else the newest state of the agent --name."""
    return ctx.state(args.ref if args.ref is not None else Ref("agent", args.name))


# -- show ----------------------------------------------------------------------------------


def show(ctx: Context, args: argparse.Namespace) -> int:
    """Print one state: its fields, digests, texts and every element of its conversation."""
    row = target(ctx, args)
    view = view_of(row)
    store = ctx.store()
    fields, sections, data = ctx.run(view.details(store, row))
    head = view.conversation(row)
    elements = ctx.run(store.get_chain(head, view.node_kind)) if head is not None else ()
    if ctx.out.as_json:
        ctx.out.json(view.summary(row) | {view.elements: len(elements)} | data | {
            "conversation": [view.element_json(e) for e in elements]})
        return EXIT_OK
    ctx.out.lines(_show_lines(view, row, fields, sections, head, elements))
    return EXIT_OK


def _show_lines(view: View, row: StateRow, fields: list[tuple[str, str]],
                sections: list[tuple[str, str]], head: Digest | None,
                elements: Sequence[Asset]) -> Iterator[Line]:
    top: list[tuple[str, Line]] = [
        (view.state_word, paint(str(row.id), "id")),
        ("parent", str(row.parent_id) if row.parent_id else "-"),
        ("name" if view.client == "agent" else view.client, view.name(row)),
        ("created", local_time(row.created_at)),
        ("digest", row.digest.hex()),
        *fields,
    ]
    if head is not None:
        top.append(("conversation", f"{head.hex()} ({plural(len(elements), 'message')})"
                    if view.client == "agent" else
                    f"{head.hex()} ({plural(len(elements), view.elements[:-1])})"))
    width = max(len(k) for k, _ in top)
    for key, value in top:
        yield (key.ljust(width), "  ", *((value,) if isinstance(value, str) else value))
    for title, text in sections:
        yield ""
        yield f"{title}:"
        yield from _indented(text)
    yield ""
    what = view.elements if view.client != "session" else "items of main"
    yield f"{what} ({len(elements)}):"
    for i, element in enumerate(elements, 1):
        yield from _element_block(view, i, element)


def _indented(text: str, prefix: str = "    ") -> Iterator[str]:
    for line in text.splitlines() or [""]:
        yield f"{prefix}{line}".rstrip()


def _element_block(view: View, index: int, element: Asset) -> Iterator[Line]:
    """An element in full: who, what (tool calls included) and, for a message, its usage."""
    said = view.said(element)
    head: list[str] = [f"[{index}] ", paint(said.role, said.style)]
    if isinstance(element, Message):
        head = [f"[{index}] ", paint(element.role, said.style)]
        if element.role == "tool":
            head.append(f" ({element.tool_call_id}{', error' if element.is_error else ''})")
        if element.input_tokens is not None or element.output_tokens is not None:
            head.append(f"  tokens in/out {element.input_tokens}/{element.output_tokens}")
        if element.interrupted:
            head.append("  (interrupted: cut short, kept)")
        yield tuple(head)
        if element.content:
            yield from _indented(element.content)
        for call in element.tool_calls or ():
            yield f"    -> {call.name}({call.arguments})  id {call.id}"
        return
    yield tuple(head)
    if said.text:
        yield from _indented(said.text)


# -- log -----------------------------------------------------------------------------------


class Entry:
    """One state of a lineage and what it changed in its conversation."""

    def __init__(self, view: View, row: StateRow, count: int | None,
                 added: tuple[Asset, ...] | None, removed: int, parent_missing: bool,
                 note: str | None) -> None:
        self.view, self.row, self.count, self.added = view, row, count, added
        self.removed, self.parent_missing, self.note = removed, parent_missing, note

    def change(self) -> str:
        """A short account of what this state changed (when it added nothing)."""
        things = self.view.elements
        if self.added is None:
            return ("(parent deleted)" if self.parent_missing else
                    f"(removed {plural(self.removed, things[:-1])})" if self.removed else
                    "(conversation replaced)")
        if self.note:
            return f"({self.note})"
        if self.added:
            return ""
        return "(created)" if self.row.parent_id is None else f"(no new {things})"

    def to_json(self) -> dict[str, Any]:
        """The state, its element count and what it added (null if not an extension)."""
        added = None if self.added is None else [self.view.element_json(e)
                                                 for e in self.added]
        data = self.view.summary(self.row) | {self.view.elements: self.count, "added": added}
        if self.removed:
            data["removed"] = self.removed
        return data


def log(ctx: Context, args: argparse.Namespace) -> int:
    """Print a state and its ancestors, newest first, with the elements each one added."""
    row = target(ctx, args)
    view = view_of(row)
    store = ctx.store()
    entries = ctx.run(_lineage(store, view, row, args.limit))
    if ctx.out.as_json:
        ctx.out.json({"lineage": [e.to_json() for e in entries]})
    elif args.oneline:
        ids = ctx.run(abbreviate(store, [e.row.id for e in entries]))
        ctx.out.lines(_oneline(e, ids[e.row.id], ctx.out.width) for e in entries)
    else:
        ctx.out.lines(_log_lines(entries, ctx.out.width or _PIPED_WIDTH))
    return EXIT_OK


def _oneline(e: Entry, short: str, width: int | None) -> Line:
    """``<id>  <date, to the minute>  +N  <last added>``, cut to the terminal's width."""
    plus = "?" if e.added is None else f"+{len(e.added)}"
    lead = f"  {local_time(e.row.created_at, short=True)}  {plus:>3}  "
    room = (width or _PIPED_WIDTH) - columns(short) - len(lead)
    if e.added:
        return (paint(short, "id"), lead, *_said_line(e.view.said(e.added[-1]), room))
    return (paint(short, "id"), lead, clip(e.change(), max(room, 12)))


async def _lineage(store: EventLog, view: View, head: StateRow,
                   limit: int | None) -> list[Entry]:
    """The newest ``limit`` states of the lineage and what each one changed."""
    rows = await store.state_lineage(head.id, None if limit is None else limit + 1)
    shown = rows if limit is None else rows[:limit]
    views = [view if r.kind == view.kind else view_of(r) for r in rows]
    convs = [v.conversation(r) for v, r in zip(views, rows, strict=True)]
    wanted = list(dict.fromkeys(c for c in convs if c is not None))
    # Each head node and the elements it adds, from its own row (no history read).
    read = await store.read_nodes(wanted) if wanted else []
    nodes: dict[Digest, ConversationNode] = {node.digest: node for node, _ in read}
    own: dict[Digest, tuple[Asset, ...]] = {node.digest: els for node, els in read}
    parents: list[int | None] = [*range(1, len(rows)), None]

    entries = []
    for i, row in enumerate(shown):
        p = parents[i]
        mine = convs[i]
        node = None if mine is None else nodes[mine]
        missing = row.parent_id is not None and p is None
        added: tuple[Asset, ...] | None = ()
        removed = 0
        theirs = None if p is None else convs[p]
        if missing:
            added = None
        elif mine is None:
            added = ()
        elif p is None or theirs is None:  # a root, or the first with a conversation
            added = await store.get_chain(mine, view.node_kind)
        elif mine == theirs:
            added = ()
        elif node is not None and node.parent == theirs:
            added = own[node.digest]
        else:  # not one step: compare whole histories
            new = await store.get_chain(mine, view.node_kind)
            old = await store.get_chain(theirs, view.node_kind)
            if new[:len(old)] == old:
                added = new[len(old):]
            else:
                added = None
                removed = len(old) - len(new) if old[:len(new)] == new else 0
        note = _branch_note(view, row, rows[p] if p is not None else None)
        entries.append(Entry(view, row, None if node is None else node.length, added,
                             removed, missing, note))
    return entries


def _branch_note(view: View, row: StateRow, parent: StateRow | None) -> str | None:
    """For a session state: the branches it made or deleted."""
    if view.client != "session" or parent is None or parent.kind != row.kind:
        return None
    from immagent.cli.clients import SessionView

    assert isinstance(view, SessionView)
    mine = [name for name, _ in view.branches(row)]
    theirs = [name for name, _ in view.branches(parent)]
    made = [n for n in mine if n not in theirs]
    gone = [n for n in theirs if n not in mine]
    notes = [f"branch {n} made" for n in made] + [f"branch {n} deleted" for n in gone]
    return ", ".join(notes) or None


def _said_line(said: Said, width: int) -> Line:
    """``role: text`` on one line of ``width`` columns, the role in its colour."""
    role, _, rest = clip(f"{said.role}: {said.text}", max(width, 12)).partition(":")
    return (paint(role, said.style), ":", rest)


def _log_lines(entries: list[Entry], width: int) -> Iterator[Line]:
    for i, e in enumerate(entries):
        if i:
            yield ""
        row = e.row
        yield (paint(f"{e.view.state_word} {row.id}", "id"),)
        if row.parent_id:
            deleted = " (deleted)" if e.parent_missing else ""
            yield f"Parent: {row.parent_id}{deleted}"
        yield f"Date:   {local_time(row.created_at)}"
        yield e.view.log_line(row, e.count)
        yield ""
        if e.added:
            for element in e.added:
                yield ("    ", *_said_line(e.view.said(element), width - 4))
        else:
            yield f"    {e.change()}"


def _add_log(p: argparse.ArgumentParser) -> None:
    add_target(p)
    p.add_argument("-n", "--limit", type=count(1), help="show only the newest N states")
    p.add_argument("--oneline", action="store_true",
                   help="one line per state: short id, date, +elements added, the last one")


COMMANDS = [
    Command("show", "one state in full", show, add_target, pages=True,
            description="One state in full: its fields and digests, then every element of its "
                        "conversation: an agent state's system prompt and messages, a "
                        "checkpoint's channels and messages, a session state's branches and "
                        "the items of main."),
    Command("log", "a state and its ancestors, newest first", log, _add_log, pages=True,
            description="A state and its stored ancestors, newest first, each with the "
                        "messages (or items) it added to its parent's conversation."),
]
