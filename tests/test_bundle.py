"""Audit bundles: export -> offline verify -> import into the other backend with the same
ids and digests; any tampering is refused, naming what was tampered with."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

import immagent
from immagent import Message, PersistentAgent, Store
from immagent.audit.bundle import MAGIC, BundleInfo, verify_bundle
from tests.conftest import count_rows, node_record, raw_sql, write_record
from tests.conftest import turn as support_turn
from tests.test_verify import assert_clean, stored_rows

PROMPT = "You are exported."
MARKER = "unique-marker-7f3a"


def turn(i: int, tag: str = "") -> list[Message]:
    return support_turn(i, tag, tokens=(2, 3), model="immagent/echo",
                        call_config={"temperature": 0.5})


@pytest.fixture(scope="session")
def pg_other_dsn(pg_dsn: str) -> Iterator[str]:
    """A second PostgreSQL database on the same server (a postgres -> postgres import)."""
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    name = f"{params['dbname']}_b"
    admin = psycopg.conninfo.make_conninfo(**{**params, "dbname": "postgres"})  # type: ignore[arg-type]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    yield psycopg.conninfo.make_conninfo(**{**params, "dbname": name})  # type: ignore[arg-type]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture(params=["postgres", "sqlite"])
def target_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store on each backend to import into (separate from ``store``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'target.db'}"
    dsn = str(request.getfixturevalue("pg_other_dsn"))
    with contextlib.suppress(psycopg.errors.UndefinedTable):  # the first test creates it
        raw_sql(dsn, "TRUNCATE immagent_assets, immagent_states")
    return dsn


@pytest.fixture
async def target(target_dsn: str) -> AsyncIterator[Store]:
    s = await Store.connect(target_dsn, min_size=1, max_size=2)
    await s.init_schema()
    yield s
    await s.close()


async def lineage_with_fork(store: Store) -> tuple[PersistentAgent, PersistentAgent]:
    """A head five states deep (advance, clone, metadata change) and a sibling fork whose
    own turn must stay out of the head's bundle."""
    base = await store.create_agent("bundled", PROMPT, "immagent/echo",
                                    model_config={"temperature": 0.5}, metadata={"v": 1})
    one = await store.append(base, turn(1))
    fork = await store.append(one, turn(2, "fork"))
    two = await store.append(one, [*turn(2), Message(role="user", content=MARKER)])
    mid = await two.with_metadata({"v": 1, "step": 3})
    head = await (await mid.clone()).with_metadata({"v": 2, "tags": ["audit"]})
    return head, fork


async def test_export_verify_import_into_the_other_backend(
        store: Store, target: Store, target_dsn: str, tmp_path: Path) -> None:
    head, fork = await lineage_with_fork(store)
    path = tmp_path / "head.bundle"
    info = await store.export(head, path)
    lineage = await store.ancestors(head)  # newest first, as a bundle holds them
    assert info.head == head.id and info.head_digest == head.digest
    assert info.agents == tuple(a.id for a in lineage) and len(info.agents) == 5
    # prompt, empty node, 2 nodes, 5 messages; nothing of the fork.
    assert info.assets == 9 and info.file_bytes == path.stat().st_size
    assert verify_bundle(path) == info
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left

    imported = await target.import_bundle(str(path))
    assert (imported.id, imported.digest) == (head.id, head.digest)
    target.clear_cache()
    assert await imported.get_messages() == await head.get_messages()
    assert await imported.get_system_prompt() == PROMPT
    theirs = await target.ancestors(imported)
    for mine, copy in zip(lineage, theirs, strict=True):
        assert (copy.id, copy.parent_id, copy.digest, copy.created_at, dict(copy.metadata),
                dict(copy.model_config), copy.name) == (
                mine.id, mine.parent_id, mine.digest, mine.created_at, dict(mine.metadata),
                dict(mine.model_config), mine.name)
    assert_clean(await target.verify())
    with pytest.raises(immagent.AgentNotFoundError):
        await target.load_agent(fork.id)

    # Idempotent: a second import (and one into the source store itself) adds nothing.
    rows, assets = count_rows(target_dsn, "immagent_states"), stored_rows(target_dsn)
    # The prompt is an asset; the bundle's nodes are chain nodes holding its messages.
    assert (rows, len(assets)) == (5, 1 + count_rows(target_dsn, "immagent_nodes"))
    again = await target.import_bundle(path)
    assert again.id == head.id
    assert (count_rows(target_dsn, "immagent_states"), stored_rows(target_dsn)) == (rows, assets)
    assert (await store.import_bundle(path)).id == head.id
    assert await store.count_agents() == 7  # the fork and the clone's original too


async def test_import_restores_a_deleted_and_swept_lineage(store: Store, tmp_path: Path) -> None:
    head, _ = await lineage_with_fork(store)
    messages = await head.get_messages()
    await store.export(head, tmp_path / "b")
    await store.delete_lineage(head)
    await store.gc()
    with pytest.raises(immagent.AgentNotFoundError):
        await store.load_agent(head.id)
    store.clear_cache()
    back = await store.import_bundle(tmp_path / "b")
    assert back.id == head.id and await back.get_messages() == messages
    assert_clean(await store.verify())


async def test_a_tampered_message_is_named(store: Store, target: Store, target_dsn: str,
                                           tmp_path: Path) -> None:
    head, _ = await lineage_with_fork(store)
    path = tmp_path / "t.bundle"
    await store.export(head, path)
    data = bytearray(path.read_bytes())
    at = data.index(MARKER.encode())
    data[at] ^= 0x20  # "u" -> "U": still valid msgpack, no longer the hashed bytes
    path.write_bytes(bytes(data))
    victim = Message(role="user", content=MARKER).digest.hex()
    with pytest.raises(immagent.BundleError, match=f"asset {victim} is tampered"):
        verify_bundle(path)
    with pytest.raises(immagent.BundleError, match=victim):
        await target.import_bundle(path)
    assert count_rows(target_dsn, "immagent_states") == 0
    assert count_rows(target_dsn, "immagent_assets") == 0


async def test_a_tampered_agent_row_is_named(store: Store, tmp_path: Path) -> None:
    head, _ = await lineage_with_fork(store)
    path = tmp_path / "t.bundle"
    await store.export(head, path)
    data = path.read_bytes()
    # The head is the first agent record: rename it (same length, framing intact).
    path.write_bytes(data.replace(b"bundled", b"bundleX", 1))
    with pytest.raises(immagent.BundleError, match=f"agent {head.id} is tampered"):
        verify_bundle(path)


async def test_every_single_byte_flip_is_refused(tmp_path: Path) -> None:
    # Content digests name what they cover; the file checksum covers the rest (ids, parents,
    # timestamps, framing, counts). Every flip must end in BundleError, never a pass and
    # never another exception type. (The format does not depend on the backend.)
    path = tmp_path / "small.bundle"
    async with await Store.connect(f"sqlite:///{tmp_path / 'fuzz.db'}") as store:
        await store.init_schema()
        head = await store.append(await store.create_agent("b", "p", "m"), turn(1))
        await store.export(head, path)
    good = path.read_bytes()
    bad = tmp_path / "bad.bundle"
    for i in range(len(good)):
        data = bytearray(good)
        data[i] ^= 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(immagent.BundleError):
            verify_bundle(bad)
    for damaged in (good[:-1], good[: len(good) // 2], good + b"\x00", MAGIC):
        bad.write_bytes(damaged)
        with pytest.raises(immagent.BundleError):
            verify_bundle(bad)


async def test_bad_paths_and_non_bundles(store: Store, tmp_path: Path) -> None:
    head = await store.create_agent("b", "p", "m")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a bundle\n")
    with pytest.raises(immagent.BundleError, match="not an immagent bundle"):
        verify_bundle(text)
    with pytest.raises(immagent.BundleError, match="not an immagent bundle"):
        await store.import_bundle(text)
    for path, wanted in ((tmp_path / "absent.bundle", "no such file"),
                         (tmp_path, "not a regular file")):
        with pytest.raises(immagent.ValidationError, match=wanted) as err:
            verify_bundle(path)
        assert err.value.field == "path"
    with pytest.raises(immagent.ValidationError) as err:
        await store.export(head, tmp_path / "no" / "such" / "dir.bundle")
    assert err.value.field == "path" and "does not exist" in str(err.value)
    with pytest.raises(immagent.ValidationError) as err:
        await store.export(head, tmp_path)
    assert err.value.field == "path" and "directory" in str(err.value)
    with pytest.raises(immagent.ValidationError) as err:
        await store.export("not-a-uuid", tmp_path / "x")
    assert err.value.field == "agent"
    with pytest.raises(immagent.AgentNotFoundError):
        await store.export(uuid.UUID(int=5), tmp_path / "x")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


async def test_export_of_a_corrupt_store_fails_and_keeps_the_old_file(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    head = await store.append(await store.create_agent("b", "p", "m"), turn(1))
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "keep.bundle"
    path.write_bytes(b"previous contents")
    victim = head.conversation_digest  # the node holding the turn's messages
    record = node_record(store_dsn, victim)
    write_record(store_dsn, victim, record[:-1] + bytes([record[-1] ^ 1]))
    with pytest.raises(immagent.IntegrityError, match=victim.hex()):
        await store.export(head, path)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path / "out") == ["keep.bundle"]  # no temp file left behind


async def test_import_refuses_a_conflicting_agent_row(
        store: Store, target: Store, target_dsn: str, tmp_path: Path) -> None:
    head = await store.append(await store.create_agent("b", "p", "m"), turn(1))
    info: BundleInfo = await store.export(head, tmp_path / "c")
    await target.import_bundle(tmp_path / "c")
    raw_sql(target_dsn, "UPDATE immagent_states SET digest = %s WHERE id = %s",
            [b"\x00" * 32, info.head])
    with pytest.raises(immagent.BundleError, match=f"state {head.id} already exists"):
        await target.import_bundle(tmp_path / "c")


async def test_export_to_an_unwritable_place_is_a_clear_error(store: Store) -> None:
    agent = await store.create_agent("bot", "p", "m")
    with pytest.raises(immagent.ValidationError) as err:
        await store.export(agent, "/proc/agent.bundle")
    assert err.value.field == "path" and "/proc/agent.bundle" in str(err.value)
