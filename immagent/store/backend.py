"""The narrow interfaces every storage backend implements (memory, SQLite, PostgreSQL, and
read replicas over PostgreSQL), one per role: the log's rows (``LogBackend``), the audits'
whole-store queries (``AuditBackend``), administration (``AdminBackend``). ``Backend`` is
what the log is given; its ``audits()`` hands out the backend the audits ask.

A backend stores three kinds of rows and reports facts about them; it applies no rule of
its own. Assets (``StoredAsset``: digest, kind, body) are append-only and content-
addressed. Chain nodes (``chains.NodeRow``: a conversation's, a session's or a list's
links, each carrying its elements' bodies) are content-addressed too and stored so that a
lineage is a few range scans: a node is placed right after its parent (a *run* of
consecutive nodes continues until a fork), and a backend answers for a node its depth and
its parent's digest. States (``StateRow``) are the identity-bearing rows every client of
the store writes (agent states, checkpoints, sessions); they are inserted or deleted,
never updated. Kinds are data: a new kind of asset or state needs no backend change. What
to do with a fact (raise, retry, refuse) is decided in ``Store`` and the audits.

Every method is a coroutine and each write is one transaction, so a failed call writes
nothing. Backends raise ``StoreError`` subclasses, never raw driver errors; a stored value
that cannot even be read back (a damaged column) is an ``IntegrityError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import NamedTuple, Protocol
from uuid import UUID

from immagent.assets import Digest, MissingAsset
from immagent.chains import NewNode, NodeRow
from immagent.records import StateRow
from immagent.rows import StoredAsset

__all__ = ["SCHEMA_VERSION", "AdminBackend", "AuditBackend", "Backend", "CodecRefs", "Head",
           "LogBackend", "MarkRows", "Misfit", "NewNode", "NodeChange", "NodeRow",
           "RedactResult", "Redactor", "RetainResult", "RetentionBackend", "RetentionPlan",
           "RowCheck", "StreamPlan", "SweepResult", "WriteResult"]

#: Version of the storage layout this immagent writes; older versions are migrated.
#: 3: chain nodes in their own table, clustered by run, carrying their elements' bodies.
SCHEMA_VERSION = 3

#: A check gc runs, inside its exclusive transaction, on every row it marks from (states
#: and the chain nodes it reaches); it raises to abort the sweep.
RowCheck = Callable[[Sequence[StoredAsset | StateRow | NodeRow]], None]
#: gc's rule for what a compressed row needs, run in the same transaction before the rows
#: are checked: given the dictionary ids (codecs >= 2) the marked rows (assets and nodes)
#: are stored with and every stored DICTIONARY row, the digests to mark as well; it raises
#: to abort the sweep.
CodecRefs = Callable[[Sequence[int], Sequence[StoredAsset]], Sequence[Digest]]


class Head(NamedTuple):
    """An expectation a write checks under its lock: the newest state of ``stream`` (of
    ``kind``) is still ``state_id`` (None: the stream has no state yet). Optimistic
    concurrency on a stream, as an event store's "expected version"."""

    kind: int
    stream: str
    state_id: UUID | None


class WriteResult(NamedTuple):
    """What stopped a write; when every field is empty it committed."""

    #: Required digests that are not stored (the write committed nothing).
    missing: tuple[Digest, ...] = ()
    #: State ids already stored with another digest (the write committed nothing). A state
    #: already stored with the same digest is not a conflict: it is skipped.
    conflicts: tuple[UUID, ...] = ()
    #: Expected heads that had moved on (the write committed nothing).
    stale: tuple[Head, ...] = ()
    #: Required states that are not stored (the write committed nothing).
    missing_states: tuple[UUID, ...] = ()
    #: Digests in ``refuse`` that have a REDACTION state (the write committed nothing).
    redacted: tuple[Digest, ...] = ()


class NodeChange(NamedTuple):
    """A node row rewritten by a redaction: its new out-of-line refs and record (stored
    form). Its digest, place and every other column stay."""

    digest: Digest
    refs: tuple[Digest, ...]
    body: bytes
    codec: int


#: A redaction's rewrite of one batch of node rows, given the stored asset rows of the
#: digests being redacted (the out-of-line bodies): the rows that change.
Redactor = Callable[[Sequence[NodeRow], Mapping[Digest, StoredAsset]], Sequence[NodeChange]]


class RedactResult(NamedTuple):
    """What ``Backend.redact`` did (or, rehearsed or with nothing found, would do)."""

    nodes: int  # node rows rewritten
    assets: int  # asset rows deleted (out-of-line bodies)
    #: Digests that already had a REDACTION state (nothing done for them).
    already: tuple[Digest, ...] = ()


class Misfit(NamedTuple):
    """A reference to an asset of the wrong kind: ``referrer`` points at ``digest``, stored
    as a ``kind`` where a ``expected`` must be."""

    referrer: Digest
    digest: Digest
    kind: int
    expected: int


class SweepResult(NamedTuple):
    """What one sweep found and did."""

    removed: dict[int, int]  # assets removed, by kind
    freed: int  # body bytes of the removed assets
    kept: int
    #: A digest some state reaches that is not stored: reachability is unknown, so the
    #: sweep deleted nothing.
    missing: Digest | None = None
    #: Attached states removed because their subject is gone (``sweep(detached=)``).
    states_removed: int = 0


class StreamPlan(NamedTuple):
    """What one retention run does to one stream (``audit/retain.py`` makes it from a policy;
    the backend applies it in SQL). The states kept are the union of: the newest
    ``keep_latest``; those created at or after ``newer_than``; with ``keep_every``, those at
    or before the stream's mark and every ``keep_every``-th position after it (positions
    counted on from ``mark_ordinal``, the position of the state at ``mark_seq``); every
    state no other state of its kind names as parent (a head); every pinned state. With
    ``drop`` only pinned states are kept, and only while the stream's newest state is still
    the one at ``head_seq`` (a stream written to since it was planned is left alone)."""

    stream: str
    head_seq: int
    keep_latest: int
    newer_than: datetime | None
    keep_every: int | None
    drop: bool
    #: The stream's mark as planned: its id (derived from kind and stream), the digest of
    #: the mark row read (None: none stored), and the position and ordinal it holds (0, 0).
    mark: UUID
    mark_digest: Digest | None
    mark_seq: int
    mark_ordinal: int


class RetentionPlan(NamedTuple):
    """The streams of one state kind a retention run applies itself to, and the kinds of
    the rows that belong to a state of that kind (its ``parent_id``) and go with it."""

    kind: int
    streams: tuple[StreamPlan, ...]
    followers: tuple[int, ...] = ()


class RetainResult(NamedTuple):
    """What one ``Backend.retain`` call deleted (or, in a dry run, would delete)."""

    #: States deleted, by kind (followers included).
    deleted: dict[int, int]
    #: Their stored bytes (refs and body).
    state_bytes: int
    #: A planned stream's mark changed since it was read (another run): nothing was done.
    stale: bool = False
    #: Dry runs only: the assets a gc would then remove, by kind, and their body bytes.
    assets: Mapping[int, int] = MappingProxyType({})
    asset_bytes: int = 0


#: Builds the mark rows of the streams whose mark moves, from (kind, stream, position,
#: ordinal) of each: called inside ``Backend.retain``'s transaction (pure, no I/O).
MarkRows = Callable[[Sequence[tuple[int, str, int, int]]], Sequence[StateRow]]


class LogBackend(Protocol):
    """The log's rows: writes, deletes and the reads every client makes."""

    # -- writes ---------------------------------------------------------------------------

    async def write(self, assets: Sequence[StoredAsset], states: Sequence[StateRow],
                    require: Sequence[Digest] = (), heads: Sequence[Head] = (),
                    replace: Sequence[UUID] = (), nodes: Sequence[NewNode] = (), *,
                    require_states: Sequence[UUID] = (),
                    refuse: Sequence[Digest] = ()) -> WriteResult:
        """In one transaction: insert the assets and the chain nodes (skipping ones already
        present; each node after its parent, which is stored or earlier in ``nodes``),
        check that every digest in ``require`` is stored (as an asset or a node), every id
        in ``require_states`` is a stored state, and every head in ``heads`` is still the
        newest state of its stream, delete the state rows whose ids are in ``replace``
        (absent ones are fine), insert the states. Commits nothing when a required digest,
        a required state or a node's parent is missing, a head moved on, or a state id not
        in ``replace`` exists with another digest.

        The checks see the rows as they were before the write: a head names a stream's
        newest state before a replacement. A replaced state written again takes the ``seq``
        of the row it replaces: it keeps its place in its stream (an upsert; a replaced id
        that was absent gets a new seq, as any insert). Holds the shared side of the
        gc lock, so no sweep runs between the check and the commit: what this write
        deduplicated onto or points at cannot be swept under it. Writes expecting heads of
        the same stream are serialised, so exactly one of two writers that read the same
        head commits; writes replacing the same id are serialised too, so each commits and
        the later one replaces what the earlier one wrote. Commits nothing either when a
        state in ``require_states`` is not stored: that check holds the shared side of the
        retention lock (``retain``), so a pin is either seen by a retention run or finds
        its state gone, never pins a state a run deletes meanwhile. Commits nothing either
        when a digest in ``refuse`` (the elements and assets the write stores) has a
        REDACTION state: checked under the shared side of the gc lock, which a redaction
        holds exclusively, so a write either commits before a redaction (which then erases
        what it wrote) or sees it (``redacted``).
        """

    async def delete_states(self, ids: Sequence[UUID], *, stop_at_shared: bool = False,
                            attached: Sequence[int] = (),
                            dry_run: bool = False) -> list[UUID]:
        """Delete state rows (never assets) in one transaction; returns the ids deleted, in
        the given order. With ``stop_at_shared``, ``ids`` is a lineage (a state, then its
        ancestors): the first is deleted, then each next one only if no row outside the
        deleted ones names it as parent (rows of the ``attached`` kinds do not count: they
        are about their parent, not descended from it); the first that is still someone's
        parent (or is absent) ends it. Such deletions are serialised, so two siblings
        deleted at once still take their parent with them. With ``dry_run`` the transaction
        is rolled back instead of committed: the ids that would have been deleted, nothing
        deleted."""

    # -- assets ---------------------------------------------------------------------------

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        """The asset rows for the digests present; absent ones (and nodes) are left out."""

    async def get_chain(self, head: Digest, *, context: bool = False
                        ) -> tuple[list[NodeRow], dict[Digest, StoredAsset]]:
        """A lineage in one round trip: the node rows from the root to ``head``, root first
        (each row's depth and parent digest filled in), and the asset rows of their
        out-of-line elements by digest. With ``context``, only the rows from the one before
        the head's last span depth (``chains.SPAN``) to the head: what an append needs.
        Empty when ``head`` is no stored node; a lineage whose older part is missing starts
        above depth 0."""

    async def get_nodes(self, digests: Sequence[Digest]
                        ) -> tuple[dict[Digest, NodeRow], dict[Digest, StoredAsset]]:
        """The node rows for the digests present (each with its depth and parent digest;
        absent ones left out) and the asset rows of their out-of-line elements."""

    async def kinds(self, digests: Sequence[Digest]) -> dict[Digest, int]:
        """The kind of each digest stored, as an asset or a node (absent ones left out)."""

    # -- states ---------------------------------------------------------------------------

    async def get_states(self, ids: Sequence[UUID]) -> list[StateRow]:
        """The state rows with these ids, in no particular order; missing ones left out."""

    async def scan_states(self, kind: int | None, *, after: UUID | None = None,
                          limit: int = 100, newest_first: bool = False,
                          contains: str | None = None) -> list[StateRow]:
        """States of ``kind`` (None: every kind) in id order (keyset paging: strictly past
        ``after``), at most ``limit``; with ``contains``, only those whose stream holds it,
        case-insensitively (``%``, ``_`` and ``\\`` match literally)."""

    async def stream_states(self, kind: int, stream: str, *, after_seq: int | None = None,
                            limit: int = 100, newest_first: bool = True) -> list[StateRow]:
        """States of ``kind`` in ``stream`` in log (seq) order, keyset-paged past
        ``after_seq``: served by an index, so the newest is one probe."""

    async def count_states(self, kind: int, *, stream: str | None = None,
                           contains: str | None = None) -> int:
        """How many states of ``kind`` (in ``stream``, or whose stream holds ``contains``)."""

    async def stream_heads(self, kind: int, *, after: str | None = None,
                           limit: int = 100) -> list[StateRow]:
        """The newest state (highest seq) of each stream of ``kind``, at most ``limit``
        streams, in the engine's order of stream names, keyset-paged strictly past
        ``after``: one index probe per stream (a loose index scan), never a scan of the
        stream's states."""

    async def lineage(self, state_id: UUID, limit: int | None = None) -> list[StateRow]:
        """The state and its ancestors through ``parent_id``, at most ``limit`` rows, in one
        round trip. Terminates on a parent cycle: without a limit each row comes once (any
        order); with one, rows come newest first and a cycle repeats ids."""


class AuditBackend(LogBackend, Protocol):
    """A log backend that also answers the audits' whole-store queries (verify, stats,
    bundles): read-only, and asked of the one database that holds every row."""

    def iter_nodes(self, roots: Sequence[Digest] | None = None,
                   batch_size: int = 1000) -> AsyncIterator[list[NodeRow]]:
        """Every stored node (``roots`` None), or the lineages of the nodes among
        ``roots``, each once, in batches from one snapshot, ordered run by run (a run's
        parent run first) and within a run by depth; depth and parent digest filled in."""
        ...

    def iter_assets(self, roots: Sequence[Digest] | None = None,
                    batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        """Every stored asset (``roots`` None), or every one reachable from ``roots``: the
        assets among them and the out-of-line elements of the lineages of the nodes among
        them (each once, any order; absent digests skipped), in batches from one
        snapshot, so memory stays one batch."""
        ...

    async def dangling_refs(self, states: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[MissingAsset]:
        """References to absent digests, found by the database (an anti-join), at most
        ``limit``, distinct: from every state and node (its out-of-line elements; a run
        whose parent node is gone names that parent), or (``states`` given) only from those
        states and the nodes they reach."""

    async def misfit_refs(self, expected: Mapping[int, tuple[int, int]],
                          states: Sequence[UUID] | None = None,
                          limit: int = 10_000) -> list[Misfit]:
        """References from nodes to a stored row of another kind than ``expected`` says,
        found by the database, at most ``limit``: ``expected[kind] = (first, rest)`` is the
        kind a node of ``kind`` must have as parent (``first``) and as out-of-line elements
        (``rest``); absent targets are ``dangling_refs``. From every node, or (``states``
        given) from the nodes those states reach."""

    async def cyclic_states(self, limit: int = 10_000) -> list[UUID]:
        """States whose lineage never ends (following ``parent_id`` runs into a cycle),
        found by the database, at most ``limit``, in id order."""

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        """Per kind: (number of assets, total stored body bytes); node kinds count their
        rows and records, and element kinds also count the elements held inline in nodes
        (their bytes are in the nodes' records)."""

    async def storage_bytes(self) -> int:
        """Bytes the backend occupies for immagent's tables (indexes included)."""


class AdminBackend(Protocol):
    """Administration: the connection, the schema and gc's sweep."""

    async def close(self) -> None:
        """Release connections; idempotent."""

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""

    # -- schema ---------------------------------------------------------------------------

    async def schema_version(self) -> int | None:
        """The layout version stored in the database, None when it holds no immagent tables.
        Never changes the database."""

    async def migrate(self, found: int | None) -> int | None:
        """Bring the layout to SCHEMA_VERSION from version ``found`` (None: create it) in
        one transaction, serialised with other callers. Re-reads the version under that
        lock and changes nothing unless it still is ``found``; returns what it read."""

    # -- gc -------------------------------------------------------------------------------

    async def sweep(self, check: RowCheck, codec_refs: CodecRefs | None = None, *,
                    detached: Sequence[int] = (), dry_run: bool = False) -> SweepResult:
        """Delete the states of the ``detached`` kinds whose parent is not stored (attached
        states whose subject is gone); mark every node and asset a remaining state reaches
        (a node reaches its whole lineage and its out-of-line elements, an asset what its
        refs name: a message's tool schemas), then (when some marked row is stored with a
        dictionary) the digests ``codec_refs`` names for the codecs in use; run ``check``
        on every row marked from (all those states and every marked node, with its depth
        and its parent's digest); then delete the nodes and assets not marked: one
        transaction holding the exclusive side of the gc lock (so a write restoring a
        subject is either seen or waits). If ``codec_refs`` or ``check`` raises, or a
        reached digest (a state's ref, an out-of-line element, a run's parent) is missing,
        nothing is deleted (the exception propagates; the missing digest is reported). With
        ``dry_run`` everything but the commit happens: the result says what would have
        been removed, nothing is."""

    # -- redaction ------------------------------------------------------------------------

    async def redact(self, digests: Sequence[Digest], states: Sequence[StateRow],
                     node_kinds: Sequence[int], rewrite: Redactor, *,
                     dry_run: bool = False) -> RedactResult:
        """Erase the bodies of ``digests`` (``immagent.redaction``) in one transaction
        holding the exclusive side of the gc lock, so no write is between its check of
        REDACTION states and its commit: skip the digests that already have a REDACTION
        state (``already``); read the asset rows of the others; pass every node row of
        ``node_kinds``, in batches, with those asset rows to ``rewrite`` and store the
        records and refs it returns; delete those asset rows; insert ``states`` (the
        REDACTION states of the digests not skipped). Commits nothing when no node row
        changed and no asset row was found (the digests are stored nowhere), or with
        ``dry_run``; if ``rewrite`` raises nothing is changed (the exception propagates).
        Overwritten bytes may stay in free pages and logs: see docs/retention.md."""


class RetentionBackend(Protocol):
    """Retention: deleting, in SQL, the states a policy does not keep."""

    async def retain(self, plans: Sequence[RetentionPlan], marks: MarkRows, *,
                     dry_run: bool = False) -> RetainResult:
        """In one transaction holding the exclusive side of the retention lock (a pin
        waits, or is seen): for each plan, unless a planned stream's mark row no longer has
        the planned digest (``stale``, nothing done), select the states of its streams that
        ``StreamPlan`` does not keep, delete them and their followers, delete the marks of
        the planned streams without ``keep_every`` and, for the others, replace the mark of
        each stream whose newest thinned position moved (the newest state that is neither
        among the newest ``keep_latest`` nor created at or after ``newer_than``) with the
        rows ``marks`` builds. Never deletes an asset (gc does). With ``dry_run``, also
        counts the assets no remaining state reaches, then rolls everything back."""


class Backend(LogBackend, AdminBackend, RetentionBackend, Protocol):
    """What the log needs of a storage backend: facts about rows, never rules. The audits'
    queries go to ``audits()``: the backend itself, or (read replicas) the primary."""

    def audits(self) -> AuditBackend:
        """The backend that answers audit queries over every row."""
        ...
