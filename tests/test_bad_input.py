"""Bad input through the public API: every case is a
ValidationError naming the field, on both backends, and writes nothing. No raw TypeError,
AttributeError, OverflowError, UnicodeEncodeError or RecursionError; no value accepted
silently."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

import pytest

import immagent
from immagent import Message, PersistentAgent, SimpleAgent, Store
from immagent.store.backend import Head
from tests import crafted
from tests.conftest import count_rows, turn

Case = Callable[[Store, PersistentAgent], Awaitable[Any]]


def _cyclic() -> dict[str, Any]:
    config: dict[str, Any] = {}
    config["self"] = config
    return config


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"d": value}
    return value


def _append(**fields: Any) -> Case:
    return lambda s, a: s.append(a, [Message(role="assistant", content="x", **fields)])


CASES: dict[str, tuple[Case, str]] = {
    # Values that cannot be encoded, counted or walked: surrogates, out-of-range counts,
    # cycles and deep nesting, wrong types.
    "surrogate metadata key": (
        lambda s, a: s.create_agent("n", "p", "m", metadata={"\ud800": 1}), "metadata"),
    "surrogate metadata value": (
        lambda s, a: s.create_agent("n", "p", "m", metadata={"k": "\udfff"}), "metadata.k"),
    "surrogate config value": (
        lambda s, a: s.create_agent("n", "p", "m", model_config={"user": "\ud800"}),
        "model_config.user"),
    "surrogate in with_metadata": (
        lambda s, a: s.with_metadata(a, {"k": ["\ud800"]}), "metadata.k[0]"),
    "tokens >= 2**64": (_append(input_tokens=2**64), "messages[0].input_tokens"),
    "tokens < 0": (_append(output_tokens=-1), "messages[0].output_tokens"),
    "cyclic call_config": (_append(call_config=_cyclic()), "messages[0].call_config"),
    "deep call_config": (_append(call_config=_deep(500)), "messages[0].call_config"),
    "offset 2**63": (lambda s, a: s.list_agents(offset=2**63), "offset"),
    "load_agents(None)": (lambda s, a: s.load_agents(None), "agent_ids"),  # type: ignore
    "advance(mcp=object())": (lambda s, a: a.advance("hi", mcp=object()), "mcp"),  # type: ignore
    # Documented parameters are type- and range-checked.
    "temperature 'hot'": (lambda s, a: a.advance("hi", temperature="hot"),  # type: ignore
                          "temperature"),
    "max_tokens '10'": (lambda s, a: a.advance("hi", max_tokens="10"), "max_tokens"),  # type: ignore
    "top_p NaN": (lambda s, a: a.advance("hi", top_p=math.nan), "top_p"),
    "lifetime 'x'": (lambda s, a: Store.connect(
        "memory://", max_inactive_connection_lifetime="x"),  # type: ignore[arg-type]
        "max_inactive_connection_lifetime"),
    "lifetime NaN": (lambda s, a: Store.connect(
        "memory://", max_inactive_connection_lifetime=math.nan),
        "max_inactive_connection_lifetime"),
    "lifetime -5": (lambda s, a: Store.connect(
        "memory://", max_inactive_connection_lifetime=-5), "max_inactive_connection_lifetime"),
    "min_size True": (lambda s, a: Store.connect("memory://", min_size=True), "min_size"),
    "max_size '2'": (lambda s, a: Store.connect("memory://", max_size="2"),  # type: ignore
                     "max_size"),
    # the event-store API (a client passes what its own users gave it)
    "get_assets(None)": (lambda s, a: s.get_assets(None), "digests"),  # type: ignore
    "get_assets(str)": (lambda s, a: s.get_assets(["x"]), "digests[0]"),  # type: ignore
    "get_assets kind": (lambda s, a: s.get_assets([a.conversation_digest], "x"),  # type: ignore
                        "kind"),
    "get_chain huge": (lambda s, a: s.get_chain(2**70), "head"),  # type: ignore
    "get_chain kind": (lambda s, a: s.get_chain(a.conversation_digest, [3]),  # type: ignore
                       "node_kind"),
    "get_states str": (lambda s, a: s.get_states("x"), "ids"),  # type: ignore
    "stream_states kind": (lambda s, a: s.stream_states(2**70, "n"), "kind"),
    "stream_states surrogate": (lambda s, a: s.stream_states(4, "\ud800"), "stream"),
    "stream_states after_seq": (lambda s, a: s.stream_states(4, "n", after_seq="1"),  # type: ignore
                                "after_seq"),
    "scan_states after": (lambda s, a: s.scan_states(4, after=5), "after"),  # type: ignore
    "scan_states contains": (lambda s, a: s.scan_states(4, contains=5), "contains"),  # type: ignore
    "count_states stream": (lambda s, a: s.count_states(4, stream=b"n"), "stream"),  # type: ignore
    "state_lineage id": (lambda s, a: s.state_lineage(None), "state_id"),  # type: ignore
    "state_lineage limit": (lambda s, a: s.state_lineage(a.id, 2**70), "limit"),
    "delete_states str": (lambda s, a: s.delete_states("x"), "ids"),  # type: ignore
    "commit(None)": (lambda s, a: s.commit(None), "assets"),  # type: ignore
    "commit heads": (lambda s, a: s.commit([], [], heads=[Head(2**70, "n", None)]),
                     "heads[0].kind"),
    "commit replace": (lambda s, a: s.commit([], [], replace=[a.id, "x"]),  # type: ignore
                       "replace[1]"),
    "clone(None)": (lambda s, a: s.clone(None), "agent"),  # type: ignore
    "append(str)": (lambda s, a: s.append("x", turn(1)), "agent"),  # type: ignore
    "message_counts": (lambda s, a: s.message_counts(["x"]), "agents[0]"),  # type: ignore
    "get_messages": (lambda s, a: s.get_messages(None), "agent"),  # type: ignore
    "export surrogate path": (lambda s, a: s.export(a, "/tmp/\ud800.bundle"), "path"),
    "stream of 3 kB": (lambda s, a: s.commit([], [crafted.agent_state(
        a.system_prompt_digest, a.conversation_digest, name="n" * 3000).to_row()]),
        "states[0].stream"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_is_a_validation_error_and_writes_nothing(
        store: Store, store_dsn: str, case: str) -> None:
    call, field = CASES[case]
    agent = await store.append(await store.create_agent("bot", "You are fed junk.",
                                                        "immagent/echo"), turn(1))
    before = (count_rows(store_dsn, "immagent_assets"), count_rows(store_dsn, "immagent_states"))
    with pytest.raises(immagent.ValidationError) as err:
        await call(store, agent)
    assert err.value.field == field, str(err.value)
    after = (count_rows(store_dsn, "immagent_assets"), count_rows(store_dsn, "immagent_states"))
    assert after == before


class Level(IntEnum):
    HIGH = 3


async def test_subclasses_of_plain_types_are_stored_as_the_plain_type(store: Store) -> None:
    # An IntEnum is an int: accepted, and stored (and hashed) as the plain int it is, so the
    # digest is that of {"level": 3} (before: TypeError from the encoder).
    agent = await store.create_agent("bot", "p", "m", metadata={"level": Level.HIGH})
    plain = await store.create_agent("bot", "p", "m", metadata={"level": 3})
    assert agent.digest == plain.digest
    assert type(agent.metadata["level"]) is int


def test_simple_agent_checks_the_same_fields() -> None:
    with pytest.raises(immagent.ValidationError) as err:
        SimpleAgent("bot", "p", "immagent/echo", metadata={"\ud800": 1})
    assert err.value.field == "metadata"
    with pytest.raises(immagent.ValidationError) as err:
        SimpleAgent("bot", "p", "immagent/echo", model_config={"API_KEY": "x"})
    assert err.value.field == "model_config" or err.value.field == "config"


async def test_a_value_too_large_for_postgresql_is_not_a_connection_error(
        pg_store_dsn: str) -> None:
    # Below the store's own checks (which refuse a 10 MB stream first), a value PostgreSQL
    # cannot index is a StoreError about the value, not StoreConnectionError (before: the
    # import of a 10 MB name surfaced as "database connection failed: index row requires").
    from immagent.store.postgres import PostgresBackend

    backend = await PostgresBackend.open(pg_store_dsn, min_size=1, max_size=1)
    try:
        row = crafted.agent_state(b"p" * 32, b"c" * 32, name="n" * 10_000_000).to_row()
        with pytest.raises(immagent.StoreError) as err:
            await backend.write([], [row])
        assert not isinstance(err.value, immagent.StoreConnectionError)
        assert "too large" in str(err.value)
    finally:
        await backend.close()
