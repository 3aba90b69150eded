"""A process SIGKILLed in the middle of a large write, an import or an export leaves no
partial state: the old agents are intact, nothing of the interrupted write is visible, and
verify() is clean. The moment of the kill is observed, not guessed: inside the write
transaction (PostgreSQL: the child's session holds the gc lock's shared side; SQLite: the
child holds the database's write lock) or, for exports, once the temp file exists."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from immagent import Message, PersistentAgent, Store
from immagent.assets import ConversationNode
from immagent.audit.bundle import verify_bundle
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest
from tests.conftest import ROOT
from tests.test_verify import assert_clean, stored_rows

APP = "immagent_crash"
MESSAGES = 20_000  # enough that the write transaction lasts a good fraction of a second
#: A large write is a chain of many nodes in one commit (each node row holds its messages).
PER_NODE = 4

CHILD = r"""
import asyncio, sys
from datetime import UTC, datetime
from immagent import Message, Store
from immagent.ids import uuid7
from immagent.records import AgentRecord, state_digest

async def main(dsn: str, op: str, arg: str, extra: str) -> None:
    async with await Store.connect(dsn, min_size=1, max_size=2) as store:
        if op == "append":
            agent = await store.load_agent(arg)
            (head,) = await store.get_assets([agent.conversation_digest])
            batch = []
            for i in range(int(extra) // 4):
                added = [Message(role="user", content=f"crash {i} {j} " + "x" * 200)
                         for j in range(4)]
                head = head.extend(added)
                batch += [*added, head]
            r = agent.record
            record = AgentRecord(id=uuid7(), parent_id=r.id, created_at=datetime.now(UTC),
                                 name=r.name, model=r.model, system_prompt=r.system_prompt,
                                 conversation=head.digest, model_config={}, metadata={},
                                 digest=state_digest(r.name, r.model, r.system_prompt,
                                                     head.digest, {}, {}))
            print("writing", flush=True)
            await store.commit(batch, [record.to_row()])
        elif op == "import":
            print("writing", flush=True)
            await store.import_bundle(arg)
        else:
            print("writing", flush=True)
            await store.export(arg, extra)
        print("done", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def grow_chain(store: Store, agent: PersistentAgent, tag: str,
                     text: str) -> PersistentAgent:
    """``agent`` with MESSAGES more messages, PER_NODE a node, in one commit (a state for
    the last node): a long chain whose every node a write of it writes."""
    (head,) = await store.get_assets([agent.conversation_digest])
    assert isinstance(head, ConversationNode)
    batch: list[Any] = []
    for i in range(MESSAGES // PER_NODE):
        added = [Message(role="user", content=f"{tag}{i} {j} " + text) for j in range(PER_NODE)]
        head = head.extend(added)
        batch += [*added, head]
    r = agent.record
    record = AgentRecord(id=uuid7(), parent_id=r.id, created_at=datetime.now(UTC), name=r.name,
                         model=r.model, system_prompt=r.system_prompt,
                         conversation=head.digest, model_config={}, metadata={},
                         digest=state_digest(r.name, r.model, r.system_prompt, head.digest,
                                             {}, {}))
    await store.commit(batch, [record.to_row()])
    return await store.load_agent(record.id)


def _child_dsn(dsn: str) -> str:
    """The DSN the child uses: tagged, so its PostgreSQL sessions can be found."""
    if dsn.startswith("sqlite:///"):
        return dsn
    return psycopg.conninfo.make_conninfo(dsn, application_name=APP)


def _in_write_transaction(dsn: str) -> Callable[[], bool]:
    """A probe: is the child inside a write transaction right now?"""
    if dsn.startswith("sqlite:///"):
        path = dsn.removeprefix("sqlite:///")

        def sqlite_probe() -> bool:
            # Someone holds the write lock iff BEGIN IMMEDIATE fails at once.
            conn = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return False
            except sqlite3.OperationalError:
                return True
            finally:
                conn.close()

        return sqlite_probe

    def pg_probe() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE a.application_name = %s AND l.locktype = 'advisory' AND l.granted",
                (APP,)).fetchone()
        return row is not None and row[0] > 0

    return pg_probe


async def _kill_when(args: list[str], ready: Callable[[], bool]) -> str:
    """Run the child, SIGKILL it as soon as ``ready()`` holds; returns its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"writing\n", (line, await proc.stderr.read())
        for _ in range(6000):
            if await asyncio.to_thread(ready):
                break
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.002)
        else:
            raise AssertionError("the child never got inside its write")
        await asyncio.sleep(0.01)  # a little into it, not at its very first statement
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        rest, err = await proc.communicate()
    output = (line + rest).decode()
    assert "done" not in output, f"the write finished before the kill: make it larger\n{err!r}"
    assert proc.returncode == -signal.SIGKILL
    return output


async def _settled(dsn: str) -> None:
    """Wait until the server has rolled the dead child's session back."""
    if dsn.startswith("sqlite:///"):
        return  # the dead process's lock vanished with it; the journal is rolled back on open
    for _ in range(500):
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = %s", (APP,)).fetchone()
        if row is not None and row[0] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the killed session never went away")


async def _reopen(dsn: str, check: Callable[[Store], Awaitable[None]]) -> None:
    async with await Store.connect(dsn, min_size=1, max_size=2) as fresh:
        await check(fresh)


async def test_kill_during_a_large_append_leaves_no_trace(store: Store, store_dsn: str) -> None:
    base = await store.append(await store.create_agent("victim", "p", "m"),
                              [Message(role="user", content="before the crash")])
    expected = await base.get_messages()
    agents, assets = await store.count_agents(), stored_rows(store_dsn)
    await _kill_when([_child_dsn(store_dsn), "append", str(base.id), str(MESSAGES)],
                     _in_write_transaction(store_dsn))
    await _settled(store_dsn)

    async def check(fresh: Store) -> None:
        assert await fresh.count_agents() == agents
        assert stored_rows(store_dsn) == assets  # not one message of the batch
        assert await (await fresh.load_agent(base.id)).get_messages() == expected
        assert_clean(await fresh.verify())
        # The store still takes writes (no stale lock left behind).
        after = await fresh.append(await fresh.load_agent(base.id),
                                   [Message(role="user", content="after the crash")])
        assert len(await after.get_messages()) == 2

    await _reopen(store_dsn, check)


async def test_kill_during_an_import_leaves_no_trace(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    old = await store.append(await store.create_agent("old", "p", "m"),
                             [Message(role="user", content="old")])
    big = await grow_chain(store, await store.create_agent("big", "p2", "m"), "bundled",
                           "y" * 200)
    bundle = tmp_path / "big.bundle"
    await store.export(big, bundle)
    await store.delete_lineage(big)
    await store.gc()
    agents, assets = await store.count_agents(), stored_rows(store_dsn)
    await _kill_when([_child_dsn(store_dsn), "import", str(bundle), ""],
                     _in_write_transaction(store_dsn))
    await _settled(store_dsn)

    async def check(fresh: Store) -> None:
        assert await fresh.count_agents() == agents
        assert stored_rows(store_dsn) == assets
        assert await (await fresh.load_agent(old.id)).get_messages() == (
            Message(role="user", content="old"),)
        assert_clean(await fresh.verify())
        # Importing again (the retry after a crash) completes.
        again = await fresh.import_bundle(bundle)
        assert again.id == big.id and len(await again.get_messages()) == MESSAGES
        assert_clean(await fresh.verify())

    await _reopen(store_dsn, check)


async def test_kill_during_an_export_keeps_the_previous_bundle(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    small = await store.append(await store.create_agent("small", "p", "m"),
                               [Message(role="user", content="small")])
    big = await grow_chain(store, await store.create_agent("big", "p", "m"), "e", "z" * 400)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "agent.bundle"
    previous = await store.export(small, dest)

    def temp_file_exists() -> bool:
        return any(name.endswith(".tmp") for name in os.listdir(out))

    await _kill_when([_child_dsn(store_dsn), "export", str(big.id), str(dest)],
                     temp_file_exists)
    # Readers of the destination see the old bundle, whole; the dead writer's temp file is
    # all that is left (a SIGKILL leaves no chance to remove it), never a partial bundle.
    assert verify_bundle(dest) == previous
    assert [n for n in os.listdir(out) if n != "agent.bundle"] == [
        n for n in os.listdir(out) if n.startswith(".agent.bundle.") and n.endswith(".tmp")]
    assert len(os.listdir(out)) >= 2
    # The next export to that file removes what the dead writer left.
    again = await store.export(small, dest)
    assert verify_bundle(dest) == again
    assert os.listdir(out) == ["agent.bundle"]
