"""Integrity audit of a store (git fsck's vocabulary): corrupt, missing, undecodable.

Every check works on what is *stored*: asset rows are re-hashed exactly as read (never a
re-encoding of the decoded object, so the audit stays valid if the encoder changes), every
chain node is checked in full, run by run (``chain_rows.audit_row``: its digest from its
record, its out-of-line refs and the node stored before it; its counters, accumulator root,
span hash and stored peaks against its chain; every element decoded), every state row's
digest is recomputed from its content (``records.check_state``, which also reports a
column of the wrong type), every reference must reach a row of the kind it requires (the
one table: ``assets.ref_kinds`` and ``StateKind.ref_kinds``), and no lineage may run into
a parent cycle. Dangling references, references of the wrong kind from nodes and cycles
are found by the database (anti-joins and recursive queries), state references a page of
states at a time, so memory stays bounded by one batch of rows (and one span of nodes).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar
from uuid import UUID

import msgspec

from immagent import chain_rows, chains, codec, redaction
from immagent.assets import NODE_KINDS, Asset, Digest, Kind, MissingAsset, ref_kind_table
from immagent.attestations import attestation_of
from immagent.audit import keys
from immagent.chains import ChainContext, NodeRow
from immagent.codec import NO_DICTIONARIES, ZstdDictionary, decoded_size
from immagent.exceptions import AgentNotFoundError, IntegrityError, install_command
from immagent.records import STATE_KINDS, StateRow, check_state
from immagent.rows import StoredAsset, check_row, load_row

if TYPE_CHECKING:
    from immagent.store.backend import AuditBackend

__all__ = [
    "MAX_LISTED",
    "AgentProblem",
    "AssetProblem",
    "KindProblem",
    "MissingAsset",
    "RedactedElement",
    "VerifyReport",
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


class AgentProblem(msgspec.Struct, frozen=True):
    """A state row (an agent state, …) that fails its check: its content no longer gives
    its stored digest, or its body cannot be decoded (``reason`` says which)."""

    agent_id: UUID
    stored: Digest
    reason: str


class KindProblem(msgspec.Struct, frozen=True):
    """A reference to a stored asset of another kind than it requires: ``referrer`` (an
    asset's digest or a state's id) points at ``digest``, a ``kind`` where an ``expected``
    must be. Reads of it fail; a bundle of it would be refused."""

    referrer: Digest | UUID
    digest: Digest
    kind: int
    expected: int


class RedactedElement(msgspec.Struct, frozen=True):
    """A redacted element (``immagent.redaction``): the node whose record holds its
    tombstone, its digest, the reason given and when. Not a problem: the node verifies."""

    node: Digest
    digest: Digest
    reason: str
    at: int  # microseconds since the Unix epoch, UTC


class VerifyReport(msgspec.Struct, frozen=True):
    """What ``Store.verify`` found. ``ok`` is True only when every list is empty."""

    agent_id: UUID | None  # None: the whole store was checked
    assets_checked: int
    bytes_checked: int
    agents_checked: int
    corrupt: tuple[AssetProblem, ...] = ()  # body does not hash to its digest, or bad refs
    missing: tuple[MissingAsset, ...] = ()  # referenced but absent
    undecodable: tuple[AssetProblem, ...] = ()  # hashes right but is not a valid asset
    bad_agents: tuple[AgentProblem, ...] = ()  # state rows failing their digest check
    # State rows the backend could not even read back (a damaged column), described by
    # where they are.
    unreadable_agents: tuple[str, ...] = ()
    truncated: bool = False  # some category had more than MAX_LISTED entries
    wrong_kinds: tuple[KindProblem, ...] = ()  # references to an asset of another kind
    cycles: tuple[UUID, ...] = ()  # states whose lineage runs into a parent cycle
    nodes_checked: int = 0  # chain nodes (their inline elements included)
    attestations_checked: int = 0  # attestation states among the states checked
    #: Attestations whose Ed25519 signature was not checked (no signing extra installed).
    signatures_unchecked: int = 0
    #: Redacted elements found in the chain nodes checked (one entry per node holding a
    #: tombstone): erased on purpose, neither corrupt nor missing.
    redacted: tuple[RedactedElement, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no problem of any kind was found."""
        return not (self.corrupt or self.missing or self.undecodable or self.bad_agents
                    or self.unreadable_agents or self.wrong_kinds or self.cycles)

    @property
    def problems(self) -> int:
        """Number of problems listed."""
        return (len(self.corrupt) + len(self.missing) + len(self.undecodable)
                + len(self.bad_agents) + len(self.unreadable_agents) + len(self.wrong_kinds)
                + len(self.cycles))

    def lines(self) -> list[str]:
        """The report as human-readable lines (what ``immagent verify`` prints)."""
        scope = f"state {self.agent_id}" if self.agent_id else "whole store"
        out = [f"verified {scope}: {self.assets_checked} assets and {self.nodes_checked} "
               f"chain nodes ({self.bytes_checked} bytes), {self.agents_checked} states"]
        out += [f"corrupt {p.digest.hex()} ({_kind_name(p.kind)}): {p.reason}"
                for p in self.corrupt]
        out += [f"missing {m.digest.hex()} referenced by {_referrer(m.referrer)}"
                for m in self.missing]
        out += [f"undecodable {p.digest.hex()} ({_kind_name(p.kind)}): {p.reason}"
                for p in self.undecodable]
        out += [f"bad state {a.agent_id}: {a.reason}" for a in self.bad_agents]
        out += [f"unreadable state row {u}" for u in self.unreadable_agents]
        out += [f"wrong kind {k.digest.hex()} referenced by {_referrer(k.referrer)}: a "
                f"{_kind_name(k.kind)} where a {_kind_name(k.expected)} must be"
                for k in self.wrong_kinds]
        out += [f"cycle: the lineage of state {c} runs into a parent cycle"
                for c in self.cycles]
        if self.attestations_checked:
            checked = self.attestations_checked - self.signatures_unchecked
            out.append(f"attestations: {self.attestations_checked}, signatures checked: "
                       f"{checked}")
        if self.signatures_unchecked:
            out.append(f"{self.signatures_unchecked} attestation signature(s) not checked: "
                       f"{install_command('sign')}")
        if self.redacted:
            erased = len({r.digest for r in self.redacted})
            out.append(f"redacted: {erased} element(s), in {len(self.redacted)} node "
                       "record(s) (erased on purpose, not a problem)")
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


async def verify_backend(backend: AuditBackend, agent_id: UUID | None = None, *,
                         progress: Callable[[int], None] | None = None,
                         dictionaries: Mapping[int, ZstdDictionary] = NO_DICTIONARIES,
                         ) -> VerifyReport:
    """Audit every asset and state row (or one agent state and what it reaches); compressed
    bodies are decompressed with ``dictionaries`` (the store's) before they are re-hashed."""
    corrupt: list[AssetProblem] = []
    undecodable: list[AssetProblem] = []
    bad_states: list[AgentProblem] = []
    truncated = False

    def note(target: list[T], problem: T) -> None:
        nonlocal truncated
        if len(target) < MAX_LISTED:
            target.append(problem)
        else:
            truncated = True

    states_checked = attestations_checked = unchecked = 0
    wrong_kinds: list[KindProblem] = []
    checkable = keys.signing_available()

    async def check_attestations(rows: Sequence[StateRow]) -> None:
        """Each attestation's signature verifies, and its subject, where still stored
        (gc removes the others), holds the content it vouches for."""
        nonlocal attestations_checked, unchecked
        subjects = {r.id: r for r in await backend.get_states(
            sorted({r.parent_id for r in rows if r.parent_id is not None}))}
        for row in rows:
            attestations_checked += 1
            signed, _, named = attestation_of(row.kind, row.stream, row.refs, row.body)
            if not checkable:
                unchecked += 1
            elif not keys.verify_signed(signed):
                note(bad_states, AgentProblem(row.id, row.digest, "corrupt: its signature "
                                              f"by {signed.key_id} does not verify"))
                continue
            subject = subjects.get(named.id)
            if subject is not None and (subject.kind, subject.digest) != (named.kind,
                                                                          named.digest):
                note(bad_states, AgentProblem(row.id, row.digest, f"corrupt: it vouches for "
                                              f"other content than state {named.id} holds"))

    async def check_states(rows: Sequence[StateRow]) -> None:
        nonlocal states_checked
        wanted: dict[Digest, list[tuple[UUID, int]]] = {}
        attested: list[StateRow] = []
        for row in rows:
            states_checked += 1
            problem = check_state(row)
            if problem is not None:
                note(bad_states, AgentProblem(row.id, row.digest, f"{problem[0]}: {problem[1]}"))
                continue
            if row.kind == Kind.ATTESTATION:
                attested.append(row)
            kinds = STATE_KINDS[row.kind].ref_kinds(row)
            if len(kinds) != len(row.refs):
                note(bad_states, AgentProblem(row.id, row.digest, f"undecodable: it pins "
                                              f"{len(row.refs)} digests, its kind {len(kinds)}"))
                continue
            for ref, kind in zip(row.refs, kinds, strict=True):
                wanted.setdefault(ref, []).append((row.id, kind))
        if attested:
            await check_attestations(attested)
        # A page of states pins few distinct rows (prompts, head nodes): look them up here.
        found = await backend.kinds(sorted(wanted))
        for ref, uses in wanted.items():
            target = found.get(ref)
            for state_id, kind in uses:
                if target is not None and target != kind:
                    note(wrong_kinds, KindProblem(state_id, ref, target, kind))

    unreadable: list[str] = []
    cycles: list[UUID] = []
    if agent_id is None:
        after: UUID | None = None
        while True:
            try:
                page = await backend.scan_states(None, after=after, limit=_BATCH)
            except IntegrityError as e:
                unreadable.append(f"after {after or 'the start'} (id order): {e}")
                break
            if not page:
                break
            await check_states(page)
            after = page[-1].id
        cycles = await backend.cyclic_states(MAX_LISTED + 1)
        batches: AsyncIterator[list[StoredAsset]] = backend.iter_assets(None, _BATCH)
        node_batches: AsyncIterator[list[NodeRow]] = backend.iter_nodes(None, _BATCH)
    else:
        try:
            rows = await backend.get_states([agent_id])
        except IntegrityError as e:  # nothing to walk from: report the row itself
            return VerifyReport(agent_id=agent_id, assets_checked=0, bytes_checked=0,
                                agents_checked=1, unreadable_agents=(f"{agent_id}: {e}",))
        if not rows:
            raise AgentNotFoundError(agent_id)
        # The state and the attestations about it.
        await check_states([*rows, *await backend.stream_states(
            Kind.ATTESTATION, str(agent_id), limit=MAX_LISTED, newest_first=False)])
        if _in_cycle(agent_id, await backend.lineage(agent_id)):
            cycles = [agent_id]
        batches = backend.iter_assets(sorted(set(rows[0].refs)), _BATCH)
        node_batches = backend.iter_nodes(sorted(set(rows[0].refs)), _BATCH)

    checked = size = 0
    # If progress() raises, the cursor (a pooled connection) is released at once.
    async with closing_iter(batches):
        async for batch in batches:
            for row in batch:
                checked += 1
                found = check_row(row, dictionaries)
                # Content bytes (canonical, uncompressed), as bundles count them, once the
                # row proved sound; a damaged one by what it holds (a damaged SQLite column
                # may hold an int, not bytes).
                if found is None:
                    size += decoded_size(row.codec, row.body, dictionaries)
                elif isinstance(row.body, bytes):
                    size += len(row.body)
                if found is not None:
                    category, reason = found
                    note(corrupt if category == "corrupt" else undecodable,
                         AssetProblem(row.digest, row.kind, reason))
            if progress is not None:
                progress(checked)

    redacted: list[RedactedElement] = []
    nodes = _NodePass(backend, dictionaries, lambda category, problem: note(
        corrupt if category == "corrupt" else undecodable, problem),
        lambda found: note(redacted, found))
    async with closing_iter(node_batches):
        async for node_batch in node_batches:
            for node_row in node_batch:
                await nodes.check(node_row)
                size += _content_bytes(node_row, dictionaries)
            if progress is not None:
                progress(checked + nodes.checked)

    await _check_tombstones(backend, redacted, lambda problem: note(corrupt, problem))

    # Last, so an asset absent when the walk ran is reported here even if it never was read.
    scope = None if agent_id is None else [agent_id]
    dangling = await backend.dangling_refs(scope, MAX_LISTED + 1)
    for misfit in await backend.misfit_refs(ref_kind_table(), scope, MAX_LISTED + 1):
        note(wrong_kinds, KindProblem(*misfit))
    if len(dangling) > MAX_LISTED or len(cycles) > MAX_LISTED:
        truncated = True
    return VerifyReport(
        agent_id=agent_id, assets_checked=checked, bytes_checked=size,
        agents_checked=states_checked, corrupt=tuple(corrupt),
        missing=tuple(dangling[:MAX_LISTED]), undecodable=tuple(undecodable),
        bad_agents=tuple(bad_states), unreadable_agents=tuple(unreadable[:MAX_LISTED]),
        truncated=truncated, wrong_kinds=tuple(wrong_kinds), cycles=tuple(cycles[:MAX_LISTED]),
        nodes_checked=nodes.checked,
        attestations_checked=attestations_checked, signatures_unchecked=unchecked,
        redacted=tuple(redacted),
    )


def _content_bytes(row: NodeRow, dictionaries: Mapping[int, ZstdDictionary]) -> int:
    """A node row's content bytes as a bundle counts them: its canonical body (its fields)
    and the canonical bodies of the elements its record holds (uncompressed); a record
    that cannot be read counts as stored (it is listed as a problem anyway)."""
    try:
        fields, entries = chains.split_record(codec.decode(row.codec, row.body, dictionaries))
    except (codec.CodecError, ValueError, TypeError):
        return len(row.body) if isinstance(row.body, bytes) else 0
    return len(fields) + sum(len(e) for e in entries if not chains.is_marker(e))


class _NodePass:
    """The full check of every chain node, run by run: each row continues from the context
    of the row before it when that is its parent, else from its parent's context read from
    the store (a fork, a run's first node). A row that fails is reported and its children
    continue from what it really holds, so one damaged row is one problem."""

    def __init__(self, backend: AuditBackend, dictionaries: Mapping[int, ZstdDictionary],
                 report: Callable[[str, AssetProblem], None],
                 redacted: Callable[[RedactedElement], None]) -> None:
        self._backend = backend
        self._dictionaries = dictionaries
        self._report = report
        self._redacted = redacted
        self._last: tuple[Digest, ChainContext, bool] | None = None
        self.checked = 0

    async def check(self, row: NodeRow) -> None:
        self.checked += 1
        kind = row.kind if isinstance(row.kind, int) else -1
        parent: ChainContext | None = None
        trusted = True
        if row.parent is not None:
            if self._last is not None and self._last[0] == row.parent:
                _, parent, trusted = self._last
            else:
                try:
                    parent = await self._context(row.parent)
                except IntegrityError as e:
                    self._report("corrupt", AssetProblem(
                        row.digest, kind, f"its parent {row.parent.hex()} cannot be read: {e}"))
                    found = chain_rows.check_row(row, self._dictionaries)
                    if found is not None:
                        self._report(found[0], AssetProblem(row.digest, kind,
                                                            _node_reason(row, found[1])))
                    self._last = None
                    return
        leaves = await self._leaves(row)
        checked = chain_rows.audit_row(row, parent, leaves, self._dictionaries, trusted)
        for category, reason in checked.problems:
            self._report(category, AssetProblem(row.digest, kind, _node_reason(row, reason)))
        for digest, info in checked.redacted:
            self._redacted(RedactedElement(row.digest, digest, info.reason, info.at))
        self._last = (row.digest, checked.context, checked.trusted)

    async def _context(self, digest: Digest) -> ChainContext:
        rows, leaves = await self._backend.get_chain(digest, context=True)
        if not rows:
            raise IntegrityError("it is not stored")
        node_type = NODE_KINDS.get(rows[-1].kind)
        if node_type is None:
            raise IntegrityError(f"it has kind {rows[-1].kind}, no node kind")
        node = chain_rows.read_context(rows, digest, node_type, leaves, self._dictionaries)
        context = node.context()
        assert context is not None
        return context

    async def _leaves(self, row: NodeRow) -> dict[Digest, Asset]:
        """The row's out-of-line elements that are stored and sound (the asset pass reports
        the others)."""
        if not row.refs:
            return {}
        found: dict[Digest, Asset] = {}
        for digest, stored in (await self._backend.get_assets(list(row.refs))).items():
            try:
                found[digest] = load_row(stored, self._dictionaries)
            except IntegrityError:
                continue
        return found


async def _check_tombstones(backend: AuditBackend, found: Sequence[RedactedElement],
                            report: Callable[[AssetProblem], None]) -> None:
    """A tombstone's reason and time are not covered by its node's digest (they were
    written after it): each must match the REDACTION state of its digest, whose own digest
    covers them. A tombstone without one (imported from a bundle) is taken as it is."""
    by_id = {redaction.state_id(r.digest): r.digest for r in found}
    notes: dict[Digest, redaction.RedactionNote] = {}
    ids = list(by_id)
    for start in range(0, len(ids), _BATCH):
        for row in await backend.get_states(ids[start:start + _BATCH]):
            if row.kind == Kind.REDACTION and check_state(row) is None:
                notes[by_id[row.id]] = redaction.decode_note(row.body)
    for element in found:
        note = notes.get(element.digest)
        if note is not None and (note.reason, note.at) != (element.reason, element.at):
            report(AssetProblem(element.node, int(Kind.NODE),
                                f"the tombstone of {element.digest.hex()} does not match "
                                "its redaction record (reason or time altered)"))


def _node_reason(row: NodeRow, reason: str) -> str:
    return f"chain node at depth {row.depth}: {reason}"


def _in_cycle(state_id: UUID, lineage: Sequence[StateRow]) -> bool:
    """Whether following parents from ``state_id`` through ``lineage`` (as the cycle-safe
    ``Backend.lineage`` returns it, each row once) comes back to a row already passed."""
    by_id = {r.id: r for r in lineage}
    seen: set[UUID] = set()
    current = by_id.get(state_id)
    while current is not None:
        if current.id in seen:
            return True
        seen.add(current.id)
        current = None if current.parent_id is None else by_id.get(current.parent_id)
    return False


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


def _referrer(referrer: Digest | UUID) -> str:
    return f"state {referrer}" if isinstance(referrer, UUID) else f"asset {referrer.hex()}"
