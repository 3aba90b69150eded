"""Redaction from the command line: ``redact`` (``immagent.redaction``, docs/retention.md).

``immagent redact REF --message N`` erases the N-th message of REF's conversation (as
``immagent show`` numbers them), ``immagent redact --digest HEX`` a message by its
digest, wherever it is stored. Destructive and not undoable: a dry run first says which
message and how many records, then it asks (``--yes`` on scripts, ``--dry-run`` only to
look; see ``cli.confirm``).
"""

from __future__ import annotations

import argparse
from typing import Any

from immagent.audit.redact import RedactionReport
from immagent.cli import confirm
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_OK, EXIT_USAGE, CLIError
from immagent.cli.refs import REF_HELP, add_ref
from immagent.cli.spec import Command, count

__all__ = ["COMMANDS"]


def redact(ctx: Context, args: argparse.Namespace) -> int:
    """Erase one message (REF and --message N, or --digest HEX) after a dry run or a yes."""
    if (args.digest is None) == (args.ref is None):
        raise CLIError("give a state and --message N, or --digest HEX", code=EXIT_USAGE)
    if args.ref is not None and args.message is None:
        raise CLIError("--message N says which message of the state to erase (as "
                       "`immagent show` numbers them)", code=EXIT_USAGE)
    if args.digest is not None and args.message is not None:
        raise CLIError("--message goes with a state, not with --digest", code=EXIT_USAGE)
    store = ctx.store(write=True)
    target: dict[str, Any]
    if args.ref is not None:
        row = ctx.resolve(args.ref, write=True).row
        target = {"state": row.id, "position": args.message}
    else:
        target = {"message": args.digest.lower()}
    reason = args.reason or ""
    if not args.yes:  # the same transaction, rolled back, says what the question is about
        planned = ctx.run(store.redact(**target, reason=reason, dry_run=True))
        plan = confirm.Plan(
            f"erase message {planned.digest.hex()[:16]} from {planned.nodes} node "
            "record(s); this cannot be undone",
            lines=[f"  {line}" for line in planned.lines()],
            data=_report_json(planned), empty=planned.already)
        if not ctx.approve(plan):
            return EXIT_OK
    report = ctx.run(store.redact(**target, reason=reason))
    if ctx.out.as_json:
        ctx.out.json(_report_json(report))
    else:
        ctx.out.lines(report.lines())
    return EXIT_OK


def _report_json(report: RedactionReport) -> dict[str, Any]:
    return {"digest": report.digest.hex(), "reason": report.reason,
            "at": report.at.isoformat(), "nodes": report.nodes, "assets": report.assets,
            "dry_run": report.dry_run, "already": report.already}


def _add_redact(p: argparse.ArgumentParser) -> None:
    add_ref(p, optional=True, help=f"the state whose message to erase: {REF_HELP}")
    p.add_argument("--message", metavar="N", type=count(1),
                   help="the message to erase, numbered as `immagent show` shows them")
    p.add_argument("--digest", metavar="HEX",
                   help="erase the message with this digest (64 hex digits) instead")
    p.add_argument("--reason", metavar="TEXT",
                   help="why (kept in the tombstone and shown where the message was)")
    confirm.add_options(p)


COMMANDS = [
    Command("redact", "erase one message everywhere it is stored, keeping every digest true "
            "(asks first; --dry-run)", redact, _add_redact,
            description="Erase one message's content from every record that holds it (every "
                        "lineage) and leave a tombstone with its digest, the reason and the "
                        "time: every state still verifies, reads show '[redacted DATE: "
                        "REASON]', verify lists it as redacted, and a later write of the "
                        "same content is refused. Name it as REF --message N (numbered as "
                        "`immagent show` shows) or --digest HEX. Not undoable: asks "
                        "first on a terminal; scripts pass --yes; --dry-run only says what "
                        "it would erase. See docs/retention.md for purging old copies from "
                        "database files, WAL and backups."),
]
