"""Pure reachability over content-addressed assets (dulwich's gc shape, without I/O).

The backends compute the same thing in SQL (``Backend.gc``); these functions are the
reference definition, used by tests as the model a store must agree with, and by tools that
hold a small asset graph in memory (a bundle, a test fixture).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from immagent.assets import Digest

__all__ = ["find_reachable", "find_unreachable"]


def find_reachable(roots: Iterable[Digest],
                   refs_of: Callable[[Digest], Iterable[Digest] | None]) -> set[Digest]:
    """Every digest reachable from ``roots`` (roots included) following ``refs_of``.

    ``refs_of`` returns None for an absent asset; absent digests are still reported as
    reachable (something points at them), which is what lets callers find dangling refs.
    """
    seen: set[Digest] = set()
    stack = list(roots)
    while stack:  # iterative: conversation chains are far deeper than Python's stack
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        stack.extend(r for r in refs_of(digest) or () if r not in seen)
    return seen


def find_unreachable(assets: Mapping[Digest, Iterable[Digest]],
                     roots: Iterable[Digest]) -> set[Digest]:
    """The digests in ``assets`` (digest -> refs) that no root reaches: what gc sweeps."""
    reachable = find_reachable(roots, assets.get)
    return set(assets) - reachable
