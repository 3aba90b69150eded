"""The ``immagent`` console script: argument parsing, dispatch, exit codes, error lines.

The grammar is built from the ``COMMANDS`` list of each command module (``cli.spec``):
one place names every subcommand, in the order ``immagent --help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from immagent import __version__
from immagent.cli import (
    audit,
    chat,
    diff,
    edit,
    heads,
    history,
    prove,
    redact,
    retain,
    trust,
)
from immagent.cli.context import Context
from immagent.cli.database import DEFAULT_DB, ENV_DB, ENV_REPLICAS
from immagent.cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
)
from immagent.cli.output import Output, PagerClosed, Terminal
from immagent.cli.render import visible
from immagent.cli.spec import Command
from immagent.exceptions import ImmAgentError, ValidationError

__all__ = ["COMMANDS", "build_parser", "main"]

#: Every subcommand, in help order. A new command module adds its list here.
COMMANDS: list[Command] = [*chat.COMMANDS, *heads.COMMANDS, *history.COMMANDS,
                           *edit.COMMANDS, *audit.COMMANDS, *retain.COMMANDS,
                           *redact.COMMANDS, *trust.COMMANDS, *prove.COMMANDS,
                           *diff.COMMANDS]
_MAX_ERROR_CHARS = 500


class _Parser(argparse.ArgumentParser):
    """argparse with one visible usage-error line (JSON with --json) and exit status 2."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see '{self.prog} --help')"
        _error_output(self.json_errors).error(_one_line(text), EXIT_USAGE, "UsageError")
        self.exit(EXIT_USAGE)


def _global_options(for_subcommand: bool) -> _Parser:
    """Options accepted before and after the subcommand name."""
    unset = argparse.SUPPRESS if for_subcommand else None
    p = _Parser(add_help=False)
    p.add_argument("--db", metavar="DSN", default=unset,
                   help=f"SQLite file or postgresql:// DSN (default: ${ENV_DB} or ./{DEFAULT_DB})")
    p.add_argument("--replica", metavar="DSN", action="append", default=unset,
                   help=f"a hot standby of a postgresql:// --db that serves reads (repeat for "
                        f"more; with ${ENV_DB}: ${ENV_REPLICAS}, whitespace-separated)")
    p.add_argument("--json", action="store_true", default=unset or False,
                   help="print results as JSON for scripts (errors too, on stderr)")
    p.add_argument("--color", choices=("auto", "always", "never"), default=unset,
                   help="colour output: auto (default: on a terminal, unless NO_COLOR is "
                        "set), always or never")
    p.add_argument("--no-pager", action="store_true", default=unset or False,
                   help="never page output (by default long output goes through $PAGER, "
                        "or less, when stdout is a terminal)")
    p.add_argument("--debug", action="store_true", default=unset or False,
                   help="show tracebacks and debug logs")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = _Parser(prog="immagent", parents=[_global_options(False)],
                     description="Immutable, content-addressed agent state: every step is a "
                                 "new state, every piece of content is stored once. Browses "
                                 "and audits what PersistentAgent, LangGraph's ImmAgentSaver "
                                 "and the Agents SDK's ImmAgentSession store.")
    parser.add_argument("--version", action="version", version=f"immagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    common = [_global_options(True)]
    for command in COMMANDS:
        p = sub.add_parser(command.name, parents=common, help=command.help,
                           description=command.description or command.help)
        command.arguments(p)
        p.set_defaults(command_spec=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage, 130 ^C)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in args_list[: _end_of_options(args_list)]
    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logger = logging.getLogger("immagent")
    level, handler = logger.level, _log_handler(args.debug)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _end_of_options(argv: Sequence[str]) -> int:
    return argv.index("--") if "--" in argv else len(argv)


def _run(args: argparse.Namespace) -> int:
    """Dispatch to the command and turn every failure into one line and an exit status."""
    command: Command = args.command_spec
    ctx: Context | None = None
    try:
        with asyncio.Runner() as runner:
            ctx = Context(args, runner, pages=command.pages)
            try:
                status: int = command.run(ctx, args)
                ctx.out.flush()
                return status
            finally:
                ctx.close()
    except KeyboardInterrupt:
        return _fail(args, ctx, "interrupted", EXIT_INTERRUPTED, "KeyboardInterrupt")
    except PagerClosed:
        return EXIT_OK  # the reader quit the pager: what they did not read is not an error
    except BrokenPipeError:
        return _broken_pipe()
    except CLIError as e:
        return _fail(args, ctx, e.message, e.code, "CLIError")
    except ValidationError as e:
        return _fail(args, ctx, str(e), EXIT_USAGE, type(e).__name__)
    except ImmAgentError as e:
        return _fail(args, ctx, str(e), EXIT_FAILURE, type(e).__name__)
    except OSError as e:
        return _fail(args, ctx, f"{e.strerror or e}: {e.filename}" if e.filename else str(e),
                     EXIT_FAILURE, type(e).__name__)
    except Exception as e:
        return _fail(args, ctx, f"internal error: {type(e).__name__}: {e} (rerun with --debug "
                                "for the traceback)", EXIT_FAILURE, type(e).__name__)


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    return text


def _error_output(as_json: bool) -> Output:
    return Output(as_json, Terminal.detect("auto"))


def _fail(args: argparse.Namespace, ctx: Context | None, message: str, code: int,
          kind: str) -> int:
    """Print ``immagent: error: …`` on one line (the traceback first with --debug), or
    with --json ``{"error": {…}}``; return the exit status."""
    if args.debug:
        traceback.print_exc()
    out = ctx.out if ctx is not None else _error_output(bool(args.json))
    out.error(_one_line(message), code, kind)
    return code


def _broken_pipe() -> int:
    """The reader went away (``immagent log … | head``): stop quietly."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_FAILURE


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # A provider's error text is not ours: shown visibly, like everything else.
        return visible(f"immagent: {record.levelname.lower()}: {record.getMessage()}")


def _log_handler(debug: bool) -> logging.Handler:
    """Library warnings (e.g. LLM retries) on stderr; everything with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("immagent")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    return handler
