"""Tampered compressed rows cannot make a read allocate before their digests are checked
(issue 20, item 6): eight 8 KB rows declaring 256 MiB each took one read to 2.85 GB RSS
before the IntegrityError. A frame may declare at most ``codec.MAX_RATIO`` times its own
size (the writer stores anything compressing further raw) and never more than
``codec.MAX_BODY``, checked before zstd runs; a batch decompresses at most
``codec.MAX_UNCHECKED`` bytes before checking their digests.

The rows here are valid zstd frames (runs of zeros, so they inflate for real) put behind
the store's back as the records of real chain nodes (since schema 3 a node's record holds
its messages). What a read allocates is measured with
tracemalloc, which sees zstd's output buffers (Python bytes), in every thread: memory
counted, not time."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from immagent import IntegrityError, Message, PersistentAgent, Store
from immagent import codec as codecs
from immagent.assets import EMPTY_CONVERSATION, Asset, Kind, SystemPrompt
from immagent.records import AgentRecord, state_digest
from immagent.rows import check_row, load_row, stored
from tests.conftest import raw_sql

_MIB = 1 << 20


def zeros_frame(size: int) -> bytes:
    """A magicless zstd frame (as the store writes them) of ``size`` zero bytes."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=1, write_checksum=0,
        write_dict_id=0)
    frame: bytes = zstandard.ZstdCompressor(compression_params=params).compress(b"\0" * size)
    return frame


async def _tampered(store: Store, dsn: str, count: int, size: int) -> PersistentAgent:
    """An agent of ``count`` steps of one message each, every step's node row then given a
    frame inflating to ``size`` zero bytes as its record (so every digest check fails,
    after decompression). The steps are committed at once, as a bundle import would."""
    prompt = SystemPrompt(text="You are bombed.")
    node = EMPTY_CONVERSATION
    assets: list[Asset] = [prompt, node]
    for i in range(count):
        message = Message(role="user", content=f"victim {i}")
        node = node.extend([message])
        assets += [message, node]
    record = AgentRecord(id=uuid.uuid4(), parent_id=None, created_at=datetime.now(UTC),
                         name="bomb", model="m", system_prompt=prompt.digest,
                         conversation=node.digest, model_config={}, metadata={},
                         digest=state_digest("bomb", "m", prompt.digest, node.digest, {}, {}))
    await store.commit(assets, [record.to_row()])
    raw_sql(dsn, "UPDATE immagent_nodes SET codec = %s, body = %s WHERE kind = %s "
            "AND digest <> %s", [codecs.ZSTD, zeros_frame(size), int(Kind.NODE),
                                 EMPTY_CONVERSATION.digest])
    store.clear_cache()
    return await store.load_agent(record.id)


async def _peak(call: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """Peak bytes traced while ``call`` ran, and what it returned (or raised)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            result: Any = await call()
        except IntegrityError as e:
            result = e
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


async def test_frames_declaring_more_than_they_may_hold_are_refused_unread(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    # The probe's shape at a quarter of its size: 2 KB frames declaring 64 MiB each.
    agent = await _tampered(store, store_dsn, 4, 64 * _MIB)
    calls: list[Callable[[], Awaitable[Any]]] = [
        agent.get_messages, lambda: store.export(agent, tmp_path / "a.bundle")]
    for call in calls:
        peak, outcome = await _peak(call)
        assert peak < 8 * _MIB, peak  # before: 4 x 64 MiB, all of it before any check
        assert isinstance(outcome, IntegrityError), outcome
        assert "declares 67108864 bytes" in str(outcome)
        store.clear_cache()
    peak, report = await _peak(store.verify)
    assert peak < 8 * _MIB, peak
    # The four step nodes, each named; the root and the prompt are sound.
    assert len(report.corrupt) == 4 and "declares 67108864 bytes" in report.corrupt[0].reason
    assert EMPTY_CONVERSATION.digest not in {p.digest for p in report.corrupt}


async def test_a_batch_is_checked_in_parts(store: Store, store_dsn: str) -> None:
    # 3,000 small frames, each within the ratio it may hold (16 bytes inflating to 15,000),
    # read in one chain: before, all 45 MB were inflated before the first digest check. A
    # chain declaring more than 16 MiB is checked in parts of 4 MiB first (chain_rows).
    size = 15_000
    agent = await _tampered(store, store_dsn, 3_000, size)
    peak, outcome = await _peak(agent.get_messages)
    assert peak < 24 * _MIB < 3_000 * size, peak
    assert isinstance(outcome, IntegrityError), outcome
    assert len(zeros_frame(size)) * codecs.MAX_RATIO >= size  # each within its own bound
    assert (codecs.MAX_UNCHECKED // (codecs.SMALL_FRAME_MAX + 1)) * size < 16 * _MIB


def test_the_rules_of_one_frame() -> None:
    m = Message.user("compressible " * 200)
    canonical = stored(m)
    codec, frame = codecs.encode(canonical.kind, canonical.refs, canonical.body, None)
    assert codec == codecs.ZSTD and load_row(canonical._replace(codec=codec, body=frame)) == m
    # The writer keeps degenerate bodies raw: a reader may then refuse what inflates more.
    degenerate = b"\0" * 100_000
    assert codecs.encode(canonical.kind, (), degenerate, None) == (codecs.RAW, degenerate)
    with pytest.raises(codecs.CodecError, match="more than a stored frame may hold"):
        codecs.decode(codecs.ZSTD, zeros_frame(100_000), codecs.NO_DICTIONARIES)
    # A row with refs (a node) is never compressed: nothing is inflated for it.
    node = stored(EMPTY_CONVERSATION.extend([m]))
    bomb = node._replace(codec=codecs.ZSTD, body=zeros_frame(64 * _MIB))
    assert check_row(bomb) == ("corrupt", "a row with refs is never compressed, yet its "
                                          "codec says it is")
    with pytest.raises(IntegrityError, match="never compressed"):
        load_row(bomb)
