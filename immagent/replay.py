"""Exact replay: rebuild the request a stored reply answered, prove it, and send it again.

An assistant message records the digest of its model call's request
(``Message.request``, ``immagent.requests``). ``rebuild`` reads the parts back from the
store — the agent's system prompt, the conversation before the message, the ``Tools``
asset the message references, the model and ``call_config`` it records — builds the
request record and compares its digest with the recorded one: equal means the store holds
exactly what the call was given. ``replay`` then sends that request again (the same
``immagent.llm`` call path) and compares the new answer with the recorded one.

A message written before requests were recorded has none: its request is *unknown*
(``Rebuilt.known`` is False), which is reported, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec

from immagent import requests
from immagent.assets import Digest, Message, SystemPrompt, Tools
from immagent.exceptions import IntegrityError, ValidationError

if TYPE_CHECKING:
    from immagent.agent import PersistentAgent
    from immagent.clients.agents import Store

__all__ = ["Change", "Rebuilt", "Replayed", "rebuild", "rebuild_from", "replay"]


class Rebuilt(msgspec.Struct, frozen=True):
    """The request of the reply at ``index`` (0-based) of a conversation, rebuilt."""

    index: int
    message: Message  # the recorded reply
    system_prompt: str
    sent: tuple[Message, ...]  # the messages the call was given
    tools: tuple[dict[str, Any], ...] | None  # the schemas offered (None: none recorded)
    request: requests.Request  # the record rebuilt from the parts above
    state: UUID | None = None  # the state whose conversation holds the reply

    @property
    def recorded(self) -> Digest | None:
        """The digest the reply recorded (None: written before requests were recorded)."""
        return self.message.request

    @property
    def known(self) -> bool:
        """Whether the reply recorded its request at all."""
        return self.message.request is not None

    @property
    def digest(self) -> Digest:
        """The rebuilt request's digest."""
        return self.request.digest

    @property
    def proven(self) -> bool:
        """The rebuilt request hashes to the recorded digest: the store holds exactly what
        the call was given."""
        return self.known and self.request.digest == self.message.request


class Change(msgspec.Struct, frozen=True):
    """One field that differs between the recorded and the replayed answer."""

    field: str
    recorded: Any
    replayed: Any


class Replayed(msgspec.Struct, frozen=True):
    """The recorded answer beside a new one to the same request."""

    rebuilt: Rebuilt
    answer: Message
    changes: tuple[Change, ...]

    @property
    def same(self) -> bool:
        """The new answer is the recorded one (same content, tool calls and usage)."""
        return not self.changes


#: The fields of an answer that are compared (the request, model and call_config are equal
#: by construction; ``interrupted`` says how the recorded one ended).
_ANSWER_FIELDS = ("content", "tool_calls", "input_tokens", "output_tokens", "interrupted")


def rebuild_from(system_prompt: str, conversation: Sequence[Message], index: int | None = None,
                 tools: Tools | None = None) -> Rebuilt:
    """The request of the assistant message at ``index`` (0-based; None: the newest that
    recorded one, else the newest assistant message) of ``conversation``, with the agent's
    ``system_prompt`` and the ``tools`` asset the message references (None when it
    references none). ValidationError for an index that names no assistant message, or a
    ``tools`` asset that is not the one it references."""
    messages = tuple(conversation)
    position = _position(messages, index)
    reply = messages[position]
    if tools is not None and reply.tools != tools.digest:
        raise ValidationError("tools", "is not the tools asset the message references", None)
    if reply.tools is not None and tools is None:
        raise ValidationError("tools", "the message references a tools asset; pass it", None)
    sent = messages[:position]
    record = requests.Request(
        version=requests.REQUEST_VERSION, model=reply.model or "",
        system=SystemPrompt(text=system_prompt).digest,
        messages=tuple(m.digest for m in sent),
        tools=None if tools is None else tools.digest, params=dict(reply.call_config or {}))
    return Rebuilt(index=position, message=reply, system_prompt=system_prompt, sent=sent,
                   tools=None if tools is None else tuple(tools.schemas), request=record)


async def rebuild(store: Store, agent: PersistentAgent | UUID | str,
                  index: int | None = None) -> Rebuilt:
    """``rebuild_from`` over an agent state of ``store``: its system prompt, its
    conversation (read once) and the tools asset the reply references, read back and
    verified like every read."""
    state = agent if not isinstance(agent, UUID | str) else await store.load_agent(agent)
    messages = await state.get_messages()
    position = _position(messages, index)
    reply = messages[position]
    tools = None
    if reply.tools is not None:
        (tools,) = await store.get_assets([reply.tools], Tools, "tools")
    rebuilt = rebuild_from(await state.get_system_prompt(), messages, position, tools)
    return msgspec.structs.replace(rebuilt, state=state.id)


async def replay(rebuilt: Rebuilt, *, max_retries: int = 3, timeout: float | None = 120.0,
                 ) -> Replayed:
    """Send the rebuilt request again (``immagent.llm.complete``, the path the turn took)
    and compare the answer with the recorded one. Only a proven request is sent
    (a request that is unknown, ValidationError, or that the store no longer holds
    exactly, IntegrityError, cannot be replayed exactly)."""
    if not rebuilt.known:
        raise ValidationError("rebuilt", f"cannot replay message {rebuilt.index}: its "
                              "request is unknown (written before requests were recorded)",
                              None)
    if not rebuilt.proven:
        raise IntegrityError(f"cannot replay message {rebuilt.index}: the request rebuilt "
                             "from the store does not hash to the recorded digest")
    from immagent import llm  # the model layer loads on a replay only

    answer = await llm.complete(
        rebuilt.request.model, rebuilt.system_prompt, rebuilt.sent,
        tools=None if rebuilt.tools is None else list(rebuilt.tools),
        config=rebuilt.request.params, max_retries=max_retries, timeout=timeout)
    if answer.request != rebuilt.digest:  # the call path rebuilt another request
        raise ValidationError("rebuilt", "the call sent a request other than the recorded "
                              "one", None)
    changes = tuple(Change(name, getattr(rebuilt.message, name), getattr(answer, name))
                    for name in _ANSWER_FIELDS
                    if getattr(rebuilt.message, name) != getattr(answer, name))
    return Replayed(rebuilt=rebuilt, answer=answer, changes=changes)


def _position(messages: Sequence[Message], index: int | None) -> int:
    """The 0-based position of the reply to rebuild (see ``rebuild_from``)."""
    if index is None:
        replies = [i for i, m in enumerate(messages) if m.role == "assistant"]
        recorded = [i for i in replies if messages[i].request is not None]
        if not replies:
            raise ValidationError("index", "the conversation holds no assistant message",
                                  None)
        return (recorded or replies)[-1]
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValidationError("index", f"must be an int, got {type(index).__name__}", index)
    if not 0 <= index < len(messages):
        raise ValidationError("index", f"the conversation holds {len(messages)} messages, "
                              f"there is no message {index}", index)
    if messages[index].role != "assistant":
        raise ValidationError("index", f"message {index} is a {messages[index].role} "
                              "message; only an assistant message answers a request", index)
    return index
