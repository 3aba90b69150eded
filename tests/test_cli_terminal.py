"""The command line in a real terminal, as a person uses it: the console script on a
pseudo-terminal (stdin, stdout and stderr on one pty, which is the process's controlling
terminal, with a window size) for the pager, colour, the width and questions; piped for
the contrast. Also streamed chat output: no escape sequence from a reply reaches the
terminal, and text split across chunks stays whole."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import immagent
from immagent import Message
from immagent.cli import main
from immagent.cli.chat import Screen, StreamText
from immagent.cli.render import columns
from immagent.stream import TextDelta
from tests.test_cli import PROVIDER_KEYS

SCRIPT = Path(sys.executable).with_name("immagent")
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """``text`` without SGR colour codes (what the terminal shows, without colour)."""
    return _SGR.sub("", text)
LONG_NAME = "an-agent-whose-name-goes-on-and-on-and-on-far-beyond-the-terminal"


@dataclass
class Screenful:
    """What one run showed on its terminal."""

    code: int
    raw: bytes = b""
    sent: list[bytes] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\r\n", "\n")


def _controlling_tty() -> None:
    """In the child: a session of its own whose controlling terminal is its stdin (the
    pty), as a login shell's, so a pager reads keys from /dev/tty."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def on_terminal(args: list[str], *, env: dict[str, str] | None = None, cols: int = 100,
                rows: int = 24,
                answer: Callable[[bytes], bytes | None] | None = None) -> Screenful:
    """Run ``immagent ARGS`` on a ``cols`` x ``rows`` terminal; ``answer(screen so far)``
    may return keys to type (once each time it returns some)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in (*PROVIDER_KEYS, "IMMAGENT_DB", "NO_COLOR", "PAGER",
                             "IMMAGENT_PAGER", "LESS", "COLUMNS", "LINES")}
    full_env.update(TERM="xterm-256color", LITELLM_LOCAL_MODEL_COST_MAP="True")
    full_env.update(env or {})
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([str(SCRIPT), *args], env=full_env, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=_controlling_tty)
    os.close(slave)
    run = Screenful(code=-1)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other end closed: the process is gone
                    break
                if not data:
                    break
                run.raw += data
            elif proc.poll() is not None:
                break
            keys = answer(run.raw) if answer is not None else None
            if keys:
                run.sent.append(keys)
                os.write(master, keys)
        run.code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        os.close(master)
    return run


def piped(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in (*PROVIDER_KEYS, "IMMAGENT_DB", "NO_COLOR")}
    full_env.update(env or {})
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A store with a 30-turn agent (its log is longer than a screen) and one with a very
    long name; returns the path and the long agent's newest id."""
    path = str(tmp_path_factory.mktemp("tty") / "tty.db")

    async def build() -> str:
        async with await immagent.Store.connect(path) as store:
            await store.init_schema()
            agent = await store.create_agent("assistant", "Be brief.", "immagent/echo")
            for i in range(30):
                agent = await store.append(agent, [
                    Message(role="user", content=f"question {i} " + "words " * 20),
                    Message(role="assistant", content=f"answer {i}")])
            await store.create_agent(LONG_NAME, "p", "immagent/echo")
            return str(agent.id)

    return path, asyncio.run(build())


@pytest.fixture
def recording_pager(tmp_path: Path) -> tuple[str, Path]:
    """A pager command that keeps what it was sent in a file and says so on the screen."""
    script = tmp_path / "pager.py"
    record = tmp_path / "paged.txt"
    script.write_text("import sys\ndata = sys.stdin.read()\n"
                      f"open({str(record)!r}, 'w').write(data)\n"
                      "print(f'PAGED {len(data.splitlines())} LINES')\n")
    return f"{sys.executable} {script}", record


# -- the pager -------------------------------------------------------------------------------


def test_long_output_goes_through_the_pager_on_a_terminal_only(
        db: tuple[str, str], recording_pager: tuple[str, Path]) -> None:
    path, _ = db
    pager, record = recording_pager
    paged = on_terminal(["--db", path, "log"], env={"IMMAGENT_PAGER": pager})
    assert paged.code == 0, paged.text
    assert "PAGED" in paged.text and "question 29" not in paged.text
    sent = plain(record.read_text())  # colours are for the pager (less -R) to show
    assert sent.startswith("agent ") and sent.count("\nagent ") == 30  # 31 states
    assert "question 29" in sent
    record.unlink()
    # --no-pager: straight to the terminal.
    direct = on_terminal(["--db", path, "--no-pager", "log"], env={"IMMAGENT_PAGER": pager})
    assert direct.code == 0 and "question 29" in direct.text and not record.exists()
    # Piped: never paged, even with a pager configured.
    out = piped(["--db", path, "log"], env={"IMMAGENT_PAGER": pager})
    assert out.returncode == 0 and "question 29" in out.stdout and not record.exists()
    # chat is never paged (it talks with the person).
    talk = on_terminal(["--db", path, "chat", "hi"], env={"IMMAGENT_PAGER": pager})
    assert talk.code == 0 and "Echo: hi" in talk.text and not record.exists()


def test_less_pages_a_long_log_and_quitting_it_is_no_error(db: tuple[str, str]) -> None:
    path, _ = db
    if not Path("/usr/bin/less").exists() and not any(
            (Path(d) / "less").exists() for d in os.environ.get("PATH", "").split(":")):
        pytest.skip("less is not installed")

    quitted: list[bool] = []

    def quit_once_it_shows_the_log(screen: bytes) -> bytes | None:
        # The output is longer than the screen, so less -FRX waits after the first one
        # (a key typed early waits in the terminal until less reads it).
        if b"question" in screen and not quitted:
            quitted.append(True)
            return b"q"
        return None

    run = on_terminal(["--db", path, "log"], env={"PAGER": "less"}, rows=20,
                      answer=quit_once_it_shows_the_log)
    assert run.code == 0, run.text
    assert run.sent == [b"q"]  # it stopped at the end of the first screen
    assert "answer 29" in run.text and "question 1 " not in run.text  # the rest unread
    assert "Traceback" not in run.text and "error" not in run.text


# -- colour and width ------------------------------------------------------------------------


def test_colour_follows_color_no_color_and_the_terminal(db: tuple[str, str]) -> None:
    path, _ = db
    yellow = "\x1b[33m"
    args = ["--db", path, "--no-pager", "log", "--oneline", "-n", "2"]
    assert yellow in on_terminal(args).text
    assert "\x1b[" not in on_terminal(args, env={"NO_COLOR": "1"}).text
    assert "\x1b[" not in on_terminal(args, env={"TERM": "dumb"}).text
    assert "\x1b[" not in on_terminal(["--color=never", *args]).text
    assert yellow in on_terminal(["--color=always", *args], env={"NO_COLOR": "1"}).text
    assert "\x1b[" not in piped(args).stdout
    assert yellow in piped(["--color", "always", *args]).stdout
    # The error line is red where stderr is a terminal.
    assert "\x1b[1;31mimmagent: error:" in on_terminal(["--db", path, "show", "nope"]).text


def test_tables_and_one_line_logs_fit_the_terminal_width(db: tuple[str, str]) -> None:
    path, _ = db
    for args in (["agents"], ["agents", "--all"], ["log", "--oneline"]):
        run = on_terminal(["--db", path, "--no-pager", *args], cols=60)
        lines = [plain(line) for line in run.text.splitlines() if line.strip()]
        assert run.code == 0 and lines, run.text
        too_wide = [line for line in lines if columns(line) > 60
                    and not line.startswith("(")]  # the footer may wrap, as text does
        assert not too_wide, too_wide
    table = plain(on_terminal(["--db", path, "--no-pager", "agents"], cols=60).text)
    assert "an-ag" in table and LONG_NAME not in table and "…" in table  # cut, not dropped
    assert LONG_NAME in piped(["--db", path, "agents"]).stdout  # no width when piped


# -- questions -------------------------------------------------------------------------------


def test_delete_asks_on_a_terminal_and_does_nothing_without_a_yes(
        db: tuple[str, str], tmp_path: Path) -> None:
    path = str(tmp_path / "copy.db")
    main(["--db", db[0], "export", "agent:assistant", str(tmp_path / "a.bundle")])
    main(["--db", path, "import", str(tmp_path / "a.bundle")])
    head = db[1]

    def say(word: bytes) -> Callable[[bytes], bytes | None]:
        return lambda screen: word + b"\r" if screen.rstrip().endswith(b"[y/N]") else None

    no = on_terminal(["--db", path, "delete", head], answer=say(b"n"))
    assert no.code == 1 and "Delete 1 state" in no.text and "not confirmed" in no.text
    assert piped(["--db", path, "show", head]).returncode == 0
    yes = on_terminal(["--db", path, "delete", head], answer=say(b"y"))
    assert yes.code == 0 and f"deleted {head}" in plain(yes.text), yes.text
    assert piped(["--db", path, "show", head]).returncode == 1


# -- streamed replies ------------------------------------------------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def test_a_streamed_reply_shows_escape_sequences_visibly(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    run = on_terminal(["--db", db, "chat", f"hello {EVIL} world"],
                      env={"IMMAGENT_ECHO_DELAY": "0.02"})
    assert run.code == 0, run.text
    assert "Echo: hello ␛]0;pwned␇␛[2J\\x9b31m world" in run.text
    assert b"\x1b]0;" not in run.raw and b"\x1b[2J" not in run.raw and b"\xc2\x9b" not in run.raw


def test_stream_text_joins_what_chunks_split() -> None:
    text = StreamText()
    # An emoji whose surrogate pair a provider's JSON split across two chunks, a CR LF split
    # the same way, a lone CR and an escape sequence.
    out = [text.feed("smile \ud83d"), text.feed("\ude00 now\r"), text.feed("\nnext\r"),
           text.feed("x \x1b[2J"), text.flush()]
    assert "".join(out) == "smile \U0001f600 now\nnext␍x ␛[2J"
    assert out[0] == "smile " and out[1] == "\U0001f600 now"  # nothing half-written
    dangling = StreamText()
    assert dangling.feed("end \ud83d") + dangling.flush() == "end \\ud83d"  # shown, not sent
    written: list[str] = []
    screen = Screen(streams=True, write=written.append)
    for chunk in ("caf", "\u00e9 \ud83d", "\ude00\x1b]0;t\x07"):
        screen.show(TextDelta(chunk, 0))
    screen.end_line()
    assert "".join(written) == "caf\u00e9 \U0001f600␛]0;t␇\n"
    "".join(written).encode("utf-8")  # writable by a UTF-8 terminal: no lone surrogate


def test_argparse_errors_show_escape_sequences_visibly(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agents", "\x1b[2J\x1b]0;x\x07"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: ␛[2J␛]0;x␇" in err and "\x1b" not in err
    assert main(["--color", "\x1b[31m", "agents"]) == 2
    assert "\x1b" not in capsys.readouterr().err
