"""Inclusion proofs (issue 24, item 2): a proof that one element is in a state, checked
offline against the state's digest, for agents, sessions and checkpoints, on PostgreSQL and
SQLite; crafted documents (wrong state, an element not there, a tampered path, truncated,
oversized, malformed) refused with a ProofError naming the problem."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

import immagent
from immagent import Message, Store, verify_proof
from immagent.assets import EMPTY_CONVERSATION, ConversationNode, Kind
from immagent.audit import proofs
from immagent.integrations.openai_agents import ImmAgentSession
from immagent.records import AgentRecord, state_digest
from tests.conftest import turn
from tests.test_migration import legacy_extend


async def grow(store: Store, turns: int, name: str = "proved") -> Any:
    agent = await store.create_agent(name, "You are proved.", "m")
    for i in range(turns):
        agent = await store.append(agent, turn(i))
    return agent


def tamper(document: bytes, change: Any) -> bytes:
    """The document with ``change`` applied to its decoded form, encoded again."""
    proof = msgspec.msgpack.decode(document, type=proofs.Proof)
    return msgspec.msgpack.encode(change(proof))


async def test_every_message_of_a_state_is_proved_against_its_digest(store: Store) -> None:
    agent = await grow(store, 20)
    messages = await agent.get_messages()
    for index in (0, 1, 17, 38, 39):
        document = await store.prove(agent, element=index)
        result = verify_proof(document, agent.digest)
        assert (result.index, result.element, result.digest) == (
            index, messages[index], messages[index].digest)
        assert result.state_digest == agent.digest and result.length == 40
    # By digest (its first occurrence), and without the body: the digest alone is shown.
    document = await store.prove(agent.id, element=messages[5].digest, include_body=False)
    result = verify_proof(document)
    assert result.index == 5 and result.element is None
    assert result.state_digest == agent.digest
    # An earlier state of the lineage proves its own (shorter) history.
    parent = await store.load_agent(agent.parent_id)
    assert verify_proof(await store.prove(parent, element=0), parent.digest).length == 38


async def test_a_proof_is_small_and_names_nothing_else() -> None:
    # 10,000 turns: O(log n) digests, under 1 KB without the element's body.
    node = EMPTY_CONVERSATION
    leaves: list[bytes] = []
    for i in range(10_000):
        added = [Message.user(f"q{i}"), Message.assistant(f"a{i}")]
        node = node.extend(added)
        leaves += [m.digest for m in added]
    record = AgentRecord(id=uuid.uuid4(), parent_id=None, created_at=datetime.now(UTC),
                         name="long", model="m", system_prompt=b"\x01" * 32,
                         conversation=node.digest, model_config={}, metadata={},
                         digest=state_digest("long", "m", b"\x01" * 32, node.digest, {}, {}))
    assert node.parent is not None
    proof = proofs.build(record.to_row(), 1, int(Kind.NODE), node.parent, node.messages,
                         node.length, node.size, node.span, leaves, 7_777, None)
    document = proof.encode()
    assert len(document) <= 1024, len(document)
    assert verify_proof(document, record.digest).index == 7_777
    assert b"q100" not in document  # no other message is in it


async def test_crafted_proofs_are_refused_naming_the_problem(store: Store) -> None:
    agent = await grow(store, 8)
    other = await grow(store, 8, "other")
    document = await store.prove(agent, element=3)
    cases: dict[str, bytes] = {
        # The state it leads to is another than the one expected.
        "wrong_state": document,
        # A sibling digest of the path changed: the root, hence the state, is another.
        "not_in_state": tamper(document, lambda p: msgspec.structs.replace(
            p, path=[bytes(32), *p.path[1:]])),
        # The element claimed at that position is another message (body and digest both).
        "tampered": tamper(document, lambda p: msgspec.structs.replace(
            p, leaf=msgspec.structs.replace(p.leaf, body=turn(9)[0].body))),
        "truncated": document[:-7],
        "oversized": document + b"\x00" * proofs.MAX_BYTES,
        "malformed": tamper(document, lambda p: msgspec.structs.replace(p, version=99)),
    }
    for problem, crafted in cases.items():
        with pytest.raises(immagent.ProofError) as refused:
            verify_proof(crafted, other.digest if problem == "wrong_state" else agent.digest)
        assert refused.value.problem == problem, (problem, str(refused.value))
    moved = tamper(document, lambda p: msgspec.structs.replace(
        p, leaf=msgspec.structs.replace(p.leaf, index=4)))  # another position: no
    with pytest.raises(immagent.ProofError) as refused:
        verify_proof(moved, agent.digest)
    assert refused.value.problem == "not_in_state"
    for junk in (b"", b"\xc1", msgspec.msgpack.encode({"format": "immagent-proof"}),
                 msgspec.msgpack.encode(["x"] * 8)):
        with pytest.raises(immagent.ProofError):
            verify_proof(junk)
    with pytest.raises(immagent.ProofError):
        verify_proof("not bytes")  # type: ignore[arg-type]


async def test_proving_what_is_not_there_is_refused(store: Store) -> None:
    agent = await grow(store, 3)
    for element in (6, -1, turn(99)[0].digest):
        with pytest.raises(immagent.ValidationError) as bad:
            await store.prove(agent, element=element)
        assert bad.value.field == "element"
    with pytest.raises(immagent.ValidationError):
        await store.prove(uuid.uuid4(), element=0)
    with pytest.raises(immagent.ValidationError) as bad:
        await store.prove(agent, element=0, ref=0)  # the prompt is no chain
    assert bad.value.field == "ref"


async def test_a_state_written_before_schema_3_cannot_be_proved_until_it_grows(
        store: Store) -> None:
    messages = turn(1)
    legacy = legacy_extend(EMPTY_CONVERSATION, messages)
    prompt = immagent.SystemPrompt(text="old")
    record = AgentRecord(id=uuid.uuid4(), parent_id=None, created_at=datetime.now(UTC),
                         name="old", model="m", system_prompt=prompt.digest,
                         conversation=legacy.digest, model_config={}, metadata={},
                         digest=state_digest("old", "m", prompt.digest, legacy.digest, {}, {}))
    # What a bundle of a version-2 store brings: nodes without accumulator roots.
    assets: list[immagent.assets.Asset] = [prompt, EMPTY_CONVERSATION, *messages, legacy]
    await store._write([immagent.rows.stored(a) for a in assets],
                       [record.to_row()], legacy=True)
    agent = await store.load_agent(record.id)
    with pytest.raises(immagent.ValidationError, match="before schema 3"):
        await store.prove(agent, element=0)
    grown = await store.append(agent, turn(2))
    (head,) = await store.get_assets([grown.conversation_digest], ConversationNode)
    assert head.acc is not None  # the first node written since commits to the whole chain
    assert verify_proof(await store.prove(grown, element=1), grown.digest).element == \
        messages[1]


async def test_sessions_and_checkpoints_are_proved_too(store: Store) -> None:
    session = ImmAgentSession("proved", store)
    items: list[Any] = [{"role": "user", "content": f"item {i}"} for i in range(6)]
    await session.add_items(items[:3])
    await session.add_items(items[3:])
    state = await session.current_state()
    assert state is not None
    result = verify_proof(await store.prove(state.id, element=4), state.digest)
    assert isinstance(result.element, immagent.assets.Item)
    assert result.element.value == items[4]

    from langchain_core.messages import HumanMessage

    from immagent.checkpoints import checkpoint_state_id
    from immagent.integrations.langgraph import ImmAgentSaver
    from tests.test_langgraph_graph import build, config

    graph = build(ImmAgentSaver(store))
    await graph.ainvoke({"messages": [HumanMessage(content="prove me")]}, config("t"))
    snapshot = await graph.aget_state(config("t"))
    checkpoint_id = uuid.UUID(snapshot.config["configurable"]["checkpoint_id"])
    rows = await store.scan_states(int(Kind.CHECKPOINT))
    row = next(r for r in rows if r.id == checkpoint_state_id("t", "", str(checkpoint_id)))
    result = verify_proof(await store.prove(row.id, element=0), row.digest)
    assert isinstance(result.element, immagent.assets.Value)
    assert b"prove me" in result.element.data


async def test_a_proof_carries_the_states_attestations_for_a_trust_policy(
        store: Store, tmp_path: Any) -> None:
    from immagent.attestations import Signed
    from immagent.audit.keys import generate_key
    from immagent.audit.trust import TrustPolicy

    alice, bob, carol = (generate_key(tmp_path / n) for n in ("alice", "bob", "carol"))
    agent = await grow(store, 4)
    other = await grow(store, 4, "other")
    await store.attest(agent.id, alice, note="reviewed")
    await store.attest(agent.id, bob)
    await store.attest(other.id, carol)
    document = await store.prove(agent, element=2)
    result = verify_proof(document, agent.digest,
                          trust=TrustPolicy([alice.public, bob.public], 2))
    assert result.trusted_by == tuple(sorted((alice.public.id, bob.public.id)))
    assert [s.note for s in result.signers] == ["reviewed", ""]
    assert all(s.verified and s.subjects == (str(agent.id),) for s in result.signers)
    # Too few trusted signers: intact, untrusted (the CLI's exit 3), naming who signed.
    with pytest.raises(immagent.UntrustedError, match=alice.public.id):
        verify_proof(document, trust=TrustPolicy([carol.public]))
    bare = await store.prove(agent, element=2, attested=False)
    assert len(bare) < len(document) and verify_proof(bare).signers == ()
    with pytest.raises(immagent.UntrustedError, match="carries no attestation"):
        verify_proof(bare, trust=TrustPolicy([alice.public]))
    # A signature altered, or one about another state swapped in: tampered, policy or not.
    def forged(p: proofs.Proof) -> proofs.Proof:
        signed = msgspec.msgpack.decode(p.signatures[0], type=Signed)
        flipped = signed.signature[:-1] + bytes([signed.signature[-1] ^ 1])
        bad = msgspec.structs.replace(signed, signature=flipped)
        return msgspec.structs.replace(p, signatures=[msgspec.msgpack.encode(bad),
                                                      *p.signatures[1:]])

    (carols,) = await store.attestations(other.id)
    for crafted, says in ((tamper(document, forged), "does not verify"),
                          (tamper(document, lambda p: msgspec.structs.replace(
                              p, signatures=[*p.signatures, carols.body])), "about state")):
        for trust in (None, TrustPolicy([carol.public])):
            with pytest.raises(immagent.ProofError, match=says) as refused:
                verify_proof(crafted, trust=trust)
            assert refused.value.problem == "tampered"
    junk = tamper(document, lambda p: msgspec.structs.replace(p, signatures=[b"\x93"]))
    with pytest.raises(immagent.ProofError) as refused:
        verify_proof(junk)
    assert refused.value.problem == "malformed"
    many = tamper(document, lambda p: msgspec.structs.replace(
        p, signatures=p.signatures * proofs.MAX_SIGNATURES))
    with pytest.raises(immagent.ProofError) as refused:
        verify_proof(many)
    assert refused.value.problem == "oversized"


def test_one_proof_has_one_form() -> None:
    # A field past the last (msgspec would skip it) or bytes after the document: refused.
    node = EMPTY_CONVERSATION.extend(turn(0))
    record = AgentRecord(id=uuid.uuid4(), parent_id=None, created_at=datetime.now(UTC),
                         name="one", model="m", system_prompt=b"\x01" * 32,
                         conversation=node.digest, model_config={}, metadata={},
                         digest=state_digest("one", "m", b"\x01" * 32, node.digest, {}, {}))
    assert node.parent is not None
    proof = proofs.build(record.to_row(), 1, int(Kind.NODE), node.parent, node.messages,
                         node.length, node.size, node.span, list(node.messages), 0, None)
    document = proof.encode()
    assert verify_proof(document, record.digest).index == 0
    fields = msgspec.msgpack.decode(document)
    for crafted in (msgspec.msgpack.encode([*fields, [], "extra"]), document + b"\x00"):
        with pytest.raises(immagent.ProofError) as refused:
            verify_proof(crafted, record.digest)
        assert refused.value.problem == "malformed", refused.value
    with pytest.raises(immagent.ValidationError):
        verify_proof(document, b"short")
