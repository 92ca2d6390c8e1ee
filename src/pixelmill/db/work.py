"""What workers read and write: a task's images, their results, and the finish.

Every status move is a conditional UPDATE on the current status, and the request's
counters move in the same transaction by exactly the number of rows that moved, so a
redelivered task or a racing worker can never count an image twice. Rows are locked in
one order (images by id, then requests by id), so racing workers never deadlock; and
because every write here is conditional, each unit of work may be run again after a
lost connection (:func:`retry_transient`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pixelmill.db import deliveries
from pixelmill.db import tables as t
from pixelmill.db.clock import utcnow
from pixelmill.db.engine import Database, retry_transient
from pixelmill.domain import (
    ImageFailure,
    ImageOutcome,
    ImageRecord,
    ImageStatus,
    ProcessedImage,
    ProcessingOptions,
    RequestStatus,
    TaskKind,
)
from pixelmill.webhooks.payload import finished_event

FINALIZE_PRIORITY = 0
_OPEN = (ImageStatus.PENDING.value, ImageStatus.PROCESSING.value)
_UNFINISHED = (RequestStatus.PENDING.value, RequestStatus.PROCESSING.value)


@dataclass(frozen=True)
class TaskWork:
    """The images a worker must still process for one task."""

    request_id: str
    options: ProcessingOptions
    images: list[ImageRecord]


@dataclass(frozen=True)
class ImageResult:
    """The final outcome of one image, ready to be recorded."""

    image_id: int
    attempts: int
    outcome: ImageOutcome


@retry_transient
async def start_task(db: Database, task_id: int) -> TaskWork | None:
    """Mark the task's pending images ``processing`` and return those not yet terminal,
    each with its status from before (``pending`` for one that no delivery started)."""
    async with db.write() as conn:
        task = (await conn.execute(select(t.tasks).where(t.tasks.c.id == task_id))).first()
        if task is None:
            return None
        in_task = (
            (t.images.c.request_id == task.request_id)
            & (t.images.c.row_index >= task.first_row)
            & (t.images.c.row_index <= task.last_row)
        )
        # Read before the move, so that each image says whether an earlier delivery
        # of the task started it.
        rows = (
            await conn.execute(
                select(
                    t.images.c.id,
                    t.images.c.row_index,
                    t.images.c.position,
                    t.images.c.input_url,
                    t.images.c.status,
                    t.images.c.attempts,
                )
                .where(in_task & t.images.c.status.in_(_OPEN))
                .order_by(t.images.c.row_index, t.images.c.position)
            )
        ).all()
        moved = await conn.execute(
            update(t.images)
            .where(in_task & (t.images.c.status == ImageStatus.PENDING.value))
            .values(status=ImageStatus.PROCESSING.value)
        )
        request = (
            await conn.execute(
                update(t.requests)
                .where(t.requests.c.id == task.request_id)
                .values(
                    pending=t.requests.c.pending - moved.rowcount,
                    processing=t.requests.c.processing + moved.rowcount,
                    status=case(
                        (
                            t.requests.c.status == RequestStatus.PENDING.value,
                            RequestStatus.PROCESSING.value,
                        ),
                        else_=t.requests.c.status,
                    ),
                    updated_at=utcnow(),
                )
                .returning(t.requests.c.options)
            )
        ).first()
        images = [
            ImageRecord(
                r.id, r.row_index, r.position, r.input_url, ImageStatus(r.status), r.attempts
            )
            for r in rows
        ]
    if request is None:
        return None
    return TaskWork(task.request_id, ProcessingOptions.from_dict(request.options), images)


_NO_OUTPUT: dict[str, Any] = {
    "output_key": None,
    "output_url": None,
    "bytes_in": None,
    "bytes_out": None,
    "width": None,
    "height": None,
    "format": None,
    "source_quality": None,
    "output_quality": None,
    "kept_source": None,
    "error_code": None,
    "error_message": None,
}


def _result_values(result: ImageResult, now: datetime) -> dict[str, Any]:
    """The column values of one result; every result has the same keys (executemany)."""
    outcome = result.outcome
    values: dict[str, Any] = {**_NO_OUTPUT, "attempts": result.attempts, "finished_at": now}
    if isinstance(outcome, ProcessedImage):
        values.update(
            status=ImageStatus.COMPLETED.value,
            output_key=outcome.output_key,
            output_url=outcome.output_url,
            bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out,
            width=outcome.width,
            height=outcome.height,
            format=outcome.format,
            source_quality=outcome.source_quality,
            output_quality=outcome.output_quality,
            kept_source=outcome.kept_source,
        )
    else:
        assert isinstance(outcome, ImageFailure)
        values.update(
            status=ImageStatus.FAILED.value,
            error_code=outcome.code.value,
            error_message=t.bounded_text(outcome.message),
        )
    return values


_RECORD = (
    update(t.images)
    .where(
        (t.images.c.id == bindparam("image_id"))
        & (t.images.c.status == ImageStatus.PROCESSING.value)
    )
    .values(
        {
            name: bindparam(f"v_{name}")
            for name in ("status", "attempts", "finished_at", *_NO_OUTPUT)
        }
    )
)


def _record_params(result: ImageResult, now: datetime) -> dict[str, Any]:
    values = _result_values(result, now)
    return {"image_id": result.image_id, **{f"v_{name}": value for name, value in values.items()}}


@retry_transient
async def record_results(db: Database, results: list[tuple[str, ImageResult]]) -> list[str]:
    """Store terminal outcomes of images of any requests, in one transaction.

    Only images still ``processing`` move (and are counted), so recording an outcome
    twice has no effect. Returns the requests whose last image this call recorded;
    for each, this call also queued the finalize task, so exactly one exists.
    """
    if not results:
        return []
    by_id = {result.image_id: (request_id, result) for request_id, result in results}
    async with db.write() as conn:
        movable = (
            await conn.execute(
                select(t.images.c.id)
                .where(
                    t.images.c.id.in_(by_id) & (t.images.c.status == ImageStatus.PROCESSING.value)
                )
                .order_by(t.images.c.id)
                .with_for_update()
            )
        ).scalars()
        moving = [by_id[image_id] for image_id in movable]
        if not moving:
            return []
        now = utcnow()
        await conn.execute(_RECORD, [_record_params(result, now) for _, result in moving])
        counts: dict[str, list[int]] = {}
        for request_id, result in moving:
            done = counts.setdefault(request_id, [0, 0])
            done[0 if isinstance(result.outcome, ProcessedImage) else 1] += 1
        finished = []
        for request_id, (completed, failed) in sorted(counts.items()):
            if await _count_terminal(conn, request_id, completed, failed, now):
                await _queue_finalize(conn, request_id)
                finished.append(request_id)
        return finished


async def _count_terminal(
    conn: AsyncConnection, request_id: str, completed: int, failed: int, now: datetime
) -> bool:
    """Move the request's counters; True when no image is left pending or processing."""
    counters = (
        await conn.execute(
            update(t.requests)
            .where(t.requests.c.id == request_id)
            .values(
                processing=t.requests.c.processing - (completed + failed),
                completed=t.requests.c.completed + completed,
                failed=t.requests.c.failed + failed,
                updated_at=now,
            )
            .returning(t.requests.c.pending, t.requests.c.processing)
        )
    ).one()
    return counters.pending == 0 and counters.processing == 0


async def _queue_finalize(conn: AsyncConnection, request_id: str) -> None:
    await conn.execute(
        insert(t.tasks).values(
            request_id=request_id,
            kind=TaskKind.FINALIZE.value,
            seq=0,
            first_row=0,
            last_row=0,
            image_count=0,
            state="queued",
            priority=FINALIZE_PRIORITY,
            attempts=0,
            available_at=time.time(),
            created_at=utcnow(),
        )
    )


async def output_rows(
    db: Database, request_id: str, chunk_rows: int = 5000
) -> AsyncIterator[tuple[list[str], list[str]]]:
    """(input cells, output URLs by position) for every product, in input order.

    Read in chunks of rows, each in its own short transaction, so memory stays flat.
    """
    start = 0
    while True:
        async with db.read() as conn:
            products = (
                await conn.execute(
                    select(t.products.c.row_index, t.products.c.cells)
                    .where(
                        (t.products.c.request_id == request_id)
                        & (t.products.c.row_index >= start)
                        & (t.products.c.row_index < start + chunk_rows)
                    )
                    .order_by(t.products.c.row_index)
                )
            ).all()
            images = await conn.execute(
                select(t.images.c.row_index, t.images.c.position, t.images.c.output_url)
                .where(
                    (t.images.c.request_id == request_id)
                    & (t.images.c.row_index >= start)
                    & (t.images.c.row_index < start + chunk_rows)
                )
                .order_by(t.images.c.row_index, t.images.c.position)
            )
            urls: dict[int, list[str]] = {}
            for image in images:
                urls.setdefault(image.row_index, []).append(image.output_url or "")
        if not products:
            return
        for product in products:
            yield product.cells, urls.get(product.row_index, [])
        start += chunk_rows


async def load_request(db: Database, request_id: str) -> Any:
    """The request row, or None."""
    async with db.read() as conn:
        return (await conn.execute(select(t.requests).where(t.requests.c.id == request_id))).first()


@retry_transient
async def close_request(
    db: Database, request_id: str, output_key: str, output_csv_url: str | None = None
) -> bool:
    """Move the request to its final status; True only for the call that did it.

    A request with a ``webhook_url`` gets its ``request.finished`` delivery queued in
    the same transaction, so the close and its webhook are committed together.
    """
    async with db.write() as conn:
        request = (
            await conn.execute(
                select(t.requests.c.completed, t.requests.c.failed).where(
                    t.requests.c.id == request_id
                )
            )
        ).one()
        succeeded = request.completed > 0
        now = utcnow()
        moved = await conn.execute(
            update(t.requests)
            .where((t.requests.c.id == request_id) & t.requests.c.status.in_(_UNFINISHED))
            .values(
                status=(RequestStatus.COMPLETED if succeeded else RequestStatus.FAILED).value,
                output_key=output_key,
                error=None if succeeded else f"all {request.failed} image(s) failed",
                finished_at=now,
                updated_at=now,
            )
            .returning(*t.requests.c)
        )
        closed = moved.first()
        if closed is not None and closed.webhook_url:
            body = finished_event(closed, output_csv_url)
            await deliveries.queue_delivery(conn, request_id, closed.webhook_url, body)
        return closed is not None


async def unfinished_count(db: Database) -> int:
    """How many requests are not finished yet (for health and tests)."""
    async with db.read() as conn:
        return (
            await conn.execute(
                select(func.count())
                .select_from(t.requests)
                .where(t.requests.c.status.in_(_UNFINISHED))
            )
        ).scalar_one()
