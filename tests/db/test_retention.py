"""Forgetting finished requests, on SQLite and PostgreSQL: every row of the request in
every table goes in one transaction, and nothing of any other request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from pixelmill.db import retention
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from tests.db.test_work import stage

TABLES = {
    t.requests: t.requests.c.id,
    t.products: t.products.c.request_id,
    t.images: t.images.c.request_id,
    t.tasks: t.tasks.c.request_id,
}


async def rows_of(db: Database, request_id: str) -> dict[str, int]:
    async with db.read() as conn:
        return {
            table.name: (
                await conn.execute(
                    select(func.count()).select_from(table).where(column == request_id)
                )
            ).scalar_one()
            for table, column in TABLES.items()
        }


async def finish(db: Database, request_id: str, days_ago: float) -> None:
    async with db.write() as conn:
        await conn.execute(
            update(t.requests)
            .where(t.requests.c.id == request_id)
            .values(status="completed", finished_at=datetime.now(UTC) - timedelta(days=days_ago))
        )


async def test_old_finished_requests_are_found_oldest_first_and_forgotten_whole(
    db: Database, tmp_path: Path
) -> None:
    old, older, recent, running = [
        (await stage(db, tmp_path, [2, 1], name=f"{n}.csv")).request_id for n in range(4)
    ]
    await finish(db, old, 10)
    await finish(db, older, 20)
    await finish(db, recent, 1)
    cutoff = datetime.now(UTC) - timedelta(days=7)

    assert await retention.finished_before(db, cutoff, None) == [older, old]
    assert await retention.finished_before(db, cutoff, 1) == [older]
    assert await retention.forget_request(db, old) is True
    assert await retention.forget_request(db, old) is False, "already gone"
    assert await retention.forget_request(db, running) is False, "not finished: kept"

    assert await rows_of(db, old) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}
    for kept in (older, recent, running):
        assert (await rows_of(db, kept))["images"] == 3
    assert await retention.finished_before(db, cutoff, None) == [older]
