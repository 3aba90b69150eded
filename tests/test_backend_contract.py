"""The backend contract: one behavioural test class every backend must pass (eventsourcing's
recorder tests are the model). Each backend supplies ``create_backend``; the class body is
the contract, so memory, SQLite, PostgreSQL and PostgreSQL with read replicas cannot drift
apart (the last on the replication cluster of tests/pg_cluster.py).

The Store-level suites (test_store.py and friends) run on top of this, through the rules.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from immagent.assets import (
    EMPTY_CONVERSATION,
    ConversationNode,
    Kind,
    Message,
    MissingAsset,
    SystemPrompt,
)
from immagent.chains import NewNode, NodeRow
from immagent.records import STATE_KINDS, StateKind, StateRow, stream_digest
from immagent.rows import StoredAsset, stored
from immagent.store.backend import SCHEMA_VERSION, Backend, Head, WriteResult
from immagent.store.memory import MemoryBackend
from immagent.store.postgres import PostgresBackend
from immagent.store.replicas import ReplicatedBackend
from immagent.store.sqlite import SQLiteBackend
from tests.cluster_store import empty_store
from tests.conftest import node_row
from tests.pg_cluster import PgCluster

#: A state kind for these tests only: the generic digest rule, refs of any kind.
TEST_KIND = 99
STATE_KINDS.setdefault(TEST_KIND, StateKind(
    digest=lambda r: stream_digest(r.kind, r.stream, r.refs, r.body),
    ref_kinds=lambda r: tuple(int(Kind.NODE) for _ in r.refs)))


#: An attached kind for these tests only (as attestations are: about their parent state).
ATTACHED_KIND = 98
STATE_KINDS.setdefault(ATTACHED_KIND, StateKind(
    digest=lambda r: stream_digest(r.kind, r.stream, r.refs, r.body),
    ref_kinds=lambda r: tuple(int(Kind.NODE) for _ in r.refs), attached=True))


def state(stream: str = "s", *, refs: Sequence[bytes] = (), parent: UUID | None = None,
          body: bytes = b"b", state_id: UUID | None = None, kind: int = TEST_KIND) -> StateRow:
    refs = tuple(refs)
    return StateRow(id=state_id or uuid.uuid4(), parent_id=parent, kind=kind, stream=stream,
                    refs=refs, body=body, digest=stream_digest(kind, stream, refs, body),
                    created_at=datetime.now(UTC))


def message(text: str) -> Message:
    return Message(role="user", content=text)


def chain(*texts: str) -> tuple[list[NewNode], ConversationNode]:
    """The node rows of a conversation adding one message per node (each held inline by
    its node), root first, and its head."""
    node, rows = EMPTY_CONVERSATION, [node_row(EMPTY_CONVERSATION)]
    for text in texts:
        m = message(text)
        node = node.extend([m])
        rows.append(node_row(node, [m]))
    return rows, node


class BackendContract:
    """Every test here runs against each backend (see the subclasses at the bottom)."""

    async def create_backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        b = await self.create_backend()
        if await b.schema_version() is None:
            await b.migrate(None)
        try:
            yield b
        finally:
            await b.close()

    # -- schema ---------------------------------------------------------------------------

    async def test_schema_is_at_the_current_version_and_migrate_checks_under_its_lock(
            self, backend: Backend) -> None:
        assert await backend.schema_version() == SCHEMA_VERSION
        # Someone else migrated since we read "None": nothing happens, the version is told.
        assert await backend.migrate(None) == SCHEMA_VERSION
        assert await backend.schema_version() == SCHEMA_VERSION

    # -- writes ---------------------------------------------------------------------------

    async def test_rows_round_trip_and_states_get_increasing_seqs(self, backend: Backend) -> None:
        nodes, head = chain("a", "b")
        prompt = stored(SystemPrompt(text="p"))
        s1 = state(refs=[head.digest])
        s2 = state(refs=[prompt.digest], parent=s1.id)
        assert await backend.write([prompt], [s1, s2], nodes=nodes) == WriteResult()
        assert await backend.get_assets([prompt.digest, head.digest]) == {prompt.digest: prompt}
        got, leaves = await backend.get_nodes([n.digest for n in nodes] + [b"\x01" * 32])
        assert leaves == {} and set(got) == {n.digest for n in nodes}
        for depth, n in enumerate(nodes):  # as written, with where they are stored
            row = got[n.digest]
            assert (row.kind, row.parent, row.refs, row.depth, row.added) == (
                n.kind, n.parent, n.refs, depth, n.added)
        by_id = {s.id: s for s in await backend.get_states([s1.id, s2.id, uuid.uuid4()])}
        assert set(by_id) == {s1.id, s2.id}
        for mine in (s1, s2):
            theirs = by_id[mine.id]
            assert (theirs.parent_id, theirs.kind, theirs.stream, theirs.refs, theirs.body,
                    theirs.digest, theirs.created_at) == (
                    mine.parent_id, mine.kind, mine.stream, mine.refs, mine.body, mine.digest,
                    mine.created_at)
        assert 0 < by_id[s1.id].seq < by_id[s2.id].seq
        assert await backend.kinds([prompt.digest, head.digest, b"\x02" * 32]) == {
            prompt.digest: int(Kind.SYSTEM_PROMPT), head.digest: int(Kind.NODE)}

    async def test_inserts_are_idempotent(self, backend: Backend) -> None:
        nodes, head = chain("a")
        s = state(refs=[head.digest])
        assert await backend.write([], [s], nodes=nodes) == WriteResult()
        assert await backend.write([], [s], nodes=[*nodes, *nodes]) == WriteResult()  # no-op
        assert await backend.count_states(TEST_KIND) == 1
        # Two nodes, one message held by the second.
        assert sum(n for n, _ in (await backend.audits().asset_stats()).values()) == 3

    async def test_a_write_with_one_missing_required_ref_writes_nothing(
            self, backend: Backend) -> None:
        nodes, head = chain("a")
        absent = b"\x07" * 32
        s = state(refs=[head.digest, absent])
        result = await backend.write([], [s], require=[absent], nodes=nodes)
        assert result.missing == (absent,)
        assert await backend.get_nodes([n.digest for n in nodes]) == ({}, {})
        assert await backend.get_states([s.id]) == []

    async def test_a_node_whose_parent_is_not_stored_is_missing_and_writes_nothing(
            self, backend: Backend) -> None:
        nodes, head = chain("a", "b")
        prompt = stored(SystemPrompt(text="p"))
        result = await backend.write([prompt], [state(refs=[head.digest])],
                                     nodes=[nodes[0], nodes[2]])
        assert result.missing == (nodes[1].digest,)
        assert await backend.get_nodes([n.digest for n in nodes]) == ({}, {})
        assert await backend.get_assets([prompt.digest]) == {}

    async def test_a_state_id_with_other_content_is_a_conflict_and_writes_nothing(
            self, backend: Backend) -> None:
        s = state(body=b"one")
        await backend.write([], [s])
        other = state(body=b"two", state_id=s.id)
        nodes, _ = chain("x")
        result = await backend.write([], [state(), other], nodes=nodes)
        assert result.conflicts == (s.id,)
        assert await backend.get_nodes([n.digest for n in nodes]) == ({}, {})
        assert await backend.count_states(TEST_KIND) == 1

    async def test_expected_heads_let_exactly_one_of_two_writers_commit(
            self, backend: Backend) -> None:
        first = state("line")
        assert await backend.write([], [first], heads=[Head(TEST_KIND, "line", None)]) == \
            WriteResult()
        again = await backend.write([], [state("line")], heads=[Head(TEST_KIND, "line", None)])
        assert again.stale == (Head(TEST_KIND, "line", None),)
        a, b = state("line", parent=first.id), state("line", parent=first.id)
        head = Head(TEST_KIND, "line", first.id)
        results = await asyncio.gather(backend.write([], [a], heads=[head]),
                                       backend.write([], [b], heads=[head]))
        assert sorted(bool(r.stale) for r in results) == [False, True]
        newest = await backend.stream_states(TEST_KIND, "line", limit=1)
        assert newest[0].id in (a.id, b.id) and await backend.count_states(TEST_KIND) == 2
        # Another stream (or kind) is independent.
        assert await backend.write([], [state("other")], heads=[
            Head(TEST_KIND, "other", None), Head(int(Kind.AGENT_STATE), "line", None)]) == \
            WriteResult()

    async def test_replace_deletes_the_named_states_and_inserts_the_new_ones_at_once(
            self, backend: Backend) -> None:
        old, gone, kept = state("r", body=b"one"), state("r"), state("r")
        assert await backend.write([], [old, gone, kept]) == WriteResult()
        new = state("r", body=b"two", state_id=old.id)
        # Absent ids are fine; the re-written id needs no conflict check.
        assert await backend.write([], [new], replace=[old.id, gone.id, uuid.uuid4()]) == \
            WriteResult()
        by_id = {s.id: s for s in await backend.get_states([old.id, gone.id, kept.id])}
        assert set(by_id) == {old.id, kept.id} and by_id[old.id].digest == new.digest
        # An upsert: it keeps its place (its seq) in the stream, before `kept`.
        assert [s.id for s in await backend.stream_states(TEST_KIND, "r")] == [kept.id, old.id]
        assert by_id[old.id].seq < by_id[kept.id].seq
        # A replacement with nothing to insert is a delete.
        assert await backend.write([], [], replace=[kept.id]) == WriteResult()
        assert [s.id for s in await backend.stream_states(TEST_KIND, "r")] == [old.id]

    async def test_a_replacement_that_fails_a_check_deletes_nothing(
            self, backend: Backend) -> None:
        old, other = state("f", body=b"one"), state("f", body=b"mine")
        await backend.write([], [old, other])
        absent = b"\x07" * 32
        nodes, _ = chain("x")
        again = state("f", body=b"two", state_id=old.id)
        theirs = state("f", body=b"theirs", state_id=other.id)
        assert await backend.write([], [again], require=[absent], replace=[old.id],
                                   nodes=nodes) == WriteResult(missing=(absent,))
        stale = Head(TEST_KIND, "f", old.id)  # `other` is the newest
        assert await backend.write([], [again], heads=[stale], replace=[old.id],
                                   nodes=nodes) == WriteResult(stale=(stale,))
        # A conflict on an id it does not replace: the replaced one stays, too.
        result = await backend.write([], [again, theirs], replace=[old.id], nodes=nodes)
        assert result == WriteResult(conflicts=(other.id,))
        by_id = {s.id: s for s in await backend.get_states([old.id, other.id])}
        assert by_id[old.id].digest == old.digest and by_id[other.id].digest == other.digest
        assert await backend.get_nodes([n.digest for n in nodes]) == ({}, {})
        assert await backend.count_states(TEST_KIND) == 2

    async def test_heads_are_checked_against_the_rows_before_the_replacement(
            self, backend: Backend) -> None:
        first, second = state("h"), state("h")
        await backend.write([], [first])
        await backend.write([], [second], heads=[Head(TEST_KIND, "h", first.id)])
        # Replacing the newest state while expecting it: the expectation held.
        newer = state("h", body=b"newer", state_id=second.id)
        assert await backend.write([], [newer], heads=[Head(TEST_KIND, "h", second.id)],
                                   replace=[second.id]) == WriteResult()
        # Deleting the head does not make the one before it the expected head.
        before = Head(TEST_KIND, "h", first.id)
        assert await backend.write([], [state("h")], heads=[before], replace=[second.id]) \
            == WriteResult(stale=(before,))
        assert [s.id for s in await backend.stream_states(TEST_KIND, "h")] == \
            [second.id, first.id]
        # Replacing an older state keeps it where it was: the head has not moved.
        again = state("h", body=b"again", state_id=first.id)
        assert await backend.write([], [again], replace=[first.id]) == WriteResult()
        assert [s.id for s in await backend.stream_states(TEST_KIND, "h")] == \
            [second.id, first.id]
        assert await backend.write([], [state("h")], heads=[before]) == \
            WriteResult(stale=(before,))
        assert await backend.write([], [state("h")], heads=[Head(TEST_KIND, "h", second.id)]) \
            == WriteResult()

    async def test_concurrent_replacements_of_one_id_all_commit_and_one_wins(
            self, backend: Backend) -> None:
        old = state("c", body=b"old")
        await backend.write([], [old])
        (first,) = await backend.get_states([old.id])
        seq = first.seq
        for attempt in range(3):
            rivals = [state("c", body=b"v%d.%d" % (attempt, i), state_id=old.id)
                      for i in range(8)]
            results = await asyncio.gather(*(backend.write([], [r], replace=[old.id])
                                             for r in rivals))
            assert results == [WriteResult()] * len(rivals)
            (row,) = await backend.get_states([old.id])
            assert row.digest in {r.digest for r in rivals}
            assert row.seq == seq  # every replacement kept the first row's place
            assert await backend.count_states(TEST_KIND) == 1

    # -- chains and walks -----------------------------------------------------------------

    async def test_get_chain_returns_the_lineage_root_first_with_depths_and_parents(
            self, backend: Backend) -> None:
        nodes, head = chain("a", "b", "c")
        await backend.write([], [], nodes=nodes)
        rows, leaves = await backend.get_chain(head.digest)
        assert [r.digest for r in rows] == [n.digest for n in nodes] and leaves == {}
        assert [r.depth for r in rows] == [0, 1, 2, 3]
        assert [r.parent for r in rows] == [None, *(n.digest for n in nodes[:-1])]
        assert [r.body for r in rows] == [n.body for n in nodes]  # stored as written
        assert await backend.get_chain(b"\x01" * 32) == ([], {})

    async def test_a_fork_is_a_run_of_its_own_and_reads_through_its_parent(
            self, backend: Backend) -> None:
        trunk, _ = chain(*"abcdefghij")
        fork = EMPTY_CONVERSATION.extend([message("a")]).extend([message("B")])
        await backend.write([], [], nodes=trunk)
        await backend.write([], [], nodes=[node_row(fork, [message("B")])])
        rows, _ = await backend.get_chain(fork.digest)
        assert [r.digest for r in rows] == [trunk[0].digest, trunk[1].digest, fork.digest]
        assert [r.depth for r in rows] == [0, 1, 2]
        # What an append needs: from the row before the last span depth (here the root's
        # span depth 0: every row) to the head.
        context, _ = await backend.get_chain(trunk[-1].digest, context=True)
        assert [r.digest for r in context] == [n.digest for n in trunk]

    async def test_wide_nodes_out_of_line_elements_and_large_batches_come_back_whole(
            self, backend: Backend) -> None:
        # A node adding many elements (a tool round with many calls), one of them named by
        # its refs (an asset of its own), and more digests than one statement asks for.
        wide = [message(f"w{i}") for i in range(25)]
        big = message("B" * 2000)
        first = EMPTY_CONVERSATION.extend([message("first")])
        node = first.extend([*wide, big])
        nodes = [node_row(EMPTY_CONVERSATION), node_row(first, [message("first")]),
                 node_row(node, [*wide, big], out_of_line=[big.digest])]
        many = [stored(message(f"m{i}")) for i in range(2500)]
        await backend.write([*many, stored(big)], [], nodes=nodes)
        rows, leaves = await backend.get_chain(node.digest)
        assert len(rows) == 3 and rows[-1].refs == (big.digest,)
        assert leaves == {big.digest: stored(big)}
        got = await backend.get_assets([r.digest for r in many] + [b"\x05" * 32])
        assert got == {r.digest: r for r in many}

    async def test_iter_nodes_and_iter_assets_batches(self, backend: Backend) -> None:
        nodes, head = chain("a", "b")
        others, other = chain("c")
        loose = stored(message("loose"))
        await backend.write([loose], [], nodes=[*nodes, *others[1:]])
        batches = [b async for b in backend.audits().iter_nodes(None, 2)]
        assert all(len(b) <= 2 for b in batches)
        every = [r for b in batches for r in b]
        assert sorted(r.digest for r in every) == sorted(
            n.digest for n in [*nodes, *others[1:]])
        seen: set[bytes] = set()
        for r in every:  # parents before children, each with its parent's digest
            assert r.parent is None or r.parent in seen
            seen.add(r.digest)
        audits = backend.audits()
        reached = [r.digest async for b in audits.iter_nodes([head.digest, b"\x02" * 32])
                   for r in b]
        assert reached == [n.digest for n in nodes]
        assert [r.digest async for b in audits.iter_assets(None, 2) for r in b] == [
            loose.digest]
        assert [r async for b in audits.iter_assets([head.digest]) for r in b] == []
        assert [r.digest async for b in audits.iter_assets([loose.digest]) for r in b] == [
            loose.digest]
        assert other.digest not in reached

    async def test_dangling_refs_name_the_missing_digest_and_its_referrer(
            self, backend: Backend) -> None:
        big = message("B" * 2000)
        first = EMPTY_CONVERSATION.extend([big])
        head = first.extend([message("b")])
        # The write does not check what a node's refs name (the store requires it): here
        # the out-of-line element is not stored.
        await backend.write([], [], nodes=[node_row(EMPTY_CONVERSATION),
                                           node_row(first, [big], out_of_line=[big.digest]),
                                           node_row(head, [message("b")])])
        absent = b"\x03" * 32
        s = state(refs=[head.digest, absent])
        await backend.write([], [s])
        found = set(await backend.audits().dangling_refs())
        assert found == {MissingAsset(big.digest, first.digest), MissingAsset(absent, s.id)}
        assert set(await backend.audits().dangling_refs([s.id])) == found
        clean_nodes, clean_head = chain()
        clean = state(refs=[clean_head.digest])
        await backend.write([], [clean], nodes=clean_nodes)
        assert await backend.audits().dangling_refs([clean.id]) == []
        assert len(await backend.audits().dangling_refs(limit=1)) == 1

    # -- states ---------------------------------------------------------------------------

    async def test_scan_pages_by_id_and_filters_by_kind_and_substring(
            self, backend: Backend) -> None:
        names = ["TestBot", "bot_1", "100%", "a\\b", "other"]
        made = [state(n) for n in names]
        await backend.write([], made)
        ids = sorted(s.id for s in made)
        assert [s.id for s in await backend.scan_states(TEST_KIND, limit=10)] == ids
        assert [s.id for s in await backend.scan_states(TEST_KIND, newest_first=True)] == \
            ids[::-1]
        page = await backend.scan_states(TEST_KIND, after=ids[1], limit=2)
        assert [s.id for s in page] == ids[2:4]
        back = await backend.scan_states(TEST_KIND, after=ids[3], newest_first=True)
        assert [s.id for s in back] == ids[:3][::-1]
        assert await backend.scan_states(int(Kind.AGENT_STATE)) == []
        assert len(await backend.scan_states(None)) == 5

        def streams(rows: list[StateRow]) -> set[str]:
            return {s.stream for s in rows}

        for needle, expected in (("bot", {"TestBot", "bot_1"}), ("BOT", {"TestBot", "bot_1"}),
                                 ("%", {"100%"}), ("_", {"bot_1"}), ("\\", {"a\\b"}),
                                 ("t_1", {"bot_1"}), ("t%", set())):
            assert streams(await backend.scan_states(TEST_KIND, contains=needle)) == \
                expected, needle
            assert await backend.count_states(TEST_KIND, contains=needle) == len(expected)

    async def test_keyset_paging_skips_nothing_under_concurrent_deletes(
            self, backend: Backend) -> None:
        made = [state(f"s{i}") for i in range(30)]
        await backend.write([], made)
        seen: list[UUID] = []
        deleted: set[UUID] = set()
        after: UUID | None = None
        ids = sorted(s.id for s in made)
        while page := await backend.scan_states(TEST_KIND, after=after, limit=4):
            seen += [s.id for s in page]
            after = page[-1].id
            # Delete rows already read and rows not read yet: an offset would now skip rows.
            doomed = [ids[0], *[i for i in ids if i > after][1::3]]
            deleted.update(await backend.delete_states(doomed))
            ids = [i for i in ids if i not in deleted]
        survivors = {s.id for s in made} - deleted
        assert survivors <= set(seen)

    async def test_stream_states_is_log_order_and_pages_by_seq(self, backend: Backend) -> None:
        line = [state("line") for _ in range(5)]
        for s in line:
            await backend.write([], [s, state("noise")])
        newest = await backend.stream_states(TEST_KIND, "line", limit=2)
        assert [s.id for s in newest] == [line[4].id, line[3].id]
        rest = await backend.stream_states(TEST_KIND, "line", after_seq=newest[-1].seq)
        assert [s.id for s in rest] == [s.id for s in line[2::-1]]
        oldest = await backend.stream_states(TEST_KIND, "line", newest_first=False, limit=2)
        assert [s.id for s in oldest] == [line[0].id, line[1].id]
        assert await backend.count_states(TEST_KIND, stream="line") == 5
        assert await backend.stream_states(TEST_KIND, "none") == []

    async def test_stream_heads_are_each_streams_newest_state_paged_by_name(
            self, backend: Backend) -> None:
        newest: dict[str, StateRow] = {}
        for i in range(3):  # interleaved, so a stream's newest is not its first row
            for name in ("b", "a", "c\u00e9", "d"):
                newest[name] = state(name, body=bytes([i]))
                await backend.write([], [newest[name]])
        await backend.write([], [state("a", kind=TEST_KIND + 1)])  # another kind: not seen
        heads = await backend.stream_heads(TEST_KIND)
        assert {s.stream: s.id for s in heads} == {n: s.id for n, s in newest.items()}
        first = await backend.stream_heads(TEST_KIND, limit=2)
        rest = await backend.stream_heads(TEST_KIND, after=first[-1].stream, limit=10)
        assert [s.stream for s in [*first, *rest]] == [s.stream for s in heads]
        assert len(first) == 2 and len(rest) == 2
        assert await backend.stream_heads(TEST_KIND, after=heads[-1].stream) == []
        assert await backend.stream_heads(TEST_KIND + 2) == []

    async def test_lineage_walks_parents_and_terminates_on_a_cycle(
            self, backend: Backend) -> None:
        a = state()
        b = state(parent=a.id)
        c = state(parent=b.id)
        await backend.write([], [a, b, c])
        assert {s.id for s in await backend.lineage(c.id)} == {a.id, b.id, c.id}
        assert [s.id for s in await backend.lineage(c.id, 2)] == [c.id, b.id]
        assert await backend.lineage(uuid.uuid4()) == []
        # A cycle (only damage or a crafted import makes one) must not hang the walk.
        x_id, y_id = uuid.uuid4(), uuid.uuid4()
        x, y = state(state_id=x_id, parent=y_id), state(state_id=y_id, parent=x_id)
        await backend.write([], [x, y])
        whole = await asyncio.wait_for(backend.lineage(x_id), 10)
        assert sorted(s.id for s in whole) == sorted([x_id, y_id])
        capped = await asyncio.wait_for(backend.lineage(x_id, 5), 10)
        assert [s.id for s in capped] == [x_id, y_id, x_id, y_id, x_id]

    async def test_delete_states_and_lineage_deletion_stopping_at_a_shared_parent(
            self, backend: Backend) -> None:
        root = state()
        mid = state(parent=root.id)
        a, b = state(parent=mid.id), state(parent=mid.id)
        await backend.write([], [root, mid, a, b])
        # a's lineage: a goes; mid still has b, so the walk stops there.
        assert await backend.delete_states([a.id, mid.id, root.id], stop_at_shared=True) == \
            [a.id]
        assert await backend.delete_states([b.id, mid.id, root.id], stop_at_shared=True) == \
            [b.id, mid.id, root.id]
        assert await backend.delete_states([uuid.uuid4()], stop_at_shared=True) == []
        plain = [state(), state()]
        await backend.write([], plain)
        assert await backend.delete_states([plain[1].id, uuid.uuid4(), plain[0].id]) == \
            [plain[1].id, plain[0].id]
        assert await backend.count_states(TEST_KIND) == 0

    async def test_a_dry_run_deletion_says_what_would_go_and_deletes_nothing(
            self, backend: Backend) -> None:
        root = state()
        mid = state(parent=root.id)
        a, b = state(parent=mid.id), state(parent=mid.id)
        await backend.write([], [root, mid, a, b])
        line = [a.id, mid.id, root.id]
        assert await backend.delete_states(line, stop_at_shared=True, dry_run=True) == [a.id]
        assert await backend.delete_states([b.id, a.id], dry_run=True) == [b.id, a.id]
        assert await backend.count_states(TEST_KIND) == 4
        await backend.delete_states([b.id])
        assert await backend.delete_states(line, stop_at_shared=True, dry_run=True) == line
        assert await backend.delete_states(line, stop_at_shared=True) == line
        assert await backend.count_states(TEST_KIND) == 0

    async def test_siblings_deleted_at_once_still_take_their_parent(
            self, backend: Backend) -> None:
        parent = state()
        kids = [state(parent=parent.id) for _ in range(6)]
        await backend.write([], [parent, *kids])
        results = await asyncio.gather(*(backend.delete_states([k.id, parent.id],
                                                                stop_at_shared=True)
                                         for k in kids))
        assert sorted(len(r) for r in results) == [1, 1, 1, 1, 1, 2]
        assert await backend.count_states(TEST_KIND) == 0

    async def test_lineage_deletion_does_not_stop_at_an_attached_child(
            self, backend: Backend) -> None:
        root = state()
        mid = state(parent=root.id)
        head = state(parent=mid.id)
        about = state(parent=mid.id, kind=ATTACHED_KIND)
        await backend.write([], [root, mid, head, about])
        line = [head.id, mid.id, root.id]
        assert await backend.delete_states(line, stop_at_shared=True) == [head.id]
        await backend.write([], [head])
        assert await backend.delete_states(line, stop_at_shared=True,
                                           attached=[ATTACHED_KIND]) == line
        assert [r.id for r in await backend.get_states([about.id])] == [about.id]

    # -- gc -------------------------------------------------------------------------------

    async def test_sweep_removes_attached_states_whose_parent_is_gone(
            self, backend: Backend) -> None:
        rows, head = chain("a")
        subject = state(refs=[head.digest])
        kept = state(parent=subject.id, kind=ATTACHED_KIND)
        orphan = state(parent=uuid.uuid4(), kind=ATTACHED_KIND, refs=[head.digest])
        plain = state(parent=uuid.uuid4())  # another kind: a deleted parent is nothing
        await backend.write([], [subject, kept, orphan, plain], nodes=rows)

        def refuse(rows: Sequence[object]) -> None:
            raise RuntimeError("damaged root")

        with pytest.raises(RuntimeError):
            await backend.sweep(refuse, detached=[ATTACHED_KIND])
        assert len(await backend.get_states([orphan.id])) == 1  # nothing deleted
        result = await backend.sweep(lambda rows: None, detached=[ATTACHED_KIND])
        assert result.states_removed == 1 and result.removed == {}
        assert {r.id for r in await backend.get_states(
            [subject.id, kept.id, orphan.id, plain.id])} == {subject.id, kept.id, plain.id}
        assert (await backend.sweep(lambda rows: None)).states_removed == 0


    async def test_sweep_removes_exactly_what_no_state_reaches(self, backend: Backend) -> None:
        kept_rows, kept = chain("k1", "k2")
        gone_rows, _ = chain("k1", "g2")  # shares the empty node and "k1"'s node
        prompt = stored(SystemPrompt(text="p"))
        await backend.write([prompt], [state(refs=[kept.digest])],
                            nodes=[*kept_rows, *gone_rows])
        marked: list[object] = []
        result = await backend.sweep(marked.extend)
        survivors = {r.digest for r in kept_rows}
        assert result.missing is None and result.kept == len(survivors)
        # g2's node (counted with the message it held) and the prompt.
        assert result.removed == {int(Kind.NODE): 1, int(Kind.MESSAGE): 1,
                                  int(Kind.SYSTEM_PROMPT): 1}
        assert result.freed == len(gone_rows[-1].body) + len(prompt.body)
        assert set((await backend.get_nodes([r.digest for r in [*kept_rows, *gone_rows]]))[0]
                   ) == survivors
        assert await backend.get_assets([prompt.digest]) == {}
        # check() saw every state and every reached node, each with its parent's digest.
        assert sum(isinstance(r, StateRow) for r in marked) == 1
        seen = {r.digest: r for r in marked if isinstance(r, NodeRow)}
        assert set(seen) == survivors
        assert [seen[n.digest].parent for n in kept_rows] == [None, *(
            n.digest for n in kept_rows[:-1])]

    async def test_sweep_cuts_a_run_after_its_last_live_node(self, backend: Backend) -> None:
        rows, _ = chain(*"abcdef")
        await backend.write([], [state(refs=[rows[2].digest])], nodes=rows)
        result = await backend.sweep(lambda rows: None)
        assert result.removed == {int(Kind.NODE): 4, int(Kind.MESSAGE): 4}
        assert set((await backend.get_nodes([r.digest for r in rows]))[0]) == {
            r.digest for r in rows[:3]}
        # The run goes on from its last node again.
        again = EMPTY_CONVERSATION.extend([message("a")]).extend([message("b")]).extend(
            [message("x")])
        await backend.write([], [], nodes=[node_row(again, [message("x")])])
        chain_rows, _ = await backend.get_chain(again.digest)
        assert [r.depth for r in chain_rows] == [0, 1, 2, 3]

    async def test_sweep_marks_what_the_codecs_of_marked_rows_name(
            self, backend: Backend) -> None:
        # A backend stores codecs as data; gc's rule (codec_refs) says which rows the codecs
        # of the marked rows need. It hears the dictionary ids in use (of marked rows only)
        # and every DICTIONARY row, before the check runs; what it names is kept.
        kept = stored(message("kept, compressed with dictionary 5"))._replace(codec=5)
        gone = stored(message("unreached, compressed with dictionary 6"))._replace(codec=6)
        dictionary = StoredAsset(b"\x09" * 32, int(Kind.DICTIONARY), (), b"five")
        other = StoredAsset(b"\x0a" * 32, int(Kind.DICTIONARY), (), b"six")
        prompt = stored(SystemPrompt(text="p"))
        await backend.write([kept, gone, dictionary, other, prompt],
                            [state(refs=[kept.digest, prompt.digest])])
        heard: list[tuple[list[int], set[bytes]]] = []
        order: list[str] = []

        def codec_refs(used: Sequence[int], rows: Sequence[StoredAsset]) -> list[bytes]:
            order.append("codecs")
            heard.append((list(used), {r.digest for r in rows}))
            return [dictionary.digest]

        result = await backend.sweep(lambda rows: order.append("check"), codec_refs)
        assert heard == [([5], {dictionary.digest, other.digest})] and order[0] == "codecs"
        assert set(await backend.get_assets([kept.digest, gone.digest, dictionary.digest,
                                             other.digest])) == {kept.digest,
                                                                 dictionary.digest}
        assert result.removed == {int(Kind.MESSAGE): 1, int(Kind.DICTIONARY): 1}

        def refuse(used: Sequence[int], rows: Sequence[StoredAsset]) -> list[bytes]:
            raise RuntimeError("a needed dictionary is missing")

        await backend.write([gone], [])
        with pytest.raises(RuntimeError):
            await backend.sweep(lambda rows: None, refuse)
        assert gone.digest in await backend.get_assets([gone.digest])  # nothing deleted

    async def test_a_dry_run_sweep_reports_what_it_would_remove_and_removes_nothing(
            self, backend: Backend) -> None:
        kept_rows, kept = chain("k1", "k2")
        gone_rows, _ = chain("k1", "g2")
        await backend.write([], [state(refs=[kept.digest])], nodes=[*kept_rows, *gone_rows])
        everything = {r.digest for r in [*kept_rows, *gone_rows]}
        checked: list[object] = []
        rehearsed = await backend.sweep(checked.extend, dry_run=True)
        assert checked  # the same checks as a real sweep
        assert set((await backend.get_nodes(list(everything)))[0]) == everything
        real = await backend.sweep(lambda rows: None)
        assert rehearsed == real and sum(real.removed.values()) == 2

    async def test_sweep_hears_the_codecs_of_marked_nodes(self, backend: Backend) -> None:
        # Chain nodes are compressed too: a marked node's codec names its dictionary.
        rows, head = chain("a")
        rows = [*rows[:-1], rows[-1]._replace(codec=7)]
        dictionary = StoredAsset(b"\x0b" * 32, int(Kind.DICTIONARY), (), b"seven")
        await backend.write([dictionary], [state(refs=[head.digest])], nodes=rows)
        heard: list[list[int]] = []

        def codec_refs(used: Sequence[int], found: Sequence[StoredAsset]) -> list[bytes]:
            heard.append(list(used))
            return [dictionary.digest]

        result = await backend.sweep(lambda rows: None, codec_refs)
        assert heard == [[7]] and result.removed == {}
        assert dictionary.digest in await backend.get_assets([dictionary.digest])

    async def test_sweep_deletes_nothing_when_something_reachable_is_missing(
            self, backend: Backend) -> None:
        rows, head = chain("a")
        loose = stored(message("loose"))
        absent = b"\x04" * 32
        await backend.write([loose], [state(refs=[head.digest, absent])], nodes=rows)
        result = await backend.sweep(lambda rows: None)
        assert result.missing == absent and result.removed == {}
        assert loose.digest in await backend.get_assets([loose.digest])

    async def test_sweep_deletes_nothing_when_the_check_raises(self, backend: Backend) -> None:
        loose = stored(message("loose"))
        await backend.write([loose], [state()])

        def refuse(rows: Sequence[object]) -> None:
            raise RuntimeError("damaged root")

        with pytest.raises(RuntimeError, match="damaged root"):
            await backend.sweep(refuse)
        assert loose.digest in await backend.get_assets([loose.digest])

    async def test_stats_and_size(self, backend: Backend) -> None:
        rows, _ = chain("a")
        prompt = stored(SystemPrompt(text="p"))
        await backend.write([prompt], [], nodes=rows)
        stats = await backend.audits().asset_stats()
        # The message is held by its node: counted, its bytes in the node's record.
        assert stats[int(Kind.MESSAGE)] == (1, 0)
        assert stats[int(Kind.NODE)] == (2, sum(len(r.body) for r in rows))
        assert stats[int(Kind.SYSTEM_PROMPT)] == (1, len(prompt.body))
        assert await backend.audits().storage_bytes() > 0
        assert await backend.ping()


class TestMemoryBackend(BackendContract):
    async def create_backend(self) -> Backend:
        return MemoryBackend()


class TestSQLiteBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    async def create_backend(self) -> Backend:
        return await SQLiteBackend.open(str(self.folder / "contract.db"))


class TestPostgresBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, pg_store_dsn: str) -> None:
        self.dsn = pg_store_dsn

    async def create_backend(self) -> Backend:
        return await PostgresBackend.open(self.dsn, min_size=1, max_size=8)

    async def test_a_replacement_that_waited_for_a_plain_insert_of_its_id_replaces_it(
            self, backend: Backend) -> None:
        # Another transaction inserts the id (not replacing anything) and commits only once
        # the replacing write waits for it: the replacement must still win, as it would in
        # either serial order of the two writes (memory and SQLite serialise them).
        plain = state("p", body=b"plain")
        mine = state("p", body=b"mine", state_id=plain.id)
        async with (await psycopg.AsyncConnection.connect(self.dsn) as conn,
                    await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as watch,
                    conn.transaction()):
            await conn.execute(
                "INSERT INTO immagent_states (id, parent_id, kind, stream, refs, body, "
                "digest, created_at) VALUES (%s, NULL, %s, %s, '', %s, %s, %s)",
                (plain.id, plain.kind, plain.stream, plain.body, plain.digest,
                 plain.created_at))
            write = asyncio.create_task(backend.write([], [mine], replace=[plain.id]))
            deadline = asyncio.get_running_loop().time() + 10
            while not await _waits_for_a_lock(watch):
                assert asyncio.get_running_loop().time() < deadline, "never waited"
                await asyncio.sleep(0.01)
        assert await write == WriteResult()
        (row,) = await backend.get_states([plain.id])
        assert row.digest == mine.digest



class TestReplicatedBackend(BackendContract):
    """A primary and a hot standby: reads served by the standby where they can tell a
    miss, everything else by the primary, audits by the primary it hands out."""

    @pytest.fixture(autouse=True)
    def _cluster(self, pg_cluster_db: PgCluster) -> None:
        self.cluster = empty_store(pg_cluster_db)

    async def create_backend(self) -> Backend:
        backend = await ReplicatedBackend.open(self.cluster.primary, [self.cluster.standby],
                                               min_size=1, max_size=8)
        assert isinstance(backend.audits(), PostgresBackend)  # the primary, not a replica
        return backend


async def _waits_for_a_lock(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                             "'Lock' AND datname = current_database()")
    row = await cur.fetchone()
    return row is not None and row[0] > 0
