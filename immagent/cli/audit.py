"""Storage and audit commands: ``stats``, ``gc``, ``verify``, ``export``, ``import``, for
the states of every client (``verify-bundle``, ``keygen`` and ``attest`` are
``cli/trust.py``).

Sizes of content are content bytes (``cli.render``: canonical, uncompressed, what digests
cover and bundles carry), so ``export`` and ``verify`` of one state, and ``verify-bundle``
of its bundle, print the same figure. Storage costs (``stats``' STORED, gc's freed bytes,
the size on disk) are bytes as stored, after compression, and say so.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immagent.assets import Kind
from immagent.audit.bundle import BundleInfo
from immagent.audit.keys import load_signing_key
from immagent.cli import confirm
from immagent.cli.clients import conversation_ids, view_of
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError
from immagent.cli.refs import REF_HELP, add_ref, describe, ref_of
from immagent.cli.render import (
    Line,
    Progress,
    human_bytes,
    jsonable,
    paint,
    plural,
    table,
)
from immagent.cli.spec import Command
from immagent.cli.trust import signer_lines
from immagent.records import StateRow
from immagent.store.stats import StoreStats

if TYPE_CHECKING:
    from immagent.audit.verify import VerifyReport

__all__ = ["COMMANDS"]

#: How people call each state kind in stats.
_STATE_NAMES = {"agent_state": "agent states", "checkpoint": "checkpoints",
                "checkpoint_writes": "checkpoint writes", "session_state": "session states",
                "conversation_state": "conversation states",
                "conversation_scope": "conversation scope entries",
                "compression": "compression state", "pin": "pins",
                "retention_policy": "retention policies", "retention_mark": "retention marks"}


# -- stats / gc ----------------------------------------------------------------------------


def stats(ctx: Context, args: argparse.Namespace) -> int:
    """Print what is stored and how much structural sharing saves."""
    s = ctx.run(ctx.store().stats())
    if ctx.out.as_json:
        ctx.out.json(_stats_json(s))
    else:
        ctx.out.lines(_stats_lines(s, ctx.out.width))
    return EXIT_OK


def _stats_json(s: StoreStats) -> dict[str, Any]:
    return {
        "agents": s.agents, "states_by_kind": s.states_by_kind, "assets": s.assets,
        "assets_by_kind": {k: {"count": n, "bytes": b} for k, (n, b) in s.assets_by_kind.items()},
        "payload_bytes": s.payload_bytes, "disk_bytes": s.disk_bytes,
        "logical_bytes": s.logical_bytes, "saved_bytes": s.logical_bytes - s.payload_bytes,
        "sharing_ratio": round(s.sharing_ratio, 3),
    }


def _stats_lines(s: StoreStats, width: int | None) -> Iterator[Line]:
    states = [(_STATE_NAMES.get(kind, kind.replace("_", " ")), str(n))
              for kind, n in s.states_by_kind.items()] or [("(none)", "0")]
    yield from table(("STATES", "COUNT"), states, right=(1,))
    yield ""
    rows = [(kind, str(n), human_bytes(b)) for kind, (n, b) in s.assets_by_kind.items()]
    rows.append(("total", str(s.assets), human_bytes(s.payload_bytes)))
    yield from table(("ASSETS", "COUNT", "STORED"), rows, right=(1, 2))
    yield ""
    saved = s.logical_bytes - s.payload_bytes
    sizes = [
        ("stored", human_bytes(s.payload_bytes),
         "asset bodies as stored (compressed), each once"),
        ("on disk", human_bytes(s.disk_bytes), "tables and indexes"),
        ("logical", human_bytes(s.logical_bytes),
         "content bytes a copy of everything per state would take"),
        ("sharing saves", human_bytes(saved) if saved >= 0 else "nothing yet",
         f"logical / stored = {s.sharing_ratio:.1f}x" if saved >= 0
         else f"{human_bytes(-saved)} more: short histories cost more in chain links "
              "than they share"),
    ]
    yield from table(("SIZE", "BYTES", "MEANING"), sizes, right=(1,), shrink=(2,),
                     width=width)


def gc(ctx: Context, args: argparse.Namespace) -> int:
    """Remove every asset no stored state can reach, after a dry run or a yes."""
    store = ctx.store(write=True)
    if not args.yes:  # a dry run says what the question is about (the same sweep, rolled back)
        planned = ctx.run(store.gc(dry_run=True))
        plan = confirm.Plan(
            f"remove {plural(planned.assets_removed, 'asset')} no state reaches "
            f"({human_bytes(planned.bytes_freed)} stored)",
            lines=[f"  {kind}: {n}" for kind, n in planned.items() if n],
            data=_gc_json(planned),
            empty=planned.assets_removed == 0 and planned.states_removed == 0)
        if not ctx.approve(plan):
            return EXIT_OK
    result = ctx.run(store.gc())
    if ctx.out.as_json:
        ctx.out.json(_gc_json(result))
    else:
        ctx.out.line(f"removed {plural(result.assets_removed, 'asset')} "
                     f"({human_bytes(result.bytes_freed)} stored), kept {result.assets_kept}")
        if result.states_removed:
            ctx.out.line(f"removed {plural(result.states_removed, 'attestation')} of deleted "
                         "states")
    return EXIT_OK


def _gc_json(result: Any) -> dict[str, Any]:
    return {"assets_removed": result.assets_removed, "bytes_freed": result.bytes_freed,
            "assets_kept": result.assets_kept, "removed_by_kind": dict(result),
            "attestations_removed": result.states_removed}


# -- verify --------------------------------------------------------------------------------


def verify(ctx: Context, args: argparse.Namespace) -> int:
    """Re-hash what is stored (everything, or what one state reaches); exit 1 on problems."""
    store = ctx.store()
    row = ctx.state(args.ref) if args.ref is not None else None
    progress = Progress("verified assets")
    try:
        report: VerifyReport = ctx.run(store.verify(None if row is None else row.id,
                                                    progress=progress))
    finally:
        progress.finish()
    if ctx.out.as_json:
        ctx.out.json(jsonable(report) | {"ok": report.ok, "problems": report.problems}
                     | ({} if row is None else {"ref": ref_of(row)}))
    else:
        ctx.out.lines(_verify_lines(report, row))
    if not report.ok:
        ctx.out.note(f"immagent: error: verify found {plural(report.problems, 'problem')}")
    return EXIT_OK if report.ok else EXIT_FAILURE


def _verify_lines(report: VerifyReport, row: StateRow | None) -> Iterator[Line]:
    scope = "whole store" if row is None else f"state {row.id} ({describe(row)})"
    yield (f"verified {scope}: {plural(report.assets_checked, 'asset')} and "
           f"{plural(report.nodes_checked, 'chain node')} "
           f"({human_bytes(report.bytes_checked)}), {plural(report.agents_checked, 'state')}")
    # The report's own lines name each problem; its first (totals) and last (verdict)
    # are said here, in this command's units.
    yield from report.lines()[1:-1]
    yield (paint("OK", "ok"),) if report.ok else (
        paint(f"{plural(report.problems, 'problem')} found", "error"),)


# -- bundles -------------------------------------------------------------------------------


def export(ctx: Context, args: argparse.Namespace) -> int:
    """Write REF (its lineage, or a whole thread, and what they reach) to a bundle file."""
    path = Path(args.file)
    if path.is_dir() and not path.is_symlink():
        raise CLIError(f"{path} is a directory: name the bundle file to write")
    # lexists: a symlink (even a dangling one) is something there; --force still replaces
    # only a regular file (Store.export refuses anything else, naming it).
    if os.path.lexists(path) and not args.force:
        raise CLIError(f"{path} already exists (use --force to overwrite it)")
    keys = [load_signing_key(k) for k in args.sign]
    store = ctx.store()
    found = ctx.resolve(args.ref)
    row = found.row
    view_of(row)
    if row.kind == Kind.CHECKPOINT and found.by_name:
        info = ctx.run(store.export_states(ctx.run(conversation_ids(store, row)), path,
                                           sign=keys))
        scope = "every checkpoint and write of the thread"
    else:
        exported = ctx.run(store.export_lineage(row.id, path, sign=keys))
        if exported is None:  # deleted since it was named
            raise CLIError(f"state {row.id} not found")
        info = exported
        scope = "the head's lineage"
    _show_bundle(ctx, info, f"exported {ref_of(row) if found.by_name else row.id} to {path}",
                 scope)
    return EXIT_OK


def import_(ctx: Context, args: argparse.Namespace) -> int:
    """Load a bundle into the store (verifying it first); print the imported head's id."""
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"no bundle file at {path}")
    store = ctx.store(create=True)
    info = ctx.run(store.import_states(path))
    (head,) = ctx.run(store.get_states([info.head]))
    if ctx.out.as_json:
        summary = view_of(head).summary(head) if head.kind in _SHOWN else {"id": str(head.id)}
        ctx.out.json(summary | {"ref": ref_of(head), "states": len(info.agents),
                                "assets": info.assets, "bytes": info.asset_bytes})
    else:
        ctx.out.line(str(info.head))
        ctx.out.note(f"imported {plural(len(info.agents), 'state')} and "
                     f"{plural(info.assets, 'asset')} ({human_bytes(info.asset_bytes)}); "
                     f"head {head.id} ({describe(head)})")
    return EXIT_OK


_SHOWN = (Kind.AGENT_STATE, Kind.CHECKPOINT, Kind.SESSION_STATE)


def _show_bundle(ctx: Context, info: BundleInfo, headline: str, scope: str | None) -> None:
    if ctx.out.as_json:
        ctx.out.json(info)
        return
    ctx.out.line(headline)
    ctx.out.line(("  head    ", paint(str(info.head), "id"), f"  digest {info.head_digest.hex()}"))
    ctx.out.line(f"  states  {len(info.agents)}" + (f" ({scope})" if scope else ""))
    ctx.out.line(f"  assets  {info.assets} ({human_bytes(info.asset_bytes)})")
    if info.attestations:
        ctx.out.line(f"  attestations  {len(info.attestations)}")
    ctx.out.line(f"  file    {human_bytes(info.file_bytes)}, format version {info.version}")
    ctx.out.lines(signer_lines(info.signers))


def _add_gc(p: argparse.ArgumentParser) -> None:
    confirm.add_options(p)


def _add_verify(p: argparse.ArgumentParser) -> None:
    add_ref(p, optional=True, help=f"check only this state and what it reaches: {REF_HELP} "
                                   "(default: the whole store)")


def _add_export(p: argparse.ArgumentParser) -> None:
    add_ref(p, help=f"what to export: {REF_HELP}; a state id exports its lineage, "
                    "thread:ID the whole thread")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--sign", metavar="KEY", action="append", default=[],
                   help="sign the bundle with this private key file (repeatable)")


def _add_file(help: str) -> Any:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help=help)
    return add


COMMANDS = [
    Command("stats", "what is stored and what sharing saves", stats, pages=True,
            description="States of every client, assets by kind (bytes as stored, after "
                        "compression), and the logical size a copy of everything per state "
                        "would take (content bytes) against what is stored."),
    Command("gc", "remove content no state reaches (asks first; --dry-run)", gc, _add_gc,
            description="Remove every asset no stored state reaches. Asks first on a "
                        "terminal (after a dry run that says what would go); scripts pass "
                        "--yes; --dry-run only says what would go."),
    Command("verify", "re-hash stored content; exit 1 on any problem", verify, _add_verify,
            pages=True,
            description="Re-hash the stored bytes of every asset and state (or of REF and "
                        "everything it reaches) and resolve every reference; lists what is "
                        "corrupt, missing or undecodable and exits 1 if anything is."),
    Command("export", "write REF to a verifiable bundle file", export, _add_export,
            description="Write a bundle of REF: a state id (or agent:NAME, session:ID, "
                        "conversation:ID) with its lineage, thread:ID with every checkpoint "
                        "and write of the thread; with every asset they reach. verify-bundle "
                        "checks it offline, import loads it elsewhere."),
    Command("import", "load a bundle file into the store (same ids, same digests)", import_,
            _add_file("the bundle to load"),
            description="Verify a bundle, then load its states and assets (same ids, same "
                        "digests); prints the head state's id."),
]
