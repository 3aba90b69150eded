"""``immagent chat``: create or continue an agent, one advance per message or input line.

On a terminal the reply is streamed (tokens printed as they arrive, the turn saved when it
completes); piped, the reply is printed once saved; ``--json`` prints one JSON object per
turn (JSON Lines when reading turns from stdin). Ctrl-C during a turn saves nothing of it,
streamed or not. A streamed reply goes through ``visible`` as every other output does,
chunk by chunk: a surrogate pair or a CR LF that a provider splits across two chunks is
joined first, so text stays intact and no escape sequence reaches the terminal.

A provider model whose key is not in the environment fails at once, before the model
client loads (seconds), naming the variable: for the providers the command line picks
models of itself (OpenAI, Anthropic, Gemini); any other provider's missing key fails on
its first call, without retries (``llm``).

Answering at once: the offline models are answered in-process (no LiteLLM import). For a
provider model, LiteLLM's import (seconds) starts in the background before the store is
opened and overlaps with opening it and reading the history; if the turn still has to wait
for it, stderr says so ("loading model client…", on a terminal only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from immagent import lazy_litellm
from immagent.agent import PersistentAgent
from immagent.assets import Kind, Message
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError
from immagent.cli.refs import REF_HELP, parse_ref, resolve
from immagent.cli.render import Progress, message_json, visible
from immagent.cli.spec import Command
from immagent.cli.summary import agent_json, newest
from immagent.clients.agents import Store
from immagent.exceptions import ImmAgentError
from immagent.llm import needs_litellm
from immagent.offline import ECHO_MODEL

if TYPE_CHECKING:
    from immagent.stream import TurnEvent

__all__ = ["COMMANDS", "DEFAULT_NAME", "DEFAULT_SYSTEM_PROMPT", "StreamText", "default_model",
           "missing_key", "run"]

DEFAULT_NAME = "assistant"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: Explicit default model for new agents, before any provider key is considered.
ENV_MODEL = "IMMAGENT_MODEL"
#: Provider keys, in order of preference, and the model a new agent then uses.
PROVIDER_MODELS = (
    ("ANTHROPIC_API_KEY", "anthropic/claude-sonnet-4-20250514"),
    ("OPENAI_API_KEY", "openai/gpt-4o-mini"),
    ("GEMINI_API_KEY", "gemini/gemini-2.0-flash"),
)


#: The variables LiteLLM reads each of those providers' key from (any one will do).
PROVIDER_KEYS = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}
#: Bare model names LiteLLM routes to one of them.
_BARE_PROVIDERS = (("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"),
                   ("o3", "openai"), ("o4", "openai"), ("claude-", "anthropic"))


def missing_key(model: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable to set when ``model`` is one of PROVIDER_KEYS' providers and none of
    its key variables is set; None otherwise (also for every other provider)."""
    env = os.environ if environ is None else environ
    provider, sep, _ = model.partition("/")
    if not sep:
        provider = next((p for prefix, p in _BARE_PROVIDERS if model.startswith(prefix)), "")
    names = PROVIDER_KEYS.get(provider)
    if names is None or any(env.get(n, "").strip() for n in names):
        return None
    return names[0]


def _check_key(model: str) -> None:
    if needs_litellm(model):
        lazy_litellm.require()  # the install command first: a key alone would not do
    missing = missing_key(model)
    if missing is not None:
        raise CLIError(f"{model} needs an API key: set {missing} in the environment "
                       "(no turn was sent or saved)")


def default_model(environ: Mapping[str, str] | None = None) -> str:
    """$IMMAGENT_MODEL, else a model of the first provider with a key, else the offline
    echo model (so ``immagent chat`` works with no account and no network)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_MODEL, "").strip():
        return env[ENV_MODEL].strip()
    for key, model in PROVIDER_MODELS:
        if env.get(key, "").strip():
            return model
    return ECHO_MODEL


@dataclass
class Turn:
    """The outcome of one advance: the new state and the messages it added."""

    agent: PersistentAgent
    added: tuple[Message, ...]
    total: int  # messages in the new state's conversation

    @property
    def reply(self) -> str:
        """The text of the last assistant message of the turn ("" if it had none)."""
        for m in reversed(self.added):
            if m.role == "assistant" and m.content:
                return m.content
        return ""

    def to_json(self) -> dict[str, Any]:
        """The turn for ``--json``: the new state, the reply and every added message."""
        return {"agent": agent_json(self.agent, self.total), "reply": self.reply,
                "added": [message_json(m) for m in self.added]}


class Conversation:
    """The agent being chatted with; a new agent is only stored with its first turn."""

    def __init__(self, store: Store, agent: PersistentAgent | None, *, name: str,
                 model: str, system_prompt: str) -> None:
        self.store = store
        self.agent = agent
        self.name, self.model, self.system_prompt = name, model, system_prompt

    @property
    def current_model(self) -> str:
        """The model the next turn calls."""
        return self.agent.model if self.agent is not None else self.model

    async def turn(self, text: str, screen: Screen) -> Turn:
        """Advance once (streamed if ``screen`` streams). If this creates the agent and the
        turn fails or is interrupted, the new state is deleted again, so a failed first
        turn leaves no agent behind."""
        created = self.agent is None
        agent = self.agent or await self.store.create_agent(
            self.name, self.system_prompt, self.model)
        try:
            # Read before waiting for the model client: the store caches both for the turn.
            before = await agent.get_messages()
            await agent.get_system_prompt()
            await _model_client(agent.model, screen)
            screen.waiting(f"{agent.model} is thinking…")
            if screen.streams:
                async with agent.stream(text) as s:
                    async for event in s:
                        screen.show(event)
                new = s.agent
            else:
                new = await agent.advance(text)
        except BaseException:
            if created:
                await self.store.delete(agent)
            raise
        after = await new.get_messages()
        self.agent = new
        return Turn(new, after[len(before):], len(after))


async def _model_client(model: str, screen: Screen) -> None:
    """Wait for LiteLLM if this model needs it and its import is still running."""
    from immagent.llm import needs_litellm

    if needs_litellm(model) and not lazy_litellm.loaded():
        screen.waiting("loading model client…")
        await lazy_litellm.load_async()


class StreamText:
    """A streamed reply made visible chunk by chunk. A chunk may end inside a surrogate
    pair (a provider's JSON can split an emoji's escapes) or between CR and LF: that last
    character waits for the next chunk, so pairs are joined and CR LF becomes one line
    feed; ``flush`` shows what is left (a lone surrogate or CR as visible stand-ins)."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, chunk: str) -> str:
        """What can be written of ``chunk`` now."""
        text, self._held = self._held + chunk, ""
        if text and ("\ud800" <= text[-1] <= "\udbff" or text[-1] == "\r"):
            text, self._held = text[:-1], text[-1]
        return _shown(text)

    def flush(self) -> str:
        """The rest, once the stream has ended."""
        text, self._held = self._held, ""
        return _shown(text)


def _shown(text: str) -> str:
    if not text.isascii():  # join surrogate pairs; a lone one stays (visible shows it)
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return visible(text.replace("\r\n", "\n"))


class Screen:
    """What a turn shows while it runs: a status on stderr (a terminal only) until output
    starts, and, when ``streams``, the reply's text on stdout as it arrives."""

    def __init__(self, streams: bool, write: Callable[[str], None] | None = None) -> None:
        self.streams = streams
        self._status = Progress("")
        self._write = write or _stdout
        self._text = StreamText()
        self._open = False  # a streamed line has text and no newline yet

    def waiting(self, what: str) -> None:
        """Say what the turn waits for (not while a reply is being printed)."""
        if not self._open:
            self._status.status(what)

    def show(self, event: TurnEvent) -> None:
        """Print one event of a streamed turn."""
        from immagent.stream import AssistantReply, TextDelta

        if isinstance(event, TextDelta):
            self._status.finish()
            self._write(self._text.feed(event.text))
            self._open = True
        elif isinstance(event, AssistantReply) and event.message.tool_calls:
            self.end_line()
            names = ", ".join(c.name for c in event.message.tool_calls)
            self.waiting(f"running {names}…")

    def end_line(self) -> None:
        """Finish the streamed line (if any) and clear the status."""
        self._status.finish()
        if self._open:
            self._write(self._text.flush() + "\n")
            self._open = False


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(ctx: Context, args: argparse.Namespace) -> int:
    """Entry point of ``immagent chat``."""
    from immagent.llm import needs_litellm

    text = " ".join(args.message)
    if args.message and not text.strip():
        raise CLIError("the message is empty", code=EXIT_USAGE)
    # The model is known for sure only once the agent is read; start on the likely one,
    # so the import overlaps with opening the store.
    likely = args.model or default_model()
    if needs_litellm(likely):
        lazy_litellm.preload()
    store = ctx.store(create=True)
    conversation = ctx.run(_conversation(store, args))
    _check_key(conversation.current_model)
    if needs_litellm(conversation.current_model):
        lazy_litellm.preload()
    if args.message:
        return _one_shot(ctx, conversation, text)
    return _interactive(ctx, conversation)


async def _conversation(store: Store, args: argparse.Namespace) -> Conversation:
    """The agent named by --agent, else the newest state called --name (or a new one)."""
    if args.agent is not None:
        row = (await resolve(store, args.agent)).row
        if row.kind != Kind.AGENT_STATE:
            raise CLIError(f"--agent {args.agent}: not an agent state (chat continues "
                           "agents; threads and sessions are continued by their apps)",
                           code=EXIT_USAGE)
        agent: PersistentAgent | None = await store.load_agent(row.id)
    else:
        agent = await newest(store, args.name)
    if agent is not None:
        await _check_unchanged(agent, args)
    return Conversation(store, agent, name=args.name, model=args.model or default_model(),
                        system_prompt=args.system or DEFAULT_SYSTEM_PROMPT)


async def _check_unchanged(agent: PersistentAgent, args: argparse.Namespace) -> None:
    """--model and --system describe a new agent; refuse them when they would be ignored."""
    if args.model and args.model != agent.model:
        raise CLIError(f"agent {agent.id} uses model {agent.model!r}; --model only applies "
                       "to a new agent (pick a new --name)", code=EXIT_USAGE)
    if args.system and args.system != await agent.get_system_prompt():
        raise CLIError(f"agent {agent.id} has another system prompt; --system only applies "
                       "to a new agent (pick a new --name)", code=EXIT_USAGE)


def _advance(ctx: Context, conversation: Conversation, text: str) -> Turn:
    """One turn: streamed to a terminal, otherwise shown once saved."""
    screen = Screen(streams=_streams(ctx))
    try:
        return ctx.run(conversation.turn(text, screen))
    finally:
        screen.end_line()


def _one_shot(ctx: Context, conversation: Conversation, text: str) -> int:
    """Send one message, print the reply and the new agent id."""
    try:
        turn = _advance(ctx, conversation, text)
    except KeyboardInterrupt:
        ctx.out.note("immagent: interrupted: this turn was not saved")
        return EXIT_INTERRUPTED
    _show_turn(ctx, turn, compact=False, streamed=_streams(ctx))
    return EXIT_OK


def _streams(ctx: Context) -> bool:
    return sys.stdout.isatty() and not ctx.out.as_json


def _show_turn(ctx: Context, turn: Turn, *, compact: bool, streamed: bool) -> None:
    if ctx.out.as_json:
        ctx.out.json(turn.to_json(), compact=compact)
        ctx.out.flush()
        return
    if not streamed:  # a streamed reply is on the screen already
        ctx.out.line(turn.reply.replace("\r\n", "\n"))
    if not compact:
        ctx.out.line(f"agent {turn.agent.id}")
    ctx.out.flush()  # a reader on a pipe sees each reply before the next prompt


def _interactive(ctx: Context, conversation: Conversation) -> int:
    """Read lines until EOF or Ctrl-C; each non-blank line is one turn."""
    tty = sys.stdin.isatty()
    if tty:
        _enable_line_editing()
        who = conversation.agent.id if conversation.agent else "a new agent"
        ctx.out.note(f"chatting as {conversation.name!r} ({who}); Ctrl-D or Ctrl-C to quit")
    status = EXIT_OK
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                ctx.out.note("")
            break
        if not line.strip():
            continue
        try:
            turn = _advance(ctx, conversation, line)
        except KeyboardInterrupt:
            ctx.out.note("immagent: interrupted: this turn was not saved")
            status = EXIT_INTERRUPTED
            break
        except ImmAgentError as e:
            ctx.out.note(f"immagent: error: {e} (nothing was saved for this turn)")
            status = EXIT_FAILURE
            continue
        _show_turn(ctx, turn, compact=True, streamed=_streams(ctx))
    _show_last(ctx, conversation)
    return status


def _show_last(ctx: Context, conversation: Conversation) -> None:
    """Print the id of the newest state, the one to continue from."""
    if conversation.agent is None or ctx.out.as_json:
        return
    ctx.out.line(f"agent {conversation.agent.id}")


def _enable_line_editing() -> None:
    """Arrow keys and history at the prompt, where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what enables line editing)


def _arguments(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent", metavar="REF", type=parse_ref,
                     help=f"continue this agent state ({REF_HELP}); a state that is not "
                          "its name's newest forks it")
    who.add_argument("--name", default=DEFAULT_NAME,
                     help=f"continue the newest state of this agent name (exact), or start "
                          f"one (default {DEFAULT_NAME!r})")
    p.add_argument("--model", help="model of a new agent (default: $IMMAGENT_MODEL, a model "
                                   "of a provider whose API key is set, else immagent/echo)")
    p.add_argument("--system", metavar="PROMPT", help="system prompt of a new agent")
    p.add_argument("message", nargs="*",
                   help="message to send; without one, read a message per line")


COMMANDS = [
    Command("chat", "talk to an agent (a new state per turn)", run, _arguments,
            description="Talk to an agent: each message is one turn and one new state. On "
                        "a terminal the reply streams as it arrives; piped, it is printed "
                        "once saved; --json prints one JSON object per turn (JSON Lines). "
                        "Without a message, reads one per line from stdin."),
]
