"""store.verify(): every problem it must find, injected behind the Store's back with raw SQL
(the only way real corruption arrives), on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid

import pytest

import immagent
from immagent import Message, PersistentAgent, Store, chains
from immagent.assets import Kind, digest_of
from immagent.audit.verify import VerifyReport
from tests.conftest import count_rows, node_record, raw_sql, turn, write_record

#: Also through PgBouncer and with a read replica (tests/conftest.py).
pytestmark = pytest.mark.on_cluster

PROMPT = "You audit things."


# -- raw SQL, behind the Store's back (helpers shared by the other audit tests) ------------


def stored_body(dsn: str, digest: bytes) -> bytes:
    (row,) = raw_sql(dsn, "SELECT body FROM immagent_assets WHERE digest = %s", [digest])
    return bytes(row[0])


def flip_byte(dsn: str, digest: bytes, index: int = 0) -> None:
    """Flip the low bit of one byte of one stored body."""
    body = bytearray(stored_body(dsn, digest))
    body[index] ^= 0x01
    raw_sql(dsn, "UPDATE immagent_assets SET body = %s WHERE digest = %s", [bytes(body), digest])


def delete_asset(dsn: str, digest: bytes) -> None:
    raw_sql(dsn, "DELETE FROM immagent_assets WHERE digest = %s", [digest])


def stored_digests(dsn: str) -> set[bytes]:
    return {bytes(r[0]) for r in raw_sql(dsn, "SELECT digest FROM immagent_assets")}


def stored_rows(dsn: str) -> set[bytes]:
    """Every asset and chain node digest stored."""
    return stored_digests(dsn) | {bytes(r[0]) for r in raw_sql(
        dsn, "SELECT digest FROM immagent_nodes")}


async def conversation(store: Store) -> tuple[PersistentAgent, PersistentAgent]:
    """A base agent and a two-turn descendant."""
    base = await store.create_agent("auditee", PROMPT, "m")
    one = await store.append(base, turn(1))
    return base, await store.append(one, turn(2))


def assert_clean(report: VerifyReport) -> None:
    assert report.ok, "\n".join(report.lines())
    assert report.problems == 0 and not report.truncated


# -- tests --------------------------------------------------------------------------------


async def test_clean_store_verifies_with_exact_counts_and_progress(
        store: Store, store_dsn: str) -> None:
    _, head = await conversation(store)
    await head.clone()
    seen: list[int] = []
    report = await store.verify(progress=seen.append)
    assert_clean(report)
    # The prompt is an asset; the empty node and the two turns' nodes (each holding its
    # two messages) are chain nodes.
    assert report.assets_checked == count_rows(store_dsn, "immagent_assets") == 1
    assert report.nodes_checked == count_rows(store_dsn, "immagent_nodes") == 3
    assert report.agents_checked == 4
    # Content bytes, as a bundle counts them: the prompt's body, and each node's fields
    # and the message bodies its record holds (uncompressed).
    records = [chains.split_record(node_record(store_dsn, bytes(d))) for (d,) in raw_sql(
        store_dsn, "SELECT digest FROM immagent_nodes")]
    assert report.bytes_checked == sum(
        len(bytes(r[0])) for r in raw_sql(store_dsn, "SELECT body FROM immagent_assets")
    ) + sum(len(f) + sum(map(len, e)) for f, e in records)
    assert seen and seen[-1] == 4 and seen == sorted(seen)
    # The count is of state rows of every kind (checkpoints and sessions are states too).
    assert report.lines() == [f"verified whole store: 1 assets and 3 chain nodes "
                              f"({report.bytes_checked} bytes), 4 states", "OK"]


async def test_one_flipped_byte_names_exactly_that_node(store: Store, store_dsn: str) -> None:
    # A message is held in its turn's node row: one changed byte of it is that row's
    # contents no longer hashing to its digest, wherever the byte is.
    _, head = await conversation(store)
    victim = head.conversation_digest
    record = bytearray(node_record(store_dsn, victim))
    record[-1] ^= 0x01  # the last byte of the assistant message of the last turn
    write_record(store_dsn, victim, bytes(record))
    for report in (await store.verify(), await store.verify(head)):
        assert [p.digest for p in report.corrupt] == [victim]
        assert report.corrupt[0].kind == Kind.NODE
        assert "depth 2" in report.corrupt[0].reason
        assert not report.missing and not report.undecodable and not report.bad_agents
        assert not report.ok and report.problems == 1
        assert any(victim.hex() in line for line in report.lines())
    # Reads refuse the corrupt row too, naming it.
    store.clear_cache()
    with pytest.raises(immagent.IntegrityError, match=victim.hex()):
        await (await store.load_agent(head.id)).get_messages()


async def test_a_deleted_row_is_missing_with_who_refers_to_it(
        store: Store, store_dsn: str) -> None:
    # A body larger than chains.INLINE_MAX is an asset of its own, named by its node.
    base = await store.create_agent("auditee", PROMPT, "m")
    big = Message.user("a long pasted text " * (chains.INLINE_MAX // 10))
    assert len(big.body) > chains.INLINE_MAX
    one = await store.append(base, [big, Message.assistant("ok")])
    head = await store.append(one, turn(2))
    delete_asset(store_dsn, big.digest)
    node1 = one.conversation_digest
    report = await store.verify()
    assert [(m.digest, m.referrer) for m in report.missing] == [(big.digest, node1)]
    assert not report.corrupt and not report.undecodable and not report.bad_agents
    assert f"missing {big.digest.hex()} referenced by asset {node1.hex()}" in report.lines()
    scoped = await store.verify(head)
    assert [(m.digest, m.referrer) for m in scoped.missing] == [(big.digest, node1)]
    # The base state does not reach the message, so its own audit is clean.
    assert_clean(await store.verify(base))


async def test_a_deleted_node_is_missing_and_breaks_only_its_lineage(
        store: Store, store_dsn: str) -> None:
    base, head = await conversation(store)
    one = await store.load_agent(head.parent_id or base.id)
    raw_sql(store_dsn, "DELETE FROM immagent_nodes WHERE digest = %s", [one.conversation_digest])
    report = await store.verify()
    # The state that pinned it names it; the next node of the run lost its parent.
    assert [(m.digest, m.referrer) for m in report.missing] == [
        (one.conversation_digest, one.id)]
    assert [p.digest for p in report.corrupt] == [head.conversation_digest]
    assert "parent" in report.corrupt[0].reason
    store.clear_cache()
    with pytest.raises(immagent.IntegrityError):
        await (await store.load_agent(head.id)).get_messages()
    assert await (await store.load_agent(base.id)).get_messages() == ()


async def test_a_missing_root_names_the_agent_rows(store: Store, store_dsn: str) -> None:
    base, head = await conversation(store)
    prompt = base.system_prompt_digest
    delete_asset(store_dsn, prompt)
    report = await store.verify()
    assert head.parent_id is not None
    ids = {base.id, head.id, head.parent_id}
    assert {m.digest for m in report.missing} == {prompt}
    assert {m.referrer for m in report.missing} == ids
    scoped = await store.verify(head)
    assert [(m.digest, m.referrer) for m in scoped.missing] == [(prompt, head.id)]


async def test_a_wrong_refs_column_is_corrupt(store: Store, store_dsn: str) -> None:
    # gc follows a node's refs column to its out-of-line elements: a damaged column would
    # sweep live data. The refs are the elements' digests, part of the node's digest, so
    # the damage is a mismatch.
    base = await store.create_agent("auditee", PROMPT, "m")
    head = await store.append(base, [Message.user("x" * (chains.INLINE_MAX + 1)),
                                      Message.assistant("ok")])
    empty = b"" if store_dsn.startswith("sqlite:///") else None
    raw_sql(store_dsn, "UPDATE immagent_nodes SET refs = %s WHERE digest = %s",
            [empty, head.conversation_digest])
    report = await store.verify()
    assert [p.digest for p in report.corrupt] == [head.conversation_digest]
    assert "refs" in report.corrupt[0].reason


async def test_undecodable_body_with_a_valid_digest(store: Store, store_dsn: str) -> None:
    await conversation(store)
    body = b"\xc1 not msgpack"  # 0xc1 is never valid msgpack
    digest = digest_of(Kind.MESSAGE, body)
    refs: bytes | None = b"" if store_dsn.startswith("sqlite:///") else None
    raw_sql(store_dsn, "INSERT INTO immagent_assets (digest, kind, refs, body) "
            "VALUES (%s, %s, %s, %s)", [digest, int(Kind.MESSAGE), refs, body])
    report = await store.verify()
    assert [p.digest for p in report.undecodable] == [digest]
    assert not report.corrupt and not report.missing


async def test_tampered_agent_row_is_reported(store: Store, store_dsn: str) -> None:
    _, head = await conversation(store)
    raw_sql(store_dsn, "UPDATE immagent_states SET stream = %s WHERE id = %s",
            ["mallory", head.id])
    report = await store.verify()
    assert [a.agent_id for a in report.bad_agents] == [head.id]
    assert report.bad_agents[0].stored == head.digest
    assert not report.corrupt and not report.missing
    assert [a.agent_id for a in (await store.verify(head)).bad_agents] == [head.id]


async def test_verify_rejects_bad_input(store: Store) -> None:
    with pytest.raises(immagent.ValidationError) as bad:
        await store.verify("not-a-uuid")
    assert bad.value.field == "agent" and "not-a-uuid" in str(bad.value)
    with pytest.raises(immagent.AgentNotFoundError):
        await store.verify(uuid.uuid4())
    with pytest.raises(immagent.ValidationError) as bad:
        await store.verify(progress=42)  # type: ignore[arg-type]
    assert bad.value.field == "progress"


async def test_an_undecodable_agent_row_is_reported_not_raised(
        store: Store, store_dsn: str) -> None:
    _, head = await conversation(store)
    raw_sql(store_dsn, "UPDATE immagent_states SET body = %s WHERE id = %s",
            [b"\xc1", head.id])
    report = await store.verify()
    assert [a.agent_id for a in report.bad_agents] == [head.id] and not report.ok
    assert report.agents_checked == 3  # the other rows were still checked
    assert "undecodable" in report.bad_agents[0].reason
    scoped = await store.verify(head.id)
    assert [a.agent_id for a in scoped.bad_agents] == [head.id]
    store.clear_cache()  # else the live object is returned without a read
    with pytest.raises(immagent.IntegrityError):  # plain reads fail inside the error tree
        await store.load_agent(head.id)
