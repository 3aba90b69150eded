"""Output for people and scripts: aligned tables, human sizes, JSON, progress on a TTY."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from pathlib import PurePath
from typing import Any, TextIO
from uuid import UUID

import msgspec

from immagent.assets import Message

__all__ = [
    "Output",
    "Progress",
    "clip",
    "human_bytes",
    "jsonable",
    "local_time",
    "message_json",
    "message_line",
    "table",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal above bytes."""
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def local_time(moment: datetime, *, seconds_only: bool = True) -> str:
    """A timestamp in the local time zone, ``2026-11-25 10:31:02 +0100``."""
    shown = moment.astimezone()
    return shown.strftime("%Y-%m-%d %H:%M:%S %z" if seconds_only else "%Y-%m-%d %H:%M:%S.%f %z")


def clip(text: str, width: int) -> str:
    """The first line of ``text``, cut to ``width`` characters with an ellipsis."""
    lines = text.strip().splitlines() or [""]
    first = lines[0]
    if len(first) > width or len(lines) > 1:
        return first[: max(width - 1, 0)] + "…"
    return first


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          right: Iterable[int] = ()) -> list[str]:
    """Rows aligned under ``headers``; columns listed in ``right`` are right-aligned."""
    body = [list(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(headers, *body, strict=False)]
    flush_right = set(right)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in flush_right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in body)]


def jsonable(value: Any) -> Any:
    """JSON builtins of structs, dataclasses, named tuples, UUIDs, datetimes, paths, enums;
    digests (bytes) as hex. Field names are the Python ones, never storage aliases."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID | PurePath):
        return str(value)
    if isinstance(value, msgspec.Struct):
        return {f: jsonable(getattr(value, f)) for f in value.__struct_fields__}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [jsonable(v) for v in value]
    raise TypeError(f"cannot show a {type(value).__name__} as JSON")


def message_json(message: Message) -> dict[str, Any]:
    """A message as a JSON object (fields left at their default omitted) plus its digest."""
    data = {k: v for k, v in jsonable(message).items()
            if v is not None and not (k in ("is_error", "interrupted") and v is False)}
    data["digest"] = message.digest.hex()
    return data


def message_line(message: Message, width: int = 100) -> str:
    """One line that says who said what (tool calls included), for logs and tables."""
    text = message.content or ""
    if message.tool_calls:
        calls = ", ".join(f"{c.name}({c.arguments})" for c in message.tool_calls)
        text = f"{text} [calls {calls}]" if text else f"[calls {calls}]"
    role: str = message.role
    if message.role == "tool":
        role = f"tool{' error' if message.is_error else ''} {message.tool_call_id or ''}".strip()
    if message.interrupted:
        role += " (interrupted)"
    return clip(f"{role}: {text}", width)


class Output:
    """Where a command writes: stdout for results (text or JSON), stderr for the rest."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    @staticmethod
    def line(text: str = "") -> None:
        """One line of human output on stdout."""
        sys.stdout.write(text + "\n")

    def lines(self, texts: Iterable[str]) -> None:
        """Several lines of human output on stdout."""
        for text in texts:
            self.line(text)

    @staticmethod
    def json(value: Any, *, compact: bool = False) -> None:
        """``value`` as JSON on stdout (indented unless ``compact``)."""
        text = json.dumps(jsonable(value), ensure_ascii=False,
                          indent=None if compact else 2,
                          separators=(",", ":") if compact else None)
        sys.stdout.write(text + "\n")

    @staticmethod
    def flush() -> None:
        """Push buffered stdout out now (pipes are block-buffered)."""
        sys.stdout.flush()

    @staticmethod
    def note(text: str) -> None:
        """A remark for the person at the terminal (stderr, so pipes stay clean)."""
        sys.stderr.write(text + "\n")


class Progress:
    """A one-line counter on stderr, redrawn in place; silent unless stderr is a TTY."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int | None = None, *_: object) -> None:
        """Show ``done`` (of ``total``) items so far."""
        if not self.enabled:
            return
        shown = f"{done}/{total}" if total else str(done)
        self.stream.write(f"\r{self.label}: {shown}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def status(self, text: str) -> None:
        """Show a short status (e.g. while waiting for a model) until the next finish()."""
        if self.enabled:
            self.stream.write(f"\r{self.label}{text}\x1b[K")
            self.stream.flush()
            self._drawn = True

    def finish(self) -> None:
        """Erase the counter line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
