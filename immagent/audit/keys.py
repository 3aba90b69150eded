"""Ed25519 keys: generate a key pair, read key files safely, sign and check statements.

Signing is an extra (``pip install 'immagent-core[sign]'``: the ``cryptography`` package),
imported on first use; without it every call here that needs it raises
``ExtraNotInstalledError`` naming that command. Ed25519 because its keys and signatures
are small (32 and 64 bytes), signing is deterministic (no nonce to get wrong) and it is
what git (SSH signing), Nix, minisign and Sigstore use.

Key files are the standard PEM forms, so ``openssl`` and other tools read and make them:
the private key is unencrypted PKCS#8 (``-----BEGIN PRIVATE KEY-----``), written with mode
0600 and refused when group or others may read it (as ssh refuses one); the public key is
SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``), beside it as ``PATH.pub``. A key
file is untrusted input: it must be a regular file (a symlink, FIFO or device is refused
before it is read, never followed or blocked on), at most ``MAX_KEY_FILE`` bytes, and of
the expected half: a private key given where a public one is expected is refused, so a
secret is never handed to a verifier by mistake. Private keys are never logged, stored or
exported: a ``SigningKey`` shows only its public key id.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from immagent.attestations import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    Signed,
    Statement,
    key_id,
    signed_message,
)
from immagent.exceptions import ExtraNotInstalledError, ValidationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["MAX_KEY_FILE", "PublicKey", "SigningKey", "generate_key", "load_public_key",
           "load_signing_key", "require_signing", "signing_available", "verify_signed"]

#: Largest key file read (a PEM Ed25519 key is about 120 bytes).
MAX_KEY_FILE: Final = 4096
_PRIVATE_PEM = b"-----BEGIN PRIVATE KEY-----"
_PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"
#: PEM headers of private keys in other forms (refused where a public key is expected).
_OTHER_PRIVATE = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"-----BEGIN OPENSSH PRIVATE KEY",
                  b"-----BEGIN EC PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----")


def signing_available() -> bool:
    """Whether the signing extra (``cryptography``) is installed."""
    try:
        _ed25519()
    except ExtraNotInstalledError:
        return False
    return True


def require_signing(what: str) -> None:
    """ExtraNotInstalledError naming the install command unless signatures can be checked."""
    _ed25519(what)


def _ed25519(what: str = "signing and checking signatures") -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ExtraNotInstalledError(what, "sign") from None
    return ed25519


def _serialization() -> Any:
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


class PublicKey:
    """An Ed25519 public key (32 raw bytes); ``id`` is its short name."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise ValidationError("key", f"an Ed25519 public key is {KEY_BYTES} bytes", None)
        self.raw = raw

    @property
    def id(self) -> str:
        """``ed25519:`` and 16 hex digits (``attestations.key_id``)."""
        return key_id(self.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.id})"

    def pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM form (what ``PATH.pub`` holds)."""
        s = _serialization()
        key = _ed25519().Ed25519PublicKey.from_public_bytes(self.raw)
        data: bytes = key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
        return data


class SigningKey:
    """An Ed25519 private key, read from a key file (``load_signing_key``) or made by
    ``generate_key``. It never shows its secret: ``repr`` names the public key only."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes_raw()
        #: The public half.
        self.public = PublicKey(raw)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.id})"

    def __reduce__(self) -> Any:  # never pickled, so never written anywhere by accident
        raise TypeError("a SigningKey cannot be pickled")

    def sign(self, statement: Statement, *, now: Callable[[], datetime] | None = None
             ) -> Signed:
        """Sign ``statement`` (stamped with the time now unless it has one)."""
        if not statement.signed_at:
            moment = (now or _now)()
            statement = _stamped(statement, moment)
        raw = statement.encode()
        return Signed(statement=raw, key=self.public.raw,
                      signature=self._key.sign(signed_message(raw)))


def _now() -> datetime:
    return datetime.now(UTC)


def _stamped(statement: Statement, moment: datetime) -> Statement:
    micros = int(moment.timestamp() * 1_000_000)
    return msgspec.structs.replace(statement, signed_at=micros)


def verify_signed(signed: Signed) -> bool:
    """Whether ``signed.signature`` is ``signed.key``'s Ed25519 signature of its statement
    (after ``DOMAIN``). Sizes are checked first; needs the signing extra."""
    ed25519 = _ed25519("checking signatures")
    if len(signed.key) != KEY_BYTES or len(signed.signature) != SIGNATURE_BYTES:
        return False
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(signed.key).verify(
            signed.signature, signed_message(signed.statement))
    except (InvalidSignature, ValueError):
        return False
    return True


# -- key files ------------------------------------------------------------------------------


def generate_key(path: str | os.PathLike[str]) -> SigningKey:
    """Make a new key pair: the private key at ``path`` (mode 0600, created exclusively:
    an existing file is never overwritten) and the public key at ``path.pub``. Returns the
    key; ValidationError naming the path if either file exists or cannot be written."""
    ed25519 = _ed25519("generating a key")
    s = _serialization()
    private = _path("path", path)
    public = private.with_name(private.name + ".pub")
    key = ed25519.Ed25519PrivateKey.generate()
    secret = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    signing = SigningKey(key)
    _write_new(private, secret, 0o600)
    try:
        _write_new(public, signing.public.pem(), 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            private.unlink()
        raise
    return signing


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The private key in the key file at ``path`` (see the module docstring for what is
    refused); ValidationError naming the path and what is wrong."""
    source = _path("key", path)
    data, mode = _read_key_file("key", source)
    if mode & 0o077:
        raise ValidationError("key", f"{source} may be read by others (mode "
                              f"{mode & 0o777:o}); a private key must be 0600 "
                              f"(chmod 600 {source})", str(source))
    if data.lstrip().startswith(_PUBLIC_PEM):
        raise ValidationError("key", f"{source} is a public key; signing needs the private "
                              "key file", str(source))
    if not data.lstrip().startswith(_PRIVATE_PEM):
        raise ValidationError("key", f"{source} is not an unencrypted PEM private key "
                              "(PKCS#8, as `immagent keygen` writes)", str(source))
    s = _serialization()
    ed25519 = _ed25519()
    try:
        key = s.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValidationError("key", f"{source} is not a readable private key ({e})",
                              str(source)) from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm and kin
        raise ValidationError("key", f"{source} holds an unsupported key ({e})",
                              str(source)) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValidationError("key", f"{source} is not an Ed25519 key", str(source))
    return SigningKey(key)


def load_public_key(path: str | os.PathLike[str], field: str = "trusted_key") -> PublicKey:
    """The public key in the key file at ``path``; a private key here is refused (pass its
    ``.pub``), as is anything but an Ed25519 SubjectPublicKeyInfo PEM."""
    source = _path(field, path)
    data, _ = _read_key_file(field, source)
    head = data.lstrip()
    if head.startswith(_PRIVATE_PEM) or head.startswith(_OTHER_PRIVATE):
        raise ValidationError(field, f"{source} is a private key; pass its public half "
                              f"({source}.pub), never a private key, to a verifier",
                              str(source))
    if not head.startswith(_PUBLIC_PEM):
        raise ValidationError(field, f"{source} is not a PEM public key", str(source))
    s = _serialization()
    ed25519 = _ed25519()
    try:
        key = s.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValidationError(field, f"{source} is not a readable public key ({e})",
                              str(source)) from None
    except Exception as e:
        raise ValidationError(field, f"{source} holds an unsupported key ({e})",
                              str(source)) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValidationError(field, f"{source} is not an Ed25519 key", str(source))
    return PublicKey(key.public_bytes_raw())


def _path(field: str, path: object) -> Path:
    name = os.fspath(path) if isinstance(path, str | os.PathLike) else None
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValidationError(field, "must be a non-empty file path without NUL", None)
    return Path(name)


def _read_key_file(field: str, source: Path) -> tuple[bytes, int]:
    """(contents, mode) of a regular file of at most MAX_KEY_FILE bytes. Opened without
    following a symlink and without blocking (a FIFO would), checked with fstat on the
    open file (no race between the check and the read)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(source, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValidationError(field, f"{source} is a symbolic link; name the key file "
                                  "itself", str(source)) from None
        raise ValidationError(field, f"cannot read {source}: {e.strerror or e}",
                              str(source)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValidationError(field, f"{source} is not a regular file", str(source))
        if info.st_size > MAX_KEY_FILE:
            raise ValidationError(field, f"{source} is {info.st_size} bytes, too large for a "
                                  f"key file (at most {MAX_KEY_FILE})", str(source))
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise ValidationError(field, f"cannot read {source}: {e.strerror or e}",
                              str(source)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise ValidationError(field, f"{source} grew past {MAX_KEY_FILE} bytes while read",
                              str(source))
    return data, info.st_mode


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never following a symlink) with ``mode``, write, fsync."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ValidationError("path", f"{path} already exists; a key file is never "
                              "overwritten", str(path)) from None
    except OSError as e:
        raise ValidationError("path", f"cannot write {path}: {e.strerror or e}",
                              str(path)) from None
    try:
        with os.fdopen(fd, "wb") as file:
            # The umask must not change what a key file needs.
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ValidationError("path", f"cannot write {path}: {e.strerror or e}",
                              str(path)) from None
