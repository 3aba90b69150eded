"""``immagent diff A B``: where two states meet and what separates them; ``immagent replay
ID``: a reply's request rebuilt from the store, proven, and (``--run``) sent again."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from immagent.assets import Asset, Kind
from immagent.audit.diff import ChainDiff, StateDiff
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNUSABLE, CLIError
from immagent.cli.history import add_target, target
from immagent.cli.refs import REF_HELP, parse_ref
from immagent.cli.render import (
    clip,
    element_json,
    element_line,
    jsonable,
    message_json,
    message_line,
)
from immagent.cli.spec import Command, count
from immagent.replay import Rebuilt, Replayed, rebuild, replay

__all__ = ["COMMANDS"]


# -- diff ------------------------------------------------------------------------------------

def diff(ctx: Context, args: argparse.Namespace) -> int:
    """Print where two states meet, what each added, what else changed."""
    found = ctx.run(ctx.store().diff(ctx.state(args.left).id, ctx.state(args.right).id))
    if ctx.out.as_json:
        ctx.out.json(_diff_json(found))
    else:
        ctx.out.lines(_diff_lines(found))
    return EXIT_OK


def _diff_lines(d: StateDiff) -> Iterator[str]:
    yield f"left    {d.left}"
    yield f"right   {d.right}   ({_kind(d.kind)}s)"
    yield f"common ancestor  {d.ancestor or 'none stored'}"
    if d.same_content:
        yield "same content (equal digests)"
    for chain in d.chains:
        yield ""
        yield from _chain_lines(chain)
    if d.changes:
        yield ""
        yield "changed:"
        for c in d.changes:
            yield f"  {c.field}: {_value(c.left)} -> {_value(c.right)}"


def _chain_lines(c: ChainDiff) -> Iterator[str]:
    if c.same:
        yield f"{c.ref}: the same on both sides ({c.base_length} elements)"
        return
    if c.left_head is None or c.right_head is None:
        side = "left" if c.right_head is None else "right"
        yield f"{c.ref}: only the {side} side has it"
        return
    if c.base is None:
        yield f"{c.ref}: no common history"
    else:
        yield f"{c.ref}: common history of {c.base_length} (up to {c.base.hex()[:16]})"
    for side, added in (("left", c.left), ("right", c.right)):
        yield f"  {side} adds {len(added)}" + (":" if added else "")
        yield from (f"    {element_line(e, 96)}" for e in added)


def _value(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str):
        return clip(json.dumps(value, ensure_ascii=False), 72)
    try:
        return clip(json.dumps(jsonable(value), ensure_ascii=False, sort_keys=True), 72)
    except TypeError:
        return clip(repr(value), 72)


def _diff_json(d: StateDiff) -> dict[str, Any]:
    def elements(added: tuple[Asset, ...]) -> list[Any]:
        return [element_json(e) for e in added]

    return {"left": str(d.left), "right": str(d.right), "kind": _kind(d.kind),
            "ancestor": None if d.ancestor is None else str(d.ancestor),
            "same_content": d.same_content,
            "chains": [{"ref": c.ref, "left_head": _hex(c.left_head),
                        "right_head": _hex(c.right_head), "base": _hex(c.base),
                        "base_length": c.base_length, "left": elements(c.left),
                        "right": elements(c.right)} for c in d.chains],
            "changes": [{"field": c.field, "left": jsonable(c.left),
                         "right": jsonable(c.right)} for c in d.changes]}


def _hex(digest: bytes | None) -> str | None:
    return None if digest is None else digest.hex()


def _kind(kind: int) -> str:
    try:
        return Kind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"kind {kind} state"


# -- replay ----------------------------------------------------------------------------------

def replay_command(ctx: Context, args: argparse.Namespace) -> int:
    """Rebuild a reply's request from the store, prove it, and with --run send it again.
    Exit status: 0 proven (and, with --run, replayed), 1 the store does not hold exactly
    what the call was given, 4 the request was never recorded (an older message)."""
    row = target(ctx, args)
    if row.kind != Kind.AGENT_STATE:
        raise CLIError(f"replay rebuilds an agent's model calls; {row.id} is not an agent "
                       "state", EXIT_UNUSABLE)
    agent = ctx.load(row.id)
    index = None if args.message is None else args.message - 1
    rebuilt = ctx.run(rebuild(ctx.store(), agent, index))
    replayed = ctx.run(replay(rebuilt)) if args.run and rebuilt.proven else None
    if ctx.out.as_json:
        ctx.out.json(_replay_json(rebuilt, replayed))
    else:
        ctx.out.lines(_replay_lines(rebuilt, replayed, args.run))
    if not rebuilt.known:
        return EXIT_UNUSABLE
    return EXIT_OK if rebuilt.proven else EXIT_FAILURE


def _replay_lines(r: Rebuilt, replayed: Replayed | None, run: bool) -> Iterator[str]:
    yield f"state    {r.state}"
    yield f"message  [{r.index + 1}] {message_line(r.message, 80)}"
    if not r.known:
        yield "request  unknown: this message was written before requests were recorded"
        return
    assert r.recorded is not None
    yield f"request  recorded {r.recorded.hex()}"
    yield f"         rebuilt  {r.digest.hex()}"
    yield ("         proven: the store holds exactly what the call was given" if r.proven
           else "         MISMATCH: the store does not hold what the call was given")
    yield f"  model          {r.request.model}"
    yield f"  system prompt  {r.request.system.hex()[:16]} ({len(r.system_prompt)} chars)"
    yield f"  messages       {len(r.sent)}"
    names = [t.get("function", {}).get("name", "?") for t in r.tools or ()]
    yield f"  tools          {len(names)} ({', '.join(names)})" if names else \
        "  tools          none"
    yield f"  parameters     {json.dumps(r.request.params, sort_keys=True)}"
    if run and not r.proven:
        yield "not replayed: only a proven request is sent again"
    if replayed is None:
        return
    yield ""
    if replayed.same:
        yield "replayed: the same answer"
        return
    yield "replayed: the answer differs"
    for change in replayed.changes:
        yield f"  {change.field}"
        yield f"    recorded  {_value(change.recorded)}"
        yield f"    replayed  {_value(change.replayed)}"


def _replay_json(r: Rebuilt, replayed: Replayed | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "state": str(r.state), "message": r.index + 1, "reply": message_json(r.message),
        "known": r.known, "proven": r.proven,
        "recorded": _hex(r.recorded), "rebuilt": r.digest.hex(),
        "request": {"model": r.request.model, "system": r.request.system.hex(),
                    "messages": [d.hex() for d in r.request.messages],
                    "tools": list(r.tools) if r.tools is not None else None,
                    "params": r.request.params}}
    if replayed is not None:
        out["replayed"] = {"same": replayed.same, "answer": message_json(replayed.answer),
                           "changes": [{"field": c.field, "recorded": jsonable(c.recorded),
                                        "replayed": jsonable(c.replayed)}
                                       for c in replayed.changes]}
    return out


def _add_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("left", metavar="A", type=parse_ref, help=f"one state: {REF_HELP}")
    p.add_argument("right", metavar="B", type=parse_ref, help="the other state")


def _add_replay(p: argparse.ArgumentParser) -> None:
    add_target(p)
    p.add_argument("--message", metavar="N", type=count(1),
                   help="the reply to replay, numbered as `show` numbers messages "
                        "(default: the newest that recorded its request)")
    p.add_argument("--run", action="store_true", help="send the request again and compare")


COMMANDS = [
    Command("diff", "where two states meet and what separates them", diff, _add_diff,
            pages=True),
    Command("replay", "rebuild a reply's request from the store and prove it", replay_command,
            _add_replay,
            description="Rebuild the request an agent's reply was given (prompt, the messages "
                        "before it, its tools, model and call config) from the store and "
                        "prove it against the digest the reply recorded; --run sends it "
                        "again and lists what changed. Exit status 0 proven, 1 the store "
                        "does not hold exactly what the call was given, 4 never recorded."),
]
