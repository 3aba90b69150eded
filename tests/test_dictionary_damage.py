"""A store's zstd dictionaries: a row's codec is a reference gc keeps, and one damaged
dictionary stops nothing that does not need it (issue 20, items 1 and 7).

* Item 1: once the COMPRESSION state that pins the dictionaries was gone (a lost row, a
  partial restore), gc swept the dictionary, and every row compressed with it was
  unreadable for good, even after the state row was put back. Now gc marks, for every
  row it keeps, the dictionary its codec names (found among the stored dictionaries by the
  id in their own hashed bytes); if one is not stored, it aborts and deletes nothing.
* Item 7: a damaged dictionary row made ``verify()`` raise and every write fail, even an
  unrelated ``create_agent``. Now verify lists it, writes go on, and new bodies are
  compressed with another codec.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from immagent import IntegrityError, Message, PersistentAgent, Store
from immagent import codec as codecs
from immagent.assets import Kind
from tests.conftest import raw_sql
from tests.test_compression import codec_of, prose, talk_until_trained


def _dictionary(dsn: str) -> tuple[bytes, bytes]:
    ((digest, body),) = raw_sql(dsn, "SELECT digest, body FROM immagent_assets WHERE kind = %s",
                                [int(Kind.DICTIONARY)])
    return bytes(digest), bytes(body)


def _state_row(dsn: str) -> tuple[Any, ...]:
    ((row),) = raw_sql(dsn, "SELECT id, parent_id, kind, stream, refs, body, digest, created_at "
                            "FROM immagent_states WHERE kind = %s", [int(Kind.COMPRESSION)])
    return tuple(row)


@pytest.fixture
async def trained(store: Store, store_dsn: str) -> AsyncIterator[tuple[PersistentAgent, int]]:
    """A store with a trained dictionary and a turn compressed with it (its dictionary id):
    the turn's node row, whose record holds its messages."""
    agent, _ = await talk_until_trained(store)
    agent = await store.append(agent, [Message.user(prose(9_001)),
                                       Message.assistant(prose(9_002))])
    dictionary_id = codec_of(store_dsn, agent.conversation_digest)[0]
    assert dictionary_id >= codecs.FIRST_DICTIONARY
    yield agent, dictionary_id


async def _fresh(dsn: str) -> Store:
    """Another process's view of the store (nothing cached, dictionaries not loaded)."""
    return await Store.connect(dsn, min_size=1, max_size=2)


async def test_gc_keeps_a_dictionary_live_rows_need_without_the_compression_state(
        trained: tuple[PersistentAgent, int], store_dsn: str) -> None:
    agent, _ = trained
    digest, _ = _dictionary(store_dsn)
    state = _state_row(store_dsn)
    raw_sql(store_dsn, "DELETE FROM immagent_states WHERE kind = %s", [int(Kind.COMPRESSION)])
    async with await _fresh(store_dsn) as other:
        result = await other.gc()
        # The dictionary is a reference of every row compressed with it: kept.
        assert result.get("dictionary", 0) == 0
        assert _dictionary(store_dsn)[0] == digest
    # Putting the state row back makes every row readable again.
    raw_sql(store_dsn, "INSERT INTO immagent_states (id, parent_id, kind, stream, refs, body, "
            "digest, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", list(state))
    async with await _fresh(store_dsn) as other:
        messages = await (await other.load_agent(agent.id)).get_messages()
        assert messages[-1] == Message.assistant(prose(9_002))
        report = await other.verify()
        assert report.ok, report.lines()


async def test_gc_aborts_when_a_live_row_needs_a_dictionary_that_is_not_stored(
        trained: tuple[PersistentAgent, int], store_dsn: str) -> None:
    _, dictionary_id = trained
    digest, _ = _dictionary(store_dsn)
    raw_sql(store_dsn, "DELETE FROM immagent_states WHERE kind = %s", [int(Kind.COMPRESSION)])
    raw_sql(store_dsn, "DELETE FROM immagent_assets WHERE digest = %s", [digest])
    async with await _fresh(store_dsn) as other:
        orphan = await other.append(await other.create_agent("orphan", "o", "m"),
                                    [Message.user("unreachable soon")])
        await other.delete(orphan)
        rows = ("SELECT (SELECT count(*) FROM immagent_assets) + "
                "(SELECT count(*) FROM immagent_nodes)")
        before = raw_sql(store_dsn, rows)
        with pytest.raises(IntegrityError, match=f"dictionary {dictionary_id}") as caught:
            await other.gc()
        assert "nothing deleted" in str(caught.value)
        assert raw_sql(store_dsn, rows) == before


async def test_a_dictionary_nothing_needs_is_swept_like_any_asset(
        trained: tuple[PersistentAgent, int], store_dsn: str) -> None:
    agent, _ = trained
    raw_sql(store_dsn, "DELETE FROM immagent_states WHERE kind = %s", [int(Kind.COMPRESSION)])
    async with await _fresh(store_dsn) as other:
        await other.delete_lineage(agent)  # no live row is compressed with it any more
        result = await other.gc()
        assert result.get("dictionary") == 1
    assert raw_sql(store_dsn, "SELECT count(*) FROM immagent_assets WHERE kind = %s",
                   [int(Kind.DICTIONARY)]) == [(0,)]


async def test_a_damaged_dictionary_is_listed_and_stops_nothing_else(
        trained: tuple[PersistentAgent, int], store_dsn: str) -> None:
    agent, dictionary_id = trained
    digest, body = _dictionary(store_dsn)
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0xFF
    raw_sql(store_dsn, "UPDATE immagent_assets SET body = %s WHERE digest = %s",
            [bytes(damaged), digest])
    async with await _fresh(store_dsn) as other:
        report = await other.verify()  # lists, never raises
        assert digest in {p.digest for p in report.corrupt}, report.lines()
        assert any(f"dictionary {dictionary_id}" in p.reason for p in report.undecodable), \
            report.lines()
        # Unrelated writes go on; new bodies are not compressed with the damaged dictionary.
        fresh = await other.create_agent("unrelated", prose(31, 2000), "m")
        later = await other.append(fresh, [Message.user(prose(32)), Message.assistant(
            prose(33))])
        assert codec_of(store_dsn, later.conversation_digest)[0] != dictionary_id
        assert codec_of(store_dsn, fresh.system_prompt_digest)[0] != dictionary_id
        other.clear_cache()
        assert (await (await other.load_agent(later.id)).get_messages())[-1] == \
            Message.assistant(prose(33))
        assert (await other.verify(later)).ok
        # What needs the damaged dictionary cannot be read; gc will not guess: it aborts.
        with pytest.raises(IntegrityError, match=f"dictionary {dictionary_id}"):
            await (await other.load_agent(agent.id)).get_messages()
        with pytest.raises(IntegrityError, match="nothing deleted"):
            await other.gc()


async def test_a_damaged_compression_state_stops_no_write(
        trained: tuple[PersistentAgent, int], store_dsn: str) -> None:
    raw_sql(store_dsn, "UPDATE immagent_states SET body = %s WHERE kind = %s",
            [b"tampered", int(Kind.COMPRESSION)])
    async with await _fresh(store_dsn) as other:
        report = await other.verify()
        assert len(report.bad_agents) == 1, report.lines()
        fresh = await other.create_agent("unrelated", prose(41, 2000), "m")
        later = await other.append(fresh, [Message.user(prose(42))])
        other.clear_cache()
        assert (await (await other.load_agent(later.id)).get_messages())[-1] == \
            Message.user(prose(42))
