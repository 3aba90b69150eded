"""An OpenAI Agents SDK ``Session`` kept in immagent's store: durable, branchable, verifiable.

``ImmAgentSession`` implements the SDK's ``Session`` protocol (``get_items``, ``add_items``,
``pop_item``, ``clear_session``) and the branching methods of the SDK's
``AdvancedSQLiteSession`` (``create_branch_from_turn``, ``switch_to_branch``,
``list_branches``, ``delete_branch``), plus ``fork``. Use it wherever the SDK takes a
session: ``Runner.run(agent, "hi", session=ImmAgentSession("user-42", "chat.db"))``.

What differs from the SDK's own sessions: nothing is destroyed. Every change is a new
immutable *session state* (``immagent.clients.sessions``): ``add_items`` appends, ``pop_item`` and
``clear_session`` write a state without the item(s), and every earlier state stays
listable (``list_states``) and loadable (``get_state_items``) until its row is deleted with
``Store.delete_states``; only then can ``Store.gc()`` reclaim its items. Items are content-
addressed assets, so branches and forks share them and their chain links instead of copying
rows; a state's ``digest`` pins its whole content, ``Store.verify()`` checks sessions like
everything else, and ``export`` writes an audit bundle of the session's lineage.

Items come back equal (``==``) to what was added, as JSON would carry them: object keys in
sorted order, tuples as lists, ints and floats kept apart. Values JSON cannot carry (sets,
bytes, objects, NaN, infinities, non-str keys, ints beyond 64 bits, lone surrogates, cycles)
are a ValidationError naming ``items[i]``, and nothing is written.

Event loops. A ``Store`` is bound to the event loop it was opened on (its pools and locks
are), while the SDK runs a session from wherever it is used: ``Runner.run_sync`` runs its
own loop, and one session may be used from several threads at once. So every operation
runs on the store's loop and other loops hand their calls to it:

* ``db`` a DSN (``sqlite:///path.db``, a bare ``*.db`` path, ``postgresql://…``,
  ``memory://``): the session owns a store on a private loop in a daemon thread, opened
  (and its schema created) on first use, closed by ``close()``. Forks share it.
* ``db`` an open ``Store`` (or any ``EventLog``): shared, never closed by the session. Its
  loop is the one running when the session is made (or else the loop of its first call);
  calls from other loops are sent to it, so that loop must keep running meanwhile.

A cancelled ``add_items``/``pop_item``/``clear_session``/branch call waits until its write
has committed or failed before it re-raises the cancellation, as the SDK's sessions do: a
cancelled caller never leaves a write in flight behind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import weakref
from collections.abc import Awaitable, Callable, Generator
from datetime import datetime
from typing import Any, TypeVar, cast
from uuid import UUID

from immagent.exceptions import ExtraNotInstalledError

try:
    from agents.items import TResponseInputItem
    from agents.memory import session as _sdk_session
    from agents.memory.session import SessionABC
    from agents.memory.session_settings import (
        SessionSettings,
        coerce_session_settings,
        resolve_session_limit,
    )
except ImportError as e:  # the extra is not installed
    raise ExtraNotInstalledError("immagent.integrations.openai_agents", "openai-agents",
                                 cause=e) from e

from immagent.assets import Item
from immagent.audit.bundle import BundleInfo
from immagent.clients.sessions import (
    MAIN,
    Cursor,
    SessionInfo,
    SessionLog,
    SessionState,
    check_items,
    check_owner,
    check_session_id,
    decode_items,
    list_sessions,
    turns,
    user_turns,
)
from immagent.exceptions import SessionClosedError, ValidationError
from immagent.store import dsn as dsns
from immagent.store.hosting import Host, OwnedHost, SharedHost
from immagent.store.log import EventLog

__all__ = ["DEFAULT_DB", "ImmAgentSession", "SessionInfo", "SessionState"]

#: Where a session lives when no database is given: a private in-memory store, gone when
#: the session (and its forks) close, as ``SQLiteSession``'s default ``:memory:`` is.
DEFAULT_DB = "memory://"
#: The SDK's compaction snapshot (a private type its compaction session asks a backend
#: for, present since 0.23); without it the compaction session replaces whole histories.
_CompactionSnapshot: Any = getattr(_sdk_session, "_CompactionSnapshot", None)

T = TypeVar("T")
#: Names this adapter in the hosts' errors; a closed session raises the SDK's kind.
_WHAT = "the session"


class _Closed:
    """What ``close()`` returns: the close is done, and awaiting this is a no-op, so both
    ``session.close()`` (``SQLiteSession``) and ``await session.close()``
    (``AsyncSQLiteSession``) work."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


class ImmAgentSession(SessionABC):
    """An OpenAI Agents SDK session whose every state is kept, content-addressed, in an
    immagent store (SQLite, PostgreSQL or memory). A drop-in for ``SQLiteSession``; safe
    to use from many tasks and from several threads (each with its own event loop) at
    once."""

    session_settings: SessionSettings | None

    def __init__(self, session_id: str, db: str | os.PathLike[str] | EventLog = DEFAULT_DB, *,
                 session_settings: SessionSettings | dict[str, Any] | None = None,
                 owner: str | None = None, logger: Any = None) -> None:
        """The session ``session_id`` in ``db``: a DSN (opened on first use, closed by
        ``close()``; the default, like ``SQLiteSession``'s ``:memory:``, is a private
        in-memory store, and ``":memory:"`` means the same) or an open, initialised
        ``Store`` or ``EventLog`` (shared; not closed here). ``session_settings.limit`` bounds
        ``get_items()`` as in the SDK's sessions. ``owner``: who the session belongs to
        (recorded by its first write; ``list_sessions(owner=...)`` finds it). ``logger``
        receives what the session does (debug), compactions and deleted branches (info)
        and a failed ``store_run_usage`` (error), never an item's content; default
        ``logging.getLogger("immagent.sessions")``."""
        self.session_id = check_session_id("session_id", session_id)
        self.session_settings = (coerce_session_settings(session_settings)
                                 if session_settings is not None else SessionSettings())
        if logger is not None and not all(callable(getattr(logger, level, None))
                                          for level in ("debug", "info", "error")):
            raise ValidationError("logger", f"must be a logging.Logger (or have its debug, "
                                  f"info and error), got {type(logger).__name__}", None)
        host: Host
        if isinstance(db, EventLog):
            if db.closed:
                raise ValidationError("db", "the Store is closed", None)
            host = SharedHost(db, _WHAT, closed=SessionClosedError)
        else:
            # A bad DSN fails here, before any thread starts.
            target = dsns.parse(DEFAULT_DB if db == ":memory:" else db)
            host = OwnedHost(target.dsn, _WHAT, closed=SessionClosedError,
                             thread_name="immagent-session")
        self._bind(host, None if owner is None else check_owner("owner", owner),
                   logger or logging.getLogger("immagent.sessions"))

    def _bind(self, host: Host, owner: str | None, logger: Any) -> None:
        self._host = host
        self._owner = owner
        self._logger = logger
        self._log: SessionLog | None = None
        self._closed = False
        # A session dropped without close() still releases its host (and thread).
        self._finalizer = weakref.finalize(self, host.release)

    @classmethod
    def _sharing(cls, host: Host, session_id: str, settings: SessionSettings | None,
                 owner: str | None, logger: Any) -> ImmAgentSession:
        session = cls.__new__(cls)
        session.session_id = session_id
        session.session_settings = settings
        session._bind(host.share(), owner, logger)
        return session

    def __repr__(self) -> str:
        return f"ImmAgentSession({self.session_id!r}, branch={self.current_branch_id!r})"

    @property
    def current_branch_id(self) -> str:
        """The branch this session object reads and writes (``main`` until switched)."""
        return self._log.branch if self._log is not None else MAIN

    def _cursor(self) -> Cursor:
        """The branch a call made now works on, read at call time (as the SDK's advanced
        session snapshots its branch): an operation pinned to it keeps to that branch even
        if a ``switch_to_branch`` completes while it waits to run."""
        return self._log.cursor if self._log is not None else Cursor(MAIN, None)

    @property
    def owner(self) -> str | None:
        """The owner this object was made with (the session's own is in its states)."""
        return self._owner

    async def _run(self, work: Callable[[SessionLog], Awaitable[T]], *,
                   write: bool = False) -> T:
        self._check_open()

        async def on_store(store: EventLog) -> T:
            # Runs on the store's loop only, so the log needs no lock of its own here.
            if self._log is None:
                self._log = SessionLog(store, self.session_id, self._owner)
            return await work(self._log)

        return await self._host.run(on_store, write=write)

    def _check_open(self) -> None:
        if self._closed:  # worded as the SDK's "SQLiteSession is closed"
            raise SessionClosedError(f"{type(self).__name__} is closed (session "
                                     f"{self.session_id!r})")

    def _wrote(self, what: str, state: SessionState | None) -> None:
        if state is not None:
            self._logger.debug("session %r: %s -> state %s", self.session_id, what, state.id)

    # -- the SDK's Session protocol -------------------------------------------------------

    async def get_items(self, limit: int | None = None,
                        branch_id: str | None = None) -> list[TResponseInputItem]:
        """The items of the current branch (or ``branch_id``) oldest first; with ``limit``
        (or else ``session_settings.limit``) only the latest ``limit`` of them, still in
        order (0: none; negative: all, as in the SDK's SQLite session). A branch that
        does not exist (deleted, by this object or another) reads as empty, as in the
        SDK's advanced session."""
        wanted = resolve_session_limit(limit, self.session_settings)
        _check_limit(wanted)
        at = self._cursor()

        async def read(log: SessionLog) -> list[Any]:
            return _latest(await log.items(branch_id, at=at), wanted)

        return cast(list[TResponseInputItem], await self._run(read))

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` to the current branch, in one new state (none for an empty
        list). Concurrent calls are applied one after another, none lost. A value JSON
        cannot carry is an UnsupportedTypeError (a TypeError, as the SDK's sessions
        raise) or a ValidationError, and nothing is written."""
        checked = check_items(items)
        at = self._cursor()

        async def change(log: SessionLog) -> None:
            self._wrote(f"add {len(checked)} item(s)", await log.append(checked, at=at))

        if not checked:
            self._check_open()
            return
        await self._run(change, write=True)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item of the current branch (None when it is empty);
        the state before it stays stored. The branch is the one current when called: a
        ``switch_to_branch`` that completes while the pop waits does not redirect it."""
        at = self._cursor()

        async def change(log: SessionLog) -> Item | None:
            item, state = await log.pop(at=at)
            if item is not None:
                self._wrote("pop", state)
            return item

        item = await self._run(change, write=True)
        return None if item is None else cast(TResponseInputItem, decode_items([item])[0])

    async def clear_session(self) -> None:
        """Make the session empty in a new state: ``main`` holds no item and every other
        branch is gone (their names stay used). Earlier states stay stored."""

        async def change(log: SessionLog) -> None:
            self._wrote("clear", await log.clear())

        await self._run(change, write=True)

    # -- branches (the SDK's AdvancedSQLiteSession methods) --------------------------------

    async def create_branch_from_turn(self, turn_number: int,
                                      branch_name: str | None = None) -> str:
        """A new branch holding the current branch's items before turn ``turn_number``
        (its user message, the ``turn_number``-th), switched to; returns its id. Shares
        every item with its source. ValueError (ValidationError) if the turn has no user
        message or ``branch_name`` is blank or was used in this session before."""

        return await self._create_branch(turn_number, branch_name, self._cursor())

    async def _create_branch(self, turn_number: int, branch_name: str | None,
                             at: Cursor) -> str:
        async def change(log: SessionLog) -> str:
            state = await log.create_branch(branch_name, turn_number, at=at)
            self._wrote(f"branch {log.branch!r} from turn {turn_number} of {at.branch!r}",
                        state)
            return log.branch

        return await self._run(change, write=True)

    async def create_branch_from_content(self, search_term: str,
                                         branch_name: str | None = None) -> str:
        """``create_branch_from_turn`` at the first turn whose user message contains
        ``search_term`` (as ``find_turns_by_content`` matches); ValueError
        (ValidationError) if none does."""
        at = self._cursor()  # the branch searched is the branch cut
        found = await self._find_turns(search_term, None, at)
        if not found:
            raise ValidationError("search_term", "no user turn contains it", search_term)
        return await self._create_branch(found[0]["turn"], branch_name, at)

    async def switch_to_branch(self, branch_id: str) -> None:
        """Read and write ``branch_id`` from now on (this object only); ValueError
        (ValidationError) if the session has no such branch."""

        async def switch(log: SessionLog) -> None:
            await log.switch(branch_id)

        await self._run(switch)

    async def list_branches(self) -> list[dict[str, Any]]:
        """The session's branches, oldest first, as the SDK's advanced session lists them:
        ``branch_id``, ``message_count``, ``user_turns``, ``is_current``, ``created_at``
        (an aware UTC datetime; ``main``'s is the session's first state's)."""

        async def read(log: SessionLog) -> list[dict[str, Any]]:
            state = await log.newest()
            if state is None:
                return []
            current = log.resolve_branch(state)
            began = await log.oldest()
            out = []
            for branch in state.branches:
                items = await log.history(branch.head)
                created: datetime | None = branch.created_at or (
                    began.created_at if began else None)
                out.append({"branch_id": branch.name, "message_count": len(items),
                            "user_turns": user_turns(items),
                            "is_current": branch.name == current, "created_at": created})
            return out

        return await self._run(read)

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """A new state without ``branch_id`` (its name is never reused). ValueError
        (ValidationError) for ``main``, an unknown branch, or the current one unless
        ``force`` (which moves this object to ``main``). Earlier states keep it."""

        async def change(log: SessionLog) -> None:
            state = await log.delete_branch(branch_id, force=force)
            self._logger.info("session %r: deleted branch %r (state %s keeps it)",
                              self.session_id, branch_id, state.parent_id)

        await self._run(change, write=True)

    # -- turns, search and usage (the rest of AdvancedSQLiteSession's methods) -------------

    async def get_conversation_turns(self, branch_id: str | None = None
                                     ) -> list[dict[str, Any]]:
        """The user turns of the current branch (or ``branch_id``) as the SDK's advanced
        session lists them: ``turn``, ``content`` (a preview of 100 characters),
        ``full_content``, ``timestamp`` (None: items are content and carry no time; the
        states that added them do, see ``list_states``), ``can_branch``."""
        return [_turn(number, content, 100)
                for number, content in await self._turns(branch_id, self._cursor())]

    async def find_turns_by_content(self, search_term: str, branch_id: str | None = None
                                    ) -> list[dict[str, Any]]:
        """The turns (as ``get_conversation_turns``, with the whole content as preview)
        whose user message text contains ``search_term``, ASCII letters matched without
        regard to case, as the SDK's advanced session does."""
        return await self._find_turns(search_term, branch_id, self._cursor())

    async def _find_turns(self, search_term: str, branch_id: str | None, at: Cursor
                          ) -> list[dict[str, Any]]:
        if not isinstance(search_term, str):
            raise ValidationError("search_term", f"must be a str, got "
                                  f"{type(search_term).__name__}", None)
        pattern = re.compile(re.escape(search_term), re.IGNORECASE | re.ASCII)
        return [_turn(number, content, None)
                for number, content in await self._turns(branch_id, at)
                if any(pattern.search(text) for text in _texts(content))]

    async def _turns(self, branch_id: str | None, at: Cursor) -> list[tuple[int, Any]]:
        async def read(log: SessionLog) -> list[tuple[int, Any]]:
            items = await log.items(branch_id, at=at)
            return [(n, item.get("content", "")) for n, item in turns(items)]

        return await self._run(read)

    async def store_run_usage(self, result: Any) -> None:
        """Record ``result.context_wrapper.usage`` (a ``RunResult``'s token usage) as the
        usage of the current branch's latest turn, in a new state (replacing an earlier
        record of that turn). As in the SDK's advanced session it never fails the caller's
        run: a failure is logged to the session's logger, and a branch without a turn
        records nothing. A turn's usage goes with the turn (``pop_item``, compaction).
        The branch is the one current when called (a later switch does not move it)."""
        at = self._cursor()
        try:
            usage = result.context_wrapper.usage
            if usage is None:
                return
            record = {"requests": usage.requests or 0,
                      "input_tokens": usage.input_tokens or 0,
                      "output_tokens": usage.output_tokens or 0,
                      "total_tokens": usage.total_tokens or 0,
                      "input_tokens_details": _details(usage, "input_tokens_details"),
                      "output_tokens_details": _details(usage, "output_tokens_details")}

            async def change(log: SessionLog) -> None:
                self._wrote("usage", await log.add_usage(record, at=at))

            await self._run(change, write=True)
        except Exception as e:  # the SDK's contract: usage never breaks a run
            self._logger.error("session %r: failed to store run usage: %s: %s",
                               self.session_id, type(e).__name__, e)

    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """The usage summed over every branch's turns (or ``branch_id``'s): ``requests``,
        ``input_tokens``, ``output_tokens``, ``total_tokens``, ``total_turns``; None
        when no usage is recorded."""

        async def read(log: SessionLog) -> list[dict[str, Any]]:
            state = await log.newest()
            if state is None:
                return []
            chosen = [b for b in state.branches if branch_id is None or b.name == branch_id]
            return [r for b in chosen for r in (await log.branch_usage(b)).values()]

        records = await self._run(read)
        if not records:
            return None
        sums = {k: sum(int(r.get(k) or 0) for r in records)
                for k in ("requests", "input_tokens", "output_tokens", "total_tokens")}
        return {**sums, "total_turns": len(records)}

    async def get_turn_usage(self, user_turn_number: int | None = None,
                             branch_id: str | None = None
                             ) -> list[dict[str, Any]] | dict[str, Any]:
        """The usage of turn ``user_turn_number`` of the current branch (or ``branch_id``)
        as a dict ({} if none), or of every turn with usage as a list ordered by turn, each
        with ``user_turn_number``: ``requests``, ``input_tokens``, ``output_tokens``,
        ``total_tokens``, ``input_tokens_details``, ``output_tokens_details``."""
        at = self._cursor()
        by_turn = await self._run(lambda log: log.usage(branch_id, at=at))
        if user_turn_number is not None:
            record = by_turn.get(user_turn_number)
            return {} if record is None else _usage_view(record)
        return [{"user_turn_number": turn, **_usage_view(by_turn[turn])}
                for turn in sorted(by_turn)]

    # -- compaction (the SDK's OpenAIResponsesCompactionSession over this one) -------------

    async def _atomic_replace_items(self, items: list[TResponseInputItem]) -> bool:
        """The SDK compaction session's whole-history replacement: the current branch
        holds ``items`` (the summary) in one new state, whose parent keeps the history it
        replaced. (Without this hook the SDK clears then re-adds: two states, and a clear
        retires every branch.)"""
        checked = check_items(items)
        at = self._cursor()

        async def change(log: SessionLog) -> bool:
            applied, state = await log.replace(checked, at=at)
            self._compacted(state, len(checked))
            return applied

        return await self._run(change, write=True)

    async def _get_compaction_snapshot(
            self, limit: int, *, prune_prefix: Callable[[Any], bool] | None = None) -> Any:
        """The SDK compaction session's bounded snapshot: the latest ``limit`` items of the
        current branch and a ``replace_suffix(start, output)`` that replaces
        ``items[start:]`` of them with ``output`` in one new state, only if the branch has
        not changed since; ``prune_prefix`` (an encrypted session's expiry) leaves out the
        leading items it holds true for, in that same state (the state before keeps
        them). None when this SDK has no snapshot type (it then compacts whole
        histories)."""
        if _CompactionSnapshot is None:
            return None
        at = self._cursor()  # the branch read is the branch replaced

        async def read(log: SessionLog) -> tuple[bytes, tuple[Item, ...]] | None:
            state = await log.newest()
            found = None if state is None else state.branch(log.resolve_branch(state, at))
            return None if found is None else (found.head, await log.history(found.head))

        seen = await self._run(read)
        if seen is None:
            return None
        head, history = seen
        window = history[max(0, len(history) - limit):] if limit > 0 else ()
        offset = len(history) - len(window)

        async def replace_suffix(start: int, output: list[TResponseInputItem]) -> bool:
            if not 0 <= start < len(window):
                return False
            checked = check_items(output)

            async def change(log: SessionLog) -> bool:
                applied, state = await log.replace(checked, keep=offset + start, expect=head,
                                                   drop_while=prune_prefix, at=at)
                if applied:
                    self._compacted(state, len(checked))
                return applied

            return await self._run(change, write=True)

        return _CompactionSnapshot(decode_items(window), offset == 0, replace_suffix)

    def _compacted(self, state: SessionState | None, count: int) -> None:
        if state is not None:
            self._logger.info("session %r: compacted into %d item(s) in state %s; state %s "
                              "keeps the history it replaced", self.session_id, count,
                              state.id, state.parent_id)

    # -- sessions, forks and the immutable history -----------------------------------------

    async def list_sessions(self, owner: str | None = None) -> list[SessionInfo]:
        """Every session in this session's store (only ``owner``'s, if given), by id:
        ``session_id``, ``owner``, ``states``, ``created_at``, ``updated_at``, ``newest``.
        A scan of the store's session states (see ``immagent.clients.sessions.list_sessions``)."""
        return await self._run(lambda log: list_sessions(log.store, owner=owner))

    async def fork(self, new_session_id: str, at_turn: int | None = None) -> ImmAgentSession:
        """A new session ``new_session_id`` starting with this one's current branch (the
        items before turn ``at_turn``, or all) as its ``main``, sharing every item; its
        first state's parent is this session's newest state, its owner this session's.
        It uses this session's store (a DSN-opened store stays open until both are
        closed). ValidationError if ``new_session_id`` already has states."""
        target = check_session_id("new_session_id", new_session_id)
        at = self._cursor()

        async def change(log: SessionLog) -> None:
            self._wrote(f"fork into {target!r}", await log.fork(target, at_turn, at=at))

        await self._run(change, write=True)
        return ImmAgentSession._sharing(self._host, target, self.session_settings,
                                        self._owner, self._logger)

    async def current_state(self) -> SessionState | None:
        """The session's newest state (its ``digest`` pins every branch's items), or None
        before the first write."""
        return await self._run(lambda log: log.newest())

    async def list_states(self, limit: int = 100, *, after_seq: int | None = None,
                          newest_first: bool = True) -> list[SessionState]:
        """The session's stored states in log order, newest first by default, a page at a
        time (pass the last one's ``seq`` as ``after_seq``)."""
        return await self._run(lambda log: log.states(limit=limit, after_seq=after_seq,
                                                      newest_first=newest_first))

    async def get_state_items(self, state: SessionState | UUID | str, *,
                              branch_id: str = MAIN,
                              limit: int | None = None) -> list[TResponseInputItem]:
        """The items ``branch_id`` held in a stored state (this session's or any other's),
        oldest first, the latest ``limit`` if given: what a compaction replaced is the
        items of its state's parent. ValidationError if the state is not stored or has no
        such branch."""
        _check_limit(limit)
        wanted = state.id if isinstance(state, SessionState) else state

        async def read(log: SessionLog) -> list[Any]:
            found = await log.load(wanted)
            head = found.head(branch_id)
            if head is None:
                raise ValidationError("branch_id", f"state {found.id} has no branch "
                                      f"{branch_id!r}", branch_id)
            return _latest(await log.history(head), limit)

        return cast(list[TResponseInputItem], await self._run(read))

    async def export(self, path: str | os.PathLike[str]) -> BundleInfo:
        """Write an audit bundle of the session's newest state, its lineage and every item
        they reach (``immagent.verify_bundle`` checks it offline; ``Store.import_states``
        loads it elsewhere with the same ids and digests)."""

        async def change(log: SessionLog) -> BundleInfo:
            state = await log.newest()
            info = None if state is None else await log.store.export_lineage(state.id, path)
            if info is None:
                raise ValidationError("session_id", f"session {self.session_id!r} has no "
                                      "state to export", self.session_id)
            return info

        return await self._run(change)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> _Closed:
        """Close the session (idempotent); a store it opened from a DSN closes when the
        last session using it (it and its forks) is closed. Waits for calls in flight.
        Done when it returns, and awaitable too: ``session.close()`` as for
        ``SQLiteSession``, ``await session.close()`` as for ``AsyncSQLiteSession``. A
        closed session raises SessionClosedError (a RuntimeError, as the SDK's do)."""
        if not self._closed:
            self._closed = True
            self._finalizer()
        return _Closed()

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> ImmAgentSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ImmAgentSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _details(usage: Any, name: str) -> Any:
    """A usage's token details as plain JSON (None when absent), as the SDK stores them."""
    details = getattr(usage, name, None)
    if not details:
        return None
    dump = getattr(details, "model_dump", None)
    return dump() if callable(dump) else dict(vars(details))


def _usage_view(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("requests", "input_tokens", "output_tokens",
                                       "total_tokens", "input_tokens_details",
                                       "output_tokens_details")}


def _texts(content: Any) -> list[str]:
    """The text of a user message's content: the str, or each part's ``text``."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content
                if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _turn(number: int, content: Any, preview: int | None) -> dict[str, Any]:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if preview is not None and len(text) > preview:
        text = text[:preview] + "..."
    return {"turn": number, "content": text, "full_content": content, "timestamp": None,
            "can_branch": True}


def _check_limit(limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise ValidationError("limit", f"must be an int or None, got {limit!r}", limit)


def _latest(items: tuple[Item, ...], limit: int | None) -> list[Any]:
    """Copies of the latest ``limit`` items in order (None or negative: all; 0: none)."""
    if limit is not None and limit >= 0:
        items = items[max(0, len(items) - limit):] if limit else ()
    return decode_items(items)

