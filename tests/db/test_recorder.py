"""The group commit of image results: when a batch is written, and what shares one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from pixelmill.db.engine import Database
from pixelmill.recorder import ResultRecorder
from tests.db.test_work import image_statuses, processed, stage, start_all

# Long enough that a test which waited it out would hit its own deadline first.
NEVER = 120.0


@pytest.fixture
def image_updates(db: Database) -> Iterator[list[int]]:
    """The number of results in each ``UPDATE images`` that records results."""
    seen: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        text = statement.lstrip().upper()
        if text.startswith("UPDATE IMAGES") and "ATTEMPTS" in text:
            seen.append(len(params) if many else 1)

    engine = db.writer.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    yield seen
    event.remove(engine, "before_cursor_execute", count)


async def started_images(db: Database, tmp_path: Path, count: int) -> tuple[str, list[int]]:
    accepted = await stage(db, tmp_path, [1] * count)
    works = await start_all(db, accepted.request_id)
    return accepted.request_id, [image.id for work in works for image in work.images]


async def test_results_that_land_together_share_one_transaction(
    db: Database, tmp_path: Path, image_updates: list[int]
) -> None:
    request_id, images = await started_images(db, tmp_path, 6)
    recorder = ResultRecorder(db, on_finished=lambda _id: None)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(recorder.record(request_id, processed(i)) for i in images)), 30
        )
    finally:
        await recorder.close()

    assert image_updates == [6]
    assert set((await image_statuses(db, request_id)).values()) == {"completed"}


async def test_a_flush_writes_without_waiting_out_the_window(
    db: Database, tmp_path: Path, image_updates: list[int]
) -> None:
    request_id, images = await started_images(db, tmp_path, 2)
    recorder = ResultRecorder(db, on_finished=lambda _id: None, window=NEVER)
    try:
        recorder.flush()  # what a worker does when it holds no more images
        await asyncio.wait_for(recorder.record(request_id, processed(images[0])), 30)
        # The flush served one transaction only: the next result waits its window.
        second = asyncio.create_task(recorder.record(request_id, processed(images[1])))
        done, _ = await asyncio.wait({second}, timeout=1.0)
        assert not done
        recorder.flush()
        await asyncio.wait_for(second, 30)
    finally:
        await recorder.close()

    assert image_updates == [1, 1]


async def test_a_full_batch_is_written_at_once(
    db: Database, tmp_path: Path, image_updates: list[int]
) -> None:
    request_id, images = await started_images(db, tmp_path, 4)
    recorder = ResultRecorder(db, on_finished=lambda _id: None, max_batch=2, window=NEVER)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(recorder.record(request_id, processed(i)) for i in images)), 30
        )
    finally:
        await recorder.close()

    assert image_updates == [2, 2]
