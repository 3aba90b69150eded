"""Crafted bundles: files with valid framing, checksum and
per-record digests whose *content* is what must be refused. Each is refused by
``verify_bundle`` and by ``import_bundle`` on both backends, with a BundleError naming the
problem, and the import writes nothing."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import immagent
from immagent import Message, Store
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, SystemPrompt
from immagent.audit.bundle import verify_bundle
from tests import crafted
from tests.conftest import count_rows
from tests.test_verify import assert_clean

PROMPT = SystemPrompt(text="You are crafted.")


def nothing_written(dsn: str) -> None:
    assert count_rows(dsn, "immagent_states") == 0
    assert count_rows(dsn, "immagent_assets") == 0


async def refused(store: Store, dsn: str, path: Path, match: str) -> None:
    """Refused offline and on import, naming ``match``; the store is left empty."""
    with pytest.raises(immagent.BundleError, match=match):
        verify_bundle(path)
    with pytest.raises(immagent.BundleError, match=match):
        await asyncio.wait_for(store.import_bundle(path), 30)
    nothing_written(dsn)


async def test_a_crafted_bundle_that_breaks_no_rule_imports(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    # The helper makes acceptable bundles: the refusals below are for the reason tested.
    path, record = crafted.valid_agent(tmp_path / "ok.bundle", metadata={"v": 1})
    assert verify_bundle(path).head == record.id
    agent = await store.import_bundle(path)
    assert agent.digest == record.digest and agent.metadata == {"v": 1}
    assert [m.content for m in await agent.get_messages()] == ["hi"]
    assert_clean(await store.verify())


# -- every reference has one required kind -----------------------------------------------


def _prompt_as_conversation(tmp: Path) -> Path:
    return crafted.write(tmp, [crafted.agent_state(PROMPT.digest, PROMPT.digest)], [PROMPT])


def _message_as_prompt(tmp: Path) -> Path:
    assets, head = crafted.conversation("hi")
    message = assets[1]
    return crafted.write(tmp, [crafted.agent_state(message.digest, head.digest)], assets)


def _node_lists_the_prompt(tmp: Path) -> Path:
    # The agent's own reference to the prompt (a system prompt) must not be the only
    # expectation recorded for that digest: the node's claim that it is a message is
    # checked too.
    node = ConversationNode(parent=EMPTY_CONVERSATION.digest, messages=(PROMPT.digest,),
                            length=1, size=len(PROMPT.body))
    return crafted.write(tmp, [crafted.agent_state(PROMPT.digest, node.digest)],
                         [PROMPT, EMPTY_CONVERSATION, node])


def _node_lists_a_node(tmp: Path) -> Path:
    node = ConversationNode(parent=EMPTY_CONVERSATION.digest,
                            messages=(EMPTY_CONVERSATION.digest,), length=1,
                            size=len(EMPTY_CONVERSATION.body))
    return crafted.write(tmp, [crafted.agent_state(PROMPT.digest, node.digest)],
                         [PROMPT, EMPTY_CONVERSATION, node])


@pytest.mark.parametrize("build", [_prompt_as_conversation, _message_as_prompt,
                                   _node_lists_the_prompt, _node_lists_a_node])
async def test_a_reference_to_an_asset_of_the_wrong_kind_is_refused(
        store: Store, store_dsn: str, tmp_path: Path, build: Callable[[Path], Path]) -> None:
    await refused(store, store_dsn, build(tmp_path / "kind.bundle"),
                  r"(is a|referenced as a) (system_prompt|message|node)")


# -- parent cycles -----------------------------------------------------------------------


async def test_a_state_that_is_its_own_parent_is_refused(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    assets, head = crafted.conversation("hi")
    me = uuid.uuid4()
    record = crafted.agent_state(PROMPT.digest, head.digest, id=me, parent_id=me)
    path = crafted.write(tmp_path / "self.bundle", [record], [PROMPT, *assets])
    await refused(store, store_dsn, path, "cycle")


async def test_a_two_state_cycle_is_refused(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    assets, head = crafted.conversation("hi")
    a, b = uuid.uuid4(), uuid.uuid4()
    states = [crafted.agent_state(PROMPT.digest, head.digest, id=a, parent_id=b),
              crafted.agent_state(PROMPT.digest, head.digest, id=b, parent_id=a)]
    path = crafted.write(tmp_path / "two.bundle", states, [PROMPT, *assets])
    await refused(store, store_dsn, path, "cycle")


async def test_two_bundles_valid_alone_cannot_close_a_cycle(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    # x's parent is y (not in its bundle, as after a deleted ancestor); y's bundle names x
    # as parent. Each is a sound bundle; imported one after the other they would make every
    # lineage walk go round for ever.
    assets, head = crafted.conversation("hi")
    x, y = uuid.uuid4(), uuid.uuid4()
    first = crafted.write(tmp_path / "x.bundle", [
        crafted.agent_state(PROMPT.digest, head.digest, id=x, parent_id=y)], [PROMPT, *assets])
    second = crafted.write(tmp_path / "y.bundle", [
        crafted.agent_state(PROMPT.digest, head.digest, id=y, parent_id=x)], [PROMPT, *assets])
    verify_bundle(first)
    verify_bundle(second)  # offline, alone, it is fine
    await asyncio.wait_for(store.import_bundle(first), 30)
    with pytest.raises(immagent.BundleError, match="close a parent cycle"):
        await asyncio.wait_for(store.import_bundle(second), 30)
    assert count_rows(store_dsn, "immagent_states") == 1
    lineage = await asyncio.wait_for((await store.load_agent(x)).get_lineage(), 30)
    assert [a.id for a in lineage] == [x]
    assert_clean(await store.verify())


# -- deep nesting in untrusted msgpack --------------------------------------------------


@pytest.mark.parametrize(("depth", "match"), [(1_000_000, "malformed header"),
                                              (60_000, "nested too deeply")])
async def test_a_deeply_nested_header_is_a_bundle_error(
        store: Store, store_dsn: str, tmp_path: Path, depth: int, match: str) -> None:
    # A million deep is refused by size (a header is a few dozen bytes); 60,000 deep fits
    # the size bound and is refused by the nesting bound.
    path = crafted.write(tmp_path / "deep.bundle", [], [], header=crafted.deeply_nested(depth))
    await refused(store, store_dsn, path, match)


async def test_metadata_nested_200k_deep_is_a_bundle_error(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    assets, head = crafted.conversation("hi")
    record = crafted.agent_state(PROMPT.digest, head.digest, metadata={"x": "@DEEP@"})
    frame = crafted.agent_frame(record, "@DEEP@", crafted.deeply_nested(200_000))
    path = crafted.write(tmp_path / "deep.bundle", [], [PROMPT, *assets], raw=[frame],
                         head=record.id)
    await refused(store, store_dsn, path, "nested too deeply")


def test_the_cli_reports_deep_nesting_as_a_bundle_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from immagent.cli.app import main

    path = crafted.write(tmp_path / "deep.bundle", [], [], header=crafted.deeply_nested(60_000))
    assert main(["verify-bundle", str(path)]) == 1
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "internal error" not in err


# -- imported records meet the rules create_agent and append enforce -------------------

_BAD_STATES: dict[str, dict[str, Any]] = {
    "empty name": {"name": ""},
    "blank name": {"name": "   "},
    "NUL in name": {"name": "a\x00b"},
    "10 MB name": {"name": "n" * 10_000_000},
    "escape in name": {"name": "\x1b]0;owned\x07\x1b[2J"},
    "empty model": {"model": ""},
    "NUL in model": {"model": "m\x00"},
    "NaN in config": {"model_config": {"temperature": math.nan}},
    "inf in config": {"model_config": {"top_p": math.inf}},
    "reserved key": {"model_config": {"stream": True}},
    "credential key": {"model_config": {"extra_body": {"API_KEY": "sk-live-1234"}}},
    "credential header": {"model_config": {"provider_specific_header": {
        "extra_headers": {"Authorization": "Bearer abc"}}}},
}
_nested: Any = "leaf"
for _ in range(100):
    _nested = [_nested]
_BAD_STATES["metadata 100 deep"] = {"metadata": {"m": _nested}}


@pytest.mark.parametrize("case", sorted(_BAD_STATES))
async def test_an_imported_state_meets_the_rules_of_create_agent(
        store: Store, store_dsn: str, tmp_path: Path, case: str) -> None:
    fields = _BAD_STATES[case]
    # The same fields are refused by create_agent: one rule for both paths.
    with pytest.raises(immagent.ValidationError):
        await store.create_agent(fields.get("name", "ok"), PROMPT.text,
                                 fields.get("model", "immagent/echo"),
                                 model_config=fields.get("model_config"),
                                 metadata=fields.get("metadata"))
    path, _ = crafted.valid_agent(tmp_path / "bad.bundle", **fields)
    await refused(store, store_dsn, path, "breaks a rule the API enforces")


def _message(**fields: Any) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        message = Message(role="assistant", content="a", **fields)
        head = EMPTY_CONVERSATION.extend([message])
        return crafted.write(tmp, [crafted.agent_state(PROMPT.digest, head.digest)],
                             [PROMPT, EMPTY_CONVERSATION, message, head])
    return build


def _counters(length: int, size: int | None = None) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        message = Message(role="user", content="hi")
        right = EMPTY_CONVERSATION.extend([message])
        head = ConversationNode(parent=right.parent, messages=right.messages, length=length,
                                size=right.size if size is None else size)
        return crafted.write(tmp, [crafted.agent_state(PROMPT.digest, head.digest)],
                             [PROMPT, EMPTY_CONVERSATION, message, head])
    return build


def _unreferenced(tmp: Path) -> Path:
    _, record = crafted.valid_agent(tmp)
    assets, _ = crafted.conversation("hi")
    extra = Message(role="user", content="nobody points at me")
    return crafted.write(tmp, [record], [PROMPT, *assets, extra])


_BAD_ASSETS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "credential in call_config": (_message(call_config={"Api_Key": "sk-live-1234"}),
                                  "credential"),
    "negative tokens": (_message(input_tokens=-1), "input_tokens"),
    "node length -5": (_counters(-5), "claims -5 elements"),
    "node length 1e9": (_counters(10**9), "claims 1000000000 elements"),
    "node size wrong": (_counters(1, 3), r"claims 1 elements \(3 bytes\)"),
    "unreferenced asset": (_unreferenced, "not referenced by any state or asset"),
}


@pytest.mark.parametrize("case", sorted(_BAD_ASSETS))
async def test_an_imported_asset_meets_the_rules_of_append(
        store: Store, store_dsn: str, tmp_path: Path, case: str) -> None:
    build, match = _BAD_ASSETS[case]
    await refused(store, store_dsn, build(tmp_path / "bad.bundle"), match)


async def test_a_counter_the_listing_would_show_is_checked_on_import_not_only_on_read(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    # Otherwise the bundle would import and `immagent agents` would list -5 messages.
    await refused(store, store_dsn, _counters(-5)(tmp_path / "n.bundle"), "claims -5")
    assert await store.count_agents() == 0
