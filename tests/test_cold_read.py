"""The cold read of a long chain (issues 11 and 22), on PostgreSQL and SQLite.

``Store.get_chain`` reads a lineage's node rows (each holding its elements) in a few range
scans, verifies the head and the nodes down to the nearest span node one by one and the
rest one span hash at a time, and caches the chain as one run. These tests damage one row
at a time behind the store's back, far from the head (inside a span), and check that the
read still names the exact row (a span that does not hold is checked node by node); that a
node whose counters disagree with its chain is never stored; that wide nodes and bodies
stored out of line read back whole and verified; and that the run cache shares a common
prefix and never answers wrongly after evictions."""

from __future__ import annotations

import pytest

import immagent
from immagent import Message, PersistentAgent, Store, chains
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, Kind
from immagent.store.cache import AssetCache
from tests.conftest import node_record, raw_sql, write_record

TURNS = 40


def turn(i: int, tag: str = "") -> list[Message]:
    # Long enough to be compressed (plain zstd before a dictionary is trained).
    return [Message(role="user", content=f"question {i}{tag}: " + "why " * 12),
            Message(role="assistant", content=f"answer {i}{tag}: " + "because " * 12)]


async def grow(store: Store, turns: int = TURNS, tag: str = "") -> list[PersistentAgent]:
    states = [await store.create_agent("cold", "You are read cold.", "m")]
    for i in range(turns):
        states.append(await store.append(states[-1], turn(i, tag)))
    return states


async def cold(store: Store, agent: PersistentAgent) -> tuple[Message, ...]:
    store.clear_cache()
    return await (await store.load_agent(agent.id)).get_messages()


def flip_body_byte(dsn: str, digest: bytes, at: int | None = None) -> None:
    (row,) = raw_sql(dsn, "SELECT body FROM immagent_assets WHERE digest = %s", [digest])
    body = bytearray(bytes(row[0]))
    body[len(body) // 2 if at is None else at] ^= 0x01
    raw_sql(dsn, "UPDATE immagent_assets SET body = %s WHERE digest = %s", [bytes(body), digest])


def flip_record_byte(dsn: str, digest: bytes, at: int) -> None:
    record = bytearray(node_record(dsn, digest))
    record[at] ^= 0x01
    write_record(dsn, digest, bytes(record))


async def test_a_long_chain_reads_back_whole_and_in_order(store: Store) -> None:
    states = await grow(store)
    messages = await cold(store, states[-1])
    assert [m.content for m in messages] == [m.content for i in range(TURNS) for m in turn(i)]
    assert all(m.digest == Message(**{f: getattr(m, f) for f in m.__struct_fields__}).digest
               for m in messages)


@pytest.mark.parametrize("where", ["fields", "message"])
async def test_a_damaged_row_deep_in_the_chain_fails_the_cold_read_naming_it(
        store: Store, store_dsn: str, where: str) -> None:
    states = await grow(store)
    middle = states[TURNS // 2]  # depth 20: inside the span the node at depth 32 covers
    victim = middle.conversation_digest
    assert await cold(store, states[-1])  # sound before the damage
    # A byte of the node's own fields (its size counter, still a valid record: only the
    # hash tells) or of a message it holds.
    record = node_record(store_dsn, victim)
    flip_record_byte(store_dsn, victim, 5 if where == "fields" else len(record) - 3)
    with pytest.raises(immagent.IntegrityError, match=f"{victim.hex()} is corrupt"):
        await cold(store, states[-1])
    # Nothing of the damaged chain was cached by the failed read.
    with pytest.raises(immagent.IntegrityError, match=f"{victim.hex()} is corrupt"):
        await (await store.load_agent(states[-1].id)).get_messages()
    # The states before the damage still read (their lineage does not reach it).
    assert len(await cold(store, states[TURNS // 2 - 1])) == TURNS - 2


async def test_a_node_row_given_refs_fails_the_cold_read(store: Store,
                                                         store_dsn: str) -> None:
    states = await grow(store)
    victim = states[3].conversation_digest
    raw_sql(store_dsn, "UPDATE immagent_nodes SET refs = %s WHERE digest = %s",
            [victim, victim])
    with pytest.raises(immagent.IntegrityError, match=f"{victim.hex()} is corrupt"):
        await cold(store, states[-1])


async def test_wide_nodes_and_bodies_out_of_line_are_read_and_verified(
        store: Store, store_dsn: str) -> None:
    # Eleven messages in one node, and a body too large to be held inline (an asset of its
    # own, shared by every chain holding it, verified by its own digest).
    agent = await store.create_agent("wide", "You get many at once.", "m")
    wide = [Message(role="user", content=f"part {i}: " + "x" * 40) for i in range(11)]
    big = Message(role="assistant", content="a long answer " * (chains.INLINE_MAX // 10))
    assert len(big.body) > chains.INLINE_MAX
    agent = await store.append(await store.append(agent, [*wide, big]), turn(0))
    assert [m.content for m in await cold(store, agent)] == [
        m.content for m in [*wide, big, *turn(0)]]
    flip_body_byte(store_dsn, big.digest)
    with pytest.raises(immagent.IntegrityError, match=f"{big.digest.hex()} is corrupt"):
        await cold(store, agent)


@pytest.mark.parametrize("field", ["length", "size"])
async def test_a_node_whose_counters_disagree_with_the_chain_is_never_stored(
        store: Store, store_dsn: str, field: str) -> None:
    states = await grow(store, 10)
    (head,) = await store.get_assets([states[-1].conversation_digest], ConversationNode)
    extra = Message(role="user", content="one more")
    # A node that hashes right but miscounts (with the right accumulator root): listings
    # trust counters, so the write refuses it, naming it.
    true = head.extend([extra])
    bad = ConversationNode(parent=head.digest, messages=(extra.digest,),
                           length=true.length + (field == "length"),
                           size=true.size + 7 * (field == "size"), acc=true.acc)
    with pytest.raises(immagent.ValidationError, match=f"node {bad.digest.hex()}.*claims"):
        await store.commit([extra, bad])
    assert not raw_sql(store_dsn, "SELECT 1 FROM immagent_nodes WHERE digest = %s",
                       [bad.digest])
    # The sound chain under it still reads.
    assert len(await store.get_chain(head.digest)) == 20


async def test_a_fork_read_after_its_trunk_is_right(store: Store) -> None:
    trunk = await grow(store, 30)
    fork = [trunk[15]]
    for i in range(10):
        fork.append(await store.append(fork[-1], turn(i, "fork")))
    store.clear_cache()
    assert len(await (await store.load_agent(trunk[-1].id)).get_messages()) == 60
    fork_head = await store.load_agent(fork[-1].id)
    expected = [m.content for i in range(15) for m in turn(i)]
    expected += [m.content for i in range(10) for m in turn(i, "fork")]
    assert [m.content for m in await fork_head.get_messages()] == expected
    # Every state of both lineages is now answered from memory, rightly.
    for i, state in enumerate(trunk):
        agent = await store.load_agent(state.id)
        assert len(await agent.get_messages()) == 2 * i


async def test_a_chain_of_the_wrong_kind_is_refused_from_the_batch(store: Store) -> None:
    states = await grow(store, 5)
    store.clear_cache()
    with pytest.raises(immagent.IntegrityError, match="not the head of a chain"):
        await store.get_chain(states[-1].conversation_digest, Kind.ITEM_NODE)


# -- the run cache, alone ------------------------------------------------------------------


def chain_of(nodes: int, tag: str = "", base: ConversationNode = EMPTY_CONVERSATION,
             size: int = 100) -> tuple[list[bytes], list[int], tuple[Message, ...], list[int]]:
    """(node digests oldest first, root included, ends, elements, sizes) of a chain on
    ``base``."""
    digests, ends, elements, sizes = [base.digest], [base.length], [], [base.size]
    node = base
    for i in range(nodes):
        added = [Message(role="user", content=f"{tag}{i}:{j}:" + "x" * size) for j in (0, 1)]
        node = node.extend(added)
        elements.extend(added)
        digests.append(node.digest)
        ends.append(node.length)
        sizes.append(node.size)
    return digests, ends, tuple(elements), sizes


def test_a_chain_sharing_a_cached_prefix_costs_only_its_own_part() -> None:
    cache = AssetCache(history_bytes=64 << 20)
    trunk, ends, elements, sizes = chain_of(100)
    cache.put_chain(trunk, ends, elements, sizes)
    after_trunk = cache.history_bytes
    # A fork at node 60: the chain as a database read returns it, root first.
    base = EMPTY_CONVERSATION.extend(elements[:2])
    for i in range(1, 60):
        base = base.extend(elements[2 * i:2 * i + 2])
    assert base.digest == trunk[60]
    own, own_ends, own_elements, own_sizes = chain_of(40, "fork", base)
    cache.put_chain([*trunk[:60], *own], [*ends[:60], *own_ends],
                    (*elements[:120], *own_elements), [*sizes[:60], *own_sizes])
    grown = cache.history_bytes - after_trunk
    own_body = sum(len(m.body) for m in own_elements)
    assert own_body <= grown < own_body + 100 * 60, (grown, own_body)
    assert cache.history(own[-1]) == (*elements[:120], *own_elements)
    assert cache.history(trunk[-1]) == elements
    assert cache.history(trunk[30]) == elements[:60]


def test_evicted_runs_make_misses_never_wrong_answers() -> None:
    trunk, ends, elements, sizes = chain_of(200)
    budget = 4 * sum(len(m.body) for m in elements)  # 3/4 of it for runs: 3 chains
    cache = AssetCache(history_bytes=budget)
    cache.put_chain(trunk, ends, elements, sizes)
    fork, fork_ends, fork_elements, fork_sizes = chain_of(5, "fork", _node_at(elements, 100))
    fork_chain = ([*trunk[:101], *fork[1:]], [*ends[:101], *fork_ends[1:]],
                  (*elements[:200], *fork_elements), [*sizes[:101], *fork_sizes[1:]])
    cache.put_chain(*fork_chain)
    for n in range(6):  # other chains push the trunk's run out
        cache.put_chain(*chain_of(200, f"other{n}"))
        assert cache.history_bytes <= budget
    assert cache.history(trunk[-1]) is None
    assert cache.history(fork[-1]) is None  # its own run may live, its prefix does not
    # Read again, the fork is cached whole rather than on top of the missing prefix.
    cache.put_chain(*fork_chain)
    assert cache.history(fork[-1]) == (*elements[:200], *fork_elements)
    assert cache.history(trunk[50]) == elements[:100]


def _node_at(elements: tuple[Message, ...], nodes: int) -> ConversationNode:
    node = EMPTY_CONVERSATION
    for i in range(nodes):
        node = node.extend(elements[2 * i:2 * i + 2])
    return node
