"""The ``immagent`` command line (console script entry point: ``immagent.cli:main``)."""

from immagent.cli.app import main

__all__ = ["main"]
