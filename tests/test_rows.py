"""Stored rows: the batched read paths (``load_rows``, ``nodes_counters``, ``digests_of``)
give exactly what the row-by-row ones give, for sound and damaged rows alike (pure core,
no database)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from immagent import codec
from immagent.assets import (
    EMPTY_ITEMS,
    EMPTY_VALUES,
    Item,
    Kind,
    Message,
    SystemPrompt,
    Value,
    digest_of,
    digests_of,
)
from immagent.exceptions import IntegrityError
from immagent.rows import (
    StoredAsset,
    load_row,
    load_rows,
    node_counters,
    nodes_counters,
    stored,
    stored_rows,
    stored_tagged_rows,
)

text = st.text(max_size=60)
leaves = st.one_of(
    st.builds(Message, role=st.sampled_from(["user", "assistant", "tool"]),
              content=st.none() | text),
    st.builds(SystemPrompt, text=text),
    st.builds(Value, type=st.text(max_size=8), data=st.binary(max_size=40)),
    st.builds(Item.of, st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1) | text,
                                       max_size=3)),
)
#: What can happen to a stored row on its way back: nothing, a flipped body byte, another
#: digest, another kind, refs where none belong, a body that does not decode.
damage = st.sampled_from(["none", "none", "none", "body", "digest", "kind", "refs", "junk"])


def _damaged(row: StoredAsset, how: str, salt: int) -> StoredAsset:
    if how == "body" and row.body:
        i = salt % len(row.body)
        body = row.body[:i] + bytes([row.body[i] ^ 0x01]) + row.body[i + 1:]
        return row._replace(body=body)
    if how == "digest":
        return row._replace(digest=bytes(32 - 1) + bytes([salt % 256]))
    if how == "kind":
        return row._replace(kind=[Kind.MESSAGE, Kind.VALUE, Kind.NODE, 99][salt % 4])
    if how == "refs":
        return row._replace(refs=(bytes(32),))
    if how == "junk":
        junk = b"\xc1" * (1 + salt % 3)  # 0xc1 is never valid msgpack
        return row._replace(body=junk, digest=digest_of(row.kind, junk, row.refs))
    return row


def _outcome(call: Callable[[], Any]) -> Any:
    """A call's result, or the class and text of the error it raised."""
    try:
        return call()
    except IntegrityError as e:
        return ("IntegrityError", str(e))


def _same_assets(left: Any, right: Any) -> bool:
    if isinstance(left, tuple) or isinstance(right, tuple):
        return bool(left == right)
    return [(type(a), a, a.body, a.digest) for a in left] == [
        (type(a), a, a.body, a.digest) for a in right]


@given(st.lists(st.tuples(leaves, damage, st.integers(0, 1000)), max_size=12),
       st.booleans())
def test_a_batch_of_leaves_loads_as_each_row_loads(
        drawn: list[tuple[Any, str, int]], one_kind: bool) -> None:
    rows = [_damaged(stored(asset), how, salt) for asset, how, salt in drawn]
    if one_kind and rows:  # load_rows' fast path: leaves of one kind only
        rows = [r for r in rows if r.kind == rows[0].kind]
    batched = _outcome(lambda: load_rows(rows))
    one_by_one = _outcome(lambda: [load_row(r) for r in rows])
    assert _same_assets(batched, one_by_one)


@given(st.lists(st.lists(st.binary(max_size=30), max_size=4), min_size=1, max_size=8),
       st.sampled_from([Kind.VALUE_NODE, Kind.ITEM_NODE]), damage, st.integers(0, 1000),
       st.integers(0, 7))
def test_a_batch_of_nodes_counts_as_each_node_counts(
        steps: list[list[bytes]], kind: Kind, how: str, salt: int, which: int) -> None:
    node = EMPTY_VALUES if kind == Kind.VALUE_NODE else EMPTY_ITEMS
    rows = [stored(node)]
    for step in steps:
        elements = ([Value(type="b", data=d) for d in step] if kind == Kind.VALUE_NODE
                    else [Item.of(d.hex()) for d in step])
        node = node.extend(elements)
        rows.append(stored(node))
    i = which % len(rows)
    rows[i] = _damaged(rows[i], how, salt)
    batched = _outcome(lambda: nodes_counters(rows))
    pairs = _outcome(lambda: [node_counters(r) for r in rows])
    one_by_one = pairs if isinstance(pairs, tuple) else (
        [n for n, _ in pairs], [s for _, s in pairs])
    assert batched == one_by_one


@given(st.lists(st.tuples(st.binary(max_size=40),
                          st.lists(st.binary(min_size=32, max_size=32), max_size=70)),
                max_size=10),
       st.sampled_from([int(k) for k in Kind]))
def test_digests_of_a_batch_are_the_digest_of_each_row(
        drawn: list[tuple[bytes, list[bytes]]], kind: int) -> None:
    bodies = [body for body, _ in drawn]
    refs: Sequence[Sequence[bytes]] = [tuple(r) for _, r in drawn]

    def each() -> Any:
        try:
            return [digest_of(kind, b, r) for b, r in zip(bodies, refs, strict=True)]
        except ValueError:
            return ValueError

    def batch() -> Any:
        try:
            return digests_of(kind, bodies, refs)
        except ValueError:
            return ValueError

    assert batch() == each()
    assert digests_of(kind, bodies) == [digest_of(kind, b) for b in bodies]


@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(1, 9),
                          st.lists(st.binary(min_size=32, max_size=32), max_size=70),
                          st.binary(max_size=20), st.integers(0, 3)), max_size=10),
       st.integers(0, 10))
def test_tagged_rows_split_as_untagged_rows_read(rows: list[tuple[Any, ...]],
                                                 split: int) -> None:
    raw = [(d, k, b"".join(f), b, c) for d, k, f, b, c in rows]
    tagged = [(0 if i < split else 1, *r) for i, r in enumerate(raw)]
    first, second = stored_tagged_rows(tagged)
    assert first == stored_rows(raw[:split])
    assert second == stored_rows(raw[split:])
    assert [r.refs for r in first + second] == [tuple(f) for _, _, f, _, _ in rows]


def test_a_compressed_batch_loads_as_each_row_loads() -> None:
    messages = [Message(role="user", content=f"hello {i} " * 40) for i in range(6)]
    rows = [stored(m) for m in messages]
    packed = [r._replace(codec=c, body=b) if i % 2 else r
              for i, r in enumerate(rows)
              for c, b in [codec.encode(r.kind, r.refs, r.body, None)]]
    assert {r.codec for r in packed} == {codec.RAW, codec.ZSTD}
    assert load_rows(packed) == [load_row(r) for r in packed] == messages
