"""The ``immagent`` console script: argument parsing, dispatch, exit codes, error lines."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn
from uuid import UUID

from immagent import __version__
from immagent.cli import audit, chat, commands, diff, trust
from immagent.cli.context import Context
from immagent.cli.database import DEFAULT_DB, ENV_DB, ENV_REPLICAS
from immagent.cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CLIError,
)
from immagent.cli.render import visible
from immagent.exceptions import ImmAgentError, ValidationError

__all__ = ["build_parser", "main"]

Handler = Callable[[Context, argparse.Namespace], int]
_MAX_ERROR_CHARS = 500


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"immagent: error: {message} (see '{self.prog} --help')\n")


def _agent_id(value: str) -> UUID:
    """argparse type: an agent id (a UUID)."""
    try:
        return UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a valid agent id: {value!r} (expected a UUID)") from None


def _count(low: int) -> Callable[[str], int]:
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


def _global_options(for_subcommand: bool) -> _Parser:
    """--db/--json/--debug, accepted before and after the subcommand name."""
    unset = argparse.SUPPRESS if for_subcommand else None
    p = _Parser(add_help=False)
    p.add_argument("--db", metavar="DSN", default=unset,
                   help=f"SQLite file or postgresql:// DSN (default: ${ENV_DB} or ./{DEFAULT_DB})")
    p.add_argument("--replica", metavar="DSN", action="append", default=unset,
                   help=f"a hot standby of a postgresql:// --db that serves reads (repeat for "
                        f"more; with ${ENV_DB}: ${ENV_REPLICAS}, whitespace-separated)")
    p.add_argument("--json", action="store_true", default=unset or False,
                   help="print results as JSON for scripts")
    p.add_argument("--debug", action="store_true", default=unset or False,
                   help="show tracebacks and debug logs")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = _Parser(prog="immagent", parents=[_global_options(False)],
                     description="Immutable, content-addressed agents: every step is a new "
                                 "agent state, every piece of content is stored once.")
    parser.add_argument("--version", action="version", version=f"immagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_global_options(True)]

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=common, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    _add_chat(add("chat", chat.run, "talk to an agent (a new state per turn)"))
    p = add("agents", commands.agents, "list agent states, oldest first")
    p.add_argument("--limit", type=_count(1), default=50, help="states per page (default 50)")
    p.add_argument("--offset", type=_count(0), default=0, help="states to skip")
    p.add_argument("--name", help="only states with this exact name")
    _add_target(add("show", commands.show, "show one state: fields, digests, prompt, messages"))
    p = add("log", commands.log, "lineage of a state, newest first")
    _add_target(p)
    p.add_argument("-n", "--limit", type=_count(1), help="show only the newest N states")
    p.add_argument("--oneline", action="store_true", help="one line per state")
    add("clone", commands.clone, "new state with the same content, parent ID"
        ).add_argument("id", metavar="ID", type=_agent_id)
    p = add("delete", commands.delete, "delete a state (content stays until gc)")
    p.add_argument("id", metavar="ID", type=_agent_id)
    p.add_argument("--lineage", action="store_true", help="also delete every ancestor")
    add("stats", audit.stats, "storage used and what sharing saves")
    add("gc", audit.gc, "remove content no agent state can reach")
    add("verify", audit.verify, "re-hash stored content; exit 1 on any problem"
        ).add_argument("id", metavar="ID", type=_agent_id, nargs="?")
    p = add("export", audit.export, "write a state to a verifiable bundle file")
    p.add_argument("id", metavar="ID", type=_agent_id)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--sign", metavar="KEY", action="append", default=[],
                   help="sign the bundle with this private key file (repeatable)")
    p = add("verify-bundle", trust.verify_bundle,
            "check a bundle file offline (no database); exit 1 corrupt, 3 untrusted, "
            "4 unusable")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--trusted-key", metavar="FILE", action="append", default=[],
                   help="a public key file whose signatures are trusted (repeatable)")
    p.add_argument("--sigs-needed", metavar="N", type=_count(1),
                   help="how many distinct trusted keys must vouch (default 1)")
    add("import", audit.import_, "load a bundle file into the store"
        ).add_argument("file", metavar="FILE")
    add("keygen", trust.keygen, "write a new Ed25519 key pair: PATH (private) and PATH.pub"
        ).add_argument("path", metavar="PATH")
    p = add("attest", trust.attest, "sign a stored state and keep the signature with it")
    p.add_argument("id", metavar="ID", type=_agent_id, help="the state to vouch for")
    p.add_argument("--key", metavar="KEY", required=True, help="your private key file")
    p.add_argument("--note", metavar="TEXT", help="what you vouch for (e.g. 'reviewed')")
    p = add("diff", diff.diff, "where two states meet and what separates them")
    p.add_argument("left", metavar="A", type=_agent_id)
    p.add_argument("right", metavar="B", type=_agent_id)
    p = add("replay", diff.replay_command,
            "rebuild a reply's request from the store and prove it; --run sends it again")
    _add_target(p)
    p.add_argument("--message", metavar="N", type=_count(1),
                   help="the reply to replay, numbered as `show` numbers messages "
                        "(default: the newest that recorded its request)")
    p.add_argument("--run", action="store_true", help="send the request again and compare")
    return parser


def _add_target(p: argparse.ArgumentParser) -> None:
    """ID, or by default the newest state of --name (what ``chat`` would continue)."""
    p.add_argument("id", metavar="ID", type=_agent_id, nargs="?",
                   help="agent state (default: the newest state of --name)")
    p.add_argument("--name", default=chat.DEFAULT_NAME,
                   help=f"name used when ID is left out (default {chat.DEFAULT_NAME!r})")


def _add_chat(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent", metavar="ID", type=_agent_id, help="continue this state")
    who.add_argument("--name", default=chat.DEFAULT_NAME,
                     help=f"continue the newest state of this name, or start one "
                          f"(default {chat.DEFAULT_NAME!r})")
    p.add_argument("--model", help="model of a new agent (default: $IMMAGENT_MODEL, a model "
                                   "of a provider whose API key is set, else immagent/echo)")
    p.add_argument("--system", metavar="PROMPT", help="system prompt of a new agent")
    p.add_argument("message", nargs="*",
                   help="message to send; without one, read a message per line")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage, 130 ^C)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logger = logging.getLogger("immagent")
    level, handler = logger.level, _log_handler(args.debug)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    """Dispatch to the command and turn every failure into one line and an exit status."""
    try:
        with asyncio.Runner() as runner:
            ctx = Context(args, runner)
            try:
                status: int = args.handler(ctx, args)
                sys.stdout.flush()
                return status
            finally:
                ctx.close()
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return _broken_pipe()
    except CLIError as e:
        return _fail(args, e.message, e.code)
    except ValidationError as e:
        return _fail(args, str(e), EXIT_USAGE)
    except ImmAgentError as e:
        return _fail(args, str(e), EXIT_FAILURE)
    except OSError as e:
        return _fail(args, f"{e.strerror or e}: {e.filename}" if e.filename else str(e),
                     EXIT_FAILURE)
    except Exception as e:
        return _fail(args, f"internal error: {type(e).__name__}: {e} (rerun with --debug "
                           "for the traceback)", EXIT_FAILURE)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print ``immagent: error: …`` on one line (the traceback first with --debug)."""
    if args.debug:
        traceback.print_exc()
    text = visible(" ".join(message.split()))  # an error may quote a stored name
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    sys.stderr.write(f"immagent: error: {text}\n")
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
        return f"immagent: {record.levelname.lower()}: {record.getMessage()}"


def _log_handler(debug: bool) -> logging.Handler:
    """Library warnings (e.g. LLM retries) on stderr; everything with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("immagent")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    return handler
