"""The accumulator every chain node commits to: a Merkle mountain range over the digests of
the chain's elements (a conversation's messages, a session's items, a list's values).

A node's ``acc`` is the root of the MMR over every element digest from the chain's root up
to and including its own elements, so a state (whose digest pins its head node) commits to
a tree over its whole history: one element is proved to be in it by O(log n) digests
(``prove`` / ``root_from_proof``) without revealing the others. Appending costs O(log n)
hashes and needs only the *peaks* (one subtree root per set bit of the leaf count), which
the store keeps beside every K-th node (``immagent.chains``), never in a digest.

Hashes (blake3, 32 bytes), domain-separated from every content digest (whose first byte is
a kind below 0x20):

* a leaf is the element's digest itself;
* an inner node is ``blake3(0xF1 || left || right)``;
* the root of ``n`` leaves is ``blake3(0xF2 || n as 8 bytes big-endian || peaks)``, the
  peaks highest first (the leftmost subtree first). No leaves: no root (None).

Pure: no I/O. The proof *document* (what a verifier reads) is ``immagent.audit.proofs``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence

import blake3

__all__ = [
    "MAX_LEAVES",
    "append",
    "heights",
    "inner",
    "prove",
    "root",
    "root_from_proof",
]

#: Leaf counts are 8-byte fields and proofs are bounded by the height: 2**48 is far past
#: any chain (a conversation of 2**48 messages) and keeps every path under 49 digests.
MAX_LEAVES = 1 << 48

_INNER = blake3.blake3(b"\xf1")
_ROOT = b"\xf2"


def inner(left: bytes, right: bytes) -> bytes:
    """The parent of two subtree roots."""
    return _INNER.copy().update(left + right).digest()


def root(peaks: Sequence[bytes], count: int) -> bytes | None:
    """The root committing to ``count`` leaves whose peaks are ``peaks`` (None: no leaves)."""
    if count == 0:
        return None
    return blake3.blake3(_ROOT + count.to_bytes(8, "big") + b"".join(peaks)).digest()


def heights(count: int) -> list[int]:
    """The height of each peak of an MMR of ``count`` leaves, highest (leftmost) first."""
    return [h for h in range(count.bit_length() - 1, -1, -1) if count >> h & 1]


def append(peaks: Sequence[bytes], count: int, leaves: Iterable[bytes]
           ) -> tuple[tuple[bytes, ...], int]:
    """The peaks and leaf count after appending ``leaves`` to an MMR (``peaks`` of
    ``count`` leaves): two hashes per leaf at most, amortised one."""
    stack = list(peaks)
    for leaf in leaves:
        node = leaf
        count += 1
        # The new leaf merges with every peak whose height the carry reaches: as many as
        # the trailing zero bits of the new count.
        merges = (count & -count).bit_length() - 1
        for _ in range(merges):
            node = inner(stack.pop(), node)
        stack.append(node)
    return tuple(stack), count


def prove(leaves: Sequence[bytes], index: int) -> tuple[list[bytes], list[bytes]]:
    """(path, peaks) proving ``leaves[index]`` in the MMR of ``leaves``: ``path`` the
    siblings from the leaf up to its peak, ``peaks`` the other peaks, in order (the
    leaf's own is what the path leads to)."""
    count = len(leaves)
    if not 0 <= index < count:
        raise IndexError(f"leaf {index} of {count}")
    start = 0
    path: list[bytes] = []
    peaks: list[bytes] = []
    for h in heights(count):
        size = 1 << h
        level = list(leaves[start:start + size])
        if start <= index < start + size:
            position = index - start
            while len(level) > 1:
                path.append(level[position ^ 1])
                level = [inner(level[i], level[i + 1]) for i in range(0, len(level), 2)]
                position >>= 1
        else:
            while len(level) > 1:
                level = [inner(level[i], level[i + 1]) for i in range(0, len(level), 2)]
            peaks.append(level[0])
        start += size
    return path, peaks


def root_from_proof(leaf: bytes, index: int, count: int, path: Sequence[bytes],
                    peaks: Sequence[bytes]) -> bytes:
    """The root a proof leads to (ValueError when its shape does not fit ``count``): the
    caller compares it with the root a node commits to."""
    if not 0 <= index < count <= MAX_LEAVES:
        raise ValueError(f"leaf {index} is not one of {count}")
    # The peak holding the leaf: the first whose range of leaves reaches past it.
    tops = heights(count)
    ends = list(itertools.accumulate(1 << t for t in tops))
    slot = bisect.bisect_right(ends, index)
    h = tops[slot]
    start = ends[slot] - (1 << h)
    others = len(heights(count)) - 1
    if len(path) != h or len(peaks) != others:
        raise ValueError(f"a proof of leaf {index} of {count} has {h} path digests and "
                         f"{others} other peaks, this one {len(path)} and {len(peaks)}")
    node = leaf
    position = index - start
    for sibling in path:
        node = inner(node, sibling) if position & 1 == 0 else inner(sibling, node)
        position >>= 1
    found = root([*peaks[:slot], node, *peaks[slot:]], count)
    assert found is not None
    return found
