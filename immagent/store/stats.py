"""Storage statistics: what is stored, and what sharing saves compared with copying."""

from __future__ import annotations

import msgspec

__all__ = ["StoreStats"]


class StoreStats(msgspec.Struct, frozen=True):
    """A snapshot of a store's size.

    ``logical_bytes`` is what a copy-per-state layout would hold, in content bytes (the
    canonical, uncompressed bodies): for every state of every client, each asset it pins
    with its whole chain (an agent state's system prompt and every message of its
    conversation; a checkpoint's channel values; a session state's items on every
    branch). ``payload_bytes`` is what immagent holds in asset bodies as stored (after
    compression); ``disk_bytes`` adds rows, indexes and state rows.
    """

    agents: int
    assets_by_kind: dict[str, tuple[int, int]]  # kind name -> (count, body bytes)
    payload_bytes: int
    disk_bytes: int
    logical_bytes: int
    #: State rows of every kind held (agent states, checkpoints, sessions, …) -> count.
    states_by_kind: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def assets(self) -> int:
        """Number of stored assets of every kind."""
        return sum(n for n, _ in self.assets_by_kind.values())

    @property
    def sharing_ratio(self) -> float:
        """logical / payload bytes: how many times over sharing pays (1.0 = no sharing)."""
        return self.logical_bytes / self.payload_bytes if self.payload_bytes else 1.0
