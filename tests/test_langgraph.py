"""ImmAgentSaver against LangGraph's own conformance suite and its stored form, on
PostgreSQL and SQLite: round trips, chains, writes, validation, sync calls, audits."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    empty_checkpoint,
)
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT

import immagent
from immagent import Store, ValidationError
from immagent.assets import Kind
from immagent.integrations.langgraph import ImmAgentSaver, SyncCallError
from tests.conftest import count_rows, raw_sql, stored_elements

ROOT = Path(__file__).resolve().parents[1]
ALL_CAPABILITIES = {"put", "put_writes", "get_tuple", "list", "delete_thread",
                    "delete_for_runs", "copy_thread", "prune"}


def _values(store_dsn: str, kind: Kind) -> int:
    """Values stored (held by their chain's links, or assets of their own), or links."""
    if kind == Kind.VALUE_NODE:
        return count_rows(store_dsn, "immagent_nodes", f"kind = {int(kind)}")
    return stored_elements(store_dsn, kind)


def _config(thread: str, checkpoint_id: str | None = None, ns: str = "") -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(values: dict[str, Any], versions: dict[str, int]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["id"] = str(uuid6(clock_seq=-1))
    cp["channel_values"] = values
    cp["channel_versions"] = cast(ChannelVersions, versions)
    return cp


async def _put(saver: ImmAgentSaver, thread: str, parent: Any, values: dict[str, Any],
               versions: dict[str, int], new: dict[str, int] | None = None,
               metadata: dict[str, Any] | None = None) -> Any:
    config = _config(thread, None if parent is None else
                     parent["configurable"]["checkpoint_id"])
    md = cast(CheckpointMetadata, {"source": "loop", "step": 0, "parents": {},
                                   **(metadata or {})})
    return await saver.aput(config, _checkpoint(values, versions), md,
                            cast(ChannelVersions, versions if new is None else new))


# -- LangGraph's conformance suite --------------------------------------------------------


async def test_conformance_every_capability_passes(store: Store, backend_name: str) -> None:
    @checkpointer_test(name=f"ImmAgentSaver-{backend_name}")
    async def factory() -> AsyncIterator[ImmAgentSaver]:
        yield ImmAgentSaver(store)

    report = await validate(factory)
    results = {cap: r for cap, r in report.results.items()}
    assert set(results) == ALL_CAPABILITIES
    failed = {cap: (r.passed, r.failures) for cap, r in results.items() if r.passed is not True}
    assert not failed, failed
    assert sum(r.tests_passed for r in results.values()) >= 80
    assert (await store.verify()).ok


def test_importing_immagent_does_not_import_langgraph() -> None:
    code = ("import sys, immagent, immagent.integrations, immagent.checkpoints;"
            "import immagent.store.log;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('langgraph', 'langchain_core'));"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- the stored form ----------------------------------------------------------------------


async def test_round_trip_of_values_metadata_and_digest(store: Store) -> None:
    saver = ImmAgentSaver(store)
    values = {"msgs": ["a", {"b": 1}, None], "input": {"messages": ["x", "y"], "n": 2},
              "empty": [], "none": None, "blob": b"\x00\xff", "n": 3.5}
    versions = dict.fromkeys(values, 1)
    stored = await _put(saver, "t1", None, values, versions,
                        metadata={"run_id": "r1", "score": (1, 2), "nested": {"k": [1]}})
    got = await saver.aget_tuple(stored)
    assert got is not None
    assert got.checkpoint["channel_values"] == values
    meta: dict[str, Any] = dict(got.metadata)
    assert meta["run_id"] == "r1"
    assert list(meta["score"]) == [1, 2]  # not plain msgpack (a tuple): the serializer's
    assert meta["nested"] == {"k": [1]}
    assert got.checkpoint["channel_versions"] == versions
    assert got.checkpoint["ts"] and got.parent_config is None
    digest = await saver.adigest(stored)
    rows = await store.get_states([_state_id(stored)])
    assert digest is not None and digest == rows[0].digest
    assert await saver.adigest(_config("t1")) == digest  # the newest is that one
    assert await saver.adigest(_config("nobody")) is None


def _state_id(config: Any) -> Any:
    from immagent import checkpoints

    c = config["configurable"]
    return checkpoints.checkpoint_state_id(c["thread_id"], c["checkpoint_ns"],
                                           c["checkpoint_id"])


async def test_a_growing_list_adds_only_its_new_elements(store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    first = await _put(saver, "t", None, {"m": ["a", "b", "c"]}, {"m": 1})
    values, nodes = _values(store_dsn, Kind.VALUE), _values(store_dsn, Kind.VALUE_NODE)
    assert values == 3 and nodes == 2  # the empty root and one link
    second = await _put(saver, "t", first, {"m": ["a", "b", "c", "d"]}, {"m": 2})
    assert _values(store_dsn, Kind.VALUE) == values + 1
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 1
    got = await saver.aget_tuple(second)
    assert got is not None and got.checkpoint["channel_values"]["m"] == ["a", "b", "c", "d"]
    # The same list under a new version is the same chain: nothing is written but the row.
    third = await _put(saver, "t", second, {"m": ["a", "b", "c", "d"]}, {"m": 3})
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 1
    rows = await store.get_states([_state_id(second), _state_id(third)])
    assert rows[0].refs == rows[1].refs


async def test_replaced_and_removed_elements_reuse_the_common_prefix(
        store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    parent: Any = None
    for i, items in enumerate([["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]]):
        parent = await _put(saver, "t", parent, {"m": items}, {"m": i + 1})
    nodes = _values(store_dsn, Kind.VALUE_NODE)
    # add_messages replacing "c" and dropping "d": the chain forks after "b".
    replaced = await _put(saver, "t", parent, {"m": ["a", "b", "X"]}, {"m": 9})
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 1
    got = await saver.aget_tuple(replaced)
    assert got is not None and got.checkpoint["channel_values"]["m"] == ["a", "b", "X"]
    # Cut back to a prefix that is a link of the chain: no new link at all.
    cut = await _put(saver, "t", replaced, {"m": ["a", "b"]}, {"m": 10})
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 1
    got = await saver.aget_tuple(cut)
    assert got is not None and got.checkpoint["channel_values"]["m"] == ["a", "b"]
    # A new saver (cold: it knows no chain) finds the fork point by walking the links.
    cold = ImmAgentSaver(store)
    again = await _put(cold, "t", parent, {"m": ["a", "b", "c", "Y"]}, {"m": 11})
    assert _values(store_dsn, Kind.VALUE_NODE) == nodes + 2
    got = await cold.aget_tuple(again)
    assert got is not None and got.checkpoint["channel_values"]["m"] == ["a", "b", "c", "Y"]


async def test_an_unchanged_channel_is_not_serialized_again(store: Store,
                                                            store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    first = await _put(saver, "t", None, {"big": "x" * 1000, "n": 1}, {"big": 1, "n": 1})
    before = _values(store_dsn, Kind.VALUE)
    # "big" keeps its version, so its value is the parent's, even if the dict says otherwise
    # (LangGraph's savers load a channel by version too).
    second = await _put(saver, "t", first, {"big": "ignored", "n": 2}, {"big": 1, "n": 2},
                        new={"n": 2})
    assert _values(store_dsn, Kind.VALUE) == before + 1
    got = await saver.aget_tuple(second)
    assert got is not None and got.checkpoint["channel_values"] == {"big": "x" * 1000, "n": 2}


async def test_pending_writes_keep_the_first_write_and_the_last_special_one(
        store: Store) -> None:
    saver = ImmAgentSaver(store)
    stored = await _put(saver, "t", None, {}, {})
    await saver.aput_writes(stored, [("a", 1), ("b", [1, 2])], "task1", "p1")
    await saver.aput_writes(stored, [("a", 2)], "task1", "p1")  # same (task, index): kept 1
    await saver.aput_writes(stored, [(ERROR, "first")], "task2", "p0")
    await saver.aput_writes(stored, [(ERROR, "second"), (INTERRUPT, {"q": 1})], "task2", "p0")
    await saver.aput_writes(stored, [("a", 1), ("b", [1, 2])], "task1", "p1")  # a repeat
    got = await saver.aget_tuple(stored)
    assert got is not None and got.pending_writes is not None
    # writes_sort_key order: task path, then task id, then index (INTERRUPT is -3, ERROR -1).
    assert got.pending_writes == [("task2", INTERRUPT, {"q": 1}), ("task2", ERROR, "second"),
                                  ("task1", "a", 1), ("task1", "b", [1, 2])]
    assert await store.count_states(Kind.CHECKPOINT_WRITES) == 4


async def test_writes_may_arrive_before_their_checkpoint(store: Store) -> None:
    saver = ImmAgentSaver(store)
    checkpoint = _checkpoint({"x": 1}, {"x": 1})
    config = _config("t", checkpoint["id"])
    await saver.aput_writes(config, [("x", 5)], "task")
    await saver.aput(_config("t"), checkpoint, {"source": "loop", "step": 0, "parents": {}},
                     {"x": 1})
    got = await saver.aget_tuple(config)
    assert got is not None and got.pending_writes == [("task", "x", 5)]


async def test_messages_written_by_a_node_are_the_channels_assets(store: Store,
                                                                  store_dsn: str) -> None:
    from langchain_core.messages import AIMessage

    saver = ImmAgentSaver(store)
    reply = AIMessage(content="hello there", id="m1")
    first = await _put(saver, "t", None, {"messages": []}, {"messages": 1})
    await saver.aput_writes(first, [("messages", [reply])], "task")
    values = _values(store_dsn, Kind.VALUE)
    await _put(saver, "t", first, {"messages": [reply]}, {"messages": 2})
    assert _values(store_dsn, Kind.VALUE) == values  # the write's asset is the element's


async def test_reputting_a_checkpoint_id_replaces_it(store: Store) -> None:
    saver = ImmAgentSaver(store)
    checkpoint = _checkpoint({"x": 1}, {"x": 1})
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    stored = await saver.aput(_config("t"), checkpoint, md, {"x": 1})
    assert await saver.aput(_config("t"), checkpoint, md, {"x": 1}) == stored  # same: a no-op
    changed = {**checkpoint, "channel_values": {"x": 2}}
    await saver.aput(_config("t"), changed, md, {"x": 1})  # type: ignore[arg-type]
    got = await saver.aget_tuple(stored)
    assert got is not None and got.checkpoint["channel_values"] == {"x": 2}
    assert await store.count_states(Kind.CHECKPOINT) == 1


async def test_reputting_an_older_checkpoint_leaves_the_newest_first(store: Store) -> None:
    # LangGraph's savers order a namespace's checkpoints by id: putting an older id again
    # changes its content, not the order. InMemorySaver, side by side, is the reference.
    from langgraph.checkpoint.memory import InMemorySaver

    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    checkpoints = [_checkpoint({"x": i}, {"x": i + 1}) for i in range(3)]
    views = []
    for saver in (ImmAgentSaver(store), InMemorySaver()):
        parent = _config("t")
        for c in checkpoints:
            parent = await saver.aput(parent, c, md, {"x": 1})
        changed = cast(Checkpoint, {**checkpoints[0], "channel_values": {"x": 99}})
        await saver.aput(_config("t"), changed, md, {"x": 1})
        latest = await saver.aget_tuple(_config("t"))
        assert latest is not None
        old = await saver.aget_tuple(_config("t", checkpoints[0]["id"]))
        assert old is not None and old.checkpoint["channel_values"] == {"x": 99}
        views.append((latest.checkpoint["id"],
                      [t.checkpoint["id"] async for t in saver.alist(_config("t"))]))
    ids = [c["id"] for c in checkpoints]
    assert views[0] == views[1] == (ids[2], ids[::-1])
    assert await store.count_states(Kind.CHECKPOINT) == 3


async def test_reputs_of_an_older_checkpoint_racing_new_puts_keep_the_order(
        store: Store) -> None:
    # The re-put rewrites the checkpoints after the old row, expecting the namespace's
    # newest to be what it read; a put landing in between makes it read again.
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    first = _checkpoint({"x": 0}, {"x": 1})
    parent = await ImmAgentSaver(store).aput(_config("t"), first, md, {"x": 1})
    arriving = [_checkpoint({"x": i}, {"x": i + 1}) for i in range(1, 13)]

    async def puts() -> None:
        saver, at = ImmAgentSaver(store), parent
        for c in arriving:
            at = await saver.aput(at, c, md, {"x": 1})
            await asyncio.sleep(0)

    async def reputs() -> None:
        saver = ImmAgentSaver(store)
        for x in range(12):
            changed = cast(Checkpoint, {**first, "channel_values": {"x": 100 + x}})
            await saver.aput(_config("t"), changed, md, {"x": 1})

    await asyncio.gather(puts(), reputs())
    saver = ImmAgentSaver(store)
    listed = [t.checkpoint["id"] async for t in saver.alist(_config("t"))]
    assert listed == [c["id"] for c in reversed([first, *arriving])]
    got = await saver.aget_tuple(_config("t", first["id"]))
    assert got is not None and got.checkpoint["channel_values"] == {"x": 111}


async def _reput(saver: ImmAgentSaver, checkpoint: Checkpoint, x: int) -> Any:
    """Put ``checkpoint``'s id again with ``x`` as its value."""
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    changed = cast(Checkpoint, {**checkpoint, "channel_values": {"x": x}})
    return await saver.aput(_config("t"), changed, md, {"x": 1})


async def test_a_reput_never_shows_a_concurrent_reader_the_checkpoint_missing(
        store: Store, store_dsn: str) -> None:
    checkpoint = _checkpoint({"x": 0}, {"x": 1})
    writer = ImmAgentSaver(store)
    config = await _reput(writer, checkpoint, 0)
    seen: list[int | None] = []
    writing = True

    async def read(reader: ImmAgentSaver) -> None:
        while writing:
            got = await reader.aget_tuple(config)
            seen.append(None if got is None else got.checkpoint["channel_values"]["x"])
            newest = await reader.aget_tuple(_config("t"))  # the thread's one checkpoint
            seen.append(None if newest is None else newest.checkpoint["channel_values"]["x"])

    async with await Store.connect(store_dsn, min_size=1, max_size=2) as elsewhere:
        readers = [asyncio.create_task(read(ImmAgentSaver(s))) for s in (store, elsewhere)]
        for x in range(1, 41):
            # A fresh saver does not know the row: its put conflicts first, then replaces.
            await _reput(writer if x % 2 else ImmAgentSaver(store), checkpoint, x)
            await asyncio.sleep(0)
        writing = False
        await asyncio.gather(*readers)
    assert None not in seen
    assert len(set(seen)) > 2  # the readers ran while the writer did


async def test_a_reput_interrupted_anywhere_leaves_the_old_checkpoint_or_the_new(
        store: Store) -> None:
    checkpoint = _checkpoint({"x": 0}, {"x": 1})
    config = await _reput(ImmAgentSaver(store), checkpoint, 0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _reput(ImmAgentSaver(store), checkpoint, 1)
    took = loop.time() - start
    reader = ImmAgentSaver(store)
    # Cancel re-puts (by savers that do not know the row, and one that does) at points
    # spread over the time one takes: between any two of its statements, at some step.
    for step in range(40):
        saver = ImmAgentSaver(store) if step % 4 else reader
        put = asyncio.create_task(_reput(saver, checkpoint, 100 + step))
        await asyncio.sleep(took * (step % 20) / 16)
        put.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await put
        got = await reader.aget_tuple(config)
        assert got is not None, f"the checkpoint vanished (cancelled at step {step})"
        assert got.checkpoint["channel_values"]["x"] in (1, *range(100, 101 + step))
    assert await store.count_states(Kind.CHECKPOINT) == 1
    assert (await store.verify()).ok


async def test_bad_input_is_a_validation_error_and_writes_nothing(store: Store) -> None:
    saver = ImmAgentSaver(store)
    checkpoint = _checkpoint({"x": 1}, {"x": 1})
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("config", lambda: saver.aput({}, checkpoint, md, {})),
        ("thread_id", lambda: saver.aput({"configurable": {}}, checkpoint, md, {})),
        ("thread_id", lambda: saver.aput(_config("a\x1fb"), checkpoint, md, {})),
        ("thread_id", lambda: saver.aput(_config("a\x00b"), checkpoint, md, {})),
        ("thread_id", lambda: saver.aput(_config("\ud800"), checkpoint, md, {})),
        ("checkpoint['id']", lambda: saver.aput(_config("t"), cast(Checkpoint, {
            **checkpoint, "id": 5}), md, {})),
        ("checkpoint_id", lambda: saver.aput_writes(_config("t"), [("x", 1)], "task")),
        ("writes[0]", lambda: saver.aput_writes(_config("t", "c"), cast(Any, [(3, 1)]),
                                                "task")),
        ("channel_values['x']", lambda: saver.aput(_config("t"), {
            **checkpoint, "channel_values": {"x": object()}}, md, {"x": 1})),
        ("thread_ids", lambda: saver.aprune("thread", strategy="delete")),
        ("strategy", lambda: saver.aprune(["t"], strategy="all")),
        ("run_ids", lambda: saver.adelete_for_runs("run")),
    ]
    for field, call in cases:
        with pytest.raises(ValidationError) as err:
            await call()
        assert err.value.field == field, field
    assert await store.count_states(Kind.CHECKPOINT) == 0
    assert await store.count_states(Kind.CHECKPOINT_WRITES) == 0


async def test_malformed_checkpoints_and_writes_name_the_field(store: Store) -> None:
    # Shapes that once escaped as a raw TypeError, ValueError or AttributeError.
    saver = ImmAgentSaver(store)
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    at = _config("t", "c")

    def bad(**fields: Any) -> Checkpoint:
        return cast(Checkpoint, {**_checkpoint({"x": 1}, {"x": 1}), **fields})

    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("checkpoint['versions_seen']", lambda: saver.aput(
            _config("t"), bad(versions_seen=["n"]), md, {"x": 1})),
        ("checkpoint['versions_seen']['n']", lambda: saver.aput(
            _config("t"), bad(versions_seen={"n": 3}), md, {"x": 1})),
        ("checkpoint['versions_seen']['n']", lambda: saver.aput(
            _config("t"), bad(versions_seen={"n": [("x", 1, 2)]}), md, {"x": 1})),
        ("checkpoint['channel_versions']['x']", lambda: saver.aput(
            _config("t"), bad(channel_versions={"x": [1]}), md, {"x": 1})),
        ("checkpoint['channel_values']", lambda: saver.aput(
            _config("t"), bad(channel_values=[1]), md, {"x": 1})),
        ("new_versions", lambda: saver.aput(_config("t"), bad(), md, cast(Any, None))),
        ("metadata", lambda: saver.aput(_config("t"), bad(), cast(Any, None), {"x": 1})),
        ("checkpoint['pending_sends']", lambda: saver.aput(
            _config("t"), bad(pending_sends=[object()]), md, {"x": 1})),
        ("writes", lambda: saver.aput_writes(at, cast(Any, None), "task")),
        ("writes", lambda: saver.aput_writes(at, cast(Any, {"x": 1}), "task")),
        ("writes[0]", lambda: saver.aput_writes(at, cast(Any, [("x", 1, 2)]), "task")),
        ("writes[1]", lambda: saver.aput_writes(at, cast(Any, [("x", 1), 5]), "task")),
        ("writes[0]", lambda: saver.aput_writes(at, cast(Any, ["ab"]), "task")),
    ]
    for field, call in cases:
        with pytest.raises(immagent.ImmAgentError) as err:
            await call()
        assert isinstance(err.value, ValidationError), (field, err.value)
        assert err.value.field == field, (field, err.value)
    assert await store.count_states(Kind.CHECKPOINT) == 0
    assert await store.count_states(Kind.CHECKPOINT_WRITES) == 0


async def test_a_checkpoint_reads_back_exactly_as_it_was_put(store: Store) -> None:
    # LangGraph 1.2 writes no `pending_sends`; older checkpoints carry it. Neither is
    # added nor dropped on the way back.
    from langgraph.pregel._checkpoint import empty_checkpoint as current_empty

    saver = ImmAgentSaver(store)
    md: CheckpointMetadata = {"source": "loop", "step": 0, "parents": {}}
    current = current_empty()
    current["channel_values"] = {"x": [1, 2]}
    current["channel_versions"] = {"x": 1}
    assert "pending_sends" not in current
    older = cast(Checkpoint, {**_checkpoint({"y": 1}, {"y": 1}), "pending_sends": []})
    for checkpoint in (current, older):
        stored = await saver.aput(_config("t"), checkpoint, md,
                                  checkpoint["channel_versions"])
        for reader in (saver, ImmAgentSaver(store)):
            got = await reader.aget_tuple(stored)
            assert got is not None and got.checkpoint == checkpoint


def test_versions_are_integers_counting_up() -> None:
    saver = ImmAgentSaver.__new__(ImmAgentSaver)
    assert saver.get_next_version(None, None) == 1
    assert saver.get_next_version(41, None) == 42
    following: Any = saver.get_next_version("00000000000000000000000000000007.0.5", None)  # type: ignore[arg-type]
    assert isinstance(following, str) and following.startswith("0" * 31 + "8.")
    assert following > "00000000000000000000000000000007.0.5"


async def test_sync_methods_run_from_another_thread_and_refuse_the_loop(store: Store) -> None:
    saver = ImmAgentSaver(store)
    stored = await _put(saver, "t", None, {"x": [1, 2]}, {"x": 1})

    def worker() -> Any:
        saver.put_writes(stored, [("x", 3)], "task")
        got = saver.get_tuple(stored)
        listed = list(saver.list(_config("t")))
        saver.copy_thread("t", "u")
        saver.prune(["u"], strategy="keep_latest")
        saver.delete_for_runs(["none"])
        return got, listed, saver.digest(stored), threading.current_thread()

    got, listed, digest, thread = await asyncio.to_thread(worker)
    assert thread is not threading.current_thread()
    assert got.checkpoint["channel_values"] == {"x": [1, 2]}
    assert got.pending_writes == [("task", "x", 3)]
    assert [t.checkpoint["id"] for t in listed] == [stored["configurable"]["checkpoint_id"]]
    assert digest == await saver.adigest(stored)
    assert await saver.aget_tuple(_config("u")) is not None
    with pytest.raises(SyncCallError, match="wait for itself"):
        saver.get_tuple(stored)
    with pytest.raises(asyncio.InvalidStateError):
        list(saver.list(None))
    await asyncio.to_thread(saver.delete_thread, "u")
    assert await saver.aget_tuple(_config("u")) is None


async def test_from_conn_string_opens_and_closes_its_store(tmp_path: Path) -> None:
    dsn = f"sqlite:///{tmp_path / 'lg.db'}"
    async with ImmAgentSaver.from_conn_string(dsn) as saver:
        await saver.setup()
        await saver.setup()  # idempotent
        stored = await _put(saver, "t", None, {"x": 1}, {"x": 1})
    assert saver.store.closed
    async with ImmAgentSaver.from_conn_string(dsn) as again:
        got = await again.aget_tuple(stored)
        assert got is not None and got.checkpoint["channel_values"] == {"x": 1}


async def test_listing_every_namespace_and_the_whole_store(store: Store) -> None:
    saver = ImmAgentSaver(store)
    root = await _put(saver, "t", None, {"x": 1}, {"x": 1})
    child_cp = _checkpoint({"y": 2}, {"y": 1})
    child = await saver.aput(_config("t", ns="sub:1"), child_cp,
                             {"source": "loop", "step": 0, "parents": {}}, {"y": 1})
    other = await _put(saver, "u", None, {"z": 3}, {"z": 1})
    every_ns = [t.config async for t in saver.alist({"configurable": {"thread_id": "t"}})]
    assert [c["configurable"]["checkpoint_id"] for c in every_ns] == [
        child["configurable"]["checkpoint_id"], root["configurable"]["checkpoint_id"]]
    assert {c["configurable"]["checkpoint_ns"] for c in every_ns} == {"", "sub:1"}
    everything = [t.config["configurable"]["checkpoint_id"] async for t in saver.alist(None)]
    assert everything == [other["configurable"]["checkpoint_id"],
                          child["configurable"]["checkpoint_id"],
                          root["configurable"]["checkpoint_id"]]
    limited = [t async for t in saver.alist(None, limit=1, filter={"source": "loop"})]
    assert len(limited) == 1


# -- deletion, gc, verify, bundles ----------------------------------------------------------


async def test_copy_thread_writes_rows_only(store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    parent: Any = None
    for i in range(3):
        parent = await _put(saver, "src", parent, {"m": list(range(i + 1))}, {"m": i + 1})
    await saver.aput_writes(parent, [("m", [9])], "task")
    assets = count_rows(store_dsn, "immagent_assets")
    await saver.acopy_thread("src", "dst")
    assert count_rows(store_dsn, "immagent_assets") == assets
    assert await store.count_states(Kind.CHECKPOINT) == 6
    src = [t async for t in saver.alist(_config("src"))]
    dst = [t async for t in saver.alist(_config("dst"))]
    assert [t.checkpoint for t in src] == [t.checkpoint for t in dst]
    assert [t.pending_writes for t in src] == [t.pending_writes for t in dst]
    assert dst[0].parent_config["configurable"]["thread_id"] == "dst"  # type: ignore[index]
    await saver.acopy_thread("src", "dst")  # again: the same rows, nothing new
    assert await store.count_states(Kind.CHECKPOINT) == 6
    # A target holding one of the checkpoint ids with other content: nothing is copied.
    latest = await saver.aget_tuple(_config("src"))
    assert latest is not None
    clash = {**latest.checkpoint, "channel_values": {"m": ["other"]}}
    await saver.aput(_config("clash"), clash, latest.metadata, {"m": 99})  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as err:
        await saver.acopy_thread("src", "clash")
    assert err.value.field == "target_thread_id"
    assert len([t async for t in saver.alist(_config("clash"))]) == 1


async def test_gc_after_delete_thread_keeps_the_others(store: Store, store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    shared = [f"shared {i}" for i in range(5)]
    a = await _put(saver, "a", None, {"m": shared}, {"m": 1})
    a = await _put(saver, "a", a, {"m": [*shared, "only a"]}, {"m": 2})
    b = await _put(saver, "b", None, {"m": [*shared, "only b"]}, {"m": 1})
    await saver.aput_writes(b, [("w", "write of b")], "task")
    await saver.adelete_thread("a")
    result = await store.gc()
    assert result["value"] == 1  # "only a"; the shared elements stay for b
    got = await saver.aget_tuple(_config("b"))
    assert got is not None and got.checkpoint["channel_values"]["m"] == [*shared, "only b"]
    assert got.pending_writes == [("task", "w", "write of b")]
    assert (await store.verify()).ok
    # A put whose parent chain gc removed is written again in full, never dangling.
    stale = await _put(saver, "a", a, {"m": [*shared, "only a", "more"]}, {"m": 3})
    got = await saver.aget_tuple(stale)
    assert got is not None and got.checkpoint["channel_values"]["m"][-2:] == ["only a", "more"]
    assert (await store.verify()).ok


async def test_prune_keeps_the_newest_per_namespace_and_its_writes(store: Store) -> None:
    # (Delta threads, which keep more: tests/test_langgraph_delta.py.)
    saver = ImmAgentSaver(store)
    parent: Any = None
    for i in range(3):
        parent = await _put(saver, "t", parent, {"m": [i]}, {"m": i + 1})
        await saver.aput_writes(parent, [("m", [i])], "task")
    other = await _put(saver, "d", None, {"x": 1}, {"x": 1})
    await saver.aprune(["t"])
    kept = [t async for t in saver.alist(_config("t"))]
    assert [t.config["configurable"]["checkpoint_id"] for t in kept] == [
        parent["configurable"]["checkpoint_id"]]
    assert kept[0].pending_writes == [("task", "m", [2])]
    assert await store.count_states(Kind.CHECKPOINT_WRITES) == 1
    assert await saver.aget_tuple(other) is not None  # another thread: untouched
    await saver.aprune(["d"], strategy="delete")
    assert await saver.aget_tuple(other) is None


async def test_verify_and_gc_check_every_row_the_saver_wrote(store: Store,
                                                             store_dsn: str) -> None:
    saver = ImmAgentSaver(store)
    stored = await _put(saver, "t", None, {"m": ["a", "b"]}, {"m": 1})
    await saver.aput_writes(stored, [("m", ["c"])], "task")
    report = await store.verify()
    # The write's value "c" is an asset; the two links (the empty root, one holding "a"
    # and "b") are chain nodes.
    assert report.ok and report.agents_checked == 2
    assert (report.assets_checked, report.nodes_checked) == (1, 2)
    state_id = _state_id(stored)
    (body,) = raw_sql(store_dsn, "SELECT body FROM immagent_states WHERE id = %s", [state_id])[0]
    raw_sql(store_dsn, "UPDATE immagent_states SET body = %s WHERE id = %s",
            [bytes(body).replace(b"loop", b"LOOP"), state_id])
    report = await store.verify()
    assert [p.agent_id for p in report.bad_agents] == [state_id]
    with pytest.raises(immagent.IntegrityError):
        await store.gc()


async def test_a_thread_exports_as_a_bundle_verified_offline(store: Store,
                                                             tmp_path: Path) -> None:
    saver = ImmAgentSaver(store)
    parent: Any = None
    for i in range(3):
        parent = await _put(saver, "t", parent, {"m": [f"m{j}" for j in range(i + 1)]},
                            {"m": i + 1})
        await saver.aput_writes(parent, [("m", [f"m{i + 1}"])], f"task{i}")
    sub = _checkpoint({"s": "sub"}, {"s": 1})
    await saver.aput(_config("t", ns="sub:1"), sub, {"source": "loop", "step": 0,
                                                     "parents": {}}, {"s": 1})
    await _put(saver, "other", None, {"x": "not exported"}, {"x": 1})
    await saver.aprune(["t"])  # the kept checkpoint's parent is gone: the bundle allows it
    path = tmp_path / "thread.bundle"
    info = await saver.aexport("t", path)
    assert immagent.verify_bundle(path).head == info.head and not info.lineage
    assert len(info.agents) == 3  # two namespaces' newest checkpoints and one writes row
    async with await Store.connect("memory://") as elsewhere:
        await elsewhere.init_schema()
        imported = await elsewhere.import_states(path)
        assert imported.head == info.head
        copy = ImmAgentSaver(elsewhere)
        mine, theirs = await saver.aget_tuple(_config("t")), await copy.aget_tuple(_config("t"))
        assert mine is not None and theirs is not None
        assert mine.checkpoint == theirs.checkpoint
        assert mine.pending_writes == theirs.pending_writes
        assert await copy.adigest(_config("t")) == await saver.adigest(_config("t"))
        assert await copy.aget_tuple(_config("other")) is None
        assert (await elsewhere.verify()).ok
    data = bytearray(path.read_bytes())
    at = data.index(b"m2")
    data[at:at + 2] = b"M2"
    path.write_bytes(bytes(data))
    with pytest.raises(immagent.BundleError):
        immagent.verify_bundle(path)
    with pytest.raises(ValidationError):
        await saver.aexport("nobody", tmp_path / "none.bundle")
