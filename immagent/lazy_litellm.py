"""LiteLLM, imported once on first use: offline-safe, quiet, and optionally in the background.

Importing LiteLLM takes seconds (about 15 s on a busy machine), so nothing imports it at
package import: ``load()`` does, the first time a model call needs it. The command line
starts ``preload()`` while it opens the store, so the two overlap.

LiteLLM is optional: ``immagent-core`` (the store, the offline models, the integrations)
installs without it, the ``immagent`` distribution with it. Where it is missing, ``load()``
raises ``ExtraNotInstalledError`` naming ``pip install immagent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

from immagent.exceptions import ExtraNotInstalledError

__all__ = ["imported_module", "load", "load_async", "loaded", "preload", "require"]

# LiteLLM downloads a price map over the network at import time unless this is "True".
_COST_MAP_ENV = "LITELLM_LOCAL_MODEL_COST_MAP"

_lock = threading.Lock()  # held for the whole import
_module: ModuleType | None = None
_preload_lock = threading.Lock()  # never held long: preload() must not wait for the import
_preloading = False


def load() -> ModuleType:
    """The ``litellm`` module, imported on the first call (later calls return at once);
    ``ExtraNotInstalledError`` when it is not installed (each call tries again).

    A value of ``LITELLM_LOCAL_MODEL_COST_MAP`` the user set is respected; when it is
    unset, it is set to ``True`` for the import only and removed again, so the user's
    environment (and that of every process started later) stays as it was.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:  # a preload in progress holds it: waiting here is waiting for the import
        if _module is None:
            _module = _import()
    return _module


async def load_async() -> ModuleType:
    """``load()`` without blocking the event loop: the import (or the wait for a preload)
    runs in a daemon thread, so a caller cancelled meanwhile (Ctrl-C) is not held up until
    the import ends, as a wait in the loop's default executor would be at shutdown."""
    if _module is not None:
        return _module
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ModuleType] = loop.create_future()

    def settle(module: ModuleType | None, error: BaseException | None) -> None:
        if done.done():  # the waiter was cancelled
            return
        if module is not None:
            done.set_result(module)
        else:
            done.set_exception(error or RuntimeError("the LiteLLM import gave nothing"))

    def work() -> None:
        try:
            module, error = load(), None
        except BaseException as exc:  # handed to the waiter, not lost in this thread
            module, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, module, error)

    threading.Thread(target=work, name="immagent-litellm-wait", daemon=True).start()
    return await done


def loaded() -> bool:
    """Whether LiteLLM is imported already (a model call would not wait for it)."""
    return _module is not None


def preload() -> None:
    """Start importing LiteLLM in a background thread and return at once (once: later
    calls do nothing). ``load()`` then waits for that import instead of starting one."""
    global _preloading
    with _preload_lock:
        if _module is not None or _preloading:
            return
        _preloading = True
    threading.Thread(target=_preload, name="immagent-litellm-import", daemon=True).start()


def _preload() -> None:
    # A failed import is reported by the load() that needs the module, not by this thread.
    with contextlib.suppress(ExtraNotInstalledError):
        load()


def require() -> None:
    """``load()``'s ExtraNotInstalledError when LiteLLM is not installed, found without
    importing it (seconds): so a command can refuse a provider model before anything else."""
    if _module is not None:
        return
    try:
        found = importlib.util.find_spec("litellm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(None)


def _missing(cause: ImportError | None) -> ExtraNotInstalledError:
    return ExtraNotInstalledError("a model call through LiteLLM (any model but the offline "
                                  "ones)", "llm", needs="LiteLLM", cause=cause)


def _import() -> ModuleType:
    unset = _COST_MAP_ENV not in os.environ
    if unset:
        os.environ[_COST_MAP_ENV] = "True"
    try:
        import litellm
    except ImportError as e:  # immagent-core without the 'llm' extra
        raise _missing(e) from e
    finally:
        if unset:
            os.environ.pop(_COST_MAP_ENV, None)
    # LiteLLM prints "Give Feedback / Get Help" banners to stdout on every error;
    # a library must not write to its user's stdout.
    litellm.suppress_debug_info = True
    return litellm


def imported_module() -> ModuleType | None:
    """``litellm`` if something imported it already, else None (never imports it)."""
    return _module or sys.modules.get("litellm")
