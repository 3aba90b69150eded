"""Who vouches for what: ``keygen``, ``attest``, and the trust half of ``verify-bundle``
(its exit statuses tell corrupt, untrusted and unusable apart, as ``nix store verify``'s
do)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from immagent.attestations import attestation_of
from immagent.audit.bundle import BundleInfo
from immagent.audit.bundle import verify_bundle as check_bundle
from immagent.audit.keys import generate_key, load_signing_key
from immagent.audit.trust import Signer, TrustPolicy
from immagent.cli.context import Context
from immagent.cli.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNTRUSTED,
    EXIT_UNUSABLE,
    EXIT_USAGE,
    CLIError,
)
from immagent.cli.refs import REF_HELP, add_ref
from immagent.cli.render import human_bytes, local_time
from immagent.cli.spec import Command, count
from immagent.exceptions import (
    BundleError,
    ExtraNotInstalledError,
    UntrustedError,
    ValidationError,
    install_command,
)

__all__ = ["COMMANDS", "add_trust_options", "bundle_lines", "policy", "signer_lines"]


def keygen(ctx: Context, args: argparse.Namespace) -> int:
    """Write a new Ed25519 key pair: PATH (private, 0600) and PATH.pub."""
    key = generate_key(args.path)
    public = f"{args.path}.pub"
    if ctx.out.as_json:
        ctx.out.json({"key_id": key.public.id, "private_key": str(args.path),
                      "public_key": public})
        return EXIT_OK
    ctx.out.line(f"wrote private key {args.path} (mode 0600: keep it secret; it is never "
                 "stored or exported)")
    ctx.out.line(f"wrote public key  {public} (give it to verifiers: --trusted-key {public})")
    ctx.out.line(f"key id {key.public.id}")
    return EXIT_OK


def attest(ctx: Context, args: argparse.Namespace) -> int:
    """Sign a stored state with KEY and keep the signature as an attestation."""
    key = load_signing_key(args.key)
    state = ctx.resolve(args.ref, write=True).row
    store = ctx.store(write=True)
    row = ctx.run(store.attest(state.id, key, note=args.note or ""))
    _, statement, subject = attestation_of(row.kind, row.stream, row.refs, row.body)
    if ctx.out.as_json:
        ctx.out.json({"attestation": str(row.id), "state": str(subject.id),
                      "digest": subject.digest.hex(), "key_id": key.public.id,
                      "note": statement.note})
        return EXIT_OK
    ctx.out.line(f"attested {subject.id} (digest {subject.digest.hex()})")
    ctx.out.line(f"  by       {key.public.id}" + (f"  {statement.note!r}" if statement.note
                                                  else ""))
    ctx.out.line(f"  kept as  attestation {row.id} (exported with the state's bundles)")
    return EXIT_OK


def verify_bundle(ctx: Context, args: argparse.Namespace) -> int:
    """Check a bundle offline, and with --trusted-key who vouches for it. Exit status: 0
    intact (and trusted), 1 corrupt, 3 intact but untrusted, 4 unusable (cannot be
    checked: no such file, not a bundle, a format this immagent does not read, or the
    signing extra missing), 2 a usage error (a bad --trusted-key file among them)."""
    path = Path(args.file)
    trust = policy(args)
    if not path.is_file():
        raise CLIError(f"no bundle file at {path}", EXIT_UNUSABLE)
    try:
        info = check_bundle(path, trust=trust)
    except UntrustedError as e:
        raise CLIError(str(e), EXIT_UNTRUSTED) from e
    except BundleError as e:
        raise CLIError(str(e), EXIT_UNUSABLE if e.unusable else EXIT_FAILURE) from e
    except ExtraNotInstalledError as e:
        raise CLIError(str(e), EXIT_UNUSABLE) from e
    except ValidationError as e:  # the file itself could not be read
        raise CLIError(str(e), EXIT_UNUSABLE) from e
    if ctx.out.as_json:
        ctx.out.json(info)
        return EXIT_OK
    ctx.out.lines(bundle_lines(info, f"{path}: OK"))
    if trust is not None:
        ctx.out.line(f"  trusted: {len(info.trusted_by)} trusted key(s) vouch for it "
                     f"({trust.sigs_needed} needed): {', '.join(info.trusted_by)}")
    return EXIT_OK


def policy(args: argparse.Namespace) -> TrustPolicy | None:
    """The trust policy of --trusted-key and --sigs-needed (usage errors for bad ones)."""
    if not args.trusted_key:
        if args.sigs_needed is not None:
            raise CLIError("--sigs-needed needs --trusted-key", EXIT_USAGE)
        return None
    try:
        return TrustPolicy.from_files(args.trusted_key, args.sigs_needed or 1)
    except ExtraNotInstalledError as e:
        raise CLIError(str(e), EXIT_UNUSABLE) from e


def bundle_lines(info: BundleInfo, headline: str) -> Iterator[str]:
    """What a bundle holds, for people (export and verify-bundle)."""
    yield headline
    yield f"  head    {info.head}  digest {info.head_digest.hex()}"
    what = "the head's lineage" if info.lineage else "a set of states"
    yield f"  states  {len(info.agents)} ({what})"
    if info.attestations:
        yield f"  attestations  {len(info.attestations)}"
    yield f"  assets  {info.assets} ({human_bytes(info.asset_bytes)})"
    yield f"  file    {human_bytes(info.file_bytes)}, format version {info.version}"
    yield from signer_lines(info.signers)


def signer_lines(signers: tuple[Signer, ...]) -> Iterator[str]:
    """One line per signature: who, what, and whether it was checked."""
    for s in signers:
        checked = {True: "verified", False: "INVALID",
                   None: f"not checked: {install_command('sign')}"}[s.verified]
        what = "signed the bundle" if s.purpose == "bundle" else \
            f"attests {', '.join(s.subjects)}"
        when = "" if not s.signed_at else f" on {local_time(_time(s.signed_at))}"
        note = f" {s.note!r}" if s.note else ""
        yield f"  {s.key_id} {what}{when}{note} ({checked})"


def _time(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def _add_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="where to write the private key (PATH.pub: "
                                                "the public key)")


def _add_attest(p: argparse.ArgumentParser) -> None:
    add_ref(p, help=f"the state to vouch for: {REF_HELP}")
    p.add_argument("--key", metavar="KEY", required=True, help="your private key file")
    p.add_argument("--note", metavar="TEXT", help="what you vouch for (e.g. 'reviewed')")


def _add_verify_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the bundle to check")
    add_trust_options(p)


def add_trust_options(p: argparse.ArgumentParser) -> None:
    """--trusted-key and --sigs-needed (read back with ``policy``)."""
    p.add_argument("--trusted-key", metavar="FILE", action="append", default=[],
                   help="a public key file whose signatures are trusted (repeatable)")
    p.add_argument("--sigs-needed", metavar="N", type=count(1),
                   help="how many distinct trusted keys must vouch (default 1)")


COMMANDS = [
    Command("keygen", "write a new Ed25519 key pair: PATH (private) and PATH.pub", keygen,
            _add_keygen),
    Command("attest", "sign a stored state and keep the signature with it", attest,
            _add_attest,
            description="Sign the state REF names with KEY and store the signature as an "
                        "attestation beside it: exported with its bundles, checked by "
                        "verify, removed by gc once the state is gone."),
    Command("verify-bundle", "check a bundle file offline (no database)", verify_bundle,
            _add_verify_bundle,
            description="Check a bundle offline: every digest, reference and state digest, "
                        "and with --trusted-key who vouches for it. Exit status 0 intact (and "
                        "trusted), 1 corrupt, 3 intact but untrusted, 4 unusable."),
]
