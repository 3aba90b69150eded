"""Boundary validation: user input is checked and normalised here, before anything is hashed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from immagent.exceptions import ValidationError

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_NAME_CHARS",
    "RESERVED_CONFIG_KEYS",
    "check_config",
    "check_json_mapping",
    "check_json_value",
    "check_text",
    "check_uuid",
    "scrub_text",
]

#: Largest user input accepted by ``advance`` (UTF-8 bytes). Larger inputs are almost
#: always a bug (a file read by mistake) and would blow any model's context anyway.
MAX_INPUT_BYTES = 1_000_000
#: Longest agent name or model string.
MAX_NAME_CHARS = 1_000

def check_text(field: str, value: object, *, max_bytes: int | None = None) -> str:
    """Return ``value`` if it is a non-blank str without NUL characters, else raise.

    Text is kept byte-exact (no Unicode normalisation): the digest pins what the model saw.
    """
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a str, got {type(value).__name__}", value)
    if not value.strip():
        raise ValidationError(field, "must not be empty", value)
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters", value)
    if max_bytes is not None and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValidationError(field, f"is longer than the limit of {max_bytes} bytes", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode (lone surrogate)", value) from None
    return value


def scrub_text(value: str) -> str:
    """``value`` with lone surrogates replaced by U+FFFD, so it can be encoded as UTF-8.

    For text we did not write (model replies, tool results): rejecting it would lose a
    paid model call, and storing it as is would fail at encoding time.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def check_uuid(field: str, value: object) -> UUID:
    """Accept a UUID or its string form; anything else is a ValidationError."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise ValidationError(field, f"is not a valid UUID: {value!r}", value) from None
    raise ValidationError(field, f"must be a UUID, got {type(value).__name__}", value)


def check_json_mapping(field: str, value: object) -> dict[str, Any]:
    """Validate a JSON-like mapping and return its canonical form.

    Canonical means: keys are str, floats are finite, ``-0.0`` becomes ``0`` and integral
    floats become ints (so ``temperature=1`` and ``temperature=1.0`` hash alike), tuples
    become lists.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a mapping, got {type(value).__name__}", value)
    return {_key(field, k): _json(f"{field}.{k}", v, 1) for k, v in value.items()}


def check_json_value(field: str, value: object) -> Any:
    """Validate any JSON value and return it exactly as given, as JSON would carry it:
    tuples become lists, nothing else changes (``1`` stays an int, ``1.0`` a float, text
    may hold NUL). Rejects non-str keys, NaN and infinities, ints outside 64 bits, lone
    surrogates, other types, and nesting deeper than MAX_DEPTH (which also stops cycles)."""
    return _json(field, value, 1, exact=True)


#: Config keys that the model call (``immagent.llm.complete``) sets itself, or that would
#: defeat its guarantees (streaming, LiteLLM's retries/fallbacks), or that would store a
#: secret in the content-addressed call_config of every assistant message.
RESERVED_CONFIG_KEYS = frozenset({
    "model", "messages", "tools", "functions", "stream", "stream_options", "timeout",
    "request_timeout", "num_retries", "max_retries", "fallbacks",
    "context_window_fallback_dict",
    # Credentials and endpoints LiteLLM accepts per call: pass them through the
    # environment or provider settings, never through the hashed, exported call_config.
    "api_key", "api_base", "base_url", "api_version", "extra_headers", "headers",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "vertex_credentials", "azure_ad_token", "azure_ad_token_provider",
})


def check_config(config: Mapping[str, Any] | None, field: str = "config") -> dict[str, Any]:
    """Canonical form of a model config (see check_json_mapping); rejects reserved keys.
    ``field`` names the argument in errors."""
    canonical = check_json_mapping(field, config)
    reserved = sorted(RESERVED_CONFIG_KEYS.intersection(canonical))
    if reserved:
        raise ValidationError(field, f"keys reserved by immagent: {', '.join(reserved)}",
                              reserved)
    return canonical


#: Deepest nesting accepted in model_config / metadata (also stops cyclic structures).
MAX_DEPTH = 64


def _key(field: str, key: object, exact: bool = False) -> str:
    if not isinstance(key, str):
        raise ValidationError(field, f"keys must be str, got {key!r}", key)
    if exact:
        _unicode(field, key)
    elif "\x00" in key:
        raise ValidationError(field, "keys must not contain NUL characters", key)
    return key


def _unicode(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode (lone surrogate)", text) from None


def _json(field: str, value: object, depth: int, exact: bool = False) -> Any:
    """The checked form of a JSON-like value: canonical (integral floats become ints, no
    NUL in text) for hashed configs, or ``exact`` (as given) for stored JSON values."""
    if depth > MAX_DEPTH:
        raise ValidationError(field, f"nested deeper than {MAX_DEPTH} levels (or cyclic)",
                              None)
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            if exact:
                _unicode(field, value)
            elif "\x00" in value:
                raise ValidationError(field, "must not contain NUL characters", value)
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValidationError(field, "integer out of the 64-bit range", value)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(field, f"must be a finite number, got {value!r}", value)
        if exact:
            return float(value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, list | tuple):
        return [_json(f"{field}[{i}]", v, depth + 1, exact) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {_key(field, k, exact): _json(f"{field}.{k}", v, depth + 1, exact)
                for k, v in value.items()}
    raise ValidationError(field, f"must be JSON-like, got {type(value).__name__}", value)
