"""``immagent prove`` and ``immagent verify-proof`` (issue 24, item 2), on both backends, in
process through ``main()``: a proof written to a file or piped, checked offline against a
state digest and a trust policy, with verify-bundle's exit statuses (1 corrupt, 3
untrusted, 4 unusable, 2 usage); crafted files (an element not there, the wrong state,
truncated, oversized, not a proof, a forged attestation, the wrong key) refused on one
line, and nothing from a file or a message reaching the terminal as an escape sequence.
A real pseudo-terminal for the binary-on-a-terminal refusal."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from immagent.attestations import Signed
from immagent.audit import proofs
from immagent.cli import main
from tests.test_cli import _offline, agent_id, cli, db, one_error_line
from tests.test_cli_terminal import SCRIPT, on_terminal

__all__ = ["_offline", "cli", "db"]  # the fixtures test_cli.py defines, used here

#: Reaches a terminal as a command unless escaped: clear screen, a C1 CSI, an OSC title.
HOSTILE = "tell \x1b[2J\x9b31m\x1b]0;owned\x07 me"


def _edit(path: Path, change: Any) -> Path:
    """A copy of the proof at ``path`` with ``change`` applied to its decoded form."""
    proof = msgspec.msgpack.decode(path.read_bytes(), type=proofs.Proof)
    out = path.with_name(f"edited-{path.name}")
    out.write_bytes(msgspec.msgpack.encode(change(proof)))
    return out


def test_prove_and_verify_a_message_offline(cli: Any, store_dsn: str,
                                            tmp_path: Path) -> None:
    first = cli("chat", "Hello", database=store_dsn)
    head = agent_id(cli("chat", HOSTILE, database=store_dsn))
    state = cli("show", head, "--json", database=store_dsn).json()
    digest = state["digest"]
    proof = tmp_path / "m3.proof"
    made = cli("prove", head, "--message", "3", "-o", str(proof), database=store_dsn)
    assert made.code == 0, made
    assert f"--state-digest {digest}" in made.out and "\x1b" not in made.out
    # Offline: no --db, and none of the store's other messages are in the file.
    ok = cli("verify-proof", str(proof), "--state-digest", digest, database=None)
    assert ok.code == 0, ok
    assert "message [3] of 4" in ok.out and "anchored" in ok.out
    assert "tell ␛[2J\\x9b31m␛]0;owned␇ me" in ok.out  # shown, never acted on
    assert "\x1b" not in ok.out + ok.err and "\x9b" not in ok.out + ok.err
    assert b"Hello" not in proof.read_bytes()
    shown = cli("verify-proof", str(proof), "--json", database=None)
    assert "\x1b" not in shown.out and "\x9b" not in shown.out  # JSON escapes them
    data = shown.json()
    assert (data["position"], data["length"], data["state_digest"], data["anchored"]) == (
        3, 4, digest, False)
    assert data["element"]["content"] == HOSTILE
    assert "not anchored" in cli("verify-proof", str(proof), database=None).out
    # By digest, without the body: the digest alone.
    element = data["digest"]
    by_digest = tmp_path / "d.proof"
    assert cli("prove", head, "--digest", element, "--no-body", "-o", str(by_digest),
               "--json", database=store_dsn).json()["body"] is False
    bare = cli("verify-proof", str(by_digest), "--json", database=None).json()
    assert bare["element"] is None and bare["position"] == 3
    # A proof of an earlier state of the lineage, against that state's digest.
    earlier = cli("show", agent_id(first), "--json", database=store_dsn).json()["digest"]
    older = tmp_path / "old.proof"
    assert cli("prove", agent_id(first), "--message", "1", "-o", str(older),
               database=store_dsn).code == 0
    assert cli("verify-proof", str(older), "--state-digest", earlier,
               database=None).code == 0
    # An existing file is kept unless --force.
    one_error_line(cli("prove", head, "--message", "1", "-o", str(proof),
                       database=store_dsn), 2, "already exists")
    assert cli("prove", head, "--message", "1", "-o", str(proof), "--force",
               database=store_dsn).code == 0


def test_crafted_and_misplaced_proofs_are_refused_on_one_line(cli: Any, store_dsn: str,
                                                              tmp_path: Path) -> None:
    cli("chat", "one", database=store_dsn)
    head = agent_id(cli("chat", "two", database=store_dsn))
    other = agent_id(cli("chat", "elsewhere", "--name", "other", database=store_dsn))
    digest = cli("show", head, "--json", database=store_dsn).json()["digest"]
    others = cli("show", other, "--json", database=store_dsn).json()["digest"]
    proof = tmp_path / "p.proof"
    assert cli("prove", head, "--message", "2", "-o", str(proof), database=store_dsn).code == 0
    # Proving what is not there: no file written.
    one_error_line(cli("prove", head, "--message", "9", "-o", str(tmp_path / "x"),
                       database=store_dsn), 2, "has no message 9", "holds 4 messages")
    one_error_line(cli("prove", head, "--digest", "ab" * 32, "-o", str(tmp_path / "x"),
                       database=store_dsn), 2, f"no element with digest {'ab' * 32}")
    assert not (tmp_path / "x").exists()
    one_error_line(cli("prove", head, "-o", str(tmp_path / "x"), database=store_dsn), 2,
                   "--message")
    refused = cli("prove", head, "--message", "1", "--json", database=store_dsn)
    assert refused.code == 2 and "-o FILE" in refused.err and refused.out == ""
    # Corrupt (exit 1): the wrong state, a path digest changed, cut short, moved.
    one_error_line(cli("verify-proof", str(proof), "--state-digest", others), 1,
                   "wrong_state", others)
    changed = _edit(proof, lambda p: msgspec.structs.replace(
        p, path=[bytes(32), *p.path[1:]]))
    one_error_line(cli("verify-proof", str(changed), "--state-digest", digest), 1,
                   "not_in_state")
    moved = _edit(proof, lambda p: msgspec.structs.replace(
        p, leaf=msgspec.structs.replace(p.leaf, index=0)))
    one_error_line(cli("verify-proof", str(moved)), 1, "not_in_state")
    short = tmp_path / "short.proof"
    short.write_bytes(proof.read_bytes()[:-9])
    one_error_line(cli("verify-proof", str(short)), 1, "truncated")
    # Unusable (exit 4): too large (not read whole), not a proof, another version, missing.
    big = tmp_path / "big.proof"
    big.write_bytes(proof.read_bytes() + b"\x00" * proofs.MAX_BYTES)
    one_error_line(cli("verify-proof", str(big)), 4, "oversized")
    text = tmp_path / "text.proof"
    text.write_bytes(HOSTILE.encode())
    junk = cli("verify-proof", str(text))
    one_error_line(junk, 4, "malformed")
    assert "\x1b" not in junk.err and "\x9b" not in junk.err
    future = _edit(proof, lambda p: msgspec.structs.replace(p, version=9))
    one_error_line(cli("verify-proof", str(future)), 4, "version 9")
    named = _edit(proof, lambda p: msgspec.structs.replace(p, format=HOSTILE))
    hostile = cli("verify-proof", str(named))
    one_error_line(hostile, 4, "malformed", "tell ")
    assert "\x1b" not in hostile.err and "\x9b" not in hostile.err
    one_error_line(cli("verify-proof", str(tmp_path / "none")), 4, "no such file")
    one_error_line(cli("verify-proof", str(tmp_path)), 4, "not a regular file")
    # Usage (exit 2): a digest that is not one.
    one_error_line(cli("verify-proof", str(proof), "--state-digest", "xyz"), 2,
                   "not a digest")
    err = cli("--json", "verify-proof", str(short)).err
    assert msgspec.json.decode(err)["error"]["exit_code"] == 1


def test_a_proof_is_checked_against_a_trust_policy(cli: Any, store_dsn: str,
                                                    tmp_path: Path) -> None:
    alice, bob = str(tmp_path / "alice"), str(tmp_path / "bob")
    cli("keygen", alice)
    cli("keygen", bob)
    head = agent_id(cli("chat", "vouched", database=store_dsn))
    proof = tmp_path / "p.proof"
    unsigned = tmp_path / "unsigned.proof"
    assert cli("prove", head, "--message", "1", "-o", str(unsigned), database=store_dsn).code == 0
    one_error_line(cli("verify-proof", str(unsigned), "--trusted-key", f"{alice}.pub"), 3,
                   "vouched for by 0", "carries no attestation")
    assert cli("attest", head, "--key", alice, "--note", "reviewed \x1b[2J",
               database=store_dsn).code == 0
    made = cli("prove", head, "--message", "1", "-o", str(proof), database=store_dsn)
    assert "attestations  ed25519:" in made.out
    ok = cli("verify-proof", str(proof), "--trusted-key", f"{alice}.pub")
    assert ok.code == 0 and "1 trusted key(s) vouch for the state" in ok.out
    assert "(verified)" in ok.out and "\x1b" not in ok.out
    assert cli("verify-proof", str(proof), "--trusted-key", f"{alice}.pub",
               "--json").json()["trusted_by"]
    # The wrong key: intact, untrusted (3); more signers than there are: usage (2).
    one_error_line(cli("verify-proof", str(proof), "--trusted-key", f"{bob}.pub"), 3,
                   "vouched for by 0 trusted key(s)")
    one_error_line(cli("verify-proof", str(proof), "--trusted-key", f"{alice}.pub",
                       "--trusted-key", f"{bob}.pub", "--sigs-needed", "2"), 3,
                   "vouched for by 1")
    one_error_line(cli("verify-proof", str(proof), "--trusted-key", alice), 2,
                   "is a private key")
    one_error_line(cli("verify-proof", str(proof), "--sigs-needed", "1"), 2, "--trusted-key")
    # A forged attestation is corrupt (1), whatever the policy.
    def forge(p: proofs.Proof) -> proofs.Proof:
        signed = msgspec.msgpack.decode(p.signatures[0], type=Signed)
        bad = msgspec.structs.replace(signed, signature=bytes(64))
        return msgspec.structs.replace(p, signatures=[msgspec.msgpack.encode(bad)])

    forged = _edit(proof, forge)
    for policy in ((), ("--trusted-key", f"{bob}.pub")):
        one_error_line(cli("verify-proof", str(forged), *policy), 1, "does not verify")
    # --no-attestations leaves them out.
    bare = tmp_path / "bare.proof"
    cli("prove", head, "--message", "1", "--no-attestations", "-o", str(bare),
        database=store_dsn)
    assert bare.stat().st_size < proof.stat().st_size


def test_a_proof_goes_to_stdout_and_back_through_a_pipe(capsysbinary: pytest.CaptureFixture[bytes],
                                                        db: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--db", db, "chat", "piped"]) == 0
    capsysbinary.readouterr()
    assert main(["--db", db, "prove", "--name", "assistant", "--message", "2"]) == 0
    document = capsysbinary.readouterr().out
    result = proofs.verify_proof(document)
    assert result.index == 1 and result.length == 2
    read, write = os.pipe()
    os.write(write, document)
    os.close(write)
    monkeypatch.setattr("sys.stdin", os.fdopen(read, "r"))
    assert main(["verify-proof", "-"]) == 0
    assert b"message [2] of 2" in capsysbinary.readouterr().out


def test_a_proof_is_not_written_to_a_terminal(tmp_path: Path) -> None:
    db = str(tmp_path / "tty.db")
    env = {k: v for k, v in os.environ.items() if k != "IMMAGENT_DB"}
    subprocess.run([str(SCRIPT), "--db", db, "chat", "hi"], check=True, env=env,
                   capture_output=True, timeout=120)
    shown = on_terminal(["--db", db, "prove", "--message", "1"])
    assert shown.code == 2
    assert "a proof is binary: write it to a file with -o FILE" in shown.text
    assert "immagent-proof" not in shown.text
    # The same command piped writes the proof.
    piped = subprocess.run([str(SCRIPT), "--db", db, "prove", "--message", "1"], env=env,
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert piped.returncode == 0 and proofs.verify_proof(piped.stdout).length == 2


def test_a_sessions_item_is_proved_by_its_reference(cli: Any, store_dsn: str,
                                                    tmp_path: Path) -> None:
    import asyncio

    from immagent import Store
    from immagent.integrations.openai_agents import ImmAgentSession

    async def build() -> None:
        async with await Store.connect(store_dsn) as store:
            await store.init_schema()
            session = ImmAgentSession("audited", store)
            await session.add_items([{"role": "user", "content": f"item {i}"}
                                     for i in range(5)])

    asyncio.run(build())
    proof = tmp_path / "s.proof"
    made = cli("prove", "session:audited", "--message", "4", "-o", str(proof),
               database=store_dsn)
    assert made.code == 0 and "item [4] of 5" in made.out, made
    shown = cli("verify-proof", str(proof), "--json", database=None).json()
    assert shown["element"]["value"] == {"role": "user", "content": "item 3"}
    one_error_line(cli("prove", "session:audited", "--message", "6", database=store_dsn), 2,
                   "has no item 6", "holds 5 items")
