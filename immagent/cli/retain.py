"""Retention from the command line: ``retain``, ``pin``, ``unpin`` (``immagent.retention``).

``retain`` builds a one-rule policy from its options (``--keep-latest``, ``--max-age``,
``--keep-every``, narrowed by ``--kind``, ``--streams`` and ``--idle-for``), or without
them applies the policy stored in the database (``--save`` stores the one the options
build instead of applying it). It is destructive: a dry run first says what would go, then
it asks (``--yes`` on scripts, ``--dry-run`` only to look; see ``cli.confirm``), then it
deletes and runs gc. ``pin`` keeps a state (and its content) through every retention run.
"""

from __future__ import annotations

import argparse
from typing import Any

from immagent.audit.retain import RetentionReport
from immagent.cli import confirm
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK, EXIT_USAGE, CLIError
from immagent.cli.refs import REF_HELP, add_ref, describe
from immagent.cli.render import human_bytes, paint, plural
from immagent.cli.spec import Command, count
from immagent.retention import KINDS, Policy, Rule

__all__ = ["COMMANDS"]


def _policy(args: argparse.Namespace) -> Policy | None:
    """The policy the options build, or None when they name no rule (use the stored one).
    Bad values are ValidationErrors naming the option's field (the app prints them)."""
    keeps = (args.keep_latest, args.max_age, args.keep_every)
    narrows = (args.kind, args.streams, args.idle_for)
    if all(k is None for k in keeps) and not args.drop:
        if any(n for n in narrows):
            raise CLIError("--kind, --streams and --idle-for narrow a rule: add what it keeps "
                           "(--keep-latest, --max-age, --keep-every) or --drop",
                           code=EXIT_USAGE)
        return None
    return Policy.of(Rule.of(kinds=args.kind or (), streams=args.streams,
                             idle_for=args.idle_for, keep_latest=args.keep_latest,
                             max_age=args.max_age, keep_every=args.keep_every,
                             drop=args.drop))


def retain(ctx: Context, args: argparse.Namespace) -> int:
    """Apply a retention policy (the options' or the stored one) after a dry run or a yes;
    ``--save`` stores the options' policy instead."""
    store = ctx.store(write=True)
    policy = _policy(args)
    if args.save:
        if policy is None:
            raise CLIError("--save stores the policy the options build: give at least one of "
                           "--keep-latest, --max-age, --keep-every or --drop", code=EXIT_USAGE)
        ctx.run(store.set_retention_policy(policy))
        ctx.out.line("stored the retention policy:")
        ctx.out.lines(f"  {line}" for line in policy.describe())
        return EXIT_OK
    if policy is None:
        policy = ctx.run(store.retention_policy())
        if policy is None:
            raise CLIError("no retention policy is stored and no rule was given: pass "
                           "--keep-latest N, --max-age DURATION or --keep-every K (or store "
                           "one with --save)", code=EXIT_USAGE)
    if not args.yes:  # the same run, rolled back, says what the question is about
        planned = ctx.run(store.apply_retention(policy, dry_run=True))
        plan = confirm.Plan(
            f"delete {plural(planned.states_deleted, 'state')} "
            f"({human_bytes(planned.state_bytes)}) and gc",
            lines=[f"  policy: {line}" for line in policy.describe()]
            + [f"  {line}" for line in planned.lines()],
            data=_report_json(planned), empty=planned.states_deleted == 0)
        if not ctx.approve(plan):
            return EXIT_OK
    report = ctx.run(store.apply_retention(policy))
    if ctx.out.as_json:
        ctx.out.json(_report_json(report))
    else:
        ctx.out.lines(report.lines())
    return EXIT_OK


def _report_json(report: RetentionReport) -> dict[str, Any]:
    return {"dry_run": report.dry_run, "streams": report.streams,
            "states_deleted": report.states_deleted, "states_by_kind": report.states,
            "state_bytes": report.state_bytes, "assets_removed": report.assets_removed,
            "assets_by_kind": report.assets, "asset_bytes": report.asset_bytes,
            "kept_whole": list(report.kept_whole), "seconds": report.seconds}


def pin(ctx: Context, args: argparse.Namespace) -> int:
    """Pin REF's state (``--list``: show the pins of REF, or of the store)."""
    store = ctx.store(write=not args.list)
    if args.list:
        row = ctx.state(args.ref) if args.ref is not None else None
        pins = ctx.run(store.pins(None if row is None else row.id))
        if ctx.out.as_json:
            ctx.out.json([{"pin": str(p.id), "state": str(p.state_id), "tag": p.tag,
                           "note": p.note, "created_at": p.created_at.isoformat()}
                          for p in pins])
        else:
            ctx.out.lines((paint(str(p.state_id), "id"),
                           f"  {p.created_at:%Y-%m-%d %H:%M}",
                           f"  {p.tag}" if p.tag else "", f"  {p.note}" if p.note else "")
                          for p in pins)
            if not pins:
                ctx.out.note("(no pins)")
        return EXIT_OK
    if args.ref is None:
        raise CLIError("pin needs the state to pin (or --list)", code=EXIT_USAGE)
    row = ctx.resolve(args.ref, write=True).row
    pin_id = ctx.run(store.pin(row.id, tag=args.tag, note=args.note))
    if ctx.out.as_json:
        ctx.out.json({"pin": str(pin_id), "state": str(row.id)})
    else:
        ctx.out.line(("pinned ", describe(row)))
    return EXIT_OK


def unpin(ctx: Context, args: argparse.Namespace) -> int:
    """Remove the pins of REF's state (only those tagged ``--tag``, when given)."""
    store = ctx.store(write=True)
    row = ctx.resolve(args.ref, write=True).row
    removed = ctx.run(store.unpin(row.id, tag=args.tag))
    if ctx.out.as_json:
        ctx.out.json({"unpinned": removed, "state": str(row.id)})
    else:
        ctx.out.line(f"removed {plural(removed, 'pin')} of {row.id}")
    return EXIT_OK


def _add_retain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-latest", metavar="N", type=count(1),
                   help="keep the newest N states of each stream")
    p.add_argument("--max-age", metavar="DURATION",
                   help="keep states younger than DURATION (90s, 15m, 12h, 30d, 2w, 1d12h)")
    p.add_argument("--keep-every", metavar="K", type=count(1),
                   help="keep every K-th state of each stream (counted from its oldest)")
    p.add_argument("--drop", action="store_true",
                   help="delete whole streams (pinned states stay): needs --idle-for")
    p.add_argument("--kind", action="append", choices=sorted(KINDS),
                   help="only streams of this client (repeatable; default: every client)")
    p.add_argument("--streams", metavar="GLOB",
                   help="only streams whose name matches GLOB (a thread's: its thread id)")
    p.add_argument("--idle-for", metavar="DURATION",
                   help="only streams whose newest state is at least DURATION old")
    p.add_argument("--save", action="store_true",
                   help="store this policy in the database instead of applying it (a later "
                        "`immagent retain` without rules, or a periodic task, applies it)")
    confirm.add_options(p)


def _add_pin(p: argparse.ArgumentParser) -> None:
    add_ref(p, optional=True, help=f"the state to pin: {REF_HELP}")
    p.add_argument("--tag", help="a name for the pin (pinning again with it does nothing)")
    p.add_argument("--note", help="why it is pinned")
    p.add_argument("--list", action="store_true",
                   help="list the pins of REF's state (without REF: every pin)")


def _add_unpin(p: argparse.ArgumentParser) -> None:
    add_ref(p, help=f"the pinned state: {REF_HELP}")
    p.add_argument("--tag", help="remove only the pin with this tag")


COMMANDS = [
    Command("retain", "delete the states a retention policy does not keep, then gc (asks "
            "first; --dry-run)", retain, _add_retain,
            description="Delete the states a retention policy does not keep, then gc. The "
                        "policy is the one rule the options build (what it keeps: "
                        "--keep-latest, --max-age, --keep-every; or --drop with --idle-for; "
                        "which streams: --kind, --streams, --idle-for), or without them the "
                        "stored policy (--save stores the options' policy). Heads, pinned "
                        "states and a pending interrupt are always kept. Asks first on a "
                        "terminal; scripts pass --yes; --dry-run only says what would go."),
    Command("pin", "keep a state through every retention run (--list: the pins)", pin,
            _add_pin,
            description="Pin REF's state: retention never deletes it and its content stays "
                        "even if it is deleted by hand. --list shows the pins."),
    Command("unpin", "remove the pins of a state", unpin, _add_unpin,
            description="Remove the pins of REF's state (--tag: only that one); its content "
                        "then stays only while a state reaches it."),
]
