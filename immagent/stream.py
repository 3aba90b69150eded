"""Streamed turns: the events of one turn as they happen, and the new agent once it is saved.

``agent.stream(user_input, **options)`` (on PersistentAgent and SimpleAgent) returns a
``TurnStream``::

    async with agent.stream("Hello") as s:
        async for event in s:
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
    new = s.agent

The events are ``TextDelta`` (a piece of the reply), ``AssistantReply`` (a model call's
whole message), ``ToolCallRequest`` and ``ToolResult`` (tool rounds run as ``advance``
runs them), and last ``TurnDone``, sent once the turn is saved.

A turn is saved whole or not at all, as with ``advance``: when its last event has been
produced the new state is saved exactly as ``advance`` saves it (the same messages, the
same digests), and only then does ``TurnDone`` arrive. If the model fails (LLMError) or a
tool provider breaks, nothing is written. If the caller stops early (leaves the loop, is
cancelled, raises), nothing is written either, unless the stream was opened with
``keep_partial=True``: then, when the ``async with`` block (or ``aclose()``) ends, what the
turn produced so far is saved as its own new state, the reply cut short marked
``interrupted`` (see ``immagent.advance.Turn.partial``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, NamedTuple, Self, TypeAlias, TypeVar

from immagent.advance import AssistantReply, TextDelta, ToolCallRequest, ToolResult, Turn
from immagent.assets import Message
from immagent.exceptions import StreamBusyError, TurnIncompleteError, ValidationError
from immagent.history import TokenUsage, token_usage

__all__ = [
    "AssistantReply",
    "Started",
    "TextDelta",
    "ToolCallRequest",
    "ToolResult",
    "TurnDone",
    "TurnEvent",
    "TurnStream",
]

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class TurnDone:
    """The turn is complete and saved: its new messages and their summed token usage."""

    messages: tuple[Message, ...]
    usage: TokenUsage


TurnEvent: TypeAlias = TextDelta | AssistantReply | ToolCallRequest | ToolResult | TurnDone

_State = Literal["new", "running", "saving", "saved", "partial", "failed", "stopped"]


class Started(NamedTuple, Generic[A]):
    """A turn ready to run, and how to save its new messages (as the agent's child)."""

    turn: Turn
    save: Callable[[Sequence[Message]], Awaitable[A]]


class _Progress(Generic[A]):
    """Where a turn is, shared by a TurnStream and the generator running its turn. The
    generator holds this, never the stream: a stream left without ``aclose()`` is then
    freed by reference counting, its generator first, which asyncio closes in order (the
    stream held by its own generator made a cycle, whose generators the collector
    finalised all at once: "Task exception was never retrieved", a tool task destroyed
    pending)."""

    __slots__ = ("agent", "busy", "started", "state")

    def __init__(self) -> None:
        self.state: _State = "new"
        self.started: Started[A] | None = None
        self.agent: A | None = None
        self.busy = False


async def _saved(progress: _Progress[A], save: Awaitable[A]) -> A:
    """``await save``, whole: a cancellation while it runs waits for its outcome (a write is
    whole or nothing, and may already have committed), records the new agent if it was
    saved, then goes on, so ``TurnStream.agent`` tells the caller the truth."""
    task = asyncio.ensure_future(save)
    try:
        agent = await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # asked again: the outcome is still what is awaited
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            progress.agent = task.result()
        raise
    progress.agent = agent
    return agent


async def _run(progress: _Progress[A], start: Callable[[], Awaitable[Started[A]]]
               ) -> AsyncGenerator[TurnEvent, None]:
    progress.state = "running"
    progress.started = started = await start()
    async with aclosing(started.turn.events()) as events:
        async for event in events:
            yield event
    messages = tuple(started.turn.messages)
    progress.state = "saving"
    try:
        await _saved(progress, started.save(messages))
    finally:
        if progress.agent is not None:  # saved, even if cancelled meanwhile
            progress.state = "saved"
    yield TurnDone(messages, token_usage(messages))


class TurnStream(Generic[A]):
    """The events of one streamed turn (an async iterator, best used in ``async with``)
    and, once it is saved, the new agent (``agent``). One consumer at a time: a second
    task iterating or closing it while the first waits for an event is a StreamBusyError.
    A stream cancelled while its turn was being saved waits for the write's outcome before
    the cancellation goes on; ``agent`` is then the saved state if the write committed."""

    def __init__(self, start: Callable[[], Awaitable[Started[A]]], *,
                 keep_partial: bool = False) -> None:
        """``start`` reads what the turn needs and sets it up; it runs on first iteration.
        Agents make these (``agent.stream(...)``); build one by hand only for a new agent
        type."""
        if not isinstance(keep_partial, bool):
            raise ValidationError("keep_partial", "must be a bool", keep_partial)
        self._keep_partial = keep_partial
        self._progress: _Progress[A] = _Progress()
        self._events = _run(self._progress, start)

    @property
    def _state(self) -> _State:
        return self._progress.state

    def __repr__(self) -> str:
        return f"<TurnStream {self._state}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    def _claim(self, what: str) -> None:
        if self._progress.busy:
            raise StreamBusyError(f"{what}: this TurnStream is in use by another task (it "
                                  "is waiting for the next event); a stream has one "
                                  "consumer")
        self._progress.busy = True

    async def __anext__(self) -> TurnEvent:
        self._claim("iterating")
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            raise
        except Exception:
            # The turn itself failed (the model, a tool provider, the store's one-transaction
            # write): nothing is kept, keep_partial or not. A BaseException (cancellation,
            # Ctrl-C) is the caller stopping, and aclose() decides.
            self._progress.state = "failed"
            raise
        finally:
            self._progress.busy = False

    async def aclose(self) -> None:
        """Stop the turn if it is still running (the model call is closed, running tools
        are cancelled); with ``keep_partial``, save what it produced so far."""
        progress = self._progress
        if progress.state in ("saved", "partial", "failed", "stopped"):
            return
        self._claim("closing")
        try:
            saving = progress.state == "saving"  # cut off while writing: whole or not
            await self._events.aclose()
            started = progress.started
            if self._keep_partial and started is not None and not saving:
                await _saved(progress, started.save(started.turn.partial()))
                progress.state = "partial"
            elif progress.agent is None:
                progress.state = "stopped"
        finally:
            progress.busy = False

    async def finish(self) -> A:
        """Consume the remaining events and return the new agent."""
        async for _ in self:
            pass
        return self.agent

    @property
    def agent(self) -> A:
        """The new agent: the saved turn, or with ``keep_partial`` the partial one.
        TurnIncompleteError while the turn runs, after it failed, or if it was stopped."""
        agent = self._progress.agent
        if agent is None:
            raise TurnIncompleteError(f"the turn has not been saved (it is {self._state}"
                                      f"{'' if self._keep_partial else ', keep_partial=False'})")
        return agent

    @property
    def interrupted(self) -> bool:
        """Whether the turn was stopped early and its partial state saved."""
        return self._state == "partial"

    @property
    def messages(self) -> tuple[Message, ...]:
        """The turn's new messages complete so far (all of them once it is done)."""
        started = self._progress.started
        return tuple(started.turn.messages) if started is not None else ()
