"""Garbage collection: delete every asset no stored state reaches, and never anything else.

The backend marks and sweeps (``Backend.sweep``: one transaction under the exclusive side
of the gc lock, so no write can deduplicate onto an asset while it is being swept). The
rules are here:

* **Trust nothing it marks from.** The mark follows the ``refs`` of state rows and nodes;
  a damaged one (a truncated refs column, a state pointed at another head) would make gc
  sweep live data. So every row marked from is re-hashed inside the sweep's transaction
  (states: their content digest; assets with refs: refs and body) and any mismatch aborts
  the sweep. So is every reached node and every row a state or a node links to as its
  parent, whatever its stored kind and refs: a node whose refs were emptied, or whose kind
  column was changed to a leaf's, marks nothing and would otherwise never be looked at.
  The digest covers kind, refs and body, so any such damage is a mismatch. gc is never
  less careful than verify.
* **Never treat an unreadable root as absent** (git's prune rule): if something reachable
  is missing, what it would have kept is unknown, so nothing is deleted.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from immagent.assets import Kind
from immagent.codec import FIRST_DICTIONARY, NO_DICTIONARIES, ZstdDictionary
from immagent.exceptions import IntegrityError
from immagent.records import StateRow, check_state
from immagent.rows import StoredAsset, check_row

if TYPE_CHECKING:
    from immagent.store.backend import AdminBackend

__all__ = ["GCResult", "check_marked", "collect"]

#: 0.1.2's names for the counts of deleted assets, by kind.
_SEED_KEYS = {int(Kind.SYSTEM_PROMPT): "text_assets", int(Kind.NODE): "conversations",
              int(Kind.MESSAGE): "messages"}


class GCResult(dict[str, int]):
    """What one gc removed: 0.1.2's dict of deleted counts (``result["messages"]``,
    ``"conversations"``, ``"text_assets"``, and any other kind by its name), plus the
    totals as attributes."""

    def __init__(self, removed: Mapping[int, int], bytes_freed: int, assets_kept: int) -> None:
        super().__init__({name: 0 for name in _SEED_KEYS.values()})
        for kind, count in removed.items():
            self[_name(kind)] = self.get(_name(kind), 0) + count
        #: Body bytes of the removed assets.
        self.bytes_freed = bytes_freed
        #: Assets left in the store.
        self.assets_kept = assets_kept

    @property
    def assets_removed(self) -> int:
        """Assets removed, every kind together."""
        return sum(self.values())

    def __repr__(self) -> str:
        return (f"GCResult({dict(self)!r}, bytes_freed={self.bytes_freed}, "
                f"assets_kept={self.assets_kept})")


def check_marked(rows: Sequence[StoredAsset | StateRow],
                 dictionaries: Mapping[int, ZstdDictionary] = NO_DICTIONARIES) -> None:
    """Raise IntegrityError naming the first row gc would mark from that does not hash to
    its digest (or cannot be decoded): sweeping from it could delete live data. A body
    compressed with a dictionary not in ``dictionaries`` raises _UnknownDictionary (one
    written since they were read: re-read them and sweep again)."""
    for row in rows:
        if isinstance(row, StateRow):
            problem = check_state(row)
            if problem is not None:
                raise IntegrityError(f"gc aborted, nothing deleted: state {row.id} is "
                                     f"{problem[0]} ({problem[1]}); run store.verify()")
            continue
        if (type(row.codec) is int and row.codec >= FIRST_DICTIONARY
                and row.codec not in dictionaries):
            raise _UnknownDictionary(row.codec)
        found = check_row(row, dictionaries)
        if found is not None:
            raise IntegrityError(f"gc aborted, nothing deleted: asset {row.digest.hex()} "
                                 f"is {found[0]} ({found[1]}); run store.verify()")


class _UnknownDictionary(Exception):
    """A checked body needs a dictionary gc did not load (the sweep deleted nothing)."""


#: Sweeps retried when a dictionary appeared meanwhile (each retry re-reads them).
_ATTEMPTS = 3


async def collect(backend: AdminBackend,
                  dictionaries: Callable[[], Awaitable[Mapping[int, ZstdDictionary]]]
                  | None = None, *, dry_run: bool = False) -> GCResult:
    """Sweep every asset no state reaches, checking every row marked from first; compressed
    bodies are checked with the store's ``dictionaries`` (read before each attempt). With
    ``dry_run`` the sweep is rolled back: what it would remove, nothing removed."""
    for _ in range(_ATTEMPTS):
        known = NO_DICTIONARIES if dictionaries is None else await dictionaries()
        try:
            result = await backend.sweep(functools.partial(check_marked, dictionaries=known),
                                         dry_run=dry_run)
        except _UnknownDictionary as e:
            unknown = e.args[0]
            continue
        break
    else:
        raise IntegrityError(f"gc aborted, nothing deleted: a reached body needs "
                             f"dictionary {unknown}, which the store does not hold (run "
                             "store.verify())")
    if result.missing is not None:
        raise IntegrityError(
            f"gc aborted, nothing deleted: a stored state reaches asset "
            f"{result.missing.hex()}, which is missing, so reachability is unknown (run "
            "store.verify(); restore the asset by importing a bundle, or delete the states "
            "that need it)")
    return GCResult(result.removed, result.freed, result.kept)


def _name(kind: int) -> str:
    if kind in _SEED_KEYS:
        return _SEED_KEYS[kind]
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind_{kind}"
