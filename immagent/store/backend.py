"""The narrow interface every storage backend implements (PostgreSQL, SQLite).

Backends store bytes and records; they know nothing of caching, validation or agents'
behaviour. Every method is a coroutine; each write method is one transaction, so a failed
call writes nothing. Backends raise ``StoreError`` subclasses, never raw driver errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple, Protocol
from uuid import UUID

from immagent.assets import AgentRecord, Asset, Digest

__all__ = [
    "SCHEMA_VERSION",
    "Backend",
    "DanglingRef",
    "GCResult",
    "StoredAsset",
    "external_refs",
    "split_refs",
    "stored",
]

#: Version of the storage layout written by init_schema(); bump it with a migration.
SCHEMA_VERSION = 1


class StoredAsset(NamedTuple):
    """One row of the asset log: digest, kind, outgoing references, canonical body."""

    digest: Digest
    kind: int
    refs: tuple[Digest, ...]
    body: bytes


def split_refs(raw: bytes | None) -> tuple[Digest, ...]:
    """The digests of a stored refs value (32-byte digests concatenated; empty or NULL for
    none), the inverse of ``b"".join(refs)``."""
    if not raw:
        return ()
    data = bytes(raw)
    return tuple(data[i:i + 32] for i in range(0, len(data), 32))


def stored(asset: Asset) -> StoredAsset:
    """The row that stores ``asset``."""
    return StoredAsset(asset.digest, int(asset.kind), asset.refs(), asset.body)


def external_refs(assets: Sequence[StoredAsset], agents: Sequence[AgentRecord]) -> list[Digest]:
    """Digests a write points at but does not itself contain.

    A backend checks, inside the write transaction and under the gc lock, that these still
    exist: otherwise a sweep that ran just before could leave the new state dangling.
    """
    inside = {a.digest for a in assets}
    wanted: set[Digest] = set()
    for a in assets:
        wanted.update(a.refs)
    for r in agents:
        wanted.add(r.system_prompt)
        wanted.add(r.conversation)
    return sorted(wanted - inside)


class GCResult(NamedTuple):
    """What one gc sweep removed."""

    assets_removed: int
    bytes_freed: int
    assets_kept: int


class DanglingRef(NamedTuple):
    """A reference to an asset the store does not hold: what is missing and who points at it
    (an asset's digest, or an agent row's id)."""

    missing: Digest
    referrer: Digest | UUID


class Backend(Protocol):
    """Storage operations. Asset rows are append-only; agent rows are inserted or deleted."""

    async def close(self) -> None:
        """Release connections; idempotent."""

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""

    async def init_schema(self) -> None:
        """Create the tables if missing (idempotent); refuse an unknown schema version."""

    async def check_schema(self) -> None:
        """Raise SchemaVersionError unless the schema exists at SCHEMA_VERSION."""

    async def write(self, assets: Sequence[StoredAsset], agents: Sequence[AgentRecord]) -> None:
        """In one transaction: insert assets (ignoring ones already present) and agent rows.

        Holds the shared side of the gc lock, so a concurrent sweep can never delete an
        asset this transaction deduplicated onto.
        """

    async def get_assets(self, digests: Sequence[Digest]) -> dict[Digest, StoredAsset]:
        """Fetch the rows for the digests present; absent ones are left out."""

    async def get_conversation(
        self, head: Digest
    ) -> tuple[list[StoredAsset], dict[Digest, StoredAsset]]:
        """The rows of the conversation nodes from ``head`` back to the root, newest first,
        stopping early at a missing node; plus the rows of every non-node asset those nodes
        reference, by digest. One round trip where the database allows."""

    async def get_agents(self, ids: Sequence[UUID]) -> list[AgentRecord]:
        """The agent rows with these ids, in no particular order; missing ones left out."""

    async def list_agents(self, limit: int, offset: int, name: str | None,
                          newest_first: bool = False) -> list[AgentRecord]:
        """Agent rows in creation (UUIDv7) order, oldest first unless ``newest_first``,
        optionally with an exact name."""

    async def count_agents(self, name: str | None) -> int:
        """Number of agent rows, optionally with an exact name."""

    async def lineage(self, agent_id: UUID) -> list[AgentRecord]:
        """The agent and its ancestors, newest first, in one round trip; stops cleanly
        at a parent that was deleted."""

    async def children(self, agent_id: UUID) -> list[UUID]:
        """Ids of agent states whose parent is ``agent_id``."""

    async def delete_agents(self, ids: Sequence[UUID]) -> int:
        """Delete agent rows (never assets); returns how many existed."""

    async def gc(self) -> GCResult:
        """Delete every asset no agent row reaches through refs; exclusive gc lock held."""

    def iter_assets(self, batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        """Every stored asset, in batches, for verification and export (bounded memory)."""
        ...

    def iter_reachable(self, roots: Sequence[Digest],
                       batch_size: int = 1000) -> AsyncIterator[list[StoredAsset]]:
        """Every stored asset reachable from ``roots`` through refs (each once, any order),
        in batches; absent digests are skipped (dangling_refs reports them)."""
        ...

    async def dangling_refs(self, agent_ids: Sequence[UUID] | None = None,
                            limit: int = 10_000) -> list[DanglingRef]:
        """References to absent assets, computed in the database (an anti-join), at most
        ``limit``: from every asset and agent row, or (``agent_ids`` given) only from those
        agent rows and the assets reachable from them. Distinct (missing, referrer) pairs."""

    async def delete_lineage(self, agent_id: UUID) -> list[UUID]:
        """In one transaction: delete the agent row, then each ancestor with no other child
        row, stopping at the first one that has one (or is absent). Returns the deleted ids,
        newest first; empty when ``agent_id`` does not exist. Concurrent calls are
        serialised so that two siblings deleted at once still remove their parent."""

    async def asset_stats(self) -> dict[int, tuple[int, int]]:
        """Per kind: (number of assets, total body bytes)."""

    async def storage_bytes(self) -> int:
        """Bytes the backend occupies on disk for immagent's tables (indexes included)."""
