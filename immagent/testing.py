"""The offline models under their public name for tests: ``immagent.testing``.

The models themselves live in ``immagent.offline`` (the model layer loads that module on
the production path, so it is not named "testing"); this module only re-exports them, so
``from immagent.testing import ScriptedModel`` keeps working and both paths name the same
objects.
"""

from immagent.offline import (
    ECHO_DELAY_ENV,
    ECHO_MODEL,
    PROVIDER,
    Chunk,
    ErrorKind,
    OfflineModelError,
    Reply,
    Request,
    ScriptedModel,
    ScriptItem,
    is_offline,
    litellm_error,
    local_chunks,
    register,
    route_through_litellm,
    routes_through_litellm,
)

__all__ = [
    "ECHO_DELAY_ENV",
    "ECHO_MODEL",
    "PROVIDER",
    "Chunk",
    "ErrorKind",
    "OfflineModelError",
    "Reply",
    "Request",
    "ScriptItem",
    "ScriptedModel",
    "is_offline",
    "litellm_error",
    "local_chunks",
    "register",
    "route_through_litellm",
    "routes_through_litellm",
]
