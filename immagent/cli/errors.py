"""The one exception the CLI itself raises: a message for stderr and an exit status."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CLIError"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: 128 + SIGINT, what shells report for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A failure reported as ``immagent: error: <message>``; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        self.message = message
        self.code = code
        super().__init__(message)
