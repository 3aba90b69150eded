"""Content addressing: canonical bytes, digests and derived ids (pure core, no database)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from immagent import accumulator
from immagent.assets import (
    EMPTY_CONVERSATION,
    ConversationNode,
    Kind,
    Message,
    SystemPrompt,
    ToolCall,
    decode_asset,
    digest_of,
)
from immagent.exceptions import ValidationError
from immagent.ids import uuid7, uuid_from_digest
from immagent.records import state_digest
from immagent.validate import check_json_mapping, check_text

text = st.text(max_size=200)
roles = st.sampled_from(["user", "assistant", "tool"])
tool_calls = st.lists(
    st.builds(ToolCall, id=st.text(max_size=8), name=st.text(min_size=1, max_size=8),
              arguments=st.text(max_size=20)),
    max_size=3,
).map(lambda calls: tuple(calls) or None)
messages = st.builds(
    Message, role=roles, content=st.none() | text, tool_calls=tool_calls,
    tool_call_id=st.none() | st.text(max_size=8),
    input_tokens=st.none() | st.integers(0, 10**6),
    output_tokens=st.none() | st.integers(0, 10**6),
)


@given(messages)
def test_equal_content_equal_digest(m: Message) -> None:
    twin = Message(**{f: getattr(m, f) for f in m.__struct_fields__})
    assert twin is not m
    assert twin.digest == m.digest and twin.id == m.id
    assert decode_asset(Kind.MESSAGE, m.body) == m


@given(messages, messages)
def test_different_content_different_digest(a: Message, b: Message) -> None:
    assert (a == b) == (a.digest == b.digest)


@given(text, text)
def test_any_change_changes_digest(a: str, b: str) -> None:
    assert (SystemPrompt(text=a).digest == SystemPrompt(text=b).digest) == (a == b)


def test_kind_is_hashed() -> None:
    body = SystemPrompt(text="x").body
    assert digest_of(Kind.SYSTEM_PROMPT, body) != digest_of(Kind.MESSAGE, body)


def test_digest_is_stable_across_processes() -> None:
    m = Message(role="assistant", content="héllo", tool_calls=(ToolCall("1", "add", "{}"),),
                input_tokens=3, call_config={"b": 1, "a": [1.5, None]})
    code = (
        "from immagent.assets import Message, ToolCall;"
        "m = Message(role='assistant', content='h\\u00e9llo',"
        " tool_calls=(ToolCall('1', 'add', '{}'),), input_tokens=3,"
        " call_config={'a': [1.5, None], 'b': 1});"
        "print(m.digest.hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == m.digest.hex()


def test_known_digest_pins_the_encoding() -> None:
    # A golden value: if this changes, every stored digest would change. Bump deliberately.
    assert SystemPrompt(text="You are helpful.").body == b"\x81\xa1t\xb0You are helpful."
    # Struct fields encode in declaration order: never reorder them, append new ones.
    assert Message(role="user", content="hi").body == b"\x82\xa1r\xa4user\xa1c\xa2hi"
    assert SystemPrompt(text="You are helpful.").digest.hex() == (
        "57c047eccb0ab7414ddfb501fedb25a7429542334d58d924410d27431b7558c3")
    assert digest_of(Kind.SYSTEM_PROMPT, b"") == digest_of(Kind.SYSTEM_PROMPT, b"")
    assert EMPTY_CONVERSATION.body == b"\x80"


def test_text_is_not_normalised() -> None:
    nfc, nfd = "\u00e9", "e\u0301"
    assert SystemPrompt(text=nfc).digest != SystemPrompt(text=nfd).digest


def test_conversation_chain_pins_history() -> None:
    a, b = Message(role="user", content="a"), Message(role="user", content="b")
    one = EMPTY_CONVERSATION.extend([a]).extend([b])
    other = EMPTY_CONVERSATION.extend([b]).extend([a])
    assert one.digest != other.digest
    assert one.length == 2 and one.size == len(a.body) + len(b.body)
    assert one.refs() == (one.parent, b.digest)


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(st.dictionaries(st.text("abcxyz", max_size=5), finite))
def test_config_numbers_are_canonical(config: dict[str, float]) -> None:
    as_ints = {k: int(v) if v.is_integer() and abs(v) < 2**53 else v for k, v in config.items()}
    sp, conv = b"\x01" * 32, b"\x02" * 32
    assert state_digest("n", "m", sp, conv, check_json_mapping("c", config), {}) == \
        state_digest("n", "m", sp, conv, check_json_mapping("c", as_ints), {})


def test_state_digest_covers_every_field() -> None:
    base: dict[str, Any] = dict(name="n", model="m", system_prompt=b"\x01" * 32,
                                conversation=b"\x02" * 32, model_config={"t": 1},
                                metadata={"k": "v"})
    digest = state_digest(**base)
    for field, other in [("name", "n2"), ("model", "m2"), ("system_prompt", b"\x03" * 32),
                         ("conversation", b"\x04" * 32), ("model_config", {"t": 2}),
                         ("metadata", {"k": "w"})]:
        assert state_digest(**{**base, field: other}) != digest, field


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b", 3, None, "\ud800"])
def test_check_text_rejects(bad: object) -> None:
    with pytest.raises(ValidationError) as err:
        check_text("name", bad)
    assert err.value.field == "name"


@pytest.mark.parametrize("bad", [{"t": float("nan")}, {1: 2}, {"x": object()}, [1],
                                 {"t": float("inf")}, {"s": "a\x00"}])
def test_check_json_mapping_rejects(bad: object) -> None:
    with pytest.raises(ValidationError) as err:
        check_json_mapping("model_config", bad)
    assert err.value.field.startswith("model_config")


def test_uuid7_is_time_ordered_and_versioned() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids)


@given(st.binary(min_size=32, max_size=32))
def test_uuid_from_digest(d: bytes) -> None:
    u = uuid_from_digest(d)
    assert u.version == 8 and u == uuid_from_digest(d)


def test_a_node_stores_its_links_once_and_hashes_them() -> None:
    m = Message(role="user", content="hi")
    node = EMPTY_CONVERSATION.extend([m])
    assert node.refs() == (EMPTY_CONVERSATION.digest, m.digest)
    # Links are not in the body: its counters and its accumulator root are (one leaf: the
    # root over that leaf alone).
    assert m.digest not in node.body and len(node.body) < 16 + 34
    assert node.acc == accumulator.root([m.digest], 1)
    assert decode_asset(Kind.NODE, node.body, node.refs()) == node
    assert digest_of(Kind.NODE, node.body, node.refs()) == node.digest
    # Any change to the links (a ref swapped, dropped or moved) is a different digest.
    other = Message(role="user", content="ho").digest
    for refs in [(EMPTY_CONVERSATION.digest, other), (EMPTY_CONVERSATION.digest,),
                 (m.digest, EMPTY_CONVERSATION.digest)]:
        assert digest_of(Kind.NODE, node.body, refs) != node.digest
    # Leaves have no refs, but a message's one ref: the tools its model call was offered.
    prompt = SystemPrompt(text="p")
    with pytest.raises(ValueError):
        digest_of(Kind.SYSTEM_PROMPT, prompt.body, (other,))
    with pytest.raises(ValueError):
        decode_asset(Kind.SYSTEM_PROMPT, prompt.body, (other,))
    with pytest.raises(ValueError):
        decode_asset(Kind.MESSAGE, m.body, (other, other))
    assert digest_of(Kind.MESSAGE, m.body, (other,)) != m.digest
    with pytest.raises(ValueError):
        ConversationNode(parent=None, messages=(m.digest,))
