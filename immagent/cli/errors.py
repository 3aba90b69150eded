"""The one exception the CLI itself raises: a message for stderr and an exit status."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNTRUSTED", "EXIT_UNUSABLE",
           "EXIT_USAGE", "CLIError"]

EXIT_OK = 0
#: A failure; for the audit commands, *corrupt*: checked, and something does not hold.
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Intact, but not vouched for by enough trusted keys (verify-bundle --trusted-key).
EXIT_UNTRUSTED = 3
#: Could not be checked at all: no such file, not a bundle, an unknown format, a request
#: that was never recorded, a missing extra.
EXIT_UNUSABLE = 4
#: 128 + SIGINT, what shells report for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A failure reported as ``immagent: error: <message>``; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        self.message = message
        self.code = code
        super().__init__(message)
