"""Which database a command uses (``--db``, ``IMMAGENT_DB``, ``./immagent.db``), checked
before anything is opened so bad paths fail with a clear message and write nothing.

The DSN is parsed and a SQLite file checked by the store's own code (``store.dsn``); the
command line only adds its defaults and one rule of its own: a command that only reads
never creates a database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from immagent.cli.errors import CLIError
from immagent.exceptions import ValidationError
from immagent.store import dsn

__all__ = ["DEFAULT_DB", "ENV_DB", "Database", "check_sqlite_file", "resolve"]

#: The embedded SQLite file used when neither --db nor IMMAGENT_DB says otherwise.
DEFAULT_DB = "immagent.db"
#: Environment variable naming the database (a path or a DSN).
ENV_DB = "IMMAGENT_DB"


@dataclass(frozen=True)
class Database:
    """A resolved database: the DSN for Store.connect and, for SQLite, the file."""

    dsn: str
    path: Path | None  # None for PostgreSQL

    @property
    def shown(self) -> str:
        """How messages name it (a file path, or the DSN without its password)."""
        return str(self.path) if self.path is not None else dsn.redact(self.dsn)


def resolve(value: str | None, environ: dict[str, str] | None = None) -> Database:
    """The database named by ``--db`` (or the environment, or the default)."""
    env = os.environ if environ is None else environ
    if value is not None and not value.strip():
        raise CLIError("--db: the database path is empty", code=2)
    try:
        target = dsn.parse(value or env.get(ENV_DB) or DEFAULT_DB, bare_paths=True)
    except ValidationError as e:
        raise CLIError(f"--db: {str(e).removeprefix('dsn: ')}", code=2) from None
    return Database(dsn=target.dsn, path=None if target.path is None else Path(target.path))


def check_sqlite_file(path: Path, *, create: bool, write: bool) -> None:
    """Refuse what SQLite would fail on less clearly (the store's own checks), and a
    missing file for a command that only reads."""
    if not create and not path.exists() and not path.is_symlink():
        raise CLIError(f"no database at {path} (`immagent chat` creates one; choose another "
                       "with --db or IMMAGENT_DB)")
    dsn.check_sqlite_file(str(path), write=write)
