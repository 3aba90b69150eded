"""store.verify(): every problem it must find, injected behind the Store's back with raw SQL
(the only way real corruption arrives), on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid

import pytest

import immagent
from immagent import PersistentAgent, Store
from immagent.assets import Kind, digest_of
from immagent.audit.verify import VerifyReport
from tests.conftest import count_rows, raw_sql, turn

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
    total = count_rows(store_dsn, "immagent_assets")
    assert report.assets_checked == total == 8  # prompt, empty node + 2 nodes, 4 messages
    assert report.agents_checked == 4
    assert report.bytes_checked == sum(
        len(bytes(r[0])) for r in raw_sql(store_dsn, "SELECT body FROM immagent_assets"))
    assert seen and seen[-1] == total and seen == sorted(seen)
    # The count is of state rows of every kind (checkpoints and sessions are states too).
    assert report.lines() == [f"verified whole store: 8 assets ({report.bytes_checked} "
                              "bytes), 4 states", "OK"]


async def test_one_flipped_byte_names_exactly_that_asset(store: Store, store_dsn: str) -> None:
    _, head = await conversation(store)
    victim = turn(2)[1]  # an assistant message of the last turn
    flip_byte(store_dsn, victim.digest, index=len(victim.body) - 1)
    for report in (await store.verify(), await store.verify(head)):
        assert [p.digest for p in report.corrupt] == [victim.digest]
        assert report.corrupt[0].kind == Kind.MESSAGE
        assert not report.missing and not report.undecodable and not report.bad_agents
        assert not report.ok and report.problems == 1
        assert any(victim.digest.hex() in line for line in report.lines())
    # Reads refuse the corrupt body too, naming it.
    store.clear_cache()
    with pytest.raises(immagent.IntegrityError, match=victim.digest.hex()):
        await (await store.load_agent(head.id)).get_messages()


async def test_a_deleted_row_is_missing_with_who_refers_to_it(
        store: Store, store_dsn: str) -> None:
    base, head = await conversation(store)
    victim = turn(1)[0]
    delete_asset(store_dsn, victim.digest)
    node1 = (await store.load_agent(head.parent_id or base.id)).conversation_digest
    report = await store.verify()
    assert [(m.digest, m.referrer) for m in report.missing] == [(victim.digest, node1)]
    assert not report.corrupt and not report.undecodable and not report.bad_agents
    assert f"missing {victim.digest.hex()} referenced by asset {node1.hex()}" in report.lines()
    scoped = await store.verify(head)
    assert [(m.digest, m.referrer) for m in scoped.missing] == [(victim.digest, node1)]
    # The base state does not reach the message, so its own audit is clean.
    assert_clean(await store.verify(base))


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
    # gc follows the refs column: a damaged column would sweep live data. A node's links
    # live only there and are part of its digest, so the damage is a digest mismatch.
    _, head = await conversation(store)
    empty = b"" if store_dsn.startswith("sqlite:///") else None
    raw_sql(store_dsn, "UPDATE immagent_assets SET refs = %s WHERE digest = %s",
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
