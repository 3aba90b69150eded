"""Making and removing states: ``clone``, ``delete``.

``delete`` takes any reference. Named by its conversation (``agent:NAME``, ``thread:ID``,
``session:ID``, ``conversation:ID``, or such a bare name), every state of it goes: all
states of the agent name, every checkpoint and pending write of the thread (every
namespace), every state of the session, every state of the pydantic-ai conversation and
its scope entry. Named by id, that one state goes; with ``--lineage``, also each ancestor no
other state descends from. Content stays until ``gc``. It is destructive: ``--dry-run``
shows what would go, and it asks first (``--yes`` on scripts; see ``cli.confirm``).
"""

from __future__ import annotations

import argparse
from uuid import UUID

from immagent.assets import Kind
from immagent.cli import confirm
from immagent.cli.clients import conversation_ids
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK, EXIT_USAGE, CLIError
from immagent.cli.refs import REF_HELP, add_ref, ref_of
from immagent.cli.render import paint, plural
from immagent.cli.spec import Command
from immagent.cli.summary import agent_json
from immagent.store import EventLog

__all__ = ["COMMANDS"]

#: Ids listed one by one in a plan; beyond that, counted.
_LISTED = 20


# -- clone -----------------------------------------------------------------------------------


def clone(ctx: Context, args: argparse.Namespace) -> int:
    """Make a new agent state with the same content whose parent is REF's; print its id."""
    row = ctx.resolve(args.ref, write=True).row
    if row.kind != Kind.AGENT_STATE:
        raise CLIError(f"{args.ref} is not an agent state: clone makes a sibling of one "
                       "(a LangGraph thread is copied with its saver's copy_thread, a "
                       "session with its fork)", code=EXIT_USAGE)
    new = ctx.run(ctx.load(row.id).clone())
    if ctx.out.as_json:
        ctx.out.json(agent_json(new))
    else:
        ctx.out.line(str(new.id))
    return EXIT_OK


# -- delete ----------------------------------------------------------------------------------


def delete(ctx: Context, args: argparse.Namespace) -> int:
    """Delete what REF names (see the module docstring) after a dry run or a yes."""
    store = ctx.store(write=True)
    found = ctx.resolve(args.ref, write=True)
    row = found.row
    if found.by_name and args.lineage:
        raise CLIError(f"--lineage takes a state id; {args.ref} names a whole "
                       "conversation, and deletes all of it without it", code=EXIT_USAGE)
    if found.by_name:
        what = ref_of(row)
        ids = ctx.run(conversation_ids(store, row))
    elif args.lineage:
        what = f"the lineage of {row.id}"
        ids = ctx.run(store.delete_state_lineage(row.id, dry_run=True))
    else:
        what = f"state {row.id}"
        ids = [row.id]
    action = f"delete {plural(len(ids), 'state')} ({what})"
    plan = confirm.Plan(action, lines=[f"  {i}" for i in ids[:_LISTED]]
                        + ([f"  … and {len(ids) - _LISTED} more"] if len(ids) > _LISTED
                           else []),
                        data={"delete": [str(i) for i in ids]})
    if not ctx.approve(plan):
        return EXIT_OK
    if found.by_name:
        deleted = ctx.run(_delete_all(store, ids))
    elif args.lineage:
        deleted = ctx.run(store.delete_state_lineage(row.id))
    else:
        deleted = ids if ctx.run(store.delete_states(ids)) else []
        if not deleted:
            raise CLIError(f"state {row.id} was deleted meanwhile")
    if ctx.out.as_json:
        ctx.out.json({"deleted": [str(i) for i in deleted]})
    else:
        ctx.out.lines((paint("deleted", "warning"), f" {i}") for i in deleted[:_LISTED])
        if len(deleted) > _LISTED:
            ctx.out.line(f"… and {len(deleted) - _LISTED} more ({len(deleted)} states)")
        ctx.out.note("(their content stays stored until `immagent gc`)")
    return EXIT_OK


async def _delete_all(store: EventLog, ids: list[UUID]) -> list[UUID]:
    deleted: list[UUID] = []
    for start in range(0, len(ids), 10_000):
        chunk = ids[start:start + 10_000]
        if await store.delete_states(chunk):
            deleted += chunk
    return deleted


def _add_delete(p: argparse.ArgumentParser) -> None:
    add_ref(p, help=f"what to delete: {REF_HELP}")
    p.add_argument("--lineage", action="store_true",
                   help="with a state id: also each ancestor no other state descends from")
    confirm.add_options(p)


COMMANDS = [
    Command("clone", "a sibling of an agent state (same content, same parent)", clone,
            lambda p: add_ref(p, help=f"the agent state to clone: {REF_HELP}"),
            description="A new agent state with REF's content and REF's parent (a sibling, "
                        "as in 0.1.2); prints its id."),
    Command("delete", "delete states (asks first; --dry-run shows what would go)", delete,
            _add_delete,
            description="Delete what REF names: named by its conversation (agent:NAME, "
                        "thread:ID, session:ID, conversation:ID, or such a bare name), every "
                        "state of it; "
                        "named by id, that state (--lineage: and each ancestor no other "
                        "state descends from). Content stays stored until gc. Asks first on "
                        "a terminal; scripts pass --yes; --dry-run shows what would go."),
]
