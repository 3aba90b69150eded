"""Signed bundles, trust policies and attestations: who vouches for a state, proven offline.

Crafted inputs throughout: a wrong key, a signature over other heads, a valid signature on
a tampered bundle, truncated and oversized keys, signatures and statements, key files that
are symlinks or FIFOs, a private key where a public one belongs, and a missing extra."""

from __future__ import annotations

import asyncio
import builtins
import os
import stat
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from immagent import Store
from immagent.assets import Kind, encode
from immagent.attestations import (
    DOMAIN,
    MAX_STATEMENT,
    Signed,
    Statement,
    Subject,
    attestation_of,
    decode_signed,
    decode_statement,
)
from immagent.audit.bundle import verify_bundle
from immagent.audit.keys import (
    MAX_KEY_FILE,
    SigningKey,
    generate_key,
    load_public_key,
    load_signing_key,
    verify_signed,
)
from immagent.audit.trust import TrustPolicy
from immagent.exceptions import (
    AssetNotFoundError,
    BundleError,
    ExtraNotInstalledError,
    IntegrityError,
    UntrustedError,
    ValidationError,
)
from immagent.ids import uuid7
from immagent.offline import ECHO_MODEL
from immagent.records import StateRow, stream_digest
from tests.conftest import raw_sql, turn
from tests.crafted import frames, reframe

_enc = msgspec.msgpack.Encoder()


@pytest.fixture
def alice(tmp_path: Path) -> SigningKey:
    return generate_key(tmp_path / "alice")


@pytest.fixture
def bob(tmp_path: Path) -> SigningKey:
    return generate_key(tmp_path / "bob")


def tag(payload: bytes) -> str:
    """What a bundle frame is ("state", "asset", "sig", "end"; "header" for the header)."""
    record = msgspec.msgpack.decode(payload)
    return str(record[0]) if isinstance(record, list) else "header"


def pub(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.pub"


async def lineage(store: Store, turns: int = 3, name: str = "signed") -> Any:
    agent = await store.create_agent(name, "You are signed.", ECHO_MODEL)
    for i in range(turns):
        agent = await store.append(agent, turn(i, name))
    return agent


# -- keys -----------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_for_its_owner_only_and_a_public_key(
        tmp_path: Path, alice: SigningKey) -> None:
    private, public = tmp_path / "alice", pub(tmp_path, "alice")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_signing_key(private).public == alice.public == load_public_key(public)
    assert "PRIVATE" not in repr(alice) and alice.public.id in repr(alice)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(alice)
    with pytest.raises(ValidationError, match="already exists"):
        generate_key(private)  # a key file is never overwritten
    assert load_signing_key(private).public == alice.public


def test_key_files_that_are_not_plain_files_are_refused(tmp_path: Path,
                                                        alice: SigningKey) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "alice")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in [(link, "symbolic link"), (fifo, "not a regular file"),
                        (tmp_path, "not a regular file"), (tmp_path / "none", "cannot read")]:
        with pytest.raises(ValidationError, match=match):
            load_signing_key(path)
        with pytest.raises(ValidationError, match=match):
            load_public_key(path)


def test_malformed_truncated_oversized_and_misplaced_keys_are_refused(
        tmp_path: Path, alice: SigningKey) -> None:
    private = (tmp_path / "alice").read_bytes()
    public = pub(tmp_path, "alice").read_bytes()

    def key_file(name: str, data: bytes, mode: int = 0o600) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    other = ec.generate_private_key(ec.SECP256R1())
    not_ed25519 = other.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    for name, data, match in [
            ("truncated", private[: len(private) // 2], "not a readable private key"),
            ("garbage", b"-----BEGIN PRIVATE KEY-----\nnot base64\n", "not a readable"),
            ("oversized", private + b"\n" * MAX_KEY_FILE, "too large"),
            ("public", public, "is a public key"),
            ("empty", b"", "not an unencrypted PEM private key"),
            ("ec", not_ed25519, "not an Ed25519 key")]:
        with pytest.raises(ValidationError, match=match):
            load_signing_key(key_file(name, data))
    with pytest.raises(ValidationError, match="read by others"):
        load_signing_key(key_file("loose", private, 0o644))
    ec_public = other.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data, match in [
            ("private.pub", private, "is a private key"),
            ("openssh.pub", b"-----BEGIN OPENSSH PRIVATE KEY-----\n", "is a private key"),
            ("cut.pub", public[:40], "not a readable public key"),
            ("big.pub", public + b" " * MAX_KEY_FILE, "too large"),
            ("text.pub", b"ssh-ed25519 AAAA", "not a PEM public key"),
            ("ec.pub", ec_public, "not an Ed25519 key")]:
        with pytest.raises(ValidationError, match=match):
            load_public_key(key_file(name, data, 0o644))


def test_a_statement_is_bounded_canonical_and_checked_before_use(alice: SigningKey) -> None:
    subject = Subject(uuid7(), int(Kind.AGENT_STATE), b"\x01" * 32)
    good = Statement(purpose="attestation", subjects=(subject,), note="ok")
    raw = good.encode()
    assert decode_statement(raw) == good
    for bad, match in [
            (b"\xc1", "malformed"),
            (b"\x00" * (MAX_STATEMENT + 1), "larger than"),
            (_enc.encode({"purpose": "attestation", "subjects": [], "extra": 1}), "malformed"),
            (_enc.encode({"purpose": "other", "subjects": []}), "malformed"),
            (encode(Statement(purpose="bundle", subjects=(Subject(subject.id, 4, b"x"),))),
             "malformed kind or digest"),
            (encode(Statement(purpose="bundle", subjects=(subject,) * 10_001)), "more than"),
            (encode(Statement(purpose="attestation", subjects=(), note="x" * 1001)),
             "note is longer"),
            # the same statement with its keys in another order: not the signed form
            (_enc.encode({"subjects": [[str(subject.id), 4, subject.digest]],
                          "purpose": "attestation", "note": "ok"}), "canonical")]:
        with pytest.raises(ValueError, match=match):
            decode_statement(bad)
    signed = alice.sign(good)
    assert verify_signed(signed)
    assert signed.statement != raw  # stamped with the time it was signed
    # The last signature byte flipped, never set (a signature ending in 0x00 once made the
    # "forgery" the original: a failure 1 run in 256).
    flipped = signed.signature[:-1] + bytes([signed.signature[-1] ^ 0x01])
    for forged in [Signed(signed.statement, signed.key, flipped),
                   Signed(signed.statement + b"\x00", signed.key, signed.signature),
                   Signed(signed.statement, b"\x02" * 32, signed.signature),
                   Signed(signed.statement, signed.key[:31], signed.signature)]:
        assert not verify_signed(forged)
    with pytest.raises(ValueError, match="64 bytes"):
        decode_signed(encode(Signed(signed.statement, signed.key, signed.signature[:63])))
    # Domain separation: the raw statement signed without the domain never verifies.
    assert not signed.statement.startswith(DOMAIN)


# -- signed bundles and trust ------------------------------------------------------------------


async def test_a_signed_bundle_verifies_under_a_trust_policy(
        store: Store, tmp_path: Path, alice: SigningKey, bob: SigningKey) -> None:
    agent = await lineage(store)
    path = tmp_path / "a.bundle"
    info = await store.export(agent, path, sign=[alice])
    assert info.version == 4 and [s.key_id for s in info.signers] == [alice.public.id]
    checked = verify_bundle(path)  # integrity alone, signatures checked where possible
    assert [s.verified for s in checked.signers] == [True]
    assert checked.heads == (agent.id,)
    trusted = verify_bundle(path, trust=TrustPolicy.from_files([pub(tmp_path, "alice")]))
    assert trusted.trusted_by == (alice.public.id,)
    with pytest.raises(UntrustedError, match="1 are needed"):
        verify_bundle(path, trust=TrustPolicy([bob.public]))
    with pytest.raises(UntrustedError, match="1 trusted key"):
        verify_bundle(path, trust=TrustPolicy([alice.public, bob.public], sigs_needed=2))
    both = await store.export(agent, tmp_path / "b.bundle", sign=[alice, bob])
    assert len(both.signers) == 2
    assert len(verify_bundle(both.path, trust=TrustPolicy([alice.public, bob.public], 2))
               .trusted_by) == 2
    unsigned = await store.export(agent, tmp_path / "c.bundle")
    with pytest.raises(UntrustedError, match="nobody"):
        verify_bundle(unsigned.path, trust=TrustPolicy([alice.public]))
    for needed in (0, 3, True):
        with pytest.raises(ValidationError, match="sigs_needed"):
            TrustPolicy([alice.public, bob.public], sigs_needed=needed)
    # The signature covers the states' ids and lineage: it survives an import unchanged.
    assert (await store.import_bundle(path)).id == agent.id


async def test_a_signature_by_another_key_or_over_other_heads_never_verifies(
        store: Store, tmp_path: Path, alice: SigningKey, bob: SigningKey) -> None:
    one, two = await lineage(store, name="one"), await lineage(store, name="two")
    a = await store.export(one, tmp_path / "one.bundle", sign=[alice])
    b = await store.export(two, tmp_path / "two.bundle", sign=[bob])
    sig_a = frames(Path(a.path))[-2]
    sig_b = frames(Path(b.path))[-2]
    # Bob's signature record moved onto Alice's bundle: over other heads.
    moved = reframe(tmp_path / "moved.bundle", [*frames(Path(a.path))[:-2], sig_b,
                                                 frames(Path(a.path))[-1]])
    with pytest.raises(BundleError, match="over other heads"):
        verify_bundle(moved)
    # Alice's statement with Bob's key in the record: the signature is not Bob's.
    tag, statement, _, signature = msgspec.msgpack.decode(sig_a)
    wrong_key = _enc.encode([tag, statement, bob.public.raw, signature])
    swapped = reframe(tmp_path / "swapped.bundle", [*frames(Path(a.path))[:-2], wrong_key,
                                                    frames(Path(a.path))[-1]])
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(swapped)
    # Truncated and oversized signature records.
    for record, match in [(_enc.encode([tag, statement, alice.public.raw, signature[:10]]),
                           "64 bytes"),
                          (_enc.encode([tag, statement, alice.public.raw[:5], signature]),
                           "32 bytes"),
                          (_enc.encode([tag, b"\x00" * (MAX_STATEMENT + 1), alice.public.raw,
                                        signature]), "larger than")]:
        cut = reframe(tmp_path / "cut.bundle", [*frames(Path(a.path))[:-2], record,
                                                frames(Path(a.path))[-1]])
        with pytest.raises(BundleError, match=match):
            verify_bundle(cut)


async def test_a_valid_signature_on_a_tampered_bundle_is_refused(
        store: Store, tmp_path: Path, alice: SigningKey) -> None:
    agent = await lineage(store)
    info = await store.export(agent, tmp_path / "t.bundle", sign=[alice])
    parts = frames(Path(info.path))
    # A state's timestamp changed (no content digest covers it) and the checksum redone:
    # every record checks out, only the signature knows.
    record = msgspec.msgpack.decode(parts[1])
    record[8] = record[8] + timedelta(seconds=1)
    altered = [parts[0], _enc.encode(record), *parts[2:]]
    with pytest.raises(BundleError, match="altered after it was signed"):
        verify_bundle(reframe(tmp_path / "tampered.bundle", altered))
    # Without the signature the forged file passes: the signature is what refuses it.
    verify_bundle(reframe(tmp_path / "forged.bundle", [*altered[:-2], altered[-1]]))


async def test_a_bundle_cut_short_reordered_or_missing_a_state_is_refused(
        store: Store, tmp_path: Path, alice: SigningKey) -> None:
    agent = await lineage(store, turns=3)
    for signed in (False, True):
        info = await store.export(agent, tmp_path / f"x{signed}.bundle",
                                  sign=[alice] if signed else [])
        data = await asyncio.to_thread(Path(info.path).read_bytes)
        parts = frames(Path(info.path))
        states = [i for i, p in enumerate(parts) if tag(p) == "state"]
        cut = tmp_path / "cut.bundle"
        for size in (len(data) - 1, len(data) // 2, 20):  # cut short, as damage does
            cut.write_bytes(data[:size])
            with pytest.raises(BundleError, match=r"truncated|past the end|no end"):
                verify_bundle(cut)
        cut.write_bytes(data[:data.rfind(parts[-1]) - 4])  # at a frame boundary
        with pytest.raises(BundleError, match="no end record"):
            verify_bundle(cut)
        swapped = list(parts)
        swapped[states[1]], swapped[states[2]] = swapped[states[2]], swapped[states[1]]
        with pytest.raises(BundleError, match=r"out of order|altered"):
            verify_bundle(reframe(tmp_path / "swapped.bundle", swapped))
        for dropped in states[1:-1]:  # a state of the middle removed
            with pytest.raises(BundleError, match=r"not the parent|altered"):
                verify_bundle(reframe(tmp_path / "dropped.bundle",
                                      [p for i, p in enumerate(parts) if i != dropped]))
        # The same done as damage (no checksum redone) is refused by the checksum alone.
        damaged = tmp_path / "damaged.bundle"
        damaged.write_bytes(data.replace(parts[states[1]], parts[states[2]], 1))
        with pytest.raises(BundleError):
            verify_bundle(damaged)
    # The oldest state removed and everything redone is caught by the signature only.
    signed_parts = frames(tmp_path / "xTrue.bundle")
    oldest = [i for i, p in enumerate(signed_parts)
              if tag(p) == "state"][-1]
    without = [p for i, p in enumerate(signed_parts) if i != oldest]
    with pytest.raises(BundleError, match="altered after it was signed"):
        verify_bundle(reframe(tmp_path / "rootless.bundle", without))


async def test_old_bundle_formats_still_verify_and_import(store: Store, tmp_path: Path,
                                                         alice: SigningKey) -> None:
    from tests.crafted import valid_agent

    path, _ = valid_agent(tmp_path / "v1.bundle")
    assert verify_bundle(path).version == 1
    agent = await lineage(store)
    parts = frames(Path((await store.export(agent, tmp_path / "v4.bundle")).path))
    header = msgspec.msgpack.decode(parts[0])
    del header["lineage"]
    for version, lineage_form in ((2, True), (3, False)):
        old = reframe(tmp_path / f"v{version}.bundle",
                      [_enc.encode({**header, "version": version}), *parts[1:]])
        info = verify_bundle(old)
        assert (info.version, info.lineage, info.signers) == (version, lineage_form, ())
        target = await Store.connect(f"sqlite:///{tmp_path / f'v{version}.db'}")
        try:
            await target.init_schema()
            assert (await target.import_states(old)).head == agent.id
            assert (await target.verify()).ok
        finally:
            await target.close()
    # An older version never carries what version 4 added.
    with pytest.raises(BundleError, match="no lineage field"):
        verify_bundle(reframe(tmp_path / "mixed.bundle",
                              [_enc.encode({**header, "version": 2, "lineage": True}),
                               *parts[1:]]))
    signed = frames(Path((await store.export(agent, tmp_path / "s.bundle", sign=[alice])).path))
    with pytest.raises(BundleError, match="signature record"):
        verify_bundle(reframe(tmp_path / "v2sig.bundle",
                              [_enc.encode({**header, "version": 2}), *signed[1:]]))
    with pytest.raises(BundleError, match="version 5 is not supported") as refused:
        verify_bundle(reframe(tmp_path / "v5.bundle",
                              [_enc.encode({**header, "version": 5}), *parts[1:]]))
    assert refused.value.unusable


# -- attestations -------------------------------------------------------------------------------


async def test_a_reviewer_attests_after_the_fact_and_verify_checks_it(
        store: Store, store_dsn: str, tmp_path: Path, alice: SigningKey) -> None:
    agent = await lineage(store)
    row = await store.attest(agent.id, alice, note="reviewed")
    signed, statement, subject = attestation_of(row.kind, row.stream, row.refs, row.body)
    assert (subject.id, subject.digest) == (agent.id, agent.digest)
    assert statement.note == "reviewed" and statement.time is not None
    assert verify_signed(signed) and row.parent_id == agent.id
    assert [r.id for r in await store.attestations(agent.id)] == [row.id]
    report = await store.verify()
    assert report.ok and report.attestations_checked == 1
    assert (await store.verify(agent.id)).attestations_checked == 1
    # No private key material anywhere in the store.
    secret = (tmp_path / "alice").read_bytes()
    dump = b"".join(bytes(b) for (b,) in raw_sql(store_dsn, "SELECT body FROM immagent_states"))
    dump += b"".join(bytes(b) for (b,) in raw_sql(store_dsn, "SELECT body FROM immagent_assets"))
    assert secret not in dump and b"PRIVATE" not in dump
    # A signature altered in the database: verify names it.
    tampered = encode(Signed(signed.statement, signed.key, bytes(64)))
    digest = stream_digest(Kind.ATTESTATION, row.stream, (), tampered)
    raw_sql(store_dsn, "UPDATE immagent_states SET body = %s, digest = %s WHERE id = %s",
            [tampered, digest, row.id])
    report = await store.verify()
    assert not report.ok and "does not verify" in report.bad_agents[0].reason


async def test_an_attestation_lives_while_its_subject_does(
        store: Store, tmp_path: Path, alice: SigningKey) -> None:
    agent = await lineage(store, turns=2)
    parent = await store.load_agent(agent.parent_id)
    await store.attest(parent.id, alice)
    await store.attest(agent.id, alice)
    assert (await store.gc()).states_removed == 0
    assert await store.count_states(Kind.ATTESTATION) == 2
    # An attestation about an ancestor does not keep it from a lineage deletion...
    deleted = await store.delete_lineage(agent)
    assert parent.id in deleted
    # ...and gc removes what is about a state that is gone.
    result = await store.gc()
    assert result.states_removed == 2
    assert await store.count_states(Kind.ATTESTATION) == 0
    assert (await store.verify()).ok


async def test_attestations_travel_in_bundles_and_count_for_trust(
        store: Store, tmp_path: Path, alice: SigningKey, bob: SigningKey) -> None:
    agent = await lineage(store)
    await store.attest(agent.id, bob, note="approved")
    info = await store.export(agent, tmp_path / "a.bundle", sign=[alice])
    assert len(info.attestations) == 1
    checked = verify_bundle(info.path)
    assert sorted(s.purpose for s in checked.signers) == ["attestation", "bundle"]
    both = TrustPolicy([alice.public, bob.public], sigs_needed=2)
    assert len(verify_bundle(info.path, trust=both).trusted_by) == 2
    unsigned = await store.export(agent, tmp_path / "u.bundle")
    assert verify_bundle(unsigned.path, trust=TrustPolicy([bob.public])).trusted_by == (
        bob.public.id,)
    # An attestation of an ancestor does not vouch for the head.
    parent = await store.load_agent(agent.parent_id)
    other = await store.export(parent, tmp_path / "p.bundle")
    with pytest.raises(UntrustedError):
        verify_bundle(other.path, trust=TrustPolicy([bob.public]))
    target = await Store.connect(f"sqlite:///{tmp_path / 'target.db'}")
    try:
        await target.init_schema()
        await target.import_states(info.path)
        assert len(await target.attestations(agent.id)) == 1
        report = await target.verify()
        assert report.ok and report.attestations_checked == 1
    finally:
        await target.close()


async def test_crafted_attestations_are_refused(store: Store, tmp_path: Path,
                                                alice: SigningKey) -> None:
    agent = await lineage(store)
    with pytest.raises(AssetNotFoundError):
        await store.attest(uuid7(), alice)
    with pytest.raises(ValidationError, match="note"):
        await store.attest(agent.id, alice, note="x" * 2000)
    with pytest.raises(ValidationError, match="SigningKey"):
        await store.attest(agent.id, alice.public)  # type: ignore[arg-type]
    row = await store.attest(agent.id, alice)
    with pytest.raises(ValidationError, match="itself an attestation"):
        await store.attest(row.id, alice)
    # An attestation vouching for other content than its subject holds: written through
    # the log (its digest is right), found by verify, refused by an export.
    forged = alice.sign(Statement(purpose="attestation", subjects=(
        Subject(agent.id, int(Kind.AGENT_STATE), b"\x07" * 32),)))
    body = encode(forged)
    await store.commit([], [StateRow(
        id=uuid7(), parent_id=agent.id, kind=int(Kind.ATTESTATION), stream=str(agent.id),
        refs=(), body=body, digest=stream_digest(Kind.ATTESTATION, str(agent.id), (), body),
        created_at=row.created_at)])
    report = await store.verify()
    assert any("other content" in p.reason for p in report.bad_agents)
    with pytest.raises(IntegrityError, match="other content"):
        await store.export(agent, tmp_path / "x.bundle")
    # Filed under another state, or naming another parent: refused on write.
    for stream, parent in [(str(uuid7()), agent.id), (str(agent.id), uuid7())]:
        with pytest.raises(IntegrityError):
            await store.commit([], [StateRow(
                id=uuid7(), parent_id=parent, kind=int(Kind.ATTESTATION), stream=stream,
                refs=(), body=body, digest=stream_digest(Kind.ATTESTATION, stream, (), body),
                created_at=row.created_at)])


# -- without the extra ------------------------------------------------------------------------


@pytest.fixture
def no_cryptography(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Imports of ``cryptography`` fail, as on an install without the sign extra."""
    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cryptography" or name.startswith("cryptography."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    for name in [n for n in sys.modules if n.startswith("cryptography")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake)
    yield


async def test_without_the_extra_integrity_still_verifies_and_signing_says_what_to_install(
        store: Store, tmp_path: Path, alice: SigningKey, no_cryptography: None) -> None:
    agent = await lineage(store)
    info = await store.export(agent, tmp_path / "a.bundle", sign=[alice])
    assert [s.verified for s in verify_bundle(info.path).signers] == [None]  # unchecked
    for call in (lambda: generate_key(tmp_path / "k"),
                 lambda: load_signing_key(tmp_path / "alice"),
                 lambda: load_public_key(pub(tmp_path, "alice"))):
        with pytest.raises(ExtraNotInstalledError, match=r"pip install 'immagent-core\[sign\]'"):
            call()
    with pytest.raises(ExtraNotInstalledError, match=r"immagent-core\[sign\]"):
        verify_bundle(info.path, trust=TrustPolicy([alice.public]))


async def test_without_the_extra_signatures_are_reported_unchecked(
        store: Store, tmp_path: Path, alice: SigningKey,
        monkeypatch: pytest.MonkeyPatch) -> None:
    agent = await lineage(store)
    await store.attest(agent.id, alice)
    info = await store.export(agent, tmp_path / "a.bundle", sign=[alice])
    from immagent.audit import keys

    monkeypatch.setattr(keys, "signing_available", lambda: False)
    assert [s.verified for s in verify_bundle(info.path).signers] == [None, None]
    report = await store.verify()
    assert report.ok and report.signatures_unchecked == 1
    assert any("not checked" in line for line in report.lines())
