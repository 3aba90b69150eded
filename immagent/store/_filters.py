"""The WHERE clause of a state scan, built once for every SQL backend: which states of
which kind, past which id, whose stream holds which text. Backends differ only in their
placeholder and in how they fold case, which they pass in."""

from __future__ import annotations

from typing import Any, NamedTuple
from uuid import UUID

__all__ = ["Dialect", "state_filter"]


class Dialect(NamedTuple):
    """How one engine spells a parameter and "stream contains, case-insensitively"."""

    mark: str  # the placeholder: "%s" or "?"
    contains: str  # e.g. "strpos(lower(stream), %s) > 0"; the needle is lowercased here
    uuid: type[bytes] | type[UUID]  # how the engine takes a UUID parameter


def state_filter(dialect: Dialect, kind: int | None, *, stream: str | None = None,
                 contains: str | None = None, after: UUID | None = None,
                 newest_first: bool = False) -> tuple[str, list[Any]]:
    """(``WHERE …`` or "", its parameters). ``after`` pages by id: strictly before it when
    ``newest_first``, else after. ``contains`` is literal text (no wildcards to escape)."""
    where: list[str] = []
    params: list[Any] = []
    if kind is not None:
        where.append(f"kind = {dialect.mark}")
        params.append(kind)
    if stream is not None:
        where.append(f"stream = {dialect.mark}")
        params.append(stream)
    if after is not None:
        where.append(f"id {'<' if newest_first else '>'} {dialect.mark}")
        params.append(after.bytes if dialect.uuid is bytes else after)
    if contains is not None:
        where.append(dialect.contains)
        params.append(contains.lower())
    return (f"WHERE {' AND '.join(where)}" if where else ""), params
