"""The worker in-process, on a real database, a real image host and real images."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db import tables as t
from pixelmill.db import work
from pixelmill.db.ingest import stage_request
from pixelmill.domain import ProcessingOptions
from pixelmill.queue.db import DbQueue
from pixelmill.runtime import Runtime
from pixelmill.worker import worker_name
from tests.support.databases import PostgresServer, terminate_other_connections
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


def test_a_worker_name_fits_the_lease_owner_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node-" + "x" * 250)
    name = worker_name()
    assert name.startswith("node-x") and len(name) <= t.tasks.c.lease_owner.type.length == 64


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


async def _status_elsewhere(url: str, request_id: str) -> Any:
    """The request's row, read on a connection of its own (one the cuts do not reach)."""
    query = "SELECT status, completed, failed, pending, processing, finished_at"
    query += " FROM requests WHERE id = $1"
    server = PostgresServer(url)
    return await asyncio.to_thread(server.run, lambda conn: conn.fetchrow(query, request_id))


async def test_a_worker_whose_connections_are_cut_again_and_again_completes(
    settings: Settings, image_host: ImageHost, tmp_path: Path, database_backend: str
) -> None:
    """The server drops every connection of the worker many times while it works."""
    if database_backend != "postgres":
        pytest.skip("SQLite has no server whose connections could be cut")
    settings = settings.model_copy(update={"task_max_images": 4})
    runtime = await Runtime.open(settings, migrate=True)
    try:
        tag = uuid.uuid4().hex[:8]
        urls = [
            [image_host.url(f"slow/60/coffee.jpg?cut={tag}-{row}-{k}") for k in range(2)]
            for row in range(40)
        ]
        request_id = await _stage(runtime, _write_csv(tmp_path / "in.csv", urls))
        runtime.start_worker()
        cut, deadline = 0, time.monotonic() + 90
        row = await _status_elsewhere(settings.database_url, request_id)
        while row["finished_at"] is None:
            assert time.monotonic() < deadline, f"not finished after {cut} cuts: {dict(row)}"
            cut += await asyncio.to_thread(terminate_other_connections, settings.database_url)
            await asyncio.sleep(0.05)
            row = await _status_elsewhere(settings.database_url, request_id)
        assert cut >= 5, "the worker's connections were cut while it worked"
        assert (row["status"], row["completed"], row["failed"]) == ("completed", 80, 0)
        assert (row["pending"], row["processing"]) == (0, 0)
        paths = [url.split(f":{image_host.port}", 1)[1] for row_urls in urls for url in row_urls]
        fetches = [image_host.hits[path] for path in paths]
        assert fetches == [1] * 80, "lost writes were retried, not the images' work"
        async for _cells, outputs in work.output_rows(runtime.db, request_id):
            assert len(outputs) == 2 and all(outputs)
    finally:
        await runtime.close()


async def test_a_worker_takes_another_task_only_when_an_image_slot_is_free(
    settings: Settings, image_host: ImageHost, tmp_path: Path
) -> None:
    # Two image slots, four task slots, one image per task: while both images of the
    # first tasks hang at the image host, the other tasks stay queued for other workers.
    settings = settings.model_copy(
        update={"worker_concurrency": 2, "worker_tasks_in_flight": 4, "task_max_images": 1}
    )
    runtime = await Runtime.open(settings, migrate=True)
    image_host.gate.clear()
    try:
        tag = uuid.uuid4().hex[:8]
        urls = [[image_host.url(f"gate/img/cat.jpg?{tag}={n}")] for n in range(6)]
        request_id = await _stage(runtime, _write_csv(tmp_path / "in.csv", urls))
        runtime.start_worker()

        async def both_slots_hang() -> bool:
            return sum(image_host.hits[f"/gate/img/cat.jpg?{tag}={n}"] for n in range(6)) == 2

        await async_wait_until(both_slots_hang, timeout=30, what="two fetches at the host")
        async with runtime.db.read() as conn:
            states = (
                await conn.execute(
                    select(t.tasks.c.state).where(t.tasks.c.request_id == request_id)
                )
            ).scalars()
            assert sorted(states) == ["leased"] * 2 + ["queued"] * 4
        image_host.gate.set()
        row = await async_wait_until(lambda: _finished(runtime, request_id), timeout=30)
        assert row.status == "completed" and row.completed == 6
    finally:
        image_host.gate.set()
        await runtime.close()
