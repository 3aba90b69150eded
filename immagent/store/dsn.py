"""Which database a DSN names, and the checks a SQLite path must pass before it is opened.

One parser for ``Store.connect`` and the command line: ``postgresql://…`` (or a libpq
``key=value`` string), ``sqlite:///path.db`` or a bare path ending in ``.db``/``.sqlite``/
``.sqlite3``, and ``memory://`` for a throwaway in-process store.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Literal, NamedTuple

from immagent.exceptions import StoreConnectionError, ValidationError

__all__ = ["SQLITE_SUFFIXES", "Target", "check_sqlite_file", "parse", "redact", "scrub",
           "secrets"]

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_POSTGRES = ("postgresql://", "postgres://")
_HEADER = b"SQLite format 3\x00"


class Target(NamedTuple):
    """A parsed DSN: the backend it names, the DSN to hand it, and a SQLite file's path."""

    scheme: Literal["postgresql", "sqlite", "memory"]
    dsn: str
    path: str | None  # the SQLite file; None otherwise


def parse(dsn: object, *, bare_paths: bool = False) -> Target:
    """The backend ``dsn`` names (ValidationError ``dsn`` otherwise). With ``bare_paths``
    (the command line) any plain path is a SQLite file, whatever its suffix."""
    if isinstance(dsn, os.PathLike):
        dsn = os.fspath(dsn)
    if not isinstance(dsn, str) or not dsn.strip():
        raise ValidationError("dsn", "must be a non-empty str", dsn)
    if dsn.startswith(_POSTGRES) or ("://" not in dsn and "dbname=" in dsn):
        return Target("postgresql", dsn, None)
    if dsn == "memory://":
        return Target("memory", dsn, None)
    if dsn.startswith("sqlite:///"):
        path = dsn.removeprefix("sqlite:///")
    elif "://" not in dsn and (bare_paths or dsn.endswith(SQLITE_SUFFIXES)):
        path = dsn
    else:
        # Only the scheme is shown: the rest of an unsupported URL may hold a password.
        scheme = dsn.split("://", 1)[0] + "://" if "://" in dsn else "a plain path"
        raise ValidationError(
            "dsn", f"unsupported DSN ({scheme}): use postgresql://… (no +driver suffix), "
            "sqlite:///path.db or memory://", None)
    if not path.strip():
        raise ValidationError("dsn", "the SQLite path is empty", None)
    path = os.path.expanduser(path)
    return Target("sqlite", f"sqlite:///{path}", path)


# Where a password can sit in a DSN, matched on the raw text before any parsing, so a DSN
# too malformed to parse cannot leak it. In a URI: the userinfo (the password runs from the
# first ":" after the user name to the *last* "@", since a malformed password may hold
# "@", "/" or "?") and a ``password``/``sslpassword`` query parameter (up to "&": a
# malformed one may hold "#").
# In a libpq key=value string: the same keys, quoted with '...' and backslash escapes, or
# up to a space.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URI_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):(.*)@", re.DOTALL)
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)([^&]*)")
_KEYWORD_PASSWORD = re.compile(r"(?i)((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")


def _params(dsn: str) -> re.Pattern[str]:
    return _QUERY_PASSWORD if _URI.match(dsn) else _KEYWORD_PASSWORD


def secrets(dsn: str) -> tuple[str, ...]:
    """Every form of the password(s) ``dsn`` holds, as written and as decoded
    (percent-decoding, libpq quoting), longest first: what must never be shown."""
    found: set[str] = set()
    uri = _URI_PASSWORD.match(dsn)
    if uri is not None:
        found.add(uri.group(2))
    for m in _params(dsn).finditer(dsn):
        raw = m.group(2)
        found.add(raw)
        if raw.startswith("'"):
            found.add(re.sub(r"\\(.)", r"\1", raw[1:].removesuffix("'")))
    for text in list(found):
        found.add(urllib.parse.unquote(text, errors="replace"))
        found.add(urllib.parse.unquote_plus(text, errors="replace"))
    # A driver may split a malformed DSN at a delimiter inside the password and echo the
    # rest as a host, a port or a path: every run of its pieces is a form too (runs of 4+
    # characters, so a message is not garbled by replacing single letters).
    for text in list(found):
        tokens = _DELIMITERS.split(text)  # pieces, with the delimiters between them
        found.update(run for a in range(0, len(tokens), 2) for b in range(a, len(tokens), 2)
                     if len(run := "".join(tokens[a:b + 1]).strip()) >= 4)
    return tuple(sorted((t for t in found if t), key=len, reverse=True))


_DELIMITERS = re.compile(r"([@/?#:\[\]&=\s'\"\\])")


def redact(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``: how messages and logs name a database.
    Works on the raw text, so even a DSN that cannot be parsed is safe to show."""
    shown = _params(dsn).sub(r"\1***", dsn)  # first: the userinfo match may run past it
    return _URI_PASSWORD.sub(r"\1:***@", shown, count=1)


def scrub(text: str, dsn: str, extra: tuple[str | None, ...] = ()) -> str:
    """``text`` (a driver's error message about ``dsn``) with every form of its password
    replaced by ``***``, wherever it appears: drivers echo a malformed DSN whole, or quote
    the token they could not parse. ``extra``: other forms known to the caller (the
    password as the driver parsed it)."""
    forms = {*secrets(dsn), *(e for e in extra if e)}
    # Forms overlap (a password and a run of its pieces): mark every occurrence of every
    # form first, then replace each merged span once, so no part survives between two.
    hidden = [False] * len(text)
    for form in forms:
        start = text.find(form)
        while start >= 0:
            hidden[start:start + len(form)] = [True] * len(form)
            start = text.find(form, start + 1)
    shown = "".join("***" if h and (i == 0 or not hidden[i - 1]) else ("" if h else c)
                    for i, (c, h) in enumerate(zip(text, hidden, strict=True)))
    return redact(shown)


def check_sqlite_file(path: str, *, write: bool = True) -> None:
    """Refuse, before SQLite touches anything, a path that cannot be an immagent database.

    SQLite's own errors say only "unable to open database file"; these name the reason, and
    reading the header first guarantees a foreign file is never modified. ``write``: the
    caller will write (WAL mode keeps two side files next to the database, so the
    directory must be writable too).
    """
    def fail(reason: str) -> StoreConnectionError:
        return StoreConnectionError(f"cannot open SQLite database {path}: {reason}")

    if path in ("", ":memory:") or path.startswith("file:"):
        raise fail("give a file path (in-memory and URI databases are not supported)")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise fail("it is a directory")
    if not os.path.exists(parent):
        raise fail(f"directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise fail(f"{parent} is not a directory")
    if write and not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"directory {parent} is read-only")
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise fail("not a regular file")
    if not os.access(path, os.R_OK):
        raise fail("the file is not readable")
    if write and not os.access(path, os.W_OK):
        raise fail("the file is read-only")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_HEADER))
    except OSError as e:
        raise fail(e.strerror or type(e).__name__) from None
    if head and head != _HEADER:  # an empty file is a valid, empty database
        raise fail("not an SQLite database file")
