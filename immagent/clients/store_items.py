"""ItemLog: a namespaced key-value store kept as states of the event log (no LangGraph import).

The store-side half of ``immagent.integrations.langgraph_store.ImmAgentStore``, the way
``immagent.clients.sessions`` is the store-side half of the Agents SDK session. The stored form is
in ``immagent.kv``; in short, every put, TTL refresh and delete of a key is a new *item
state* of the key's stream (its parent: the key's previous state), whose one ref is the
value, an ITEM asset (so equal values are stored once, whatever key or version holds
them); the key's *head* repeats its newest item state under an id derived from the key.
Nothing is updated in place: a key's history stays listable (``history``), verifiable
(``Store.verify``) and exportable (``export``) until its rows are deleted.

Reads:

* ``get``: the keys' heads, by primary key (one batched probe), and their values by digest
  (cache first). A deleted key has no head; an expired one reads as absent.
* ``search`` / ``list_namespaces``: a range scan of the heads under the namespace prefix
  (``kv.prefix_range``): one row per live key, whatever its history; values are fetched
  only for the keys a page needs.

Writes (``put``): one commit for a batch: each key's new item state, expecting the key's
newest item state to be the one it was computed from (``Head``), and its head replaced in
the same transaction; a writer that lost the race re-reads and recomputes, so concurrent
writers never fork a key's history and the last one wins. ``put_checked`` writes several
batches (checked beforehand by ``check_puts``) in one transaction, each batch's put of a key
a state of its own: how the adapter merges concurrent callers without dropping a put.

TTL (minutes, as LangGraph's): a put with a TTL stores its expiry in the state; a read
with ``refresh`` writes a refresh state with a new expiry (now + TTL) unless the stored one
is already within ``refresh_slack`` (a fraction of the TTL) of it, so reading an item in a
loop does not add a state per read. An expired item is invisible at once; ``sweep_expired``
deletes the whole history of every key whose head has expired (then ``gc`` reclaims its
values). Times come from this process's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple
from uuid import UUID

import msgspec

from immagent import kv
from immagent.assets import Asset, Digest, Item, Kind
from immagent.audit.bundle import BundleInfo
from immagent.exceptions import (
    ConflictError,
    IntegrityError,
    StaleStreamError,
    ValidationError,
)
from immagent.records import StateRow, item_body, stream_digest
from immagent.store.backend import Head
from immagent.store.log import EventLog
from immagent.validate import MAX_STREAM_BYTES, check_json_value

__all__ = ["FILTER_OPERATORS", "CheckedPuts", "ItemLog", "ItemVersion", "Put", "StoredItem",
           "matches"]

log = logging.getLogger("immagent")

_KIND: Final = int(Kind.STORE_ITEM)
_HEAD: Final = int(Kind.STORE_HEAD)
#: Scan pages grow from this size (a namespace usually holds few keys) to _PAGE.
_FIRST_PAGE: Final = 64
_PAGE: Final = 1000
#: A write that keeps losing the race to other writers of its keys gives up after this.
_MAX_ATTEMPTS: Final = 100
#: Keys whose current state an ItemLog remembers for its next write to them.
_KNOWN: Final = 10_000
#: Values fetched per round while a filtered search looks for enough matches.
_CHUNK: Final = 256
#: Operators a filter may use, as LangGraph documents them.
FILTER_OPERATORS: Final = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})

_values: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


class StoredItem(NamedTuple):
    """A key's current value and what its newest state says about it."""

    namespace: tuple[str, ...]
    key: str
    value: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    #: Minutes (None: the item never expires).
    ttl: float | None
    expires_at: datetime | None
    #: The key's newest item state, and its digest (which pins the value).
    state_id: UUID
    digest: Digest


class ItemVersion(NamedTuple):
    """One stored state of a key: a ``put``, a TTL ``refresh`` or a ``delete``."""

    change: Literal["put", "refresh", "delete"]
    state_id: UUID
    parent_id: UUID | None
    seq: int
    at: datetime
    #: The value (None for a delete).
    value: dict[str, Any] | None
    ttl: float | None
    expires_at: datetime | None
    digest: Digest


class Put(NamedTuple):
    """One write of a batch: ``value`` None deletes; ``ttl`` in minutes (None: none)."""

    namespace: tuple[str, ...]
    key: str
    value: Mapping[str, Any] | None
    ttl: float | None = None


class _Current(NamedTuple):
    """A key as read: its head (or, for a key without one, its newest item state), the
    body, and the id of its newest item state (what the next state's parent is)."""

    row: StateRow
    body: kv.ItemBody
    version: UUID


class _Change(NamedTuple):
    """One checked put of a key (``value`` None: a delete)."""

    namespace: tuple[str, ...]
    key: str
    value: Item | None
    ttl: float | None


class CheckedPuts:
    """A batch of puts as ``ItemLog.check_puts`` validated it: one change per key (the
    batch's last), in the batch's order of last puts. Opaque: hand it to ``put_checked``."""

    __slots__ = ("changes",)

    def __init__(self, changes: Mapping[str, _Change]) -> None:
        self.changes: Mapping[str, _Change] = dict(changes)

    def __len__(self) -> int:
        return len(self.changes)


class _Plan(NamedTuple):
    """What one attempt of a write commits."""

    assets: list[Asset]
    rows: list[StateRow]
    heads: list[Head]
    replace: list[UUID]


_Keys = Mapping[str, tuple[tuple[str, ...], str]]


def _now() -> datetime:
    return datetime.now(UTC)


class _KeyLocks:
    """One asyncio lock per key being written by this object, taken in sorted order (so
    two batches never wait for each other in a circle) and dropped when unused: writers of
    one object queue instead of racing each other into retries (the head check still
    serialises writers of other objects and processes)."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}  # stream -> [lock, users]

    @contextlib.asynccontextmanager
    async def hold(self, streams: Iterable[str]) -> AsyncIterator[None]:
        ordered = sorted(set(streams))
        entries = []
        for stream in ordered:
            entry = self._locks.setdefault(stream, [asyncio.Lock(), 0])
            entry[1] += 1
            entries.append((stream, entry))
        held: list[asyncio.Lock] = []
        try:
            for _, entry in entries:
                await entry[0].acquire()
                held.append(entry[0])
            yield
        finally:
            for lock in reversed(held):
                lock.release()
            for stream, entry in entries:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[stream]


class ItemLog:
    """Namespaced keys in one store. Use it from the event loop the store runs on; it holds
    no state of its own besides its settings, so any number of them (and of processes)
    can share a store."""

    def __init__(self, store: EventLog, *, refresh_slack: float = 0.01,
                 clock: Callable[[], datetime] = _now) -> None:
        """The items of ``store``. A TTL refresh is skipped while the stored expiry is
        within ``refresh_slack`` x TTL of the refreshed one (0: refresh at every read).
        ``clock`` gives the current time (tests move it)."""
        if not isinstance(store, EventLog):
            raise ValidationError("store", f"must be an immagent Store, got "
                                  f"{type(store).__name__}", None)
        if isinstance(refresh_slack, bool) or not isinstance(refresh_slack, int | float) \
                or not 0 <= refresh_slack < 1:
            raise ValidationError("refresh_slack", f"must be a number from 0 to below 1, "
                                  f"got {refresh_slack!r}", refresh_slack)
        self.store = store
        self.refresh_slack = float(refresh_slack)
        self._clock = clock
        self._writing = _KeyLocks()
        # Each key as this object last wrote or read it: the starting point of its next
        # write, which saves the read before it. Never trusted: the write expects it to be
        # the key's newest state (Head), and reads it again when it is not.
        self._known: OrderedDict[str, _Current | None] = OrderedDict()
        #: What this object's writes cost: transactions committed, attempts that lost the
        #: race to another writer (and were read and planned again), states written.
        self.stats = {"commits": 0, "retries": 0, "states": 0}

    # -- reads ------------------------------------------------------------------------------

    async def get(self, namespace: Sequence[str], key: str, *,
                  refresh: bool = False) -> StoredItem | None:
        """The current value of ``key`` in ``namespace``, or None (never put, deleted, or
        expired); ``refresh`` renews a TTL's expiry."""
        (found,) = await self.get_many([(namespace, key)], refresh=refresh)
        return found

    async def get_many(self, keys: Sequence[tuple[Sequence[str], str]], *,
                       refresh: bool = False) -> list[StoredItem | None]:
        """``get`` of each (namespace, key), in order: the heads in one primary-key query
        and the values in one batched read; refreshes in one commit."""
        wanted = [(kv.check_namespace(f"keys[{i}].namespace", ns),
                   kv.check_key(f"keys[{i}].key", key))
                  for i, (ns, key) in enumerate(_pairs(keys))]
        heads = await self._heads({kv.item_stream(ns, key): (ns, key) for ns, key in wanted})
        now = self._clock()
        live = {s: c for s, c in heads.items() if _visible(c, now)}
        items = dict(zip(live, await self._items(list(live.values())), strict=True))
        if refresh:
            items.update(await self._refresh(list(items.values()), live, now))
        return [items.get(kv.item_stream(ns, key)) for ns, key in wanted]

    async def search(self, prefix: Sequence[str], *, filter: Mapping[str, Any] | None = None,
                     limit: int = 10, offset: int = 0,
                     refresh: bool = False) -> list[StoredItem]:
        """Current items under namespace ``prefix`` (``()``: all) whose value matches
        ``filter`` (see ``matches``), most recently put first, ``offset`` skipped, at most
        ``limit``; ``refresh`` renews the TTLs of those returned."""
        prefix = kv.check_namespace("namespace_prefix", prefix, empty=True)
        _check_filter(filter)
        limit = _check_count("limit", limit)
        offset = _check_count("offset", offset)
        now = self._clock()
        visible = [c for c in await self._under(prefix) if _visible(c, now)]
        visible.sort(key=lambda c: (c.body.updated, c.row.seq), reverse=True)
        want = offset + limit
        found: list[StoredItem] = []
        chunk = want if not filter else _CHUNK
        for start in range(0, len(visible), max(chunk, 1)):
            if len(found) >= want:
                break
            batch = await self._items(visible[start:start + max(chunk, 1)])
            found += [i for i in batch if not filter or matches(i.value, filter)]
        page = found[offset:want]
        if refresh and page:
            renewed = await self._refresh(page, {c.row.stream: c for c in visible}, now)
            page = [renewed.get(kv.item_stream(i.namespace, i.key), i) for i in page]
        return page

    async def list_namespaces(self, *, prefix: Sequence[str] | None = None,
                              suffix: Sequence[str] | None = None,
                              max_depth: int | None = None, limit: int = 100, offset: int = 0,
                              match: Sequence[tuple[str, Sequence[str]]] = ()
                              ) -> list[tuple[str, ...]]:
        """Namespaces holding at least one current item, sorted, that start with ``prefix``
        and end with ``suffix`` (label by label; ``"*"`` matches any one label) and meet
        every ``("prefix" | "suffix", labels)`` of ``match`` too, cut to ``max_depth``
        labels, ``offset`` skipped, at most ``limit``."""
        conditions = [("prefix", prefix), ("suffix", suffix), *_conditions(match)]
        patterns = [(kind, _check_pattern(kind, labels)) for kind, labels in conditions
                    if labels is not None]
        if max_depth is not None:
            max_depth = _check_count("max_depth", max_depth, low=1)
        limit = _check_count("limit", limit)
        offset = _check_count("offset", offset)
        # The longest run of fixed labels any prefix starts with narrows the scan.
        fixed = max((p[:p.index("*")] if "*" in p else p for kind, p in patterns
                     if kind == "prefix"), key=len, default=())
        now = self._clock()
        found: set[tuple[str, ...]] = set()
        for c in await self._under(fixed):
            if not _visible(c, now):
                continue
            namespace, _ = kv.parse_item_stream(c.row.stream)
            if all(_match(namespace, p, kind) for kind, p in patterns):
                found.add(namespace if max_depth is None else namespace[:max_depth])
        return sorted(found)[offset:offset + limit]

    async def history(self, namespace: Sequence[str], key: str, *, limit: int = 100,
                      before_seq: int | None = None) -> list[ItemVersion]:
        """The stored states of ``key``, newest first, at most ``limit``; pass the last
        one's ``seq`` as ``before_seq`` for the next page. Deletes and refreshes included."""
        stream = kv.item_stream(kv.check_namespace("namespace", namespace),
                                kv.check_key("key", key))
        rows = await self.store.stream_states(_KIND, stream, after_seq=before_seq,
                                              limit=limit)
        bodies = [_decode(r) for r in rows]
        values = await self._values([r.refs[0] for r in rows if r.refs])
        versions = []
        for row, body in zip(rows, bodies, strict=True):
            change: Literal["put", "refresh", "delete"] = (
                "delete" if not row.refs
                else "refresh" if body.updated < kv.micros(row.created_at) else "put")
            versions.append(ItemVersion(
                change=change, state_id=row.id, parent_id=row.parent_id, seq=row.seq,
                at=row.created_at, value=_copy(values[row.refs[0]]) if row.refs else None,
                ttl=body.ttl, expires_at=kv.expires_at(body), digest=row.digest))
        return versions

    # -- writes -----------------------------------------------------------------------------

    async def put(self, namespace: Sequence[str], key: str, value: Mapping[str, Any] | None,
                  *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (None deletes it), with a TTL in minutes or none."""
        await self.put_many([Put(kv.check_namespace("namespace", namespace), key, value,
                                 ttl)])

    async def put_many(self, puts: Sequence[Put]) -> None:
        """Apply puts and deletes in one transaction (the last one of a key wins). A delete
        of a key that is not there writes nothing."""
        await self.put_checked([self.check_puts(puts)])

    def check_puts(self, puts: Sequence[Put]) -> CheckedPuts:
        """``puts`` validated (ValidationError naming ``puts[i]`` and the field), the puts
        of one key collapsed to the last one (a batch's puts of a key: the last wins), for
        ``put_checked``. Nothing is read or written."""
        last: dict[str, _Change] = {}
        for i, put in enumerate(_puts(puts)):
            ns = kv.check_namespace(f"puts[{i}].namespace", put.namespace)
            key = kv.check_key(f"puts[{i}].key", put.key)
            value = None if put.value is None else _value(f"puts[{i}].value", put.value)
            ttl = _check_ttl(f"puts[{i}].ttl", put.ttl)
            stream = kv.item_stream(ns, key)
            if len(stream.encode("utf-8")) > MAX_STREAM_BYTES:
                raise ValidationError(f"puts[{i}].key", f"the namespace and key are longer "
                                      f"than {MAX_STREAM_BYTES} UTF-8 bytes together (they "
                                      "name an indexed stream)", None)
            last.pop(stream, None)  # re-inserted: the batch's order is its last puts' order
            last[stream] = _Change(ns, key, value, ttl)
        return CheckedPuts(last)

    async def put_checked(self, batches: Sequence[CheckedPuts]) -> None:
        """Write several batches of puts (from ``check_puts``) in one transaction, as if
        one after the other: each batch's put of a key is a state of its own, the child of
        the one before (so writers merged into one transaction lose nothing, and every put
        stays in the key's history). A delete of a key that is not there writes nothing."""
        chains: dict[str, list[_Change]] = {}
        for batch in batches:
            if not isinstance(batch, CheckedPuts):
                raise ValidationError("batches", "must hold what check_puts returns", None)
            for stream, change in batch.changes.items():
                chain = chains.pop(stream, [])  # re-inserted: ordered by last puts
                chains[stream] = [*chain, change]
        if not chains:
            return

        def plan(current: Mapping[str, _Current | None], now: datetime) -> _Plan:
            made = _Plan([], [], [], [])
            at = kv.micros(now)
            for stream, chain in chains.items():
                before = current[stream]
                alive = before is not None and _visible(before, now)
                created = before.body.created if alive and before is not None else None
                steps: list[tuple[tuple[Digest, ...], kv.ItemBody]] = []
                for change in chain:
                    if change.value is None:
                        if alive:  # a delete of nothing writes nothing
                            steps.append(((), kv.ItemBody(updated=at)))
                        alive, created = False, None
                        continue
                    created = at if created is None else created
                    steps.append(((change.value.digest,), kv.ItemBody(
                        updated=at, created=created, ttl=change.ttl,
                        expires=_expiry(at, change.ttl))))
                    made.assets.append(change.value)
                    alive = True
                if steps:
                    ns, key = chain[0].namespace, chain[0].key
                    _add(made, ns, key, before, steps, now)
            return made

        await self._write({s: (c[0].namespace, c[0].key) for s, c in chains.items()}, plan)

    async def _refresh(self, items: Sequence[StoredItem], current: Mapping[str, _Current],
                       now: datetime) -> dict[str, StoredItem]:
        """Renew the expiry of ``items`` that have a TTL (skipped while the stored expiry
        is within the slack of the new one); returns them as refreshed. A key another
        writer changed meanwhile is left as that writer made it."""
        due: dict[str, StoredItem] = {}
        for item in items:
            if item.ttl is None or item.expires_at is None:
                continue
            renewed = now + timedelta(minutes=item.ttl)
            slack = timedelta(minutes=item.ttl * self.refresh_slack)
            if item.expires_at < renewed - slack:
                due[kv.item_stream(item.namespace, item.key)] = item
        if not due:
            return {}
        seen = {s: current[s].version for s in due}

        def plan(latest: Mapping[str, _Current | None], at: datetime) -> _Plan:
            made = _Plan([], [], [], [])
            for stream, item in due.items():
                newest = latest[stream]
                if newest is None or newest.version != seen[stream] \
                        or not _visible(newest, at):
                    continue  # changed or gone since it was read: not ours to refresh
                body = msgspec.structs.replace(
                    newest.body, expires=_expiry(kv.micros(at), newest.body.ttl))
                _add(made, item.namespace, item.key, newest, [(newest.row.refs, body)], at)
            return made

        written = await self._write({s: (i.namespace, i.key) for s, i in due.items()}, plan,
                                    known={s: current[s] for s in due}, at=now)
        return {s: due[s]._replace(expires_at=kv.expires_at(item_body(row)),
                                   state_id=row.id, digest=row.digest)
                for s, row in written.items()}

    async def _write(self, keys: _Keys,
                     plan: Callable[[Mapping[str, _Current | None], datetime], _Plan], *,
                     known: Mapping[str, _Current | None] | None = None,
                     at: datetime | None = None) -> dict[str, StateRow]:
        """Commit what ``plan`` makes of the current state of ``keys`` (by stream),
        re-reading it and planning again while another writer got there first. Returns the
        item states written, by stream."""
        async with self._writing.hold(keys):
            return await self._attempts(keys, plan, known, at)

    async def _attempts(self, keys: _Keys,
                        plan: Callable[[Mapping[str, _Current | None], datetime], _Plan],
                        known: Mapping[str, _Current | None] | None,
                        at: datetime | None) -> dict[str, StateRow]:
        if known is not None:
            current = dict(known)
        else:
            remembered = {s: self._known[s] for s in keys if s in self._known}
            missing = {s: k for s, k in keys.items() if s not in remembered}
            # A key this object does not know and that has no head is taken to have
            # never been written (the usual case: a new key) instead of probed one by
            # one: the commit's head check finds the others (deleted keys), and the retry
            # below reads them.
            current = {**remembered,
                       **(await self._current(missing, guess=True) if missing else {})}
        for attempt in range(_MAX_ATTEMPTS):
            now = at if at is not None and attempt == 0 else self._clock()
            made = plan(current, now)
            if not made.rows:
                return {}
            try:
                await self.store.commit(made.assets, made.rows, heads=made.heads,
                                        replace=made.replace)
            except (StaleStreamError, ConflictError):
                self.stats["retries"] += 1
                # Another writer moved a key on (or, once in 2**70, an id collided): read
                # again, from the item states themselves, after a short jittered pause
                # that spreads competing processes.
                await asyncio.sleep(random.random() * min(0.05, 0.001 * (attempt + 1)))
                # Heads first (one query, the others probed); from the second retry on,
                # every key's newest item state itself, in case a head lags behind it.
                current = await self._current(keys, probe=attempt > 0)
                continue
            self.stats["commits"] += 1
            self.stats["states"] += len(made.rows)
            written = {r.stream: r for r in made.rows if r.kind == _KIND}
            heads = {r.stream: r for r in made.rows if r.kind == _HEAD}
            for stream in keys:
                row = written.get(stream)
                self._remember(stream, current[stream] if row is None else _Current(
                    heads.get(stream, row), _decode(row), row.id))
            return written
        raise StaleStreamError(_KIND, next(iter(keys)))

    def _remember(self, stream: str, current: _Current | None) -> None:
        self._known[stream] = current
        self._known.move_to_end(stream)
        while len(self._known) > _KNOWN:
            self._known.popitem(last=False)

    # -- TTL sweep, audits ------------------------------------------------------------------

    async def sweep_expired(self) -> int:
        """Delete every state of each key whose head has expired (its whole history: a
        TTL says when the item goes away); returns how many keys. ``Store.gc()`` then
        reclaims the values nothing else holds. A key put or refreshed meanwhile keeps its
        newer state (the last deletion expects the newest state it saw)."""
        now = self._clock()
        swept = 0
        for c in await self._under(()):
            if _visible(c, now):
                continue
            versions: list[UUID] = []
            after: int | None = None
            while True:  # oldest first, so the newest one is last
                page = await self.store.stream_states(_KIND, c.row.stream, after_seq=after,
                                                      limit=_PAGE, newest_first=False)
                versions += [r.id for r in page]
                if len(page) < _PAGE:
                    break
                after = page[-1].seq
            if not versions or versions[-1] != c.version:
                continue  # written to since the scan: its head decides again later
            # The history of a life that expired goes whatever happens next; the newest
            # state and the head only if no writer moved the key on meanwhile.
            older = versions[:-1]
            for start in range(0, len(older), 10_000):
                await self.store.delete_states(older[start:start + 10_000])
            try:
                await self.store.commit([], [], heads=[Head(_KIND, c.row.stream, c.version)],
                                        replace=[c.version, c.row.id])
            except StaleStreamError:
                continue
            swept += 1
        if swept:
            log.info("swept %d expired item(s)", swept)
        return swept

    async def states(self, prefix: Sequence[str] = ()) -> list[StateRow]:
        """Every stored item state (every version) and head of the keys under namespace
        ``prefix``."""
        prefix = kv.check_namespace("namespace_prefix", prefix, empty=True)
        return [*await self._scan(_KIND, prefix), *await self._scan(_HEAD, prefix)]

    async def export(self, path: str | os.PathLike[str], prefix: Sequence[str] = (),
                     key: str | None = None) -> BundleInfo:
        """Write an audit bundle of every state (the whole history, and the heads) of the
        keys under namespace ``prefix`` (or of the one ``key`` in namespace ``prefix``) and
        the values they hold; ``immagent.verify_bundle`` checks it offline."""
        prefix = kv.check_namespace("namespace_prefix", prefix, empty=key is None)
        rows = await self.states(prefix)
        if key is not None:
            stream = kv.item_stream(prefix, kv.check_key("key", key))
            rows = [r for r in rows if r.stream == stream]
        if not rows:
            raise ValidationError("namespace_prefix", "no item states are stored there",
                                  None)
        return await self.store.export_states([r.id for r in rows], path)

    # -- internals --------------------------------------------------------------------------

    async def _heads(self, keys: _Keys) -> dict[str, _Current]:
        """The heads of ``keys`` (by stream) that exist: one primary-key query."""
        ids = {kv.head_state_id(ns, key): stream for stream, (ns, key) in keys.items()}
        rows = await self.store.get_states(list(ids)) if ids else []
        return {r.stream: _Current(r, _decode(r), r.parent_id or r.id) for r in rows
                if r.kind == _HEAD and ids.get(r.id) == r.stream and r.parent_id is not None}

    async def _current(self, keys: _Keys, *, probe: bool = False,
                       guess: bool = False) -> dict[str, _Current | None]:
        """Each key's current state: its head, or (no head, or ``probe``) its newest item
        state, one index probe each (concurrently); with ``guess``, a key without a head
        is taken to have none (not probed: for a write, whose head check verifies it)."""
        found: dict[str, _Current | None] = {} if probe else dict(await self._heads(keys))
        if guess:
            return {s: found.get(s) for s in keys}
        rest = [s for s in keys if s not in found]
        pages = await asyncio.gather(*(self.store.stream_states(_KIND, s, limit=1)
                                       for s in rest))
        for stream, page in zip(rest, pages, strict=True):
            found[stream] = _Current(page[0], _decode(page[0]), page[0].id) if page else None
        return found

    async def _scan(self, kind: int, prefix: tuple[str, ...]) -> list[StateRow]:
        """Every state of ``kind`` under ``prefix``: a keyset scan over its id range (the
        whole kind for the empty prefix), rows of colliding namespaces left out."""
        bounds = kv.prefix_range(prefix)
        low, high = bounds if bounds is not None else (None, None)
        rows: list[StateRow] = []
        after, size = low, _FIRST_PAGE
        while True:
            page = await self.store.scan_states(kind, after=after, limit=size)
            inside = [r for r in page if high is None or r.id < high]
            rows += [r for r in inside if _under(r.stream, prefix)]
            if len(inside) < len(page) or len(page) < size:
                return rows
            after, size = page[-1].id, min(size * 4, _PAGE)

    async def _under(self, prefix: tuple[str, ...]) -> list[_Current]:
        """The head of every key under ``prefix``."""
        return [_Current(r, _decode(r), r.parent_id or r.id)
                for r in await self._scan(_HEAD, prefix)]

    async def _items(self, current: Sequence[_Current]) -> list[StoredItem]:
        """The items these (visible) states hold, values read in one batch."""
        values = await self._values([c.row.refs[0] for c in current])
        items = []
        for c in current:
            namespace, key = kv.parse_item_stream(c.row.stream)
            created = c.body.created if c.body.created is not None else c.body.updated
            items.append(StoredItem(
                namespace=namespace, key=key, value=_copy(values[c.row.refs[0]]),
                created_at=kv.from_micros(created), updated_at=kv.from_micros(c.body.updated),
                ttl=c.body.ttl, expires_at=kv.expires_at(c.body), state_id=c.version,
                # A head repeats its item state's content: the item state's digest.
                digest=stream_digest(_KIND, c.row.stream, c.row.refs, c.row.body)))
        return items

    async def _values(self, digests: Sequence[Digest]) -> dict[Digest, Item]:
        if not digests:
            return {}
        unique = list(dict.fromkeys(digests))
        found = await self.store.get_assets(unique, Item, "item value")
        return dict(zip(unique, found, strict=True))


# -- pure helpers -------------------------------------------------------------------------


def _decode(row: StateRow) -> kv.ItemBody:
    """The body of a verified item state or head (IntegrityError for another kind)."""
    if row.kind not in (_KIND, _HEAD):
        raise IntegrityError(f"state {row.id} is not an item state (kind {row.kind})")
    try:
        return item_body(row)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise IntegrityError(f"item state {row.id} cannot be decoded: {e}") from e


def _visible(current: _Current, now: datetime) -> bool:
    """A key is there while its newest state holds a value that has not expired."""
    expires = current.body.expires
    return bool(current.row.refs) and (expires is None or kv.micros(now) < expires)


def _expiry(at: int, ttl: float | None) -> int | None:
    return None if ttl is None else at + round(ttl * 60_000_000)


def _row(kind: int, state_id: UUID, stream: str, parent: UUID | None,
         refs: tuple[Digest, ...], data: bytes, at: datetime) -> StateRow:
    return StateRow(id=state_id, parent_id=parent, kind=kind, stream=stream, refs=refs,
                    body=data, digest=stream_digest(kind, stream, refs, data), created_at=at)


def _add(made: _Plan, namespace: tuple[str, ...], key: str, before: _Current | None,
         steps: Sequence[tuple[tuple[Digest, ...], kv.ItemBody]], at: datetime) -> None:
    """Plan changes of a key, each (refs, body) a new item state: the first a child of the
    key's newest (which must still be the newest when it commits), each next one a child
    of the one before; the head replaced by the last (removed when that is a delete)."""
    stream = kv.item_stream(namespace, key)
    parent = None if before is None else before.version
    made.heads.append(Head(_KIND, stream, parent))
    head_id = kv.head_state_id(namespace, key)
    made.replace.append(head_id)
    for refs, body in steps:
        data = msgspec.msgpack.encode(body)
        version = _row(_KIND, kv.item_state_id(namespace), stream, parent, refs, data, at)
        made.rows.append(version)
        parent = version.id
    if refs:
        made.rows.append(_row(_HEAD, head_id, stream, version.id, refs, data, at))


def _copy(item: Item) -> dict[str, Any]:
    """A fresh copy of a stored value, so a caller that edits it never edits the cache."""
    value: dict[str, Any] = _values.decode(item.body)
    return value


def _value(field: str, value: object) -> Item:
    """The asset of a value to put: a JSON object (a mapping with str keys), checked as
    JSON carries it (ValidationError naming the field otherwise)."""
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a mapping with str keys, got "
                              f"{type(value).__name__}", None)
    return Item.of(check_json_value(field, dict(value)))


def _check_ttl(field: str, ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 1e12:
        raise ValidationError(field, f"must be None or minutes > 0, got {ttl!r}", ttl)
    return float(ttl)


def _check_count(field: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**62:
        raise ValidationError(field, f"must be an int >= {low}, got {value!r}", value)
    return value


def _pairs(keys: object) -> list[tuple[Sequence[str], str]]:
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise ValidationError("keys", "must be a sequence of (namespace, key) pairs", None)
    pairs = []
    for i, pair in enumerate(keys):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValidationError(f"keys[{i}]", "must be a (namespace, key) pair", None)
        pairs.append((pair[0], pair[1]))
    return pairs


def _puts(puts: object) -> list[Put]:
    if isinstance(puts, str) or not isinstance(puts, Sequence):
        raise ValidationError("puts", "must be a sequence of Put", None)
    for i, put in enumerate(puts):
        if not isinstance(put, Put):
            raise ValidationError(f"puts[{i}]", f"must be a Put, got {type(put).__name__}",
                                  None)
    return list(puts)


def _under(stream: str, prefix: tuple[str, ...]) -> bool:
    """Whether an item stream's namespace starts with ``prefix`` (label by label)."""
    try:
        namespace, _ = kv.parse_item_stream(stream)
    except ValueError:
        return False  # verified rows never get here; a foreign stream is not ours
    return namespace[:len(prefix)] == prefix


def _check_pattern(field: str, pattern: object) -> tuple[str, ...]:
    """A namespace pattern: labels, or ``"*"`` for any one label."""
    if pattern is None:
        return ()
    if isinstance(pattern, str) or not isinstance(pattern, Sequence):
        raise ValidationError(field, "must be a tuple of labels", None)
    kv.check_namespace(field, ["x" if p == "*" else p for p in pattern], empty=True)
    return tuple(pattern)


def _match(namespace: tuple[str, ...], pattern: tuple[str, ...], kind: str) -> bool:
    """Whether ``namespace`` starts (``kind`` "prefix") or ends ("suffix") with
    ``pattern``, label by label, ``"*"`` matching any one label."""
    if len(pattern) > len(namespace):
        return False
    labels = namespace[:len(pattern)] if kind == "prefix" else \
        namespace[len(namespace) - len(pattern):]
    return all(p in ("*", label) for label, p in zip(labels, pattern, strict=True))


def _conditions(match: object) -> list[tuple[str, Sequence[str]]]:
    if isinstance(match, str) or not isinstance(match, Sequence):
        raise ValidationError("match", "must be a sequence of (kind, labels) pairs", None)
    found = []
    for i, pair in enumerate(match):
        if not isinstance(pair, tuple | list) or len(pair) != 2 \
                or pair[0] not in ("prefix", "suffix"):
            raise ValidationError(f"match[{i}]", "must be a (\"prefix\" | \"suffix\", "
                                  "labels) pair", None)
        found.append((pair[0], pair[1]))
    return found


# -- filters ---------------------------------------------------------------------------------


def _check_filter(filter: object) -> None:
    """A search filter: a mapping of field names to a value (equality) or to a mapping of
    operators (``FILTER_OPERATORS``) to values (ValidationError naming the field)."""
    if filter is None:
        return
    if not isinstance(filter, Mapping):
        raise ValidationError("filter", f"must be a mapping, got {type(filter).__name__}",
                              None)
    for name, wanted in filter.items():
        if not isinstance(name, str):
            raise ValidationError("filter", f"field names must be str, got "
                                  f"{type(name).__name__}", None)
        if _is_operators(wanted):
            for op in wanted:
                if op not in FILTER_OPERATORS:
                    raise ValidationError(f"filter.{name}", f"unsupported operator {op!r} "
                                          f"(use one of {sorted(FILTER_OPERATORS)})", op)


def _is_operators(wanted: object) -> bool:
    return isinstance(wanted, Mapping) and any(isinstance(k, str) and k.startswith("$")
                                               for k in wanted)


def matches(value: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether a value matches a search filter, as JSON compares values (PostgreSQL's
    ``jsonb`` equality): ``{"field": x}`` (or ``{"$eq": x}``) holds when the field is
    present and equal to ``x`` (``1`` equals ``1.0``; ``true`` equals only ``true``; lists
    and objects compare whole); ``$ne`` when it is present and not equal; ``$gt``,
    ``$gte``, ``$lt``, ``$lte`` when both are numbers, or both strings (compared by code
    point), and the order holds. A missing field matches nothing. A field name is a key
    of the value or, if there is no such key, a dotted path into nested objects."""
    if not filter:
        return True
    for name, wanted in filter.items():
        found, have = _field(value, name)
        if not found:
            return False
        tests = wanted.items() if _is_operators(wanted) else (("$eq", wanted),)
        if not all(_holds(have, op, operand) for op, operand in tests):
            return False
    return True


def _field(value: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """(found, the value) of a filter's field: the key ``name`` itself, else, when it
    holds dots, the nested field they lead to (``"user.level"``)."""
    if name in value:
        return True, value[name]
    if "." not in name:
        return False, None
    here: Any = value
    for part in name.split("."):
        if not isinstance(here, Mapping) or part not in here:
            return False, None
        here = here[part]
    return True, here


def _holds(have: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return _json_equal(have, operand)
    if op == "$ne":
        return not _json_equal(have, operand)
    if _is_number(have) and _is_number(operand):
        pair: tuple[Any, Any] = (have, operand)
    elif isinstance(have, str) and isinstance(operand, str):
        pair = (have, operand)
    else:
        return False
    return bool(_ORDER[op](*pair))


_ORDER: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _json_equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return False

