"""How the command line reads a state of each client of the store: an agent state
(PersistentAgent), a LangGraph checkpoint (one state of a thread), an OpenAI Agents SDK
session state, a pydantic-ai conversation state.

A client's ``View`` says how its states are named, where a state's conversation is (the
head of a hash chain of elements: messages, channel values or items), how an element reads
(who said what, and whether it starts a turn), and what ``show`` prints about a state.
Everything is read through the store's public API and the core's data types
(``records``, ``checkpoints``, ``assets``), not through the clients' own code (but for the
id of a pydantic-ai conversation's scope entry, which its client derives), so a store any
client wrote is shown without LangGraph, the Agents SDK or pydantic-ai installed, and a
value is decoded as data (LangGraph's msgpack with its classes named, never imported or
constructed; pydantic-ai's JSON).

A *turn* is a user's message, for every client: an agent's ``user`` message, a session's
item with role ``user``, a thread's ``HumanMessage``, a pydantic-ai request with a user
prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple
from uuid import UUID

import msgspec

from immagent import checkpoints as cp
from immagent.assets import (
    Asset,
    ConversationNode,
    Digest,
    Entry,
    Item,
    Kind,
    Message,
    Value,
)
from immagent.cli.errors import CLIError
from immagent.cli.render import message_json, message_said, with_calls
from immagent.records import StateRow, conversation_body, load_agent, session_body
from immagent.store import EventLog

__all__ = ["VIEWS", "AgentView", "ConversationView", "Said", "SessionView", "ThreadView", "View",
           "content_bytes", "conversation_ids", "view_of"]

#: Rows read per page when a conversation's states are gathered.
_PAGE = 1000


class Said(NamedTuple):
    """One element of a conversation as a person reads it."""

    role: str  # who: user, assistant, tool …, human, ai …
    text: str  # what (tool calls included), on any number of lines
    turn: bool  # a user's message: it starts a turn
    style: str  # how its role is coloured: user, assistant, tool or system


def _style(role: str) -> str:
    if role in ("user", "human"):
        return "user"
    if role.startswith(("tool", "function")):
        return "tool"
    if role in ("system", "developer"):
        return "system"
    return "assistant"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _parts_text(content: Any) -> str:
    """The text of a message's content: a str, or a list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text", part.get("refusal"))
                texts.append(text if isinstance(text, str) else f"[{part.get('type', '?')}]")
            else:
                texts.append(str(part))
        return "".join(texts)
    return "" if content is None else _compact(content)


class View:
    """The command line's view of one client's states (see the module docstring)."""

    #: The state kind this client writes.
    kind: ClassVar[int]
    #: Its reference prefix (``agent:NAME``) and its listing command's noun.
    client: ClassVar[str]
    plural: ClassVar[str]
    #: What one of its states is called in ``log`` and ``show``.
    state_word: ClassVar[str]
    #: Column title of a stream's name, and what its conversation's elements are called.
    title: ClassVar[str]
    elements: ClassVar[str]
    #: The node kind of its conversation chain.
    node_kind: ClassVar[int]

    def is_head(self, row: StateRow) -> bool:
        """Whether the newest state of ``row``'s stream heads one of this client's
        conversations (a thread's subgraph namespaces do not)."""
        return True

    def name(self, row: StateRow) -> str:
        """The name a person knows the conversation by (agent name, thread id, …)."""
        return row.stream

    def ref(self, row: StateRow) -> str:
        """The reference naming this conversation's newest state."""
        return f"{self.client}:{self.name(row)}"

    def conversation(self, row: StateRow) -> Digest | None:
        """The head node of the state's conversation, or None if it has none (here: its
        first ref, as a session's and a pydantic-ai conversation's states hold it)."""
        return row.refs[0] if row.refs else None

    def said(self, element: Asset) -> Said:
        """How one element of the conversation reads."""
        raise NotImplementedError

    def element_json(self, element: Asset) -> dict[str, Any]:
        """An element for ``--json``: how it reads, its data, its digest."""
        said = self.said(element)
        return {"role": said.role, "text": said.text, **self.element_data(element),
                "digest": element.digest.hex()}

    def element_data(self, element: Asset) -> dict[str, Any]:
        """What ``--json`` shows of an element besides how it reads (its stored data)."""
        return {}

    def summary(self, row: StateRow) -> dict[str, Any]:
        """The identifying fields of a state, for ``--json``."""
        return {"id": str(row.id), "parent_id": str(row.parent_id) if row.parent_id else None,
                **self.labels(row), "created_at": row.created_at.isoformat(),
                "digest": row.digest.hex()}

    def labels(self, row: StateRow) -> dict[str, Any]:
        """What names the state's conversation in its summary."""
        return {"kind": _kind_name(row.kind), self.client: self.name(row)}

    def log_line(self, row: StateRow, elements: int | None) -> str:
        """The fields line of a state's ``log`` entry."""
        return f"{self.title.title()}: {self.name(row)}   {self.elements.title()}: {_n(elements)}"

    async def details(self, store: EventLog, row: StateRow
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
        """What ``show`` prints besides the conversation: fields, titled text sections,
        and both as JSON."""
        raise NotImplementedError


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind_{kind}"


# -- agents ------------------------------------------------------------------------------


class AgentView(View):
    """PersistentAgent's states: stream = the agent's name, refs = (prompt, conversation)."""

    kind = int(Kind.AGENT_STATE)
    client = "agent"
    plural = "agents"
    state_word = "agent"
    title = "NAME"
    elements = "messages"
    node_kind = int(Kind.NODE)

    def conversation(self, row: StateRow) -> Digest | None:
        return load_agent(row).conversation

    def said(self, element: Asset) -> Said:
        assert isinstance(element, Message)
        role, text = message_said(element)
        return Said(role, text, element.role == "user", _style(element.role))

    def element_json(self, element: Asset) -> dict[str, Any]:
        assert isinstance(element, Message)
        return message_json(element)  # every field of a message, as stored

    def labels(self, row: StateRow) -> dict[str, Any]:
        record = load_agent(row)
        return {"name": record.name, "model": record.model}

    def log_line(self, row: StateRow, elements: int | None) -> str:
        record = load_agent(row)
        return f"Name:   {record.name}   Model: {record.model}   Messages: {_n(elements)}"

    async def details(self, store: EventLog, row: StateRow
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
        from immagent.assets import SystemPrompt

        record = load_agent(row)
        (prompt,) = await store.get_assets([record.system_prompt], SystemPrompt,
                                           "system prompt")
        fields = [("model", record.model),
                  ("prompt", record.system_prompt.hex())]
        if record.model_config:
            fields.append(("model config", _compact(record.model_config)))
        if record.metadata:
            fields.append(("metadata", _compact(record.metadata)))
        data = {"system_prompt_digest": record.system_prompt.hex(),
                "conversation_digest": record.conversation.hex(),
                "model_config": dict(record.model_config), "metadata": dict(record.metadata),
                "system_prompt": prompt.text}
        return fields, [("system prompt", prompt.text)], data


# -- LangGraph threads -------------------------------------------------------------------

#: msgpack extension codes of LangGraph's serializer whose payload names a class and its
#: arguments (constructors, methods, pydantic models); shown as data, never constructed.
_CLASS_EXTS = range(0, 6)


class LangGraphObject(NamedTuple):
    """A value LangGraph's serializer stored as "construct this class": shown as data."""

    cls: str  # module.Name
    fields: Any


class Opaque(NamedTuple):
    """A value the command line does not decode (pickle, a numpy array, …)."""

    type: str
    size: int


def _ext(code: int, data: memoryview) -> Any:
    if code not in _CLASS_EXTS:
        return Opaque(f"msgpack ext {code}", len(data))
    try:
        decoded = msgspec.msgpack.decode(data, ext_hook=_ext)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return Opaque(f"msgpack ext {code}", len(data))
    if (isinstance(decoded, list) and len(decoded) >= 2 and isinstance(decoded[0], str)
            and isinstance(decoded[1], str)):
        return LangGraphObject(f"{decoded[0]}.{decoded[1]}",
                               decoded[2] if len(decoded) > 2 else None)
    return Opaque(f"msgpack ext {code}", len(data))


def decode_value(value: Value) -> Any:
    """A LangGraph channel value as data: msgpack and JSON decoded (classes named, not
    built), anything else (pickle, raw bytes) left opaque."""
    try:
        if value.type == "msgpack":
            return msgspec.msgpack.decode(value.data, ext_hook=_ext)
        if value.type == "json":
            return json.loads(value.data)
        if value.type == "null":
            return None
    except (msgspec.DecodeError, ValueError, RecursionError):
        pass
    return Opaque(value.type, len(value.data))


def _value_said(decoded: Any) -> Said:
    if isinstance(decoded, LangGraphObject) and isinstance(decoded.fields, dict):
        short = decoded.cls.rsplit(".", 1)[-1]
        fields = decoded.fields
        if short.endswith(("Message", "MessageChunk")) and "content" in fields:
            role = str(fields.get("type") or short.removesuffix("Chunk")
                       .removesuffix("Message").lower())
            text = _parts_text(fields.get("content"))
            calls = fields.get("tool_calls")
            if isinstance(calls, list) and calls:
                text = with_calls(text, ", ".join(f"{c.get('name')}({_compact(c.get('args', {}))})"
                                                  for c in calls if isinstance(c, dict)))
            if role == "tool" and fields.get("tool_call_id"):
                role = f"tool {fields['tool_call_id']}"
            return Said(role, text, role == "human", _style(role))
        return Said(short, _compact(fields), False, "assistant")
    if isinstance(decoded, Opaque):
        return Said("value", f"({decoded.type}, {decoded.size} bytes)", False, "assistant")
    return Said("value", _compact(decoded), False, "assistant")


class ThreadView(View):
    """LangGraph checkpoints (ImmAgentSaver): stream = the thread id (U+001F and the
    namespace for a subgraph's), refs = the channel values; the conversation is the
    ``messages`` channel (or the first list channel)."""

    kind = int(Kind.CHECKPOINT)
    client = "thread"
    plural = "threads"
    state_word = "checkpoint"
    title = "THREAD"
    elements = "messages"
    node_kind = int(Kind.VALUE_NODE)

    def is_head(self, row: StateRow) -> bool:
        return cp.SEP not in row.stream

    def name(self, row: StateRow) -> str:
        return row.stream.split(cp.SEP)[0]

    def channels(self, row: StateRow) -> list[tuple[str, Any, tuple[Digest, ...]]]:
        """(channel, shape, its refs) of a checkpoint, in refs order."""
        body = cp.decode_checkpoint(row.body)
        refs = iter(row.refs)
        return [(name, shape, tuple(next(refs) for _ in cp.shape_kinds(shape)))
                for name, shape in body.values]

    def conversation(self, row: StateRow) -> Digest | None:
        chains = [(name, refs[0]) for name, shape, refs in self.channels(row)
                  if shape == cp.CHAIN]
        for name, head in chains:
            if name == "messages":
                return head
        return chains[0][1] if chains else None

    def said(self, element: Asset) -> Said:
        assert isinstance(element, Value)
        return _value_said(decode_value(element))

    def element_data(self, element: Asset) -> dict[str, Any]:
        assert isinstance(element, Value)
        return {"value": decode_value(element)}

    def summary(self, row: StateRow) -> dict[str, Any]:
        body = cp.decode_checkpoint(row.body)
        _, ns, _ = cp.parse_stream(row.kind, row.stream)
        return super().summary(row) | {
            "namespace": ns, "checkpoint_id": cp.expand_id(body.checkpoint_id),
            "parent_checkpoint_id": (None if body.parent is None
                                     else cp.expand_id(body.parent)),
            "step": (body.metadata or {}).get("step"),
            "source": (body.metadata or {}).get("source")}

    def log_line(self, row: StateRow, elements: int | None) -> str:
        info = self.summary(row)
        step = "" if info["step"] is None else f"   Step: {info['step']}"
        source = "" if info["source"] is None else f" ({info['source']})"
        ns = f" [{info['namespace']}]" if info["namespace"] else ""
        return (f"Thread: {info['thread']}{ns}   Checkpoint: {info['checkpoint_id']}"
                f"{step}{source}   Messages: {_n(elements)}")

    async def details(self, store: EventLog, row: StateRow
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
        info = self.summary(row)
        body = cp.decode_checkpoint(row.body)
        channels = self.channels(row)
        sizes = await content_bytes(store, [d for _, _, refs in channels for d in refs])
        shown = []
        data_channels = []
        for name, shape, refs in channels:
            size = sum(sizes[d] for d in refs)
            form = "list" if shape == cp.CHAIN else "value" if shape == cp.LEAF else "values"
            shown.append(f"{name} ({form}, {size} B)")
            data_channels.append({"name": name, "form": form, "bytes": size})
        writes = await store.count_states(
            Kind.CHECKPOINT_WRITES,
            stream=cp.writes_stream(info["thread"], info["namespace"], info["checkpoint_id"]))
        fields = [("namespace", info["namespace"])] if info["namespace"] else []
        fields += [("checkpoint id", info["checkpoint_id"]),
                   ("parent checkpoint", info["parent_checkpoint_id"] or "-"),
                   ("timestamp", cp.decode_ts(body.ts)),
                   ("step", f"{_n(info['step'])} ({info['source'] or '?'})"),
                   ("channels", ", ".join(shown) or "-"),
                   ("pending writes", str(writes))]
        metadata = body.metadata or {}
        data = {"metadata": metadata, "channels": data_channels, "pending_writes": writes,
                "timestamp": cp.decode_ts(body.ts)}
        return fields, [], data


# -- OpenAI Agents SDK sessions ----------------------------------------------------------


def _item_said(value: Any) -> Said:
    if not isinstance(value, dict):
        return Said("item", _compact(value), False, "assistant")
    kind, role = value.get("type"), value.get("role")
    if kind == "function_call":
        return Said("assistant", with_calls("", f"{value.get('name')}({value.get('arguments')})"),
                    False, "assistant")
    if kind == "function_call_output":
        output = value.get("output")
        text = output if isinstance(output, str) else _compact(output)
        return Said(f"tool {value.get('call_id', '')}".strip(), text, False, "tool")
    if isinstance(role, str):
        return Said(role, _parts_text(value.get("content")), role == "user", _style(role))
    rest = {k: v for k, v in value.items() if k not in ("type", "id")}
    return Said(str(kind or "item"), _compact(rest), False, "assistant")


class SessionView(View):
    """ImmAgentSession's states: stream = the session id, refs = the head item node of each
    branch (``main`` first); the conversation is ``main``."""

    kind = int(Kind.SESSION_STATE)
    client = "session"
    plural = "sessions"
    state_word = "session state"
    title = "SESSION"
    elements = "items"
    node_kind = int(Kind.ITEM_NODE)

    def said(self, element: Asset) -> Said:
        assert isinstance(element, Item)
        return _item_said(element.value)

    def element_data(self, element: Asset) -> dict[str, Any]:
        assert isinstance(element, Item)
        return {"item": element.value}

    def branches(self, row: StateRow) -> list[tuple[str, Digest]]:
        """(name, head node) of every branch of a session state, ``main`` first."""
        body = session_body(row)
        return list(zip(["main", *(b.name for b in body.branches)], row.refs, strict=True))

    def log_line(self, row: StateRow, elements: int | None) -> str:
        names = ", ".join(name for name, _ in self.branches(row))
        return f"Session: {row.stream}   Branches: {names}   Items: {_n(elements)}"

    async def details(self, store: EventLog, row: StateRow
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
        body = session_body(row)
        branches = self.branches(row)
        nodes = await store.get_assets([head for _, head in branches], ConversationNode,
                                       "item node")
        shown = [f"{name} ({node.length} items)"
                 for (name, _), node in zip(branches, nodes, strict=True)]
        fields = [("branches", ", ".join(shown))]
        if body.generation:
            fields.append(("cleared", f"{body.generation} time(s)"))
        if body.retired:
            fields.append(("retired names", ", ".join(body.retired)))
        data = {"branches": [{"name": name, "head": head.hex(), "items": node.length}
                             for (name, head), node in zip(branches, nodes, strict=True)],
                "retired": list(body.retired), "generation": body.generation}
        return fields, [], data


# -- pydantic-ai conversations -----------------------------------------------------------


def _entry_said(message: bytes) -> Said:
    """A pydantic-ai message (its JSON, as the client serialized it), read as data."""
    try:
        value = json.loads(message)
    except ValueError:
        return Said("entry", f"({len(message)} bytes)", False, "assistant")
    if not isinstance(value, dict):
        return Said("entry", _compact(value), False, "assistant")
    parts = value.get("parts")
    if not isinstance(parts, list):
        parts = []
    role: str | None = None
    texts: list[str] = []
    turn = False
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("part_kind")
        if kind == "user-prompt":
            role, turn = role or "user", True
            texts.append(_parts_text(part.get("content")))
        elif kind in ("system-prompt", "text"):
            role = role or ("system" if kind == "system-prompt" else "assistant")
            texts.append(_parts_text(part.get("content")))
        elif kind == "tool-call":
            role = role or "assistant"
            args = part.get("args")
            shown = args if isinstance(args, str) else _compact(args)
            texts.append(with_calls("", f"{part.get('tool_name')}({shown})"))
        elif kind in ("tool-return", "retry-prompt"):
            role = role or f"tool {part.get('tool_call_id') or ''}".strip()
            content = part.get("content")
            texts.append(content if isinstance(content, str) else _compact(content))
    if role is None:
        role = "user" if value.get("kind") == "request" else "assistant"
    return Said(role, "\n".join(t for t in texts if t), turn, _style(role.split()[0]))


class ConversationView(View):
    """pydantic-ai conversations (ImmAgentConversationStore): stream = the conversation id,
    refs = the entry-chain link ending at its head, then one per branch it left; a
    deleted conversation's newest state is a tombstone that pins nothing."""

    kind = int(Kind.CONVERSATION_STATE)
    client = "conversation"
    plural = "conversations"
    state_word = "conversation state"
    title = "CONVERSATION"
    elements = "messages"
    node_kind = int(Kind.ENTRY_NODE)

    def is_head(self, row: StateRow) -> bool:
        return not conversation_body(row).deleted

    def said(self, element: Asset) -> Said:
        assert isinstance(element, Entry)
        return _entry_said(element.message)

    def element_data(self, element: Asset) -> dict[str, Any]:
        assert isinstance(element, Entry)
        return {"entry_id": element.entry_id}

    def log_line(self, row: StateRow, elements: int | None) -> str:
        body = conversation_body(row)
        title = f"   Title: {body.title}" if body.title else ""
        gone = "   (deleted)" if body.deleted else ""
        return f"Conversation: {row.stream}{title}   Messages: {_n(elements)}{gone}"

    async def details(self, store: EventLog, row: StateRow
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
        body = conversation_body(row)
        fields: list[tuple[str, str]] = []
        if body.deleted:
            fields.append(("deleted", "yes (a tombstone: it pins nothing)"))
        if body.title:
            fields.append(("title", body.title))
        if body.scope is not None:
            fields.append(("scope", body.scope))
        if body.forked_from:
            fields.append(("forked from", body.forked_from))
        if body.branches:
            fields.append(("branches left", str(len(body.branches))))
        data = {"title": body.title, "scope": body.scope, "deleted": body.deleted,
                "forked_from": body.forked_from, "branches_left": len(body.branches),
                "metadata": body.metadata}
        return fields, [], data


VIEWS: dict[int, View] = {v.kind: v for v in (AgentView(), ThreadView(), SessionView(),
                                               ConversationView())}


def view_of(row: StateRow) -> View:
    """The view of ``row``'s client (CLIError for a kind the command line does not show:
    a checkpoint's pending writes, the store's compression state)."""
    view = VIEWS.get(row.kind)
    if view is None:
        names = {int(Kind.CHECKPOINT_WRITES): "a LangGraph checkpoint's pending writes",
                 int(Kind.CONVERSATION_SCOPE): "a pydantic-ai conversation's scope entry",
                 int(Kind.COMPRESSION): "the store's compression state"}
        what = names.get(row.kind, f"a state of kind {row.kind}")
        raise CLIError(f"state {row.id} is {what}: name an agent state, a checkpoint, a "
                       "session state or a conversation state")
    return view


async def content_bytes(store: EventLog, digests: Sequence[Digest]) -> dict[Digest, int]:
    """Content bytes of each asset with all it chains to: a node's whole chain (its
    ``size`` counter), any other asset's canonical body. One batched read."""
    wanted = list(dict.fromkeys(digests))
    sizes: dict[Digest, int] = {}
    for asset in await store.get_assets(wanted):
        sizes[asset.digest] = (asset.size if isinstance(asset, ConversationNode)
                               else len(asset.body))
    return sizes


async def conversation_ids(store: EventLog, newest: StateRow) -> list[UUID]:
    """Every state of the conversation whose newest state is ``newest``: a thread's rows
    of every namespace, checkpoints and writes (one index range scan over the thread's
    ids), or every state of an agent name's, a session's or a pydantic-ai conversation's
    stream (newest first; a conversation's scope entry too, as its client purges it)."""
    if newest.kind == Kind.CHECKPOINT:
        thread = newest.stream.split(cp.SEP)[0]
        low, high = cp.thread_range(thread)
        ids: list[UUID] = []
        after = low
        while page := await store.scan_states(None, after=after, limit=_PAGE):
            inside = [r for r in page if r.id < high]
            ids += [r.id for r in inside
                    if r.kind in (Kind.CHECKPOINT, Kind.CHECKPOINT_WRITES)
                    and cp.parse_stream(r.kind, r.stream)[0] == thread]
            if len(inside) < len(page) or len(page) < _PAGE:
                break
            after = page[-1].id
        return ids
    ids = []
    after_seq: int | None = None
    while page := await store.stream_states(newest.kind, newest.stream, after_seq=after_seq,
                                            limit=_PAGE):
        ids += [r.id for r in page]
        after_seq = page[-1].seq
    if newest.kind == Kind.CONVERSATION_STATE:
        from immagent.clients.conversations import scope_entry_id

        ids += [r.id for r in await store.get_states([scope_entry_id(newest.stream)])]
    return ids
