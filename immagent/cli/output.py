"""Where a command's output goes: stdout for results (text or JSON), stderr for the rest;
colour, the terminal's width and a pager when stdout is a terminal, as git does.

* **Colour** (``--color=auto|always|never``): ``auto`` colours a stream that is a terminal
  unless ``NO_COLOR`` is set (to anything but "") or ``TERM=dumb``; ``always`` overrides
  both, ``never`` wins. Colour is SGR around ``Painted`` parts, added after ``visible``.
* **Width**: the terminal's columns (``COLUMNS`` overrides) when stdout is a terminal,
  else none: piped output is never cut to a width.
* **Pager**: a command that may print more than a screen (``Command.pages``) starts one
  at its first line when stdout is a terminal: ``$IMMAGENT_PAGER``, else ``$PAGER``, else
  ``less`` (with ``LESS=FRX`` unless ``LESS`` is set: quit if it fits on one screen, keep
  colours, leave the screen as it is). ``--no-pager``, an empty value or ``cat`` turns it
  off; a pager that cannot be found is skipped. While it runs, Ctrl-C belongs to it (less
  uses it to stop a search); quitting it ends the command quietly, with status 0.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from immagent.cli.render import STYLES, Line, Painted, json_text, jsonable, visible

__all__ = ["ENV_PAGER", "ColorMode", "Output", "PagerClosed", "Terminal", "pager_command"]

ColorMode = Literal["auto", "always", "never"]
#: Environment variable naming the pager for immagent only (before $PAGER).
ENV_PAGER = "IMMAGENT_PAGER"


@dataclass(frozen=True)
class Terminal:
    """What the process is connected to, decided once per invocation."""

    stdout_tty: bool
    stderr_tty: bool
    stdin_tty: bool
    color: bool  # colour on stdout
    err_color: bool  # colour on stderr
    width: int | None  # columns of the terminal stdout is on; None when piped

    @classmethod
    def detect(cls, mode: ColorMode = "auto",
               environ: Mapping[str, str] | None = None) -> Terminal:
        """The terminal of this process, with colour chosen by ``mode`` and the
        environment (NO_COLOR, TERM)."""
        env = os.environ if environ is None else environ
        out, err, inp = _isatty(sys.stdout), _isatty(sys.stderr), _isatty(sys.stdin)
        plain = bool(env.get("NO_COLOR")) or env.get("TERM") == "dumb"

        def wants(tty: bool) -> bool:
            return mode == "always" or (mode == "auto" and tty and not plain)

        return cls(stdout_tty=out, stderr_tty=err, stdin_tty=inp, color=wants(out),
                   err_color=wants(err), width=_columns(env) if out else None)


def _columns(env: Mapping[str, str]) -> int | None:
    """The terminal's width: $COLUMNS when set, else what the terminal on stdout says
    (shutil.get_terminal_size's rule, without importing shutil on every start)."""
    try:
        columns = int(env.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns if columns > 0 else None


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # a closed stream
        return False


def pager_command(environ: Mapping[str, str] | None = None) -> str | None:
    """The pager to run ($IMMAGENT_PAGER, $PAGER, else less), or None: turned off (empty,
    ``cat``) or not installed."""
    import shlex
    import shutil

    env = os.environ if environ is None else environ
    command = env.get(ENV_PAGER, env.get("PAGER", "less"))
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or words[0] == "cat" or shutil.which(words[0]) is None:
        return None
    return command


class PagerClosed(Exception):
    """The pager was quit before the command finished writing (not a failure)."""


class _Pager:
    """A pager process fed through a pipe; SIGINT is ignored here while it runs."""

    def __init__(self, command: str, encoding: str) -> None:
        env = dict(os.environ)
        env.setdefault("LESS", "FRX")
        env.setdefault("LV", "-c")
        # Through a shell, as git does: $PAGER may carry options or a pipeline.
        self.process = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, env=env)
        assert self.process.stdin is not None
        self.stream = io.TextIOWrapper(self.process.stdin, encoding=encoding,
                                       errors="replace", line_buffering=False)
        self._sigint = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def close(self) -> None:
        """Send what is buffered, close the pipe and wait for the reader to quit."""
        try:
            self.stream.close()
        except (BrokenPipeError, OSError):
            pass
        finally:
            self.process.wait()
            signal.signal(signal.SIGINT, self._sigint)


class Output:
    """What commands write through: ``line``/``lines``/``json`` on stdout, ``note`` and
    ``error`` on stderr. Text goes through ``visible`` once, here; colour after it."""

    def __init__(self, as_json: bool, terminal: Terminal | None = None, *,
                 pager: str | None = None) -> None:
        self.as_json = as_json
        self.terminal = terminal or Terminal(False, False, False, False, False, None)
        self._pager_command = pager if self.terminal.stdout_tty else None
        self._pager: _Pager | None = None

    @property
    def width(self) -> int | None:
        """Columns available for a line on stdout (None: no limit)."""
        return self.terminal.width

    def _stdout(self) -> TextIO:
        if self._pager is None and self._pager_command is not None:
            self._pager = _Pager(self._pager_command, sys.stdout.encoding or "utf-8")
            self._pager_command = None
        return self._pager.stream if self._pager is not None else sys.stdout

    def _write(self, text: str) -> None:
        stream = self._stdout()
        try:
            stream.write(text)
        except BrokenPipeError:
            if self._pager is not None:
                raise PagerClosed from None
            raise

    def render(self, line: Line, *, color: bool | None = None) -> str:
        """A line as it is written: every part made visible, Painted parts in colour."""
        on = self.terminal.color if color is None else color
        if isinstance(line, str) and not isinstance(line, Painted):
            return visible(line)
        parts = (line,) if isinstance(line, str) else line
        return "".join(_sgr(part, on) for part in parts)

    def line(self, line: Line = "") -> None:
        """One line of human output on stdout."""
        self._write(self.render(line) + "\n")

    def lines(self, lines: Iterable[Line]) -> None:
        """Several lines of human output on stdout."""
        for line in lines:
            self.line(line)

    def json(self, value: Any, *, compact: bool = False) -> None:
        """``value`` as JSON on stdout (indented unless ``compact``)."""
        self._write(dumps(value, compact=compact) + "\n")

    def flush(self) -> None:
        """Push buffered stdout out now (pipes are block-buffered); starts no pager."""
        stream = self._pager.stream if self._pager is not None else sys.stdout
        try:
            stream.flush()
        except BrokenPipeError:
            if self._pager is not None:
                raise PagerClosed from None
            raise

    def note(self, text: Line) -> None:
        """A remark for the person at the terminal (stderr, so pipes stay clean)."""
        sys.stderr.write(self.render(text, color=self.terminal.err_color) + "\n")

    def error(self, message: str, code: int, kind: str) -> None:
        """The one error line of a failed command: ``immagent: error: …``, or with
        ``--json`` a JSON object ``{"error": {"message", "type", "exit_code"}}``."""
        if self.as_json:
            sys.stderr.write(dumps({"error": {"message": message, "type": kind,
                                              "exit_code": code}}, compact=True) + "\n")
            return
        self.note((Painted("immagent: error:", "error"), " ", message))

    def close(self) -> None:
        """Finish the pager, if one was started (waits until the reader quits it)."""
        pager, self._pager = self._pager, None
        self._pager_command = None
        if pager is not None:
            pager.close()


def _sgr(part: str, on: bool) -> str:
    shown = visible(part)
    style = getattr(part, "style", None)
    if not on or style is None or not shown:
        return shown
    return f"\x1b[{STYLES[style]}m{shown}\x1b[0m"


def dumps(value: Any, *, compact: bool = False) -> str:
    """JSON text of ``value`` (builtins of our data types), safe on a terminal."""
    text = json.dumps(jsonable(value), ensure_ascii=False, indent=None if compact else 2,
                      separators=(",", ":") if compact else None)
    return json_text(text)
