"""Compressed bodies on both backends: round trips of every kind, what stays raw, the trained
dictionary and its lifecycle, damage named by verify, bundles in canonical form."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from immagent import Message, PersistentAgent, Store
from immagent import codec as codecs
from immagent.assets import (
    EMPTY_CONVERSATION,
    ConversationNode,
    Dictionary,
    Kind,
    SystemPrompt,
    ToolCall,
)
from immagent.audit.bundle import read_bundle
from immagent.exceptions import IntegrityError, ValidationError
from immagent.rows import StoredAsset, check_row, load_row, load_rows, stored
from immagent.store import compression
from immagent.store.compression import GENERATIONS, STREAM
from tests import crafted
from tests.conftest import raw_sql
from tests.test_verify import assert_clean

_WORDS = [f"w{i:03d}" + "abcdefgh"[i % 8] * (i % 5) for i in range(300)]


def prose(seed: int, size: int = 400) -> str:
    """Compressible text: words of a small vocabulary, as chat text is to a dictionary."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(size // 5))[:size]


def noise(seed: int, size: int = 24) -> str:
    """Text whose body does not shrink: short and random (a frame's header outweighs what
    zstd finds)."""
    rng = random.Random(seed)
    return "".join(chr(33 + rng.randrange(94)) for _ in range(size))


def codec_of(dsn: str, digest: bytes) -> tuple[int, int]:
    """(codec, stored body length) of one asset or chain node row, read behind the store's
    back (a node's body is its record: its fields and its elements' bodies)."""
    length = "length" if dsn.startswith("sqlite") else "octet_length"
    ((codec, size),) = raw_sql(dsn, f"SELECT codec, {length}(body) FROM immagent_assets "
                                    f"WHERE digest = %s UNION ALL SELECT codec, {length}(body) "
                                    "FROM immagent_nodes WHERE digest = %s", [digest, digest])
    return int(codec), int(size)


async def test_every_kind_round_trips_and_only_what_shrinks_is_compressed(
        store: Store, store_dsn: str) -> None:
    long_prompt = SystemPrompt(text=prose(1, 2000))
    rich = Message(role="assistant", content=prose(2), tool_calls=(
        ToolCall(id="c1", name="search", arguments='{"q": "' + prose(3, 100) + '"}'),),
        input_tokens=10, output_tokens=20, model="immagent/echo",
        call_config={"temperature": 0.5})
    tool = Message(role="tool", content=prose(4), tool_call_id="c1", is_error=True)
    empty = Message(role="user", content="")
    random_text = Message(role="user", content=noise(5))
    node = EMPTY_CONVERSATION.extend([rich, tool, empty, random_text])
    assets: list[SystemPrompt | Message | ConversationNode] = [
        long_prompt, rich, tool, empty, random_text, EMPTY_CONVERSATION, node]
    await store.commit(assets)
    # The prompt is an asset; the messages are held by their node's row, whose record
    # (fields and bodies) is compressed as one; the empty root's record is too small.
    for compressible in (long_prompt, node):
        codec, size = codec_of(store_dsn, compressible.digest)
        assert codec == codecs.ZSTD and size < len(compressible.body) + sum(
            len(m.body) for m in (rich, tool, empty, random_text))
    assert codec_of(store_dsn, EMPTY_CONVERSATION.digest)[0] == codecs.RAW
    store.clear_cache()
    shown = [long_prompt, EMPTY_CONVERSATION, node]
    got = await store.get_assets([a.digest for a in shown])
    assert got == shown
    assert [a.body for a in got] == [a.body for a in shown]  # canonical, not stored, bytes
    assert await store.node_elements([node.digest]) == [(rich, tool, empty, random_text)]
    assert await store.get_chain(node.digest) == (rich, tool, empty, random_text)
    assert [m.body for m in await store.get_chain(node.digest)] == [
        m.body for m in (rich, tool, empty, random_text)]
    assert_clean(await store.verify())


async def talk_until_trained(store: Store) -> tuple[PersistentAgent, int]:
    """An agent with enough compressible turns for the store to train its first dictionary,
    and the number of turns."""
    agent = await store.create_agent("talker", "p", "m")
    turns = 0
    while turns * 800 < GENERATIONS[0][0] + 8000:
        agent = await store.append(agent, [Message.user(prose(2 * turns)),
                                           Message.assistant(prose(2 * turns + 1))])
        turns += 1
    return agent, turns


async def test_a_larger_dictionary_that_did_not_pay_is_tried_again_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    # The retry of a generation waits for 4x its samples; it once waited forever, because
    # sampling stopped at the last generation's size (one backend: this is the policy
    # above the backends).
    async with await Store.connect(f"sqlite:///{tmp_path / 'c.db'}") as store:
        await store.init_schema()
        agent, turns = await talk_until_trained(store)
        monkeypatch.setattr(compression, "ADOPT", 0.0)  # no dictionary can pay now
        caplog.set_level(logging.INFO, logger="immagent")

        def attempts() -> int:
            return sum("did not pay" in r.getMessage() for r in caplog.records)

        retry_at = 4 * GENERATIONS[1][0]
        written = 0
        while attempts() < 2 and written < GENERATIONS[1][0] + retry_at + 64_000:
            batch = [Message.user(prose(10_000 + turns, 4000)),
                     Message.assistant(prose(20_000 + turns, 4000))]
            agent = await store.append(agent, batch)
            written += 8000
            turns += 1
        assert attempts() == 2, f"{attempts()} attempts after {written} bytes"
        # Not before its time (bodies are a little larger than their text, so this is a
        # bound, not the exact byte).
        assert written > GENERATIONS[1][0] + 0.95 * retry_at


async def test_a_trained_dictionary_is_adopted_kept_by_gc_and_found_by_another_store(
        store: Store, store_dsn: str) -> None:
    agent, turns = await talk_until_trained(store)
    rows = raw_sql(store_dsn, "SELECT digest FROM immagent_assets WHERE kind = %s",
                   [int(Kind.DICTIONARY)])
    assert len(rows) == 1
    states = await store.stream_states(int(Kind.COMPRESSION), STREAM)
    assert len(states) == 1 and states[0].refs == (bytes(rows[0][0]),)
    later = Message.user(prose(10_000, 300))
    agent = await store.append(agent, [later])
    dictionary_id = codec_of(store_dsn, agent.conversation_digest)[0]  # its node's record
    assert dictionary_id >= codecs.FIRST_DICTIONARY
    # Another store (another process) finds the dictionary when it meets a row using it.
    async with await Store.connect(store_dsn, min_size=1, max_size=2) as other:
        messages = await other.get_messages(await other.load_agent(agent.id))
        assert messages[-1] == later and len(messages) == 2 * turns + 1
    # gc checks the live rows compressed with it (it must load the dictionary to hash them)
    # and keeps them; then it keeps the dictionary itself, whatever agents are deleted: the
    # compression state pins it.
    # A state links straight to its system prompt, so gc checks that leaf: one compressed
    # with the dictionary must be readable by gc.
    prompted = await store.create_agent("prompted", prose(20_000), "m")
    assert codec_of(store_dsn, prompted.system_prompt_digest)[0] == dictionary_id
    assert (await store.gc()).assets_removed == 0
    assert (await store.get_messages(agent))[-1] == later
    assert await (await store.load_agent(prompted.id)).get_system_prompt() == prose(20_000)
    await store.delete(agent)
    await store.gc()
    assert raw_sql(store_dsn, "SELECT count(*) FROM immagent_assets WHERE kind = %s",
                   [int(Kind.DICTIONARY)])[0][0] == 1
    assert_clean(await store.verify())
    # The store's own state cannot be deleted through the event-store API.
    with pytest.raises(Exception, match="compression"):
        await store.delete_states([states[0].id])


async def test_the_compression_state_can_be_neither_deleted_nor_replaced(
        store: Store, store_dsn: str) -> None:
    agent, _ = await talk_until_trained(store)
    (own,) = await store.stream_states(int(Kind.COMPRESSION), STREAM)
    row = crafted.agent_state(agent.system_prompt_digest, agent.conversation_digest).to_row()
    cases: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: store.delete_states([own.id]), "ids"),
        (lambda: store.commit([], [], replace=[own.id]), "replace"),
        # Named among others, in a write that would be valid without it: nothing written.
        (lambda: store.commit([], [row], replace=[uuid.uuid4(), own.id]), "replace"),
    ]
    for call, field in cases:
        with pytest.raises(ValidationError, match="compression state") as err:
            await call()
        assert err.value.field == field
    assert await store.stream_states(int(Kind.COMPRESSION), STREAM) == [own]
    assert await store.get_states([row.id]) == []
    store.clear_cache()
    async with await Store.connect(store_dsn, min_size=1, max_size=2) as other:
        assert len(await other.get_messages(await other.load_agent(agent.id))) > 0


async def test_a_damaged_compressed_body_is_named_by_verify_and_refused_on_read(
        store: Store, store_dsn: str) -> None:
    agent = await store.create_agent("a", "p", "m")
    agent = await store.append(agent, [Message.user(prose(7, 1000))])
    victim = agent.conversation_digest  # the node row holding the message
    codec, size = codec_of(store_dsn, victim)
    assert codec == codecs.ZSTD
    (body,) = raw_sql(store_dsn, "SELECT body FROM immagent_nodes WHERE digest = %s",
                      [victim])[0]
    damaged = bytearray(body)
    damaged[size // 2] ^= 0xFF
    raw_sql(store_dsn, "UPDATE immagent_nodes SET body = %s WHERE digest = %s",
            [bytes(damaged), victim])
    report = await store.verify()
    assert [p.digest for p in report.corrupt] == [victim]
    store.clear_cache()
    with pytest.raises(IntegrityError, match=victim.hex()):
        await agent.get_messages()


def test_decoding_rules_of_one_row() -> None:
    m = Message.user(prose(9))
    canonical = stored(m)
    codec, frame = codecs.encode(canonical.kind, canonical.refs, canonical.body, None)
    row = StoredAsset(canonical.digest, canonical.kind, (), frame, codec)
    assert load_row(row) == m and load_rows([row, canonical]) == [m, m]
    assert check_row(row) is None
    # A frame with trailing bytes, a dictionary the store lacks, a lying content size.
    extra = row._replace(body=frame + b"\x00")
    assert check_row(extra) is not None and check_row(extra)[0] == "corrupt"  # type: ignore[index]
    lacking = row._replace(codec=7)
    assert check_row(lacking) == ("undecodable", "its body needs dictionary 7, which is not "
                                  "stored")
    with pytest.raises(IntegrityError, match="dictionary 7"):
        load_rows([lacking])
    huge = row._replace(body=bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + frame[2:])
    with pytest.raises(IntegrityError, match="MAX_BODY"):
        load_row(huge)
    # A dictionary asset must carry a zstd dictionary with an id a store may use.
    with pytest.raises(ValueError):
        Dictionary(data=b"not a dictionary")
    node = EMPTY_CONVERSATION.extend([m])
    assert isinstance(load_row(stored(node)), ConversationNode)


async def test_bundles_carry_canonical_bodies_and_import_compresses_again(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    agent = await store.create_agent("b", prose(11, 1000), "m")
    agent = await agent.with_metadata({"k": "v"})
    agent = await store.append(agent, [Message.user(prose(12)), Message.assistant(prose(13))])
    info = await store.export(agent, tmp_path / "a.bundle")
    _, _, rows = read_bundle(info.path)
    assert rows and all(r.codec == codecs.RAW for r in rows)
    # Every asset and node as its canonical form, every message as its canonical body
    # (a bundle carries a node's messages as assets, as a version-2 store exported them).
    messages = await agent.get_messages()
    canonical = {a.digest: a.body for a in await store.get_assets(
        [r.digest for r in rows if r.kind != Kind.MESSAGE])}
    canonical.update((m.digest, m.body) for m in messages)
    assert {r.digest: r.body for r in rows} == canonical
    target_path = tmp_path / "target.db"
    async with await Store.connect(f"sqlite:///{target_path}") as target:
        await target.init_schema()
        imported = await target.import_bundle(info.path)
        assert imported.digest == agent.digest
        assert await imported.get_messages() == await agent.get_messages()
        compressed = raw_sql(f"sqlite:///{target_path}",
                             "SELECT count(*) FROM immagent_assets WHERE codec = 1")[0][0]
        compressed += raw_sql(f"sqlite:///{target_path}",
                              "SELECT count(*) FROM immagent_nodes WHERE codec = 1")[0][0]
        assert compressed >= 2  # the prompt, and the node holding both messages
