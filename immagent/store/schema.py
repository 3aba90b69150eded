"""Where the PostgreSQL schema text comes from: the top-level schema.sql, shipped in wheels."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["schema_sql"]


def schema_sql() -> str:
    """The text of schema.sql (packaged copy first, then the source checkout's)."""
    packaged = resources.files("immagent.store").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "schema.sql").read_text(encoding="utf-8")
