"""Signed statements about states, and attestations: such a signature kept in the store.

What is signed is always a ``Statement``: canonical msgpack naming its purpose and the
states it is about by (id, kind, digest), prefixed with ``DOMAIN`` before it is signed
(Ed25519, ``immagent.audit.keys``). The domain string keeps an immagent signature from
ever verifying as a signature of anything else (another protocol, another version); the
purpose keeps a bundle signature from passing as an attestation and back.

* A **bundle signature** (``purpose="bundle"``) names the bundle format version, every
  head of the bundle (its states that no other state of it names as parent, attestations
  aside), and the bundle's content checksum (blake3 of every byte before the signatures).
  A signature over other heads, another format or a bundle altered in any byte therefore
  never verifies for this one.
* An **attestation** (``purpose="attestation"``) names one state (its subject) and an
  optional note (what the signer vouches for: "reviewed", "approved by …"); a reviewer can
  add one after the fact (``EventLog.attest``). It is kept as a state of its own kind,
  ATTESTATION: ``parent_id`` and ``stream`` name its subject (its stream is the subject's
  id, so a state's attestations are one index probe), ``refs`` are empty, ``body`` is the
  ``Signed`` record (statement, public key, signature). Its rules are here, in the core,
  so verify, gc and bundles understand it without the signing extra; only checking the
  Ed25519 signature itself needs ``cryptography``.

An attestation vouches for its subject's content (the digest pins the prompt, the whole
conversation, the model and its config); a bundle signature vouches for the whole file
(ids, lineage, timestamps, every record). Everything untrusted is bounded before it is
decoded: a statement is at most ``MAX_STATEMENT`` bytes and names at most
``MAX_SUBJECTS`` states.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal
from uuid import UUID

import blake3
import msgspec

from immagent.assets import Digest, Kind, encode

__all__ = [
    "DOMAIN",
    "KEY_BYTES",
    "MAX_NOTE_BYTES",
    "MAX_STATEMENT",
    "MAX_SUBJECTS",
    "SIGNATURE_BYTES",
    "Signed",
    "Statement",
    "Subject",
    "attestation_of",
    "decode_signed",
    "decode_statement",
    "key_id",
    "signed_message",
]

#: Prefix of every message an immagent key signs (domain separation, with a version).
DOMAIN: Final = b"immagent-signed-statement/1\x00"
#: An Ed25519 public key and signature, in bytes.
KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
#: Largest statement accepted (a bundle of many heads names each in ~60 bytes).
MAX_STATEMENT: Final = 1 << 20
#: Most states one statement may name.
MAX_SUBJECTS: Final = 10_000
#: Longest note an attestation may carry (UTF-8 bytes).
MAX_NOTE_BYTES: Final = 1_000

Purpose = Literal["bundle", "attestation"]


class Subject(msgspec.Struct, frozen=True, array_like=True):
    """A state a statement is about: its id, kind and content digest."""

    id: UUID
    kind: int
    digest: Digest


class Statement(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What a key signs (canonical msgpack, after ``DOMAIN``). ``format`` and ``checksum``
    are a bundle's (format version, content checksum); ``note`` an attestation's;
    ``signed_at`` is the signer's clock (microseconds since the epoch, UTC), a claim of
    the signer like the rest. Field names are part of what is signed: never change them."""

    purpose: Purpose
    subjects: tuple[Subject, ...]
    format: int = 0
    checksum: bytes = b""
    note: str = ""
    signed_at: int = 0

    def encode(self) -> bytes:
        """The canonical bytes that are signed (after ``DOMAIN``)."""
        return encode(self)

    @property
    def time(self) -> datetime | None:
        """``signed_at`` as a time (None when not given)."""
        if not self.signed_at:
            return None
        return datetime.fromtimestamp(self.signed_at / 1_000_000, UTC)


class Signed(msgspec.Struct, frozen=True, array_like=True):
    """A statement with the public key that signed it and the signature: what a bundle's
    signature record and an attestation's body hold."""

    statement: bytes  # canonical Statement bytes, exactly as signed
    key: bytes  # raw Ed25519 public key
    signature: bytes  # Ed25519 signature of DOMAIN + statement

    @property
    def key_id(self) -> str:
        """The signer's key id (``key_id``)."""
        return key_id(self.key)


_statement_decoder = msgspec.msgpack.Decoder(Statement)
_signed_decoder = msgspec.msgpack.Decoder(Signed)


def signed_message(statement: bytes) -> bytes:
    """The bytes a key signs for ``statement``: the domain, then the statement."""
    return DOMAIN + statement


def key_id(key: bytes) -> str:
    """A short, stable name of a public key for people: ``ed25519:`` and 16 hex digits of
    a hash of the raw key (the whole key is in every signature)."""
    return "ed25519:" + blake3.blake3(b"immagent-key\x00" + key).hexdigest()[:16]


def decode_statement(raw: object) -> Statement:
    """A statement from untrusted bytes, bounded and checked before use (ValueError naming
    what is wrong): at most MAX_STATEMENT bytes, canonical (re-encoding gives the same
    bytes, so one statement has one form), at most MAX_SUBJECTS subjects with 32-byte
    digests, a note of at most MAX_NOTE_BYTES."""
    if not isinstance(raw, bytes):
        raise ValueError("a statement is bytes")
    if len(raw) > MAX_STATEMENT:
        raise ValueError(f"a statement of {len(raw)} bytes is larger than the limit of "
                         f"{MAX_STATEMENT}")
    try:
        statement = _statement_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ValueError(f"malformed statement: {_reason(e)}") from None
    if len(statement.subjects) > MAX_SUBJECTS:
        raise ValueError(f"a statement names {len(statement.subjects)} states, more than "
                         f"{MAX_SUBJECTS}")
    for subject in statement.subjects:
        if len(subject.digest) != 32 or isinstance(subject.kind, bool) \
                or not 0 < subject.kind < 256:
            raise ValueError(f"a statement names state {subject.id} with a malformed kind "
                             "or digest")
    if len(statement.note.encode("utf-8", "surrogatepass")) > MAX_NOTE_BYTES:
        raise ValueError(f"a statement's note is longer than {MAX_NOTE_BYTES} bytes")
    if statement.signed_at < 0 or statement.format < 0:
        raise ValueError("a statement's time and format are not negative")
    if statement.encode() != raw:
        raise ValueError("a statement is not in its canonical form")
    return statement


def decode_signed(raw: object) -> tuple[Signed, Statement]:
    """A ``Signed`` record from untrusted bytes and its statement, both checked (ValueError
    naming what is wrong): a 32-byte key, a 64-byte signature, a valid statement. The
    signature itself is checked by ``immagent.audit.keys`` (it needs the signing extra)."""
    if not isinstance(raw, bytes) or len(raw) > MAX_STATEMENT + 256:
        raise ValueError("a signature record is bytes within the statement limit")
    try:
        signed = _signed_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ValueError(f"malformed signature record: {_reason(e)}") from None
    return signed, check_signed(signed)


def check_signed(signed: Signed) -> Statement:
    """The statement of a ``Signed`` record whose key and signature have the right sizes
    (ValueError otherwise)."""
    if len(signed.key) != KEY_BYTES:
        raise ValueError(f"a public key is {KEY_BYTES} bytes, this one {len(signed.key)}")
    if len(signed.signature) != SIGNATURE_BYTES:
        raise ValueError(f"a signature is {SIGNATURE_BYTES} bytes, this one "
                         f"{len(signed.signature)}")
    return decode_statement(signed.statement)


def attestation_of(kind: int, stream: str, refs: tuple[Digest, ...], body: bytes
                   ) -> tuple[Signed, Statement, Subject]:
    """The signature, statement and subject an ATTESTATION state row holds, checked against
    the row (ValueError naming what is wrong): no refs, an attestation statement about
    exactly one state, whose id is the row's stream."""
    if kind != Kind.ATTESTATION:
        raise ValueError(f"kind {kind} is not an attestation")
    if refs:
        raise ValueError("an attestation pins no assets")
    signed, statement = decode_signed(body)
    if statement.purpose != "attestation" or len(statement.subjects) != 1:
        raise ValueError("an attestation's statement is about exactly one state")
    (subject,) = statement.subjects
    if stream != str(subject.id):
        raise ValueError(f"an attestation of state {subject.id} is filed under {stream!r}")
    return signed, statement, subject


def _reason(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)
