"""``immagent prove``: an inclusion proof that one message (a session's item, a checkpoint's
value) is in a state, without the rest of its history; ``immagent verify-proof``: checks
one offline, against a state digest the verifier knows or the attestations it carries and
a trust policy (exit statuses as ``verify-bundle``'s: corrupt, untrusted, unusable)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from immagent.assets import Item, Kind, Message, Value
from immagent.audit import files
from immagent.audit.proofs import MAX_BYTES, ProofResult, verify_proof
from immagent.cli.clients import view_of
from immagent.cli.context import Context
from immagent.cli.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNTRUSTED,
    EXIT_UNUSABLE,
    EXIT_USAGE,
    CLIError,
)
from immagent.cli.history import add_target, target
from immagent.cli.render import element_json, element_line, human_bytes, jsonable
from immagent.cli.spec import Command, count
from immagent.cli.trust import add_trust_options, policy, signer_lines
from immagent.exceptions import (
    ExtraNotInstalledError,
    ProofError,
    UntrustedError,
    ValidationError,
)

__all__ = ["COMMANDS"]

#: ProofError problems that mean "checked, and it does not hold" (exit 1); the others
#: (``malformed``: not a proof of a version this immagent reads; ``oversized``) mean it
#: could not be checked at all (exit 4).
_CORRUPT = frozenset({"truncated", "tampered", "not_in_state", "wrong_state"})


# -- prove -----------------------------------------------------------------------------------

def prove(ctx: Context, args: argparse.Namespace) -> int:
    """Write a proof that one element of a state is in it: to FILE with -o, else stdout."""
    if args.output is None:
        if ctx.out.as_json:
            raise CLIError("--json prints what the proof shows, not the proof: write the "
                           "proof with -o FILE", EXIT_USAGE)
        if ctx.out.terminal.stdout_tty:
            raise CLIError("a proof is binary: write it to a file with -o FILE, or "
                           "redirect stdout (> FILE)", EXIT_USAGE)
    dest = None if args.output is None else _destination(args.output, args.force)
    row = target(ctx, args)
    store = ctx.store()
    element: int | bytes = args.digest if args.digest is not None else args.message - 1
    try:
        document = ctx.run(store.prove(row.id, element=element, include_body=not args.no_body,
                                       attested=not args.no_attestations))
    except ValidationError as e:
        if e.field != "element":
            raise
        raise CLIError(_not_there(ctx, row, args), EXIT_USAGE) from e
    # Checked before it leaves: what is written is a proof that holds for this state.
    shown = verify_proof(document, row.digest)
    if dest is None:
        ctx.out.flush()
        sys.stdout.buffer.write(document)
        sys.stdout.buffer.flush()
        return EXIT_OK
    file = files.TempFile(dest)
    try:
        file.commit(document)
    finally:
        file.discard()
    noun = _noun(shown)
    if ctx.out.as_json:
        ctx.out.json({"file": str(dest), "bytes": len(document), "state": str(row.id),
                      "state_digest": row.digest.hex(), "position": shown.index + 1,
                      "length": shown.length, "digest": shown.digest.hex(),
                      "body": shown.element is not None,
                      "attestations": [s.key_id for s in shown.signers]})
        return EXIT_OK
    ctx.out.line(f"wrote {dest} ({human_bytes(len(document))}): {noun} "
                 f"[{shown.index + 1}] of {shown.length} is in state {row.id}")
    ctx.out.line(f"  state digest  {row.digest.hex()}")
    ctx.out.line(f"  {noun:<13} {shown.digest.hex()}" + ("" if shown.element is not None
                                                         else " (its body left out)"))
    if shown.signers:
        ctx.out.line(f"  attestations  {', '.join(s.key_id for s in shown.signers)}")
    ctx.out.line(f"check it offline: immagent verify-proof {dest} --state-digest "
                 f"{row.digest.hex()}")
    return EXIT_OK


def _destination(output: str, force: bool) -> Path:
    """Where -o writes: a new file, or with --force a regular file to replace."""
    path = Path(output)
    if path.is_dir() and not path.is_symlink():
        raise CLIError(f"{path} is a directory: name the proof file to write", EXIT_USAGE)
    if os.path.lexists(path) and not force:
        raise CLIError(f"{path} already exists (use --force to overwrite it)", EXIT_USAGE)
    return files.writable_path(path)


def _not_there(ctx: Context, row: Any, args: argparse.Namespace) -> str:
    """A proof of an element the state does not hold: say which and how many it holds."""
    view = view_of(row)
    head = view.conversation(row)
    holds = 0
    if head is not None:
        found = ctx.run(ctx.store().read_nodes([head]))
        holds = found[0][0].length if found else 0
    wanted = (f"no element with digest {args.digest.hex()}" if args.digest is not None
              else f"no {view.elements[:-1]} {args.message}")
    return f"state {row.id} has {wanted} (it holds {holds} {view.elements})"


def _digest(value: str) -> bytes:
    """argparse type: 64 hex digits."""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise argparse.ArgumentTypeError(f"not a digest (64 hex digits): {value!r}")
    return raw


# -- verify-proof ----------------------------------------------------------------------------

def verify_proof_command(ctx: Context, args: argparse.Namespace) -> int:
    """Check a proof offline. Exit status: 0 it holds (for --state-digest, and with
    --trusted-key vouched for), 1 corrupt (it does not hold: an element not where it says,
    another state than --state-digest, a part altered, cut short, an attestation that does
    not verify), 3 intact but untrusted, 4 unusable (no such file, not a proof, a version
    this immagent does not read, too large, the signing extra missing), 2 usage."""
    trust = policy(args)
    name = "stdin" if args.file == "-" else args.file
    document = _read(args.file)
    try:
        result = verify_proof(document, args.state_digest, trust=trust)
    except UntrustedError as e:
        raise CLIError(f"{name}: {e}", EXIT_UNTRUSTED) from e
    except ProofError as e:
        raise CLIError(f"{name}: {e}",
                       EXIT_FAILURE if e.problem in _CORRUPT else EXIT_UNUSABLE) from e
    except ExtraNotInstalledError as e:
        raise CLIError(str(e), EXIT_UNUSABLE) from e
    anchored = args.state_digest is not None or trust is not None
    if ctx.out.as_json:
        ctx.out.json(_result_json(name, result, anchored))
        return EXIT_OK
    ctx.out.lines(_result_lines(name, result, args.state_digest is not None, trust))
    return EXIT_OK


def _read(file: str) -> bytes:
    """The document, read to at most one byte past the limit (a larger file is refused as
    oversized without being read whole)."""
    try:
        if file == "-":
            return sys.stdin.buffer.read(MAX_BYTES + 1)
        path = files.readable_path(file)
        with path.open("rb") as f:
            return f.read(MAX_BYTES + 1)
    except ValidationError as e:
        raise CLIError(str(e), EXIT_UNUSABLE) from e
    except OSError as e:
        raise CLIError(f"cannot read {file}: {e.strerror or e}", EXIT_UNUSABLE) from e


def _noun(r: ProofResult) -> str:
    if isinstance(r.element, Message) or r.kind == Kind.AGENT_STATE:
        return "message"
    if isinstance(r.element, Item):
        return "item"
    return "value" if isinstance(r.element, Value) else "element"


def _kind(kind: int) -> str:
    try:
        return Kind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"kind {kind} state"


def _result_lines(name: str, r: ProofResult, digest_given: bool, trust: Any
                  ) -> Iterator[str]:
    noun = _noun(r)
    yield f"{name}: OK"
    yield f"  proves  {noun} [{r.index + 1}] of {r.length} is in the {_kind(r.kind)} with " \
          f"digest {r.state_digest.hex()}"
    yield f"  {noun:<7} {r.digest.hex()}"
    if r.element is not None:
        yield f"          {element_line(r.element, 96)}"
    else:
        yield "          (its body is left out: the digest alone is shown)"
    yield from signer_lines(r.signers)
    if digest_given:
        yield "  anchored: the state digest is the one given (--state-digest)"
    if trust is not None:
        yield f"  trusted: {len(r.trusted_by)} trusted key(s) vouch for the state " \
              f"({trust.sigs_needed} needed): {', '.join(r.trusted_by)}"
    if not digest_given and trust is None:
        yield "  not anchored: the proof is consistent, but only a digest you trust makes it " \
              "evidence: compare the state digest with one you know (--state-digest HEX), " \
              "or require attestations (--trusted-key FILE)"


def _result_json(name: str, r: ProofResult, anchored: bool) -> dict[str, Any]:
    return {"file": name, "ok": True, "anchored": anchored,
            "state_digest": r.state_digest.hex(), "state_kind": _kind(r.kind),
            "position": r.index + 1, "length": r.length, "digest": r.digest.hex(),
            "element": None if r.element is None else element_json(r.element),
            "head": r.head.hex(), "signers": [jsonable(s) for s in r.signers],
            "trusted_by": list(r.trusted_by)}


def _add_prove(p: argparse.ArgumentParser) -> None:
    add_target(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--message", metavar="N", type=count(1),
                       help="the element to prove, numbered as `show` numbers messages "
                            "(a session's items, a checkpoint's values alike)")
    which.add_argument("--digest", metavar="HEX", type=_digest,
                       help="the element to prove by its digest (its first occurrence)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the proof to FILE (default: stdout, which must not be a "
                        "terminal: a proof is binary)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--no-body", action="store_true",
                   help="leave the element's body out: the proof shows its digest only")
    p.add_argument("--no-attestations", action="store_true",
                   help="leave the state's attestations out (by default the proof carries "
                        "them, so verify-proof --trusted-key can check who vouches)")


def _add_verify_proof(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the proof to check ('-': stdin)")
    p.add_argument("--state-digest", metavar="HEX", type=_digest,
                   help="the digest of the state the proof must lead to (one you trust: "
                        "recorded elsewhere, or from a verified bundle)")
    add_trust_options(p)


COMMANDS = [
    Command("prove", "write a proof that one message is in a state (nothing else of it)",
            prove, _add_prove,
            description="Write an inclusion proof: that one message of the state REF "
                        "(--message N, or --digest HEX; a session's item, a checkpoint's "
                        "value) is in it, in O(log n) digests, without the rest of the "
                        "history. It carries the state's attestations unless "
                        "--no-attestations. To FILE with -o, else to stdout (binary: "
                        "refused on a terminal). Check it with verify-proof."),
    Command("verify-proof", "check a proof file offline (no database)", verify_proof_command,
            _add_verify_proof,
            description="Check a proof offline: that the element is in the state whose "
                        "digest it leads to; with --state-digest that this is the state "
                        "you expect, with --trusted-key that enough trusted keys attested "
                        "that state. Exit status 0 it holds (and is trusted), 1 corrupt, 3 "
                        "intact but untrusted, 4 unusable (no such file, not a proof, too "
                        "large, a version this immagent does not read)."),
]
