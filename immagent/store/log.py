"""EventLog: the content-addressed log every client writes to, and the rules over its backend.

The log knows no client. Its API (``commit``, ``get_assets``, ``get_chain``, ``get_states``,
``stream_states``, ``scan_states``, ``count_states``, ``state_lineage``, ``delete_states``)
is what every client uses: the agent book (``immagent.clients.agents``, whose ``Store`` is
this log plus the agent API of 0.1.2), the checkpoint client behind the LangGraph saver, the
session log behind the OpenAI Agents SDK session. Audits (gc, verify, stats, bundles) run
over every client's rows alike.

Rules live here, once, above a backend that only reports facts: the schema policy, "what a
write points at must exist", "a state is written only if it verifies", the content rules of
``store.rules``, cycle-safe lineage walks, lineage deletion, and gc's checks (in
``immagent.audit``). Reads go cache first; every row read from a backend passes the one
verify-on-read (``rows.load_row`` / ``records.load_state``) before it is decoded or cached.
The log never runs a model.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Self, TypeVar, overload
from uuid import UUID

import msgspec

from immagent import chains, redaction
from immagent.assets import (
    NODE_KINDS,
    Asset,
    ConversationNode,
    Digest,
    Entry,
    Item,
    Kind,
    Message,
    SystemPrompt,
    Tools,
    Value,
    decode_asset,
    encode,
    own_elements,
)
from immagent.attestations import MAX_NOTE_BYTES
from immagent.audit import bundle, diff, gc, proofs, redact, retain, verify
from immagent.audit.keys import SigningKey
from immagent.chain_rows import read_chain, read_context
from immagent.chain_rows import read_node as chain_node
from immagent.exceptions import (
    AssetNotFoundError,
    BundleError,
    ConflictError,
    IntegrityError,
    MessageNotFoundError,
    RedactedError,
    SchemaMissingError,
    SchemaVersionError,
    StaleStreamError,
    StoreClosedError,
    ValidationError,
)
from immagent.ids import uuid7
from immagent.records import (
    STATE_KINDS,
    StateRow,
    attached_kinds,
    load_state,
    stream_digest,
)
from immagent.redaction import MAX_REASON_BYTES, REDACTABLE
from immagent.retention import (
    POLICY_STREAM,
    RETAINABLE,
    Policy,
    decode_policy,
    encode_body,
    parse_duration,
)
from immagent.rows import StoredAsset, load_row, stored
from immagent.store import dsn as dsns
from immagent.store import rules
from immagent.store.backend import SCHEMA_VERSION, Backend, Head
from immagent.store.cache import AssetCache
from immagent.store.compression import Compression
from immagent.store.stats import StoreStats
from immagent.validate import (
    MAX_NAME_BYTES,
    check_count,
    check_digest,
    check_digests,
    check_fan_out,
    check_flag,
    check_key,
    check_kind,
    check_name,
    check_number,
    check_sequence,
    check_text,
    check_uuid,
    check_uuids,
)

__all__ = ["MAX_PAGE", "EventLog", "check_limit", "storable"]

log = logging.getLogger("immagent")

A = TypeVar("A", bound=Asset)

#: Page size of internal scans (stats).
_PAGE = 1000
#: Largest page a caller may ask for.
MAX_PAGE = 10_000
#: Asset digests remembered as stored on their own (see EventLog._standalone).
_STANDALONE = 100_000


class EventLog:
    """The states and assets of every client over PostgreSQL, SQLite or memory. Open with
    ``await EventLog.connect(dsn)`` (or ``Store.connect``: the same log with the agent API);
    use as ``async with``. Safe to share between tasks of one event loop."""

    def __init__(self, backend: Backend, *, name: str = "the store",
                 cache_entries: int = 20_000) -> None:
        """A log over an open backend (``connect`` makes both); ``name`` is how messages
        refer to it (never with a password)."""
        self._backend = backend
        self._name = name
        self._cache = AssetCache(recent=cache_entries)
        # Digests this store wrote or read as assets of their own (a LangGraph write's
        # values): a node listing one names it out of line instead of holding a second copy.
        self._standalone: OrderedDict[Digest, None] = OrderedDict()
        self._compression = Compression(backend)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        dsn: str | os.PathLike[str],
        *,
        min_size: int = 2,
        max_size: int = 10,
        max_inactive_connection_lifetime: float = 300.0,
        cache_entries: int = 20_000,
        replicas: Sequence[str] = (),
    ) -> Self:
        """Open a store: ``postgresql://…`` for PostgreSQL, ``sqlite:///path.db`` (or a bare
        path ending in ``.db``) for the embedded SQLite backend, ``memory://`` for a
        throwaway one. The pool sizes apply to PostgreSQL; SQLite uses ``max_size`` reader
        connections beside its one writer. ``cache_entries`` decoded assets stay in memory
        after their last use (assets never change, so a cached one is never stale).
        ``replicas``: DSNs of PostgreSQL hot standbys of ``dsn`` that serve reads (see
        ``immagent.store.replicas``); each gets pools of the same sizes."""
        target = dsns.parse(dsn)
        check_count("cache_entries", cache_entries, 0, 10_000_000)
        check_count("min_size", min_size, 0, 1000)
        check_count("max_size", max_size, 1, 1000)
        if min_size > max_size:
            raise ValidationError(
                "max_size", f"need 0 <= min_size <= max_size, max_size >= 1 "
                f"(got min_size={min_size!r}, max_size={max_size!r})", max_size)
        # A pool's idle timer: NaN or a negative value would break psycopg_pool's scheduler.
        lifetime = check_number("max_inactive_connection_lifetime",
                                max_inactive_connection_lifetime, 0.0, 86_400 * 366,
                                above=True)
        if replicas and target.scheme != "postgresql":
            raise ValidationError("replicas", "read replicas need a postgresql:// primary",
                                  None)
        backend: Backend
        if target.scheme == "postgresql":
            from immagent.store.replicas import open_backend

            backend = await open_backend(
                target.dsn, replicas, min_size=min_size, max_size=max_size,
                max_inactive_connection_lifetime=lifetime,
            )
        elif target.scheme == "sqlite":
            from immagent.store.sqlite import SQLiteBackend

            assert target.path is not None
            backend = await SQLiteBackend.open(target.path, readers=max(1, min(max_size, 64)))
            return cls(backend, name=target.path, cache_entries=cache_entries)
        else:
            from immagent.store.memory import MemoryBackend

            backend = MemoryBackend()
        return cls(backend, name=dsns.redact(target.dsn), cache_entries=cache_entries)

    @classmethod
    def over(cls, conn: object, *, cache_entries: int = 20_000) -> Self:
        """A log over a caller's open psycopg ``AsyncConnectionPool`` or ``AsyncConnection``
        (bring your own pool, as LangGraph's ``AsyncPostgresSaver(conn)``): used on the
        loop it belongs to, never closed by ``close()`` (its owner closes it). Call
        ``init_schema()`` once, as after ``connect``."""
        check_count("cache_entries", cache_entries, 0, 10_000_000)
        from immagent.store.postgres import PostgresBackend

        return cls(PostgresBackend.lend(conn), name="a lent PostgreSQL connection",
                   cache_entries=cache_entries)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    async def close(self) -> None:
        """Close the connection pool; idempotent."""
        if not self._closed:
            self._closed = True
            await self._backend.close()

    async def ping(self) -> bool:
        """True when the database answers."""
        return not self._closed and await self._backend.ping()

    async def init_schema(self) -> None:
        """Create immagent's tables if missing, or migrate an older layout to this one
        (idempotent, safe from several processes at once); refuses an unknown version."""
        backend = self._open()
        for _ in range(5):  # another process may migrate between our read and our lock
            found = await backend.schema_version()
            if found == SCHEMA_VERSION:
                return
            _check_known(found, self._name)
            if await backend.migrate(found) == found:
                if found is not None:
                    log.info("migrated the store from schema version %d to %d", found,
                             SCHEMA_VERSION)
                return
        raise SchemaVersionError("the schema version kept changing during init_schema()")

    async def check_schema(self) -> None:
        """Raise SchemaMissingError (no tables yet) or SchemaVersionError (another version)
        unless the database holds this immagent's schema; never changes the database."""
        found = await self._open().schema_version()
        if found is None:
            raise SchemaMissingError(f"no immagent schema in {self._name}; call "
                                     "`await store.init_schema()`")
        if found != SCHEMA_VERSION:
            _check_known(found, self._name)
            raise SchemaVersionError(f"{self._name} has schema version {found}; "
                                     "`await store.init_schema()` migrates it")

    def clear_cache(self) -> None:
        """Forget every cached asset (only useful to measure or to free memory)."""
        self._cache.clear()

    def _open(self) -> Backend:
        if self._closed:
            raise StoreClosedError("the store is closed")
        return self._backend

    # -- the event-store API: what every client of the store uses --------------------------

    async def commit(self, assets: Sequence[Asset], states: Sequence[StateRow] = (), *,
                     heads: Sequence[Head] = (), replace: Sequence[UUID] = ()) -> None:
        """Write ``assets`` and ``states`` in one transaction (assets already stored are
        shared, not written again). Everything they point at must be in the batch or
        already stored (AssetNotFoundError otherwise); each state must verify; a state id
        already stored with other content is a ConflictError unless it is in ``replace``;
        each of ``heads`` must still be its stream's newest state (StaleStreamError: re-read
        and retry). The states with ids in ``replace`` (absent ones are fine; what
        ``delete_states`` refuses is refused) are deleted in the same transaction, before
        ``states`` are inserted: a replaced id written again keeps its place in its stream
        (the replaced row's seq), so replacing is an upsert that never reorders a stream.
        Nothing is written on error."""
        assets = check_sequence("assets", assets)
        rows = [storable(f"assets[{i}]", a) for i, a in enumerate(assets)]
        await self._write(rows, check_sequence("states", states), assets,
                          check_sequence("heads", heads), check_uuids("replace", replace))

    async def _write(self, rows: Sequence[StoredAsset], states: Sequence[StateRow],
                     decoded: Sequence[Asset] = (), heads: Sequence[Head] = (),
                     replace: Sequence[UUID] = (), *, legacy: bool = False,
                     require_states: Sequence[UUID] = ()) -> None:
        """The one write path: rows proved storable (or read from a verified bundle),
        states checked, chain nodes checked against their parents (counters, accumulator
        root, span hash; ``legacy``: a node written before schema 3 may lack the last two)
        and laid out with their elements inline, every outside reference required to exist,
        replaced states allowed to be deleted, in one transaction."""
        backend = self._open()
        for i, row in enumerate(rows):
            check_fan_out(f"assets[{i}].refs", len(row.refs))
        for i, state in enumerate(states):
            if not isinstance(state, StateRow):
                raise ValidationError(f"states[{i}]", "must be a StateRow", state)
            check_fan_out(f"states[{i}].refs", len(state.refs))
            load_state(state)  # a client bug must never store a row that fails its check
            rules.check_state_content(state, f"states[{i}]")
            if state.parent_id == state.id:
                raise ValidationError(f"states[{i}].parent_id", "a state cannot be its own "
                                      "parent", state.parent_id)
        for i, head in enumerate(heads):
            if not isinstance(head, Head):
                raise ValidationError(f"heads[{i}]", "must be a Head", head)
            check_kind(f"heads[{i}].kind", head.kind)
            check_key(f"heads[{i}].stream", head.stream)
            if head.state_id is not None:
                check_uuid(f"heads[{i}].state_id", head.state_id)
        if replace:
            await self._check_deletable("replace", replace)
        others = {r.digest: r for r in rows if r.kind not in NODE_KINDS}
        node_rows = list({r.digest: r for r in rows if r.kind in NODE_KINDS}.values())
        state_refs = {d for s in states for d in s.refs}
        nodes, listed, outside = await self._layout(node_rows, others, decoded, state_refs,
                                                    legacy)
        # An element held inline by the batch's nodes is not written again as an asset,
        # unless a state of the batch points at it or a node keeps it out of line.
        assets = [r for d, r in others.items() if d not in listed]
        inside = set(others) | {n.digest for n in node_rows}
        # What the batch points at: states' refs, nodes' parents and out-of-line elements,
        # and the refs of the assets written (a message's tool schemas).
        wanted = (state_refs | outside | {d for r in assets for d in r.refs}) - inside
        # In digest order: concurrent writers of shared assets then lock them in one order
        # (PostgreSQL deadlocked on two writes listing them in other orders).
        encoded = await self._compression.encode(sorted(assets, key=_row_digest))
        # Redactable content the batch stores: refused if it was redacted (checked under
        # the write's lock, which a redaction takes exclusively).
        # A bundle's tombstones (``chains.Tombstone`` entries as bodies) store no content.
        stoned = {d for d, r in others.items() if chains.is_marker(r.body)}
        refuse = sorted(({d for r in node_rows if NODE_KINDS[r.kind].element_kind
                          in REDACTABLE for d in r.refs[1:]}
                         | {d for d, r in others.items() if r.kind in REDACTABLE}) - stoned)
        result = await backend.write(encoded, list(states), sorted(wanted), list(heads),
                                     list(dict.fromkeys(replace)), nodes=nodes,
                                     require_states=list(require_states), refuse=refuse)
        if result.redacted:
            raise RedactedError(result.redacted[0])
        if result.missing:
            raise AssetNotFoundError("referenced asset", result.missing[0])
        if result.missing_states:
            raise AssetNotFoundError("state", result.missing_states[0])
        if result.conflicts:
            raise ConflictError(result.conflicts[0])
        if result.stale:
            raise StaleStreamError(result.stale[0].kind, result.stale[0].stream)
        self._forget(replace)
        self._known_assets(r.digest for r in assets)
        self._cache.put_written(decoded)
        await self._compression.after_write()

    def _known_assets(self, digests: Iterable[Digest]) -> None:
        """Remember digests stored as assets of their own (bounded: an LRU)."""
        known = self._standalone
        for digest in digests:
            known[digest] = None
            known.move_to_end(digest)
        while len(known) > _STANDALONE:
            known.popitem(last=False)

    async def _layout(self, node_rows: Sequence[StoredAsset],
                      others: Mapping[Digest, StoredAsset], decoded: Sequence[Asset],
                      state_refs: set[Digest], legacy: bool
                      ) -> tuple[list[chains.NewNode], set[Digest], set[Digest]]:
        """The node rows to write, parents first: each checked against its parent's context
        and holding its elements' bodies inline where they are known and small. Returns
        them, the element digests held inline only, and what they need stored outside the
        batch (their parents and out-of-line elements)."""
        if not node_rows:
            return [], set(), set()
        objects = {a.digest: a for a in decoded}
        contexts: dict[Digest, chains.ChainContext] = {}
        out: list[chains.NewNode] = []
        records: list[bytes] = []
        inline_only: set[Digest] = set()
        kept_out: set[Digest] = set()
        outside: set[Digest] = set()
        batch_nodes = {r.digest for r in node_rows}
        linked: set[Digest] = set()  # elements with refs of their own: kept out of line
        for row in _parents_first(node_rows):
            wrong = next((d for d in row.refs[1:] if d in batch_nodes), None)
            if wrong is not None:
                element = _kind_name(NODE_KINDS[row.kind].element_kind)
                raise ValidationError(f"node {row.digest.hex()}", f"lists {wrong.hex()}, a "
                                      f"node, where a {element} must be", None)
            found = objects.get(row.digest)
            node = found if isinstance(found, ConversationNode) else decode_asset(
                row.kind, row.body, row.refs)
            assert isinstance(node, ConversationNode)
            elements = row.refs[1:]
            bodies = await self._element_bodies(node, elements, others, linked)
            if node.parent is None:
                context = node.context()
                assert context is not None  # a root (decode_asset refuses elements without parent)
            else:
                parent = contexts.get(node.parent)
                if parent is None:
                    parent = await self._context(node.parent)
                    outside.add(node.parent)
                context = _checked_child(node, parent, elements, bodies, legacy)
            contexts[row.digest] = context
            entries: list[bytes] = []
            refs: list[Digest] = []
            for digest, body in zip(elements, bodies, strict=True):
                # Inline: small bodies (not pointed at by a state, not stored alone, no refs
                # of their own), and a bundle's tombstones (no content to keep elsewhere).
                if chains.is_marker(body) or (
                        len(body) <= chains.INLINE_MAX and digest not in state_refs
                        and digest not in self._standalone and digest not in linked):
                    entries.append(body)
                    inline_only.add(digest)
                else:
                    entries.append(chains.OUT_OF_LINE)
                    refs.append(digest)
                    kept_out.add(digest)
                    if digest not in others:
                        outside.add(digest)
            records.append(chains.record(row.body, entries))
            peaks = (chains.join_peaks(context.peaks) if context.depth % chains.SPAN == 0
                     else None)
            out.append(chains.NewNode(row.digest, row.kind, node.parent, tuple(refs), b"", 0,
                                      peaks, len(elements)))
        encoded = await self._compression.encode_records(records)
        nodes = [n._replace(codec=c, body=b) for n, (c, b) in zip(out, encoded, strict=True)]
        return nodes, inline_only - kept_out, outside

    async def _element_bodies(self, node: ConversationNode, elements: Sequence[Digest],
                              others: Mapping[Digest, StoredAsset],
                              linked: set[Digest]) -> list[bytes]:
        """The canonical bodies of a node's elements: from the batch, the node itself (built
        by ``extend``), the cache, or the store (AssetNotFoundError if stored nowhere).
        Each must be of the chain's element kind (ValidationError otherwise): a node row
        holds its elements' bodies, read back as that kind. Elements with refs of their
        own (a message naming its tool schemas) are added to ``linked``: they stay assets
        of their own, where gc and audits follow their refs."""
        own = {e.digest: e for e in own_elements(node) or ()}
        found: dict[Digest, tuple[int, bytes, bool]] = {}
        unknown: list[Digest] = []
        for digest in elements:
            row = others.get(digest)
            asset = own.get(digest) or self._cache.get(digest)
            if row is not None:
                found[digest] = (row.kind, row.body, bool(row.refs))
            elif asset is not None:
                found[digest] = (int(asset.kind), asset.body, bool(asset.refs()))
            else:
                unknown.append(digest)
        if unknown:
            for asset in await self.get_assets(list(dict.fromkeys(unknown)),
                                               what="chain element"):
                found[asset.digest] = (int(asset.kind), asset.body, bool(asset.refs()))
        for digest in elements:
            if found[digest][0] != node.element_kind:
                raise ValidationError(
                    f"node {node.digest.hex()}", f"lists {digest.hex()}, a "
                    f"{_kind_name(found[digest][0])}, where a "
                    f"{_kind_name(node.element_kind)} must be", None)
            if found[digest][2]:
                linked.add(digest)
        return [found[d][1] for d in elements]

    async def _context(self, digest: Digest) -> chains.ChainContext:
        """The verified context of a stored node (cache first; AssetNotFoundError if it is
        not stored)."""
        cached = self._cache.get(digest)
        context = cached.context() if isinstance(cached, ConversationNode) else None
        if context is None:
            node = await self._read_node(digest)
            if node is None:
                raise AssetNotFoundError("referenced asset", digest)
            context = node.context()
            assert context is not None
        return context

    async def _read_node(self, digest: Digest) -> ConversationNode | None:
        """A stored node with its context (read from at most SPAN + 1 rows), or None."""
        rows, leaves = await self._open().get_chain(digest, context=True)
        if not rows:
            return None
        node_type = NODE_KINDS.get(rows[-1].kind)
        if node_type is None:
            raise IntegrityError(f"node {digest.hex()} has kind {rows[-1].kind}, no node kind "
                                 "(run store.verify())")
        dictionaries = await self._compression.ready([*rows, *leaves.values()])
        node = read_context(rows, digest, node_type, leaves, dictionaries)
        self._cache.put(node)
        return node

    @overload
    async def get_assets(self, digests: Sequence[Digest], kind: None = None,
                         what: str = "asset") -> list[Asset]: ...

    @overload
    async def get_assets(self, digests: Sequence[Digest], kind: type[A],
                         what: str = "asset") -> list[A]: ...

    async def get_assets(self, digests: Sequence[Digest], kind: type[A] | None = None,
                         what: str = "asset") -> list[A] | list[Asset]:
        """Assets by digest, in the given order: cache first, the rest in one batched,
        digest-checked fetch. AssetNotFoundError (naming ``what``) for an absent one;
        IntegrityError when one is not of ``kind``."""
        digests = check_digests("digests", digests)
        if kind is not None and not (isinstance(kind, type)
                                     and issubclass(kind, SystemPrompt | Message
                                                    | ConversationNode | Value | Item
                                                    | Entry | Tools)):
            raise ValidationError("kind", "must be None or an asset class", None)
        if not isinstance(what, str):
            raise ValidationError("what", "must be a str", None)
        # Held locally, not re-read from the cache: a batch larger than the cache's LRU
        # would evict its own first entries before they are returned.
        found: dict[Digest, Asset] = {}
        missing: list[Digest] = []
        for d in dict.fromkeys(digests):
            cached = self._cache.get(d)
            if cached is None:
                missing.append(d)
            else:
                found[d] = cached
        if missing:
            rows = await self._open().get_assets(missing)
            dictionaries = await self._compression.ready(rows.values())
            for d in missing:
                if d not in rows:
                    node = await self._read_node(d)
                    if node is None:
                        if what == "message":
                            raise MessageNotFoundError(d)
                        raise AssetNotFoundError(what, d)
                    found[d] = node
                    continue
                found[d] = load_row(rows[d], dictionaries)
                self._cache.put(found[d])
            self._known_assets(rows)
        if kind is not None:
            for d in digests:
                if not isinstance(found[d], kind):
                    raise IntegrityError(f"asset {d.hex()} is a "
                                         f"{Kind(found[d].kind).name.lower()}, not a {what}")
        return [found[d] for d in digests]

    async def get_chain(self, head: Digest, node_kind: int = Kind.NODE) -> tuple[Asset, ...]:
        """The elements of the hash chain ending at node ``head`` (a node of ``node_kind``),
        oldest first: one chain query plus the elements, every row verified, each node's
        kind, element kinds and counters checked against the chain itself."""
        head = check_digest("head", head)
        node_type = NODE_KINDS.get(check_kind("node_kind", node_kind))
        if node_type is None:
            raise ValidationError("node_kind", f"{node_kind} is not a node kind", node_kind)
        cached = self._cache.history(head)
        if cached is not None:
            # Chains are homogeneous (checked when read), so the first element tells.
            if cached and cached[0].kind != node_type.element_kind:
                raise _wrong_chain(head, node_type)
            return cached
        rows, leaves = await self._open().get_chain(head)
        if not rows or rows[-1].kind != node_kind:
            await self._chain_break(head, head, node_type)
        if rows[0].depth != 0:  # the lineage stops before its root
            assert rows[0].parent is not None
            await self._chain_break(head, rows[0].parent, node_type)
        dictionaries = await self._compression.ready([*rows, *leaves.values()])
        read = read_chain(rows, head, node_type, leaves, dictionaries)
        # The chain is cached as one run: every other state of its lineage (their heads are
        # its nodes) then reads its history from memory, sharing this one.
        self._cache.put_chain(read.digests, read.ends, read.elements, read.sizes)
        self._cache.put(read.head)
        self._cache.put_history(head, read.elements)
        return read.elements

    async def _chain_break(self, head: Digest, digest: Digest,
                           node_type: type[ConversationNode]) -> None:
        """Why a chain read found no lineage down to its root: a node absent, or not a node
        of the expected kind (a reference of the wrong kind). Always raises."""
        found = await self._open().kinds([digest])
        if digest not in found:
            raise AssetNotFoundError(_kind_name(node_type.kind).replace("_", " "), digest)
        if digest == head:
            raise _wrong_chain(head, node_type)
        raise IntegrityError(f"chain {head.hex()} links to {digest.hex()}, a "
                             f"{_kind_name(found[digest])}, where a "
                             f"{_kind_name(node_type.kind)} must be")

    async def read_nodes(self, nodes: Sequence[Digest]
                         ) -> list[tuple[ConversationNode, tuple[Asset, ...]]]:
        """Chain nodes and the elements each adds to its parent (not its history), in
        order, each verified alone: one row per node, what a listing (``immagent log``,
        message counts) needs. AssetNotFoundError for one that is not stored. A node to
        extend comes from ``get_assets`` (which reads what appending needs)."""
        digests = check_digests("nodes", nodes)
        found: dict[Digest, tuple[ConversationNode, tuple[Asset, ...]]] = {}
        missing: list[Digest] = []
        for digest in dict.fromkeys(digests):
            cached = self._cache.get(digest)
            own = own_elements(cached) if isinstance(cached, ConversationNode) else None
            if own is not None:
                assert isinstance(cached, ConversationNode)
                found[digest] = (cached, own)
            else:
                missing.append(digest)
        if missing:
            rows, leaves = await self._open().get_nodes(missing)
            dictionaries = await self._compression.ready([*rows.values(), *leaves.values()])
            absent = [d for d in missing if d not in rows]
            if absent:
                kinds = await self._open().kinds(absent)
                if absent[0] in kinds:
                    raise IntegrityError(f"{absent[0].hex()} is a "
                                         f"{_kind_name(kinds[absent[0]])}, not a chain node")
                raise AssetNotFoundError("chain node", absent[0])
            for digest in missing:
                found[digest] = chain_node(rows[digest], leaves, dictionaries)
        return [found[d] for d in digests]

    async def node_elements(self, nodes: Sequence[Digest]) -> list[tuple[Asset, ...]]:
        """The elements each of these chain nodes adds to its parent, in order (see
        ``read_nodes``). Chain elements are stored in their nodes: this, ``get_chain`` and
        ``get_assets`` (for bodies larger than ``chains.INLINE_MAX``) read them."""
        return [own for _, own in await self.read_nodes(nodes)]

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]:
        """The stored states with these ids (absent ones left out), each verified."""
        wanted = check_uuids("ids", ids)
        return [load_state(r) for r in await self._open().get_states(wanted)]

    async def stream_states(self, kind: int, stream: str, *, after_seq: int | None = None,
                            limit: int = 100, newest_first: bool = True) -> list[StateRow]:
        """States of ``kind`` in ``stream``, in log order (newest first by default), a page
        at a time: pass the last row's ``seq`` as ``after_seq`` for the next page."""
        check_limit(limit)
        if after_seq is not None:
            check_count("after_seq", after_seq, 0, 2**63 - 1)
        rows = await self._open().stream_states(
            check_kind("kind", kind), check_key("stream", stream), after_seq=after_seq,
            limit=limit, newest_first=check_flag("newest_first", newest_first))
        return [load_state(r) for r in rows]

    async def scan_states(self, kind: int | None, *, after: UUID | None = None,
                          limit: int = 100, newest_first: bool = False,
                          contains: str | None = None) -> list[StateRow]:
        """States of ``kind`` (None: every kind) in id order, a page at a time (pass the
        last id as ``after``): keyset paging, so concurrent deletes never make a page skip
        rows. ``contains`` keeps those whose stream holds it, case-insensitively."""
        return [load_state(r) for r in await self._scan(kind, after, limit, newest_first,
                                                        contains)]

    async def _scan(self, kind: int | None, after: UUID | None, limit: int,
                    newest_first: bool, contains: str | None) -> list[StateRow]:
        check_limit(limit)
        return await self._open().scan_states(
            None if kind is None else check_kind("kind", kind),
            after=None if after is None else check_uuid("after", after), limit=limit,
            newest_first=check_flag("newest_first", newest_first),
            contains=None if contains is None else check_key("contains", contains))

    async def count_states(self, kind: int, *, stream: str | None = None,
                           contains: str | None = None) -> int:
        """How many states of ``kind`` are stored (in ``stream``, or whose stream holds
        ``contains``, case-insensitively)."""
        return await self._open().count_states(
            check_kind("kind", kind),
            stream=None if stream is None else check_key("stream", stream),
            contains=None if contains is None else check_key("contains", contains))

    async def stream_heads(self, kind: int, *, after: str | None = None,
                           limit: int = 100) -> list[StateRow]:
        """The newest state of each stream of ``kind`` (an agent name's, a thread's, a
        session's), a page of streams at a time in the database's order of stream names:
        pass the last row's ``stream`` as ``after`` for the next page. One index probe per
        stream; a stream's older states are never read."""
        check_limit(limit)
        rows = await self._open().stream_heads(
            check_kind("kind", kind),
            after=None if after is None else check_key("after", after), limit=limit)
        return [load_state(r) for r in rows]

    async def state_lineage(self, state_id: UUID, limit: int | None = None) -> list[StateRow]:
        """The state and its stored ancestors, newest first, at most ``limit``; stops at a
        deleted parent. A parent cycle (only damage or a crafted import makes one) is an
        IntegrityError, never a hang."""
        return [load_state(r) for r in await self._line(state_id, limit)]

    async def _line(self, state_id: UUID, limit: int | None) -> list[StateRow]:
        """``state_lineage``'s rows, ordered and cycle-checked but not yet verified."""
        state_id = check_uuid("state_id", state_id)
        if limit is not None:
            check_limit(limit, bound=2**62)
        rows = await self._open().lineage(state_id, limit)
        by_id = {r.id: r for r in rows}
        if limit is not None and len(by_id) < len(rows):
            raise _cycle(state_id)
        line: list[StateRow] = []
        current = by_id.get(state_id)
        seen: set[UUID] = set()
        while current is not None and (limit is None or len(line) < limit):
            if current.id in seen:
                raise _cycle(state_id)
            seen.add(current.id)
            line.append(current)
            current = None if current.parent_id is None else by_id.get(current.parent_id)
        return line

    async def delete_states(self, ids: Sequence[UUID]) -> int:
        """Delete state rows (never assets: gc reclaims what nothing reaches any more);
        returns how many existed. The store's own compression state is refused."""
        backend = self._open()
        wanted = check_uuids("ids", ids)
        await self._check_deletable("ids", wanted)
        deleted = await backend.delete_states(wanted)
        self._forget(deleted)
        return len(deleted)

    async def _check_deletable(self, field: str, ids: Sequence[UUID]) -> None:
        """The rule for every deletion a caller names (``delete_states``, ``commit``'s
        ``replace``): the store's own compression state is refused (ValidationError)."""
        _refuse_own(await self._open().get_states(ids), field)

    async def delete_state_lineage(self, state_id: UUID, *,
                                   dry_run: bool = False) -> list[UUID]:
        """Delete the state ``state_id`` and then each ancestor that no other stored state
        descends from, in one transaction; returns the deleted ids, ``state_id`` first
        (empty when it is not stored). With ``dry_run`` that transaction is rolled back:
        the ids it would delete, nothing deleted.

        A state is *live* while its row exists. The walk stops at the first ancestor that
        has another child row (or is already gone); an attestation about an ancestor is not
        a child that keeps it (gc removes it with its subject). Children of a deleted state
        keep their ``parent_id``; their lineage walks stop there. Assets stay until gc().
        """
        rows = await self._line(state_id, None)
        _refuse_own(rows)
        deleted = await self._open().delete_states([r.id for r in rows],
                                                    stop_at_shared=True,
                                                    attached=attached_kinds(),
                                                    dry_run=check_flag("dry_run", dry_run))
        if dry_run:
            return deleted
        self._forget(deleted)
        return deleted

    def _forget(self, ids: Sequence[UUID]) -> None:
        """Called with the ids of deleted states: a subclass that keeps live objects of
        states drops them here, so loading a deleted id never returns one."""

    # -- audits: gc, verify, stats, bundles ----------------------------------------------

    async def gc(self, *, dry_run: bool = False) -> gc.GCResult:
        """Remove every asset that no stored state can reach; safe while other tasks or
        processes write (see docs/gc.md). Aborts with IntegrityError, deleting
        nothing, if a row it would mark from is damaged or something reachable is missing.
        ``dry_run``: the same sweep, rolled back; the result says what it would remove."""
        result = await gc.collect(self._open(), dry_run=check_flag("dry_run", dry_run))
        if dry_run:
            return result
        log.info("gc removed %d assets (%d bytes)", result.assets_removed, result.bytes_freed)
        return result

    async def verify(self, state: UUID | str | None = None, *,
                     progress: Callable[[int], None] | None = None) -> verify.VerifyReport:
        """Re-hash the stored bytes of every asset and state (or those the state with id
        ``state`` reaches), resolve every reference; never raises on a problem found, it
        lists it. ``progress`` gets the number of assets checked so far."""
        agent_id = None if state is None else check_uuid("agent", state)
        if progress is not None and not callable(progress):
            raise ValidationError("progress", "must be a callable taking an int", progress)
        report = await verify.verify_backend(self._open().audits(), agent_id,
                                             progress=progress,
                                             dictionaries=await self._compression.load())
        log.info("verify: %d assets, %d problems", report.assets_checked, report.problems)
        return report

    async def stats(self, page_size: int = _PAGE) -> StoreStats:
        """Sizes of what is stored and of what a copy-per-state layout would store.

        Reads every state once (keyset-paged, every client's kind) and each distinct asset
        a page of states pins once (prompts, head nodes, channel values: a node counts the
        content bytes of its whole chain, so no history is read); states are counted in
        the same walk.
        """
        check_limit(page_size)
        backend = self._open()
        audits = backend.audits()
        by_kind = await audits.asset_stats()
        logical = 0
        counts: dict[int, int] = {}
        after: UUID | None = None
        while page := await self._scan(None, after, page_size, False, None):
            after = page[-1].id
            for row in page:
                counts[row.kind] = counts.get(row.kind, 0) + 1
            # The store's own compression state pins dictionaries, not content. A node
            # counts the content bytes of its chain (its own row: no history read).
            content = [r for r in page if r.kind != Kind.COMPRESSION]
            nodes: set[Digest] = set()
            others: set[Digest] = set()
            for r in content:
                for d, k in zip(r.refs, STATE_KINDS[r.kind].ref_kinds(r), strict=False):
                    (nodes if k in NODE_KINDS else others).add(d)
            sizes: dict[Digest, int] = {}
            for asset in await self.get_assets(sorted(others)):
                sizes[asset.digest] = len(asset.body)
            for node, _ in await self.read_nodes(sorted(nodes)):
                sizes[node.digest] = node.size
            logical += sum(sizes[d] for r in content for d in r.refs)
        states = {_kind_name(k): n for k, n in sorted(counts.items())}
        return StoreStats(
            agents=counts.get(int(Kind.AGENT_STATE), 0),
            assets_by_kind={_kind_name(k): v for k, v in sorted(by_kind.items())},
            payload_bytes=sum(b for _, b in by_kind.values()),
            disk_bytes=await audits.storage_bytes(),
            logical_bytes=logical,
            states_by_kind=states,
        )

    async def prove(self, state: UUID | str, *,
                    element: int | Digest, ref: int | None = None,
                    include_body: bool = True, attested: bool = True) -> bytes:
        """An inclusion proof (``immagent.audit.proofs``) that one element of a state's
        chain is in the state: ``element`` its position (0 = the first message) or its
        digest (the first occurrence), ``ref`` which of the state's refs is the chain (the
        first chain by default: an agent's conversation, a session's ``main`` branch), the
        element's body unless ``include_body`` is False, and the state's attestations
        (the oldest ``proofs.MAX_SIGNATURES``) unless ``attested`` is False. O(log n)
        digests; check it with ``immagent.verify_proof``. Reading the chain costs what a
        read of it does."""
        state_id = check_uuid("state", state)
        rows = await self.get_states([state_id])
        if not rows:
            raise ValidationError("state", f"no state {state_id} is stored", str(state_id))
        row = rows[0]
        kinds = STATE_KINDS[row.kind].ref_kinds(row)
        chains_at = [i for i, k in enumerate(kinds) if k in NODE_KINDS]
        if ref is None:
            if not chains_at:
                raise ValidationError("state", f"state {state_id} pins no chain", None)
            ref = chains_at[0]
        elif isinstance(ref, bool) or not isinstance(ref, int) or ref not in chains_at:
            raise ValidationError("ref", f"must be the index of one of the state's chains "
                                  f"({chains_at}), got {ref!r}", ref)
        head = row.refs[ref]
        history = await self.get_chain(head, kinds[ref])
        (node,) = await self.get_assets([head], ConversationNode, "chain node")
        if node.acc is None:
            raise ValidationError("state", f"the head node of state {state_id} was written "
                                  "before schema 3 and carries no accumulator root: only "
                                  "states written since can be proved (append to it)",
                                  None)
        # A redacted element reads as a marker of its own digest: its node lists the erased
        # one, which the accumulator covers (and its proof carries no body).
        gone = [redaction.redacted(e) for e in history]
        leaves = [e.digest if g is None else g.digest for e, g in zip(history, gone,
                                                                       strict=True)]
        if isinstance(element, bytes):
            digest = check_digest("element", element)
            if digest not in leaves:
                raise ValidationError("element", f"{digest.hex()} is not in state {state_id}",
                                      digest.hex())
            index = leaves.index(digest)
        elif isinstance(element, bool) or not isinstance(element, int):
            raise ValidationError("element", "must be a position (int) or a digest (bytes)",
                                  element)
        elif not 0 <= element < len(leaves):
            raise ValidationError("element", f"state {state_id} holds {len(leaves)} "
                                  f"elements, there is no element {element}", element)
        else:
            index = element
        assert node.parent is not None  # a chain with elements has a parent node
        proof = proofs.build(row, ref, int(node.kind), node.parent, node.messages,
                             node.length, node.size, node.span, leaves, index,
                             history[index].body if check_flag("include_body", include_body)
                             and gone[index] is None else None,
                             [a.body for a in await self.attestations(state_id)]
                             if check_flag("attested", attested) else ())
        return proof.encode()

    async def export_lineage(self, state_id: UUID | str, path: str | os.PathLike[str], *,
                             sign: Sequence[SigningKey] = ()) -> bundle.BundleInfo | None:
        """Write an audit bundle of the state ``state_id`` (its stored lineage, the
        attestations about them and every asset they reach) to ``path``, atomically,
        signed by each key of ``sign``; verify it anywhere with ``immagent.verify_bundle``.
        None, writing nothing, when the state is not stored."""
        state_id = check_uuid("agent", state_id)
        lineage = await self.state_lineage(state_id)
        if not lineage:
            return None
        info = await bundle.export_bundle(self._open().audits(), lineage, path,
                                          await self._compression.load(),
                                          attached=await self._attached_to(lineage),
                                          sign=sign)
        log.info("exported %s: %d states, %d assets to %s", state_id, len(info.agents),
                 info.assets, info.path)
        return info

    async def export_states(self, ids: Sequence[UUID], path: str | os.PathLike[str], *,
                            sign: Sequence[SigningKey] = ()) -> bundle.BundleInfo:
        """Write an audit bundle of any set of stored states (e.g. a LangGraph thread's
        checkpoints and writes), the attestations about them and every asset they reach
        to ``path``, atomically, newest state first, signed by each key of ``sign``; verify
        it with ``immagent.verify_bundle``."""
        wanted = [check_uuid("ids", i) for i in dict.fromkeys(ids)]
        rows = await self.get_states(wanted)
        missing = set(wanted) - {r.id for r in rows}
        if not rows or missing:
            raise ValidationError("ids", f"not stored: {sorted(missing or set(wanted))[0]}",
                                  None)
        subjects = [r for r in rows if not STATE_KINDS[r.kind].attached]
        if not subjects:
            raise ValidationError("ids", "names only attached states (attestations); export "
                                  "the states they are about", None)
        subjects.sort(key=lambda r: r.seq, reverse=True)
        info = await bundle.export_bundle(self._open().audits(), subjects, path,
                                          await self._compression.load(), lineage=False,
                                          attached=await self._attached_to(subjects),
                                          sign=sign)
        log.info("exported %d states, %d assets to %s", len(rows), info.assets, info.path)
        return info

    async def _attached_to(self, states: Sequence[StateRow]) -> list[StateRow]:
        """The stored states attached to any of ``states`` (attestations), oldest first:
        one index probe per state, or one scan of the attached kinds when that reads fewer
        rows."""
        ids = {s.id for s in states}
        found: list[StateRow] = []
        for kind in attached_kinds():
            if await self.count_states(kind) <= 4 * len(ids):
                after: UUID | None = None
                while page := await self.scan_states(kind, after=after, limit=MAX_PAGE):
                    found += [r for r in page if r.parent_id in ids]
                    after = page[-1].id
            else:
                for state in states:
                    found += await self._stream(kind, str(state.id))
        return sorted(found, key=lambda r: r.seq)

    async def _stream(self, kind: int, stream: str) -> list[StateRow]:
        """Every state of ``kind`` in ``stream``, oldest first (paged)."""
        rows: list[StateRow] = []
        after: int | None = None
        while page := await self.stream_states(kind, stream, after_seq=after, limit=MAX_PAGE,
                                               newest_first=False):
            rows += page
            after = page[-1].seq
            if len(page) < MAX_PAGE:
                break
        return rows

    # -- diff -----------------------------------------------------------------------------

    async def diff(self, left: UUID | str, right: UUID | str) -> diff.StateDiff:
        """What separates two stored states of one kind (any client's): their newest common
        ancestor, what each side added to each of its chains since their newest common
        node, and what else changed. It reads what the two sides diverged by, never a
        whole history (``immagent.audit.diff``)."""
        return await diff.diff_states(self, check_uuid("left", left),
                                      check_uuid("right", right))

    # -- attestations ---------------------------------------------------------------------

    async def attest(self, state_id: UUID | str, key: SigningKey, note: str = ""
                     ) -> StateRow:
        """Sign the stored state ``state_id`` with ``key`` (a reviewer co-signs after the
        fact) and keep the signature as an attestation: a state of kind ATTESTATION about
        it (``immagent.attestations``), which lives while its subject does and travels in
        its bundles. ``note`` says what the signer vouches for. Returns the new row;
        AssetNotFoundError naming the state when it is not stored."""
        from immagent.attestations import Statement, Subject

        subject_id = check_uuid("state", state_id)
        if not isinstance(key, SigningKey):
            raise ValidationError("key", "must be a SigningKey (immagent.audit.keys."
                                  "load_signing_key)", None)
        if not isinstance(note, str):
            raise ValidationError("note", "must be a str", None)
        if note:
            check_text("note", note, max_bytes=MAX_NOTE_BYTES)
        rows = await self.get_states([subject_id])
        if not rows:
            raise AssetNotFoundError("state", subject_id)
        (subject,) = rows
        if STATE_KINDS[subject.kind].attached:
            raise ValidationError("state", f"state {subject_id} is itself an attestation; "
                                  "attest the state it is about", str(subject_id))
        signed = key.sign(Statement(purpose="attestation", note=note, subjects=(
            Subject(subject.id, subject.kind, subject.digest),)))
        body = encode(signed)
        stream = str(subject.id)
        row = StateRow(id=uuid7(), parent_id=subject.id, kind=int(Kind.ATTESTATION),
                       stream=stream, refs=(), body=body,
                       digest=stream_digest(Kind.ATTESTATION, stream, (), body),
                       created_at=datetime.now(UTC))
        await self._write([], [row])
        log.info("attested state %s with key %s", subject.id, key.public.id)
        return row

    async def attestations(self, state_id: UUID | str) -> list[StateRow]:
        """The attestations about the state ``state_id``, oldest first (verified rows;
        ``immagent.attestations.attestation_of`` reads one, ``audit.keys.verify_signed``
        checks its signature)."""
        return await self._stream(Kind.ATTESTATION, str(check_uuid("state", state_id)))

    async def import_states(self, path: str | os.PathLike[str]) -> bundle.BundleInfo:
        """Verify a bundle of any format and any client's states (a LangGraph thread's, a
        session's, …), then load its states and assets in one transaction (idempotent:
        present rows are skipped), with their ids and digests; returns what it held."""
        info, states, rows = await bundle.read(path)
        attached = set(info.attestations)
        # Compared, not trusted: a damaged row here is "different content" like any other.
        existing = {r.id: r for r in await self._open().get_states([s.id for s in states])}
        for s in states:
            have = existing.get(s.id)
            if have is not None and (have.digest != s.digest or have.parent_id != s.parent_id):
                raise bundle.conflict(info, s.id)
        await self._refuse_cycle(info, states)
        subjects = [s for s in states if s.id not in existing and s.id not in attached]
        try:
            # Oldest first, so the store's log order (seq) matches creation order; the
            # attached states (oldest first already) after the states they are about.
            await self._write(rows, [*reversed(subjects),
                                     *(s for s in states if s.id in attached
                                       and s.id not in existing)], legacy=True)
        except ConflictError as e:  # written meanwhile by someone else, differently
            raise bundle.conflict(info, e.state_id) from e
        log.info("imported bundle %s: head %s", os.fspath(path), info.head)
        return info

    async def _refuse_cycle(self, info: bundle.BundleInfo, states: Sequence[StateRow]) -> None:
        """Where a bundle's states name a parent it does not hold (the oldest state of a
        lineage, any state of a set), that parent may be stored; if its stored lineage
        leads back to a state of the bundle, importing would close a parent cycle (two
        bundles, each valid alone, can do that). A stored cycle refuses too. Not serialised
        with a concurrent import of the other half: the cycle-safe walks and verify()
        still catch what such a race would leave."""
        ids = {s.id for s in states}
        outside = dict.fromkeys(s.parent_id for s in states
                                if s.parent_id is not None and s.parent_id not in ids)
        for parent in outside:
            try:
                stored = await self.state_lineage(parent)
            except IntegrityError as e:
                raise BundleError(f"{info.path}: the stored lineage it would extend is "
                                  f"damaged: {e}") from e
            # The stored walk stops where a parent is not stored: at a bundle state, if any.
            closing = next((r for r in stored if r.id in ids or r.parent_id in ids), None)
            if closing is not None:
                raise BundleError(f"{info.path}: importing would close a parent cycle: "
                                  f"stored state {closing.id} (an ancestor of {parent}, "
                                  f"which a bundle state names as parent) names "
                                  f"{closing.parent_id} of the bundle as its parent; "
                                  "refusing to import")

    # -- retention and pins (immagent.retention; applied by audit/retain.py) ---------------

    async def apply_retention(self, policy: Policy | None = None, *, dry_run: bool = False,
                              gc: bool = True, now: datetime | None = None
                              ) -> retain.RetentionReport:
        """Delete the states ``policy`` (default: the stored one, ``set_retention_policy``)
        does not keep, then gc (unless ``gc`` is False), and report what went: states,
        their bytes, the assets gc removed. Pinned states, heads and what a head needs are
        always kept (see ``immagent.retention``). Safe while other tasks and processes
        write; a run killed midway leaves whole streams, applied or untouched. With
        ``dry_run`` every deletion is rolled back and the report says what would go,
        assets included. ``now`` (default: the clock) is what ages are measured from."""
        if policy is None:
            policy = await self.retention_policy()
            if policy is None:
                raise ValidationError("policy", "no policy given and none stored (see "
                                      "set_retention_policy)", None)
        elif not isinstance(policy, Policy):
            raise ValidationError("policy", f"must be a retention Policy, got "
                                  f"{type(policy).__name__}", None)
        policy.checked()
        dry = check_flag("dry_run", dry_run)
        if now is not None and (not isinstance(now, datetime) or now.tzinfo is None):
            raise ValidationError("now", "must be an aware datetime", None)
        report = await retain.apply(
            self._open(), policy, dry_run=dry, now=now,
            collect=self.gc if check_flag("gc", gc) and not dry else None)
        if report.states_deleted and not dry:
            await self._forget_gone()
        return report

    async def retain_periodically(self, interval: object, *, policy: Policy | None = None,
                                  on_report: Callable[[retain.RetentionReport], None]
                                  | None = None) -> None:
        """Apply retention (``policy``, default the stored one, read again at each run) every
        ``interval`` (seconds, a timedelta or text such as "1h") until cancelled: run it as
        ``asyncio.create_task(store.retain_periodically("1h"))``. A failed run is logged
        and the next one goes on."""
        seconds = parse_duration("interval", interval)
        if seconds <= 0:
            raise ValidationError("interval", "must be longer than 0 seconds", interval)
        await retain.run_periodically(lambda: self.apply_retention(policy), seconds,
                                      on_report=on_report)

    async def retention_policy(self) -> Policy | None:
        """The stored retention policy (the newest state of its stream), or None."""
        rows = await self.stream_states(Kind.RETENTION_POLICY, POLICY_STREAM, limit=1)
        return decode_policy(rows[0].body) if rows else None

    async def set_retention_policy(self, policy: Policy) -> None:
        """Store ``policy`` as the store's retention policy (a new state of its stream; the
        previous ones stay as its history). The last of concurrent calls wins."""
        if not isinstance(policy, Policy):
            raise ValidationError("policy", f"must be a retention Policy, got "
                                  f"{type(policy).__name__}", None)
        body = encode_body(policy.checked())
        for _ in range(100):
            newest = await self.stream_states(Kind.RETENTION_POLICY, POLICY_STREAM, limit=1)
            parent = newest[0].id if newest else None
            row = StateRow(id=uuid7(), parent_id=parent, kind=int(Kind.RETENTION_POLICY),
                           stream=POLICY_STREAM, refs=(), body=body,
                           digest=stream_digest(Kind.RETENTION_POLICY, POLICY_STREAM, (),
                                                body),
                           created_at=datetime.now(UTC))
            try:
                await self.commit([], [row], heads=[Head(Kind.RETENTION_POLICY,
                                                         POLICY_STREAM, parent)])
            except StaleStreamError:
                continue
            return
        raise StaleStreamError(Kind.RETENTION_POLICY, POLICY_STREAM)

    async def pin(self, state: UUID | str, *, tag: str | None = None,
                  note: str | None = None) -> UUID:
        """Pin the state ``state``: retention never deletes it, and its content stays even
        if the state is deleted by hand (the pin repeats its refs). A pin is a state of its
        own (kind PIN, its parent the pinned state); returns its id. Pinning again with the
        same tag returns the existing pin. AssetNotFoundError if the state is not stored
        (or is deleted by a retention run meanwhile)."""
        state_id = check_uuid("state", state)
        tag = None if tag is None else check_name("tag", tag)
        note = None if note is None else check_text("note", note, max_bytes=MAX_NAME_BYTES)
        rows = await self.get_states([state_id])
        if not rows:
            raise AssetNotFoundError("state", state_id)
        subject = rows[0]
        if subject.kind not in RETAINABLE:
            raise ValidationError("state", f"state {state_id} is a {_kind_name(subject.kind)}"
                                  ": only the states retention governs can be pinned",
                                  str(state_id))
        for existing in await self.pins(state_id):
            if existing.tag == tag:
                return existing.id
        row = retain.pin_row(subject, tag=tag, note=note, created_at=datetime.now(UTC))
        await self._write([], [row], require_states=[state_id])
        return row.id

    async def unpin(self, state: UUID | str, *, tag: str | None = None) -> int:
        """Remove the pins of ``state`` (only those with ``tag``, when given); returns how
        many. Its content then stays only while a state reaches it."""
        state_id = check_uuid("state", state)
        doomed = [p.id for p in await self.pins(state_id) if tag is None or p.tag == tag]
        return await self.delete_states(doomed) if doomed else 0

    async def pins(self, state: UUID | str | None = None) -> list[retain.Pin]:
        """The pins of ``state`` (one index probe), or every pin of the store, oldest
        first."""
        if state is not None:
            rows = await self.stream_states(Kind.PIN, str(check_uuid("state", state)),
                                            limit=MAX_PAGE, newest_first=False)
        else:
            rows = []
            after: UUID | None = None
            while page := await self.scan_states(Kind.PIN, after=after, limit=_PAGE):
                rows += page
                after = page[-1].id
            rows.sort(key=lambda r: r.seq)
        return [retain.Pin.of(r) for r in rows]

    # -- redaction ------------------------------------------------------------------------

    async def redact(self, message: Digest | str | None = None, *,
                     state: UUID | str | None = None, position: int | None = None,
                     reason: str = "", dry_run: bool = False) -> redact.RedactionReport:
        """Erase one message's content everywhere it is stored, keeping every digest true
        (``immagent.redaction``, docs/retention.md): by its digest (``message``: bytes or
        hex), or as the message at ``position`` (1-based, as ``immagent show`` numbers
        them) of the conversation of ``state``. Every node record that holds the body
        (in any lineage) gets a tombstone with its digest, ``reason`` and the time; an
        out-of-line copy is deleted; a REDACTION state records it, so a later write of the
        same content is refused (RedactedError). Reads then give a marker message
        (``redaction.marker``); ``verify`` lists it as redacted. One transaction, holding
        gc's lock. ``dry_run``: what it would do, nothing changed. MessageNotFoundError if
        the message is stored nowhere; a report with ``already`` if it was redacted
        before. Only messages can be redacted (ValidationError for another kind)."""
        backend = self._open()
        if not isinstance(reason, str) or "\x00" in reason or len(
                reason.encode("utf-8", "surrogatepass")) > MAX_REASON_BYTES:
            raise ValidationError("reason", "must be a str without NUL characters of at "
                                  f"most {MAX_REASON_BYTES} bytes", None)
        check_flag("dry_run", dry_run)
        if (message is None) == (state is None):
            raise ValidationError("message", "give either a message digest or a state "
                                  "and a position", None)
        if message is not None:
            if position is not None:
                raise ValidationError("position", "goes with state, not with a message "
                                      "digest", position)
            digest = check_digest("message", _from_hex(message) if isinstance(message, str)
                                  else message)
        else:
            assert state is not None
            digest = await self._message_at(check_uuid("state", state), position)
        kinds = await backend.kinds([digest])
        if digest in kinds and kinds[digest] not in REDACTABLE:
            raise ValidationError("message", f"{digest.hex()} is a "
                                  f"{_kind_name(kinds[digest])}: only messages can be "
                                  "redacted", digest.hex())
        report = await redact.run(backend, digest, reason, await self._compression.load(),
                                  dry_run=dry_run)
        if not (report.already or report.nodes or report.assets):
            raise MessageNotFoundError(digest)
        if not dry_run and not report.already:
            # Every cached history, node context and element may hold the body.
            self._cache.clear()
            self._standalone.pop(digest, None)
        return report

    async def _message_at(self, state_id: UUID, position: int | None) -> Digest:
        """The digest of the message at ``position`` (1-based) of ``state``'s conversation
        (the state's one ref to a conversation node)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 1:
            raise ValidationError("position", "must be a message number (1 or more)",
                                  position)
        rows = await self.get_states([state_id])
        if not rows:
            raise AssetNotFoundError("state", state_id)
        row = rows[0]
        heads = [d for d, k in zip(row.refs, STATE_KINDS[row.kind].ref_kinds(row),
                                   strict=True) if k == Kind.NODE]
        if len(heads) != 1:
            raise ValidationError("state", f"state {state_id} is a {_kind_name(row.kind)}, "
                                  "which has no conversation of messages", str(state_id))
        rows_, leaves = await self._open().get_chain(heads[0])
        if not rows_:
            raise AssetNotFoundError("conversation node", heads[0])
        dictionaries = await self._compression.ready([*rows_, *leaves.values()])
        read = read_chain(rows_, heads[0], ConversationNode, leaves, dictionaries)
        if position > len(read.elements):
            raise ValidationError("position", f"state {state_id} has "
                                  f"{len(read.elements)} message(s)", position)
        # The element's digest as its node lists it (a marker's own digest is not it).
        index = position - 1
        node = next(i for i, end in enumerate(read.ends) if end > index)
        start = read.ends[node - 1] if node else 0
        found = await self.read_nodes([read.digests[node]])
        return found[0][0].messages[index - start]

    async def redactions(self) -> list[StateRow]:
        """The REDACTION states of the store (one per redacted digest, its stream the
        digest in hex, its body ``redaction.RedactionNote``), oldest first."""
        rows: list[StateRow] = []
        after: UUID | None = None
        while page := await self.scan_states(Kind.REDACTION, after=after, limit=_PAGE):
            rows += page
            after = page[-1].id
        rows.sort(key=lambda r: r.seq)
        return rows

    async def _forget_gone(self) -> None:
        """After a retention run: a subclass that keeps live objects of states drops those
        whose rows are gone (the ids deleted are not listed: there may be millions)."""


def _from_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValidationError("message", "must be a digest in hex (64 characters)",
                              None) from None


def _check_known(found: int | None, where: str) -> None:
    if found is not None and not 1 <= found <= SCHEMA_VERSION:
        raise SchemaVersionError(
            f"database schema version {found} in {where} is not supported by this immagent "
            f"(it knows versions 1 to {SCHEMA_VERSION}); upgrade immagent or use another "
            "database")


def _refuse_own(states: Sequence[StateRow], field: str = "ids") -> None:
    """The compression state keeps the dictionaries stored bodies need, a redaction record
    keeps the erased content out of the store: never deleted."""
    for state in states:
        if state.kind == Kind.COMPRESSION:
            raise ValidationError(field, f"state {state.id} is the store's compression state "
                                  "(it keeps the dictionaries compressed bodies need); it "
                                  "cannot be deleted", str(state.id))
        if state.kind == Kind.REDACTION:
            raise ValidationError(field, f"state {state.id} records a redaction (it keeps "
                                  "the erased content from being stored again); it cannot "
                                  "be deleted", str(state.id))


def check_limit(limit: object, bound: int | None = MAX_PAGE) -> None:
    """A page size from 1 to ``bound`` (None: no upper bound); ValidationError naming
    ``limit`` otherwise."""
    if (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
            or (bound is not None and limit > bound)):
        shown = f"from 1 to {bound}" if bound is not None else ">= 1"
        raise ValidationError("limit", f"must be an int {shown}, got {limit!r}", limit)


def _cycle(state_id: UUID) -> IntegrityError:
    return IntegrityError(f"the lineage of state {state_id} is a cycle (a parent_id points "
                          "back into it): the store is damaged, run store.verify()")


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind_{kind}"


def _wrong_chain(head: Digest, node_type: type[ConversationNode]) -> IntegrityError:
    return IntegrityError(f"{head.hex()} is not the head of a chain of "
                          f"{_kind_name(node_type.element_kind)} assets")


def _parents_first(rows: Sequence[StoredAsset]) -> list[StoredAsset]:
    """Node rows ordered so that a node whose parent is in the batch comes after it."""
    by_digest = {r.digest: r for r in rows}
    done: set[Digest] = set()
    out: list[StoredAsset] = []
    for row in rows:
        line: list[StoredAsset] = []
        current: StoredAsset | None = row
        while current is not None and current.digest not in done:
            done.add(current.digest)
            line.append(current)
            current = by_digest.get(current.refs[0]) if current.refs else None
        out += reversed(line)
    return out


def _checked_child(node: ConversationNode, parent: chains.ChainContext,
                   elements: Sequence[Digest], bodies: Sequence[bytes],
                   legacy: bool) -> chains.ChainContext:
    """The context of ``node`` after proving it is the child of ``parent`` it claims to be:
    its counters, its accumulator root and (at a span depth) its span hash are what the
    chain gives (a node written before schema 3, ``legacy``, may lack the last two). A
    client bug must never store a node that later reads would refuse."""
    # A tombstone (from a bundle of a redacted chain) counts the bytes its body had; its
    # node's canonical record is unknown, and a span over a window holding one cannot be
    # recomputed: the node keeps the span it was written with (reads check that window
    # the slow way).
    sizes = [_tombstone_size(b) if chains.is_marker(b) else len(b) for b in bodies]
    length, size, acc, peaks, span = chains.advance(parent, elements, sizes)
    unknown = (parent.depth + 1) % chains.SPAN == 0 and any(not r for _, r in parent.window)
    field = f"node {node.digest.hex()}"
    if (node.length, node.size) != (length, size):
        raise ValidationError(field, f"claims {node.length} elements ({node.size} bytes), "
                              f"its chain holds {length} ({size})", None)
    for name, have, want in (("accumulator root", node.acc, acc), ("span hash", node.span,
                                                                    span)):
        if have != want and not (legacy and have is None) and not (
                unknown and name == "span hash"):
            raise ValidationError(field, f"its {name} is not the one its chain gives (build "
                                  "nodes with extend() on a node read through the store)",
                                  None)
    canonical = (b"" if any(map(chains.is_marker, bodies))
                 else chains.canonical_record(node.body, bodies))
    return chains.child_context(parent, node.digest, canonical, length, size, peaks)


def _tombstone_size(entry: bytes) -> int:
    """The body bytes a bundle's tombstone stands for (ValidationError if damaged)."""
    try:
        stone = chains.tombstone(entry)
        if stone is None:
            raise ValueError("not a tombstone")
        return redaction.tombstone_size(stone)
    except ValueError as e:
        raise ValidationError("tombstone", str(e), None) from None


_digest = operator.itemgetter(0)
_row_digest = operator.attrgetter("digest")
_codec = operator.itemgetter(4)
_body = operator.attrgetter("body")
_chain_from = itertools.chain.from_iterable


def storable(field: str, asset: object) -> StoredAsset:
    """The row of an asset a client wants written, proved to read back as that asset.

    msgspec does not type-check Struct construction, so e.g. a Message with a bad role
    would be hashed and committed, then fail every later read.
    """
    if not isinstance(asset, SystemPrompt | Message | ConversationNode | Value | Item | Entry
                      | Tools):
        raise ValidationError(field, f"must be an asset, got {type(asset).__name__}", None)
    if isinstance(asset, Message):  # before encoding: a cyclic call_config must not recurse
        rules.check_message(field, asset)
    try:
        row = stored(asset)
        if decode_asset(row.kind, row.body, row.refs) != asset:
            raise ValueError("it does not survive encoding unchanged")
    except (msgspec.DecodeError, msgspec.ValidationError, msgspec.EncodeError, ValueError,
            TypeError, OverflowError, UnicodeEncodeError, RecursionError) as e:
        raise ValidationError(field, f"not a storable {type(asset).__name__}: {e}",
                              None) from None
    if row.kind in NODE_KINDS and len(row.refs) > 1 and row.refs[0] == row.digest:
        raise ValidationError(field, "a node cannot be its own parent", None)
    return row
