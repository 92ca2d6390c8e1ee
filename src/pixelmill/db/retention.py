"""Forgetting finished requests: their rows in every table, one request at a time.

Used by ``pixelmill requests prune``, which deletes a request's stored objects first
and its rows after, so that an interrupted prune leaves at worst rows whose objects
are gone (the next prune finishes them), never objects that nothing points at.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, retry_transient

# Every table that holds rows of a request, the request itself last.
_TABLES = (t.webhook_deliveries, t.tasks, t.images, t.products)


@retry_transient
async def finished_before(db: Database, cutoff: datetime, limit: int | None) -> list[str]:
    """The ids of requests finished before ``cutoff``, oldest first, at most ``limit``."""
    r = t.requests.c
    query = (
        select(r.id)
        .where(r.finished_at.is_not(None), r.finished_at < cutoff)
        .order_by(r.finished_at, r.id)
        .limit(limit)
    )
    async with db.read() as conn:
        return [row.id for row in await conn.execute(query)]


@retry_transient
async def forget_request(db: Database, request_id: str) -> bool:
    """Delete a finished request and all its rows in one transaction; False when there
    is no such finished request (unknown, already gone, or not finished)."""
    r = t.requests.c
    async with db.write() as conn:
        gone = await conn.execute(
            delete(t.requests).where(r.id == request_id, r.finished_at.is_not(None))
        )
        if gone.rowcount == 0:
            return False
        for table in _TABLES:
            await conn.execute(delete(table).where(table.c.request_id == request_id))
    return True
