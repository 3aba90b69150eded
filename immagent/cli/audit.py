"""Storage and audit commands: ``stats``, ``gc``, ``verify``, ``export``, ``import``
(``verify-bundle``, ``keygen`` and ``attest`` are ``cli/trust.py``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immagent.audit.bundle import BundleInfo
from immagent.audit.keys import load_signing_key
from immagent.cli.context import Context
from immagent.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError
from immagent.cli.render import Progress, human_bytes, jsonable, table
from immagent.cli.summary import agent_json
from immagent.cli.trust import bundle_lines
from immagent.store.stats import StoreStats

if TYPE_CHECKING:
    from immagent.audit.verify import VerifyReport

__all__ = ["export", "gc", "import_", "stats", "verify"]


# -- stats / gc ----------------------------------------------------------------------------

def stats(ctx: Context, args: argparse.Namespace) -> int:
    """Print what is stored and how much structural sharing saves."""
    s = ctx.run(ctx.store().stats())
    if ctx.out.as_json:
        ctx.out.json(_stats_json(s))
    else:
        ctx.out.lines(_stats_lines(s))
    return EXIT_OK


def _stats_json(s: StoreStats) -> dict[str, Any]:
    return {
        "agents": s.agents, "states_by_kind": s.states_by_kind, "assets": s.assets,
        "assets_by_kind": {k: {"count": n, "bytes": b} for k, (n, b) in s.assets_by_kind.items()},
        "payload_bytes": s.payload_bytes, "disk_bytes": s.disk_bytes,
        "logical_bytes": s.logical_bytes, "saved_bytes": s.logical_bytes - s.payload_bytes,
        "sharing_ratio": round(s.sharing_ratio, 3),
    }


def _stats_lines(s: StoreStats) -> Iterator[str]:
    rows = [(kind, str(n), human_bytes(b)) for kind, (n, b) in s.assets_by_kind.items()]
    rows.append(("total", str(s.assets), human_bytes(s.payload_bytes)))
    yield f"agent states   {s.agents}"
    others = [f"{n} {kind.replace('_', ' ')}" for kind, n in s.states_by_kind.items()
              if kind != "agent_state"]
    if others:
        yield f"other states   {', '.join(others)}"
    yield ""
    yield from table(("ASSETS", "COUNT", "BYTES"), rows, right=(1, 2))
    yield ""
    saved = s.logical_bytes - s.payload_bytes
    sizes = [
        ("stored (payload)", human_bytes(s.payload_bytes), "asset bodies, each stored once"),
        ("on disk", human_bytes(s.disk_bytes), "tables and indexes"),
        ("logical", human_bytes(s.logical_bytes),
         "a copy of prompt + history per state would take"),
        ("sharing saves", human_bytes(saved),
         f"logical / stored = {s.sharing_ratio:.1f}x" if saved >= 0
         else "nothing yet: short histories cost more in chain links than they share"),
    ]
    yield from table(("SIZE", "BYTES", "MEANING"), sizes, right=(1,))


def gc(ctx: Context, args: argparse.Namespace) -> int:
    """Remove every asset no stored agent state can reach."""
    result = ctx.run(ctx.store(write=True).gc())
    if ctx.out.as_json:
        ctx.out.json({"assets_removed": result.assets_removed,
                      "bytes_freed": result.bytes_freed, "assets_kept": result.assets_kept,
                      "removed_by_kind": dict(result),
                      "attestations_removed": result.states_removed})
    else:
        ctx.out.line(f"removed {result.assets_removed} assets "
                     f"({human_bytes(result.bytes_freed)}), kept {result.assets_kept}")
        if result.states_removed:
            ctx.out.line(f"removed {result.states_removed} attestation(s) of deleted states")
    return EXIT_OK


# -- verify --------------------------------------------------------------------------------

def verify(ctx: Context, args: argparse.Namespace) -> int:
    """Re-hash what is stored (everything, or what one state reaches); exit 1 on problems."""
    store = ctx.store()
    agent = ctx.load(args.id) if args.id is not None else None
    progress = Progress("verified assets")
    try:
        report: VerifyReport = ctx.run(store.verify(agent, progress=progress))
    finally:
        progress.finish()
    if ctx.out.as_json:
        ctx.out.json(jsonable(report) | {"ok": report.ok, "problems": report.problems})
    else:
        ctx.out.lines(report.lines())
    if not report.ok:
        ctx.out.note(f"immagent: error: verify found {report.problems} problem(s)")
    return EXIT_OK if report.ok else EXIT_FAILURE


# -- bundles -------------------------------------------------------------------------------

def export(ctx: Context, args: argparse.Namespace) -> int:
    """Write the state ID (its lineage and what it reaches) to a bundle file."""
    path = Path(args.file)
    if path.is_dir() and not path.is_symlink():
        raise CLIError(f"{path} is a directory: name the bundle file to write")
    # lexists: a symlink (even a dangling one) is something there; --force still replaces
    # only a regular file (Store.export refuses anything else, naming it).
    if os.path.lexists(path) and not args.force:
        raise CLIError(f"{path} already exists (use --force to overwrite it)")
    keys = [load_signing_key(k) for k in args.sign]
    store = ctx.store()
    agent = ctx.load(args.id)
    info = ctx.run(store.export(agent, path, sign=keys))
    _show_bundle(ctx, info, f"exported {agent.id} to {path}")
    return EXIT_OK


def import_(ctx: Context, args: argparse.Namespace) -> int:
    """Load a bundle into the store (verifying it first); print the imported head's id."""
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"no bundle file at {path}")
    store = ctx.store(create=True)
    agent = ctx.run(store.import_bundle(path))
    if ctx.out.as_json:
        ctx.out.json(agent_json(agent))
    else:
        ctx.out.line(str(agent.id))
    return EXIT_OK


def _show_bundle(ctx: Context, info: BundleInfo, headline: str) -> None:
    if ctx.out.as_json:
        ctx.out.json(info)
        return
    ctx.out.lines(bundle_lines(info, headline))
