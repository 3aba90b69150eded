"""Applying a redaction (``immagent.redaction``) to a store: one transaction per digest.

``EventLog.redact`` resolves what to erase (a message digest, or a state and a message
position), then ``run`` builds the REDACTION state and the rewrite of node records and
hands both to ``Backend.redact``, which scans every conversation node row in one
transaction holding the exclusive side of the gc lock.

Why a scan: a body of at most ``chains.INLINE_MAX`` bytes is stored inline in every node
record that adds it (in any lineage), compressed, and no index names element digests. A
redaction is rare and deliberate; it reads each conversation node once (about what
``verify`` reads) and rewrites only the rows that held the body.

Safety, and why it holds:

* **Concurrent writers.** Writers hold the shared side of the gc lock from their first
  statement to their commit and check the REDACTION states under it; a redaction holds the
  exclusive side. So a write of the same content either committed before the redaction
  (whose scan then sees and erases it) or runs after it and is refused
  (``RedactedError``). Writes of other content wait for the redaction, as for gc.
* **gc.** It takes the same exclusive lock: a sweep and a redaction never interleave. A
  redacted out-of-line body is deleted by the redaction itself, its refs dropped from the
  nodes that named it, so gc finds nothing dangling.
* **Crashes.** One transaction: every record holding the body is rewritten, the asset row
  deleted and the REDACTION state written together, or nothing is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from immagent import codec, redaction
from immagent.assets import NODE_KINDS, Digest, Kind, encode
from immagent.exceptions import IntegrityError
from immagent.records import StateRow, load_state, stream_digest
from immagent.redaction import RedactionNote
from immagent.rows import StoredAsset, load_row
from immagent.store.backend import Backend, NodeChange, NodeRow, Redactor

__all__ = ["RedactionReport", "note_row", "run"]


class RedactionReport(NamedTuple):
    """What a redaction did (``dry_run``: would do): the digest erased, the reason, when,
    how many node records held it and how many out-of-line asset rows were deleted.
    ``already``: the digest had been redacted before (nothing was done)."""

    digest: Digest
    reason: str
    at: datetime
    nodes: int
    assets: int
    dry_run: bool = False
    already: bool = False

    def lines(self) -> list[str]:
        """The report as lines (what ``immagent redact`` prints, after escaping)."""
        if self.already:
            return [f"message {self.digest.hex()} was already redacted; nothing to do"]
        verb = "would erase" if self.dry_run else "erased"
        where = f"{self.nodes} node record(s)"
        if self.assets:
            where += f" and {self.assets} asset row(s)"
        out = [f"{verb} message {self.digest.hex()} from {where}"]
        out.append(f"reason: {self.reason}" if self.reason else "reason: (none given)")
        if self.dry_run:
            out.append("dry run: nothing was changed")
        return out


def note_row(digest: Digest, reason: str, at: datetime, kind: int = Kind.MESSAGE
             ) -> tuple[RedactionNote, StateRow]:
    """The REDACTION state of ``digest`` (checked as every state is before it is written)."""
    note = RedactionNote(reason, redaction.micros(at), int(kind))
    body = encode(note)
    stream = digest.hex()
    row = StateRow(id=redaction.state_id(digest), parent_id=None, kind=int(Kind.REDACTION),
                   stream=stream, refs=(), body=body,
                   digest=stream_digest(Kind.REDACTION, stream, (), body), created_at=at)
    load_state(row)
    return note, row


def _rewriter(targets: Mapping[Digest, RedactionNote], element_kind: int,
              dictionaries: codec.Dictionaries) -> Redactor:
    """The ``Backend.redact`` callback: each node row holding a target, its record with
    tombstones (recompressed), its refs without the erased out-of-line digests."""
    writer = dictionaries.newest()

    def rewrite(rows: Sequence[NodeRow], leaves: Mapping[Digest, StoredAsset]
                ) -> list[NodeChange]:
        bodies: dict[Digest, bytes] = {}
        for digest, stored in leaves.items():
            asset = load_row(stored, dictionaries)  # verified: its bytes hash to its digest
            if asset.kind != element_kind:
                raise IntegrityError(f"asset {digest.hex()} is not a "
                                     f"{Kind(element_kind).name.lower()}")
            bodies[digest] = asset.body
        changes: list[NodeChange] = []
        for row in rows:
            try:
                record = codec.decode(row.codec, row.body, dictionaries)
                erased = redaction.erase(record, row.refs, element_kind, targets, bodies)
            except (codec.CodecError, ValueError, TypeError) as e:
                raise IntegrityError(f"node {row.digest.hex()} cannot be redacted: {e} "
                                     "(run store.verify(); nothing was changed)") from None
            if erased is None:
                continue
            chosen, body = codec.encode(int(Kind.NODE), (), erased.record, writer)
            changes.append(NodeChange(row.digest, erased.refs, body, chosen))
        return changes

    return rewrite


async def run(backend: Backend, digest: Digest, reason: str,
              dictionaries: codec.Dictionaries, *, dry_run: bool = False,
              at: datetime | None = None) -> RedactionReport:
    """Redact message ``digest`` in one transaction (see the module docstring); a report
    with ``nodes`` and ``assets`` both 0 means it is stored nowhere (nothing was written)."""
    at = at or datetime.now(UTC)
    element_kind = int(Kind.MESSAGE)
    node_kinds = [k for k, t in NODE_KINDS.items() if t.element_kind == element_kind]
    note, row = note_row(digest, reason, at, element_kind)
    rewrite = _rewriter({digest: note}, element_kind, dictionaries)
    result = await backend.redact([digest], [row], node_kinds, rewrite, dry_run=dry_run)
    if result.already:
        return RedactionReport(digest, reason, at, 0, 0, dry_run, already=True)
    return RedactionReport(digest, reason, at, result.nodes, result.assets, dry_run)
