"""Safe file handling for bundles: where an export may write, how it writes atomically,
and how the leftovers of killed exports are removed.

An export creates or replaces a regular file and nothing else (a symlink is never followed
or replaced, nor a FIFO, a device or a directory). It writes a locked temp file next to the
destination and renames it over the destination only when complete, so readers see the old
file or the whole new one. A SIGKILL leaves no chance to remove the temp file; the next
export to the same destination removes every such file whose writer is gone (its lock died
with it), and never one whose writer still runs. A failed create, write or rename is never
a raw OSError: a path that cannot be written is a ValidationError naming it, the device
failing is a BundleError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

from immagent.exceptions import BundleError, ValidationError

_fcntl: ModuleType | None
try:
    import fcntl as _fcntl
except ImportError:  # not POSIX: no locks, so leftovers are not told apart and stay
    _fcntl = None

__all__ = ["TempFile", "readable_path", "remove_leftovers", "writable_path"]

#: The temp file's name ends ``.<12 hex digits>.tmp`` after ``.<dest name>``.
_SUFFIX = ".tmp"
_LEFTOVER = re.compile(r"\.[0-9a-f]{12}\.tmp\Z")


#: Why a path cannot be written, as opposed to the device failing under it.
_BAD_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                              errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


class TempFile:
    """A temp file next to ``dest`` that becomes ``dest`` only on commit (fsync + rename),
    so readers see the old file or the whole new one, never a partial bundle. It is created
    exclusively with mode 0o666 less the process's umask, as ``open()`` would; the rename
    happens only while ``dest`` is absent or a regular file (checked again just before).

    Its name is ``.<dest name>.<12 hex digits>.tmp`` and it is locked (``flock``) while
    its writer lives, from creation until after the rename: a writer killed on the way
    leaves an unlocked file, which the next export to the same ``dest`` removes first
    (``remove_leftovers``)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        with self._os_errors():
            remove_leftovers(dest)
            for _ in range(100):
                name = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{_SUFFIX}"
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0),
                                 0o666)
                except FileExistsError:
                    continue
                if _claim(fd, name):
                    break
                os.close(fd)  # removed as a leftover before we locked it: another name
            else:
                raise FileExistsError(f"no free temporary name next to {dest}")
        self.path = name
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self._committed = False

    @contextlib.contextmanager
    def _os_errors(self) -> Iterator[None]:
        """A failed create, write or rename is never a raw OSError: a path that cannot be
        written (no such directory, no permission) is a ValidationError naming it; the
        device failing (disk full, quota, read-only, I/O error) is a BundleError."""
        try:
            yield
        except OSError as e:
            reason = f"cannot write {self.dest}: {e.strerror or e}"
            if e.errno in _BAD_PATH_ERRNOS:
                raise ValidationError("path", reason, str(self.dest)) from e
            raise BundleError(reason) from e

    def write(self, data: bytes) -> None:
        assert self._file is not None
        with self._os_errors():
            self._file.write(data)

    def commit(self, data: bytes) -> None:
        assert self._file is not None
        with self._os_errors():
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            if _fcntl is None:  # no lock to keep, and an open file may not be renamed
                self._file.close()
                self._file = None
            _check_replaceable(self.dest)  # something may have appeared there meanwhile
            # Renamed while still open, so while still locked: never taken for a leftover.
            os.replace(self.path, self.dest)
            self._committed = True
            if self._file is not None:
                self._file.close()
                self._file = None
            _fsync_dir(self.dest.parent)

    def discard(self) -> None:
        """Remove the temp file unless committed (idempotent)."""
        if self._file is not None:
            # Closing flushes what is buffered, which fails again on a full device: the
            # file is closed all the same, and the error that stopped the export stands.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if not self._committed:
            self._committed = True  # idempotent
            with contextlib.suppress(OSError):
                self.path.unlink()


def remove_leftovers(dest: Path) -> int:
    """Remove the temp files that exports to ``dest`` killed on the way left behind (those
    no live writer holds locked); returns how many. A file that cannot be examined, or is
    not a regular file, is left alone. Does nothing where files cannot be locked."""
    if _fcntl is None:
        return 0
    prefix = f".{dest.name}."
    try:
        names = [n for n in os.listdir(dest.parent)
                 if n.startswith(prefix) and _LEFTOVER.match(n, len(prefix) - 1)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = dest.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            except OSError:  # its writer is alive
                continue
            if _same_file(fd, path):
                os.unlink(path)
                removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _claim(fd: int, path: Path) -> bool:
    """Lock a temp file just created; False when a ``remove_leftovers`` took it for a
    leftover in the moment between its creation and the lock (then it is gone, or going)."""
    if _fcntl is None:
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        return False
    return _same_file(fd, path)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        found, held = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _path(path: object) -> Path:
    """A file name given as a str or an os.PathLike of one, without NUL."""
    name = os.fspath(path) if isinstance(path, str | os.PathLike) else None
    if not isinstance(name, str) or not name:
        raise ValidationError("path", f"must be a non-empty str or path, got {path!r}", None)
    if "\x00" in name:
        raise ValidationError("path", "must not contain NUL characters", None)
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate the file system encoding cannot take
        raise ValidationError("path", "cannot be encoded for the file system", None) from None
    return Path(name)


def _what_is(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_replaceable(dest: Path) -> None:
    """An export may create ``dest`` or replace a regular file there, nothing else: a
    symlink is never followed or replaced, nor a FIFO, a device or a directory."""
    try:
        mode = os.lstat(dest).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ValidationError("path", f"cannot write {dest}: {e.strerror or e}",
                              str(dest)) from e
    if not stat.S_ISREG(mode):
        raise ValidationError("path", f"{dest} is {_what_is(mode)}; an export only creates "
                              "a file or replaces a regular one", str(dest))


def writable_path(path: object) -> Path:
    """The destination of an export: a creatable path, or a regular file to replace, in a
    directory that exists (ValidationError naming ``path`` otherwise)."""
    dest = _path(path)
    _check_replaceable(dest)
    if not dest.parent.is_dir():
        raise ValidationError("path", f"directory {dest.parent} does not exist", str(dest))
    return dest


def readable_path(path: object) -> Path:
    """A regular file to read (through a symlink is fine); ValidationError otherwise."""
    source = _path(path)
    if not source.exists():
        raise ValidationError("path", f"no such file: {source}", str(source))
    if not source.is_file():  # through a symlink is fine; a FIFO would block the read
        raise ValidationError("path", f"{source} is not a regular file", str(source))
    return source


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
