"""What workers read and write: starting tasks, recording results, closing requests."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select

from pixelmill.csvio import CsvLimits
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import AcceptedRequest, stage_request
from pixelmill.db.work import (
    FINALIZE_PRIORITY,
    ImageResult,
    TaskWork,
    close_request,
    load_request,
    output_rows,
    record_results,
    start_task,
    unfinished_count,
)
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ImageStatus,
    ProcessedImage,
    ProcessingOptions,
)


async def stage(
    db: Database,
    tmp_path: Path,
    counts: Sequence[int],
    *,
    task_max_images: int = 64,
    name: str = "in.csv",
    options: ProcessingOptions | None = None,
) -> AcceptedRequest:
    """A request with one row per count, each with that many image URLs."""
    path = tmp_path / name
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
        for serial, count in enumerate(counts, start=1):
            urls = ",".join(f"https://img.example/{serial}/{n}.jpg" for n in range(count))
            writer.writerow([serial, f"P{serial}", urls])
    return await stage_request(
        db,
        path,
        options=options or ProcessingOptions(),
        webhook_url=None,
        owner=None,
        limits=CsvLimits(),
        task_max_images=task_max_images,
    )


def processed(image_id: int, attempts: int = 1) -> ImageResult:
    outcome = ProcessedImage(
        output_key=f"out/{image_id}.jpg",
        output_url=f"http://files.example/out/{image_id}.jpg",
        format="jpeg",
        width=640,
        height=480,
        bytes_in=20_000,
        bytes_out=9_000,
        source_quality=90,
        output_quality=45,
    )
    return ImageResult(image_id, attempts, outcome)


def failed(image_id: int, attempts: int = 1, code: ErrorCode = ErrorCode.HTTP_ERROR) -> ImageResult:
    outcome: ImageOutcome = ImageFailure(code, f"image {image_id}: HTTP 404")
    return ImageResult(image_id, attempts, outcome)


async def record(db: Database, request_id: str, results: Sequence[ImageResult]) -> bool:
    """Record results of one request; True when this call finished the request."""
    finished = await record_results(db, [(request_id, result) for result in results])
    assert set(finished) <= {request_id}
    return request_id in finished


async def task_ids(db: Database, request_id: str, kind: str = "process") -> list[int]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.tasks.c.id)
            .where((t.tasks.c.request_id == request_id) & (t.tasks.c.kind == kind))
            .order_by(t.tasks.c.id)
        )
        return list(rows.scalars())


async def counters(db: Database, request_id: str) -> tuple[str, int, int, int, int, int]:
    request = await load_request(db, request_id)
    return (
        request.status,
        request.total,
        request.pending,
        request.processing,
        request.completed,
        request.failed,
    )


async def image_statuses(db: Database, request_id: str) -> dict[int, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.images.c.id, t.images.c.status).where(t.images.c.request_id == request_id)
        )
        return {row.id: row.status for row in rows}


async def finalize_count(db: Database, request_id: str) -> int:
    async with db.read() as conn:
        return (
            await conn.execute(
                select(func.count())
                .select_from(t.tasks)
                .where((t.tasks.c.request_id == request_id) & (t.tasks.c.kind == "finalize"))
            )
        ).scalar_one()


async def start_all(db: Database, request_id: str) -> list[TaskWork]:
    works = []
    for task_id in await task_ids(db, request_id):
        work = await start_task(db, task_id)
        assert work is not None
        works.append(work)
    return works


# --- start_task ----------------------------------------------------------------------


async def test_start_task_moves_its_pending_images_to_processing(
    db: Database, tmp_path: Path
) -> None:
    options = ProcessingOptions(quality=30, max_height=200, format="png")
    accepted = await stage(db, tmp_path, [2, 1, 3], task_max_images=3, options=options)
    first, second = await task_ids(db, accepted.request_id)
    assert await counters(db, accepted.request_id) == ("pending", 6, 6, 0, 0, 0)

    work = await start_task(db, first)
    assert work is not None
    assert work.request_id == accepted.request_id
    assert work.options == options
    assert [(i.row_index, i.position, i.input_url) for i in work.images] == [
        (0, 1, "https://img.example/1/0.jpg"),
        (0, 2, "https://img.example/1/1.jpg"),
        (1, 1, "https://img.example/2/0.jpg"),
    ]
    # Each image says what it was when the task was taken: none had been started.
    assert {i.status for i in work.images} == {ImageStatus.PENDING}
    assert {i.attempts for i in work.images} == {0}
    assert await counters(db, accepted.request_id) == ("processing", 6, 3, 3, 0, 0)
    statuses = await image_statuses(db, accepted.request_id)
    assert sorted(statuses.values()) == ["pending"] * 3 + ["processing"] * 3
    assert {statuses[i.id] for i in work.images} == {"processing"}

    work2 = await start_task(db, second)
    assert work2 is not None
    assert [(i.row_index, i.position) for i in work2.images] == [(2, 1), (2, 2), (2, 3)]
    assert await counters(db, accepted.request_id) == ("processing", 6, 0, 6, 0, 0)


async def test_start_task_again_moves_nothing_and_skips_terminal_images(
    db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [3])
    (task_id,) = await task_ids(db, accepted.request_id)
    work = await start_task(db, task_id)
    assert work is not None
    assert not await record(db, accepted.request_id, [processed(work.images[0].id)])
    # A redelivered task: counters do not move again, the terminal image is left out.
    again = await start_task(db, task_id)
    assert again is not None
    assert [i.id for i in again.images] == [i.id for i in work.images[1:]]
    assert {i.status for i in again.images} == {ImageStatus.PROCESSING}  # started before
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 2, 1, 0)


async def test_start_task_of_an_unknown_task_is_none(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [1])
    assert await start_task(db, 10_000) is None
    assert await counters(db, accepted.request_id) == ("pending", 1, 1, 0, 0, 0)


# --- record_results ------------------------------------------------------------------


async def test_record_results_stores_outcomes(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [2])
    (work,) = await start_all(db, accepted.request_id)
    good, bad = work.images
    assert await record(
        db, accepted.request_id, [processed(good.id, 2), failed(bad.id, 4, ErrorCode.TIMEOUT)]
    )
    async with db.read() as conn:
        rows = {
            row.id: row
            for row in await conn.execute(
                select(t.images).where(t.images.c.request_id == accepted.request_id)
            )
        }
    assert rows[good.id].status == "completed"
    assert rows[good.id].attempts == 2
    assert rows[good.id].output_url == f"http://files.example/out/{good.id}.jpg"
    assert rows[good.id].output_key == f"out/{good.id}.jpg"
    assert (rows[good.id].width, rows[good.id].height) == (640, 480)
    assert (rows[good.id].bytes_in, rows[good.id].bytes_out) == (20_000, 9_000)
    assert (rows[good.id].source_quality, rows[good.id].output_quality) == (90, 45)
    assert rows[good.id].error_code is None
    assert rows[good.id].finished_at is not None
    assert rows[bad.id].status == "failed"
    assert rows[bad.id].attempts == 4
    assert rows[bad.id].error_code == "timeout"
    assert rows[bad.id].error_message == f"image {bad.id}: HTTP 404"
    assert rows[bad.id].output_url is None
    assert await counters(db, accepted.request_id) == ("processing", 2, 0, 0, 1, 1)


async def test_a_failure_message_with_a_nul_is_stored_written_out(
    db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [1])
    (work,) = await start_all(db, accepted.request_id)
    image_id = work.images[0].id
    failure = ImageFailure(ErrorCode.HTTP_ERROR, "HTTP 500: \x00\x00 from the source")
    assert await record(db, accepted.request_id, [ImageResult(image_id, 1, failure)])
    async with db.read() as conn:
        message = (
            await conn.execute(select(t.images.c.error_message).where(t.images.c.id == image_id))
        ).scalar_one()
    assert message == "HTTP 500: \\0\\0 from the source"


async def test_record_results_is_idempotent(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [3])
    (work,) = await start_all(db, accepted.request_id)
    first, second, third = (image.id for image in work.images)

    assert not await record(db, accepted.request_id, [processed(first)])
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 2, 1, 0)
    # The same image again (a redelivered task), even with another outcome: no effect.
    assert not await record(db, accepted.request_id, [processed(first)])
    assert not await record(db, accepted.request_id, [failed(first)])
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 2, 1, 0)
    # Twice in one call counts once.
    assert not await record(db, accepted.request_id, [failed(second), failed(second)])
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 1, 1, 1)
    statuses = await image_statuses(db, accepted.request_id)
    assert (statuses[first], statuses[second], statuses[third]) == (
        "completed",
        "failed",
        "processing",
    )
    assert await finalize_count(db, accepted.request_id) == 0

    assert await record(db, accepted.request_id, [processed(third)])
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 0, 2, 1)
    assert await finalize_count(db, accepted.request_id) == 1
    # Recording the last image again neither finishes the request again nor queues more.
    assert not await record(db, accepted.request_id, [processed(third)])
    assert not await record(db, accepted.request_id, [processed(i) for i in (first, second)])
    assert await finalize_count(db, accepted.request_id) == 1
    assert await counters(db, accepted.request_id) == ("processing", 3, 0, 0, 2, 1)


async def test_record_results_of_nothing_does_nothing(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [1])
    assert await record_results(db, []) == []
    assert await counters(db, accepted.request_id) == ("pending", 1, 1, 0, 0, 0)


async def test_a_pending_image_is_not_recorded(db: Database, tmp_path: Path) -> None:
    """Statuses only move forward one step: an image must be processing to finish."""
    accepted = await stage(db, tmp_path, [1])
    image_id = next(iter(await image_statuses(db, accepted.request_id)))
    assert not await record(db, accepted.request_id, [processed(image_id)])
    assert await image_statuses(db, accepted.request_id) == {image_id: "pending"}
    assert await counters(db, accepted.request_id) == ("pending", 1, 1, 0, 0, 0)
    assert await finalize_count(db, accepted.request_id) == 0


async def test_the_last_image_finishes_the_request_once_with_one_finalize(
    db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [2, 2, 1], task_max_images=2)
    works = await start_all(db, accepted.request_id)
    assert len(works) == 3
    images = [image for work in works for image in work.images]
    # Every image but the last: not finished yet.
    for image in images[:-1]:
        assert not await record(db, accepted.request_id, [processed(image.id)])
        assert await finalize_count(db, accepted.request_id) == 0
    assert await record(db, accepted.request_id, [failed(images[-1].id)])
    assert await counters(db, accepted.request_id) == ("processing", 5, 0, 0, 4, 1)
    async with db.read() as conn:
        finalize = (
            await conn.execute(
                select(t.tasks).where(
                    (t.tasks.c.request_id == accepted.request_id) & (t.tasks.c.kind == "finalize")
                )
            )
        ).one()
    assert finalize.state == "queued"
    assert finalize.priority == FINALIZE_PRIORITY
    assert finalize.attempts == 0


async def test_results_of_several_requests_in_one_call(db: Database, tmp_path: Path) -> None:
    one = await stage(db, tmp_path, [1], name="one.csv")
    two = await stage(db, tmp_path, [2], name="two.csv")
    (work_one,) = await start_all(db, one.request_id)
    (work_two,) = await start_all(db, two.request_id)
    finished = await record_results(
        db,
        [
            (one.request_id, processed(work_one.images[0].id)),
            (two.request_id, processed(work_two.images[0].id)),
        ],
    )
    assert finished == [one.request_id]
    finished = await record_results(
        db,
        [
            (one.request_id, processed(work_one.images[0].id)),
            (two.request_id, failed(work_two.images[1].id)),
        ],
    )
    assert finished == [two.request_id]
    assert await counters(db, one.request_id) == ("processing", 1, 0, 0, 1, 0)
    assert await counters(db, two.request_id) == ("processing", 2, 0, 0, 1, 1)
    assert await finalize_count(db, one.request_id) == 1
    assert await finalize_count(db, two.request_id) == 1


async def test_racing_workers_finish_a_request_exactly_once(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [1] * 40, task_max_images=1)
    works = await start_all(db, accepted.request_id)
    images = [image.id for work in works for image in work.images]
    # Two workers (separate engines, as separate processes) record overlapping halves,
    # one image per call, all at once.
    calls = [record(db, accepted.request_id, [processed(i)]) for i in images[:25]] + [
        record(other_db, accepted.request_id, [processed(i)]) for i in images[15:]
    ]
    results = await asyncio.gather(*calls)
    assert results.count(True) == 1
    assert await counters(db, accepted.request_id) == ("processing", 40, 0, 0, 40, 0)
    assert await finalize_count(db, accepted.request_id) == 1


# --- close_request -------------------------------------------------------------------


async def test_close_request_succeeds_once_and_only_once(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [2, 1])
    (work,) = await start_all(db, accepted.request_id)
    assert await record(
        db,
        accepted.request_id,
        [processed(work.images[0].id), failed(work.images[1].id), processed(work.images[2].id)],
    )
    assert await unfinished_count(db) == 1
    assert await close_request(db, accepted.request_id, "outputs/result.csv")
    request = await load_request(db, accepted.request_id)
    assert request.status == "completed"
    assert request.output_key == "outputs/result.csv"
    assert request.error is None
    assert request.finished_at is not None
    assert (request.completed, request.failed) == (2, 1)
    assert await unfinished_count(db) == 0

    assert not await close_request(db, accepted.request_id, "outputs/other.csv")
    again = await load_request(db, accepted.request_id)
    assert again.status == "completed"
    assert again.output_key == "outputs/result.csv"
    assert again.finished_at == request.finished_at


async def test_concurrent_closes_succeed_exactly_once(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [1])
    (work,) = await start_all(db, accepted.request_id)
    assert await record(db, accepted.request_id, [processed(work.images[0].id)])
    results = await asyncio.gather(
        *(
            close_request(database, accepted.request_id, f"out-{n}.csv")
            for n in range(6)
            for database in (db, other_db)
        )
    )
    assert results.count(True) == 1
    assert (await load_request(db, accepted.request_id)).status == "completed"


async def test_a_request_whose_every_image_failed_ends_failed(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, [2, 1])
    (work,) = await start_all(db, accepted.request_id)
    assert await record(db, accepted.request_id, [failed(image.id) for image in work.images])
    assert await close_request(db, accepted.request_id, "outputs/result.csv")
    request = await load_request(db, accepted.request_id)
    assert request.status == "failed"
    assert request.error == "all 3 image(s) failed"
    assert request.finished_at is not None
    assert (request.total, request.pending, request.processing) == (3, 0, 0)
    assert (request.completed, request.failed) == (0, 3)
    assert not await close_request(db, accepted.request_id, "outputs/result.csv")
    assert (await load_request(db, accepted.request_id)).status == "failed"


async def test_output_rows_align_output_urls_with_an_empty_slot(
    db: Database, tmp_path: Path
) -> None:
    accepted = await stage(db, tmp_path, [3, 1, 2])
    (work,) = await start_all(db, accepted.request_id)
    ids = [image.id for image in work.images]
    results = [processed(ids[0]), failed(ids[1]), processed(ids[2])]
    results += [failed(ids[3]), processed(ids[4]), processed(ids[5])]
    assert await record(db, accepted.request_id, results)
    rows = [row async for row in output_rows(db, accepted.request_id, chunk_rows=2)]
    url = "http://files.example/out/{}.jpg".format
    assert rows == [
        (
            ["1", "P1", ",".join(f"https://img.example/1/{n}.jpg" for n in range(3))],
            [url(ids[0]), "", url(ids[2])],
        ),
        (["2", "P2", "https://img.example/2/0.jpg"], [""]),
        (
            ["3", "P3", "https://img.example/3/0.jpg,https://img.example/3/1.jpg"],
            [url(ids[4]), url(ids[5])],
        ),
    ]
