"""Trust: whose signatures a verifier accepts, and how many it needs (Nix's
``trusted-public-keys`` and ``--sigs-needed``).

A ``TrustPolicy`` is a set of trusted public keys and a number N. A bundle (or a state) is
*trusted* when at least N distinct trusted keys vouch for it with a valid signature: a
bundle signature (over the whole file) or, for a bundle, attestations of every one of its
heads (each vouches for a head's content; ``immagent.attestations`` says what each kind of
signature covers). Checking is two separate questions, as in Nix: *corrupt* (a byte, a
digest, a signature that does not verify or is over something else) and *untrusted*
(intact, but too few trusted signers); the CLI gives each its own exit status.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

from immagent.attestations import key_id
from immagent.audit.keys import PublicKey, load_public_key
from immagent.exceptions import UntrustedError, ValidationError

__all__ = ["MAX_TRUSTED_KEYS", "Signer", "TrustPolicy"]

#: Most trusted keys one policy may name.
MAX_TRUSTED_KEYS: Final = 1024


class Signer(msgspec.Struct, frozen=True):
    """One signature a bundle carries: who signed (``key_id``, ``key``), what
    (``purpose``: "bundle" or "attestation", and the states it names), whether it verified
    (None: not checked, the signing extra is not installed), and the signer's note and
    time (claims of the signer)."""

    key_id: str
    key: bytes
    purpose: str
    subjects: tuple[str, ...]
    verified: bool | None
    note: str = ""
    signed_at: int = 0


class TrustPolicy:
    """Trusted public keys and how many distinct ones must vouch (``sigs_needed``, at least
    1 and at most the number of keys). ``from_files`` reads the keys from PEM files."""

    __slots__ = ("keys", "sigs_needed")

    def __init__(self, keys: Iterable[PublicKey], sigs_needed: int = 1) -> None:
        found = list(keys) if not isinstance(keys, PublicKey) else [keys]
        for i, key in enumerate(found):
            if not isinstance(key, PublicKey):
                raise ValidationError(f"keys[{i}]", "must be a PublicKey", None)
        unique = frozenset(found)
        if not unique:
            raise ValidationError("keys", "a trust policy needs at least one trusted key",
                                  None)
        if len(unique) > MAX_TRUSTED_KEYS:
            raise ValidationError("keys", f"at most {MAX_TRUSTED_KEYS} trusted keys", None)
        if isinstance(sigs_needed, bool) or not isinstance(sigs_needed, int) \
                or not 1 <= sigs_needed <= len(unique):
            raise ValidationError("sigs_needed", f"must be an int from 1 to the number of "
                                  f"distinct trusted keys ({len(unique)}), got "
                                  f"{sigs_needed!r}", sigs_needed)
        #: The trusted keys.
        self.keys: frozenset[PublicKey] = unique
        #: How many distinct trusted keys must vouch.
        self.sigs_needed: int = sigs_needed

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike[str]],
                   sigs_needed: int = 1) -> TrustPolicy:
        """A policy trusting the public keys in these PEM files (``keygen``'s ``.pub``)."""
        if isinstance(paths, str | bytes | os.PathLike):
            raise ValidationError("trusted_key", "must be a list of key files", None)
        return cls([load_public_key(p) for p in paths], sigs_needed)

    def __repr__(self) -> str:
        ids = ", ".join(sorted(k.id for k in self.keys))
        return f"TrustPolicy([{ids}], sigs_needed={self.sigs_needed})"

    def trusted(self, key: bytes) -> bool:
        """Whether the raw public key ``key`` is one of the trusted keys."""
        return any(k.raw == key for k in self.keys)

    def require(self, vouching: Iterable[bytes], signers: Iterable[Signer], what: str,
                hint: str = "") -> tuple[str, ...]:
        """The key ids of the trusted keys among ``vouching`` (raw keys whose valid
        signatures vouch for ``what``), sorted; UntrustedError naming who signed and who is
        trusted when fewer than ``sigs_needed`` distinct ones do (``hint``: what to do)."""
        found = {k for k in vouching if self.trusted(k)}
        if len(found) < self.sigs_needed:
            seen = sorted({s.key_id for s in signers})
            raise UntrustedError(
                f"{what}: intact, but vouched for by {len(found)} trusted key(s) where "
                f"{self.sigs_needed} are needed (signed by: {', '.join(seen) or 'nobody'}; "
                f"trusted: {', '.join(sorted(k.id for k in self.keys))})"
                + (f"; {hint}" if hint else ""))
        return tuple(sorted(key_id(k) for k in found))
