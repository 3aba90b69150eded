"""``immagent chat`` streaming: the real console script with stdout on a pseudo-terminal
(tokens printed as they arrive), Ctrl-C mid-stream, ``--json`` on a terminal, the
interrupted mark in ``show``/``log``, and the wait for LiteLLM shown on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import immagent
from immagent.cli import main
from immagent.testing import Reply, ScriptedModel
from tests.test_cli import PROVIDER_KEYS, HangingServer

SCRIPT = Path(sys.executable).with_name("immagent")


@dataclass
class TerminalRun:
    """What a run on a terminal wrote, each read of the terminal kept apart."""

    code: int
    reads: list[bytes] = field(default_factory=list)
    err: bytes = b""

    @property
    def out(self) -> str:
        return b"".join(self.reads).decode()


def on_terminal(args: list[str], cwd: Path, *, env: dict[str, str] | None = None,
                stderr_tty: bool = False,
                interrupt_when: Callable[[bytes, bytes], bool] | None = None) -> TerminalRun:
    """Run ``immagent ARGS`` with stdout (and optionally stderr) on a pseudo-terminal;
    send SIGINT once ``interrupt_when(stdout so far, stderr so far)`` holds."""
    full_env = {k: v for k, v in os.environ.items() if k not in (*PROVIDER_KEYS, "IMMAGENT_DB")}
    full_env.update(env or {})
    out_master, out_slave = pty.openpty()
    err_master, err_slave = pty.openpty() if stderr_tty else (None, None)
    proc = subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=full_env,
                            stdin=subprocess.DEVNULL, stdout=out_slave,
                            stderr=err_slave if err_slave is not None else subprocess.PIPE)
    os.close(out_slave)
    if err_slave is not None:
        os.close(err_slave)
    err_fd = err_master if err_master is not None else proc.stderr.fileno()  # type: ignore[union-attr]
    run = TerminalRun(code=-1)
    out = b""
    deadline = time.monotonic() + 120
    open_fds = {out_master, err_fd}
    try:
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.1)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # a pty whose other end closed
                    data = b""
                if not data:
                    open_fds.discard(fd)
                elif fd == out_master:
                    run.reads.append(data)
                    out += data
                else:
                    run.err += data
            if interrupt_when is not None and interrupt_when(out, run.err):
                proc.send_signal(signal.SIGINT)
                interrupt_when = None
            if proc.poll() is not None and not ready:
                break
        run.code = proc.wait(timeout=60)
        # The process may have written its last words between the select above and its
        # exit: read what is left (a pty says EOF, or EIO, once drained).
        for fd in open_fds:
            while select.select([fd], [], [], 1.0)[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                if fd == out_master:
                    run.reads.append(data)
                else:
                    run.err += data
    finally:
        proc.kill()
        os.close(out_master)
        if err_master is not None:
            os.close(err_master)
    return run


def states(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM immagent_states").fetchone()[0])


SLOW_ECHO = {"IMMAGENT_ECHO_DELAY": "0.15"}
WORDS = ["one", "two", "three", "four", "five", "six"]


def test_tokens_arrive_on_the_terminal_before_the_reply_ends(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    run = on_terminal(["--db", str(db), "chat", *WORDS], tmp_path, env=SLOW_ECHO)
    assert run.code == 0, run
    first = next(i for i, r in enumerate(run.reads) if b"one" in r)
    last = next(i for i, r in enumerate(run.reads) if b"six" in r)
    assert first < last  # the start of the reply was on screen before its end was made
    lines = run.out.replace("\r\n", "\n").splitlines()
    assert lines[0] == "Echo: " + " ".join(WORDS)
    assert lines[1].startswith("agent ") and len(lines) == 2
    assert states(db) == 2  # created + the turn, saved once the stream completed


def test_ctrl_c_during_a_streamed_reply_saves_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    run = on_terminal(["--db", str(db), "chat", *WORDS], tmp_path, env=SLOW_ECHO,
                      interrupt_when=lambda out, err: b"two" in out)
    assert run.code == 130, run
    assert b"interrupted: this turn was not saved" in run.err
    assert b"Traceback" not in run.err
    assert "six" not in run.out
    assert states(db) == 0  # the agent made for this first turn was removed again


def test_json_on_a_terminal_is_one_document(tmp_path: Path) -> None:
    run = on_terminal(["--db", str(tmp_path / "s.db"), "--json", "chat", "hi", "there"],
                      tmp_path, env=SLOW_ECHO)
    assert run.code == 0, run
    document = json.loads(run.out)
    assert document["reply"] == "Echo: hi there"


def test_interrupted_messages_are_marked_in_show_and_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.db"
    model = ScriptedModel([Reply(chunks=["The ", "answer ", "is"])])

    async def partial() -> str:
        async with await immagent.Store.connect(str(db)) as store:
            await store.init_schema()
            agent = await store.create_agent("cut", "Be brief.", model.model)
            async with agent.stream("tell me", keep_partial=True) as s:
                async for event in s:
                    if isinstance(event, immagent.TextDelta) and event.text == "answer ":
                        break
            return str(s.agent.id)

    agent_id = asyncio.run(partial())

    def cli(*args: str) -> str:
        assert main(["--db", str(db), *args]) == 0
        return capsys.readouterr().out

    shown = cli("show", agent_id)
    assert "[2] assistant  (interrupted: cut short, kept)" in shown
    assert "[1] user\n" in shown
    assert "assistant (interrupted): The answer" in cli("log", "--oneline", agent_id)
    added = json.loads(cli("--json", "show", agent_id))["conversation"]
    assert [m.get("interrupted") for m in added] == [None, True]


@pytest.fixture
def hanging() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.close()


def test_ctrl_c_while_the_model_client_loads(tmp_path: Path) -> None:
    """Ctrl-C during LiteLLM's import: the turn is dropped at once (the import thread is a
    daemon: the exit does not wait for it) and nothing is saved."""
    db = tmp_path / "s.db"
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    run = on_terminal(["--db", str(db), "chat", "Hello"], tmp_path, env=env, stderr_tty=True,
                      interrupt_when=lambda out, err: b"loading model client" in err)
    assert run.code == 130, run
    assert b"interrupted: this turn was not saved" in run.err and b"Traceback" not in run.err
    assert states(db) == 0


def test_provider_model_shows_what_it_waits_for_then_ctrl_c(
        tmp_path: Path, hanging: HangingServer) -> None:
    """A provider model streamed to a terminal (LiteLLM's real streaming path): stderr says
    it waits for the model client, then the model; Ctrl-C saves nothing."""
    db = tmp_path / "s.db"
    env = {"OPENAI_API_KEY": "sk-test", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "OPENAI_BASE_URL": f"http://127.0.0.1:{hanging.port}/v1",
           "OPENAI_API_BASE": f"http://127.0.0.1:{hanging.port}/v1"}
    run = on_terminal(["--db", str(db), "chat", "Hello"], tmp_path, env=env, stderr_tty=True,
                      interrupt_when=lambda out, err: hanging.connected.is_set())
    assert run.code == 130, run
    assert "loading model client…".encode() in run.err
    assert b"openai/gpt-4o-mini is thinking" in run.err
    assert b"interrupted: this turn was not saved" in run.err
    assert run.out == ""  # nothing on stdout: no reply, no status
    assert states(db) == 0

