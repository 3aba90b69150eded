"""Dry runs of the SQL backends: do the whole transaction, then roll it back.

A dry run of a deletion or a sweep runs exactly the statements the real one runs (so it
reports what the real one would do, damage checks included) and raises ``Rehearsal`` at
the end instead of committing; the backend catches it outside the transaction and returns
the result it carries.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Rehearsal"]

T = TypeVar("T")


class Rehearsal(Exception, Generic[T]):
    """Raised at the end of a dry run's transaction to roll it back; carries the result."""

    def __init__(self, result: T) -> None:
        super().__init__("dry run: rolled back")
        self.result = result
