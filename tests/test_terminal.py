"""Terminal escape injection: stored text with control sequences is
printed visibly by ``agents``, ``log`` and ``show`` (and in error lines); ``--json`` keeps
the exact text. Names cannot hold control characters at all."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import immagent
from immagent import Message, Store
from immagent.cli.app import main
from immagent.cli.render import json_text, visible

# Set the window title, clear the screen, a one-byte CSI, a bidi override, a bare CR.
EVIL = "hi\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\rX"
ACTIVE = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, str]:
    path = str(tmp_path / "tty.db")

    async def build() -> str:
        async with await Store.connect(f"sqlite:///{path}") as store:
            await store.init_schema()
            agent = await store.create_agent("bot", f"prompt {EVIL}", "immagent/echo",
                                             model_config={"user": EVIL},
                                             metadata={"note": EVIL})
            agent = await store.append(agent, [Message(role="user", content=EVIL),
                                               Message(role="assistant", content=EVIL)])
            return str(agent.id)

    return path, asyncio.run(build())


@pytest.mark.parametrize("command", [["show"], ["log"], ["log", "--oneline"]])
def test_control_characters_are_shown_not_sent(
        db: tuple[str, str], command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # (`agents` shows names and models only, which cannot hold control characters.)
    path, agent = db
    assert main(["--db", path, *command, agent]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in ACTIVE), repr(out)
    # Visible stand-ins, the rest of the text intact (a CR ends a line where lines are
    # split, and is shown as ␍ where they are not).
    assert "hi␛]0;owned␇␛[2J\\x9b31m\\u202eevil" in out


@pytest.mark.parametrize("command", [["show"], ["log"]])
def test_json_keeps_the_exact_text(db: tuple[str, str], command: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, agent = db
    assert main(["--db", path, "--json", *command, agent]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in ACTIVE)  # escaped in the JSON text itself
    data = json.loads(out)
    messages = data["conversation"] if command == ["show"] else data["lineage"][0]["added"]
    assert [m["content"] for m in messages] == [EVIL, EVIL]  # exact, after parsing


def test_visible_and_json_text_round_trip() -> None:
    assert visible("a\tb\nc") == "a\tb\nc"  # layout characters are kept
    text = json.dumps({"k": EVIL}, ensure_ascii=False)
    assert json.loads(json_text(text)) == {"k": EVIL}


async def test_names_cannot_hold_control_characters(tmp_path: Path) -> None:
    async with await Store.connect(f"sqlite:///{tmp_path / 'n.db'}") as store:
        await store.init_schema()
        for name in ("bot\x1b[2J", "bot\u0085", "a\nb"):
            with pytest.raises(immagent.ValidationError) as err:
                await store.create_agent(name, "p", "m")
            assert err.value.field == "name"
        with pytest.raises(immagent.ValidationError) as err:
            await store.create_agent("bot", "p", "m\x1b[2J")
        assert err.value.field == "model"


def test_an_error_line_shows_control_characters_visibly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", str(tmp_path / "e.db"), "show", "--name", "x\x1b[2Jy"]) != 0
    err = capsys.readouterr().err
    assert "\x1b" not in err
