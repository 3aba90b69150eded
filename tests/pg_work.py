"""Work measured, not time: the rows each PostgreSQL statement's plan nodes processed.

``explained_store(dsn)`` opens a Store over a real PostgresBackend whose pooled connections
load PostgreSQL's own ``auto_explain`` with ``log_analyze`` and send every executed plan
back to the client as a NOTICE; ``work(plan)`` sums ``Actual Rows x Actual Loops`` over
its nodes (sub-plans included). A quadratic statement shows as rows processed growing
with the square of its input, whatever the machine's speed, so scaling tests assert on
it instead of on seconds."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg_pool

from immagent import Store
from immagent.store.postgres import PostgresBackend

_SETTINGS = {"log_min_duration": "0", "log_analyze": "on", "log_level": "notice",
             "log_format": "json", "log_nested_statements": "on", "log_timing": "off",
             "log_buffers": "on"}


@contextlib.asynccontextmanager
async def explained_store(dsn: str) -> AsyncIterator[tuple[Store, list[dict[str, Any]]]]:
    """A Store on ``dsn`` and the list every executed statement's plan is appended to."""
    plans: list[dict[str, Any]] = []

    def notice(diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        if "plan:" in text:
            plans.append(json.loads(text.split("plan:", 1)[1]))

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("LOAD 'auto_explain'")
        for key, value in _SETTINGS.items():
            await conn.execute(f"SET auto_explain.{key} = {value}")
        await conn.commit()
        conn.add_notice_handler(notice)

    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=1, max_size=2, configure=configure, open=False)
    await pool.open(wait=True)
    store = Store(PostgresBackend(pool))
    try:
        await store.init_schema()
        yield store, plans
    finally:
        await store.close()


def work(plan: dict[str, Any]) -> int:
    """Rows processed by every node of one auto_explain plan: those it returned and those
    its filters removed (both per loop, so times its loops), summed over the nodes."""
    def walk(node: dict[str, Any]) -> int:
        rows = sum(int(node.get(k, 0)) for k in ("Actual Rows", "Rows Removed by Filter",
                                                  "Rows Removed by Join Filter"))
        own = rows * int(node.get("Actual Loops", 1))
        return own + sum(walk(child) for child in node.get("Plans", ()))
    return walk(plan["Plan"])


def buffers(plan: dict[str, Any]) -> int:
    """Buffer pages one plan touched, its TOAST table's included (shared hits and reads of
    its top node, which counts its children's and the functions it calls)."""
    top = plan["Plan"]
    return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))


def statement(plans: list[dict[str, Any]], fragment: str) -> dict[str, Any]:
    """The last plan whose query text holds ``fragment``."""
    return next(p for p in reversed(plans) if fragment in p.get("Query Text", ""))
