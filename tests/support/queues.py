"""Queue members as worker processes open them, and requests staged for them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import stage_request
from pixelmill.domain import ProcessingOptions
from pixelmill.queue import Queue, TaskMessage, open_queue
from tests.support.waiting import async_wait_until


@asynccontextmanager
async def member(settings: Settings, db: Database, owner: str) -> AsyncIterator[Queue]:
    """A queue as a worker process opens it; closed on the way out (as if it stopped)."""
    queue = open_queue(settings, db, owner=owner)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


async def stage(db: Database, tmp_path: Path, rows: int) -> str:
    """A request of ``rows`` one-image rows, two rows per task."""
    path = tmp_path / f"in-{uuid.uuid4().hex[:6]}.csv"
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f"{i},P{i},https://img.example.com/{i}.jpg" for i in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n")
    accepted = await stage_request(
        db, path, options=ProcessingOptions(), webhook_url=None, owner=None,
        limits=CsvLimits(), task_max_images=2,
    )  # fmt: skip
    return accepted.request_id


async def receive(queue: Queue, count: int, timeout: float = 30) -> list[TaskMessage]:
    """Exactly ``count`` tasks, waiting for each with a deadline."""
    received: list[TaskMessage] = []

    async def more() -> bool:
        message = await queue.receive(timeout=0.5)
        if message is not None:
            received.append(message)
        return len(received) >= count

    await async_wait_until(more, timeout=timeout, what=f"{count} tasks")
    return received


async def tasks_of(db: Database, request_id: str) -> dict[int, tuple[str, int]]:
    """The request's tasks: id -> (state, deliveries)."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.tasks.c.id, t.tasks.c.state, t.tasks.c.attempts).where(
                t.tasks.c.request_id == request_id
            )
        )
        return {row.id: (row.state, row.attempts) for row in rows}
