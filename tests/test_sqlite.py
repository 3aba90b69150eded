"""SQLite-only behaviour: WAL, locking across processes, file errors, threads, cancellation.

Everything both backends share is tested once, through the parametrised ``store`` fixture
(tests/test_store.py and friends); this file covers what only an embedded file database has.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import immagent
from immagent import Message, PersistentAgent, Store
from immagent.assets import EMPTY_CONVERSATION, Kind, SystemPrompt
from immagent.records import AgentRecord, load_agent, state_digest
from immagent.rows import stored
from immagent.store._sqlite_pool import SQLitePool
from immagent.store.sqlite import SQLiteBackend
from tests.conftest import root_row, turn

ROOT = Path(__file__).resolve().parents[1]


async def open_store(path: Path, **options: float) -> Store:
    """A Store over a SQLiteBackend opened with backend-specific options."""
    backend = await SQLiteBackend.open(str(path), **options)  # type: ignore[arg-type]
    store = Store(backend)
    await store.init_schema()
    return store


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[tuple[Store, Path]]:
    """An initialised store on a fresh file, and the file's path."""
    path = tmp_path / "store.db"
    store = await open_store(path)
    try:
        yield store, path
    finally:
        await store.close()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def on_disk(path: Path) -> int:
    """Bytes of the database file and its WAL."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, repr(text)
    return text


# -- the file -----------------------------------------------------------------------------


async def test_wal_mode_with_its_side_files(db: tuple[Store, Path]) -> None:
    store, path = db
    await store.create_agent("a", "p", "m")
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert f"{path.name}-wal" in listing(path.parent)


async def test_ids_timestamps_and_refs_are_compact_and_round_trip(
        db: tuple[Store, Path]) -> None:
    store, path = db
    backend = await SQLiteBackend.open(str(path))  # a second backend on the same file
    prompt = SystemPrompt(text="p")
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-5)))
    record = AgentRecord(
        id=uuid.uuid4(), parent_id=uuid.uuid4(), created_at=created, name="n", model="m",
        system_prompt=prompt.digest, conversation=EMPTY_CONVERSATION.digest,
        model_config={"t": 0.5}, metadata={"k": [1, "x"]},
        digest=state_digest("n", "m", prompt.digest, EMPTY_CONVERSATION.digest,
                            {"t": 0.5}, {"k": [1, "x"]}))
    await backend.write([stored(prompt)], [record.to_row()],
                        nodes=[root_row(EMPTY_CONVERSATION)])
    (row,) = await backend.get_states([record.id])
    await backend.close()
    loaded = load_agent(row)
    assert loaded == record
    assert loaded.created_at.tzinfo is UTC and loaded.created_at.microsecond == 678901
    agent = await store.append(await store.load_agent(record.id), turn(1))
    with sqlite3.connect(path) as raw:
        id_type, id_len, parent_len, ts_type = raw.execute(
            "SELECT typeof(id), length(id), length(parent_id), typeof(created_at) "
            "FROM immagent_states WHERE id = ?", (record.id.bytes,)).fetchone()
        root_loc, node_loc, refs = raw.execute(
            "SELECT r.loc, n.loc, n.refs FROM immagent_nodes r, immagent_nodes n "
            "WHERE r.digest = ? AND n.digest = ?",
            (EMPTY_CONVERSATION.digest, agent.conversation_digest)).fetchone()
        messages = raw.execute("SELECT count(*) FROM immagent_assets WHERE kind = 2").fetchone()
    assert (id_type, id_len, parent_len, ts_type) == ("blob", 16, 16, "integer")
    # A node is stored right after its parent, in its run; it holds its messages (none
    # is an asset) and names no out-of-line element.
    assert node_loc == root_loc + 1 and refs == b"" and messages == (0,)


@pytest.mark.parametrize("content", [b"just some notes\n", b"\x00" * 200, b"SQLite format 2\x00"])
async def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(
        tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    before = os.stat(path)
    for dsn in (f"sqlite:///{path}", str(path)):
        with pytest.raises(immagent.StoreConnectionError) as info:
            await Store.connect(dsn)
        assert str(path) in one_line(info.value) and "not an SQLite database" in str(info.value)
    assert path.read_bytes() == content and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert listing(tmp_path) == ["notes.db"]  # no -wal, no -shm


async def test_a_directory_or_a_missing_directory_is_refused(tmp_path: Path) -> None:
    cases = {
        tmp_path / "folder.db": "is a directory",
        tmp_path / "absent" / "x.db": "does not exist",
    }
    (tmp_path / "folder.db").mkdir()
    for path, reason in cases.items():
        with pytest.raises(immagent.StoreConnectionError) as info:
            await Store.connect(f"sqlite:///{path}")
        assert str(path) in one_line(info.value) and reason in str(info.value)
    assert not (tmp_path / "absent").exists()


def _unwritable_locations(tmp_path: Path) -> dict[str, Path]:
    """Places no database can be created, whoever runs the tests (root included)."""
    regular = tmp_path / "regular-file"
    regular.write_text("x")
    return {
        "parent is a regular file": regular / "store.db",
        # procfs refuses new files even to root, and passes the access() pre-check, so this
        # exercises the mapping of SQLite's own "unable to open" error.
        "parent is in /proc": Path("/proc") / f"immagent-{uuid.uuid4().hex}.db",
    }


async def test_unwritable_locations_are_refused_in_one_line(tmp_path: Path) -> None:
    for what, path in _unwritable_locations(tmp_path).items():
        with pytest.raises(immagent.StoreConnectionError) as info:
            await Store.connect(f"sqlite:///{path}")
        assert str(path) in one_line(info.value), what


def test_read_only_directory(tmp_path: Path) -> None:
    # Run in a child that cannot bypass permission bits: as root, the capabilities that
    # ignore them are dropped (setpriv), so root sees a chmod 555 directory as any user does.
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    script = textwrap.dedent(f"""
        import asyncio, immagent
        async def main():
            try:
                await immagent.Store.connect({str(folder / "store.db")!r})
            except immagent.StoreConnectionError as e:
                print("REFUSED", str(e).replace("\\n", " "))
        asyncio.run(main())
    """)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    prefix = drop if os.geteuid() == 0 else []
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr
        assert "read-only" in done.stdout and str(folder) in done.stdout
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


async def test_memory_and_uri_paths_are_refused(tmp_path: Path) -> None:
    for path in (":memory:", f"file:{tmp_path / 'x.db'}?mode=rwc"):
        with pytest.raises(immagent.StoreConnectionError, match="file path"):
            await SQLiteBackend.open(path)


async def test_another_applications_database_is_not_converted_until_init_schema(
        tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE notes (body TEXT)")
    store = Store(await SQLiteBackend.open(str(path)))
    try:
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        with pytest.raises(immagent.SchemaVersionError, match="init_schema"):
            await store.check_schema()
        with pytest.raises(immagent.SchemaVersionError, match="init_schema"):
            await store.count_agents()
        await store.init_schema()
        await store.check_schema()
    finally:
        await store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT count(*) FROM notes").fetchone()[0] == 0


async def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    store = await open_store(path)
    await store.close()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO immagent_schema (version) VALUES (999)")
    store = await Store.connect(f"sqlite:///{path}")
    try:
        with pytest.raises(immagent.SchemaVersionError, match="999") as info:
            await store.check_schema()
        assert str(path) in one_line(info.value)
        with pytest.raises(immagent.SchemaVersionError, match="999"):
            await store.init_schema()
    finally:
        await store.close()
    with sqlite3.connect(path) as raw:  # init_schema refused without touching anything
        assert raw.execute("SELECT max(version) FROM immagent_schema").fetchone()[0] == 999


# -- locking --------------------------------------------------------------------------------


async def test_a_busy_database_waits_then_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = await open_store(path, busy_timeout=0.3)
    agent = await store.create_agent("a", "p", "m")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock and keeps it
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        with pytest.raises(immagent.StoreError) as info:
            await store.append(agent, turn(1))
        waited = time.monotonic() - started
        ticker.cancel()
        message = one_line(info.value)
        assert "locked" in message and str(path) in message
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert waited >= 0.25  # it waited for the lock before giving up
        assert ticks >= 5  # and the event loop kept running meanwhile
        # Reads do not need the write lock (WAL).
        assert await (await store.load_agent(agent.id)).get_messages() == ()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The failed write left nothing behind and the store still writes.
    assert await store.count_agents() == 1
    step = await store.append(agent, turn(1))
    assert await step.get_messages() == tuple(turn(1))
    await store.close()


async def test_opening_a_database_locked_by_another_connection_fails_clearly(
        tmp_path: Path) -> None:
    path = tmp_path / "exclusive.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE immagent_schema (version INTEGER PRIMARY KEY)")
    holder.execute("BEGIN EXCLUSIVE")  # not even readers may enter (rollback-journal mode)
    try:
        with pytest.raises(immagent.StoreConnectionError) as info:
            await SQLiteBackend.open(str(path), busy_timeout=0.2)
        message = one_line(info.value)
        assert message.startswith(f"cannot open SQLite database {path}: ")
        assert "locked" in message
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_a_lock_released_within_the_timeout_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "wait.db"
    store = await open_store(path, busy_timeout=10)
    agent = await store.create_agent("a", "p", "m")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        started = time.monotonic()
        step = await store.append(agent, turn(1))
        assert time.monotonic() - started >= 0.25
        assert step.parent_id == agent.id
    finally:
        release.join()
        holder.close()
        await store.close()


_WORKER = textwrap.dedent("""
    import asyncio, os, sys, time
    import immagent
    from immagent import Message

    async def main(path, mode, tag, n, root):
        while not os.path.exists(path + ".go"):  # start together
            time.sleep(0.005)
        store = await immagent.Store.connect("sqlite:///" + path)
        await store.init_schema()  # racing the other process's init_schema on purpose
        try:
            if mode == "append":
                agent = await store.load_agent(root)
                for i in range(n):
                    agent = await store.append(agent, [
                        Message(role="user", content=f"q{i}{tag}"),
                        Message(role="assistant", content=f"a{i}{tag}")])
                print(agent.id)
            elif mode == "churn":  # orphan assets, then point at them again (dedup)
                for i in range(n):
                    agent = await store.create_agent("churn", "shared prompt", "m")
                    said = [Message(role="user", content=f"m{i}")]
                    await store.delete(await store.append(agent, said))
                    await store.append(agent, said)  # same message, same node: both reused
            elif mode == "gc":
                for _ in range(n):
                    await store.gc()
            elif mode == "init":
                agent = await store.create_agent(tag, "p", "m")
                print(agent.id)
        finally:
            await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
""")


def run_workers(tmp_path: Path, db: Path, jobs: list[tuple[str, str, int, str]]) -> list[str]:
    """Run worker processes on ``db`` at the same moment; return each one's stdout."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(db), mode, tag, str(n), root],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for mode, tag, n, root in jobs]
    time.sleep(0.5)  # let every interpreter start and wait at the barrier
    Path(f"{db}.go").touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


async def test_two_processes_appending_to_one_file_lose_no_writes(
        db: tuple[Store, Path], tmp_path: Path) -> None:
    store, path = db
    root = await store.create_agent("shared", "p", "m")
    n = 60
    heads = run_workers(tmp_path, path, [("append", "A", n, str(root.id)),
                                         ("append", "B", n, str(root.id))])
    assert await store.count_agents() == 1 + 2 * n
    for head_id, tag in zip(heads, "AB", strict=True):
        head = await store.load_agent(head_id)
        lineage = await head.get_lineage()
        assert len(lineage) == n + 1 and lineage[0].id == root.id
        assert await head.get_messages() == tuple(
            m for i in range(n) for m in (Message(role="user", content=f"q{i}{tag}"),
                                          Message(role="assistant", content=f"a{i}{tag}")))


async def test_two_processes_creating_a_new_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    ids = run_workers(tmp_path, path, [("init", "A", 0, ""), ("init", "B", 0, "")])
    store = await open_store(path)
    try:
        assert {a.name for a in await store.load_agents(ids)} == {"A", "B"}
    finally:
        await store.close()


async def test_gc_in_another_process_never_sweeps_what_a_writer_reuses(
        db: tuple[Store, Path], tmp_path: Path) -> None:
    # The dedup race: a writer points at an existing, unreferenced asset while a sweep runs.
    # Both take SQLite's write lock for their whole transaction, so it cannot interleave.
    store, path = db
    n = 150
    run_workers(tmp_path, path, [("churn", "w", n, ""), ("gc", "g", 2 * n, "")])
    survivors = await store.find_by_name("churn")
    assert len(survivors) == 2 * n
    store.clear_cache()
    said: set[str | None] = set()
    for agent in survivors:
        assert await agent.get_system_prompt() == "shared prompt"
        messages = await agent.get_messages()
        assert len(messages) == (0 if agent.parent_id is None else 1)
        said.update(m.content for m in messages)
    assert said == {f"m{i}" for i in range(n)}
    assert (await store.verify()).missing == ()


# -- one process, many tasks ----------------------------------------------------------------


async def test_fifty_concurrent_appends_are_all_saved_with_their_parents(
        db: tuple[Store, Path]) -> None:
    store, _ = db
    base = await store.create_agent("base", "p", "m")
    steps = await asyncio.gather(*(store.append(base, turn(i)) for i in range(50)))
    assert len({s.id for s in steps}) == 50
    assert all(s.parent_id == base.id for s in steps)
    assert await store.count_agents() == 51

    async def chain(k: int) -> PersistentAgent:
        agent = await store.create_agent(f"chain{k}", "p", "m")
        for i in range(5):
            agent = await store.append(agent, turn(i, f"/{k}"))
        return agent

    heads = await asyncio.gather(*(chain(k) for k in range(10)))
    store.clear_cache()
    for i, step in enumerate(steps):
        assert await (await store.load_agent(step.id)).get_messages() == tuple(turn(i))
    for k, head in enumerate(heads):
        assert len(await head.get_lineage()) == 6
        assert await head.get_messages() == tuple(
            m for i in range(5) for m in turn(i, f"/{k}"))


async def test_cancelled_writes_leave_whole_states_or_nothing(db: tuple[Store, Path]) -> None:
    # Cancel every other append at staggered moments, many while their thread is inside
    # SQLite: the connection must not be handed to the next write until that thread is done.
    store, path = db
    base = await store.create_agent("base", "p", "m")
    n = 60
    tasks = [asyncio.create_task(store.append(base, turn(i))) for i in range(n)]
    for i, task in enumerate(tasks):
        if i % 2:
            task.cancel()
            await asyncio.sleep(0.001)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert isinstance(result, PersistentAgent), result
        else:
            assert isinstance(result, PersistentAgent | asyncio.CancelledError), result
    saved = {r.id for r in results if isinstance(r, PersistentAgent)}
    assert len(saved) < n  # some were really cancelled
    # Every state that exists is whole (a write cancelled after its commit may exist too);
    # no write was left half done or still holding the lock.
    store.clear_cache()
    states = (await store.list_agents())[::-1]  # oldest (the base) first
    assert saved <= {a.id for a in states}
    for state in states[1:]:
        assert state.parent_id == base.id
        messages = await state.get_messages()
        assert any(messages == tuple(turn(i)) for i in range(n))
    assert (await store.verify()).missing == ()
    step = await store.append(base, turn(99))
    assert await step.get_messages() == tuple(turn(99))
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT count(*) FROM immagent_states").fetchone()[0]
    assert rows == len(states) + 1


async def test_a_cancelled_call_keeps_its_connection_until_its_thread_is_done(
        db: tuple[Store, Path]) -> None:
    # A thread cannot be stopped: if the caller's cancellation returned at once, the writer
    # connection would pass to the next write while this thread still used it.
    store, path = db
    pool = await SQLitePool.open(str(path), 5.0, 1, lambda conn: None)
    finished: list[float] = []

    def slow(conn: sqlite3.Connection) -> None:
        time.sleep(0.3)  # nothing sqlite3_interrupt could cut short
        finished.append(time.monotonic())

    task = asyncio.create_task(pool.write("slow", slow))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished and time.monotonic() >= finished[0]
    assert await pool.write("after", lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
    await pool.close()
    assert (await store.create_agent("after", "p", "m")).name == "after"


async def test_a_write_waiting_for_a_lock_is_cancelled_promptly_and_writes_nothing(
        tmp_path: Path) -> None:
    # SQLite's busy handler ignores sqlite3_interrupt, so without waiting in slices a
    # cancelled write would hold its thread (and the next writer) for the whole timeout.
    path = tmp_path / "cancel.db"
    store = await open_store(path, busy_timeout=30)
    base = await store.create_agent("base", "p", "m")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        a = asyncio.create_task(store.append(base, turn(1)))
        await asyncio.sleep(0.3)  # A is in its worker thread, waiting for the lock
        b = asyncio.create_task(store.append(base, turn(2)))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        assert time.monotonic() - started < 2  # within a slice, not the 30 s timeout
        assert not b.done()  # B still waits for the lock
    finally:
        holder.execute("COMMIT")
        holder.close()
    step = await b
    store.clear_cache()
    assert [s.id for s in await store.list_agents()] == [step.id, base.id]  # nothing from A
    assert await (await store.load_agent(step.id)).get_messages() == tuple(turn(2))
    await store.close()


# -- maintenance and lifecycle --------------------------------------------------------------


async def test_gc_gives_the_space_back_to_the_file_system(db: tuple[Store, Path]) -> None:
    store, path = db
    agent = await store.create_agent("big", "p", "m")
    for i in range(40):
        # Random hex: compression halves it, the file still holds ~800 KB to give back.
        text = random.Random(i).randbytes(20_000).hex()
        agent = await store.append(agent, [Message(role="user", content=text)])
    keep = await store.create_agent("keep", "p", "m")
    full = (await store.stats()).disk_bytes
    for state in await agent.get_lineage():
        await store.delete(state)
    result = await store.gc()
    assert result.assets_removed == 80 and result.assets_kept == 2  # prompt and empty node
    after = (await store.stats()).disk_bytes
    assert after < full / 4, (full, after)
    assert on_disk(path) == after
    assert await (await store.load_agent(keep.id)).get_system_prompt() == "p"


async def test_close_is_idempotent_and_later_calls_fail_clearly(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(str(tmp_path / "c.db"))
    await backend.migrate(None)
    assert await backend.ping()
    await backend.close()
    await backend.close()
    assert not await backend.ping()
    with pytest.raises(immagent.StoreClosedError):
        await backend.count_states(int(Kind.AGENT_STATE))
    with pytest.raises(immagent.StoreClosedError):
        await backend.write([stored(SystemPrompt(text="p"))], [])


async def test_iteration_reads_one_snapshot_in_batches(db: tuple[Store, Path]) -> None:
    store, _ = db
    agent = await store.create_agent("a", "p", "m")
    for i in range(5):
        agent = await store.append(agent, turn(i))
    backend = await SQLiteBackend.open(str(db[1]))
    batches = []
    async for batch in backend.iter_nodes(batch_size=4):
        batches.append(batch)
        if len(batches) == 1:  # a write in the middle is not seen by this iteration
            await store.append(agent, turn(99))
    assert [len(b) for b in batches] == [4, 2]  # the empty root + 5 turns
    nodes = [n for b in batches for n in b]
    assert [n.depth for n in nodes] == list(range(6))  # the run, in order
    assert [n.parent for n in nodes] == [None, *(n.digest for n in nodes[:-1])]
    assert nodes[-1].digest == agent.conversation_digest
    assert [len(b) async for b in backend.iter_assets(batch_size=4)] == [1]  # the prompt
