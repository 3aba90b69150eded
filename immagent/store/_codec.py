"""Encoding of agent rows' JSON-like maps, shared by the backends."""

from __future__ import annotations

from typing import Any

import msgspec

from immagent.assets import encode
from immagent.exceptions import IntegrityError

__all__ = ["decode_map", "encode_map"]

_map_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode_map(value: dict[str, Any]) -> bytes:
    """Canonical bytes of a model_config / metadata map."""
    return encode(value)


def decode_map(body: bytes) -> dict[str, Any]:
    """Inverse of encode_map; a damaged stored map is an IntegrityError, never a raw
    msgspec error escaping the ImmAgentError tree."""
    try:
        result: dict[str, Any] = _map_decoder.decode(body)
    except (msgspec.DecodeError, ValueError) as e:
        raise IntegrityError(f"a stored agent row's model_config/metadata cannot be "
                             f"decoded ({e}); run store.verify()") from e
    return result
