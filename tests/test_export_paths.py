"""Where an export may write and what an import may read: an export creates a file or
replaces a regular one, never anything else, with the process's umask; odd paths are
ValidationError / BundleError, never a raw OSError or ValueError; what killed exports leave
is removed by the next export to the same file.

Never real device nodes: FIFOs and symlinks in a temp dir stand for them (an export to
/dev/null once replaced it with a regular file)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import immagent
from immagent import PersistentAgent, Store
from immagent.audit.bundle import verify_bundle
from tests.conftest import turn


async def exported(store: Store) -> PersistentAgent:
    return await store.append(await store.create_agent("out", "You are exported.", "m"),
                              turn(1))


@pytest.fixture
def umask() -> Iterator[int]:
    """A known umask for the test (restored after)."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


async def test_a_fifo_is_refused_and_left_as_it_was(store: Store, tmp_path: Path) -> None:
    agent = await exported(store)
    fifo = tmp_path / "pipe"  # stands for /dev/null and every other special file
    os.mkfifo(fifo)
    with pytest.raises(immagent.ValidationError, match="is a FIFO") as err:
        await store.export(agent, fifo)
    assert err.value.field == "path"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pipe.")]  # no temp file


@pytest.mark.parametrize("target", ["file", "dangling", "directory"])
async def test_a_symlink_is_never_followed_or_replaced(
        store: Store, tmp_path: Path, target: str) -> None:
    agent = await exported(store)
    pointee = tmp_path / "pointee"
    if target == "file":
        pointee.write_text("keep me")
    elif target == "directory":
        pointee.mkdir()
    link = tmp_path / "link"
    link.symlink_to(pointee)
    with pytest.raises(immagent.ValidationError, match="symbolic link"):
        await store.export(agent, link)
    assert link.is_symlink() and os.readlink(link) == str(pointee)
    if target == "file":
        assert pointee.read_text() == "keep me"
    assert not pointee.exists() if target == "dangling" else True


async def test_a_directory_is_refused(store: Store, tmp_path: Path) -> None:
    agent = await exported(store)
    with pytest.raises(immagent.ValidationError, match="is a directory"):
        await store.export(agent, tmp_path)


async def test_a_new_file_gets_the_umask_and_a_regular_file_is_replaced(
        store: Store, tmp_path: Path, umask: int) -> None:
    agent = await exported(store)
    path = tmp_path / "a.bundle"
    await store.export(agent, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # 0o640, not mkstemp's 0o600
    path.write_bytes(b"an older file")
    os.chmod(path, 0o600)
    info = await store.export(agent, path)
    assert verify_bundle(path).head == info.head == agent.id
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".a.bundle.")]


async def test_a_path_with_nul_is_a_validation_error(store: Store, tmp_path: Path) -> None:
    agent = await exported(store)
    with pytest.raises(immagent.ValidationError, match="NUL") as err:
        await store.export(agent, f"{tmp_path}/a\x00b")
    assert err.value.field == "path"
    with pytest.raises(immagent.ValidationError, match="NUL"):
        await store.import_bundle(f"{tmp_path}/a\x00b")


async def test_an_unreadable_regular_file_is_a_bundle_error(store: Store) -> None:
    # /proc/self/mem is a regular file whose reads fail (EIO): an I/O error, not a crash.
    with pytest.raises(immagent.BundleError, match="cannot be read"):
        await store.import_bundle("/proc/self/mem")
    with pytest.raises(immagent.BundleError, match="cannot be read"):
        verify_bundle("/proc/self/mem")


_FULL_DISK = """
import asyncio, resource, signal, sys
from immagent import Message, Store

async def main(db, dest):
    async with await Store.connect(db) as store:
        await store.init_schema()
        agent = await store.create_agent("out", "You are exported.", "m")
        agent = await store.append(agent, [Message.user("x" * 5000)])
        # The file-size limit stands in for a full disk: a write past it fails (EFBIG).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))
        try:
            await store.export(agent, dest)
        except Exception as e:
            print(type(e).__name__, e)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_device_failing_under_an_export_is_a_bundle_error(tmp_path: Path) -> None:
    # A full disk is not the caller's bad input: BundleError, not ValidationError("path");
    # the destination is left as it was and no temp file remains. In a subprocess: the
    # limit would also stop pytest's own writes.
    dest = tmp_path / "out" / "agent.bundle"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, f"sqlite:///{tmp_path}/s.db",
                           str(dest)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("BundleError cannot write"), done.stdout
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["agent.bundle"]


async def test_a_fifo_is_not_opened_for_import(store: Store, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(immagent.ValidationError, match="not a regular file"):
        await store.import_bundle(fifo)  # opening it would block until a writer came


def test_cli_export_force_still_refuses_a_symlink(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from immagent.cli.app import main

    db = tmp_path / "cli.db"

    async def build() -> str:
        async with await Store.connect(f"sqlite:///{db}") as store:
            await store.init_schema()
            return str((await exported(store)).id)

    agent = asyncio.run(build())
    keep = tmp_path / "keep.txt"
    keep.write_text("keep me")
    link = tmp_path / "out.bundle"
    link.symlink_to(keep)
    assert main(["--db", str(db), "export", agent, str(link)]) == 1
    assert "already exists" in capsys.readouterr().err  # a symlink counts as something there
    assert main(["--db", str(db), "export", "--force", agent, str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and keep.read_text() == "keep me"
    dangling = tmp_path / "dangling.bundle"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(["--db", str(db), "export", "--force", agent, str(dangling)]) == 2
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def _killed_export(dest: Path) -> None:
    """An export writer SIGKILLed half-way, in a process of its own: its temp file stays."""
    code = ("import os, signal, sys; from pathlib import Path; "
            "from immagent.audit.files import TempFile; "
            "f = TempFile(Path(sys.argv[1])); f.write(b'half a bundle'); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True)
    assert done.returncode == -9, done.stderr


async def test_the_next_export_removes_what_killed_exports_to_that_file_left(
        tmp_path: Path) -> None:
    from immagent.audit.files import TempFile

    dest, other = tmp_path / "agent.bundle", tmp_path / "other.bundle"
    for _ in range(3):
        _killed_export(dest)
    _killed_export(other)
    # Each writer removed its killed predecessors' files before making its own.
    left = [n for n in os.listdir(tmp_path) if n.startswith(".agent.bundle.")]
    assert len(left) == 1 and left[0].endswith(".tmp")
    live = TempFile(dest)  # an export to the same file still running: never touched
    try:
        async with await Store.connect("memory://") as store:
            await store.init_schema()
            info = await store.export(await exported(store), dest)
        assert verify_bundle(dest) == info
        others = [n for n in os.listdir(tmp_path) if n.startswith(".other.bundle.")]
        assert len(others) == 1  # another file's leftovers are that file's exports' business
        assert sorted(os.listdir(tmp_path)) == sorted([dest.name, live.path.name, *others])
    finally:
        live.discard()
    assert not live.path.exists()
