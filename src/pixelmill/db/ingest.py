"""Stage an uploaded CSV: validate it while storing it, in one transaction.

The file is read once from disk and never held in memory: rows are parsed in batches
on a thread while the previous batch is inserted, and every row is validated as it
goes. The request, its products, its images and its tasks are committed together,
or, if any row is wrong, nothing is (the transaction is rolled back and every problem
found, up to 100, is reported). The tasks written here are the queue's outbox: no work
can be lost between this commit and a worker. Products and images, by far the most
rows, go straight to the driver: ``COPY`` on PostgreSQL; on SQLite one JSON document
per batch, which SQLite expands into rows with ``json_each`` in a single statement per
table, so the inserting thread runs without the GIL while Python parses the next batch.
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

from sqlalchemy import insert
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
    """Cuts consecutive rows into tasks of at most ``max_images`` images each, and the
    end of the request finer.

    A request ends when its last task does, while the workers that found no task left
    wait. So the last task cut is held back until the input ends; then it and the open
    one are cut again into tasks of a quarter of the size (for a bound of 16 images or
    more; below that, as they were).
    """

    def __init__(self, request_id: str, max_images: int) -> None:
        self.request_id = request_id
        self.max_images = max_images
        self.tail_images = max_images // 4 if max_images >= 16 else max_images
        self.now = time.time()
        self.created_at = utcnow()
        self.count = 0
        self._open: list[tuple[int, int]] = []  # (row index, images) of the open task
        self._open_images = 0
        self._held: list[tuple[int, int]] = []  # the last task cut, not yet emitted

    def add(self, row: ParsedRow) -> tuple[Any, ...] | None:
        """Add a row; returns a task once the rows after it are known not to end the input."""
        emitted = None
        if self._open and self._open_images + len(row.urls) > self.max_images:
            emitted = self._task(self._held) if self._held else None
            self._held, self._open, self._open_images = self._open, [], 0
        self._open.append((row.index, len(row.urls)))
        self._open_images += len(row.urls)
        return emitted

    def close(self) -> list[tuple[Any, ...]]:
        """The tasks held back and open, as rows of ``_TASK_COLUMNS``, cut finer."""
        rows, self._held, self._open, self._open_images = self._held + self._open, [], [], 0
        return [self._task(block) for block in _blocks(rows, self.tail_images)]

    def _task(self, rows: list[tuple[int, int]]) -> tuple[Any, ...]:
        task = (
            self.request_id, TaskKind.PROCESS.value, self.count, rows[0][0], rows[-1][0],
            sum(images for _, images in rows), "queued", PROCESS_PRIORITY, 0, self.now,
            self.created_at,
        )  # fmt: skip
        self.count += 1
        return task


def _blocks(rows: list[tuple[int, int]], max_images: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive ``(row index, images)`` cut greedily: a block ends only where the next
    row would not fit (a row larger than the bound is a block of its own)."""
    block: list[tuple[int, int]] = []
    images = 0
    for row in rows:
        if block and images + row[1] > max_images:
            yield block
            block, images = [], 0
        block.append(row)
        images += row[1]
    if block:
        yield block


# A batch of valid rows as each backend stores it: a JSON document on SQLite (expanded
# into rows by SQLite itself), COPY records on PostgreSQL.
_Encoder = Callable[[str, list[ParsedRow]], Any]
_BatchWriter = Callable[[Any], Awaitable[None]]


@dataclass
class _Batch:
    """One batch of parsed rows: the valid ones encoded for the database, and the rest."""

    payload: Any = None
    products: int = 0
    images: int = 0
    tasks: list[tuple[Any, ...]] = field(default_factory=list)
    problems: list[CsvProblem] = field(default_factory=list)


def _batches(
    reader: CsvReader, request_id: str, blocks: _TaskBlocks, size: int, encode: _Encoder
) -> Iterator[_Batch]:
    rows = reader.rows()
    failed = False  # once a row is wrong nothing is stored: the rest is read for problems
    while parsed := list(islice(rows, size)):
        batch = _Batch()
        valid: list[ParsedRow] = []
        for row in parsed:
            if row.problems:
                batch.problems.extend(row.problems)
                failed = True
            elif not failed:
                valid.append(row)
                batch.images += len(row.urls)
                task = blocks.add(row)
                if task:
                    batch.tasks.append(task)
        if not failed:
            batch.products = len(valid)
            batch.payload = encode(request_id, valid)
        yield batch


def _json_document(request_id: str, rows: list[ParsedRow]) -> str:
    """The rows as one JSON array of ``[row_index, line, serial, name, cells, urls]``."""
    del request_id  # bound once per statement
    return json.dumps(
        [(r.index, r.line, r.serial_number, r.product_name, r.cells, r.urls) for r in rows],
        ensure_ascii=False,
    )


def _copy_records(
    request_id: str, rows: list[ParsedRow]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows as COPY records of ``products`` and of ``images``."""
    pending = ImageStatus.PENDING.value
    products = [
        (request_id, r.index, r.line, r.serial_number, r.product_name,
         json.dumps(r.cells, ensure_ascii=False))
        for r in rows
    ]  # fmt: skip
    images = [
        (request_id, r.index, position, url, pending, 0)
        for r in rows
        for position, url in enumerate(r.urls, start=1)
    ]
    return products, images


# SQLite turns a batch's JSON document into rows itself, in one statement per table: the
# thread that inserts then runs C code without the GIL while the next batch is parsed.
_SQLITE_PRODUCTS = """\
INSERT INTO products (request_id, row_index, line, serial_number, product_name, cells)
SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'),
       json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]')
FROM json_each(?2)"""
_SQLITE_IMAGES = """\
INSERT INTO images (request_id, row_index, position, input_url, status, attempts)
SELECT ?1, json_extract(row.value, '$[0]'), url.key + 1, url.value, ?3, 0
FROM json_each(?2) AS row, json_each(row.value, '$[5]') AS url"""


async def _batch_writer(conn: AsyncConnection, request_id: str) -> tuple[_Encoder, _BatchWriter]:
    """How a batch is encoded (in the parsing thread) and stored, for this database."""
    if conn.dialect.name != "postgresql":

        async def insert_document(document: str) -> None:
            await conn.exec_driver_sql(_SQLITE_PRODUCTS, (request_id, document))
            pending = ImageStatus.PENDING.value
            await conn.exec_driver_sql(_SQLITE_IMAGES, (request_id, document, pending))

        return _json_document, insert_document

    # SQLAlchemy's asyncpg adapter begins the driver's transaction at the first statement
    # it runs: run one, so the COPYs below belong to the staging transaction.
    await conn.exec_driver_sql("SELECT 1")
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None and driver.is_in_transaction()

    async def copy(records: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]) -> None:
        # ``cells`` is JSON text, as the codec SQLAlchemy installs for json expects.
        products, images = records
        if products:
            await driver.copy_records_to_table(
                "products", records=products, columns=_PRODUCT_COLUMNS
            )
            await driver.copy_records_to_table("images", records=images, columns=_IMAGE_COLUMNS)

    return _copy_records, copy


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
        async with db.write() as conn:
            encode, write_batch = await _batch_writer(conn, request_id)
            batches = _batches(reader, request_id, blocks, batch_rows, encode)
            products, images = await _store_batches(
                conn, batches, blocks, write_batch, reader.header_line
            )
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
    conn: AsyncConnection,
    batches: Iterator[_Batch],
    blocks: _TaskBlocks,
    write: _BatchWriter,
    header_line: int,
) -> tuple[int, int]:
    """Insert every batch while the next one is parsed; raise if any row was wrong (or
    none came after the header, on ``header_line``)."""
    # Products and images, by far the most rows, go straight to the driver; tasks (one
    # per block of rows) go through SQLAlchemy, which also converts their timestamps.
    problems = _Problems()
    products = images = 0
    upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
    try:
        while (batch := await upcoming) is not None:
            upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            problems.add(batch.problems)
            if problems.total:
                continue  # keep reading to report every problem; store nothing more
            products += batch.products
            images += batch.images
            await write(batch.payload)
            await _insert_tasks(conn, batch.tasks)
        if not problems.total:
            await _insert_tasks(conn, blocks.close())
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
            [CsvProblem(header_line, None, "no rows after the header")],
        )
    return products, images
