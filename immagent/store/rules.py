"""The content rules every stored record meets, whichever path made it: the write path's
rules (the log runs them on every commit), not an audit.

The API checks its input when it builds a record (``Store.create_agent``, ``Store.append``,
``EventLog.commit``); a bundle carries records nobody checked. Both run the functions here,
so an imported store holds nothing the API would have refused, and an export never writes
what an import would refuse; a chain read checks node counters by the same rule. Digests
prove a record is intact; these rules say it is acceptable.
"""

from __future__ import annotations

from collections.abc import Sequence

from immagent.assets import Asset, Digest, Kind, Message, SystemPrompt, Tools
from immagent.exceptions import ValidationError
from immagent.records import StateRow, load_agent
from immagent.validate import (
    MAX_NAME_BYTES,
    MAX_STREAM_BYTES,
    check_agent_fields,
    check_config,
    check_text,
    check_token_count,
    check_tool_schemas,
)

__all__ = ["check_asset_content", "check_counters", "check_message", "check_state_content",
           "check_stream"]


def check_stream(field: str, stream: object) -> str:
    """A state's stream: a str of at most MAX_STREAM_BYTES UTF-8 bytes, without NUL (it is
    indexed, and PostgreSQL text cannot hold NUL). Blank is allowed: not every client's
    streams are names."""
    if not isinstance(stream, str):
        raise ValidationError(field, f"must be a str, got {type(stream).__name__}", None)
    if stream.strip():
        return check_text(field, stream, max_bytes=MAX_STREAM_BYTES)
    return stream


def check_state_content(row: StateRow, field: str = "state") -> None:
    """The rules of a state row's content, by kind (``row`` has passed
    ``records.check_state``): an agent state's fields are what ``create_agent`` accepts.
    Kinds without rules of their own only get the stream check."""
    check_stream(f"{field}.stream", row.stream)
    if row.kind == Kind.AGENT_STATE:
        record = load_agent(row)
        check_agent_fields(record.name, record.model, record.model_config, record.metadata)


def check_message(field: str, message: Message) -> None:
    """What ``append`` requires of a message beyond its type: token counts from 0 to
    2**63 - 1, a ``call_config`` that is a valid model config (no credential, bounded
    nesting, no cycle), and a request digest (and the tools it offered) on an assistant
    message only, as 32-byte digests."""
    check_token_count(f"{field}.input_tokens", message.input_tokens)
    check_token_count(f"{field}.output_tokens", message.output_tokens)
    if message.model is not None and len(message.model.encode("utf-8", "replace")) > \
            MAX_NAME_BYTES:
        raise ValidationError(f"{field}.model", f"is longer than the limit of "
                              f"{MAX_NAME_BYTES} bytes", None)
    if message.call_config is not None:
        check_config(message.call_config, f"{field}.call_config")
    for name in ("request", "tools"):
        value = getattr(message, name)
        if value is None:
            continue
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValidationError(f"{field}.{name}", "must be a 32-byte digest", None)
        if message.role != "assistant":
            raise ValidationError(f"{field}.{name}", "only an assistant message records "
                                  "the request of its model call", None)
    if message.tools is not None and message.request is None:
        raise ValidationError(f"{field}.tools", "the tools offered are part of a recorded "
                              "request: a message with tools needs its request digest", None)


def check_asset_content(asset: Asset, field: str = "asset") -> None:
    """The rules of a decoded asset: a system prompt is non-blank text without NUL, a
    message passes ``check_message``; a node's counters need its chain (``check_counters``)."""
    if isinstance(asset, SystemPrompt):
        check_text(f"{field}.text", asset.text)
    elif isinstance(asset, Message):
        check_message(field, asset)
    elif isinstance(asset, Tools):
        check_tool_schemas(f"{field}.schemas", asset.schemas)



def check_counters(node: Digest, claimed: tuple[int, int], parent: tuple[int, int] | None,
                   element_sizes: Sequence[int]) -> str | None:
    """Why the counters a node claims (``claimed``: its (length, size)) are wrong, None if
    right: they must be its parent's (``parent``: its (length, size); None for a root)
    plus its elements' count and body bytes. Listings trust the counters, so a crafted one
    is refused (by chain reads and bundle reads alike)."""
    base_length, base_size = parent if parent is not None else (0, 0)
    length = base_length + len(element_sizes)
    size = base_size + sum(element_sizes)
    if claimed != (length, size):
        return (f"node {node.hex()} claims {claimed[0]} elements ({claimed[1]} bytes), its "
                f"chain holds {length} ({size})")
    return None
