"""Applying a retention policy (``immagent.retention``) to a store, and pins.

The policy is data; the selection is SQL. This module walks the streams of each kind a rule
may select, a page of streams at a time (``Backend.stream_heads``: one probe per stream),
decides in Python which rule governs each stream (a glob, an idle time: a few thousand
decisions, never one per state), reads the streams' marks, and hands the page to
``Backend.retain``, which judges every state of those streams with window functions and
deletes what no rule keeps in one transaction per page. Then gc reclaims the assets nothing
reaches any more.

Safety, and why it holds:

* **Concurrent writers.** A run deletes state rows only, like ``delete_states``; writers
  never wait for it (gc's lock is not taken). What a write points at is re-checked under
  gc's lock as always, so the gc after a run cannot sweep an asset a concurrent write
  deduplicated onto. A head (a state no state of its kind names as parent) is never
  deleted by a keep rule, and a state committed after a page was judged is not seen by it:
  the state a writer extends, and what the writer adds, stay.
* **Pins.** A pin is written holding the shared side of the retention lock and requires its
  state to exist; a page is judged and deleted under the exclusive side. So a pin is either
  seen by the page (its state kept) or fails (its state is gone), never lost.
* **Crashes.** A page is one transaction: its deletions, its followers (a checkpoint's
  writes) and its marks commit together or not at all. A run killed midway leaves some
  pages applied and the rest untouched, each stream whole; the next run goes on from there.
* **Two runs at once.** A page whose marks changed since they were read is rolled back and
  planned again (``RetainResult.stale``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import msgspec

from immagent import retention
from immagent.assets import Kind
from immagent.audit.gc import GCResult
from immagent.exceptions import ImmAgentError, IntegrityError, StoreError
from immagent.ids import uuid7
from immagent.records import STATE_KINDS, StateRow, load_state, stream_digest
from immagent.retention import RETAINABLE, MarkBody, Policy, Retainable, mark_id
from immagent.store.backend import Backend, RetainResult, RetentionPlan, StreamPlan

__all__ = ["PAGE", "Pin", "RetentionReport", "apply", "mark_rows", "pin_row", "plan_page",
           "run_periodically"]

log = logging.getLogger("immagent")

#: Streams judged per transaction. Small enough that a page holds locks (SQLite: the write
#: lock) for well under a second on ordinary streams; a stream is never split.
PAGE = 256
#: Times a page is planned again when another run moved one of its marks meanwhile.
_ATTEMPTS = 5
#: What keep_latest means for a dropped stream that was written to after it was planned:
#: keep it all this run.
_ALL = 2**31 - 1


class RetentionReport(msgspec.Struct, frozen=True):
    """What one retention run deleted (``dry_run``: would delete, nothing deleted)."""

    dry_run: bool
    #: Streams a rule governed.
    streams: int
    #: States deleted, by kind name (a checkpoint's writes are ``checkpoint_writes``).
    states: dict[str, int]
    #: Their stored bytes (refs and body).
    state_bytes: int
    #: Assets the gc after it removed (dry run: would remove), by kind name.
    assets: dict[str, int]
    #: Their body bytes as stored.
    asset_bytes: int
    #: Streams kept whole because their newest state needs its ancestors (a LangGraph
    #: thread with a DeltaChannel), as "kind:name".
    kept_whole: tuple[str, ...] = ()
    #: Wall time of the run (seconds), gc included.
    seconds: float = 0.0

    @property
    def states_deleted(self) -> int:
        """States deleted, every kind together."""
        return sum(self.states.values())

    @property
    def assets_removed(self) -> int:
        """Assets removed, every kind together."""
        return sum(self.assets.values())

    def lines(self) -> list[str]:
        """The report as lines (what ``immagent retain`` prints)."""
        verb = "would delete" if self.dry_run else "deleted"
        states = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in sorted(self.states.items()))
        assets = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in sorted(self.assets.items()))
        out = [f"{self.streams} stream(s) governed by a rule",
               f"{verb} {self.states_deleted} state(s) ({self.state_bytes} bytes)"
               + (f": {states}" if states else ""),
               f"{'a gc would then remove' if self.dry_run else 'gc removed'} "
               f"{self.assets_removed} asset(s) ({self.asset_bytes} bytes)"
               + (f": {assets}" if assets else "")]
        if self.kept_whole:
            out.append(f"kept whole (their newest state needs its history): "
                       f"{', '.join(self.kept_whole[:10])}"
                       + (f" and {len(self.kept_whole) - 10} more"
                          if len(self.kept_whole) > 10 else ""))
        return out


class Pin(msgspec.Struct, frozen=True):
    """A pin as stored: its own id, the pinned state's id and kind, its tag and note, when
    it was made."""

    id: UUID
    state_id: UUID
    kind: int
    tag: str | None
    note: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: StateRow) -> Pin:
        """The pin a verified PIN state row holds."""
        body = retention.decode_pin(row.body)
        assert row.parent_id is not None  # the PIN kind's rule (records) requires it
        return cls(row.id, row.parent_id, body.kind, body.tag, body.note, row.created_at)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind_{kind}"


def mark_rows(now: datetime) -> Callable[[Sequence[tuple[int, str, int, int]]],
                                          list[StateRow]]:
    """The builder of mark rows ``Backend.retain`` calls inside its transaction: one
    RETENTION_MARK state per moved stream, its id derived from kind and stream."""

    def build(moved: Sequence[tuple[int, str, int, int]]) -> list[StateRow]:
        rows = []
        for kind, stream, seq, ordinal in moved:
            body = retention.encode_body(MarkBody(kind, stream, seq, ordinal))
            stream_of = retention.MARK_STREAM
            rows.append(load_state(StateRow(
                id=mark_id(kind, stream), parent_id=None, kind=int(Kind.RETENTION_MARK),
                stream=stream_of, refs=(), body=body,
                digest=stream_digest(Kind.RETENTION_MARK, stream_of, (), body),
                created_at=now)))
        return rows

    return build


async def plan_page(backend: Backend, policy: Policy, kind: int, heads: Sequence[StateRow],
                    now: datetime) -> tuple[RetentionPlan, list[str]]:
    """The plan of one page of streams (their newest states ``heads``) and the streams kept
    whole because their head needs its history."""
    rules: Retainable = RETAINABLE[kind]
    streams: list[StreamPlan] = []
    whole: list[str] = []
    governed: list[tuple[StateRow, retention.Rule]] = []
    for head in heads:
        load_state(head)  # its created_at and body decide; its digest must hold
        name = rules.name_of(head.stream)
        rule = policy.rule_for(kind, name, (now - head.created_at).total_seconds())
        if rule is None:
            continue
        if (not rule.drop and rules.needs_history is not None
                and rules.needs_history(head.body)):
            whole.append(f"{rules.name}:{name}")
            continue
        governed.append((head, rule))
    ids = [mark_id(kind, h.stream) for h, _ in governed]
    stored = {r.id: load_state(r) for r in await backend.get_states(ids)}
    for (head, rule), mark in zip(governed, ids, strict=True):
        row = stored.get(mark)
        found = None if row is None else retention.decode_mark(row.body)
        if found is not None and (found.kind, found.stream) != (kind, head.stream):
            raise IntegrityError(f"retention mark {mark} names another stream (run "
                                 "store.verify())")
        streams.append(StreamPlan(
            stream=head.stream, head_seq=head.seq,
            keep_latest=_ALL if rule.drop else max(1, rule.keep_latest or 1),
            newer_than=None if rule.max_age is None
            else now - timedelta(seconds=rule.max_age),
            keep_every=rule.keep_every, drop=rule.drop, mark=mark,
            mark_digest=None if row is None else row.digest,
            mark_seq=0 if found is None or rule.keep_every is None else found.seq,
            mark_ordinal=0 if found is None or rule.keep_every is None else found.ordinal))
    return RetentionPlan(kind, tuple(streams), rules.followers), whole


async def apply(backend: Backend, policy: Policy, *, dry_run: bool = False,
                now: datetime | None = None,
                collect: Callable[[], Awaitable[GCResult]] | None = None,
                page: int = PAGE) -> RetentionReport:
    """Apply ``policy`` (see the module doc), then ``collect`` (the store's gc) unless this
    is a dry run, which rolls every deletion back and counts what a gc would remove."""
    started = time.monotonic()
    when = now or datetime.now(UTC)
    build = mark_rows(when)
    deleted: dict[int, int] = {}
    state_bytes = governed = 0
    whole: list[str] = []
    rehearsal: list[RetentionPlan] = []
    for kind in policy.kinds():
        after: str | None = None
        while True:
            for _ in range(_ATTEMPTS):
                heads = await backend.stream_heads(kind, after=after, limit=page)
                plan, kept_whole = await plan_page(backend, policy, kind, heads, when)
                if dry_run or not plan.streams:
                    break
                result = await backend.retain([plan], build)
                if not result.stale:
                    _add(deleted, result)
                    state_bytes += result.state_bytes
                    break
                log.info("retention: another run moved a mark; planning the page again")
            else:
                raise StoreError("retention: another retention run keeps moving the marks "
                                 "of the same streams; run one at a time")
            if dry_run:
                rehearsal.append(plan)
            governed += len(plan.streams)
            whole += kept_whole
            if len(heads) < page:
                break
            after = heads[-1].stream
    swept = GCResult({}, 0, 0)
    if dry_run:
        result = await backend.retain(rehearsal, build, dry_run=True)
        _add(deleted, result)
        state_bytes = result.state_bytes
        swept = GCResult(result.assets, result.asset_bytes, 0)  # gc's names for its kinds
    elif collect is not None:
        swept = await collect()
    report = RetentionReport(
        dry_run=dry_run, streams=governed,
        states={_kind_name(k): n for k, n in sorted(deleted.items()) if n},
        state_bytes=state_bytes, assets={k: n for k, n in sorted(swept.items()) if n},
        asset_bytes=swept.bytes_freed, kept_whole=tuple(whole),
        seconds=round(time.monotonic() - started, 3))
    log.info("retention%s: %d state(s) deleted, %d asset(s) removed",
             " (dry run)" if dry_run else "", report.states_deleted, report.assets_removed)
    return report


def _add(total: dict[int, int], result: RetainResult) -> None:
    for kind, n in result.deleted.items():
        total[kind] = total.get(kind, 0) + n


async def run_periodically(apply_once: Callable[[], Awaitable[RetentionReport]],
                           interval: float, *,
                           on_report: Callable[[RetentionReport], None] | None = None
                           ) -> None:
    """Apply retention every ``interval`` seconds until cancelled (an asyncio task:
    ``asyncio.create_task(run_periodically(...))``; ``EventLog.retain_periodically`` builds
    one for a store). A run that fails is logged and the next one goes on: a transient
    database error must not end the schedule."""
    if interval <= 0:
        raise ValueError("interval must be > 0 seconds")
    while True:
        try:
            report = await apply_once()
        except ImmAgentError as e:
            log.warning("retention run failed: %s", e)
        else:
            if on_report is not None:
                on_report(report)
        await asyncio.sleep(interval)


def pin_row(subject: StateRow, *, tag: str | None, note: str | None,
            created_at: datetime) -> StateRow:
    """The PIN state of ``subject``: its parent is the subject, its stream the subject's
    id, its refs the subject's refs (kinds in its body), so the content stays."""
    kinds = STATE_KINDS[subject.kind].ref_kinds(subject)
    body = retention.encode_body(retention.PinBody(kind=subject.kind, ref_kinds=kinds,
                                                   tag=tag, note=note))
    stream = str(subject.id)
    return load_state(StateRow(
        id=uuid7(), parent_id=subject.id, kind=int(Kind.PIN), stream=stream,
        refs=subject.refs, body=body,
        digest=stream_digest(Kind.PIN, stream, subject.refs, body), created_at=created_at))

