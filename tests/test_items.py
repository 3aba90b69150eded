"""ItemLog (the store-side client of ImmAgentStore, no LangGraph) on PostgreSQL and SQLite:
every put a state, values deduplicated, deletes as states, namespaces as id ranges, search
filters, TTL with refresh-on-read and the sweep (on a clock the tests move), concurrent
writers, audits and bundles."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import immagent
from immagent import IntegrityError, Store, ValidationError
from immagent.assets import Kind
from immagent.clients.store_items import ItemLog, Put, matches
from immagent.kv import item_state_id, prefix_range
from immagent.records import STATE_KINDS
from tests.conftest import count_rows, raw_sql

KIND = int(Kind.STORE_ITEM)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def states(dsn: str, where: str = "TRUE") -> int:
    return count_rows(dsn, "immagent_states", f"kind = {KIND} AND {where}")


def values(dsn: str) -> int:
    return count_rows(dsn, "immagent_assets", f"kind = {int(Kind.ITEM)}")


async def consistent(log: ItemLog, prefix: tuple[str, ...] = ()) -> None:
    """Every key's head repeats its newest item state (its parent), and a key has a head
    exactly when that state holds a value."""
    rows = await log.states(prefix)
    heads = {r.stream: r for r in rows if r.kind == int(Kind.STORE_HEAD)}
    newest: dict[str, Any] = {}
    for r in rows:
        if r.kind == KIND and (r.stream not in newest or r.seq > newest[r.stream].seq):
            newest[r.stream] = r
    assert set(heads) == {s for s, r in newest.items() if r.refs}
    for stream, head in heads.items():
        item = newest[stream]
        assert (head.parent_id, head.refs, head.body) == (item.id, item.refs, item.body)


# -- the stored form ----------------------------------------------------------------------


async def test_every_put_is_a_state_and_values_are_stored_once(store: Store,
                                                               store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put(("users", "1"), "prefs", {"theme": "dark"})
    await log.put(("users", "1"), "prefs", {"theme": "light"})
    await log.put(("users", "2"), "prefs", {"theme": "dark"})  # same value, other key
    await log.put(("users", "1"), "prefs", {"theme": "dark"})  # back to an old value
    assert states(store_dsn) == 4
    assert values(store_dsn) == 2
    item = await log.get(("users", "1"), "prefs")
    assert item is not None and item.value == {"theme": "dark"}
    history = await log.history(("users", "1"), "prefs")
    assert [(v.change, v.value) for v in history] == [
        ("put", {"theme": "dark"}), ("put", {"theme": "light"}), ("put", {"theme": "dark"})]
    # One parent chain, newest first; the current state is the newest.
    assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    assert history[-1].parent_id is None and item.state_id == history[0].state_id
    # created_at is the key's first put, updated_at its last.
    assert item.created_at == history[-1].at and item.updated_at == history[0].at
    await consistent(log)


async def test_a_delete_is_a_state_and_the_key_can_live_again(store: Store,
                                                              store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put(("docs",), "a", {"v": 1})
    await log.put(("docs",), "a", None)
    await log.put(("docs",), "a", None)  # deleting what is not there writes nothing
    await log.put(("docs",), "never", None)
    assert states(store_dsn) == 2
    assert await log.get(("docs",), "a") is None
    assert await log.search(("docs",)) == []
    assert await log.list_namespaces() == []
    await log.put(("docs",), "a", {"v": 2})
    again = await log.get(("docs",), "a")
    assert again is not None and again.value == {"v": 2}
    history = await log.history(("docs",), "a")
    assert [v.change for v in history] == ["put", "delete", "put"]
    assert again.created_at == history[0].at  # a new life after the delete
    await consistent(log)


async def test_values_come_back_as_fresh_copies_and_as_json_carries_them(store: Store) -> None:
    log = ItemLog(store)
    await log.put(("n",), "k", {"b": [1, 2.0, {"x": None}], "a": True, "t": (1, 2)})
    first = await log.get(("n",), "k")
    assert first is not None
    assert first.value == {"a": True, "b": [1, 2.0, {"x": None}], "t": [1, 2]}
    assert isinstance(first.value["b"][1], float) and isinstance(first.value["b"][0], int)
    first.value["b"].append("edited")
    second = await log.get(("n",), "k")
    assert second is not None and second.value["b"] == [1, 2.0, {"x": None}]


@pytest.mark.parametrize(("namespace", "key", "value", "field"), [
    (("a.b",), "k", {}, "puts[0].namespace[0]"),
    (("a", ""), "k", {}, "puts[0].namespace[1]"),
    (("a\x1fb",), "k", {}, "puts[0].namespace[0]"),
    ((), "k", {}, "puts[0].namespace"),
    (("a",), "k\x00", {}, "puts[0].key"),
    (("a",), "k" * 2600, {}, "puts[0].key"),
    (("a",), "k", {"x": float("nan")}, "puts[0].value"),
    (("a",), "k", {"x": {1, 2}}, "puts[0].value"),
    (("a",), "k", ["not", "a", "dict"], "puts[0].value"),
])
async def test_bad_input_names_the_field_and_writes_nothing(
        store: Store, store_dsn: str, namespace: Any, key: str, value: Any,
        field: str) -> None:
    log = ItemLog(store)
    with pytest.raises(ValidationError) as caught:
        await log.put_many([Put(("ok",), "fine", {"v": 1}), Put(namespace, key, value)])
    assert caught.value.field.startswith(field.replace("puts[0]", "puts[1]"))
    assert states(store_dsn) == 0


async def test_a_batch_is_one_transaction_and_its_last_put_of_a_key_wins(
        store: Store, store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put_many([Put(("a",), "k", {"v": 1}), Put(("b",), "k", {"v": 2}),
                        Put(("a",), "k", {"v": 3})])
    assert states(store_dsn) == 2
    got = await log.get_many([(("a",), "k"), (("b",), "k"), (("c",), "k")])
    assert [None if g is None else g.value for g in got] == [{"v": 3}, {"v": 2}, None]


async def test_batches_written_together_keep_every_put_as_a_state(
        store: Store, store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put(("a",), "k", {"v": 0})
    await log.put_checked([log.check_puts([Put(("a",), "k", {"v": 1})]),
                           log.check_puts([Put(("a",), "k", {"v": 2}),
                                           Put(("b",), "k", {"v": 9})]),
                           log.check_puts([Put(("a",), "k", None)]),
                           log.check_puts([Put(("a",), "k", {"v": 3})]),
                           log.check_puts([Put(("b",), "gone", None)])])
    assert log.stats["commits"] == 2  # the first put, then the five batches at once
    history = await log.history(("a",), "k")
    assert [(v.change, v.value) for v in history] == [
        ("put", {"v": 3}), ("delete", None), ("put", {"v": 2}), ("put", {"v": 1}),
        ("put", {"v": 0})]
    assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    # A put after a delete starts a new life; the delete of a key never put wrote nothing.
    current = await log.get(("a",), "k")
    assert current is not None and current.created_at == current.updated_at
    assert states(store_dsn) == 6
    assert (await store.verify()).ok


async def test_a_key_deleted_elsewhere_is_found_by_the_write_not_probed_first(
        store: Store, store_dsn: str) -> None:
    # A writer that does not know a key and finds no head guesses it was never written;
    # the commit's head check catches a key deleted by another writer, and the retry
    # reads its tombstone: the new put is its child, nothing forks.
    await ItemLog(store).put(("a",), "k", {"v": 1})
    await ItemLog(store).put(("a",), "k", None)
    late = ItemLog(store)
    await late.put(("a",), "k", {"v": 2})
    assert late.stats["retries"] == 1
    history = await late.history(("a",), "k")
    assert [v.change for v in history] == ["put", "delete", "put"]
    assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    await ItemLog(store).put(("a",), "fresh", {"v": 1})  # never written: no retry
    assert states(store_dsn) == 4


async def test_concurrent_writers_of_one_key_keep_one_line_and_lose_nothing(
        store: Store, store_dsn: str) -> None:
    logs = [ItemLog(store) for _ in range(4)]
    await asyncio.gather(*(log.put(("race",), "k", {"writer": w, "n": n})
                           for n in range(5) for w, log in enumerate(logs)))
    history = await logs[0].history(("race",), "k")
    assert len(history) == 20 == states(store_dsn)
    assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    current = await logs[1].get(("race",), "k")
    assert current is not None and current.value == history[0].value
    await consistent(logs[0])
    # Deletes and puts racing each other leave it consistent too.
    await asyncio.gather(*(log.put(("race",), "k", None if (n + w) % 2 else {"n": n})
                           for n in range(4) for w, log in enumerate(logs)))
    await consistent(logs[0])


async def test_a_remembered_state_that_went_stale_is_read_again(store: Store) -> None:
    clock = Clock()
    a, b = ItemLog(store, clock=clock), ItemLog(store, clock=clock)
    await a.put(("s",), "k", {"v": 1}, ttl=1)  # a remembers the key as it wrote it
    await b.put(("s",), "k", {"v": 2}, ttl=1)
    await a.put(("s",), "k", {"v": 3}, ttl=1)  # built on b's state, not on a's memory
    history = await a.history(("s",), "k")
    assert [v.value for v in history] == [{"v": 3}, {"v": 2}, {"v": 1}]
    assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    clock.advance(minutes=2)
    assert await b.sweep_expired() == 1
    await a.put(("s",), "k", {"v": 4})  # a remembers states the sweep deleted
    assert [v.value for v in await a.history(("s",), "k")] == [{"v": 4}]
    await consistent(a)


async def test_two_stores_on_one_database_serialise_their_writes(
        store: Store, store_dsn: str) -> None:
    other = await Store.connect(store_dsn, min_size=1, max_size=2)
    try:
        a, b = ItemLog(store), ItemLog(other)
        await asyncio.gather(*(log.put(("two",), "k", {"i": i})
                               for i in range(6) for log in (a, b)))
        history = await a.history(("two",), "k")
        assert len(history) == 12
        assert [v.parent_id for v in history[:-1]] == [v.state_id for v in history[1:]]
    finally:
        await other.close()


# -- namespaces, search, filters ----------------------------------------------------------


async def test_search_and_namespaces_by_prefix_suffix_and_depth(store: Store) -> None:
    log = ItemLog(store)
    layout = {("a", "b", "c"): 1, ("a", "b", "d", "e"): 2, ("a", "b", "d", "i"): 3,
              ("a", "b", "f"): 4, ("a", "c", "f"): 5, ("ab",): 6, ("x",): 7}
    for ns, n in layout.items():
        await log.put(ns, f"k{n}", {"n": n})
    assert await log.list_namespaces(prefix=("a", "b"), max_depth=3) == [
        ("a", "b", "c"), ("a", "b", "d"), ("a", "b", "f")]
    assert await log.list_namespaces(suffix=("f",)) == [("a", "b", "f"), ("a", "c", "f")]
    assert await log.list_namespaces(prefix=("a", "*", "f")) == [("a", "b", "f"),
                                                                 ("a", "c", "f")]
    assert await log.list_namespaces(prefix=("a",)) == sorted(
        ns for ns in layout if ns[0] == "a")  # ("ab",) is not under ("a",)
    assert await log.list_namespaces(max_depth=1, limit=2, offset=1) == [("ab",), ("x",)]
    assert await log.list_namespaces(match=[("prefix", ("a",)), ("suffix", ("e",))]) == [
        ("a", "b", "d", "e")]
    found = await log.search(("a", "b"))
    assert sorted(i.value["n"] for i in found) == [1, 2, 3, 4]
    # Most recently put first; offset and limit page through that order.
    assert [i.value["n"] for i in await log.search(("a",), limit=2, offset=1)] == [4, 3]
    assert len(await log.search((), limit=100)) == 7


async def test_search_filters_as_langgraph_documents_them(store: Store) -> None:
    log = ItemLog(store)
    docs = {"d1": {"kind": "report", "score": 4.5, "tags": ["a"], "meta": {"lvl": 1}},
            "d2": {"kind": "report", "score": 3, "tags": ["a", "b"], "on": True},
            "d3": {"kind": "memo", "score": "high", "on": 1}}
    for key, value in docs.items():
        await log.put(("docs",), key, value)

    async def keys(filter: dict[str, Any]) -> list[str]:
        return sorted(i.key for i in await log.search(("docs",), filter=filter))

    assert await keys({"kind": "report"}) == ["d1", "d2"]
    assert await keys({"score": {"$gt": 3}}) == ["d1"]  # "high" is no number: no match
    assert await keys({"score": {"$gte": 3, "$lt": 4.5}}) == ["d2"]
    assert await keys({"score": 3.0}) == ["d2"]  # 3 equals 3.0, as in JSON
    assert await keys({"on": True}) == ["d2"]  # true is not 1
    assert await keys({"kind": {"$ne": "memo"}}) == ["d1", "d2"]
    assert await keys({"tags": ["a"]}) == ["d1"]  # lists compare whole
    assert await keys({"meta.lvl": 1}) == ["d1"]  # a dotted path into nested objects
    assert await keys({"missing": {"$ne": 1}}) == []  # a missing field matches nothing
    with pytest.raises(ValidationError) as caught:
        await log.search(("docs",), filter={"score": {"$regex": "x"}})
    assert caught.value.field == "filter.score"


@given(st.lists(st.text(alphabet="ab.\x1fc", min_size=1, max_size=3).filter(
    lambda t: "." not in t and "\x1f" not in t), min_size=1, max_size=6), st.integers(0, 6))
def test_every_key_under_a_prefix_has_an_id_in_its_range(labels: list[str], cut: int) -> None:
    bounds = prefix_range(labels[:cut])
    state_id = item_state_id(labels)
    if bounds is None:
        assert cut == 0
    else:
        low, high = bounds
        assert low < state_id < high
    assert state_id.version == 8


# -- TTL ----------------------------------------------------------------------------------


async def test_an_expired_item_is_invisible_and_the_sweep_deletes_its_history(
        store: Store, store_dsn: str) -> None:
    clock = Clock()
    log = ItemLog(store, clock=clock)
    await log.put(("s",), "short", {"v": 1}, ttl=1)
    await log.put(("s",), "short", {"v": 2}, ttl=1)
    await log.put(("s",), "keep", {"v": 2})  # shares the value of the expiring key
    await log.put(("t",), "gone", {"v": 3}, ttl=1)
    clock.advance(seconds=59)
    assert (await log.get(("s",), "short")) is not None
    clock.advance(seconds=2)
    assert await log.get(("s",), "short") is None
    assert [i.key for i in await log.search(("s",))] == ["keep"]
    assert await log.list_namespaces() == [("s",)]
    assert states(store_dsn) == 4
    assert await log.sweep_expired() == 2
    assert states(store_dsn) == 1
    await consistent(log)
    await store.gc()
    assert values(store_dsn) == 1  # {"v": 2} is still held by "keep"
    assert (await store.verify()).ok


async def test_a_sweep_racing_puts_never_takes_a_key_put_again(store: Store) -> None:
    clock = Clock()
    log = ItemLog(store, clock=clock)
    keys = [f"k{i}" for i in range(12)]
    for key in keys:
        await log.put(("race",), key, {"old": key}, ttl=1)
        await log.put(("race",), key, {"older": key}, ttl=1)
    clock.advance(minutes=2)
    again = keys[::2]
    results = await asyncio.gather(log.sweep_expired(), *(
        log.put(("race",), key, {"new": key}) for key in again))
    for key in keys:
        item = await log.get(("race",), key)
        if key in again:
            assert item is not None and item.value == {"new": key}
        else:
            assert item is None
    await consistent(log)
    swept = results[0]
    assert isinstance(swept, int) and len(keys) - len(again) <= swept <= len(keys)
    assert await log.sweep_expired() == 0  # nothing expired is left


async def test_a_read_renews_the_ttl_as_langgraph_defines_refresh_on_read(
        store: Store, store_dsn: str) -> None:
    clock = Clock()
    log = ItemLog(store, clock=clock)
    await log.put(("r",), "k", {"v": 1}, ttl=1)
    clock.advance(seconds=50)
    renewed = await log.get(("r",), "k", refresh=True)
    assert renewed is not None and renewed.expires_at == clock.now + timedelta(minutes=1)
    await log.get(("r",), "k", refresh=True)  # the same instant: within the slack
    clock.advance(seconds=50)  # 100 s after the put, 50 s after the refresh
    assert (await log.get(("r",), "k")) is not None
    found = await log.search(("r",), refresh=True)
    assert [i.expires_at for i in found] == [clock.now + timedelta(minutes=1)]
    clock.advance(seconds=61)
    assert await log.get(("r",), "k", refresh=True) is None  # expired: never revived
    history = await log.history(("r",), "k")
    assert [v.change for v in history] == ["refresh", "refresh", "put"]
    # A refresh keeps the value and the put's times; only the expiry moves.
    assert history[0].value == history[-1].value and history[0].ttl == 1
    assert states(store_dsn) == 3
    assert await log.sweep_expired() == 1


async def test_a_refresh_loses_to_a_concurrent_put(store: Store) -> None:
    clock = Clock()
    log = ItemLog(store, clock=clock, refresh_slack=0)
    await log.put(("c",), "k", {"v": 1}, ttl=1)
    clock.advance(seconds=10)
    seen = {c.row.stream: c for c in await log._under(("c",))}
    stale = await log.get(("c",), "k")
    assert stale is not None
    await log.put(("c",), "k", {"v": 2}, ttl=5)  # lands between the read and its refresh
    assert await log._refresh([stale], seen, clock.now) == {}
    latest = await log.get(("c",), "k")
    assert latest is not None and latest.value == {"v": 2} and latest.ttl == 5
    assert [v.change for v in await log.history(("c",), "k")] == ["put", "put"]


async def test_a_put_of_an_expired_key_starts_a_new_life(store: Store) -> None:
    clock = Clock()
    log = ItemLog(store, clock=clock)
    await log.put(("e",), "k", {"v": 1}, ttl=1)
    clock.advance(minutes=2)
    await log.put(("e",), "k", None)  # already gone: nothing to delete
    await log.put(("e",), "k", {"v": 2})
    item = await log.get(("e",), "k")
    assert item is not None and item.created_at == clock.now and item.ttl is None
    assert await log.sweep_expired() == 0  # its newest state does not expire


# -- audits -------------------------------------------------------------------------------


async def test_verify_bundles_and_import_keep_every_version(store: Store, tmp_path: Path,
                                                            store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put(("users", "1"), "a", {"v": 1}, ttl=60)
    await log.put(("users", "1"), "a", {"v": 2})
    await log.put(("users", "1"), "b", {"v": 1})
    await log.put(("users", "1"), "b", None)
    await log.put(("users", "2"), "a", {"v": 3})
    assert (await store.verify()).ok
    path = tmp_path / "users1.bundle"
    info = await log.export(path, ("users", "1"))
    assert len(info.agents) == 5 and info.assets == 2  # four puts and deletes, a's head
    assert immagent.verify_bundle(path).assets == 2
    one = await log.export(tmp_path / "one.bundle", ("users", "1"), key="a")
    assert len(one.agents) == 3
    other = await Store.connect("memory://")
    try:
        await other.init_schema()
        await other.import_states(path)
        copy = ItemLog(other)
        item = await copy.get(("users", "1"), "a")
        assert item is not None and item.value == {"v": 2}
        assert await copy.get(("users", "1"), "b") is None
        assert len(await copy.history(("users", "1"), "b")) == 2
        assert await copy.get(("users", "2"), "a") is None  # not in the bundle
    finally:
        await other.close()


async def test_importing_over_a_different_current_value_is_refused(store: Store,
                                                                     tmp_path: Path) -> None:
    log = ItemLog(store)
    await log.put(("imp",), "k", {"v": 1})
    path = tmp_path / "k.bundle"
    await log.export(path, ("imp",), key="k")
    other = await Store.connect("memory://")
    try:
        await other.init_schema()
        await ItemLog(other).put(("imp",), "k", {"v": "elsewhere"})
        with pytest.raises(immagent.BundleError):
            await other.import_states(path)
        kept = await ItemLog(other).get(("imp",), "k")
        assert kept is not None and kept.value == {"v": "elsewhere"}
    finally:
        await other.close()
    await store.import_states(path)  # into the store it came from: nothing to add


async def test_a_tampered_item_state_is_caught_on_read_and_by_verify(
        store: Store, store_dsn: str) -> None:
    log = ItemLog(store)
    await log.put(("t",), "k", {"v": 1}, ttl=5)
    head = int(Kind.STORE_HEAD)
    body = bytes(raw_sql(store_dsn, f"SELECT body FROM immagent_states WHERE kind = {head}")
                 [0][0])
    later = body[:-1] + bytes([body[-1] ^ 0x40])  # the expiry's last byte: a later expiry
    raw_sql(store_dsn, f"UPDATE immagent_states SET body = %s WHERE kind = {head}", [later])
    store.clear_cache()
    with pytest.raises(IntegrityError):
        await log.get(("t",), "k")
    report = await store.verify()
    assert not report.ok and len(report.bad_agents) == 1


def test_the_kind_declares_its_expiry_for_retention() -> None:
    rules = STATE_KINDS[KIND]
    assert rules.expires is not None
    assert STATE_KINDS[int(Kind.AGENT_STATE)].expires is None


def test_filters_match_without_a_store() -> None:
    assert matches({"a": {"b": [1, {"c": None}]}}, {"a": {"b": [1.0, {"c": None}]}})
    assert not matches({"a": 1}, {"a": True})
    assert matches({"a.b": 1, "a": {"b": 2}}, {"a.b": 1})  # a literal key comes first
    assert matches({"s": "b"}, {"s": {"$gt": "a", "$lte": "b"}})
    assert not matches({"s": "b"}, {"s": {"$gt": 1}})
