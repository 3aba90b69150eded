"""Retention policies and pins: which states a store keeps, as data (no I/O).

A *policy* is an ordered list of rules. Each stream (an agent's name, a LangGraph thread's
namespace, an Agents-SDK session, a pydantic-ai conversation) is governed by the first rule
that selects it: by client (``kinds``), by a glob on its name (``streams``) and, with
``idle_for``, only once its newest state is that old. A rule either **keeps** states — the
union of what its criteria keep: the newest ``keep_latest``, those younger than
``max_age``, every ``keep_every``-th — or **drops** the whole stream (``drop``, LangGraph's
TTL "delete"). Streams no rule selects are left alone, so the empty policy keeps everything.

Whatever a rule says, a run never deletes (``audit/retain.py`` applies this):

* a **pinned** state (a PIN state names it as parent: ``immagent pin``);
* a **head**: a state no other state of its kind names as parent (the newest state of a
  line, the tip of every branch: what a writer extends next), unless the stream is dropped;
* what a head needs: a LangGraph checkpoint's pending writes live and die with it
  (``followers``), so a pending interrupt (the writes of a checkpoint nothing continues
  yet) stays with its thread; a thread whose newest checkpoint uses a DeltaChannel (it
  needs its ancestors' writes) is not pruned at all.

``keep_every`` counts a state's position in its stream from its oldest state. Positions are
made stable by a *mark* per stream (a RETENTION_MARK state, written in the same transaction
as the deletions): the newest position a run has thinned and its number. What a run thinned
is final — later runs keep it all and count new states on from the mark — so applying a
policy twice deletes nothing more, and a sparse history never thins again as it ages.

A *pin* is a state of its own (kind PIN), never an update: its parent is the pinned state,
its refs are the pinned state's refs (so the content stays even if the state is deleted by
hand), its stream is the pinned state's id, its body a tag and a note. Unpinning deletes the
PIN row.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, NamedTuple
from uuid import UUID

import blake3
import msgspec

from immagent import checkpoints
from immagent.assets import Kind, encode
from immagent.exceptions import ValidationError
from immagent.ids import uuid_from_digest

__all__ = [
    "KINDS",
    "MARK_STREAM",
    "POLICY_STREAM",
    "RETAINABLE",
    "MarkBody",
    "PinBody",
    "Policy",
    "Retainable",
    "Rule",
    "decode_mark",
    "decode_pin",
    "decode_policy",
    "encode_body",
    "from_langgraph_ttl",
    "mark_id",
    "parse_duration",
]

#: The stream every stored policy is written to (its newest state is the policy in force).
POLICY_STREAM: Final = "retention"
#: The stream of every retention mark.
MARK_STREAM: Final = "retention-marks"
#: Longest duration accepted (seconds): a thousand years.
_MAX_SECONDS: Final = 1000 * 366 * 86400.0
#: Largest count a rule accepts.
_MAX_COUNT: Final = 2**31 - 1


# -- durations ------------------------------------------------------------------------------

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(field: str, value: object) -> float:
    """Seconds from a ``timedelta``, a number of seconds, or text such as ``"90s"``,
    ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"`` or ``"1d12h"`` (a bare number is seconds).
    ValidationError naming ``field`` for anything negative, not finite, or longer than a
    thousand years."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION.sub("", text) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
        else:
            raise ValidationError(field, f"is not a duration: {value!r} (use e.g. 90s, 15m, "
                                  "12h, 30d, 2w or 1d12h)", value)
    else:
        raise ValidationError(field, f"must be a duration (timedelta, seconds or text such "
                              f"as '30d'), got {type(value).__name__}", None)
    if not math.isfinite(seconds) or not 0 <= seconds <= _MAX_SECONDS:
        raise ValidationError(field, f"must be a duration from 0 to 1000 years, got "
                              f"{value!r}", None)
    return seconds


def _count(field: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_COUNT:
        raise ValidationError(field, f"must be an int from {low} to {_MAX_COUNT}, got "
                              f"{value!r}", value)
    return value


# -- which kinds a policy governs -------------------------------------------------------------


def _same(stream: str) -> str:
    return stream


def _thread_of(stream: str) -> str:
    """A checkpoint stream's thread id (a namespace follows U+001F)."""
    return stream.split("\x1f", 1)[0]


class Retainable(NamedTuple):
    """How retention treats the states of one kind (a client's line of states)."""

    #: The name rules select it by (``Rule.kinds``, ``immagent retain --kind``).
    name: str
    kind: int
    #: Kinds whose rows belong to a state of this kind (their ``parent_id``) and are
    #: deleted with it, never on their own (a checkpoint's pending writes).
    followers: tuple[int, ...] = ()
    #: The name a stream's glob is matched against (a checkpoint stream's thread id).
    name_of: Callable[[str], str] = _same
    #: Given the body of a stream's newest state: True when it needs its ancestors (a
    #: checkpoint of a DeltaChannel thread), so the stream is not pruned at all.
    needs_history: Callable[[bytes], bool] | None = None
    #: Whether ``drop`` may delete whole streams of this kind. Not for pydantic-ai
    #: conversations: a conversation's scope entry is its client's to delete (``purge``).
    droppable: bool = True


def _delta_checkpoint(body: bytes) -> bool:
    """Whether a checkpoint body's metadata shows a DeltaChannel (LangGraph's PostgreSQL
    saver refuses to prune such threads too). Metadata the serializer kept opaque cannot be
    read here: such a thread is treated as needing its history (kept whole)."""
    try:
        decoded = checkpoints.decode_checkpoint(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return True
    if decoded.metadata_typed is not None:
        return True
    metadata = decoded.metadata or {}
    return any(key in metadata for key in checkpoints.DELTA_KEYS)


#: Every kind retention governs, by kind. Kinds not listed (the store's own compression
#: state, pins, marks, scope entries, writes) are never selected by a rule.
RETAINABLE: dict[int, Retainable] = {
    int(Kind.AGENT_STATE): Retainable("agents", int(Kind.AGENT_STATE)),
    int(Kind.CHECKPOINT): Retainable("checkpoints", int(Kind.CHECKPOINT),
                                     followers=(int(Kind.CHECKPOINT_WRITES),),
                                     name_of=_thread_of, needs_history=_delta_checkpoint),
    int(Kind.SESSION_STATE): Retainable("sessions", int(Kind.SESSION_STATE)),
    int(Kind.CONVERSATION_STATE): Retainable("conversations", int(Kind.CONVERSATION_STATE),
                                             droppable=False),
}
#: Rule kind names, and the aliases the command line accepts.
KINDS: dict[str, int] = {r.name: k for k, r in RETAINABLE.items()} | {
    "threads": int(Kind.CHECKPOINT)}


# -- rules and policies -----------------------------------------------------------------------


class Rule(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
           rename={"kinds": "k", "streams": "s", "idle_for": "i", "keep_latest": "n",
                   "max_age": "a", "keep_every": "e", "drop": "d"}):
    """One rule of a policy: what it selects, then what it keeps (or ``drop``). Durations
    are seconds (``Rule.of`` takes text and timedeltas too)."""

    #: Client names (``KINDS``); empty: every kind retention governs.
    kinds: tuple[str, ...] = ()
    #: A glob (``*``, ``?``, ``[...]``) on the stream's name; None: every stream.
    streams: str | None = None
    #: Only streams whose newest state is at least this old (seconds).
    idle_for: float | None = None
    #: Keep the newest N states of each stream (a head is kept whatever N says).
    keep_latest: int | None = None
    #: Keep states younger than this (seconds).
    max_age: float | None = None
    #: Keep every K-th state of each stream (positions counted from its oldest state).
    keep_every: int | None = None
    #: Delete the whole stream, heads included (pinned states stay): needs ``idle_for``.
    drop: bool = False

    @classmethod
    def of(cls, *, kinds: Sequence[str] | str = (), streams: str | None = None,
           idle_for: object = None, keep_latest: int | None = None,
           max_age: object = None, keep_every: int | None = None,
           drop: bool = False) -> Rule:
        """A checked rule; durations as ``parse_duration`` takes them. ValidationError
        naming the field for anything else."""
        if isinstance(kinds, str):
            kinds = (kinds,)
        rule = cls(kinds=tuple(kinds), streams=streams,
                   idle_for=None if idle_for is None else parse_duration("idle_for", idle_for),
                   keep_latest=keep_latest,
                   max_age=None if max_age is None else parse_duration("max_age", max_age),
                   keep_every=keep_every, drop=drop)
        return rule.checked()

    def checked(self, field: str = "rule") -> Rule:
        """This rule after checking every field (also run on a stored or decoded one)."""
        if not isinstance(self.kinds, tuple):
            raise ValidationError(f"{field}.kinds", "must be a tuple of kind names", None)
        for name in self.kinds:
            if name not in KINDS:
                raise ValidationError(f"{field}.kinds", f"unknown kind {name!r} (one of "
                                      f"{', '.join(sorted(KINDS))})", name)
        if self.streams is not None and (not isinstance(self.streams, str)
                                         or not self.streams or "\x00" in self.streams):
            raise ValidationError(f"{field}.streams", "must be a non-empty glob without NUL",
                                  self.streams)
        for name in ("idle_for", "max_age"):
            value = getattr(self, name)
            if value is not None:
                parse_duration(f"{field}.{name}", value)
        if self.keep_latest is not None:
            _count(f"{field}.keep_latest", self.keep_latest, 1)
        if self.keep_every is not None:
            _count(f"{field}.keep_every", self.keep_every, 1)
        if not isinstance(self.drop, bool):
            raise ValidationError(f"{field}.drop", "must be a bool", self.drop)
        keeps = (self.keep_latest, self.max_age, self.keep_every)
        if self.drop:
            if any(k is not None for k in keeps):
                raise ValidationError(f"{field}.drop", "a rule that drops whole streams keeps "
                                      "nothing: no keep_latest, max_age or keep_every", True)
            if self.idle_for is None:
                raise ValidationError(f"{field}.idle_for", "a rule that drops whole streams "
                                      "needs idle_for (0 drops every selected stream now)",
                                      None)
            for name in self.kinds:
                if not RETAINABLE[KINDS[name]].droppable:
                    raise ValidationError(f"{field}.kinds", f"{name} cannot be dropped by a "
                                          "policy (their client deletes them: purge)", name)
        elif all(k is None for k in keeps):
            raise ValidationError(field, "a rule keeps something (keep_latest, max_age, "
                                  "keep_every) or drops whole streams (drop with idle_for)",
                                  None)
        return self

    def selects(self, kind: int, name: str, idle: float) -> bool:
        """Whether this rule governs the stream ``name`` of ``kind`` whose newest state is
        ``idle`` seconds old."""
        if self.kinds and kind not in {KINDS[k] for k in self.kinds}:
            return False
        if self.streams is not None and not fnmatch.fnmatchcase(name, self.streams):
            return False
        return self.idle_for is None or idle >= self.idle_for

    def describe(self) -> str:
        """One line, as the command line shows it."""
        what = ", ".join(self.kinds) if self.kinds else "every kind"
        if self.streams is not None:
            what += f" named {self.streams}"
        if self.idle_for is not None:
            what += f" idle for {_seconds(self.idle_for)}"
        if self.drop:
            return f"{what}: drop the whole stream"
        keeps = []
        if self.keep_latest is not None:
            keeps.append(f"the newest {self.keep_latest}")
        if self.max_age is not None:
            keeps.append(f"those younger than {_seconds(self.max_age)}")
        if self.keep_every is not None:
            keeps.append(f"every {self.keep_every}th")
        return f"{what}: keep {' + '.join(keeps)} (and every head and pinned state)"


def _seconds(value: float) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"rules": "r"}):
    """An ordered list of rules: each stream is governed by the first rule that selects it;
    streams no rule selects are kept whole."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def of(cls, *rules: Rule) -> Policy:
        """A checked policy of ``rules``."""
        return cls(rules=tuple(rules)).checked()

    def checked(self) -> Policy:
        """This policy after checking every rule."""
        if not isinstance(self.rules, tuple):
            raise ValidationError("policy.rules", "must be a tuple of Rule", None)
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, Rule):
                raise ValidationError(f"policy.rules[{i}]", "must be a Rule", None)
            rule.checked(f"policy.rules[{i}]")
        return self

    def kinds(self) -> list[int]:
        """The kinds some rule may select, in kind order."""
        wanted: set[int] = set()
        for rule in self.rules:
            wanted.update({KINDS[k] for k in rule.kinds} if rule.kinds else RETAINABLE)
        return sorted(wanted)

    def rule_for(self, kind: int, name: str, idle: float) -> Rule | None:
        """The rule governing a stream (see ``Rule.selects``), or None: keep it whole."""
        return next((r for r in self.rules if r.selects(kind, name, idle)), None)

    def describe(self) -> list[str]:
        """One line per rule, in order."""
        if not self.rules:
            return ["no rules: every state is kept"]
        return [f"{i + 1}. {r.describe()}" for i, r in enumerate(self.rules)]


_policy = msgspec.msgpack.Decoder(Policy)


def decode_policy(body: bytes) -> Policy:
    """The policy a stored body holds (ValueError or msgspec errors if malformed; every
    rule is checked, so a stored policy obeys the rules the API enforces)."""
    try:
        return _policy.decode(body).checked()
    except ValidationError as e:
        raise ValueError(f"a stored policy breaks a rule: {e}") from None


def from_langgraph_ttl(config: Mapping[str, Any]) -> tuple[Policy, float | None]:
    """The policy LangGraph's platform-style checkpointer TTL settings describe, and the
    sweep interval in seconds (None when not given), for ``retain.run_periodically``.

    ``{"strategy": "delete", "default_ttl": minutes}``: threads idle that long are dropped
    (pinned checkpoints stay). ``{"strategy": "keep_latest", "default_ttl": minutes}``:
    threads idle that long keep only their newest checkpoint per namespace (and every head
    and pending interrupt). ``"sweep_interval_minutes"``: how often to apply it. Without a
    ``default_ttl`` nothing expires (the platform's default too)."""
    if not isinstance(config, Mapping):
        raise ValidationError("config", "must be a mapping of LangGraph's TTL settings", None)
    unknown = set(config) - {"strategy", "default_ttl", "sweep_interval_minutes"}
    if unknown:
        raise ValidationError("config", f"unknown TTL setting {sorted(unknown)[0]!r}", None)
    strategy = config.get("strategy", "delete")
    if strategy not in ("delete", "keep_latest"):
        raise ValidationError("config.strategy", f"must be 'delete' or 'keep_latest', got "
                              f"{strategy!r}", strategy)
    interval = config.get("sweep_interval_minutes")
    sweep = None if interval is None else parse_duration(
        "config.sweep_interval_minutes", _minutes("config.sweep_interval_minutes", interval))
    ttl = config.get("default_ttl")
    if ttl is None:
        return Policy(), sweep
    idle = parse_duration("config.default_ttl", _minutes("config.default_ttl", ttl))
    if strategy == "delete":
        rule = Rule.of(kinds="checkpoints", idle_for=idle, drop=True)
    else:
        rule = Rule.of(kinds="checkpoints", idle_for=idle, keep_latest=1)
    return Policy.of(rule), sweep


def _minutes(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, f"must be a number of minutes, got {value!r}", value)
    return float(value) * 60


# -- stored forms: pins and marks ------------------------------------------------------------


class PinBody(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
              rename={"kind": "k", "ref_kinds": "r", "tag": "t", "note": "n"}):
    """The body of a PIN state: the pinned state's kind, the asset kind of each of its refs
    (the pin repeats them, so the content stays), an optional tag and note."""

    kind: int
    ref_kinds: tuple[int, ...] = ()
    tag: str | None = None
    note: str | None = None


class MarkBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """The body of a RETENTION_MARK state: in stream ``stream`` of ``kind``, every state up
    to log position ``seq`` has been thinned, the one at ``seq`` being the stream's
    ``ordinal``-th state counted from its oldest. Log positions belong to one store: marks
    are bookkeeping, never exported."""

    kind: int
    stream: str
    seq: int
    ordinal: int


_pin = msgspec.msgpack.Decoder(PinBody)
_mark = msgspec.msgpack.Decoder(MarkBody)


def decode_pin(body: bytes) -> PinBody:
    """The body of a PIN state (msgspec errors if malformed)."""
    return _pin.decode(body)


def decode_mark(body: bytes) -> MarkBody:
    """The body of a RETENTION_MARK state (msgspec errors or ValueError if malformed)."""
    mark = _mark.decode(body)
    if mark.seq < 0 or mark.ordinal < 0:
        raise ValueError("a retention mark's position and ordinal are >= 0")
    return mark


def mark_id(kind: int, stream: str) -> UUID:
    """The id of the retention mark of ``stream`` of ``kind``: derived, so it is found and
    replaced without a lookup."""
    digest = blake3.blake3(b"immagent retention mark\x00" + bytes((kind,))
                           + stream.encode("utf-8", "surrogatepass")).digest()
    return uuid_from_digest(digest)


def encode_body(body: msgspec.Struct) -> bytes:
    """The canonical bytes of a stored body (a policy, a pin, a mark)."""
    return encode(body)
