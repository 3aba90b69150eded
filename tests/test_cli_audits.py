"""The audit commands: keygen, attest, export --sign, verify-bundle with a trust policy
(exit 1 corrupt, 3 untrusted, 4 unusable, 2 usage), diff and replay, on SQLite files with
the offline model, in-process through ``main()``."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import msgspec

from immagent import Message, Store
from tests.conftest import turn
from tests.crafted import frames, reframe
from tests.test_cli import _offline, agent_id, cli, db, one_error_line

__all__ = ["_offline", "cli", "db"]  # the fixtures test_cli.py defines, used here


def test_sign_attest_export_and_verify_with_a_trust_policy(cli: Any, tmp_path: Path) -> None:
    alice, bob, carol = (str(tmp_path / n) for n in ("alice", "bob", "carol"))
    made = cli("keygen", alice)
    assert made.code == 0 and "ed25519:" in made.out and "BEGIN" not in made.out
    assert stat.S_IMODE(Path(alice).stat().st_mode) == 0o600
    assert cli("keygen", bob, "--json").json()["public_key"] == f"{bob}.pub"
    cli("keygen", carol)
    one_error_line(cli("keygen", alice), 2, "already exists")
    cli("chat", "hi")
    head = agent_id(cli("chat", "again"))
    attested = cli("attest", head, "--key", bob, "--note", "reviewed \x1b[2J")
    assert attested.code == 0 and "\x1b" not in attested.out and "reviewed" in attested.out
    bundle = str(tmp_path / "a.bundle")
    exported = cli("export", head, bundle, "--sign", alice, "--json").json()
    assert exported["version"] == 4 and len(exported["attestations"]) == 1
    both = ("--trusted-key", f"{alice}.pub", "--trusted-key", f"{bob}.pub")
    ok = cli("verify-bundle", bundle, *both, "--sigs-needed", "2")
    assert ok.code == 0 and "2 trusted key(s) vouch" in ok.out
    assert cli("verify-bundle", bundle, *both, "--json").json()["trusted_by"]
    one_error_line(cli("verify-bundle", bundle, "--trusted-key", f"{carol}.pub"), 3,
                   "intact, but vouched for by 0")
    one_error_line(cli("verify-bundle", bundle, "--trusted-key", f"{alice}.pub",
                       "--sigs-needed", "2"), 2, "sigs_needed")
    one_error_line(cli("verify-bundle", bundle, "--trusted-key", alice), 2, "is a private key")
    one_error_line(cli("verify-bundle", bundle, "--sigs-needed", "1"), 2, "--trusted-key")
    one_error_line(cli("verify-bundle", str(tmp_path / "none")), 4, "no bundle file")
    parts = frames(Path(bundle))
    header = msgspec.msgpack.decode(parts[0])
    future = reframe(tmp_path / "future.bundle",
                     [msgspec.msgpack.encode({**header, "version": 9}), *parts[1:]])
    one_error_line(cli("verify-bundle", str(future)), 4, "version 9 is not supported")
    data = bytearray(Path(bundle).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(bundle).write_bytes(bytes(data))
    one_error_line(cli("verify-bundle", bundle, *both), 1, bundle)


def test_diff_shows_the_fork_point_and_both_sides(cli: Any) -> None:
    first = agent_id(cli("chat", "hello"))
    left = agent_id(cli("chat", "--agent", first, "left side"))
    right = agent_id(cli("chat", "--agent", first, "right side"))
    shown = cli("diff", left, right)
    assert shown.code == 0
    assert f"common ancestor  {first}" in shown.out
    assert "left adds 2" in shown.out and "user: left side" in shown.out
    assert "user: right side" in shown.out
    data = cli("diff", left, right, "--json").json()
    assert data["ancestor"] == first
    (chain,) = data["chains"]
    assert [m["content"] for m in chain["left"]] == ["left side", "Echo: left side"]
    assert chain["base_length"] == 2
    one_error_line(cli("diff", left, "00000000-0000-0000-0000-000000000000"), 1, "not found")


def test_replay_proves_a_request_and_sends_it_again(cli: Any, db: str) -> None:
    head = agent_id(cli("chat", "once"))
    proven = cli("replay", head)
    assert proven.code == 0 and "proven" in proven.out and "messages       1" in proven.out
    ran = cli("replay", head, "--run", "--json").json()
    assert ran["proven"] and ran["replayed"]["same"]
    one_error_line(cli("replay", head, "--message", "1"), 2, "user message")

    async def write_old_and_forged() -> tuple[str, str]:
        async with await Store.connect(db) as store:
            agent = await store.load_agent(head)
            old = await store.append(agent, turn(1))  # no request recorded
            forged = await store.append(agent, [Message(role="user", content="q"), Message(
                role="assistant", content="a", model="immagent/echo", request=b"\x01" * 32)])
            return str(old.id), str(forged.id)

    old, forged = asyncio.run(write_old_and_forged())
    unknown = cli("replay", old, "--message", "4")  # (the default: the newest recorded)
    assert unknown.code == 4 and "unknown" in unknown.out
    mismatch = cli("replay", forged, "--run")
    assert mismatch.code == 1 and "MISMATCH" in mismatch.out
    assert "not replayed" in mismatch.out
