"""Garbage collection: delete every asset no stored state reaches, and never anything else.

The backend marks and sweeps (``Backend.sweep``: one transaction under the exclusive side
of the gc lock, so no write can deduplicate onto an asset while it is being swept). The
rules are here:

* **Trust nothing it marks from.** The mark follows the ``refs`` of state rows, the
  lineages of the chain nodes they reach (where each node is stored: its run, its
  parent's place) and the nodes' out-of-line elements; a damaged row (a truncated refs
  column, a state pointed at another head, a node moved to another place) would make gc
  sweep live data. So every row marked from is re-hashed inside the sweep's transaction
  (states: their content digest; every marked node: its digest from its record, its
  out-of-line refs and the digest of the node stored before it, so a lineage as stored is
  the lineage the digests say) and any mismatch aborts the sweep. gc is never less
  careful than verify.
* **Never treat an unreadable root as absent** (git's prune rule): if something reachable
  is missing, what it would have kept is unknown, so nothing is deleted.
* **A row's codec is a reference like any other.** A body compressed with dictionary n
  needs the DICTIONARY asset whose zstd id (inside its own hashed bytes) is n: gc marks it
  for every row it keeps, whether or not the store's COMPRESSION state (which normally pins
  the dictionaries) is still there; a lost state row once let gc sweep a dictionary live
  rows needed, making them unreadable for good. If a kept row needs a dictionary that is
  not stored soundly (missing, damaged), gc aborts rather than make that permanent. The
  dictionaries found are also what gc checks compressed rows with.
* **Attached states live while their subject does.** An attestation (``StateKind.attached``)
  whose subject state is gone is removed in the same transaction, under the same lock: a
  write restoring the subject (an import) either committed before, and is seen, or waits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from immagent import chain_rows
from immagent.assets import Dictionary, Digest, Kind
from immagent.chains import NodeRow
from immagent.codec import NO_DICTIONARIES, ZstdDictionary
from immagent.exceptions import IntegrityError
from immagent.records import StateRow, attached_kinds, check_state
from immagent.rows import StoredAsset, check_row, load_row

if TYPE_CHECKING:
    from immagent.store.backend import AdminBackend

__all__ = ["GCResult", "check_marked", "collect", "needed_dictionaries"]

#: 0.1.2's names for the counts of deleted assets, by kind.
_SEED_KEYS = {int(Kind.SYSTEM_PROMPT): "text_assets", int(Kind.NODE): "conversations",
              int(Kind.MESSAGE): "messages"}


class GCResult(dict[str, int]):
    """What one gc removed: 0.1.2's dict of deleted counts (``result["messages"]``,
    ``"conversations"``, ``"text_assets"``, and any other kind by its name), plus the
    totals as attributes."""

    def __init__(self, removed: Mapping[int, int], bytes_freed: int, assets_kept: int,
                 states_removed: int = 0) -> None:
        super().__init__({name: 0 for name in _SEED_KEYS.values()})
        for kind, count in removed.items():
            self[_name(kind)] = self.get(_name(kind), 0) + count
        #: Body bytes of the removed assets.
        self.bytes_freed = bytes_freed
        #: Assets left in the store.
        self.assets_kept = assets_kept
        #: Attached states (attestations) removed because their subject is gone.
        self.states_removed = states_removed

    @property
    def assets_removed(self) -> int:
        """Assets removed, every kind together."""
        return sum(self.values())

    def __repr__(self) -> str:
        return (f"GCResult({dict(self)!r}, bytes_freed={self.bytes_freed}, "
                f"assets_kept={self.assets_kept})")


def check_marked(rows: Sequence[StoredAsset | StateRow | NodeRow],
                 dictionaries: Mapping[int, ZstdDictionary] = NO_DICTIONARIES) -> None:
    """Raise IntegrityError naming the first row gc would mark from that does not hash to
    its digest (or cannot be decoded, with ``dictionaries`` for its codec): sweeping from
    it could delete live data."""
    for row in rows:
        if isinstance(row, StateRow):
            problem = check_state(row)
            if problem is not None:
                raise IntegrityError(f"gc aborted, nothing deleted: state {row.id} is "
                                     f"{problem[0]} ({problem[1]}); run store.verify()")
            continue
        found = (chain_rows.check_row(row, dictionaries) if isinstance(row, NodeRow)
                 else check_row(row, dictionaries))
        if found is not None:
            raise IntegrityError(f"gc aborted, nothing deleted: asset {row.digest.hex()} "
                                 f"is {found[0]} ({found[1]}); run store.verify()")


def needed_dictionaries(used: Sequence[int], rows: Sequence[StoredAsset]
                        ) -> dict[int, tuple[Digest, ZstdDictionary]]:
    """The rule for codec references: for each dictionary id in ``used`` (the codecs of
    the rows gc keeps), the sound DICTIONARY row among ``rows`` whose id it is, and the
    dictionary. IntegrityError (gc deletes nothing) when one has none: the rows needing it
    are unreadable, and sweeping could make that permanent."""
    found: dict[int, tuple[Digest, ZstdDictionary]] = {}
    damaged: list[str] = []
    for row in rows:
        if check_row(row) is not None:
            damaged.append(row.digest.hex())
            continue
        asset = load_row(row)
        if isinstance(asset, Dictionary):
            found.setdefault(asset.dictionary_id, (row.digest, ZstdDictionary(asset.data)))
    lacking = [n for n in used if n not in found]
    if lacking:
        seen = f" (damaged dictionary rows: {', '.join(damaged)})" if damaged else ""
        raise IntegrityError(
            f"gc aborted, nothing deleted: rows it keeps are compressed with dictionary "
            f"{lacking[0]}, which is not stored soundly{seen}; run store.verify() and "
            "restore it (or delete the states that need it)")
    return {n: found[n] for n in used}


async def collect(backend: AdminBackend, *, dry_run: bool = False) -> GCResult:
    """Sweep every asset no state reaches, checking every row marked from first and
    keeping every dictionary a kept row's codec names (``needed_dictionaries``). With
    ``dry_run`` the sweep is rolled back: what it would remove, nothing removed."""
    loaded: dict[int, ZstdDictionary] = {}

    def codec_refs(used: Sequence[int], rows: Sequence[StoredAsset]) -> list[Digest]:
        needed = needed_dictionaries(used, rows)
        loaded.update((n, d) for n, (_, d) in needed.items())
        return [digest for digest, _ in needed.values()]

    result = await backend.sweep(functools.partial(check_marked, dictionaries=loaded),
                                 codec_refs, detached=attached_kinds(),
                                 dry_run=dry_run)
    if result.missing is not None:
        raise IntegrityError(
            f"gc aborted, nothing deleted: a stored state reaches asset "
            f"{result.missing.hex()}, which is missing, so reachability is unknown (run "
            "store.verify(); restore the asset by importing a bundle, or delete the states "
            "that need it)")
    return GCResult(result.removed, result.freed, result.kept, result.states_removed)


def _name(kind: int) -> str:
    if kind in _SEED_KEYS:
        return _SEED_KEYS[kind]
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind_{kind}"
