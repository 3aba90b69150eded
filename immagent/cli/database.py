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

__all__ = ["DEFAULT_DB", "ENV_DB", "ENV_REPLICAS", "Database", "check_sqlite_file", "resolve"]

#: The embedded SQLite file used when neither --db nor IMMAGENT_DB says otherwise.
DEFAULT_DB = "immagent.db"
#: Environment variable naming the database (a path or a DSN).
ENV_DB = "IMMAGENT_DB"
#: Read replicas of $IMMAGENT_DB: postgresql:// URIs separated by whitespace. Only with
#: that database: replicas of one primary must never serve another named by --db.
ENV_REPLICAS = "IMMAGENT_REPLICAS"


@dataclass(frozen=True)
class Database:
    """A resolved database: the DSN for Store.connect and, for SQLite, the file."""

    dsn: str
    path: Path | None  # None for PostgreSQL
    replicas: tuple[str, ...] = ()  # PostgreSQL hot standbys serving reads

    @property
    def shown(self) -> str:
        """How messages name it (a file path, or the DSN without its password)."""
        return str(self.path) if self.path is not None else dsn.redact(self.dsn)


def resolve(value: str | None, environ: dict[str, str] | None = None,
            replicas: list[str] | None = None) -> Database:
    """The database named by ``--db`` (or the environment, or the default) and its read
    replicas (``--replica``, or $IMMAGENT_REPLICAS along with $IMMAGENT_DB)."""
    env = os.environ if environ is None else environ
    if value is not None and not value.strip():
        raise CLIError("--db: the database path is empty", code=2)
    try:
        target = dsn.parse(value or env.get(ENV_DB) or DEFAULT_DB, bare_paths=True)
    except ValidationError as e:
        raise CLIError(f"--db: {str(e).removeprefix('dsn: ')}", code=2) from None
    option = "--replica"
    if replicas is None:
        option, replicas = ENV_REPLICAS, (env.get(ENV_REPLICAS, "").split() if not value
                                          and env.get(ENV_DB) else [])
    for replica in replicas:
        try:
            scheme = dsn.parse(replica).scheme
        except ValidationError as e:
            raise CLIError(f"{option}: {str(e).removeprefix('dsn: ')}", code=2) from None
        if scheme != "postgresql" or target.scheme != "postgresql":
            raise CLIError(f"{option}: read replicas are postgresql:// DSNs of a "
                           "postgresql:// database", code=2)
    return Database(dsn=target.dsn, path=None if target.path is None else Path(target.path),
                    replicas=tuple(replicas))


def check_sqlite_file(path: Path, *, create: bool, write: bool) -> None:
    """Refuse what SQLite would fail on less clearly (the store's own checks), and a
    missing file for a command that only reads."""
    if not create and not path.exists() and not path.is_symlink():
        raise CLIError(f"no database at {path} (`immagent chat` creates one; choose another "
                       "with --db or IMMAGENT_DB)")
    dsn.check_sqlite_file(str(path), write=write)
