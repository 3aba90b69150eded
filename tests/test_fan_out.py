"""A row's fan-out is bounded and walked linearly (issue 20, item 3).

One append of 80,000 messages made SQLite's verify take 485 s and gc 67-80 s (each walk
step re-read the node's whole refs value), and a 2.4 MiB crafted bundle whose node lists
one message 80,000 times imported in 0.2 s, then cost verify 237 s. Now:

* **the limit**: a row references at most ``validate.MAX_REFS`` digests; a larger step,
  node, state or bundle record is refused with a FanOutError (a ValidationError naming the
  field and the count) before anything is written or hashed; on import, a BundleError
  that says the same;
* **the walks**: since schema 3 a node holds its elements in its record (refs name only
  bodies over ``chains.INLINE_MAX``), so a long step is one row read once, never a long
  refs value split digest by digest: verify, per-state verify, gc and bundles give the
  same answers as for short ones. Their cost is measured by ``benchmarks/reliability.py``
  (80,000 refs), not here.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from immagent import (
    BundleError,
    FanOutError,
    ImmAgentError,
    Message,
    Store,
    ValidationError,
    verify_bundle,
)
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, Kind, SystemPrompt
from immagent.records import AgentRecord
from immagent.validate import MAX_REFS
from tests import crafted
from tests.conftest import raw_sql

#: Far longer than a turn's node (two to ten elements).
LONG = 79


def _over_the_limit_node(n: int = MAX_REFS) -> ConversationNode:
    """A node listing ``n`` messages (plus its parent): built without storing them."""
    message = Message(role="user", content="again")
    return EMPTY_CONVERSATION.extend([message] * n)


async def test_a_step_past_the_limit_is_refused_before_anything_is_written(
        store: Store, store_dsn: str) -> None:
    agent = await store.create_agent("wide", "You are wide.", "m")
    before = raw_sql(store_dsn, "SELECT count(*) FROM immagent_assets")
    messages = [Message(role="user", content="again")] * MAX_REFS  # + the parent: one over
    with pytest.raises(FanOutError) as caught:
        await store.append(agent, messages)
    error = caught.value
    assert isinstance(error, ValidationError) and isinstance(error, ImmAgentError)
    assert error.field == "messages" and error.value == MAX_REFS
    assert error.limit == MAX_REFS - 1 and f"{MAX_REFS:,}" in str(error)
    assert raw_sql(store_dsn, "SELECT count(*) FROM immagent_assets") == before
    # At the limit it is a step like any other.
    wide = await store.append(agent, messages[:-1])
    assert len(await wide.get_messages()) == MAX_REFS - 1


async def test_a_commit_of_a_node_or_state_past_the_limit_is_refused(store: Store) -> None:
    node = _over_the_limit_node()
    with pytest.raises(FanOutError) as caught:
        await store.commit([Message(role="user", content="again"), node])
    assert caught.value.field == "assets[1].refs" and caught.value.value == MAX_REFS + 1
    agent = await store.create_agent("wide", "You are wide.", "m")
    row = agent.record.to_row()
    wide_state = msgspec.structs.replace(row, refs=(row.refs[0],) * (MAX_REFS + 1))
    with pytest.raises(FanOutError) as caught:
        await store.commit([], [wide_state])
    assert caught.value.field == "states[0].refs" and caught.value.value == MAX_REFS + 1


def _bundle_with_node(path: Path, node: ConversationNode, *texts: str) -> Path:
    prompt = SystemPrompt(text="You are crafted.")
    record: AgentRecord = crafted.agent_state(prompt.digest, node.digest)
    messages = [Message(role="user", content=t) for t in texts]
    return crafted.write(path, [record], [prompt, EMPTY_CONVERSATION, *messages, node])


async def test_a_bundle_record_past_the_limit_is_refused_before_it_is_hashed(
        store: Store, tmp_path: Path) -> None:
    path = _bundle_with_node(tmp_path / "wide.bundle", _over_the_limit_node(), "again")
    with pytest.raises(BundleError, match=r"refs: 100,001 digests .*at most 100,000"):
        verify_bundle(path)
    with pytest.raises(BundleError, match="at most 100,000"):
        await store.import_states(path)
    assert await store.count_states(Kind.AGENT_STATE) == 0


async def test_a_crafted_bundle_listing_one_message_many_times_verifies_and_imports(
        store: Store, tmp_path: Path) -> None:
    # The probe's shape, at a size a test can afford: a node listing one message again and
    # again is valid (a conversation may repeat a message), and it is walked once per ref.
    node = EMPTY_CONVERSATION.extend([Message(role="user", content="again")] * 20 * LONG)
    path = _bundle_with_node(tmp_path / "repeat.bundle", node, "again")
    assert verify_bundle(path).assets == 4
    info = await store.import_states(path)
    report = await store.verify()
    # The prompt, and the root and the node (whose record holds the message 1,580 times).
    assert report.ok and (report.assets_checked, report.nodes_checked) == (1, 2), \
        report.lines()
    assert (await store.verify(info.head)).ok
    assert (await store.gc()).assets_removed == 0
    agent = await store.load_agent(info.head)
    store.clear_cache()
    assert len(await (await store.load_agent(agent.id)).get_messages()) == 20 * LONG


async def test_long_nodes_are_walked_like_short_ones(store: Store, store_dsn: str) -> None:
    """verify, per-state verify and gc over nodes far longer than a turn's: what is damaged
    or unreachable is found exactly as for a turn's node."""
    agent = await store.create_agent("wide", "You are wide.", "m")
    long_turn = [Message(role="user", content=f"long {i}") for i in range(LONG)]
    wide = await store.append(agent, long_turn)
    wider = await store.append(wide, [Message(role="user", content=f"longer {i}")
                                      for i in range(LONG)])
    kept = await store.append(wider, [Message(role="user", content="short")])
    # An unreachable long node and its messages: gc takes them all, and nothing else.
    gone = await store.append(agent, [Message(role="user", content=f"gone {i}")
                                      for i in range(LONG)])
    await store.delete(gone)
    report = await store.verify()
    # The prompt; the root, the three steps of kept's lineage and gone's step.
    assert report.ok and (report.assets_checked, report.nodes_checked) == (1, 5), \
        report.lines()
    assert (await store.verify(kept)).nodes_checked == 4
    result = await store.gc()
    assert result["messages"] == LONG and result["conversations"] == 1
    assert len(await kept.get_messages()) == 2 * LONG + 1
    # A byte in the middle of the first long node's record changes (behind the store's
    # back): every walk names that node.
    (row,) = raw_sql(store_dsn, "SELECT codec, body FROM immagent_nodes WHERE digest = %s",
                     [wide.conversation_digest])
    body = bytes(row[1])
    raw_sql(store_dsn, "UPDATE immagent_nodes SET body = %s WHERE digest = %s",
            [body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 1])
             + body[len(body) // 2 + 1:], wide.conversation_digest])
    for report in (await store.verify(), await store.verify(kept)):
        assert [p.digest for p in (*report.corrupt, *report.undecodable)] == [
            wide.conversation_digest], report.lines()
    with pytest.raises(ImmAgentError, match=wide.conversation_digest.hex()):
        await store.gc()


async def test_a_repeated_message_is_held_in_the_record_not_in_refs(pg_store_dsn: str,
                                                                    tmp_path: Path) -> None:
    """Before schema 3, a node listing one message 40,000 times stored a 1.25 MB refs value
    that PostgreSQL's queries split digest by digest. Now the node's record holds the
    message, 40,000 times (stored raw: a body compressing more than ``codec.MAX_RATIO``
    is degenerate), and its refs value is NULL: no query splits anything, and verify and
    gc read the row once."""
    async with await Store.connect(pg_store_dsn, min_size=1, max_size=2) as store:
        await store.init_schema()
        again = Message(role="user", content="again")
        node = EMPTY_CONVERSATION.extend([again] * 40_000)
        await store.import_states(_bundle_with_node(tmp_path / "b.bundle", node, "again"))
        ((refs, count),) = raw_sql(pg_store_dsn, "SELECT refs, count FROM immagent_nodes "
                                   "WHERE digest = %s", [node.digest])
        assert refs is None and count == 40_000
        assert (await store.verify()).ok
        assert (await store.gc()).assets_removed == 0
