"""Formatting for people and scripts: visible text, styled parts, aligned tables that fit
a width, human sizes, times, JSON values, progress on a TTY. Pure: nothing here decides
where output goes (``cli.output`` does).

Stored text (names, prompts, messages) may hold terminal control sequences: an ESC that
clears the screen or retitles the window, a carriage return that overwrites a line, a
bidi override that reorders it. Everything printed for people goes through ``visible``,
once, in ``Output``; ``--json`` keeps the exact text (JSON escapes every such character).
Colour is added after that, around ``Painted`` parts only, so no stored text can carry an
escape sequence of its own to the terminal.

Sizes are counted one way everywhere: **content bytes**, the canonical (uncompressed)
bytes of each asset's body, what its digest covers and what a bundle carries, so export,
verify, verify-bundle, the listings and ``stats``' logical size agree on one state in any
store. Only storage costs are counted as stored (compressed) bytes, and say so: ``stats``'
STORED column, gc's freed bytes, and the size on disk.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from pathlib import PurePath
from typing import Any, TextIO
from uuid import UUID

import msgspec

from immagent.assets import Asset, Item, Kind, Message, Value

__all__ = [
    "STYLES",
    "Line",
    "Painted",
    "Progress",
    "clip",
    "columns",
    "element_json",
    "element_line",
    "human_bytes",
    "json_text",
    "jsonable",
    "local_time",
    "message_json",
    "message_line",
    "message_said",
    "paint",
    "plural",
    "table",
    "visible",
    "with_calls",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

# Characters that act on a terminal instead of being shown: C0 controls but tab and line
# feed, DEL, C1 controls (U+009B is a one-byte CSI), and the bidi controls that reorder
# what follows ("Trojan source").
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# Lone surrogates too: a terminal's encoder cannot write them (a stream may split a pair
# across chunks; cli.chat joins those before they get here).
_ACTIVE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}\ud800-\udfff]")

#: SGR parameters of each style a ``Painted`` part may have (git's palette: ids yellow).
STYLES: Mapping[str, str] = {
    "id": "33", "head": "1", "user": "32", "assistant": "36", "tool": "35", "system": "34",
    "error": "1;31", "warning": "33", "ok": "32", "dim": "2",
}


class Painted(str):
    """A part of a line shown in ``style`` (a key of STYLES) when colour is on."""

    style: str

    def __new__(cls, text: str, style: str) -> Painted:
        part = super().__new__(cls, text)
        part.style = style
        return part


def paint(text: str, style: str) -> Painted:
    """``text`` to be shown in ``style`` when colour is on (plain otherwise)."""
    return Painted(text, style)


#: One line of output: plain text, or parts of which the Painted ones carry a style.
Line = str | Sequence[str]


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # a control picture: ␛ for ESC, one column wide
    if code == 0x7F:
        return "\u2421"  # ␡
    return f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"


def visible(text: str) -> str:
    """``text`` with every character that would act on a terminal shown as a visible
    stand-in instead (ESC as ``␛``, U+009B as ``\\x9b``, U+202E as ``\\u202e``); tabs
    and line feeds are kept."""
    return _ACTIVE.sub(_shown, text)


def json_text(text: str) -> str:
    """JSON text with the characters ``visible`` replaces escaped as ``\\uXXXX``: the same
    JSON value (they only occur inside strings), safe to print on a terminal."""
    return _ACTIVE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal above bytes."""
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def local_time(moment: datetime, *, seconds_only: bool = True, short: bool = False) -> str:
    """A timestamp in the local time zone, ``2026-11-25 10:31:02 +0100`` (``short``:
    ``2026-11-25 10:31``, for tables)."""
    shown = moment.astimezone()
    if short:
        return shown.strftime("%Y-%m-%d %H:%M")
    return shown.strftime("%Y-%m-%d %H:%M:%S %z" if seconds_only else "%Y-%m-%d %H:%M:%S.%f %z")


def _char_columns(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def columns(text: str) -> int:
    """Terminal columns ``text`` takes once shown (``visible``): wide characters count 2,
    combining marks 0, every stand-in ``visible`` makes for a control character counts."""
    shown = visible(text)
    if shown.isascii():
        return len(shown)
    return sum(map(_char_columns, shown))


def clip(text: str, width: int) -> str:
    """The first line of ``text``, cut to ``width`` columns with an ellipsis."""
    lines = text.strip().splitlines() or [""]
    first = lines[0]
    if columns(first) <= width and len(lines) == 1:
        return first
    kept, used = [], 1  # the ellipsis
    for char in first:
        used += columns(char)
        if used > width:
            break
        kept.append(char)
    cut = "".join(kept) + "…"
    return Painted(cut, first.style) if isinstance(first, Painted) else cut


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 state``, ``2 states`` (``many`` for irregular plurals)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          right: Iterable[int] = (), shrink: Iterable[int] = (), drop: Sequence[int] = (),
          width: int | None = None) -> list[tuple[str, ...]]:
    """Rows aligned under ``headers`` (bold when colour is on); columns in ``right`` are
    right-aligned. With ``width``, the columns in ``shrink`` give up columns (widest
    first, cells clipped with an ellipsis, never below their header or 6) until a line
    fits; if that is not enough, the columns in ``drop`` are left out, in that order.
    Each line is a tuple of parts: cells keep their style, padding is plain."""
    body = [list(r) for r in rows]
    head = [paint(h, "head") for h in headers]
    widths = [max(columns(c) for c in col) for col in zip(headers, *body, strict=False)]
    flexible = set(shrink)
    shown = list(range(len(headers)))
    if width is not None:
        floor = {i: max(columns(headers[i]), 6) for i in flexible}

        def excess(least: bool = False) -> int:
            used = sum(min(widths[i], floor[i]) if least and i in flexible else widths[i]
                       for i in shown)
            return used + 2 * (len(shown) - 1) - width

        for i in drop:  # what cannot fit even with the flexible columns at their least
            if excess(least=True) <= 0:
                break
            shown.remove(i)
        while excess() > 0:  # the widest flexible column first, a column at a time
            candidates = [i for i in flexible if i in shown and widths[i] > floor[i]]
            if not candidates:
                break
            widths[max(candidates, key=widths.__getitem__)] -= 1
        for r in body:
            for i in flexible:
                if columns(r[i]) > widths[i]:
                    r[i] = clip(r[i], widths[i])
    flush_right = set(right)

    def line(cells: Sequence[str]) -> tuple[str, ...]:
        parts: list[str] = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            if i not in shown:
                continue
            pad = " " * (w - columns(cell))
            parts += [pad, cell] if i in flush_right else [cell, pad]
            parts.append("  ")
        while parts and not parts[-1].strip():
            parts.pop()
        return tuple(parts)

    return [line(head), *(line(r) for r in body)]


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


def with_calls(text: str, calls: str) -> str:
    """``text`` followed by the tool calls a reply makes (``calls``: each as name(args))."""
    return f"{text} [calls {calls}]" if text else f"[calls {calls}]"


def message_said(message: Message) -> tuple[str, str]:
    """Who said what: the role (a tool result's with its call id, a reply cut short marked
    interrupted) and the text, tool calls included."""
    text = message.content or ""
    if message.tool_calls:
        text = with_calls(text, ", ".join(f"{c.name}({c.arguments})"
                                          for c in message.tool_calls))
    role: str = message.role
    if message.role == "tool":
        role = f"tool{' error' if message.is_error else ''} {message.tool_call_id or ''}".strip()
    if message.interrupted:
        role += " (interrupted)"
    return role, text


def message_line(message: Message, width: int = 100) -> str:
    """One line that says who said what (tool calls included), for logs and tables."""
    role, text = message_said(message)
    return clip(f"{role}: {text}", width)


def element_line(element: Asset, width: int = 100) -> str:
    """One line for a chain's element: a message as ``message_line``, a session item as
    its JSON, a checkpoint value by type, size and digest."""
    if isinstance(element, Message):
        return message_line(element, width)
    if isinstance(element, Item):
        return clip(json.dumps(element.value, ensure_ascii=False, sort_keys=True), width)
    if isinstance(element, Value):
        return f"a {element.type} value of {len(element.data)} bytes " \
               f"({element.digest.hex()[:16]})"
    return f"{Kind(element.kind).name.lower()} {element.digest.hex()[:16]}"


def element_json(element: Asset) -> dict[str, Any]:
    """A chain's element as a JSON object: a message as ``message_json``, else its kind and
    digest (and a session item's value)."""
    if isinstance(element, Message):
        return message_json(element)
    return {"kind": Kind(element.kind).name.lower(), "digest": element.digest.hex(),
            **({"value": element.value} if isinstance(element, Item) else {})}


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
