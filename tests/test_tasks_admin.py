"""Dead tasks are listed and put back on the queue (the embedded queue here)."""

from __future__ import annotations

from pathlib import Path

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db.admin import dead_tasks, requeue_dead
from pixelmill.db.engine import Database
from pixelmill.db.ingest import stage_request
from pixelmill.db.migrate import upgrade_async
from pixelmill.domain import ProcessingOptions
from pixelmill.queue.db import DbQueue


async def test_a_dead_task_is_listed_and_requeued(settings: Settings, tmp_path: Path) -> None:
    await upgrade_async(settings.database_url)
    db = Database(settings.database_url)
    try:
        source = tmp_path / "in.csv"
        source.write_text(
            "S. No.,Product Name,Input Image Urls\n1,A,https://img.example.com/a.jpg\n"
        )
        await stage_request(
            db, source, options=ProcessingOptions(), webhook_url=None, owner=None,
            limits=CsvLimits(), task_max_images=10,
        )  # fmt: skip
        queue = DbQueue(db, owner="w1", lease_seconds=5, poll_interval=0.05, max_attempts=1)
        message = await queue.receive(timeout=2)
        assert message is not None
        await queue.retry(message, delay=0, error="storage is down")
        assert await queue.receive(timeout=0.3) is None, "dead: not delivered"

        (dead,) = await dead_tasks(db)
        assert (dead.task_id, dead.attempts, dead.last_error) == (
            message.task_id,
            1,
            "storage is down",
        )

        assert await requeue_dead(db, [dead.task_id + 100]) == 0, "only the tasks named"
        assert await requeue_dead(db) == 1
        assert await dead_tasks(db) == []
        again = await queue.receive(timeout=2)
        assert again is not None and again.task_id == message.task_id and again.attempt == 1
    finally:
        await db.close()
