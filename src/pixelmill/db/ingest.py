"""Stage an uploaded CSV: validate it whole, then store it in one transaction.

The file is read twice from disk, never held in memory: once to validate every row
(nothing is stored if any row is wrong), once to insert the request, its products,
its images and its tasks in batches inside a single transaction. The tasks written
here are the queue's outbox: no work can be lost between this commit and a worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from pixelmill.csvio import MAX_PROBLEMS, CsvLimits, CsvProblem, CsvReader, CsvRejected, ParsedRow
from pixelmill.db import tables as t
from pixelmill.db.clock import utcnow
from pixelmill.db.engine import Database
from pixelmill.domain import ImageStatus, ProcessingOptions, RequestStatus, TaskKind

PROCESS_PRIORITY = 1


@dataclass(frozen=True)
class CsvSummary:
    """What a valid file holds."""

    products: int
    images: int


@dataclass(frozen=True)
class AcceptedRequest:
    """A stored request, as the upload answers it."""

    request_id: str
    products: int
    images: int
    tasks: int


def validate_csv(path: Path, limits: CsvLimits) -> CsvSummary:
    """Read the whole file; raise :class:`CsvRejected` listing its problems (up to 100)."""
    problems: list[CsvProblem] = []
    total_problems = 0
    products = images = 0
    with path.open("rb") as stream:
        reader = CsvReader(stream, limits)
        for row in reader.rows():
            products += 1
            images += len(row.urls)
            if row.problems:
                total_problems += len(row.problems)
                problems.extend(row.problems[: MAX_PROBLEMS - len(problems)])
    if total_problems:
        raise CsvRejected(
            422,
            "invalid_csv",
            f"{total_problems} problem(s) found in the file; nothing was stored",
            problems,
            total_problems,
        )
    if products == 0:
        raise CsvRejected(
            422,
            "empty_csv",
            "the file has a header but no product rows",
            [CsvProblem(1, None, "no rows after the header")],
        )
    return CsvSummary(products, images)


class _TaskBlocks:
    """Cuts consecutive rows into tasks of at most ``max_images`` images each."""

    def __init__(self, request_id: str, max_images: int, now: float) -> None:
        self.request_id = request_id
        self.max_images = max_images
        self.now = now
        self.created_at = utcnow()
        self.count = 0
        self._first: int | None = None
        self._last = 0
        self._images = 0

    def add(self, row: ParsedRow) -> dict[str, Any] | None:
        """Add a row; returns a finished task when the row does not fit in the open one."""
        finished = None
        if self._first is not None and self._images + len(row.urls) > self.max_images:
            finished = self.close()
        if self._first is None:
            self._first = row.index
        self._last = row.index
        self._images += len(row.urls)
        return finished

    def close(self) -> dict[str, Any] | None:
        if self._first is None:
            return None
        task = {
            "request_id": self.request_id,
            "kind": TaskKind.PROCESS.value,
            "seq": self.count,
            "first_row": self._first,
            "last_row": self._last,
            "image_count": self._images,
            "state": "queued",
            "priority": PROCESS_PRIORITY,
            "attempts": 0,
            "available_at": self.now,
            "created_at": self.created_at,
        }
        self.count += 1
        self._first, self._images = None, 0
        return task


def _batches(path: Path, limits: CsvLimits, size: int) -> Iterator[list[ParsedRow]]:
    with path.open("rb") as stream:
        rows = CsvReader(stream, limits).rows()
        while batch := list(islice(rows, size)):
            yield batch


def _header(path: Path, limits: CsvLimits) -> list[str]:
    with path.open("rb") as stream:
        return CsvReader(stream, limits).header


async def stage_request(
    db: Database,
    path: Path,
    *,
    options: ProcessingOptions,
    webhook_url: str | None,
    owner: str | None,
    limits: CsvLimits,
    task_max_images: int,
    batch_rows: int = 2000,
) -> AcceptedRequest:
    """Validate the CSV at ``path`` and store it as a new request, all or nothing."""
    summary = await asyncio.to_thread(validate_csv, path, limits)
    header = await asyncio.to_thread(_header, path, limits)
    request_id = uuid.uuid4().hex
    now = utcnow()
    blocks = _TaskBlocks(request_id, task_max_images, time.time())
    batches = _batches(path, limits, batch_rows)
    async with db.write() as conn:
        await conn.execute(
            insert(t.requests).values(
                id=request_id,
                owner=owner,
                status=RequestStatus.PENDING.value,
                options=options.as_dict(),
                header=header,
                webhook_url=webhook_url,
                products=summary.products,
                total=summary.images,
                pending=summary.images,
                processing=0,
                completed=0,
                failed=0,
                created_at=now,
                updated_at=now,
            )
        )
        while batch := await asyncio.to_thread(next, batches, None):
            products, images, tasks = _rows_to_records(request_id, batch, blocks)
            await conn.execute(insert(t.products), products)
            await conn.execute(insert(t.images), images)
            if tasks:
                await conn.execute(insert(t.tasks), tasks)
        last = blocks.close()
        if last:
            await conn.execute(insert(t.tasks), [last])
    return AcceptedRequest(request_id, summary.products, summary.images, blocks.count)


def _rows_to_records(
    request_id: str, batch: list[ParsedRow], blocks: _TaskBlocks
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    products, images, tasks = [], [], []
    pending = ImageStatus.PENDING.value
    for row in batch:
        products.append(
            {
                "request_id": request_id,
                "row_index": row.index,
                "line": row.line,
                "serial_number": row.serial_number,
                "product_name": row.product_name,
                "cells": row.cells,
            }
        )
        for position, url in enumerate(row.urls, start=1):
            images.append(
                {
                    "request_id": request_id,
                    "row_index": row.index,
                    "position": position,
                    "input_url": url,
                    "status": pending,
                    "attempts": 0,
                }
            )
        task = blocks.add(row)
        if task:
            tasks.append(task)
    return products, images, tasks
