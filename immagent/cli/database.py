"""Which database a command uses (``--db``, ``IMMAGENT_DB``, ``./immagent.db``), checked
before anything is opened so bad paths fail with a clear message and write nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from immagent.cli.errors import CLIError

__all__ = ["DEFAULT_DB", "ENV_DB", "Database", "check_sqlite_file", "resolve"]

#: The embedded SQLite file used when neither --db nor IMMAGENT_DB says otherwise.
DEFAULT_DB = "immagent.db"
#: Environment variable naming the database (a path or a DSN).
ENV_DB = "IMMAGENT_DB"

_SQLITE_MAGIC = b"SQLite format 3\x00"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Database:
    """A resolved database: the DSN for Store.connect and, for SQLite, the file."""

    dsn: str
    path: Path | None  # None for PostgreSQL

    @property
    def shown(self) -> str:
        """How messages name it (a file path, or the DSN the Store reports)."""
        return str(self.path) if self.path is not None else "the PostgreSQL database"


def resolve(value: str | None, environ: dict[str, str] | None = None) -> Database:
    """The database named by ``--db`` (or the environment, or the default)."""
    env = os.environ if environ is None else environ
    if value is not None and not value.strip():
        raise CLIError("--db: the database path is empty", code=2)
    chosen = value or env.get(ENV_DB) or DEFAULT_DB
    if chosen.startswith(_POSTGRES_PREFIXES) or "dbname=" in chosen:
        return Database(dsn=chosen, path=None)
    if chosen.startswith("sqlite:///"):
        chosen = chosen.removeprefix("sqlite:///")
    elif "://" in chosen:
        scheme = chosen.split("://", 1)[0]
        raise CLIError(f"unsupported database URL scheme {scheme!r}: use a file path, "
                       "sqlite:///path.db or postgresql://…", code=2)
    if not chosen.strip():
        raise CLIError("--db: the database path is empty", code=2)
    path = Path(chosen).expanduser()
    return Database(dsn=f"sqlite:///{path}", path=path)


def check_sqlite_file(path: Path, *, create: bool, write: bool) -> None:
    """Refuse what SQLite would fail on less clearly: directories, unreadable or foreign
    files, missing files for read-only commands, and directories we cannot write in."""
    if path.is_dir():
        raise CLIError(f"{path} is a directory, not a database file")
    if path.exists():
        _check_existing(path, write=write)
    elif not create:
        raise CLIError(f"no database at {path} (`immagent chat` creates one; choose another "
                       "with --db or IMMAGENT_DB)")
    else:
        _check_creatable(path)


def _check_existing(path: Path, *, write: bool) -> None:
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror or e}") from e
    if header and header != _SQLITE_MAGIC:
        raise CLIError(f"{path} is not an SQLite database")
    if write and not os.access(path, os.W_OK):
        raise CLIError(f"{path} is read-only: cannot write to it")
    directory = path.parent
    if write and not os.access(directory, os.W_OK | os.X_OK):
        raise CLIError(f"directory {directory} is read-only: SQLite cannot write its "
                       f"journal next to {path.name}")


def _check_creatable(path: Path) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise CLIError(f"cannot create {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CLIError(f"cannot create {path}: directory {directory} is read-only")
