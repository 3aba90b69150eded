"""Boundary validation: user input is checked and normalised here, before anything is hashed.

Every rule a stored record must meet is written here once and used by every path that makes
one: ``Store.create_agent`` and ``SimpleAgent`` (agent fields), ``Store.append`` (messages),
the model call (configs), and bundle reading (records that did not come through the API).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from uuid import UUID

from immagent.exceptions import FanOutError, UnsupportedTypeError, ValidationError

__all__ = [
    "MAX_DEPTH",
    "MAX_INPUT_BYTES",
    "MAX_NAME_BYTES",
    "MAX_REFS",
    "MAX_STREAM_BYTES",
    "RESERVED_CONFIG_KEYS",
    "AgentFields",
    "check_agent_fields",
    "check_config",
    "check_count",
    "check_digest",
    "check_digests",
    "check_fan_out",
    "check_flag",
    "check_json_mapping",
    "check_json_value",
    "check_key",
    "check_kind",
    "check_name",
    "check_number",
    "check_sequence",
    "check_text",
    "check_token_count",
    "check_tool_schemas",
    "check_uuid",
    "check_uuids",
    "is_credential_key",
    "redact_secrets",
    "scrub_text",
]

#: Largest user input accepted by ``advance`` (UTF-8 bytes). Larger inputs are almost
#: always a bug (a file read by mistake) and would blow any model's context anyway.
MAX_INPUT_BYTES = 1_000_000
#: Longest agent name or model string (UTF-8 bytes).
MAX_NAME_BYTES = 1_000
#: Longest stream of any state (UTF-8 bytes): streams are indexed, and an index entry has
#: a size limit (PostgreSQL's B-tree: about 2.7 kB, with the kind and seq beside it). A
#: checkpoint-writes stream joins three keys of up to 1,000 bytes, so this is not 1,000.
MAX_STREAM_BYTES = 2_600
#: Deepest nesting accepted in model_config / metadata (also stops cyclic structures).
MAX_DEPTH = 64
#: Most digests one row may reference (its fan-out): a node lists its parent and the
#: elements it adds, so one step adds at most MAX_REFS - 1 messages, items or values; a
#: state pins at most MAX_REFS digests. Enforced on every write and every bundle record
#: before anything is hashed or walked: gc and verify read each row's refs whole, so this
#: bounds what one row costs them (3.2 MB of refs), and a bundle cannot make them walk a
#: million-entry node.
MAX_REFS = 100_000


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
        raise ValidationError(field, f"is longer than the limit of {max_bytes} bytes", None)
    _unicode(field, value)
    return str.__str__(value)  # a str subclass would encode differently


def check_name(field: str, value: object) -> str:
    """An identifier (an agent's name, a model string): ``check_text`` with at most
    MAX_NAME_BYTES bytes and no control characters (they would act on a terminal that
    shows the name, and no name needs them)."""
    text = check_text(field, value, max_bytes=MAX_NAME_BYTES)
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValidationError(field, f"must not contain control characters (found "
                              f"U+{ord(bad):04X})", text)
    return text


class AgentFields(NamedTuple):
    """An agent's settings after ``check_agent_fields``: canonical, safe to hash."""

    name: str
    model: str
    model_config: dict[str, Any]
    metadata: dict[str, Any]


def check_agent_fields(name: object, model: object, model_config: object,
                       metadata: object) -> AgentFields:
    """The one rule for an agent's fields, wherever a state comes from (``create_agent``,
    ``SimpleAgent``, an imported bundle): a name and a model (``check_name``), a model
    config (``check_config``) and JSON-like metadata (``check_json_mapping``)."""
    return AgentFields(check_name("name", name), check_name("model", model),
                       check_config(model_config, "model_config"),  # type: ignore[arg-type]
                       check_json_mapping("metadata", metadata))


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


def check_fan_out(field: str, count: int, what: str = "digests", *, base: int = 0) -> None:
    """FanOutError naming ``field`` unless ``count`` (plus the ``base`` refs a row has
    besides, such as a node's parent) is within MAX_REFS."""
    if count + base > MAX_REFS:
        raise FanOutError(field, count, MAX_REFS - base, what)


def check_count(field: str, value: object, low: int = 0, high: int | None = None) -> int:
    """An int (not a bool) from ``low`` to ``high`` (inclusive), else ValidationError."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        shown = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValidationError(field, f"must be an int {shown}, got {value!r}", value)
    return int.__int__(value)


def check_number(field: str, value: object, low: float = 0.0, high: float | None = None,
                 *, above: bool = False) -> float:
    """A finite int or float (not a bool) >= ``low`` (> with ``above``), <= ``high``."""
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if above else value >= low)
          and (high is None or value <= high))
    if not ok:
        bound = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
        raise ValidationError(field, f"must be a finite number {bound}, got {value!r}", value)
    return float(value)  # type: ignore[arg-type]


def check_flag(field: str, value: object) -> bool:
    """A bool (not a truthy value of another type), else ValidationError."""
    if not isinstance(value, bool):
        raise ValidationError(field, f"must be a bool, got {type(value).__name__}", None)
    return value


def check_kind(field: str, value: object) -> int:
    """A stored kind number: an int from 0 to 32767 (a smallint in the database)."""
    return check_count(field, value, 0, 32767)


def check_key(field: str, value: object) -> str:
    """A str used to look something up (a stream, a substring): any text without NUL and
    with no lone surrogate (it could not be stored, so it matches nothing either way)."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a str, got {type(value).__name__}", None)
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters", None)
    _unicode(field, value)
    return str.__str__(value)


def check_digest(field: str, value: object) -> bytes:
    """A 32-byte blake3 digest (bytes), else ValidationError."""
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValidationError(field, f"must be a 32-byte digest (bytes), got "
                              f"{type(value).__name__}", None)
    return bytes(value)


def check_sequence(field: str, value: object) -> list[Any]:
    """A sequence (list, tuple, …) but not a str or bytes, as a list."""
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        raise ValidationError(field, f"must be a sequence, got {type(value).__name__}", None)
    return list(value)


def check_digests(field: str, value: object) -> list[bytes]:
    """A sequence of digests (``check_digest``)."""
    return [check_digest(f"{field}[{i}]", d) for i, d in enumerate(check_sequence(field, value))]


def check_uuids(field: str, value: object) -> list[UUID]:
    """A sequence of UUIDs or their string forms (``check_uuid``)."""
    return [check_uuid(f"{field}[{i}]", v) for i, v in enumerate(check_sequence(field, value))]


def check_token_count(field: str, value: object) -> int | None:
    """A token count as a Message stores it: None or an int from 0 to 2**63 - 1."""
    return None if value is None else check_count(field, value, 0, 2**63 - 1)


def check_json_mapping(field: str, value: object) -> dict[str, Any]:
    """Validate a JSON-like mapping and return its canonical form.

    Canonical means: keys are str, floats are finite, ``-0.0`` becomes ``0`` and integral
    floats become ints (so ``temperature=1`` and ``temperature=1.0`` hash alike), tuples
    become lists, and subclasses of str/int/float become the plain type. Text must be
    valid Unicode (no lone surrogate); nesting is bounded by MAX_DEPTH.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a mapping, got {type(value).__name__}", value)
    return {_key(field, k): _json(f"{field}.{k}", v, 1, field) for k, v in value.items()}


def check_json_value(field: str, value: object) -> Any:
    """Validate any JSON value and return it exactly as given, as JSON would carry it:
    tuples become lists, nothing else changes (``1`` stays an int, ``1.0`` a float, text
    may hold NUL). Rejects non-str keys, NaN and infinities, ints outside 64 bits, lone
    surrogates, other types, and nesting deeper than MAX_DEPTH (which also stops cycles)."""
    return _json(field, value, 1, field, exact=True)


def check_tool_schemas(field: str, schemas: object) -> list[dict[str, Any]]:
    """Tool schemas as a model call is offered them and a Tools asset stores them: a list
    of JSON objects (``validate.check_json_value``: no NaN, no non-str keys, bounded
    nesting); ValidationError naming ``field`` otherwise."""
    if isinstance(schemas, str | bytes) or not isinstance(schemas, Sequence):
        raise ValidationError(field, "must be a list of tool schemas (JSON objects)", None)
    checked: list[dict[str, Any]] = check_json_value(field, list(schemas))
    for i, schema in enumerate(checked):
        if not isinstance(schema, dict):
            raise ValidationError(f"{field}[{i}]", "a tool schema must be a JSON object", None)
    return checked

# -- model configs and credentials ------------------------------------------------------

#: Config keys that the model call (``immagent.llm.complete``) sets itself, or that would
#: defeat its guarantees (streaming, LiteLLM's retries/fallbacks), or that name where the
#: call goes or how it authenticates (endpoints and token providers belong with
#: credentials, in the environment). Compared on the key folded to lower case, at the top
#: level of a config; credentials themselves (api_key, …) are refused at any depth by the
#: credentials policy below.
RESERVED_CONFIG_KEYS = frozenset({
    "model", "messages", "tools", "functions", "stream", "stream_options", "timeout",
    "request_timeout", "num_retries", "max_retries", "fallbacks",
    "context_window_fallback_dict",
    "api_base", "base_url", "api_version", "azure_ad_token_provider",
})

# The credentials policy: a model config is hashed into every state and every assistant
# message's call_config, stored, and exported in bundles, so it must never hold a secret.
# A key is a credential if, folded (camelCase split, lower case, "-"/"."/" " as "_"), one
# of its words is below, its last word is "token", two adjacent words are a qualifier and
# "key" (api_key, x-api-key, subscription-key, private_key_id), or it names headers (which
# carry credentials under any name). Checked at every depth, in lists too.
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "apikey", "accesskey",
    "secretkey", "credential", "credentials", "authorization", "auth", "bearer", "cookie",
    "cookies", "header", "headers", "jwt", "signature",
})
_KEY_QUALIFIERS = frozenset({
    "api", "access", "secret", "private", "subscription", "account", "master", "auth",
    "client", "signing", "encryption", "service", "session", "license",
})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def is_credential_key(key: str) -> bool:
    """True when ``key`` names a credential (or headers) under the credentials policy:
    such keys never reach a stored row, a bundle or a model call's recorded config."""
    words = [w for w in _SEPARATORS.split(_CAMEL.sub("_", key).lower()) if w]
    if not words:
        return False
    if words[-1] == "token" or _SECRET_WORDS.intersection(words):
        return True
    return any(a in _KEY_QUALIFIERS and b == "key" for a, b in itertools.pairwise(words))


def check_config(config: Mapping[str, Any] | None, field: str = "config") -> dict[str, Any]:
    """Canonical form of a model config (see check_json_mapping); rejects the reserved keys
    (RESERVED_CONFIG_KEYS, any case) and, at any depth, every credential key (see
    ``is_credential_key``). Pass credentials through the environment or LiteLLM's own
    settings. ``field`` names the argument in errors (never the secret's value)."""
    canonical = check_json_mapping(field, config)
    reserved = sorted(k for k in canonical if k.lower() in RESERVED_CONFIG_KEYS)
    if reserved:
        raise ValidationError(field, f"keys reserved by immagent: {', '.join(reserved)}",
                              reserved)
    found = _credential_paths(field, canonical)
    if found:
        raise ValidationError(
            field, f"credential keys are never stored or exported: {', '.join(found)} "
            "(pass credentials through the environment or LiteLLM's own settings)", found)
    return canonical


def _credential_paths(path: str, value: object) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}"
            if is_credential_key(k):
                found.append(here)
            else:
                found += _credential_paths(here, v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _credential_paths(f"{path}[{i}]", v)
    return found


# -- JSON-like values -----------------------------------------------------------------


def _unicode(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode (lone surrogate)", None) from None


def _key(field: str, key: object, exact: bool = False) -> str:
    if not isinstance(key, str):
        raise UnsupportedTypeError(field, f"keys must be str, got {key!r}", key)
    if not exact and "\x00" in key:
        raise ValidationError(field, "keys must not contain NUL characters", key)
    _unicode(field, key)
    return str.__str__(key)


def _json(field: str, value: object, depth: int, root: str, exact: bool = False) -> Any:
    """The checked form of a JSON-like value: canonical (integral floats become ints, no
    NUL in text) for hashed configs, or ``exact`` (as given) for stored JSON values; either
    way plain str/int/float, valid Unicode, bounded nesting."""
    if depth > MAX_DEPTH:  # named by the argument: the path would be 64 levels long
        raise ValidationError(root, f"nested deeper than {MAX_DEPTH} levels (or cyclic)",
                              None)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not exact and "\x00" in value:
            raise ValidationError(field, "must not contain NUL characters", None)
        _unicode(field, value)
        return str.__str__(value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValidationError(field, "integer out of the 64-bit range", value)
        return int.__int__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(field, f"must be a finite number, got {value!r}", value)
        number = float.__float__(value)
        if exact:
            return number
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if isinstance(value, list | tuple):
        return [_json(f"{field}[{i}]", v, depth + 1, root, exact)
                for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {_key(field, k, exact): _json(f"{field}.{k}", v, depth + 1, root, exact)
                for k, v in value.items()}
    raise UnsupportedTypeError(field, f"must be JSON-like, got {type(value).__name__}", None)


# -- secrets in text we did not write --------------------------------------------------

# Shapes of credentials that providers echo in error text: an Authorization value, a
# key=value / "key": "value" pair whose key is a credential word, and the prefixes of
# common API keys (OpenAI/Anthropic sk-..., Google AIza..., GitHub gh?_..., Slack xox?-...).
# Group 1 is what is kept before the ``***``.
_SECRET_SHAPES = (
    re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|secret|password|passwd|token)"
               r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]{4,}"),
    re.compile(r"()\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}"),
    re.compile(r"()\bAIza[0-9A-Za-z_-]{20,}"),
    re.compile(r"()\bgh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"()\bxox[abprs]-[A-Za-z0-9-]{8,}"),
)
#: Environment values shorter than this are not treated as secrets (they would match
#: ordinary words).
_MIN_SECRET = 8


def redact_secrets(text: str, extra: tuple[str, ...] = (),
                   environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every credential it may echo replaced by ``***``: the value of every
    environment variable whose name is a credential key (OPENAI_API_KEY, ...), each of
    ``extra``, and the usual shapes of keys and tokens. For provider error messages before
    they are raised or logged (``LLMError``)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if len(v) >= _MIN_SECRET and is_credential_key(k)}
    values.update(v for v in extra if len(v) >= 4)
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "***")
    for shape in _SECRET_SHAPES:
        text = shape.sub(r"\1***", text)
    return text
