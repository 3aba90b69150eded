"""ImmAgentSession's immutable history: past states after pop_item/clear_session, forks and
branches that share rows (counted), gc only after states are deleted, verify and bundles.
Both backends; sessions share the test's Store unless a test needs its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import msgspec
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from immagent import IntegrityError, Store, ValidationError, verify_bundle
from immagent.assets import EMPTY_ITEMS, Item, Kind, decode_asset, digest_of
from immagent.clients.sessions import SessionState, check_items, decode_items
from immagent.integrations.openai_agents import ImmAgentSession
from immagent.records import StateRow, check_state, stream_digest
from immagent.rows import StoredAsset, check_row, load_row
from tests.conftest import count_rows, node_record, raw_sql, stored_elements, write_record


def user(text: str) -> Any:  # a TResponseInputItem (a TypedDict union)
    return {"role": "user", "content": text}


def answer(text: str) -> Any:
    return {"role": "assistant", "content": [{"type": "output_text", "text": text}],
            "type": "message"}


def turn(i: int, tag: str = "") -> list[Any]:
    return [user(f"q{i}{tag}"), answer(f"a{i}{tag}")]


def rows(dsn: str, kind: Kind | None = None, table: str = "immagent_assets") -> int:
    """Rows of a table; for content (the default), every asset and chain node row, or the
    items stored (held by their links, or assets of their own) or the links."""
    if table != "immagent_assets":
        return count_rows(dsn, table, "TRUE" if kind is None else f"kind = {int(kind)}")
    if kind == Kind.ITEM:
        return stored_elements(dsn, Kind.ITEM)
    if kind == Kind.ITEM_NODE:
        return count_rows(dsn, "immagent_nodes", f"kind = {int(kind)}")
    return count_rows(dsn, "immagent_assets") + count_rows(dsn, "immagent_nodes")


async def grown(store: Store, session_id: str, turns: int) -> ImmAgentSession:
    session = ImmAgentSession(session_id, store)
    for i in range(turns):
        await session.add_items(turn(i))
    return session


# -- immutability ---------------------------------------------------------------------------


async def test_pop_and_clear_keep_every_earlier_state(store: Store, store_dsn: str) -> None:
    session = await grown(store, "kept", 3)
    popped = await session.pop_item()
    await session.clear_session()
    await session.add_items([user("fresh")])
    assert popped == answer("a2")
    history = await session.list_states()
    assert [s.session_id for s in history] == ["kept"] * 6
    store.clear_cache()
    reader = ImmAgentSession("kept", store)  # a new object: nothing cached
    counts = [len(await reader.get_state_items(s)) for s in history]
    assert counts == [1, 0, 5, 6, 4, 2]  # newest first: add, clear, pop, 3 turns
    assert await reader.get_state_items(history[2].id) == [*turn(0), *turn(1), user("q2")]
    assert await reader.get_state_items(str(history[3].id), limit=2) == turn(2)
    assert await reader.get_items() == [user("fresh")]
    oldest_first = await reader.list_states(newest_first=False, limit=2)
    assert [s.id for s in oldest_first] == [history[-1].id, history[-2].id]
    later = await reader.list_states(limit=2, after_seq=history[1].seq)
    assert [s.id for s in later] == [history[2].id, history[3].id]
    assert rows(store_dsn, Kind.SESSION_STATE, "immagent_states") == 6
    # A pop points at an existing link, or at one new link holding the items it keeps of
    # the last one (here q2: small bodies are held by each link that adds them).
    assert rows(store_dsn, Kind.ITEM) == 8


async def test_state_digest_pins_content(store: Store) -> None:
    a = await grown(store, "same", 2)
    b = await grown(store, "same-too", 2)
    sa, sb = await a.current_state(), await b.current_state()
    assert sa is not None and sb is not None
    assert sa.branches[0].head == sb.branches[0].head  # same items: the same chain
    assert sa.digest != sb.digest  # the session id is content too
    await a.add_items([user("x")])
    await a.pop_item()
    back = await a.current_state()
    assert back is not None and back.branches == sa.branches and back.id != sa.id
    assert back.digest == sa.digest  # the same content again: the same digest
    with pytest.raises(ValidationError):
        await a.get_state_items("not-a-uuid")
    with pytest.raises(ValidationError):
        await a.get_state_items(sa, branch_id="nope")


async def test_gc_reclaims_only_after_states_are_deleted(store: Store, store_dsn: str) -> None:
    session = await grown(store, "gc", 4)
    await session.clear_session()
    result = await store.gc()
    assert result.assets_removed == 0
    history = await session.list_states()
    assert len(await session.get_state_items(history[1])) == 8
    newest = history[0]
    assert await store.delete_states([s.id for s in history[1:]]) == len(history) - 1
    result = await store.gc()
    assert result["item"] == 8 and result["item_node"] == 4
    assert rows(store_dsn, Kind.ITEM) == 0 and rows(store_dsn, Kind.ITEM_NODE) == 1
    assert await session.get_items() == []
    assert (await session.current_state()) == newest
    assert (await store.verify()).ok


# -- forks and branches -------------------------------------------------------------------


async def test_fork_shares_every_row(store: Store, store_dsn: str) -> None:
    source = await grown(store, "source", 5)
    assets_before = rows(store_dsn)
    whole = await source.fork("whole")
    assert rows(store_dsn) == assets_before  # one state row, no asset
    assert await whole.get_items() == await source.get_items()
    at3 = await source.fork("at-3", at_turn=3)
    assert await at3.get_items() == [*turn(0), *turn(1)]
    assert rows(store_dsn) == assets_before  # turn 3 begins a link: an existing one
    await source.add_items([user("q5"), answer("a5"), user("q6")])
    mid = await source.fork("mid", at_turn=7)  # inside the last link: one new link
    assert await mid.get_items() == [*(i for t in range(5) for i in turn(t)), user("q5"),
                                     answer("a5")]
    assert rows(store_dsn) == assets_before + 2  # a link holding the 3 new items, and the cut
    await whole.add_items(turn(9, "w"))
    assert await source.get_items() != await whole.get_items()
    first = (await whole.list_states(newest_first=False))[0]
    source_state = (await source.list_states())[1]
    assert first.parent_id == source_state.id  # a fork's lineage starts in its source
    with pytest.raises(ValidationError) as err:
        await source.fork("whole")
    assert err.value.field == "new_session_id"
    with pytest.raises(ValidationError):
        await source.fork("nowhere", at_turn=99)
    assert rows(store_dsn, Kind.SESSION_STATE, "immagent_states") == 5 + 1 + 3 + 1
    forked_fork = await at3.fork("at-3-again")
    assert await forked_fork.get_items() == [*turn(0), *turn(1)]


async def test_fork_of_an_owned_store_keeps_it_open(store_dsn: str) -> None:
    source = ImmAgentSession("owned-source", store_dsn)
    await source.add_items(turn(0))
    fork = await source.fork("owned-fork")
    await source.aclose()
    await fork.add_items(turn(1))  # the store is still open for the fork
    assert await fork.get_items() == [*turn(0), *turn(1)]
    await fork.aclose()


async def test_branches_as_the_advanced_sqlite_session_defines_them(
        store: Store, store_dsn: str) -> None:
    session = await grown(store, "branchy", 3)
    assert session.current_branch_id == "main"
    before = rows(store_dsn)
    name = await session.create_branch_from_turn(2)
    assert name.startswith("branch_from_turn_2_") and session.current_branch_id == name
    assert rows(store_dsn) == before  # the branch reuses main's links and items
    assert await session.get_items() == turn(0)
    await session.add_items(turn(1, "-alt"))
    assert await session.get_items() == [*turn(0), *turn(1, "-alt")]
    assert await session.get_items(branch_id="main") == [*turn(0), *turn(1), *turn(2)]
    assert await session.create_branch_from_turn(1, "from-one") == "from-one"
    assert await session.get_items() == []
    branches = {b["branch_id"]: b for b in await session.list_branches()}
    assert list(branches) == ["main", name, "from-one"]
    assert branches["main"]["message_count"] == 6 and branches["main"]["user_turns"] == 3
    assert branches[name]["message_count"] == 4 and branches[name]["user_turns"] == 2
    assert branches["from-one"]["is_current"] and not branches["main"]["is_current"]
    assert all(b["created_at"] is not None for b in branches.values())
    await session.switch_to_branch("main")
    assert await session.get_items() == [*turn(0), *turn(1), *turn(2)]
    for bad_turn, bad_name in ((9, None), (0, None), (1, "from-one"), (1, "main"), (1, " ")):
        with pytest.raises(ValueError):
            await session.create_branch_from_turn(bad_turn, bad_name)
    with pytest.raises(ValueError):
        await session.switch_to_branch("no-such-branch")
    with pytest.raises(ValueError):
        await session.delete_branch("main")
    await session.delete_branch("from-one")
    with pytest.raises(ValueError):
        await session.delete_branch("from-one")
    with pytest.raises(ValueError):
        await session.create_branch_from_turn(1, "from-one")  # a deleted name stays used
    await session.switch_to_branch(name)
    with pytest.raises(ValueError):
        await session.delete_branch(name)  # the current one, without force
    await session.delete_branch(name, force=True)
    assert session.current_branch_id == "main"
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]
    # The deleted branches are still in the earlier states, with their items.
    earlier = (await session.list_states())[2]
    assert [b.name for b in earlier.branches] == ["main", name, "from-one"]
    assert await session.get_state_items(earlier, branch_id=name) == [
        *turn(0), *turn(1, "-alt")]


async def test_a_clear_elsewhere_sends_every_object_back_to_main(store: Store) -> None:
    mine = await grown(store, "shared-id", 2)
    await mine.create_branch_from_turn(2, "side")
    other = ImmAgentSession("shared-id", store)
    await other.clear_session()
    assert await mine.get_items() == [] and mine.current_branch_id == "main"
    await mine.add_items([user("after")])
    assert await other.get_items() == [user("after")]
    with pytest.raises(ValueError):
        await mine.create_branch_from_turn(1, "side")  # cleared names stay used


async def test_a_branch_deleted_elsewhere_is_an_error_not_a_silent_switch(store: Store) -> None:
    mine = await grown(store, "two-objects", 2)
    await mine.create_branch_from_turn(2, "side")
    other = ImmAgentSession("two-objects", store)
    await other.delete_branch("side")
    with pytest.raises(ValidationError) as err:
        await mine.add_items([user("lost?")])
    assert err.value.field == "branch_id"
    await mine.switch_to_branch("main")
    await mine.add_items([user("kept")])
    assert (await other.get_items())[-1] == user("kept")


@contextlib.contextmanager
def writes_held(dsn: str) -> Iterator[None]:
    """The store's writes wait (reads go on) until the block ends: another connection holds
    the database's write lock (SQLite's, within the Store's 5 s busy timeout) or locks the
    state table against writers (PostgreSQL)."""
    if dsn.startswith("sqlite:///"):
        conn = sqlite3.connect(dsn.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with psycopg.connect(dsn) as pg:
        pg.execute("LOCK TABLE immagent_states IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            pg.rollback()


def run_usage(tokens: int) -> Any:  # what store_run_usage reads of a RunResult
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=SimpleNamespace(
        requests=1, input_tokens=tokens, output_tokens=0, total_tokens=tokens)))


@pytest.mark.parametrize("queued", ["pop", "add", "usage"])
async def test_a_queued_write_keeps_the_branch_it_was_called_on(
        store: Store, store_dsn: str, queued: str) -> None:
    """As the SDK's advanced session snapshots its branch at call time: a write waiting
    behind an earlier write of the same object goes to the branch current when it was
    called, not to the one a switch_to_branch that completed meanwhile made current."""
    session = await grown(store, "queued", 2)
    await session.create_branch_from_turn(2, "side")
    with writes_held(store_dsn):
        first = asyncio.ensure_future(session.add_items([user("on side")]))
        second = asyncio.ensure_future(
            session.pop_item() if queued == "pop"
            else session.add_items([user("also on side")]) if queued == "add"
            else session.store_run_usage(run_usage(7)))
        await asyncio.sleep(0)  # both called on "side"; the first holds the writes
        await session.switch_to_branch("main")  # a read: it completes meanwhile
        assert not first.done() and not second.done()
    await first
    outcome = await second
    assert session.current_branch_id == "main"
    assert await session.get_items() == [*turn(0), *turn(1)]  # main untouched
    side = await session.get_items(branch_id="side")
    if queued == "pop":
        assert outcome == user("on side") and side == turn(0)
    elif queued == "add":
        assert side == [*turn(0), user("on side"), user("also on side")]
    else:
        assert await session.get_turn_usage(branch_id="main") == []
        usage = await session.get_turn_usage(branch_id="side")
        assert isinstance(usage, list)
        assert [(u["user_turn_number"], u["total_tokens"]) for u in usage] == [(2, 7)]


# -- audits ---------------------------------------------------------------------------------


async def test_verify_covers_sessions(store: Store, store_dsn: str) -> None:
    session = await grown(store, "audited", 3)
    await session.create_branch_from_turn(2, "b")
    report = await store.verify()
    assert report.ok and report.agents_checked == 4
    state = await session.current_state()
    assert state is not None and (await store.verify(state.id)).ok
    # An item held by its link: rewrite it inside the link's record.
    original, tampered = Item.of(user("q1")).body, Item.of(user("tampered")).body
    (link,) = [bytes(d) for (d,) in raw_sql(
        store_dsn, "SELECT digest FROM immagent_nodes WHERE kind = %s", [int(Kind.ITEM_NODE)])
        if original in node_record(store_dsn, bytes(d))]
    write_record(store_dsn, link, node_record(store_dsn, link).replace(original, tampered))
    report = await store.verify()
    assert [(p.digest, p.kind) for p in report.corrupt] == [(link, int(Kind.ITEM_NODE))]
    store.clear_cache()
    with pytest.raises(IntegrityError):
        await ImmAgentSession("audited", store).get_items(branch_id="main")


async def test_a_session_bundle_round_trips(store: Store, tmp_path: Path) -> None:
    source = await grown(store, "bundled", 3)
    await source.pop_item()
    fork = await source.fork("bundled-fork", at_turn=2)
    await fork.add_items(turn(7))
    info = await fork.export(tmp_path / "fork.bundle")
    assert verify_bundle(info.path).head == info.head
    state = await fork.current_state()
    assert state is not None and info.head == state.id and info.head_digest == state.digest
    assert len(info.agents) == 2 + 4  # the fork's 2 states, then its source's lineage
    async with await Store.connect(f"sqlite:///{tmp_path / 'elsewhere.db'}") as other:
        await other.init_schema()
        imported = await other.import_states(info.path)
        assert imported.head == info.head
        there = ImmAgentSession("bundled-fork", other)
        assert await there.get_items() == await fork.get_items()
        there_state = await there.current_state()
        assert there_state is not None and there_state.digest == state.digest
        assert (await other.verify()).ok
    with pytest.raises(ValidationError):
        await ImmAgentSession("never-written", store).export(tmp_path / "none.bundle")


def test_session_state_rows_are_checked() -> None:
    refs = (EMPTY_ITEMS.digest,)
    row = StateRow(id=uuid4(), parent_id=None, kind=int(Kind.SESSION_STATE), stream="s",
                   refs=refs, body=b"\x80", created_at=datetime.now(UTC),
                   digest=stream_digest(int(Kind.SESSION_STATE), "s", refs, b"\x80"))
    assert check_state(row) is None  # an empty SessionBody is one byte
    assert SessionState.from_row(row).branch_names == ("main",)
    problem = check_state(msgspec.structs.replace(row, refs=refs * 2))
    assert problem is not None and problem[0] == "undecodable"  # refs do not fit the body
    problem = check_state(msgspec.structs.replace(row, stream="other"))
    assert problem is not None and problem[0] == "corrupt"
    with pytest.raises(IntegrityError):
        SessionState.from_row(msgspec.structs.replace(row, kind=int(Kind.AGENT_STATE)))


# -- items as assets (no database) --------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(st.lists(_json, max_size=5))
def test_items_round_trip_exactly_as_json(values: list[Any]) -> None:
    items = check_items(values)
    back = decode_items(items)
    assert json.dumps(back, sort_keys=True) == json.dumps(values, sort_keys=True)
    for item in items:
        again = decode_asset(int(Kind.ITEM), item.body)
        assert isinstance(again, Item) and again.digest == item.digest


def test_an_item_body_that_is_not_a_value_is_caught() -> None:
    bad = b"\xa2\xff\xfe"  # a two-byte str that is not UTF-8: framed right, not a value
    row = StoredAsset(digest_of(int(Kind.ITEM), bad), int(Kind.ITEM), (), bad)
    problem = check_row(row)
    assert problem is not None and problem[0] == "undecodable"  # verify decodes it whole
    item = load_row(row)  # a read checks the framing only...
    assert isinstance(item, Item)
    with pytest.raises(IntegrityError):
        decode_items([Item.of("fine"), item])  # ...and the copies it hands out fail loudly
    assert check_row(StoredAsset(digest_of(int(Kind.ITEM), bad[:2]), int(Kind.ITEM), (),
                                 bad[:2])) is not None  # truncated framing


@given(st.dictionaries(st.text(max_size=5), st.integers(-9, 9), min_size=2, max_size=6))
def test_key_order_does_not_change_an_item(value: dict[str, int]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert Item.of(value).digest == Item.of(reordered).digest
    assert Item.of({"n": 1}).digest != Item.of({"n": 1.0}).digest
