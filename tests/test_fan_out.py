"""A row's fan-out is bounded and walked linearly (issue 20, item 3).

One append of 80,000 messages made SQLite's verify take 485 s and gc 67-80 s (each walk
step re-read the node's whole refs value), and a 2.4 MiB crafted bundle whose node lists
one message 80,000 times imported in 0.2 s, then cost verify 237 s. Now:

* **the limit**: a row references at most ``validate.MAX_REFS`` digests; a larger step,
  node, state or bundle record is refused with a FanOutError (a ValidationError naming the
  field and the count) before anything is written or hashed; on import, a BundleError
  that says the same;
* **the walks** split a long refs value once (SQLite: in Python, past
  ``_sqlite_walk.SPLIT_IN_SQL``), so nodes far longer than a turn's are walked in O(refs):
  verify, per-state verify, gc and bundles give the same answers as for short ones.
  Their cost is measured by ``benchmarks/reliability.py`` (80,000 refs), not here.
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
from immagent.rows import stored
from immagent.store._sqlite_walk import SPLIT_IN_SQL
from immagent.validate import MAX_REFS
from tests import crafted
from tests.conftest import raw_sql
from tests.pg_work import buffers, explained_store, statement

#: Well past what SQLite splits in SQL: these nodes take the long path everywhere.
LONG = 3 * SPLIT_IN_SQL // 32 + 7


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
    assert report.ok and report.assets_checked == 4, report.lines()
    assert (await store.verify(info.head)).ok
    assert (await store.gc()).assets_removed == 0
    agent = await store.load_agent(info.head)
    store.clear_cache()
    assert len(await (await store.load_agent(agent.id)).get_messages()) == 20 * LONG


async def test_long_nodes_are_walked_like_short_ones(store: Store, store_dsn: str) -> None:
    """verify, per-state verify and gc over nodes longer than SQL splits: what is missing,
    of the wrong kind or unreachable is found exactly as for a turn's node."""
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
    assert report.ok and report.assets_checked == 3 * LONG + 7, report.lines()
    assert (await store.verify(kept)).assets_checked == 2 * LONG + 6
    result = await store.gc()
    assert result["messages"] == LONG and result["conversations"] == 1
    assert len(await kept.get_messages()) == 2 * LONG + 1
    # A message in the middle of the first long node goes missing (behind the store's
    # back): every walk finds it, naming the long node that lists it.
    lost = long_turn[LONG // 2]
    node = (await store.get_assets([wide.conversation_digest]))[0]
    raw_sql(store_dsn, "DELETE FROM immagent_assets WHERE digest = %s", [lost.digest])
    for report in (await store.verify(), await store.verify(kept)):
        assert [(m.digest, m.referrer) for m in report.missing] == [(lost.digest,
                                                                     node.digest)]
    with pytest.raises(ImmAgentError, match=lost.digest.hex()):
        await store.gc()
    # Put back as a row of the wrong kind (a prompt under the message's digest): a wrong
    # kind, found in the middle of the long node.
    prompt = stored(SystemPrompt(text="not a message"))
    raw_sql(store_dsn, "INSERT INTO immagent_assets (digest, kind, codec, refs, body) "
            "VALUES (%s, %s, 0, %s, %s)",
            [lost.digest, prompt.kind, b"" if store_dsn.startswith("sqlite") else None,
             prompt.body])
    for report in (await store.verify(), await store.verify(kept)):
        assert [(k.referrer, k.digest) for k in report.wrong_kinds] == [(node.digest,
                                                                         lost.digest)]


async def test_postgres_splits_a_compressible_refs_value_once(pg_store_dsn: str,
                                                              tmp_path: Path) -> None:
    """PostgreSQL stores a long refs value compressed when it compresses (one message
    listed again and again: 87x), and substring() of a compressed value decompresses it
    again for each digest: verify's and gc's queries touched its TOAST pages once per
    digest. They detoast each value once; counted in pages (auto_explain's buffers), not
    seconds."""
    async with explained_store(pg_store_dsn) as (store, plans):
        again = Message(role="user", content="again")
        node = EMPTY_CONVERSATION.extend([again] * 40_000)
        await store.import_states(_bundle_with_node(tmp_path / "b.bundle", node, "again"))
        plans.clear()
        assert (await store.verify()).ok
        await store.gc()
        queries = ("SELECT DISTINCT r, a.digest", "rules(kind, first, rest)",
                   "INSERT INTO immagent_reach")
        pages = [buffers(statement(plans, query)) for query in queries]
        # The value is ~15 KB compressed, 8 TOAST pages: before, 40,000 x 8 page visits.
        assert max(pages) < 2_000, pages
