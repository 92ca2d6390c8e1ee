"""Stage an uploaded CSV: validate it while storing it, in one transaction.

The file is read once from disk and never held in memory: rows are parsed in batches
on a thread while the previous batch is inserted, and every row is validated as it
goes. The request, its products, its images and its tasks are committed together,
or, if any row is wrong, nothing is (the transaction is rolled back and every problem
found, up to 100, is reported). The tasks written here are the queue's outbox: no work
can be lost between this commit and a worker. Products and images, by far the most
rows, go straight to the driver: ``COPY`` on PostgreSQL, ``executemany`` on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Table, bindparam, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from pixelmill.csvio import MAX_PROBLEMS, CsvLimits, CsvProblem, CsvReader, CsvRejected, ParsedRow
from pixelmill.db import tables as t
from pixelmill.db.clock import utcnow
from pixelmill.db.engine import Database
from pixelmill.domain import ImageStatus, ProcessingOptions, RequestStatus, TaskKind

PROCESS_PRIORITY = 1
_PRODUCT_COLUMNS = ("request_id", "row_index", "line", "serial_number", "product_name", "cells")
_IMAGE_COLUMNS = ("request_id", "row_index", "position", "input_url", "status", "attempts")
_TASK_COLUMNS = (
    "request_id", "kind", "seq", "first_row", "last_row", "image_count", "state",
    "priority", "attempts", "available_at", "created_at",
)  # fmt: skip
_RAW_TABLES = {"products": (t.products, _PRODUCT_COLUMNS), "images": (t.images, _IMAGE_COLUMNS)}

# Stores rows of ``_RAW_TABLES[name]`` in the staging transaction.
_RowWriter = Callable[[str, list[tuple[Any, ...]]], Awaitable[None]]


@dataclass(frozen=True)
class AcceptedRequest:
    """A stored request, as the upload answers it."""

    request_id: str
    products: int
    images: int
    tasks: int


@dataclass
class _Problems:
    """Problems found so far: the first 100, and how many in all."""

    shown: list[CsvProblem] = field(default_factory=list)
    total: int = 0

    def add(self, problems: list[CsvProblem]) -> None:
        self.total += len(problems)
        self.shown.extend(problems[: MAX_PROBLEMS - len(self.shown)])


class _TaskBlocks:
    """Cuts consecutive rows into tasks of at most ``max_images`` images each."""

    def __init__(self, request_id: str, max_images: int) -> None:
        self.request_id = request_id
        self.max_images = max_images
        self.now = time.time()
        self.created_at = utcnow()
        self.count = 0
        self._first: int | None = None
        self._last = 0
        self._images = 0

    def add(self, row: ParsedRow) -> tuple[Any, ...] | None:
        """Add a row; returns a finished task when the row does not fit in the open one."""
        finished = None
        if self._first is not None and self._images + len(row.urls) > self.max_images:
            finished = self.close()
        if self._first is None:
            self._first = row.index
        self._last = row.index
        self._images += len(row.urls)
        return finished

    def close(self) -> tuple[Any, ...] | None:
        """The open task, if any, as a row of ``_TASK_COLUMNS``."""
        if self._first is None:
            return None
        task = (
            self.request_id, TaskKind.PROCESS.value, self.count, self._first, self._last,
            self._images, "queued", PROCESS_PRIORITY, 0, self.now, self.created_at,
        )  # fmt: skip
        self.count += 1
        self._first, self._images = None, 0
        return task


@dataclass
class _Batch:
    """One batch of parsed rows, turned into the rows of each table."""

    products: list[tuple[Any, ...]] = field(default_factory=list)
    images: list[tuple[Any, ...]] = field(default_factory=list)
    tasks: list[tuple[Any, ...]] = field(default_factory=list)
    problems: list[CsvProblem] = field(default_factory=list)


def _batches(
    reader: CsvReader, request_id: str, blocks: _TaskBlocks, size: int
) -> Iterator[_Batch]:
    rows = reader.rows()
    pending = ImageStatus.PENDING.value
    while parsed := list(islice(rows, size)):
        batch = _Batch()
        for row in parsed:
            if row.problems:
                batch.problems.extend(row.problems)
                continue
            batch.products.append(
                (request_id, row.index, row.line, row.serial_number, row.product_name,
                 json.dumps(row.cells, ensure_ascii=False))
            )  # fmt: skip
            batch.images.extend(
                (request_id, row.index, position, url, pending, 0)
                for position, url in enumerate(row.urls, start=1)
            )
            task = blocks.add(row)
            if task:
                batch.tasks.append(task)
        yield batch


def _insert_sql(conn: AsyncConnection, table: Table, columns: tuple[str, ...]) -> str:
    """A positional INSERT in the driver's own parameter style, for raw executemany."""
    statement = insert(table).values({name: bindparam(name) for name in columns})
    compiled = statement.compile(dialect=conn.dialect)
    assert compiled.positiontup == list(columns)
    return str(compiled)


async def _row_writer(conn: AsyncConnection) -> _RowWriter:
    """How products and images reach the database: COPY on PostgreSQL, else executemany."""
    if conn.dialect.name != "postgresql":
        sql = {name: _insert_sql(conn, table, cols) for name, (table, cols) in _RAW_TABLES.items()}

        async def insert_many(name: str, rows: list[tuple[Any, ...]]) -> None:
            await conn.exec_driver_sql(sql[name], rows)

        return insert_many

    # SQLAlchemy's asyncpg adapter begins the driver's transaction at the first statement
    # it runs: run one, so the COPYs below belong to the staging transaction.
    await conn.exec_driver_sql("SELECT 1")
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None and driver.is_in_transaction()

    async def copy(name: str, rows: list[tuple[Any, ...]]) -> None:
        # ``cells`` is JSON text, as the codec SQLAlchemy installs for json expects.
        if rows:
            await driver.copy_records_to_table(name, records=rows, columns=_RAW_TABLES[name][1])

    return copy


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
    request_id = uuid.uuid4().hex
    with path.open("rb") as stream:
        reader = await asyncio.to_thread(CsvReader, stream, limits)
        blocks = _TaskBlocks(request_id, task_max_images)
        batches = _batches(reader, request_id, blocks, batch_rows)
        async with db.write() as conn:
            products, images = await _store_batches(conn, batches, blocks)
            await conn.execute(
                insert(t.requests).values(
                    id=request_id,
                    owner=owner,
                    status=RequestStatus.PENDING.value,
                    options=options.as_dict(),
                    header=reader.header,
                    webhook_url=webhook_url,
                    products=products,
                    total=images,
                    pending=images,
                    processing=0,
                    completed=0,
                    failed=0,
                    created_at=blocks.created_at,
                    updated_at=blocks.created_at,
                )
            )
    return AcceptedRequest(request_id, products, images, blocks.count)


async def _insert_tasks(conn: AsyncConnection, tasks: list[tuple[Any, ...]]) -> None:
    if tasks:
        await conn.execute(
            insert(t.tasks), [dict(zip(_TASK_COLUMNS, task, strict=True)) for task in tasks]
        )


async def _store_batches(
    conn: AsyncConnection, batches: Iterator[_Batch], blocks: _TaskBlocks
) -> tuple[int, int]:
    """Insert every batch while the next one is parsed; raise if any row was wrong."""
    # Products and images, by far the most rows, go straight to the driver; tasks (one
    # per block of rows) go through SQLAlchemy, which also converts their timestamps.
    write_rows = await _row_writer(conn)
    problems = _Problems()
    products = images = 0
    upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
    try:
        while (batch := await upcoming) is not None:
            upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            problems.add(batch.problems)
            if problems.total:
                continue  # keep reading to report every problem; store nothing more
            products += len(batch.products)
            images += len(batch.images)
            await write_rows("products", batch.products)
            await write_rows("images", batch.images)
            await _insert_tasks(conn, batch.tasks)
        last = blocks.close()
        if last and not problems.total:
            await _insert_tasks(conn, [last])
    finally:
        if not upcoming.done():
            await asyncio.gather(upcoming, return_exceptions=True)
    if problems.total:
        raise CsvRejected(
            422,
            "invalid_csv",
            f"{problems.total} problem(s) found in the file; nothing was stored",
            problems.shown,
            problems.total,
        )
    if products == 0:
        raise CsvRejected(
            422,
            "empty_csv",
            "the file has a header but no product rows",
            [CsvProblem(1, None, "no rows after the header")],
        )
    return products, images
