"""Destructive commands: a dry run, then a confirmation, the same way for every one.

A command that deletes (``delete``, ``gc``, and whatever comes later) adds ``--dry-run``
and ``--yes`` with ``add_options`` and calls ``approve`` with its ``Plan`` before doing
anything:

* ``--dry-run`` prints the plan (JSON with ``--json``) and changes nothing;
* ``--yes`` goes ahead;
* otherwise, on a terminal, the plan is shown on stderr with a ``[y/N]`` question; with
  no terminal to ask on (a script, a pipe), the command refuses, exit status 2, and says
  to add ``--yes``, so nothing is deleted by a script that did not say so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from immagent.cli.errors import EXIT_FAILURE, EXIT_USAGE, CLIError
from immagent.cli.output import Output
from immagent.cli.render import Line

__all__ = ["Plan", "add_options", "approve"]


@dataclass
class Plan:
    """What a destructive command is about to do."""

    #: The action in a few words, for the question and the refusal ("delete 3 states").
    action: str
    #: The details a person reads before saying yes (one per line).
    lines: Sequence[Line] = field(default_factory=list)
    #: The same for ``--json --dry-run``.
    data: dict[str, Any] = field(default_factory=dict)
    #: Nothing to do: no question is asked.
    empty: bool = False


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--dry-run`` and ``-y/--yes`` for a destructive command."""
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be deleted and delete nothing")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="do it without asking (needed when stdin is not a terminal)")


def approve(out: Output, args: argparse.Namespace, plan: Plan) -> bool:
    """True to go ahead; False after a dry run (its plan printed). Asks on a terminal;
    CLIError when it cannot ask or the answer is no."""
    if args.dry_run:
        if out.as_json:
            out.json({"dry_run": True, "action": plan.action} | plan.data)
        else:
            out.line(f"would {plan.action}")
            out.lines(plan.lines)
        return False
    if args.yes or plan.empty:
        return True
    if not out.terminal.stdin_tty:
        raise CLIError(f"refusing to {plan.action} without confirmation: add --yes to do it, "
                       "or --dry-run to see what it would do", code=EXIT_USAGE)
    for line in plan.lines:
        out.note(line)
    question = f"{plan.action[:1].upper()}{plan.action[1:]}? [y/N] "
    sys.stderr.write(out.render(question, color=False))
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise CLIError("nothing was changed (not confirmed)", code=EXIT_FAILURE)
    return True
