"""Damage behind the store's back, on PostgreSQL and SQLite:
gc never sweeps from a row it cannot trust, reads never return data that does not hash to
what was asked for, every walk terminates, and verify lists what it finds and goes on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

import immagent
from immagent import Message, PersistentAgent, Store, chains
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, SystemPrompt
from immagent.records import AgentRecord, state_digest
from tests.conftest import raw_sql
from tests.conftest import turn as support_turn
from tests.test_verify import stored_rows

T = TypeVar("T")
PROMPT = "You are damaged."
#: No walk may take anywhere near this long; a hang fails the test instead of the run.
PATIENCE = 30.0


def turn(i: int, tag: str = "") -> list[Message]:
    return support_turn(i, tag, tokens=None)


def soon(coro: Awaitable[T]) -> Awaitable[T]:
    return asyncio.wait_for(coro, PATIENCE)


def state_refs(dsn: str, state_id: uuid.UUID) -> bytes:
    (row,) = raw_sql(dsn, "SELECT refs FROM immagent_states WHERE id = %s", [state_id])
    return bytes(row[0])


def node_refs(dsn: str, digest: bytes) -> bytes:
    (row,) = raw_sql(dsn, "SELECT refs FROM immagent_nodes WHERE digest = %s", [digest])
    return b"" if row[0] is None else bytes(row[0])


def set_node_refs(dsn: str, digest: bytes, refs: bytes) -> None:
    value: bytes | None = refs if refs or dsn.startswith("sqlite:///") else None
    raw_sql(dsn, "UPDATE immagent_nodes SET refs = %s WHERE digest = %s", [value, digest])


def node_loc(dsn: str, digest: bytes) -> int:
    (row,) = raw_sql(dsn, "SELECT loc FROM immagent_nodes WHERE digest = %s", [digest])
    return int(row[0])


#: A body too large to be held inline: an asset of its own, named by its node's refs.
BIG = "a pasted document " * (chains.INLINE_MAX // 10)


async def lineage(store: Store) -> tuple[PersistentAgent, PersistentAgent, PersistentAgent]:
    """root -> one -> two (two turns, the second holding a large body out of line), a fork
    of one (a run of its own), plus an unrelated deleted state whose turn gc may sweep: a
    gc that runs would delete something."""
    root = await store.create_agent("victim", PROMPT, "m")
    one = await store.append(root, turn(1))
    two = await store.append(one, [Message(role="user", content=BIG),
                                   Message(role="assistant", content="Noted.")])
    await store.append(one, turn(3, " fork"))
    dead = await store.append(await store.create_agent("other", "p", "m"), turn(9))
    await store.delete(dead)
    return root, one, two


# -- gc checks every row it marks from before it sweeps ------------------------------------


def _truncate_refs(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    head = two.conversation_digest
    set_node_refs(dsn, head, node_refs(dsn, head)[:-32])  # the large body drops out
    return head.hex()


def _empty_refs(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    set_node_refs(dsn, two.conversation_digest, b"")
    return two.conversation_digest.hex()


def _run_hangs_elsewhere(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    # The fork's run is re-hung from the empty root: gc would mark the root's lineage,
    # not one's, for it. Its first node's parent is then the node it names.
    (fork,) = raw_sql(dsn, "SELECT digest FROM immagent_nodes WHERE parent = %s",
                      [one.conversation_digest])
    raw_sql(dsn, "UPDATE immagent_nodes SET parent = %s WHERE parent = %s",
            [EMPTY_CONVERSATION.digest, one.conversation_digest])
    return bytes(fork[0]).hex()


def _node_moved(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    # The head row moved further along its run: the row before it is no longer its parent.
    loc = node_loc(dsn, two.conversation_digest)
    raw_sql(dsn, "UPDATE immagent_nodes SET loc = %s WHERE loc = %s", [loc + 5, loc])
    return two.conversation_digest.hex()


def _state_to_ancestor(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    refs = state_refs(dsn, two.id)
    raw_sql(dsn, "UPDATE immagent_states SET refs = %s WHERE id = %s",
            [refs[:32] + one.conversation_digest, two.id])
    return str(two.id)


def _records_swapped(dsn: str, one: PersistentAgent, two: PersistentAgent) -> str:
    # A node row given another node's record (a consistent, plausible row): its digest no
    # longer matches what it holds.
    (row,) = raw_sql(dsn, "SELECT codec, body FROM immagent_nodes WHERE digest = %s",
                     [two.conversation_digest])
    raw_sql(dsn, "UPDATE immagent_nodes SET codec = %s, body = %s WHERE digest = %s",
            [row[0], row[1], one.conversation_digest])
    return one.conversation_digest.hex()


@pytest.mark.parametrize("damage", [_truncate_refs, _empty_refs, _run_hangs_elsewhere,
                                    _node_moved, _state_to_ancestor, _records_swapped])
async def test_gc_aborts_rather_than_sweep_from_a_damaged_row(
        store: Store, store_dsn: str,
        damage: Callable[[str, PersistentAgent, PersistentAgent], str]) -> None:
    _, one, two = await lineage(store)
    named = damage(store_dsn, one, two)
    before = stored_rows(store_dsn)
    with pytest.raises(immagent.IntegrityError, match=f"gc aborted.*{named}"):
        await soon(store.gc())
    assert stored_rows(store_dsn) == before  # nothing deleted, live or not
    assert not (await store.verify()).ok  # verify sees the same damage


# -- a state row is verified on every read ------------------------------------------------


def _rename(dsn: str, victim: PersistentAgent, other: PersistentAgent) -> None:
    raw_sql(dsn, "UPDATE immagent_states SET stream = %s WHERE id = %s", ["mallory", victim.id])


def _other_conversation(dsn: str, victim: PersistentAgent, other: PersistentAgent) -> None:
    refs = state_refs(dsn, victim.id)
    raw_sql(dsn, "UPDATE immagent_states SET refs = %s WHERE id = %s",
            [refs[:32] + other.conversation_digest, victim.id])


def _other_prompt(dsn: str, victim: PersistentAgent, other: PersistentAgent) -> None:
    refs = state_refs(dsn, victim.id)
    raw_sql(dsn, "UPDATE immagent_states SET refs = %s WHERE id = %s",
            [other.system_prompt_digest + refs[32:], victim.id])


def _other_model(dsn: str, victim: PersistentAgent, other: PersistentAgent) -> None:
    (row,) = raw_sql(dsn, "SELECT body FROM immagent_states WHERE id = %s", [other.id])
    raw_sql(dsn, "UPDATE immagent_states SET body = %s WHERE id = %s",
            [bytes(row[0]), victim.id])


@pytest.mark.parametrize("damage", [_rename, _other_conversation, _other_prompt,
                                    _other_model])
async def test_a_damaged_state_row_never_loads(
        store: Store, store_dsn: str, tmp_path: Path,
        damage: Callable[[str, PersistentAgent, PersistentAgent], None]) -> None:
    victim = await store.append(await store.create_agent("victim", PROMPT, "m"), turn(1))
    other = await store.append(await store.create_agent("other", "Other prompt.", "m2",
                                                        model_config={"seed": 1}), turn(2))
    damage(store_dsn, victim, other)
    store.clear_cache()
    for read in (lambda: store.load_agent(victim.id), lambda: store.list_agents(),
                 lambda: store.ancestors(victim.id)):
        with pytest.raises(immagent.IntegrityError, match=str(victim.id)):
            await soon(read())
    with pytest.raises(immagent.IntegrityError):
        await store.export(victim.id, tmp_path / "victim.bundle")
    assert not (tmp_path / "victim.bundle").exists()
    report = await store.verify()
    assert [a.agent_id for a in report.bad_agents] == [victim.id]


# -- references of the wrong kind (committed by a client that checks digests only) --------


async def _commit_agent(store: Store, prompt: bytes, conversation: bytes,
                        assets: list[Any]) -> PersistentAgent:
    record = AgentRecord(id=uuid.uuid4(), parent_id=None, created_at=datetime.now(UTC),
                         name="confused", model="m", system_prompt=prompt,
                         conversation=conversation, model_config={}, metadata={},
                         digest=state_digest("confused", "m", prompt, conversation, {}, {}))
    await store.commit(assets, [record.to_row()])
    return await store.load_agent(record.id)


async def _conversation_is_a_prompt(store: Store) -> tuple[PersistentAgent, bytes]:
    prompt = SystemPrompt(text=PROMPT)
    return await _commit_agent(store, prompt.digest, prompt.digest, [prompt]), prompt.digest


async def _prompt_is_a_message(store: Store) -> tuple[PersistentAgent, bytes]:
    message = Message(role="user", content="hi")
    node = EMPTY_CONVERSATION.extend([message])
    agent = await _commit_agent(store, message.digest, node.digest,
                                [message, EMPTY_CONVERSATION, node])
    return agent, message.digest


@pytest.mark.parametrize("make", [_conversation_is_a_prompt, _prompt_is_a_message])
async def test_a_reference_of_the_wrong_kind_is_found_and_never_read(
        store: Store, tmp_path: Path,
        make: Callable[[Store], Awaitable[tuple[PersistentAgent, bytes]]]) -> None:
    agent, wrong = await make(store)
    for report in (await store.verify(), await store.verify(agent)):
        assert [k.digest for k in report.wrong_kinds] == [wrong], report.lines()
        assert not report.ok and any("wrong kind" in line for line in report.lines())
    store.clear_cache()
    agent = await store.load_agent(agent.id)
    # Each read returns what the state holds or raises IntegrityError, never
    # AssetNotFoundError or a bare assertion; at least the one through the bad ref raises.
    failed = 0
    for read in (agent.get_messages, agent.get_system_prompt,
                 lambda: store.message_counts([agent])):
        try:
            await read()
        except immagent.IntegrityError:
            failed += 1
    assert failed >= 1
    with pytest.raises(immagent.IntegrityError, match="cannot export"):
        await store.export(agent, tmp_path / "confused.bundle")
    assert not (tmp_path / "confused.bundle").exists()  # never a bundle it would refuse


async def test_a_node_listing_an_element_of_the_wrong_kind_is_never_stored(
        store: Store, store_dsn: str) -> None:
    # A node row holds its elements' bodies, read back as the chain's element kind: a node
    # listing a prompt or another node is refused when it is committed, naming both.
    prompt = SystemPrompt(text=PROMPT)
    for element in (prompt, EMPTY_CONVERSATION):
        node = EMPTY_CONVERSATION.extend([Message.user("placeholder")])
        node = ConversationNode(parent=EMPTY_CONVERSATION.digest, messages=(element.digest,),
                                length=1, size=len(element.body), acc=node.acc)
        with pytest.raises(immagent.ValidationError, match="where a message must be") as bad:
            await _commit_agent(store, prompt.digest, node.digest,
                                [prompt, EMPTY_CONVERSATION, node])
        assert node.digest.hex() in str(bad.value) and element.digest.hex() in str(bad.value)
    assert stored_rows(store_dsn) == set()  # nothing of either was written


# -- parent cycles made behind the store's back -------------------------------------------


def _self_parent(dsn: str, root: PersistentAgent, head: PersistentAgent) -> None:
    raw_sql(dsn, "UPDATE immagent_states SET parent_id = id WHERE id = %s", [head.id])


def _two_state_cycle(dsn: str, root: PersistentAgent, head: PersistentAgent) -> None:
    raw_sql(dsn, "UPDATE immagent_states SET parent_id = %s WHERE id = %s", [head.id, root.id])


@pytest.mark.parametrize("damage", [_self_parent, _two_state_cycle])
async def test_a_parent_cycle_is_an_error_never_a_hang(
        store: Store, store_dsn: str, tmp_path: Path,
        damage: Callable[[str, PersistentAgent, PersistentAgent], None]) -> None:
    root, _, head = await lineage(store)
    child = await store.append(head, turn(3))  # hangs off the cycle
    damage(store_dsn, root, head)
    store.clear_cache()
    for walk in (lambda: head.get_lineage(), lambda: store.ancestors(child, 1000),
                 lambda: store.export(head, tmp_path / "c.bundle"),
                 lambda: store.delete_lineage(head)):
        with pytest.raises(immagent.IntegrityError, match="cycle"):
            await soon(walk())
    report = await soon(store.verify())
    assert head.id in report.cycles and child.id in report.cycles
    assert any("cycle" in line for line in report.lines()) and not report.ok
    assert (await soon(store.verify(child))).cycles == (child.id,)
    assert await store.count_agents() == 6  # nothing was deleted on the way


def test_immagent_log_reports_a_cycle(store_dsn: str) -> None:
    # In a child process with a deadline: a walk that does not terminate fails the test
    # instead of hanging the run (and filling the disk with a sorter's temp file).
    async def build() -> uuid.UUID:
        async with await Store.connect(store_dsn, min_size=1, max_size=2) as store:
            await store.init_schema()
            _, _, head = await lineage(store)
            return head.id

    head = asyncio.run(build())
    raw_sql(store_dsn, "UPDATE immagent_states SET parent_id = id WHERE id = %s", [head])
    done = subprocess.run([sys.executable, "-m", "immagent.cli", "--db", store_dsn, "log",
                           str(head)], capture_output=True, text=True, timeout=PATIENCE * 2)
    assert done.returncode == 1 and "cycle" in done.stderr, done.stderr


# -- column-type corruption (SQLite keeps whatever is written in a column) ---------------


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'typed.db'}"


_STATE_DAMAGE = {
    "created_at": "SET created_at = 'yesterday'",
    "kind": "SET kind = 'agent'",
    "body": "SET body = 'not bytes'",
    "body integer": "SET body = 5",
    "refs": "SET refs = ''",
    "stream blob": "SET stream = x'ff00ff'",
    "stream bad UTF-8": "SET stream = CAST(x'fffe' AS TEXT)",
    "digest": "SET digest = '0123456789abcdef0123456789abcdef'",
}


@pytest.mark.parametrize("column", sorted(_STATE_DAMAGE))
async def test_a_state_column_of_the_wrong_type_is_listed_and_never_read(
        sqlite_dsn: str, column: str) -> None:
    async with await Store.connect(sqlite_dsn) as store:
        await store.init_schema()
        _, one, two = await lineage(store)
        raw_sql(sqlite_dsn, f"UPDATE immagent_states {_STATE_DAMAGE[column]} WHERE id = %s",
                [two.id])
        store.clear_cache()
        report = await store.verify()
        assert [a.agent_id for a in report.bad_agents] == [two.id], report.lines()
        assert report.agents_checked == 5  # it went on past the damaged row
        reads: list[Callable[[], Awaitable[object]]] = [
            lambda: store.load_agent(two.id), lambda: store.gc(),
            lambda: store.ancestors(two.id)]
        if column != "kind":  # a row whose kind is damaged is no longer listed as an agent
            reads.append(lambda: store.list_agents())
        for read in reads:
            with pytest.raises(immagent.IntegrityError):
                await read()
        assert len(await (await store.load_agent(one.id)).get_messages()) == 2


_NODE_DAMAGE = {
    "body bad UTF-8": ("SET body = CAST(x'fffe' AS TEXT)", "corrupt"),
    "body integer": ("SET body = 42", "corrupt"),
    "kind": ("SET kind = 'message'", "undecodable"),
    "refs text": ("SET refs = '0123456789abcdef0123456789abcdef'", "corrupt"),
}


@pytest.mark.parametrize("column", sorted(_NODE_DAMAGE))
async def test_a_node_column_of_the_wrong_type_is_listed_and_never_read(
        sqlite_dsn: str, column: str) -> None:
    damage, category = _NODE_DAMAGE[column]
    async with await Store.connect(sqlite_dsn) as store:
        await store.init_schema()
        _, _, two = await lineage(store)
        victim = two.conversation_digest
        raw_sql(sqlite_dsn, f"UPDATE immagent_nodes {damage} WHERE digest = %s", [victim])
        store.clear_cache()
        report = await store.verify()
        listed = report.corrupt if category == "corrupt" else report.undecodable
        assert [p.digest for p in listed] == [victim], report.lines()
        # It went on: every asset and node was checked.
        assert report.assets_checked + report.nodes_checked == len(stored_rows(sqlite_dsn))
        with pytest.raises(immagent.IntegrityError):
            await (await store.load_agent(two.id)).get_messages()
        with pytest.raises(immagent.IntegrityError):
            await store.gc()


async def test_a_head_row_moved_far_along_its_run_is_an_integrity_error(
        store: Store, store_dsn: str) -> None:
    # Found by the gc state machine: the rows an append reads (since the last span depth)
    # then stop short of that depth, which indexed before the row list instead of failing.
    agent = await store.create_agent("moved", PROMPT, "m")
    for i in range(20):
        agent = await store.append(agent, turn(i))
    loc = node_loc(store_dsn, agent.conversation_digest)
    raw_sql(store_dsn, "UPDATE immagent_nodes SET loc = %s WHERE loc = %s", [loc + 4096, loc])
    store.clear_cache()
    loaded = await soon(store.load_agent(agent.id))
    with pytest.raises(immagent.IntegrityError, match=r"broken|corrupt"):
        await soon(loaded.get_messages())
    store.clear_cache()
    with pytest.raises(immagent.IntegrityError, match=r"broken|corrupt"):
        await soon(store.append(await soon(store.load_agent(agent.id)), turn(99)))
