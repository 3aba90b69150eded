"""Sessions: an ordered, branchable list of JSON items per session id, kept immutably.

The store-side half of ``immagent.integrations.openai_agents.ImmAgentSession`` (it imports
no SDK, so the store, gc and verify understand sessions without it). Data model:

* each item is an ``Item`` asset (kind ITEM, canonical msgpack of its JSON value), so an
  item held by many sessions, branches and forks is stored once;
* a branch's items are a hash chain of ``ItemNode`` links (kind ITEM_NODE), one link per
  ``add_items`` call, rooted at the shared ``EMPTY_ITEMS``;
* a *session state* is a state row of kind SESSION_STATE: stream = the session id, refs =
  the head node of every branch (``main`` first), body = ``records.SessionBody`` (the
  other branches' names and times, retired names, the clear generation), parent = the
  previous state. The current state is the stream's newest (one index probe).

Every change (add, pop, clear, branch, delete a branch) writes a new state that expects
the stream's newest state to be the one it was computed from (``Head``): a writer that
lost the race re-reads and recomputes, so concurrent writers never lose an item and the
states form one total order. Nothing is updated or deleted: past states stay loadable
with their items until the user deletes their rows, and only then can ``gc`` reclaim.

A *turn* (``create_branch`` / ``fork`` cuts) is a user message: turn ``n`` is the ``n``-th
item whose ``role`` is ``"user"``; cutting at turn ``n`` keeps the items before it, so the
new branch can ask turn ``n`` again. A cut reuses every chain link before it and writes at
most one new link.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple
from uuid import UUID

import msgspec

from immagent.assets import EMPTY_ITEMS, Asset, Digest, Item, ItemNode, Kind
from immagent.exceptions import IntegrityError, StaleStreamError, ValidationError
from immagent.ids import uuid7
from immagent.records import SessionBody, SessionBranch, StateRow, session_body, stream_digest
from immagent.store.backend import Head
from immagent.store.log import EventLog
from immagent.validate import (
    MAX_NAME_BYTES,
    check_fan_out,
    check_json_value,
    check_text,
    check_uuid,
)

__all__ = [
    "MAIN",
    "BranchHead",
    "Cursor",
    "SessionInfo",
    "SessionLog",
    "SessionState",
    "check_items",
    "check_owner",
    "check_session_id",
    "decode_items",
    "list_sessions",
    "turn_index",
    "turns",
]

#: The branch every session has; it cannot be deleted.
MAIN = "main"
_KIND = int(Kind.SESSION_STATE)
#: A writer that keeps losing the race gives up after this many attempts (each round some
#: writer commits, so only a very long queue of writers on one session gets here).
_MAX_ATTEMPTS = 1000
#: Item lists of recently seen heads kept per session (a branch's head, its parent, …).
_HISTORIES = 8


class Cursor(NamedTuple):
    """Where a ``SessionLog`` reads and writes: a branch, and the clear generation it was
    chosen in (None before the cursor has seen a state: then the branch is ``main``)."""

    branch: str
    generation: int | None


class BranchHead(msgspec.Struct, frozen=True):
    """A branch of a session state: its name, the digest of its head item node, when it
    was made (None for ``main``, which exists from the session's first state), and the
    head of its usage chain (None until usage is recorded on it)."""

    name: str
    head: Digest
    created_at: datetime | None = None
    usage: Digest | None = None


class SessionState(msgspec.Struct, frozen=True):
    """One stored state of a session. ``digest`` pins its whole content (every branch's
    items through their hash chains, the branch names); ``parent_id`` is the state it was
    made from (for a fork's first state, a state of the session it was forked from)."""

    id: UUID
    parent_id: UUID | None
    session_id: str
    created_at: datetime
    digest: Digest
    seq: int
    branches: tuple[BranchHead, ...]  # main first
    retired: tuple[str, ...] = ()
    generation: int = 0
    owner: str | None = None

    @classmethod
    def from_row(cls, row: StateRow) -> SessionState:
        """The session state a verified row holds (IntegrityError if it is another kind)."""
        if row.kind != _KIND:
            raise IntegrityError(f"state {row.id} is not a session state (kind {row.kind})")
        try:
            body = session_body(row)
        except (msgspec.DecodeError, ValueError) as e:
            raise IntegrityError(f"session state {row.id} cannot be decoded: {e}") from e
        count = 1 + len(body.branches)
        usage = dict(zip(body.usage, row.refs[count:], strict=True))
        branches = (BranchHead(MAIN, row.refs[0], None, usage.get(0)),
                    *(BranchHead(b.name, head, _from_micros(b.created), usage.get(i))
                      for i, (b, head) in enumerate(zip(body.branches, row.refs[1:count],
                                                        strict=True), start=1)))
        return cls(id=row.id, parent_id=row.parent_id, session_id=row.stream,
                   created_at=row.created_at, digest=row.digest, seq=row.seq,
                   branches=branches, retired=body.retired, generation=body.generation,
                   owner=body.owner)

    def head(self, branch: str) -> Digest | None:
        """The head node digest of ``branch``, or None if this state has no such branch."""
        found = self.branch(branch)
        return None if found is None else found.head

    def branch(self, name: str) -> BranchHead | None:
        """The branch named ``name``, or None if this state has no such branch."""
        for b in self.branches:
            if b.name == name:
                return b
        return None

    @property
    def branch_names(self) -> tuple[str, ...]:
        """Names of this state's branches, ``main`` first."""
        return tuple(b.name for b in self.branches)

    def used(self, name: str) -> bool:
        """True if ``name`` names a branch of this state or one retired before."""
        return name in self.branch_names or name in self.retired


class _Plan(NamedTuple):
    """What one change writes: its assets and the new state's content."""

    assets: list[Asset]
    branches: tuple[BranchHead, ...]
    retired: tuple[str, ...]
    generation: int


# -- pure helpers -----------------------------------------------------------------------


def check_session_id(field: str, value: object) -> str:
    """A session id: non-blank text without NUL (it is a stream name in every backend)."""
    return check_text(field, value, max_bytes=MAX_NAME_BYTES)


def check_items(items: object) -> list[Item]:
    """The assets of items to add: a list of JSON values, each checked exactly as given
    (ValidationError naming ``items[i]`` otherwise; nothing is written)."""
    if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence):
        raise ValidationError("items", f"must be a list of items, got {type(items).__name__}",
                              None)
    return [Item.of(check_json_value(f"items[{i}]", v)) for i, v in enumerate(items)]


_array_header = b"\xdd"


def decode_items(items: Sequence[Item]) -> list[Any]:
    """Fresh copies of the items' values, decoded from their stored bytes in one call, so
    a caller that edits what it got never touches a cached asset."""
    if not items:
        return []
    data = _array_header + len(items).to_bytes(4, "big") + b"".join(i.body for i in items)
    try:
        values: list[Any] = msgspec.msgpack.decode(data)
    except ValueError:  # a stored body that hashes right yet is not a value (bad UTF-8, …)
        bad = next(i for i in items if not _decodes(i))
        raise IntegrityError(f"item {bad.digest.hex()} cannot be decoded "
                             "(run store.verify())") from None
    return values


def _decodes(item: Item) -> bool:
    try:
        msgspec.msgpack.decode(item.body)
    except ValueError:
        return False
    return True


def _is_user(item: Item) -> bool:
    value = item.value
    return isinstance(value, dict) and value.get("role") == "user"


def turn_index(items: Sequence[Item], turn: int) -> int | None:
    """Index of turn ``turn``'s user item (the ``turn``-th item with role "user", from 1)."""
    seen = 0
    for i, item in enumerate(items):
        if _is_user(item):
            seen += 1
            if seen == turn:
                return i
    return None


def user_turns(items: Sequence[Item]) -> int:
    """How many turns (user items) ``items`` hold."""
    return sum(1 for item in items if _is_user(item))


def turns(items: Sequence[Item]) -> list[tuple[int, Any]]:
    """(turn number, the user item's value) of every turn of ``items``, in order."""
    users = [item for item in items if _is_user(item)]
    return list(enumerate(decode_items(users), start=1))


def _micros(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def _check_turn(turn: object, field: str) -> int:
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 1:
        raise ValidationError(field, f"must be an int >= 1, got {turn!r}", turn)
    return turn


# -- the client -------------------------------------------------------------------------


class SessionLog:
    """A cursor on one session id in one store: the branch it works on, and caches. Use it
    from the event loop the store runs on.

    The branch pointer belongs to this object, as in the SDK's branching session: it starts
    at ``main``, and goes back to ``main`` when the session is cleared (by anyone). The
    caches hold no authority: the newest state it saw and the item lists of a few heads.
    Several objects (or processes) on one session stay correct through the head check; one
    object also serialises its own writers, so they do not race each other.

    An operation works on the branch the cursor names when it *runs*, unless it is given
    ``at`` (a ``cursor`` read when the caller asked for it, as the SDK's advanced session
    snapshots its branch at call time): then on that branch, so a ``switch`` that completes
    while the operation waits (behind an earlier write of this object, or a retry) cannot
    redirect it. A clear in between still wins: the cleared session has only ``main``.
    """

    def __init__(self, store: EventLog, session_id: str, owner: str | None = None) -> None:
        """The log of ``session_id`` in ``store`` (nothing is read until used). ``owner``:
        who the session belongs to, recorded by its first write (a session owned by
        someone else refuses this object's writes)."""
        self.store = store
        self.session_id = check_session_id("session_id", session_id)
        self.owner = None if owner is None else check_owner("owner", owner)
        # One tuple, replaced whole, so ``cursor`` reads a coherent pair from any thread.
        self._cursor = Cursor(MAIN, None)
        self._newest: SessionState | None = None
        self._known = False  # whether _newest was read or written by this object
        self._histories: OrderedDict[Digest, tuple[Item, ...]] = OrderedDict()
        self._lock = asyncio.Lock()

    @property
    def branch(self) -> str:
        """The branch reads and writes go to."""
        return self._cursor.branch

    @property
    def cursor(self) -> Cursor:
        """The cursor now (its branch and generation), to pin an operation to as ``at``."""
        return self._cursor

    def resolve_branch(self, state: SessionState | None, at: Cursor | None = None) -> str:
        """The branch to use on ``state``: ``at``'s (default: this cursor's), unless the
        session was cleared since it was chosen (then this cursor's, which the clear sent
        back to ``main``)."""
        generation = 0 if state is None else state.generation
        branch, seen = self._cursor
        self._cursor = Cursor(MAIN if seen is not None and seen != generation else branch,
                              generation)
        if at is not None and at.generation in (None, generation):
            return at.branch
        return self._cursor.branch

    # -- reads --------------------------------------------------------------------------

    async def newest(self) -> SessionState | None:
        """The session's current state (its stream's newest), None if it has none."""
        rows = await self.store.stream_states(_KIND, self.session_id, limit=1)
        self._newest = SessionState.from_row(rows[0]) if rows else None
        self._known = True
        return self._newest

    async def items(self, branch: str | None = None, *,
                    at: Cursor | None = None) -> tuple[Item, ...]:
        """The items of ``branch`` (default: this cursor's, or ``at``'s) in the newest
        state; none for a branch the newest state does not have (deleted, or never made),
        as the SDK's advanced session reads it."""
        state = await self.newest()
        name = self.resolve_branch(state, at) if branch is None else branch
        head = (state or _empty(self.session_id)).head(name)
        return () if head is None else await self.history(head)

    async def usage(self, branch: str | None = None, *,
                    at: Cursor | None = None) -> dict[int, Any]:
        """The usage recorded per turn on ``branch`` (default: this cursor's, or ``at``'s)
        in the newest state: {turn: record}, the latest record of each turn."""
        state = await self.newest()
        name = self.resolve_branch(state, at) if branch is None else branch
        found = (state or _empty(self.session_id)).branch(name)
        return {} if found is None else await self.branch_usage(found)

    async def branch_usage(self, branch: BranchHead) -> dict[int, Any]:
        """{turn: record} of one branch (the latest record of each turn)."""
        if branch.usage is None:
            return {}
        records = decode_items(await self.history(branch.usage))
        return {r["turn"]: r for r in records}

    async def oldest(self) -> SessionState | None:
        """The session's first stored state, None if it has none (one index probe)."""
        rows = await self.store.stream_states(_KIND, self.session_id, limit=1,
                                              newest_first=False)
        return SessionState.from_row(rows[0]) if rows else None

    async def states(self, *, limit: int = 100, after_seq: int | None = None,
                     newest_first: bool = True) -> list[SessionState]:
        """The session's stored states in log order, a page at a time (pass the last
        one's ``seq`` as ``after_seq``)."""
        rows = await self.store.stream_states(_KIND, self.session_id, after_seq=after_seq,
                                              limit=limit, newest_first=newest_first)
        return [SessionState.from_row(r) for r in rows]

    async def load(self, state_id: UUID | str) -> SessionState:
        """A stored session state by id (any session's); ValidationError if there is none."""
        wanted = check_uuid("state_id", state_id)
        rows = await self.store.get_states([wanted])
        if not rows or rows[0].kind != _KIND:
            raise ValidationError("state_id", f"no session state {wanted} is stored", wanted)
        return SessionState.from_row(rows[0])

    async def history(self, head: Digest) -> tuple[Item, ...]:
        """The items of the chain ending at ``head``, oldest first."""
        if head == EMPTY_ITEMS.digest:
            return ()
        cached = self._histories.get(head)
        if cached is not None:
            self._histories.move_to_end(head)
            return cached
        items = await self.store.get_chain(head, Kind.ITEM_NODE)
        if not all(isinstance(i, Item) for i in items):
            raise IntegrityError(f"chain {head.hex()} holds an element that is not an item")
        history: tuple[Item, ...] = items  # type: ignore[assignment]  # checked above
        self._remember(head, history)
        return history

    def _remember(self, head: Digest, items: tuple[Item, ...]) -> None:
        self._histories[head] = items
        self._histories.move_to_end(head)
        while len(self._histories) > _HISTORIES:
            self._histories.popitem(last=False)

    async def _node(self, digest: Digest) -> ItemNode:
        if digest == EMPTY_ITEMS.digest:
            return EMPTY_ITEMS  # never read: it may not be stored yet
        (node,) = await self.store.get_assets([digest], ItemNode, "item node")
        return node

    async def _cut(self, head: Digest, items: tuple[Item, ...], keep: int
                   ) -> tuple[Digest, list[Asset]]:
        """The head of the chain holding the first ``keep`` of ``items`` (the chain ending
        at ``head``): an existing link if one ends there, else one new link on the last
        link before the cut. Walks back link by link, cache first."""
        node, assets = await self._cut_node(head, items, keep)
        return node.digest, assets

    async def _cut_node(self, head: Digest, items: tuple[Item, ...], keep: int
                        ) -> tuple[ItemNode, list[Asset]]:
        """``_cut``, returning the link itself (new links are in the assets to write)."""
        if keep == 0:
            return EMPTY_ITEMS, [EMPTY_ITEMS]  # no walk: every chain starts there
        node = await self._node(head)
        while node.length > keep:
            if node.parent is None:
                raise IntegrityError(f"item chain {head.hex()} ends before its counters say")
            node = await self._node(node.parent)
        if node.length == keep:
            return node, []
        cut = node.extend(items[node.length:keep])
        self._remember(cut.digest, items[:keep])
        return cut, [cut, *([EMPTY_ITEMS] if node is EMPTY_ITEMS else [])]

    async def _chain(self, head: Digest, items: tuple[Item, ...], keep: int,
                     added: Sequence[Item]) -> tuple[Digest, list[Asset]]:
        """The head of a chain holding the first ``keep`` of ``items`` (the chain ending
        at ``head``) and then ``added``: the links before the cut are reused."""
        node, assets = await self._cut_node(head, items, keep)
        if not added:
            return node.digest, assets
        longer = node.extend(added)
        self._remember(longer.digest, (*items[:keep], *added))
        return longer.digest, [*assets, *added, longer]

    async def _trim_usage(self, branch: BranchHead, turns: int
                          ) -> tuple[Digest | None, list[Asset]]:
        """The usage chain of ``branch`` without the records of turns past ``turns`` (the
        turns its items still hold): the SDK's advanced session drops a turn's usage with
        the turn. Unchanged when nothing goes."""
        if branch.usage is None:
            return None, []
        records = await self.history(branch.usage)
        kept = [r.value["turn"] <= turns for r in records]
        if all(kept):
            return branch.usage, []
        if not any(kept):
            return None, []
        prefix = kept.index(False)
        rest = [r for r, k in zip(records[prefix:], kept[prefix:], strict=True) if k]
        return await self._chain(branch.usage, records, prefix, rest)

    # -- writes -------------------------------------------------------------------------

    async def _commit(self, change: Callable[[SessionState | None], Awaitable[_Plan | None]]
                      ) -> SessionState | None:
        """Apply ``change`` to the newest state and write the result, retrying from a fresh
        read while another writer got there first. ``change`` returns None for "nothing to
        write". Returns the state written (or the unchanged newest one)."""
        async with self._lock:
            # The state this object saw last, unread: a stale one costs a failed head check
            # and a retry. A change that declines or refuses is only believed on a fresh
            # read, since it writes nothing that the head check could catch.
            fresh = not self._known
            base = await self.newest() if fresh else self._newest
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    owner = self._owner_on(base)
                    plan = await change(base)
                except ValidationError:
                    if fresh or await self._unchanged(base):
                        raise
                    base, fresh = self._newest, True
                    continue
                if plan is None:
                    if fresh or await self._unchanged(base):
                        return base
                    base, fresh = self._newest, True
                    continue
                row = _row(self.session_id, base.id if base else None, plan, owner)
                try:
                    await self.store.commit(plan.assets, [row], heads=[
                        Head(_KIND, self.session_id, base.id if base else None)])
                except StaleStreamError:
                    # Jittered, growing pause: writers in other processes spread out.
                    await asyncio.sleep(random.random() * min(0.05, 0.001 * (attempt + 1)))
                    base, fresh = await self.newest(), True
                    continue
                self._newest = SessionState.from_row(row)
                return self._newest
            raise StaleStreamError(_KIND, self.session_id)

    def _owner_on(self, base: SessionState | None) -> str | None:
        """The owner a state written on ``base`` records: the session's (set by its first
        state), or this object's for a session that has none yet. ValidationError when
        this object names another owner than the session has."""
        if base is None or base.owner is None:
            return self.owner
        if self.owner is not None and self.owner != base.owner:
            raise ValidationError("owner", f"session {self.session_id!r} belongs to another "
                                  "owner", self.owner)
        return base.owner

    async def _unchanged(self, seen: SessionState | None) -> bool:
        """True if the session's newest state is still ``seen`` (one index probe)."""
        newest = await self.newest()
        return (newest.id if newest else None) == (seen.id if seen else None)

    async def append(self, items: Sequence[Item], *,
                     at: Cursor | None = None) -> SessionState | None:
        """Add ``items`` (checked by ``check_items``) to the end of the current branch (or
        ``at``'s) in a new state; no state for an empty list."""
        added = tuple(items)
        check_fan_out("items", len(added), "items", base=1)  # one link lists them all

        async def change(base: SessionState | None) -> _Plan | None:
            if not added:
                return None
            state = base or _empty(self.session_id)
            branch = self.resolve_branch(base, at)
            head = _branch_head(state, branch)
            parent = await self._node(head)
            node = parent.extend(added)
            # No copy of the history here (O(the session's length) a step): the store
            # caches the new link as a segment of its parent's run when it is written.
            assets: list[Asset] = [*added, node]
            if parent is EMPTY_ITEMS:
                assets.append(EMPTY_ITEMS)
            return _replace_head(state, branch, node.digest, assets)

        return await self._commit(change)

    async def pop(self, *, at: Cursor | None = None
                  ) -> tuple[Item | None, SessionState | None]:
        """Remove the last item of the current branch (or ``at``'s) in a new state: (the
        item, the state); (None, the unchanged state) when the branch is empty. Popping a
        turn's user item drops that turn's recorded usage too."""
        popped: list[Item] = []

        async def change(base: SessionState | None) -> _Plan | None:
            popped.clear()
            branch = self.resolve_branch(base, at)
            if base is None:
                return None
            found = base.branch(branch)
            if found is None:
                raise ValidationError("branch_id", f"branch {branch!r} does not exist in "
                                      f"session {self.session_id!r}", branch)
            items = await self.history(found.head)
            if not items:
                return None
            popped.append(items[-1])
            new_head, assets = await self._cut(found.head, items, len(items) - 1)
            usage = found.usage
            if _is_user(items[-1]):
                usage, more = await self._trim_usage(found, user_turns(items[:-1]))
                assets += more
            return _replace_head(base, branch, new_head, assets, usage=usage)

        state = await self._commit(change)
        return (popped[0] if popped else None), state

    async def replace(self, items: Sequence[Item], *, keep: int = 0,
                      expect: Digest | None = None,
                      drop_while: Callable[[Any], bool] | None = None,
                      at: Cursor | None = None) -> tuple[bool, SessionState | None]:
        """Make the current branch (or ``at``'s) hold its first ``keep`` items and then
        ``items``, in one new state (a compaction: the state before it keeps the history
        it replaced). With ``expect``, only if the branch's head is still that digest;
        with ``drop_while``, the leading kept items whose value it holds true for are left
        out too (expired ones). Recorded usage of turns past the kept items is dropped (all of
        it when leading items are). Returns (whether it was applied, the newest state)."""
        added = tuple(items)
        applied: list[bool] = []

        async def change(base: SessionState | None) -> _Plan | None:
            applied.clear()
            state = base or _empty(self.session_id)
            branch = self.resolve_branch(base, at)
            found = state.branch(branch)
            if found is None:
                raise ValidationError("branch_id", f"branch {branch!r} does not exist in "
                                      f"session {self.session_id!r}", branch)
            if expect is not None and found.head != expect:
                return None
            current = await self.history(found.head)
            if keep > len(current):
                return None
            drop = 0
            if drop_while is not None:
                while drop < keep and drop_while(decode_items([current[drop]])[0]):
                    drop += 1
            assets: list[Asset]
            more: list[Asset] = []
            if drop:  # the chain changes from its start: one new link holds the rest
                node = EMPTY_ITEMS.extend((*current[drop:keep], *added))
                head, assets = node.digest, [EMPTY_ITEMS, *added, node]
                usage: Digest | None = None
            else:
                head, assets = await self._chain(found.head, current, keep, added)
                usage, more = await self._trim_usage(found, user_turns(current[:keep]))
            applied.append(True)
            if head == found.head and usage == found.usage:
                return None  # the same items again: nothing changes
            return _replace_head(state, branch, head, [*assets, *more], usage=usage)

        state = await self._commit(change)
        return bool(applied), state

    async def add_usage(self, record: dict[str, Any], *,
                        at: Cursor | None = None) -> SessionState | None:
        """Record ``record`` (a JSON object of token counts) as the usage of the current
        branch's (or ``at``'s) latest turn, replacing an earlier record of that turn;
        nothing is written while the branch has no turn (no user item). The record gains
        ``turn``."""

        async def change(base: SessionState | None) -> _Plan | None:
            if base is None:
                return None
            branch = self.resolve_branch(base, at)
            found = base.branch(branch)
            if found is None:
                return None  # deleted elsewhere: there is no turn to record against
            turns = user_turns(await self.history(found.head))
            if turns == 0:
                return None
            item = Item.of(check_json_value("usage", {**record, "turn": turns}))
            parent = await self._node(found.usage or EMPTY_ITEMS.digest)
            node = parent.extend([item])
            before = (() if found.usage is None else self._histories.get(found.usage))
            if before is not None:
                self._remember(node.digest, (*before, item))
            assets: list[Asset] = [item, node, *([EMPTY_ITEMS] if found.usage is None else [])]
            return _replace_head(base, branch, found.head, assets, usage=node.digest)

        return await self._commit(change)

    async def clear(self) -> SessionState | None:
        """A new, empty state: ``main`` empty, every other branch retired, the generation
        advanced, no usage. Nothing to write when the session is already empty."""

        async def change(base: SessionState | None) -> _Plan | None:
            if base is None or (len(base.branches) == 1
                                and base.branches[0].head == EMPTY_ITEMS.digest
                                and base.branches[0].usage is None):
                return None
            retired = (*base.retired, *base.branch_names[1:])
            return _Plan([EMPTY_ITEMS], (BranchHead(MAIN, EMPTY_ITEMS.digest),), retired,
                         base.generation + 1)

        state = await self._commit(change)
        self.resolve_branch(state)  # the clear sends this cursor back to main too
        return state

    async def switch(self, branch: str) -> SessionState | None:
        """Make ``branch`` this cursor's branch; ValidationError if the newest state has no
        such branch."""
        name = check_text("branch_id", branch, max_bytes=MAX_NAME_BYTES)
        state = await self.newest()
        _branch_head(state or _empty(self.session_id), name)
        self._cursor = Cursor(name, 0 if state is None else state.generation)
        return state

    async def create_branch(self, name: str | None, turn: int, *,
                            at: Cursor | None = None) -> SessionState:
        """A new state with branch ``name`` (None: a fresh ``branch_from_turn_…`` name)
        holding the current branch's (or ``at``'s) items before turn ``turn``, and switch
        to it.
        ValidationError if that turn has no user item or the name was used in this
        session before (names are never reused, even after a delete or a clear). The new
        branch has no usage recorded (as in the SDK's advanced session)."""
        turn = _check_turn(turn, "turn_number")
        if name is not None:
            name = check_text("branch_name", name, max_bytes=MAX_NAME_BYTES)
        made: list[str] = []

        async def change(base: SessionState | None) -> _Plan:
            made.clear()
            state = base or _empty(self.session_id)
            source = self.resolve_branch(base, at)
            head = _branch_head(state, source)
            items = await self.history(head)
            index = turn_index(items, turn)
            if index is None:
                raise ValidationError("turn_number", f"Turn {turn} does not contain a user "
                                      f"message in branch {source!r}", turn)
            chosen = name if name is not None else _fresh_name(state, turn)
            if chosen == MAIN or state.used(chosen):
                raise ValidationError("branch_name", f"branch id {chosen!r} has already been "
                                      "used in this session; choose a new one", chosen)
            cut, assets = await self._cut(head, items, index)
            branch = BranchHead(chosen, cut, datetime.now(UTC))
            made.append(chosen)
            return _Plan(assets, (*state.branches, branch), state.retired, state.generation)

        state = await self._commit(change)
        assert state is not None  # change never declines
        self._cursor = Cursor(made[0], state.generation)
        return state

    async def delete_branch(self, name: str, *, force: bool = False) -> SessionState:
        """A new state without branch ``name`` (retired: never reused). ValidationError for
        ``main``, for a branch the newest state does not have, and for this cursor's own
        branch unless ``force`` (then the cursor moves to ``main``)."""
        if isinstance(name, str) and not name.strip():
            raise ValidationError("branch_id", "Branch ID cannot be empty", name)
        name = check_text("branch_id", name, max_bytes=MAX_NAME_BYTES)
        if name == MAIN:
            raise ValidationError("branch_id", "Cannot delete the 'main' branch", name)
        if name == self.branch and not force:
            raise ValidationError("branch_id", f"cannot delete the current branch {name!r}; "
                                  "use force=True or switch branches first", name)

        async def change(base: SessionState | None) -> _Plan:
            if base is None or base.head(name) is None:
                raise ValidationError("branch_id", f"Branch {name!r} does not exist", name)
            kept = tuple(b for b in base.branches if b.name != name)
            return _Plan([], kept, (*base.retired, name), base.generation)

        state = await self._commit(change)
        assert state is not None
        if self.branch == name:
            self._cursor = Cursor(MAIN, state.generation)
        return state

    async def fork(self, new_session_id: str, at_turn: int | None = None, *,
                   at: Cursor | None = None) -> SessionState:
        """The first state of session ``new_session_id``: the current branch (or ``at``'s)
        of this session's newest state (the items before turn ``at_turn``, or all) as its ``main``,
        parent = that state, owned by this session's owner. Shares every item and link;
        writes one state row and at most one link. ValidationError if ``new_session_id``
        already has states."""
        target = check_session_id("new_session_id", new_session_id)
        if at_turn is not None:
            at_turn = _check_turn(at_turn, "at_turn")
        base = await self.newest()
        state = base or _empty(self.session_id)
        branch = self.resolve_branch(base, at)
        head = _branch_head(state, branch)
        assets: list[Asset] = [EMPTY_ITEMS] if head == EMPTY_ITEMS.digest else []
        if at_turn is not None:
            items = await self.history(head)
            index = turn_index(items, at_turn)
            if index is None:
                raise ValidationError("at_turn", f"turn {at_turn} does not contain a user "
                                      f"message in branch {branch!r}", at_turn)
            head, assets = await self._cut(head, items, index)
        row = _row(target, base.id if base else None,
                   _Plan(assets, (BranchHead(MAIN, head),), (), 0), self._owner_on(base))
        try:
            await self.store.commit(assets, [row], heads=[Head(_KIND, target, None)])
        except StaleStreamError:
            raise ValidationError("new_session_id", f"session {target!r} already exists; "
                                  "fork into a new session id", target) from None
        return SessionState.from_row(row)


class SessionInfo(NamedTuple):
    """One session of a store, as ``list_sessions`` reports it."""

    session_id: str
    owner: str | None
    states: int
    created_at: datetime  # its first stored state's time
    updated_at: datetime  # its newest state's time
    newest: SessionState


async def list_sessions(store: EventLog, *, owner: str | None = None,
                        page: int = 1000) -> list[SessionInfo]:
    """Every session stored in ``store`` (only ``owner``'s, if given), by session id. One
    pass over the session states, ``page`` rows per read: it costs a scan of them, not an
    index probe per session."""
    if owner is not None:
        owner = check_owner("owner", owner)
    found: dict[str, list[Any]] = {}  # stream -> [count, first, newest]
    after: UUID | None = None
    while True:
        rows = await store.scan_states(_KIND, after=after, limit=page)
        for row in rows:
            entry = found.get(row.stream)
            if entry is None:
                found[row.stream] = [1, row, row]
                continue
            entry[0] += 1
            if row.seq < entry[1].seq:
                entry[1] = row
            if row.seq > entry[2].seq:
                entry[2] = row
        if len(rows) < page:
            break
        after = rows[-1].id
    out = []
    for stream in sorted(found):
        count, first, last = found[stream]
        state = SessionState.from_row(last)
        if owner is None or state.owner == owner:
            out.append(SessionInfo(stream, state.owner, count, first.created_at,
                                   last.created_at, state))
    return out


def check_owner(field: str, value: object) -> str:
    """An owner: non-blank text without NUL, at most a name's length."""
    return check_text(field, value, max_bytes=MAX_NAME_BYTES)


def _empty(session_id: str) -> SessionState:
    """The state a session without any stored state behaves as (never stored as such)."""
    return SessionState(id=UUID(int=0), parent_id=None, session_id=session_id,
                        created_at=datetime.now(UTC), digest=b"", seq=0,
                        branches=(BranchHead(MAIN, EMPTY_ITEMS.digest),))


def _branch_head(state: SessionState, branch: str) -> Digest:
    head = state.head(branch)
    if head is None:
        raise ValidationError("branch_id", f"Branch {branch!r} does not exist in session "
                              f"{state.session_id!r}", branch)
    return head


_KEEP: Any = object()


def _replace_head(state: SessionState, branch: str, head: Digest, assets: list[Asset], *,
                  usage: Digest | None = _KEEP) -> _Plan:
    """The plan of ``state`` with ``branch`` at ``head`` (and its usage chain at ``usage``,
    when given)."""
    branches = tuple(
        b if b.name != branch else BranchHead(
            b.name, head, b.created_at, b.usage if usage is _KEEP else usage)
        for b in state.branches)
    return _Plan(assets, branches, state.retired, state.generation)


def _fresh_name(state: SessionState, turn: int) -> str:
    base = f"branch_from_turn_{turn}_{int(time.time())}"
    name, suffix = base, 1
    while state.used(name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _row(session_id: str, parent_id: UUID | None, plan: _Plan,
         owner: str | None) -> StateRow:
    """The state row of a planned state (its digest by the generic stream rule)."""
    now = datetime.now(UTC)
    usage = [(i, b.usage) for i, b in enumerate(plan.branches) if b.usage is not None]
    body = msgspec.msgpack.encode(SessionBody(
        branches=tuple(SessionBranch(b.name, _micros(b.created_at or now))
                       for b in plan.branches[1:]),
        retired=plan.retired, generation=plan.generation,
        usage=tuple(i for i, _ in usage), owner=owner))
    refs = (*(b.head for b in plan.branches), *(head for _, head in usage))
    return StateRow(id=uuid7(), parent_id=parent_id, kind=_KIND, stream=session_id,
                    refs=refs, body=body, digest=stream_digest(_KIND, session_id, refs, body),
                    created_at=now)
