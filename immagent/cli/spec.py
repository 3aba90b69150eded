"""How a subcommand is declared: its name, one line of help, its arguments and its entry
point, plus the argument types every command shares. ``cli.app`` builds the parser from
the ``COMMANDS`` list of each command module (see docs/cli.md, *Adding a command*)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from immagent.cli.context import Context

__all__ = ["Command", "Handler", "count"]

#: A command's entry point: the Context and the parsed arguments in, the exit status out.
Handler = Callable[["Context", argparse.Namespace], int]


def _nothing(parser: argparse.ArgumentParser) -> None:
    """A command without arguments of its own."""


@dataclass(frozen=True)
class Command:
    """One ``immagent`` subcommand."""

    #: What is typed after ``immagent``.
    name: str
    #: A few words for ``immagent --help``'s list of commands.
    help: str
    #: The entry point.
    run: Handler
    #: Adds the command's own arguments to its parser (references: ``refs.add_ref``;
    #: destructive commands: ``confirm.add_options``).
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=_nothing)
    #: Its human output may be long: on a terminal it goes through the pager.
    pages: bool = False
    #: What ``immagent NAME --help`` says it does (default: ``help``). Say exactly what it
    #: does: tests run the commands to hold help texts to behaviour.
    description: str = ""


def count(low: int) -> Callable[[str], int]:
    """argparse type: an int >= ``low``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n
    parse.__name__ = "count"
    return parse
