"""Redaction (immagent.redaction, audit/redact.py, Backend.redact) on every backend: the
body erased from every node record and asset row that held it, tombstones that keep every
digest true, the marker a read gives, verify's report, later writes refused, appends
after a redaction, the forced interleavings of a redaction with a writer on two
PostgreSQL connections, and the bytes of a SQLite file after the documented purge."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from immagent import Message, PersistentAgent, Store, verify_proof
from immagent.assets import Kind, ToolCall
from immagent.audit.bundle import verify_bundle
from immagent.exceptions import (
    BundleError,
    MessageNotFoundError,
    RedactedError,
    ValidationError,
)
from immagent.redaction import MAX_REASON_BYTES, redacted
from tests.conftest import count_rows, node_record, write_record
from tests.test_gc import _started, _until_queued
from tests.test_verify import assert_clean

PROMPT = "You keep secrets."


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store on each backend, the in-memory one included."""
    if request.param == "memory":
        dsn = "memory://"
    elif request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        dsn = str(request.getfixturevalue("pg_store_dsn"))
    s = await Store.connect(dsn, min_size=1, max_size=4)
    await s.init_schema()
    try:
        yield s
    finally:
        await s.close()


def user(text: str) -> Message:
    return Message(role="user", content=text)


async def talk(store: Store, name: str, *texts: str) -> PersistentAgent:
    agent = await store.create_agent(name, PROMPT, "m")
    for text in texts:
        agent = await store.append(agent, [user(text)])
    return agent


async def fresh_messages(store: Store, agent: PersistentAgent) -> tuple[Message, ...]:
    store.clear_cache()
    return await (await store.load_agent(agent.id)).get_messages()


def redacted_digests(report: object) -> set[bytes]:
    return {r.digest for r in report.redacted}  # type: ignore[attr-defined]


async def test_redact_by_position_erases_it_from_both_lineages(store: Store) -> None:
    secret = f"my key is {secrets.token_hex(8)}"
    a = await talk(store, "a", "hello", secret, "thanks")
    b = await talk(store, "b", secret)  # the same content, another lineage
    before = [await store.verify(a.id), await store.verify(b.id)]
    # The agent holds the history in the cache: the redaction must not leave it there.
    assert (await a.get_messages())[1].content == secret
    report = await store.redact(state=a.id, position=2, reason="pasted a key")
    assert report.digest == user(secret).digest and report.nodes == 2 and not report.assets
    assert not report.dry_run and "pasted a key" in "\n".join(report.lines())
    for agent, index in ((a, 1), (b, 0)):
        shown = await fresh_messages(store, agent)
        marker = shown[index]
        assert marker.role == "user" and marker.content is not None
        assert marker.content.startswith("[redacted ") and "pasted a key" in marker.content
        assert secret not in marker.content
        found = redacted(marker)
        assert found is not None and found.digest == user(secret).digest
        assert found.reason == "pasted a key" and found.at == report.at
    # The agent object read before the redaction reads the marker too (nothing cached).
    assert redacted((await a.get_messages())[1]) is not None
    shown = await fresh_messages(store, a)
    assert redacted(shown[0]) is None and shown[0].content == "hello"
    assert shown[2].content == "thanks"
    # Every state still verifies with its digests intact; verify lists the erasure.
    for agent, old in zip((a, b), before, strict=True):
        again = await store.verify(agent.id)
        assert_clean(again)
        assert again.agents_checked == old.agents_checked
        assert redacted_digests(again) == {user(secret).digest}
    whole = await store.verify()
    assert_clean(whole)
    assert len(whole.redacted) == 2 and any("redacted: 1 element(s), in 2 node record(s)"
                                            in line for line in whole.lines())
    # The states' digests did not change: the loaded agents are the same states.
    assert (await store.load_agent(a.id)).conversation_digest == a.conversation_digest
    rows = await store.redactions()
    assert [r.stream for r in rows] == [user(secret).digest.hex()]
    # Inclusion proofs still hold, for the erased message (by its digest, no body) and
    # for the others.
    state_digest = (await store.load_agent(a.id)).digest
    for element, index in ((user(secret).digest, 1), (0, 0), (2, 2)):
        checked = verify_proof(await store.prove(a.id, element=element), state_digest)
        assert checked.index == index
        assert (checked.element is None) == (index == 1)  # no body for the erased one
    assert checked.digest == user("thanks").digest


async def test_redact_by_digest_deletes_the_out_of_line_copy(store: Store) -> None:
    big = "pasted file " + secrets.token_hex(3000)  # over chains.INLINE_MAX: an asset
    a = await talk(store, "a", "read this", big, "done")
    b = await talk(store, "b", big)
    digest = user(big).digest
    dry = await store.redact(digest.hex(), reason="a customer's file", dry_run=True)
    assert dry.dry_run and dry.nodes == 2 and dry.assets == 1
    assert (await fresh_messages(store, a))[1].content == big  # nothing changed
    assert not await store.redactions()
    report = await store.redact(digest, reason="a customer's file")
    assert (report.nodes, report.assets) == (2, 1)
    assert str((await fresh_messages(store, a))[1].content).startswith("[redacted ")
    assert str((await fresh_messages(store, b))[0].content).startswith("[redacted ")
    assert_clean(await store.verify())
    swept = await store.gc()
    assert swept.assets_removed == 0  # nothing dangling, nothing else freed
    assert_clean(await store.verify())
    # Once is enough: a second redaction reports it.
    assert (await store.redact(digest, reason="again")).already


async def test_a_later_write_of_redacted_content_is_refused(store: Store) -> None:
    secret = "the password is " + secrets.token_hex(6)
    a = await talk(store, "a", secret)
    await store.redact(user(secret).digest, reason="password")
    states = await store.count_agents()
    with pytest.raises(RedactedError) as caught:
        await store.append(a, [user("again"), user(secret)])
    assert caught.value.digest == user(secret).digest
    with pytest.raises(RedactedError):
        await talk(store, "c", secret)
    # Nothing of the refused writes was stored ("c" was created, its turn was refused).
    assert await store.count_agents() == states + 1
    assert len(await fresh_messages(store, await store.load_agent(a.id))) == 1
    # The redaction record cannot be deleted (it is what refuses these writes).
    (record,) = await store.redactions()
    with pytest.raises(ValidationError, match="redaction"):
        await store.delete_states([record.id])
    assert_clean(await store.verify())


async def test_appends_after_a_redaction_cross_span_depths(store: Store) -> None:
    # A tombstone in the window of the next span depth: that node carries no span, and
    # reads check the window the slow way; later spans are made again.
    texts = [f"turn {i}" for i in range(20)]
    agent = await talk(store, "a", *texts)
    await store.redact(state=agent.id, position=18, reason="r")
    loaded = await store.load_agent(agent.id)
    for i in range(40):
        loaded = await store.append(loaded, [user(f"later {i}")])
    shown = await fresh_messages(store, loaded)
    assert len(shown) == 60 and str(shown[17].content).startswith("[redacted ")
    assert redacted(shown[17]) is not None and shown[18].content == "turn 18"
    assert shown[-1].content == "later 39"
    assert_clean(await store.verify())
    # Redacting a node that span hashes already cover is read the slow way too.
    await store.redact(state=loaded.id, position=3, reason="r2")
    shown = await fresh_messages(store, loaded)
    assert redacted(shown[2]) is not None and len(shown) == 60
    assert_clean(await store.verify())


async def test_verify_checks_a_tombstone_against_its_redaction_record(
        store_dsn: str) -> None:
    # The reason and time were written after the node's digest: the REDACTION state (whose
    # digest covers them) is what a damaged tombstone is caught by.
    store = await Store.connect(store_dsn)
    await store.init_schema()
    try:
        agent = await talk(store, "a", "hello", "secret")
        await store.redact(state=agent.id, position=2, reason="REASON-A")
        assert_clean(await store.verify())
        record = node_record(store_dsn, agent.conversation_digest)
        assert record.count(b"REASON-A") == 1
        write_record(store_dsn, agent.conversation_digest,
                     record.replace(b"REASON-A", b"REASON-B"))
        report = await store.verify()
        assert not report.ok and len(report.corrupt) == 1
        assert "does not match its redaction record" in report.corrupt[0].reason
        assert report.corrupt[0].digest == agent.conversation_digest
    finally:
        await store.close()


async def test_the_marker_keeps_tool_call_structure(store: Store) -> None:
    call = Message.assistant(None, [ToolCall(id="call-1", name="lookup",
                                             arguments='{"card": "4111 1111"}')])
    result = Message.tool_result("call-1", "card holder: Ada, 4111 1111")
    agent = await store.create_agent("a", PROMPT, "m")
    agent = await store.append(agent, [user("look it up"), call, result])
    await store.redact(call.digest, reason="card number")
    await store.redact(result.digest, reason="card number")
    shown = await fresh_messages(store, agent)
    assert shown[1].role == "assistant" and shown[1].tool_calls is not None
    assert [(c.id, c.name, c.arguments) for c in shown[1].tool_calls] == [
        ("call-1", "lookup", "{}")]
    assert shown[2].role == "tool" and shown[2].tool_call_id == "call-1"
    assert "4111" not in repr(shown)
    assert_clean(await store.verify())


async def test_bad_requests_are_refused_and_change_nothing(store: Store) -> None:
    agent = await talk(store, "a", "one", "two")
    with pytest.raises(ValidationError, match="message"):
        await store.redact(reason="x")
    with pytest.raises(ValidationError, match="message"):
        await store.redact(user("one").digest, state=agent.id, position=1)
    with pytest.raises(ValidationError, match="position"):
        await store.redact(user("one").digest, position=1)
    for bad in (0, 3, -1, True, "1"):
        with pytest.raises(ValidationError, match="position"):
            await store.redact(state=agent.id, position=bad)  # type: ignore[arg-type]
    for reason in ("x" * (MAX_REASON_BYTES + 1), "a\x00b", 7):
        with pytest.raises(ValidationError, match="reason"):
            await store.redact(user("one").digest, reason=reason)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="message"):
        await store.redact("not hex")
    with pytest.raises(ValidationError, match="message"):
        await store.redact(b"short")
    # The system prompt is content, but not a message.
    prompt = (await store.load_agent(agent.id)).system_prompt_digest
    with pytest.raises(ValidationError, match="only messages"):
        await store.redact(prompt)
    with pytest.raises(MessageNotFoundError):
        await store.redact(user("never said").digest)
    assert not await store.redactions()
    assert [m.content for m in await fresh_messages(store, agent)] == ["one", "two"]


async def test_concurrent_writes_of_the_content_are_erased_or_refused(store: Store) -> None:
    secret = "token " + secrets.token_hex(8)
    agents = [await talk(store, f"w{i}", "hi") for i in range(6)]
    await talk(store, "first", secret)

    async def write(agent: PersistentAgent) -> PersistentAgent | None:
        try:
            return await store.append(agent, [user(secret)])
        except RedactedError:
            return None

    results = await asyncio.gather(store.redact(user(secret).digest, reason="r"),
                                   *map(write, agents))
    for written in results[1:]:
        if written is not None:  # committed before the redaction: erased by it
            assert isinstance(written, PersistentAgent)
            shown = await fresh_messages(store, written)
            assert redacted(shown[-1]) is not None
    with pytest.raises(RedactedError):
        await store.append(agents[0], [user(secret)])
    assert_clean(await store.verify())


@pytest.fixture
async def two_pg_stores(pg_store_dsn: str) -> AsyncIterator[list[Store]]:
    stores = [await Store.connect(pg_store_dsn, min_size=1, max_size=2) for _ in range(2)]
    await stores[0].init_schema()
    yield stores
    for s in stores:
        await s.close()


async def test_race_writer_in_flight_when_redaction_starts(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # W is writing the secret and frozen before its commit (holding gc's shared lock); R
    # starts and must wait for W, then see W's node and erase it too.
    writer, redactor = two_pg_stores
    secret = "in flight " + secrets.token_hex(8)
    await talk(writer, "first", secret)
    fresh = await talk(writer, "second", "hi")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("LOCK TABLE immagent_states IN SHARE MODE")
        w = await _started(writer.append(fresh, [user(secret)]))
        await _until_queued(pg_store_dsn, "relation", w)
        r = await _started(redactor.redact(user(secret).digest, reason="r"))
        await _until_queued(pg_store_dsn, "advisory", r)
        await x.rollback()
        written = await w
        report = await r
    finally:
        await x.close()
    assert report.nodes == 2  # the first lineage's node and W's
    assert redacted((await fresh_messages(redactor, written))[-1]) is not None
    assert_clean(await redactor.verify())


async def test_race_redaction_in_flight_when_writer_starts(
        two_pg_stores: list[Store], pg_store_dsn: str) -> None:
    # R holds gc's exclusive lock and is frozen before it rewrites the rows; W starts
    # writing the secret and must wait for R, then be refused.
    writer, redactor = two_pg_stores
    secret = "racing " + secrets.token_hex(8)
    await talk(writer, "first", secret)
    fresh = await talk(writer, "second", "hi")
    x = await psycopg.AsyncConnection.connect(pg_store_dsn)
    try:
        await x.execute("LOCK TABLE immagent_nodes IN SHARE MODE")
        r = await _started(redactor.redact(user(secret).digest, reason="r"))
        await _until_queued(pg_store_dsn, "relation", r)
        w = await _started(writer.append(fresh, [user(secret)]))
        await _until_queued(pg_store_dsn, "advisory", w)
        await x.rollback()
        report = await r
        with pytest.raises(RedactedError):
            await w
    finally:
        await x.close()
    assert report.nodes == 1
    assert [m.content for m in await fresh_messages(writer, fresh)] == ["hi"]
    assert_clean(await redactor.verify())


def _purge(path: Path) -> None:
    """What docs/retention.md tells SQLite users to run after a redaction."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_sqlite_file_holds_no_erased_bytes_after_the_purge(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    secret = "SECRET-" + secrets.token_hex(4)  # short records are stored uncompressed
    store = await Store.connect(f"sqlite:///{path}")
    await store.init_schema()
    try:
        a = await talk(store, "a", "hello", secret, "more")
        await talk(store, "b", secret)
        await store.close()
        _purge(path)
        assert secret.encode() in _file_bytes(path)  # the test can fail: it was there
        store = await Store.connect(f"sqlite:///{path}")
        await store.redact(state=a.id, position=2, reason="secret")
        assert_clean(await store.verify())
    finally:
        await store.close()
    _purge(path)
    assert secret.encode() not in _file_bytes(path)
    store = await Store.connect(f"sqlite:///{path}")
    try:
        shown = await fresh_messages(store, await store.load_agent(a.id))
        assert [redacted(m) is not None for m in shown] == [False, True, False]
    finally:
        await store.close()


async def test_sqlite_secure_delete_zeroes_the_freed_cells(tmp_path: Path) -> None:
    # Without VACUUM, after a checkpoint: the redaction's own secure_delete leaves no copy
    # in the file's free space (WAL frames are what the purge removes).
    path = tmp_path / "store.db"
    secret = "SECRET-" + secrets.token_hex(4)
    store = await Store.connect(f"sqlite:///{path}")
    await store.init_schema()
    try:
        a = await talk(store, "a", secret, "after")
        await store.close()
        _purge(path)
        store = await Store.connect(f"sqlite:///{path}")
        await store.redact(state=a.id, position=1, reason="secret")
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    assert secret.encode() not in path.read_bytes()
    assert count_rows(f"sqlite:///{path}", "immagent_states",
                      f"kind = {int(Kind.REDACTION)}") == 1


# -- bundles ---------------------------------------------------------------------------------


async def test_a_redacted_message_travels_in_a_bundle_as_its_tombstone(
        store: Store, tmp_path: Path) -> None:
    secret = "SECRET-" + secrets.token_hex(6)
    big = "attachment " + secrets.token_hex(3000)
    agent = await talk(store, "a", "hello", secret, big,
                       *(f"turn {i}" for i in range(20)))
    await store.redact(state=agent.id, position=2, reason="key")
    await store.redact(state=agent.id, position=3, reason="file")
    path = tmp_path / "after.bundle"
    await store.export(agent, path)
    data = path.read_bytes()
    assert secret.encode() not in data and big.encode()[:64] not in data
    info = verify_bundle(path)  # offline: no store
    assert info.head == agent.id
    other = await Store.connect("memory://")
    await other.init_schema()
    try:
        imported = await other.import_bundle(path)
        shown = await fresh_messages(other, imported)
        assert [redacted(m) is not None for m in shown[:4]] == [False, True, True, False]
        assert shown[1].content == (await fresh_messages(store, agent))[1].content
        report = await other.verify()
        assert_clean(report)
        assert redacted_digests(report) == {user(secret).digest, user(big).digest}
        # The importing store can extend the imported lineage past the next span depth.
        for i in range(20):
            imported = await other.append(imported, [user(f"more {i}")])
        assert_clean(await other.verify())
    finally:
        await other.close()


async def test_a_bundle_made_before_the_redaction_cannot_bring_the_body_back(
        store: Store, tmp_path: Path) -> None:
    secret = "SECRET-" + secrets.token_hex(6)
    agent = await talk(store, "a", "hello", secret)
    path = tmp_path / "before.bundle"
    await store.export(agent, path)
    assert secret.encode() in path.read_bytes()
    await store.redact(user(secret).digest, reason="key")
    await store.delete_lineage(agent)
    await store.gc()
    with pytest.raises(RedactedError):
        await store.import_bundle(path)
    assert await store.count_agents() == 0  # nothing was written
    assert_clean(await store.verify())


def test_a_tampered_tombstone_in_a_bundle_is_refused(tmp_path: Path) -> None:
    async def made() -> Path:
        s = await Store.connect("memory://")
        await s.init_schema()
        agent = await talk(s, "a", "hello", "secret text")
        await s.redact(state=agent.id, position=2, reason="THE-REASON")
        path = tmp_path / "b.bundle"
        await s.export(agent, path)
        await s.close()
        return path

    path = asyncio.run(made())
    data = path.read_bytes()
    assert data.count(b"THE-REASON") == 1
    path.write_bytes(data.replace(b"THE-REASON", b"THE-REASOM"))
    with pytest.raises(BundleError):
        verify_bundle(path)
