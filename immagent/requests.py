"""The request a model call is given, as a record an audit can rebuild and prove.

An assistant message records ``Message.request``: the digest of a ``Request``, everything
the call was given — the model, the system prompt, every message sent (by digest, in
order), the tool schemas offered (a ``Tools`` asset, by digest) and the call parameters —
and nothing else. Every part is content the store keeps (the prompt as the agent's
``SystemPrompt``, the messages as its conversation, the tools as the asset the message
references, the parameters as the message's ``call_config``), so ``immagent.replay``
rebuilds the record from the store and proves it hashes to what was recorded.

What is *not* in it, on purpose: credentials (a config never holds one, ``validate``
refuses them; keys come from the environment), and how the call was made (streamed or
whole, timeout, retries): a streamed turn stores exactly the bytes a whole one does.
``version`` names the rule that turns these parts into the provider's wire request
(``llm.to_litellm_messages``): a change to that rule gets a new version, so a recorded
digest always says which rule made the request.

The record is never stored (it would repeat the history's digests at every call); its
digest is ``blake3(b"immagent-request\\0" || canonical msgpack)``, the domain string
keeping it apart from every asset and state digest.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Final

import blake3
import msgspec

from immagent.assets import Digest, Message, SystemPrompt, Tools, encode

__all__ = ["REQUEST_VERSION", "Request", "build"]

#: The rule turning a request's parts into the provider's wire form (version 1:
#: ``llm.to_litellm_messages`` as it is; interrupted empty replies are left out).
REQUEST_VERSION: Final = 1
_DOMAIN: Final = b"immagent-request\x00"
_DIGEST = operator.attrgetter("digest")


class Request(msgspec.Struct, frozen=True, omit_defaults=True, dict=True):
    """Everything one model call was given. ``system`` is the digest of the system prompt
    (as a ``SystemPrompt`` asset), ``messages`` the digests of the messages sent, oldest
    first, ``tools`` the digest of the ``Tools`` asset offered (None: no tools), ``params``
    the call parameters (the reply's ``call_config``). Field names and order are part of
    the digest: never change them."""

    version: int
    model: str
    system: Digest
    messages: tuple[Digest, ...]
    tools: Digest | None = None
    params: dict[str, Any] = {}

    @functools.cached_property
    def digest(self) -> Digest:
        """The digest an assistant message records as its ``request``."""
        return blake3.blake3(_DOMAIN + encode(self)).digest()


def build(model: str, system_prompt: str, messages: Sequence[Message], tools: Tools | None,
          params: Mapping[str, Any]) -> Request:
    """The request record of a call of ``model`` with these parts (``params`` already
    checked and canonical, as ``llm`` records them in ``call_config``)."""
    return Request(version=REQUEST_VERSION, model=model,
                   system=SystemPrompt(text=system_prompt).digest,
                   messages=tuple(map(_DIGEST, messages)),
                   tools=None if tools is None else tools.digest, params=dict(params))
