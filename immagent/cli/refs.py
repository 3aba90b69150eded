"""References to states, the one place a command turns what a person typed into a state.

A reference is any of:

* an id, or a unique prefix of one (at least 4 hex digits, dashes optional), as git takes
  a commit: ``01a2516c``, ``01a2516c-bfd5``;
* ``agent:NAME``: the newest state of the agent called NAME (what ``chat --name`` goes on);
* ``thread:ID``: the newest checkpoint of a LangGraph thread (its root namespace);
* ``session:ID``: the newest state of an OpenAI Agents SDK session;
* ``conversation:ID``: the newest state of a pydantic-ai conversation;
* a bare name: an agent name, thread id or session id, when exactly one of them (or one
  id prefix) matches.

An ambiguous reference is refused with every candidate named in a form that is not. A
prefix is found by an index range scan on the states' primary key (``EventLog.scan_states``
from the prefix's lowest id), never by scanning the store; a name by one index probe per
client (``EventLog.stream_states``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import NamedTuple
from uuid import UUID

from immagent.assets import Kind
from immagent.cli.errors import EXIT_USAGE, CLIError
from immagent.records import StateRow
from immagent.store import EventLog

__all__ = ["CLIENT_PREFIXES", "MIN_PREFIX", "REF_HELP", "Ref", "Resolved", "abbreviate",
           "add_ref", "describe", "parse_ref", "ref_of", "resolve"]

#: Fewest hex digits taken as an id prefix (git's minimum).
MIN_PREFIX = 4
#: Fewest hex digits an abbreviated id is shown with.
MIN_SHOWN = 8
#: What the reference forms are, for help texts.
REF_HELP = ("a state id or a unique prefix of one, agent:NAME, thread:ID, session:ID, "
            "conversation:ID, or a name that is exactly one of those")
#: The state kind each explicit prefix names.
CLIENT_PREFIXES: dict[str, int] = {"agent": int(Kind.AGENT_STATE),
                                   "thread": int(Kind.CHECKPOINT),
                                   "session": int(Kind.SESSION_STATE),
                                   "conversation": int(Kind.CONVERSATION_STATE)}
_HEX = re.compile(r"[0-9a-f]+")
#: Candidates named in an ambiguity error, at most.
_SHOWN_CANDIDATES = 6


class Ref(NamedTuple):
    """A parsed reference: ``client`` is "agent", "thread", "session" or "" (any)."""

    client: str
    text: str

    def __str__(self) -> str:
        return f"{self.client}:{self.text}" if self.client else self.text


def parse_ref(value: str) -> Ref:
    """argparse type: a reference's syntax (what it names is found later, in the store)."""
    client, sep, rest = value.partition(":")
    if sep and client in CLIENT_PREFIXES:
        if not rest:
            raise argparse.ArgumentTypeError(f"{client}: needs a name after the colon, as "
                                             f"in {client}:NAME")
        return Ref(client, rest)
    if not value.strip() or "\x00" in value:
        raise argparse.ArgumentTypeError(f"not a reference: {value!r} ({REF_HELP})")
    return Ref("", value)


def add_ref(parser: argparse.ArgumentParser, *, optional: bool = False,
            help: str | None = None) -> None:
    """The REF argument every command that names a state takes."""
    parser.add_argument("ref", metavar="REF", type=parse_ref, nargs="?" if optional else None,
                        help=help or REF_HELP)


def ref_of(row: StateRow) -> str:
    """The reference naming the conversation ``row`` belongs to (agent:NAME, thread:ID,
    session:ID; its newest state, which need not be ``row``), or ``row``'s full id for a
    state of no conversation."""
    if row.kind == Kind.AGENT_STATE:
        return f"agent:{row.stream}"
    if row.kind in (Kind.CHECKPOINT, Kind.CHECKPOINT_WRITES):
        return f"thread:{row.stream.split(chr(0x1F))[0]}"
    if row.kind == Kind.SESSION_STATE:
        return f"session:{row.stream}"
    if row.kind == Kind.CONVERSATION_STATE:
        return f"conversation:{row.stream}"
    return str(row.id)


class Resolved(NamedTuple):
    """What a reference named: a state, and whether it was named by its conversation
    (agent:NAME, thread:ID, session:ID or such a bare name: ``row`` is its newest state)
    rather than by its id."""

    row: StateRow
    by_name: bool


class _Candidate(NamedTuple):
    row: StateRow
    named_as: str  # how to name it unambiguously
    by_name: bool


async def resolve(store: EventLog, ref: Ref) -> Resolved:
    """The state ``ref`` names (CLIError when none or several do)."""
    if ref.client:
        row = await _newest(store, CLIENT_PREFIXES[ref.client], ref.text)
        if row is None:
            raise CLIError(f"no {_noun(ref.client)} {ref.text!r} in this store")
        return Resolved(row, True)
    candidates: list[_Candidate] = []
    for client, kind in CLIENT_PREFIXES.items():
        row = await _newest(store, kind, ref.text)
        if row is not None:
            candidates.append(_Candidate(row, f"{client}:{ref.text}", True))
    digits = ref.text.lower().replace("-", "")
    crowded = False  # more ids share the prefix than were read
    if len(digits) >= MIN_PREFIX and len(digits) <= 32 and _HEX.fullmatch(digits):
        known = {c.row.id for c in candidates}
        found, crowded = await _by_prefix(store, digits)
        candidates += [_Candidate(r, str(r.id), False) for r in found if r.id not in known]
    if len(candidates) == 1:
        return Resolved(candidates[0].row, candidates[0].by_name)
    if not candidates:
        if len(digits) == 32 and _HEX.fullmatch(digits):
            raise CLIError(f"state {UUID(digits)} not found")
        hint = ("" if _HEX.fullmatch(digits) and len(digits) >= MIN_PREFIX else
                f" (a reference is {REF_HELP})")
        raise CLIError(f"no state matches {ref.text!r}: not found{hint}")
    ids = [c.row.id for c in candidates]
    shown = ", ".join(c.named_as if c.by_name else f"{_distinct(c.row.id, ids)} ({describe(c.row)})"
                      for c in candidates[:_SHOWN_CANDIDATES])
    more = " and more" if crowded or len(candidates) > _SHOWN_CANDIDATES else ""
    raise CLIError(f"{ref.text!r} is ambiguous: it matches {shown}{more}; name one of "
                   "them in full", code=EXIT_USAGE)


def _noun(client: str) -> str:
    return {"agent": "agent named", "thread": "thread", "session": "session",
            "conversation": "conversation"}[client]


def describe(row: StateRow) -> str:
    """Whose state ``row`` is, in a few words: ``agent 'assistant'``, ``thread 't-1'``."""
    names = {Kind.AGENT_STATE: "agent", Kind.CHECKPOINT: "thread",
             Kind.CHECKPOINT_WRITES: "writes of thread", Kind.SESSION_STATE: "session",
             Kind.CONVERSATION_STATE: "conversation",
             Kind.CONVERSATION_SCOPE: "conversation scope"}
    if row.kind == Kind.COMPRESSION:
        return "the store's compression state"
    try:
        what = names.get(Kind(row.kind), f"kind {row.kind}")
    except ValueError:
        what = f"kind {row.kind}"
    return f"{what} {row.stream.split(chr(0x1F))[0]!r}"


def _distinct(state_id: UUID, others: Sequence[UUID]) -> str:
    """``state_id`` cut where it differs from every id in ``others``."""
    digits = max([MIN_SHOWN, *(_common_digits(state_id, o) + 1 for o in others
                               if o != state_id)])
    return _prefix_text(state_id, digits)


async def _newest(store: EventLog, kind: int, stream: str) -> StateRow | None:
    if "\x00" in stream:
        return None
    page = await store.stream_states(kind, stream, limit=1)
    return page[0] if page else None


def _bounds(digits: str) -> tuple[int, int]:
    """The lowest and highest 128-bit id starting with these hex digits."""
    free = 4 * (32 - len(digits))
    low = int(digits, 16) << free
    return low, low | ((1 << free) - 1)


async def _by_prefix(store: EventLog, digits: str,
                     limit: int = _SHOWN_CANDIDATES) -> tuple[list[StateRow], bool]:
    """States whose id starts with ``digits`` (at most ``limit``), and whether there are
    more: a keyset range scan from the lowest such id in primary-key order, reading at
    most ``limit + 1`` rows."""
    low, high = _bounds(digits)
    after = None if low == 0 else UUID(int=low - 1)
    rows = [r for r in await store.scan_states(None, after=after, limit=limit + 1)
            if r.id.int <= high]
    return rows[:limit], len(rows) > limit


async def abbreviate(store: EventLog, ids: Sequence[UUID]) -> dict[UUID, str]:
    """The shortest prefix of each id's text (at least MIN_SHOWN hex digits) that no other
    stored state's id shares, as git abbreviates commits: two probes per id, its
    neighbours in id order."""
    shown: dict[UUID, str] = {}
    for state_id in dict.fromkeys(ids):
        after = await store.scan_states(None, after=state_id, limit=1)
        before = await store.scan_states(None, after=state_id, limit=1, newest_first=True)
        digits = MIN_SHOWN
        for other in (*after, *before):
            digits = max(digits, _common_digits(state_id, other.id) + 1)
        shown[state_id] = _prefix_text(state_id, digits)
    return shown


def _common_digits(a: UUID, b: UUID) -> int:
    x, y = a.hex, b.hex
    n = 0
    while n < 32 and x[n] == y[n]:
        n += 1
    return n


def _prefix_text(state_id: UUID, digits: int) -> str:
    """The canonical text of ``state_id`` cut after ``digits`` hex digits."""
    text = str(state_id)
    seen = 0
    for i, char in enumerate(text):
        if char != "-":
            seen += 1
            if seen == digits:
                return text[: i + 1]
    return text
