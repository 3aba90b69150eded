"""Integrity audit of a store (git fsck's vocabulary): corrupt, missing, undecodable.

Every check works on what is *stored*: rows are re-hashed exactly as read, refs and body
(never a re-encoding of the decoded object, so the audit stays valid if the encoder
changes; a node's digest covers the ``refs`` column gc follows), every agent
row's state digest is recomputed from its fields, and dangling references are found by the
database (an anti-join), so memory stays bounded by one batch of assets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar
from uuid import UUID

import msgspec

from immagent.assets import AgentRecord, Digest, Kind, decode_asset, digest_of
from immagent.exceptions import AgentNotFoundError, IntegrityError
from immagent.store.backend import Backend, StoredAsset

__all__ = [
    "MAX_LISTED",
    "AgentProblem",
    "AssetProblem",
    "MissingAsset",
    "VerifyReport",
    "check_asset",
    "closing_iter",
    "verify_backend",
]

#: At most this many problems of each category are listed (the counts stay exact up to it);
#: a store that broken needs a restore, not a longer list.
MAX_LISTED = 10_000

_BATCH = 1000

T = TypeVar("T")


class AssetProblem(msgspec.Struct, frozen=True):
    """A stored asset that failed a check: its digest, stored kind and what is wrong."""

    digest: Digest
    kind: int
    reason: str


class MissingAsset(msgspec.Struct, frozen=True):
    """A dangling reference: ``digest`` is absent; ``referrer`` (an asset's digest or an
    agent state's id) points at it."""

    digest: Digest
    referrer: Digest | UUID


class AgentProblem(msgspec.Struct, frozen=True):
    """An agent row whose stored state digest differs from the one its fields give."""

    agent_id: UUID
    stored: Digest
    expected: Digest


class VerifyReport(msgspec.Struct, frozen=True):
    """What ``Store.verify`` found. ``ok`` is True only when every list is empty."""

    agent_id: UUID | None  # None: the whole store was checked
    assets_checked: int
    bytes_checked: int
    agents_checked: int
    corrupt: tuple[AssetProblem, ...] = ()  # body does not hash to its digest, or bad refs
    missing: tuple[MissingAsset, ...] = ()  # referenced but absent
    undecodable: tuple[AssetProblem, ...] = ()  # hashes right but is not a valid asset
    bad_agents: tuple[AgentProblem, ...] = ()  # state digest does not match the row
    # Agent rows whose model_config/metadata bytes cannot even be decoded, by position in
    # id order (the id is in the same unreadable row read, so it cannot be named here).
    unreadable_agents: tuple[str, ...] = ()
    truncated: bool = False  # some category had more than MAX_LISTED entries

    @property
    def ok(self) -> bool:
        """True when no problem of any kind was found."""
        return not (self.corrupt or self.missing or self.undecodable or self.bad_agents
                    or self.unreadable_agents)

    @property
    def problems(self) -> int:
        """Number of problems listed."""
        return (len(self.corrupt) + len(self.missing) + len(self.undecodable)
                + len(self.bad_agents) + len(self.unreadable_agents))

    def lines(self) -> list[str]:
        """The report as human-readable lines (what ``immagent verify`` prints)."""
        scope = f"agent {self.agent_id}" if self.agent_id else "whole store"
        out = [f"verified {scope}: {self.assets_checked} assets ({self.bytes_checked} bytes), "
               f"{self.agents_checked} agent states"]
        out += [f"corrupt {p.digest.hex()} ({_kind_name(p.kind)}): {p.reason}"
                for p in self.corrupt]
        out += [f"missing {m.digest.hex()} referenced by {_referrer(m.referrer)}"
                for m in self.missing]
        out += [f"undecodable {p.digest.hex()} ({_kind_name(p.kind)}): {p.reason}"
                for p in self.undecodable]
        out += [f"bad agent {a.agent_id}: stored digest {a.stored.hex()}, "
                f"fields give {a.expected.hex()}" for a in self.bad_agents]
        out += [f"unreadable agent row {u}" for u in self.unreadable_agents]
        if self.truncated:
            out.append(f"(lists truncated at {MAX_LISTED} entries per category)")
        out.append("OK" if self.ok else f"{self.problems} problem(s) found")
        return out


@contextlib.asynccontextmanager
async def closing_iter(it: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """contextlib.aclosing for the backends' batch iterators (typed as AsyncIterator, but
    async generators underneath): a server-side cursor is released on error, not whenever
    the abandoned generator happens to be finalised."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def check_asset(row: StoredAsset) -> tuple[str, str] | None:
    """None if the stored row is sound, else ("corrupt" | "undecodable", reason)."""
    try:
        kind = Kind(row.kind)
    except ValueError:
        return "undecodable", f"unknown kind {row.kind}"
    if kind is Kind.AGENT_STATE:  # agent state digests are rows, never stored assets
        return "undecodable", "kind AGENT_STATE is not a stored asset kind"
    # The digest covers the refs column too (see assets.digest_of): a tampered column,
    # which would mislead gc into sweeping live data, shows up as a mismatch here.
    try:
        sound = digest_of(kind, row.body, row.refs) == row.digest
    except ValueError:
        return "corrupt", f"a {kind.name.lower()} row carries refs"
    if not sound:
        return "corrupt", "stored bytes (refs and body) do not hash to its digest"
    try:
        decode_asset(kind, row.body, row.refs)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        return "undecodable", f"{type(e).__name__}: {e}"
    return None


async def verify_backend(backend: Backend, agent_id: UUID | None = None, *,
                         progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Audit every asset and agent row (or one agent state and what it reaches)."""
    corrupt: list[AssetProblem] = []
    undecodable: list[AssetProblem] = []
    bad_agents: list[AgentProblem] = []
    truncated = False

    def note(target: list[AssetProblem], problem: AssetProblem) -> None:
        nonlocal truncated
        if len(target) < MAX_LISTED:
            target.append(problem)
        else:
            truncated = True

    agents_checked = 0

    def check_agents(records: list[AgentRecord]) -> None:
        nonlocal agents_checked, truncated
        for record in records:
            agents_checked += 1
            expected = record.expected_digest()
            if expected != record.digest:
                if len(bad_agents) < MAX_LISTED:
                    bad_agents.append(AgentProblem(record.id, record.digest, expected))
                else:
                    truncated = True

    unreadable: list[str] = []
    if agent_id is None:
        offset = 0
        while True:
            try:
                page = await backend.list_agents(_BATCH, offset, None)
            except IntegrityError:
                # A damaged row spoils its whole page: re-read it row by row to isolate it.
                for position in range(offset, offset + _BATCH):
                    try:
                        check_agents(await backend.list_agents(1, position, None))
                    except IntegrityError as e:
                        unreadable.append(f"at position {position} (id order): {e}")
                offset += _BATCH
                continue
            if not page:
                break
            offset += len(page)
            check_agents(page)
        batches: AsyncIterator[list[StoredAsset]] = backend.iter_assets(_BATCH)
    else:
        try:
            records = await backend.get_agents([agent_id])
        except IntegrityError as e:  # nothing to walk from: report the row itself
            return VerifyReport(agent_id=agent_id, assets_checked=0, bytes_checked=0,
                                agents_checked=1, unreadable_agents=(f"{agent_id}: {e}",))
        if not records:
            raise AgentNotFoundError(agent_id)
        check_agents(records)
        batches = backend.iter_reachable(
            sorted({records[0].system_prompt, records[0].conversation}), _BATCH)

    checked = size = 0
    # If progress() raises, the cursor (a pooled connection) is released at once.
    async with closing_iter(batches):
        async for batch in batches:
            for row in batch:
                checked += 1
                size += len(row.body)
                found = check_asset(row)
                if found is not None:
                    category, reason = found
                    note(corrupt if category == "corrupt" else undecodable,
                         AssetProblem(row.digest, row.kind, reason))
            if progress is not None:
                progress(checked)

    # Last, so an asset absent when the walk ran is reported here even if it never was read.
    dangling = await backend.dangling_refs(None if agent_id is None else [agent_id],
                                           MAX_LISTED + 1)
    if len(dangling) > MAX_LISTED:
        truncated = True
    missing = tuple(MissingAsset(d.missing, d.referrer) for d in dangling[:MAX_LISTED])
    return VerifyReport(
        agent_id=agent_id, assets_checked=checked, bytes_checked=size,
        agents_checked=agents_checked, corrupt=tuple(corrupt), missing=missing,
        undecodable=tuple(undecodable), bad_agents=tuple(bad_agents),
        unreadable_agents=tuple(unreadable[:MAX_LISTED]), truncated=truncated,
    )


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


def _referrer(referrer: Digest | UUID) -> str:
    return f"agent {referrer}" if isinstance(referrer, UUID) else f"asset {referrer.hex()}"
