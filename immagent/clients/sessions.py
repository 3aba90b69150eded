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
from immagent.validate import MAX_NAME_BYTES, check_json_value, check_text, check_uuid

__all__ = [
    "MAIN",
    "BranchHead",
    "SessionLog",
    "SessionState",
    "check_items",
    "check_session_id",
    "decode_items",
    "turn_index",
]

#: The branch every session has; it cannot be deleted.
MAIN = "main"
_KIND = int(Kind.SESSION_STATE)
#: A writer that keeps losing the race gives up after this many attempts (each round some
#: writer commits, so only a very long queue of writers on one session gets here).
_MAX_ATTEMPTS = 1000
#: Item lists of recently seen heads kept per session (a branch's head, its parent, …).
_HISTORIES = 8


class BranchHead(msgspec.Struct, frozen=True):
    """A branch of a session state: its name, the digest of its head item node, and when
    it was made (None for ``main``, which exists from the session's first state)."""

    name: str
    head: Digest
    created_at: datetime | None = None


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

    @classmethod
    def from_row(cls, row: StateRow) -> SessionState:
        """The session state a verified row holds (IntegrityError if it is another kind)."""
        if row.kind != _KIND:
            raise IntegrityError(f"state {row.id} is not a session state (kind {row.kind})")
        try:
            body = session_body(row)
        except (msgspec.DecodeError, ValueError) as e:
            raise IntegrityError(f"session state {row.id} cannot be decoded: {e}") from e
        branches = (BranchHead(MAIN, row.refs[0]),
                    *(BranchHead(b.name, head, _from_micros(b.created))
                      for b, head in zip(body.branches, row.refs[1:], strict=True)))
        return cls(id=row.id, parent_id=row.parent_id, session_id=row.stream,
                   created_at=row.created_at, digest=row.digest, seq=row.seq,
                   branches=branches, retired=body.retired, generation=body.generation)

    def head(self, branch: str) -> Digest | None:
        """The head node digest of ``branch``, or None if this state has no such branch."""
        for b in self.branches:
            if b.name == branch:
                return b.head
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
    """

    def __init__(self, store: EventLog, session_id: str) -> None:
        """The log of ``session_id`` in ``store`` (nothing is read until used)."""
        self.store = store
        self.session_id = check_session_id("session_id", session_id)
        #: The branch reads and writes go to.
        self.branch = MAIN
        self._generation: int | None = None  # the clear generation ``branch`` belongs to
        self._newest: SessionState | None = None
        self._known = False  # whether _newest was read or written by this object
        self._histories: OrderedDict[Digest, tuple[Item, ...]] = OrderedDict()
        self._lock = asyncio.Lock()

    def resolve_branch(self, state: SessionState | None) -> str:
        """The branch to use on ``state``: ours, unless the session was cleared since we
        chose it (then ``main``, whose history the clear reset)."""
        generation = 0 if state is None else state.generation
        if self._generation is not None and generation != self._generation:
            self.branch = MAIN
        self._generation = generation
        return self.branch

    # -- reads --------------------------------------------------------------------------

    async def newest(self) -> SessionState | None:
        """The session's current state (its stream's newest), None if it has none."""
        rows = await self.store.stream_states(_KIND, self.session_id, limit=1)
        self._newest = SessionState.from_row(rows[0]) if rows else None
        self._known = True
        return self._newest

    async def items(self, branch: str | None = None) -> tuple[Item, ...]:
        """The items of ``branch`` (default: this cursor's) in the newest state."""
        state = await self.newest()
        name = self.resolve_branch(state) if branch is None else branch
        return await self.history(_branch_head(state or _empty(self.session_id), name))

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
        node = await self._node(head)
        while node.length > keep:
            if node.parent is None:
                raise IntegrityError(f"item chain {head.hex()} ends before its counters say")
            node = await self._node(node.parent)
        if node.length == keep:
            return node.digest, []
        cut = node.extend(items[node.length:keep])
        self._remember(cut.digest, items[:keep])
        return cut.digest, [cut, *([EMPTY_ITEMS] if node is EMPTY_ITEMS else [])]

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
                row = _row(self.session_id, base.id if base else None, plan)
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

    async def _unchanged(self, seen: SessionState | None) -> bool:
        """True if the session's newest state is still ``seen`` (one index probe)."""
        newest = await self.newest()
        return (newest.id if newest else None) == (seen.id if seen else None)

    async def append(self, items: Sequence[Item]) -> SessionState | None:
        """Add ``items`` (checked by ``check_items``) to the end of the current branch in a
        new state; no state for an empty list."""
        added = tuple(items)

        async def change(base: SessionState | None) -> _Plan | None:
            if not added:
                return None
            state = base or _empty(self.session_id)
            branch = self.resolve_branch(base)
            head = _branch_head(state, branch)
            parent = await self._node(head)
            node = parent.extend(added)
            before = self._histories.get(head) if head != EMPTY_ITEMS.digest else ()
            if before is not None:
                self._remember(node.digest, (*before, *added))
            assets: list[Asset] = [*added, node]
            if parent is EMPTY_ITEMS:
                assets.append(EMPTY_ITEMS)
            return _replace_head(state, branch, node.digest, assets)

        return await self._commit(change)

    async def pop(self) -> tuple[Item | None, SessionState | None]:
        """Remove the last item of the current branch in a new state: (the item, the
        state); (None, the unchanged state) when the branch is empty."""
        popped: list[Item] = []

        async def change(base: SessionState | None) -> _Plan | None:
            popped.clear()
            branch = self.resolve_branch(base)
            if base is None:
                return None
            head = _branch_head(base, branch)
            items = await self.history(head)
            if not items:
                return None
            popped.append(items[-1])
            new_head, assets = await self._cut(head, items, len(items) - 1)
            return _replace_head(base, branch, new_head, assets)

        state = await self._commit(change)
        return (popped[0] if popped else None), state

    async def clear(self) -> SessionState | None:
        """A new, empty state: ``main`` empty, every other branch retired, the generation
        advanced. Nothing to write when the session is already empty."""

        async def change(base: SessionState | None) -> _Plan | None:
            if base is None or (len(base.branches) == 1
                                and base.branches[0].head == EMPTY_ITEMS.digest):
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
        self.branch = name
        self._generation = 0 if state is None else state.generation
        return state

    async def create_branch(self, name: str | None, turn: int) -> SessionState:
        """A new state with branch ``name`` (None: a fresh ``branch_from_turn_…`` name)
        holding the current branch's items before turn ``turn``, and switch to it.
        ValidationError if that turn has no user item or the name was used in this
        session before (names are never reused, even after a delete or a clear)."""
        turn = _check_turn(turn, "turn_number")
        if name is not None:
            name = check_text("branch_name", name, max_bytes=MAX_NAME_BYTES)
        made: list[str] = []

        async def change(base: SessionState | None) -> _Plan:
            made.clear()
            state = base or _empty(self.session_id)
            source = self.resolve_branch(base)
            head = _branch_head(state, source)
            items = await self.history(head)
            index = turn_index(items, turn)
            if index is None:
                raise ValidationError("turn_number", f"turn {turn} does not contain a user "
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
        self.branch, self._generation = made[0], state.generation
        return state

    async def delete_branch(self, name: str, *, force: bool = False) -> SessionState:
        """A new state without branch ``name`` (retired: never reused). ValidationError for
        ``main``, for a branch the newest state does not have, and for this cursor's own
        branch unless ``force`` (then the cursor moves to ``main``)."""
        name = check_text("branch_id", name, max_bytes=MAX_NAME_BYTES)
        if name == MAIN:
            raise ValidationError("branch_id", "cannot delete the 'main' branch", name)
        if name == self.branch and not force:
            raise ValidationError("branch_id", f"cannot delete the current branch {name!r}; "
                                  "use force=True or switch branches first", name)

        async def change(base: SessionState | None) -> _Plan:
            if base is None or base.head(name) is None:
                raise ValidationError("branch_id", f"branch {name!r} does not exist", name)
            kept = tuple(b for b in base.branches if b.name != name)
            return _Plan([], kept, (*base.retired, name), base.generation)

        state = await self._commit(change)
        assert state is not None
        if self.branch == name:
            self.branch = MAIN
        return state

    async def fork(self, new_session_id: str, at_turn: int | None = None) -> SessionState:
        """The first state of session ``new_session_id``: the current branch of this
        session's newest state (the items before turn ``at_turn``, or all) as its ``main``,
        parent = that state. Shares every item and link; writes one state row and at most
        one link. ValidationError if ``new_session_id`` already has states."""
        target = check_session_id("new_session_id", new_session_id)
        if at_turn is not None:
            at_turn = _check_turn(at_turn, "at_turn")
        base = await self.newest()
        state = base or _empty(self.session_id)
        branch = self.resolve_branch(base)
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
                   _Plan(assets, (BranchHead(MAIN, head),), (), 0))
        try:
            await self.store.commit(assets, [row], heads=[Head(_KIND, target, None)])
        except StaleStreamError:
            raise ValidationError("new_session_id", f"session {target!r} already exists; "
                                  "fork into a new session id", target) from None
        return SessionState.from_row(row)


def _empty(session_id: str) -> SessionState:
    """The state a session without any stored state behaves as (never stored as such)."""
    return SessionState(id=UUID(int=0), parent_id=None, session_id=session_id,
                        created_at=datetime.now(UTC), digest=b"", seq=0,
                        branches=(BranchHead(MAIN, EMPTY_ITEMS.digest),))


def _branch_head(state: SessionState, branch: str) -> Digest:
    head = state.head(branch)
    if head is None:
        raise ValidationError("branch_id", f"branch {branch!r} does not exist in session "
                              f"{state.session_id!r}", branch)
    return head


def _replace_head(state: SessionState, branch: str, head: Digest,
                  assets: list[Asset]) -> _Plan:
    branches = tuple(b if b.name != branch else BranchHead(b.name, head, b.created_at)
                     for b in state.branches)
    return _Plan(assets, branches, state.retired, state.generation)


def _fresh_name(state: SessionState, turn: int) -> str:
    base = f"branch_from_turn_{turn}_{int(time.time())}"
    name, suffix = base, 1
    while state.used(name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _row(session_id: str, parent_id: UUID | None, plan: _Plan) -> StateRow:
    """The state row of a planned state (its digest by the generic stream rule)."""
    now = datetime.now(UTC)
    body = msgspec.msgpack.encode(SessionBody(
        branches=tuple(SessionBranch(b.name, _micros(b.created_at or now))
                       for b in plan.branches[1:]),
        retired=plan.retired, generation=plan.generation))
    refs = tuple(b.head for b in plan.branches)
    return StateRow(id=uuid7(), parent_id=parent_id, kind=_KIND, stream=session_id,
                    refs=refs, body=body, digest=stream_digest(_KIND, session_id, refs, body),
                    created_at=now)
