"""Read replicas: one Backend made of a primary PostgresBackend and PostgreSQL standbys.

Why replicas are safe here: a physical standby replays the primary's WAL in order, so it
always holds a consistent *prefix* of the primary's history, and every row it returns
existed on the primary (content rows never change; a state row is never updated). Every
row, wherever it was read, then passes the Store's one verify-on-read, so a damaged
replica fails loudly (IntegrityError), never silently.

Routing, decided per call:

* Reads that can tell a miss go to a replica: ``get_assets``, ``get_states`` (what is
  absent is re-asked of the primary, only that), ``get_chain`` (when the chain stops before
  its root or an element is absent) and ``lineage`` (when the walk stops at a parent it
  did not return). A state written a moment ago anywhere is therefore still found: read-
  your-writes holds for every caller, whatever the replication lag.
* Everything else goes to the primary: writes, deletes, gc, verify, schema, and the reads
  whose result cannot reveal lag (``scan_states``, ``stream_states``, ``count_states``: a
  stale page or a stale newest state looks like a valid answer), ``iter_assets`` (long
  iterations on a standby are cancelled by recovery conflicts) and the audit queries
  (``audits()`` hands out the primary itself).
* Deletes are the one gap misses cannot close (a lagging replica still returns what was
  just deleted, or replaced), so after a delete, a write that replaces states, a sweep or
  a migration this backend reads the primary's WAL position and uses a replica again
  only once its replay has passed it (``pg_last_wal_replay_lsn()``, probed at most every
  20 ms); while such a write runs, every read goes to the primary. This holds for
  deletes made through this Store; another process's deletes show on a replica once it
  replays them (typically milliseconds).

Choosing a replica: the one with the fewest calls in flight from this process, ties
broken round robin. A replica that is slow (loaded, far away, busy replaying) accumulates
calls and so gets fewer new ones, with no statistics to keep; round robin alone would keep
sending it its full share. Each replica admits at most its pool size of calls at once, so
waiting for a pooled connection only ever means the server does not answer, which a short
checkout timeout (1 s) detects.

Failures: a replica that cannot be reached (connection refused or lost, no connection
within the timeout) is marked down and its pool closed; the primary answers that call, the
next ones go to the other replicas (or the primary), and a background task reopens it with
backoff (0.5 s doubling to 30 s). Any other error from a replica (a recovery conflict,
tables not replayed yet) falls back to the primary for that call. Only the primary's errors
reach the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar
from uuid import UUID

from immagent.assets import Digest
from immagent.chains import SPAN, NewNode, NodeRow
from immagent.exceptions import StoreConnectionError, StoreError, ValidationError
from immagent.records import StateRow
from immagent.rows import StoredAsset
from immagent.store import dsn as dsns
from immagent.store.backend import (
    Backend,
    CodecRefs,
    Head,
    MarkRows,
    Redactor,
    RedactResult,
    RetainResult,
    RetentionPlan,
    RowCheck,
    SweepResult,
    WriteResult,
)
from immagent.store.postgres import PostgresBackend, client_options

__all__ = ["ReplicatedBackend", "check_replicas", "least_busy", "open_backend"]

log = logging.getLogger("immagent")

T = TypeVar("T")

#: How long a replica call waits for a pooled connection before the replica is called down.
CHECKOUT_TIMEOUT = 1.0
#: How long (re)connecting to a replica may take.
CONNECT_TIMEOUT = 2.0
#: Reconnection delays for a replica that is down: the first, and the cap of the doubling.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A replica behind the delete fence has its replay position re-read at most this often.
PROBE_INTERVAL = 0.02


class _Miss:
    """What a replica call returns when the replica could not answer."""


_MISS = _Miss()


class _Replica:
    """One standby: its backend (None while down), its load and what it has replayed."""

    def __init__(self, index: int, dsn: str, backend: PostgresBackend | None,
                 max_size: int) -> None:
        self.index = index
        self.dsn = dsn
        self.shown = dsns.redact(dsn)
        self.backend = backend
        self.slots = asyncio.Semaphore(max_size)
        self.in_flight = 0
        self.replayed = 0  # the highest replay position seen (a WAL byte offset)
        self.probed_at = float("-inf")
        self.recovery: asyncio.Task[None] | None = None


async def open_backend(dsn: str, replicas: Sequence[str] = (), *, min_size: int = 2,
                       max_size: int = 10, max_inactive_connection_lifetime: float = 300.0,
                       ) -> Backend:
    """The backend for a PostgreSQL primary and its read replicas (``Store.connect``'s):
    a plain PostgresBackend without replicas. The replica DSNs are checked before anything
    connects (ValidationError ``replicas[i]``)."""
    checked = check_replicas(replicas)
    if not checked:
        return await PostgresBackend.open(
            dsn, min_size=min_size, max_size=max_size,
            max_inactive_connection_lifetime=max_inactive_connection_lifetime)
    return await ReplicatedBackend.open(
        dsn, checked, min_size=min_size, max_size=max_size,
        max_inactive_connection_lifetime=max_inactive_connection_lifetime)


def check_replicas(replicas: object) -> list[str]:
    """The replica DSNs, each proved to name PostgreSQL (ValidationError otherwise)."""
    if isinstance(replicas, str | bytes | os.PathLike) or not isinstance(replicas, Sequence):
        raise ValidationError("replicas", f"must be a list of postgresql:// DSNs, got "
                              f"{type(replicas).__name__}", None)
    checked = []
    for i, replica in enumerate(replicas):
        field = f"replicas[{i}]"
        try:
            target = dsns.parse(replica)
            if target.scheme == "postgresql":
                client_options(target.dsn)
        except ValidationError as e:
            raise ValidationError(field, str(e).removeprefix("dsn: "), None) from None
        if target.scheme != "postgresql":
            raise ValidationError(field, f"a read replica must be a postgresql:// DSN, got "
                                  f"{target.scheme}", None)
        checked.append(target.dsn)
    return checked


class ReplicatedBackend:
    """Writes, audits and lag-blind reads on the primary; the reads that can tell a miss
    on the least busy replica, re-asked of the primary when they miss (module docstring)."""

    def __init__(self, primary: PostgresBackend,
                 replicas: Sequence[tuple[str, PostgresBackend | None]],
                 opener: Callable[[str], Awaitable[PostgresBackend]], *,
                 max_size: int = 10) -> None:
        """Over open backends (``open`` makes them); a replica given as None starts down.
        ``opener`` reconnects a replica from its DSN."""
        self._primary = primary
        self._replicas = [_Replica(i, d, b, max_size) for i, (d, b) in enumerate(replicas)]
        self._opener = opener
        self._turn = 0
        # The primary's WAL position after this backend's latest delete; None: unknown (the
        # read after a delete failed), so replicas wait until it is read again.
        self._fence: int | None = 0
        self._fencing = 0  # deletes in progress: every read goes to the primary meanwhile
        self._closed = False
        for replica in self._replicas:
            if replica.backend is None:
                self._start_recovery(replica)

    @classmethod
    async def open(cls, dsn: str, replicas: Sequence[str], *, min_size: int = 2,
                   max_size: int = 10, max_inactive_connection_lifetime: float = 300.0,
                   ) -> ReplicatedBackend:
        """Connect to the primary (its errors are raised) and to each replica (one that
        cannot be reached starts down and is retried in the background)."""
        opener = functools.partial(
            PostgresBackend.open, min_size=min_size, max_size=max_size,
            max_inactive_connection_lifetime=max_inactive_connection_lifetime,
            connect_timeout=CONNECT_TIMEOUT, timeout=CHECKOUT_TIMEOUT)
        primary = await PostgresBackend.open(
            dsn, min_size=min_size, max_size=max_size,
            max_inactive_connection_lifetime=max_inactive_connection_lifetime)
        opened: list[PostgresBackend | BaseException] = []
        try:
            opened = await asyncio.gather(*(opener(r) for r in replicas),
                                          return_exceptions=True)
            backends: list[PostgresBackend | None] = []
            for replica, result in zip(replicas, opened, strict=True):
                if isinstance(result, StoreConnectionError):
                    log.warning("read replica %s is unreachable (%s); it is retried in the "
                                "background", dsns.redact(replica), result)
                    backends.append(None)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    backends.append(result)
        except BaseException:
            for result in opened:
                if isinstance(result, PostgresBackend):
                    await result.close()
            await primary.close()
            raise
        return cls(primary, list(zip(replicas, backends, strict=True)), opener,
                   max_size=max_size)

    async def close(self) -> None:
        self._closed = True
        for replica in self._replicas:
            if replica.recovery is not None:
                replica.recovery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replica.recovery
            backend, replica.backend = replica.backend, None
            if backend is not None:
                await backend.close()
        await self._primary.close()

    async def ping(self) -> bool:
        return await self._primary.ping()

    def audits(self) -> PostgresBackend:
        """The primary: audits read every row as it is, never a standby's lagging copy."""
        return self._primary

    # -- choosing a replica ---------------------------------------------------------------

    async def _choose(self) -> _Replica | None:
        """The replica to read from, or None (every read to the primary)."""
        if self._fencing or self._closed:
            return None
        if self._fence is None:
            try:
                self._fence = await self._primary.wal_lsn()
            except StoreError:
                return None
        fence = self._fence
        behind = [r for r in self._replicas if r.backend is not None and r.replayed < fence]
        if behind:
            await asyncio.gather(*(self._probe(r) for r in behind))
        loads = [r.in_flight if r.backend is not None and r.replayed >= fence else None
                 for r in self._replicas]
        chosen = least_busy(loads, self._turn)
        self._turn = (self._turn + 1) % len(self._replicas)
        return None if chosen is None else self._replicas[chosen]

    async def _probe(self, replica: _Replica) -> None:
        """Re-read a replica's replay position, unless that was done just now."""
        now = time.monotonic()
        if now - replica.probed_at < PROBE_INTERVAL:
            return
        replica.probed_at = now
        lsn = await self._on(replica, lambda b: b.wal_lsn())
        if isinstance(lsn, int):
            replica.replayed = max(replica.replayed, lsn)

    async def _on(self, replica: _Replica, call: Callable[[PostgresBackend], Awaitable[T]],
                  ) -> T | _Miss:
        """``call`` on the replica's backend, or _MISS when the replica could not answer."""
        backend = replica.backend
        if backend is None:
            return _MISS
        replica.in_flight += 1
        try:
            async with replica.slots:
                if replica.backend is not backend:  # went down while this call waited
                    return _MISS
                return await call(backend)
        except StoreConnectionError as e:
            self._down(replica, backend, e)
            return _MISS
        except StoreError as e:  # a recovery conflict, a table not replayed yet, closed
            log.debug("read replica %s could not answer (%s); asking the primary",
                      replica.shown, e)
            return _MISS
        finally:
            replica.in_flight -= 1

    async def _replica_read(self, call: Callable[[PostgresBackend], Awaitable[T]]) -> T | None:
        """``call`` on the chosen replica, or None when there is none or it failed."""
        replica = await self._choose()
        if replica is None:
            return None
        result = await self._on(replica, call)
        return None if isinstance(result, _Miss) else result

    # -- replica health -------------------------------------------------------------------

    def _down(self, replica: _Replica, backend: PostgresBackend, error: Exception) -> None:
        if replica.backend is not backend or self._closed:  # already handled
            return
        replica.backend = None
        log.warning("read replica %s is unreachable (%s); reads go elsewhere until it "
                    "answers again", replica.shown, error)
        self._start_recovery(replica, backend)

    def _start_recovery(self, replica: _Replica, old: PostgresBackend | None = None) -> None:
        replica.recovery = asyncio.get_running_loop().create_task(
            self._recover(replica, old), name=f"immagent replica {replica.index}")

    async def _recover(self, replica: _Replica, old: PostgresBackend | None) -> None:
        """Close a failed replica's pool, then reopen it with backoff. A fresh pool: the
        old one would hand out its dead idle connections unchecked."""
        if old is not None:
            try:
                await old.close()
            except Exception as e:  # a dead pool may fail to close; it is dropped anyway
                log.debug("closing the pool of read replica %s: %s", replica.shown, e)
        delay = FIRST_BACKOFF
        while True:
            await asyncio.sleep(delay)
            try:
                backend = await self._opener(replica.dsn)
            except StoreError as e:
                log.debug("read replica %s still unreachable: %s", replica.shown, e)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if self._closed:
                await backend.close()
                return
            replica.replayed, replica.probed_at = 0, float("-inf")
            replica.backend = backend
            replica.recovery = None
            log.warning("read replica %s answers again", replica.shown)
            return

    # -- the delete fence -----------------------------------------------------------------

    @contextlib.contextmanager
    def _no_replicas(self) -> Iterator[None]:
        self._fencing += 1
        try:
            yield
        finally:
            self._fencing -= 1

    async def _raise_fence(self) -> None:
        """Replicas serve reads again once they have replayed what was just committed."""
        try:
            lsn = await self._primary.wal_lsn()
        except StoreError:
            self._fence = None  # read again by the next read
            return
        self._fence = lsn if self._fence is None else max(self._fence, lsn)

    # -- schema ---------------------------------------------------------------------------

    async def schema_version(self) -> int | None:
        return await self._primary.schema_version()

    async def migrate(self, found: int | None) -> int | None:
        with self._no_replicas():
            try:
                return await self._primary.migrate(found)
            finally:
                await self._raise_fence()

    # -- writes ---------------------------------------------------------------------------

    async def write(self, assets: Sequence[StoredAsset], states: Sequence[StateRow],
                    require: Sequence[Digest] = (), heads: Sequence[Head] = (),
                    replace: Sequence[UUID] = (), nodes: Sequence[NewNode] = (), *,
                    require_states: Sequence[UUID] = (),
                    refuse: Sequence[Digest] = ()) -> WriteResult:
        if not replace:
            return await self._primary.write(assets, states, require, heads, nodes=nodes,
                                             require_states=require_states, refuse=refuse)
        # A replacement deletes rows: fenced as a delete is.
        with self._no_replicas():
            result = await self._primary.write(assets, states, require, heads, replace,
                                               nodes, require_states=require_states,
                                               refuse=refuse)
            if result == WriteResult():
                await self._raise_fence()
        return result

    async def delete_states(self, ids: Sequence[UUID], *, stop_at_shared: bool = False,
                            attached: Sequence[int] = (),
                            dry_run: bool = False) -> list[UUID]:
        with self._no_replicas():
            deleted = await self._primary.delete_states(ids, stop_at_shared=stop_at_shared,
                                                        attached=attached, dry_run=dry_run)
            if deleted and not dry_run:
                await self._raise_fence()
        return deleted

    async def sweep(self, check: RowCheck, codec_refs: CodecRefs | None = None, *,
                    detached: Sequence[int] = (), dry_run: bool = False) -> SweepResult:
        with self._no_replicas():
            result = await self._primary.sweep(check, codec_refs, detached=detached,
                                               dry_run=dry_run)
            if (result.removed or result.states_removed) and not dry_run:
                await self._raise_fence()
        return result

    async def redact(self, digests: Sequence[Digest], states: Sequence[StateRow],
                     node_kinds: Sequence[int], rewrite: Redactor, *,
                     dry_run: bool = False) -> RedactResult:
        # Rewrites rows in place: replicas serve reads again once they replayed it.
        with self._no_replicas():
            result = await self._primary.redact(digests, states, node_kinds, rewrite,
                                                dry_run=dry_run)
            if (result.nodes or result.assets) and not dry_run:
                await self._raise_fence()
        return result

    async def retain(self, plans: Sequence[RetentionPlan], marks: MarkRows, *,
                     dry_run: bool = False) -> RetainResult:
        with self._no_replicas():
            result = await self._primary.retain(plans, marks, dry_run=dry_run)
            if result.deleted and not dry_run:
                await self._raise_fence()
        return result

    # -- assets ---------------------------------------------------------------------------

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        if not digests:
            return {}
        found = await self._replica_read(lambda b: b.get_assets(digests))
        if found is None:
            return await self._primary.get_assets(digests)
        missing = [d for d in digests if d not in found]
        if missing:
            found.update(await self._primary.get_assets(missing))
        return found

    async def get_chain(self, head: Digest, *, context: bool = False
                        ) -> tuple[list[NodeRow], dict[Digest, StoredAsset]]:
        found = await self._replica_read(lambda b: b.get_chain(head, context=context))
        if found is not None and _whole_chain(*found, head, context):
            return found
        return await self._primary.get_chain(head, context=context)

    async def get_nodes(self, digests: Sequence[Digest]
                        ) -> tuple[dict[Digest, NodeRow], dict[Digest, StoredAsset]]:
        found = await self._replica_read(lambda b: b.get_nodes(digests))
        if found is not None and all(d in found[0] for d in digests) and all(
                r in found[1] for n in found[0].values() for r in n.refs):
            return found
        return await self._primary.get_nodes(digests)

    async def kinds(self, digests: Sequence[Digest]) -> dict[Digest, int]:
        found = await self._replica_read(lambda b: b.kinds(digests))
        if found is None:
            return await self._primary.kinds(digests)
        missing = [d for d in digests if d not in found]
        if missing:
            found.update(await self._primary.kinds(missing))
        return found

    # -- states ---------------------------------------------------------------------------

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]:
        if not ids:
            return []
        rows = await self._replica_read(lambda b: b.get_states(ids))
        if rows is None:
            return await self._primary.get_states(ids)
        have = {r.id for r in rows}
        missing = [i for i in ids if i not in have]
        return rows + await self._primary.get_states(missing) if missing else rows

    async def scan_states(self, kind: int | None, *, after: UUID | None = None,
                          limit: int = 100, newest_first: bool = False,
                          contains: str | None = None) -> list[StateRow]:
        return await self._primary.scan_states(kind, after=after, limit=limit,
                                               newest_first=newest_first, contains=contains)

    async def stream_states(self, kind: int, stream: str, *, after_seq: int | None = None,
                            limit: int = 100, newest_first: bool = True) -> list[StateRow]:
        return await self._primary.stream_states(kind, stream, after_seq=after_seq,
                                                 limit=limit, newest_first=newest_first)

    async def count_states(self, kind: int, *, stream: str | None = None,
                           contains: str | None = None) -> int:
        return await self._primary.count_states(kind, stream=stream, contains=contains)

    async def stream_heads(self, kind: int, *, after: str | None = None,
                           limit: int = 100) -> list[StateRow]:
        return await self._primary.stream_heads(kind, after=after, limit=limit)

    async def lineage(self, state_id: UUID, limit: int | None = None) -> list[StateRow]:
        rows = await self._replica_read(lambda b: b.lineage(state_id, limit))
        if rows is not None and _whole_line(rows, state_id, limit):
            return rows
        return await self._primary.lineage(state_id, limit)


def least_busy(loads: Sequence[int | None], turn: int) -> int | None:
    """The policy: the index of the replica with the fewest calls in flight (``loads``;
    None: not usable now), ties going to the first at or after ``turn`` (the caller
    advances it on every choice: round robin). None when no replica is usable."""
    count = len(loads)
    usable = [i for i, load in enumerate(loads) if load is not None]
    if not usable:
        return None
    return min(usable, key=lambda i: (loads[i], (i - turn) % count))


def _whole_chain(rows: Sequence[NodeRow], leaves: dict[Digest, StoredAsset], head: Digest,
                 context: bool) -> bool:
    """Whether a chain read reached the head and its root (``context``: the head's last
    span depth) with every out-of-line element. A replica that lags returns less; so does
    damage, which the primary then confirms."""
    if not rows or rows[-1].digest != head:
        return False
    depth = rows[-1].depth
    first = max(0, depth - depth % SPAN - 1) if context else 0
    if rows[0].depth != first or any(r.depth != first + i for i, r in enumerate(rows)):
        return False
    return all(d in leaves for r in rows for d in r.refs)


def _whole_line(rows: Sequence[StateRow], state_id: UUID, limit: int | None) -> bool:
    """Whether a lineage read ended where the primary's would: at a root, at the limit or
    at a cycle, rather than at a parent it did not return (lag, or a deleted parent, which
    the primary then confirms)."""
    by_id = {r.id: r for r in rows}
    current = by_id.get(state_id)
    seen: set[UUID] = set()
    while current is not None:
        seen.add(current.id)
        if current.parent_id is None or (limit is not None and len(seen) >= limit):
            return True
        if current.parent_id in seen:
            return True
        current = by_id.get(current.parent_id)
    return False

