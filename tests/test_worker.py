"""The worker in-process, on a real SQLite file, a real image host and real images."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db import work
from pixelmill.db.ingest import stage_request
from pixelmill.domain import ProcessingOptions
from pixelmill.queue.db import DbQueue
from pixelmill.runtime import Runtime
from tests.support.image_host import ImageHost
from tests.support.waiting import async_wait_until


def _write_csv(path: Path, urls_per_row: list[list[str]]) -> Path:
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{i},P{i},"{", ".join(urls)}"' for i, urls in enumerate(urls_per_row, start=1)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _stage(runtime: Runtime, csv_path: Path) -> str:
    accepted = await stage_request(
        runtime.db,
        csv_path,
        options=ProcessingOptions(),
        webhook_url=None,
        owner=None,
        limits=CsvLimits(),
        task_max_images=runtime.settings.task_max_images,
    )
    return accepted.request_id


async def _finished(runtime: Runtime, request_id: str):  # type: ignore[no-untyped-def]
    row = await work.load_request(runtime.db, request_id)
    return row if row.finished_at is not None else None


async def test_a_task_whose_workers_keep_dying_fails_its_images(
    settings: Settings, image_host: ImageHost, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"task_attempts": 1, "lease_seconds": 0.5})
    runtime = await Runtime.open(settings, migrate=True)
    try:
        urls = [[image_host.url("img/cat.jpg?poison=1"), image_host.url("img/cat.jpg?poison=2")]]
        request_id = await _stage(runtime, _write_csv(tmp_path / "in.csv", urls))
        # A worker takes the task and dies: it never acks, its lease runs out.
        doomed = DbQueue(runtime.db, owner="doomed", lease_seconds=0.5, poll_interval=0.05)
        assert await doomed.receive(timeout=5) is not None

        runtime.start_worker()
        row = await async_wait_until(lambda: _finished(runtime, request_id), timeout=30)
        assert row.status == "failed" and row.failed == 2
        async for _cells, outputs in work.output_rows(runtime.db, request_id):
            assert outputs == ["", ""]
        assert image_host.hits["/img/cat.jpg?poison=1"] == 0, "the poison task is not re-run"
    finally:
        await runtime.close()


async def test_concurrent_requests_are_counted_exactly(
    settings: Settings, image_host: ImageHost, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"task_max_images": 3})
    runtime = await Runtime.open(settings, migrate=True)
    try:
        runtime.start_worker()
        request_ids = await asyncio.gather(
            *(
                _stage(
                    runtime,
                    _write_csv(
                        tmp_path / f"in{n}.csv",
                        [
                            [image_host.url(f"img/coffee.jpg?r={n}-{row}-{k}") for k in range(2)]
                            for row in range(10)
                        ],
                    ),
                )
                for n in range(3)
            )
        )
        for request_id in request_ids:
            row = await async_wait_until(lambda rid=request_id: _finished(runtime, rid), timeout=60)
            assert (row.status, row.completed, row.failed, row.pending, row.processing) == (
                "completed", 20, 0, 0, 0,
            )  # fmt: skip
    finally:
        await runtime.close()
