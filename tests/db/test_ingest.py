"""Staging an uploaded CSV into a real database: all or nothing, cut into tasks."""

from __future__ import annotations

import csv
import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from pixelmill.csvio import MAX_PROBLEMS, CsvLimits, CsvRejected
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import PROCESS_PRIORITY, AcceptedRequest, stage_request
from pixelmill.domain import ProcessingOptions

HEADER = ["S. No.", "Product Name", "Input Image Urls"]


def write_csv(path: Path, rows: Sequence[Sequence[object]], header: Sequence[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def url_rows(counts: Sequence[int]) -> list[list[object]]:
    """One row per count, with that many distinct URLs."""
    return [
        [
            serial,
            f"Product {serial}",
            ", ".join(f"https://img.example/{serial}/{n}.jpg" for n in range(count)),
        ]
        for serial, count in enumerate(counts, start=1)
    ]


async def stage(
    db: Database,
    path: Path,
    *,
    task_max_images: int = 64,
    batch_rows: int = 2000,
    limits: CsvLimits | None = None,
    options: ProcessingOptions | None = None,
    webhook_url: str | None = None,
    owner: str | None = None,
) -> AcceptedRequest:
    return await stage_request(
        db,
        path,
        options=options or ProcessingOptions(),
        webhook_url=webhook_url,
        owner=owner,
        limits=limits or CsvLimits(),
        task_max_images=task_max_images,
        batch_rows=batch_rows,
    )


async def table_counts(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        return {
            table.name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            for table in (t.requests, t.products, t.images, t.tasks)
        }


async def tasks_of(db: Database, request_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.tasks).where(t.tasks.c.request_id == request_id).order_by(t.tasks.c.id)
        )
        return [dict(row._mapping) for row in rows]


def check_tasks(tasks: list[dict[str, Any]], counts: Sequence[int], bound: int) -> None:
    """Tasks cover every row once, contiguously and in order, each within the bound."""
    assert tasks, "no task"
    assert [task["seq"] for task in tasks] == list(range(len(tasks)))
    assert tasks[0]["first_row"] == 0
    assert tasks[-1]["last_row"] == len(counts) - 1
    for before, after in itertools.pairwise(tasks):
        assert after["first_row"] == before["last_row"] + 1
    covered = [row for task in tasks for row in range(task["first_row"], task["last_row"] + 1)]
    assert covered == list(range(len(counts)))
    for task in tasks:
        rows = range(task["first_row"], task["last_row"] + 1)
        images = sum(counts[row] for row in rows)
        assert task["image_count"] == images
        if len(rows) > 1:
            assert images <= bound, task
        else:
            # Only a row that alone exceeds the bound may make an oversized task.
            assert images <= bound or counts[rows[0]] > bound
        assert task["kind"] == "process"
        assert task["state"] == "queued"
        assert task["priority"] == PROCESS_PRIORITY
        assert task["attempts"] == 0
        assert task["lease_owner"] is None
        assert task["published_at"] is None


async def test_stage_stores_request_products_images_and_tasks(db: Database, tmp_path: Path) -> None:
    counts = [1, 2, 3, 1, 1, 2, 3, 3, 1]
    path = write_csv(tmp_path / "in.csv", url_rows(counts))
    options = ProcessingOptions(quality=40, max_width=800, format="webp")
    accepted = await stage(
        db,
        path,
        task_max_images=3,
        batch_rows=2,
        options=options,
        webhook_url="https://hooks.example/done",
        owner="alice",
    )
    assert accepted.products == len(counts)
    assert accepted.images == sum(counts)
    assert len(accepted.request_id) == 32

    async with db.read() as conn:
        request = (await conn.execute(select(t.requests))).one()
        products = (await conn.execute(select(t.products).order_by(t.products.c.row_index))).all()
        images = (await conn.execute(select(t.images).order_by(t.images.c.id))).all()

    assert request.id == accepted.request_id
    assert request.status == "pending"
    assert request.owner == "alice"
    assert request.webhook_url == "https://hooks.example/done"
    assert request.options == options.as_dict()
    assert request.header == HEADER
    assert request.products == len(counts)
    assert request.total == request.pending == sum(counts)
    assert request.processing == request.completed == request.failed == 0
    assert request.finished_at is None and request.output_key is None and request.error is None

    assert [(p.row_index, p.line, p.serial_number, p.product_name) for p in products] == [
        (index, index + 2, str(index + 1), f"Product {index + 1}") for index in range(len(counts))
    ]
    assert [p.cells for p in products] == [[str(c) for c in row] for row in url_rows(counts)]
    assert {p.request_id for p in products} == {accepted.request_id}

    # Images in input order, positions from 1 within each row.
    assert [(i.row_index, i.position, i.input_url) for i in images] == [
        (row, n + 1, f"https://img.example/{row + 1}/{n}.jpg")
        for row, count in enumerate(counts)
        for n in range(count)
    ]
    assert {(i.status, i.attempts, i.output_url) for i in images} == {("pending", 0, None)}

    tasks = await tasks_of(db, accepted.request_id)
    assert accepted.tasks == len(tasks)
    check_tasks(tasks, counts, bound=3)
    # Greedy packing: a task is only cut when the next row would not fit.
    assert [(task["first_row"], task["last_row"]) for task in tasks] == [
        (0, 1),
        (2, 2),
        (3, 4),
        (5, 5),
        (6, 6),
        (7, 7),
        (8, 8),
    ]


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 7, 2000])
async def test_row_with_more_urls_than_the_bound_gets_its_own_task(
    db: Database, tmp_path: Path, batch_rows: int
) -> None:
    counts = [1, 1, 5, 2, 1, 4, 3, 3]
    path = write_csv(tmp_path / "in.csv", url_rows(counts))
    accepted = await stage(db, path, task_max_images=3, batch_rows=batch_rows)
    tasks = await tasks_of(db, accepted.request_id)
    check_tasks(tasks, counts, bound=3)
    spans = [(task["first_row"], task["last_row"], task["image_count"]) for task in tasks]
    assert (2, 2, 5) in spans
    assert (5, 5, 4) in spans
    assert spans == [(0, 1, 2), (2, 2, 5), (3, 4, 3), (5, 5, 4), (6, 6, 3), (7, 7, 3)]


@pytest.mark.parametrize(
    ("counts", "spans"),
    [
        # 200 images: two tasks of 64, then the last 72 in tasks of 16 (and the rest).
        (
            [1] * 200,
            [(0, 63), (64, 127), (128, 143), (144, 159), (160, 175), (176, 191), (192, 199)],
        ),
        # Less than one task: cut finer too, so that it can be shared.
        ([2] * 20, [(0, 7), (8, 15), (16, 19)]),
        # The last task cut (rows 0-20) and the open one (21-31) are cut again: rows of 3
        # five to a task, and a row over 16 images stands alone.
        (
            [3] * 30 + [20, 1],
            [(0, 4), (5, 9), (10, 14), (15, 19), (20, 24), (25, 29), (30, 30), (31, 31)],
        ),
    ],
)
async def test_the_end_of_a_request_is_cut_into_quarter_tasks(
    db: Database, tmp_path: Path, counts: list[int], spans: list[tuple[int, int]]
) -> None:
    path = write_csv(tmp_path / "in.csv", url_rows(counts))
    accepted = await stage(db, path, task_max_images=64, batch_rows=7)
    tasks = await tasks_of(db, accepted.request_id)
    check_tasks(tasks, counts, bound=64)
    assert [(task["first_row"], task["last_row"]) for task in tasks] == spans
    assert accepted.tasks == len(tasks)


@pytest.mark.parametrize("seed", range(6))
async def test_tasks_cover_every_row_for_random_layouts(
    db: Database, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    bound = rng.randint(1, 6)
    counts = [rng.randint(1, 8) for _ in range(rng.randint(1, 60))]
    path = write_csv(tmp_path / "in.csv", url_rows(counts))
    accepted = await stage(db, path, task_max_images=bound, batch_rows=rng.randint(1, 10))
    tasks = await tasks_of(db, accepted.request_id)
    check_tasks(tasks, counts, bound=bound)
    assert accepted.tasks == len(tasks)
    assert sum(task["image_count"] for task in tasks) == sum(counts)
    assert await table_counts(db) == {
        "requests": 1,
        "products": len(counts),
        "images": sum(counts),
        "tasks": len(tasks),
    }


async def test_two_uploads_are_two_independent_requests(db: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", url_rows([2, 1]))
    first = await stage(db, path, task_max_images=2)
    second = await stage(db, path, task_max_images=2)
    assert first.request_id != second.request_id
    assert await table_counts(db) == {"requests": 2, "products": 4, "images": 6, "tasks": 4}
    for request_id in (first.request_id, second.request_id):
        check_tasks(await tasks_of(db, request_id), [2, 1], bound=2)


async def test_blank_lines_and_multiline_cells_keep_physical_lines(
    db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"\xef\xbb\xbfS. No.,Product Name,Input Image Urls,Notes\r\n"
        b'1,"Mug\r\nwith two lines",https://a.example/1.jpg,x\r\n'
        b"\r\n"
        b"2,Cup,https://a.example/2.jpg,\r\n"
    )
    accepted = await stage(db, path)
    async with db.read() as conn:
        products = (await conn.execute(select(t.products).order_by(t.products.c.row_index))).all()
        request = (await conn.execute(select(t.requests))).one()
    assert request.header == ["S. No.", "Product Name", "Input Image Urls", "Notes"]
    assert [(p.row_index, p.line, p.product_name) for p in products] == [
        (0, 2, "Mug\r\nwith two lines"),
        (1, 5, "Cup"),
    ]
    assert accepted.products == 2


async def test_a_bad_row_near_the_end_stores_nothing(db: Database, tmp_path: Path) -> None:
    rows = url_rows([2] * 300)
    rows[297] = [298, "", "https://img.example/298/0.jpg"]  # line 299: empty name
    rows[298] = [299, "Ftp", "ftp://img.example/299.jpg"]  # line 300: not http(s)
    path = write_csv(tmp_path / "in.csv", rows)
    with pytest.raises(CsvRejected) as info:
        await stage(db, path, task_max_images=3, batch_rows=50)
    error = info.value
    assert error.status == 422
    assert error.code == "invalid_csv"
    assert "nothing was stored" in error.message
    assert [(p.line, p.column, p.message) for p in error.problems] == [
        (299, "Product Name", "product name is empty"),
        (300, "Input Image Urls", "not an http(s) URL"),
    ]
    assert error.total_problems == 2
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_more_than_100_problems_are_capped(db: Database, tmp_path: Path) -> None:
    # 70 rows with two problems each (text serial, ftp URL) between good rows.
    rows: list[list[object]] = []
    for serial in range(1, 141):
        if serial % 2:
            rows.append([serial, f"Good {serial}", f"https://img.example/{serial}.jpg"])
        else:
            rows.append([f"x{serial}", f"Bad {serial}", f"ftp://img.example/{serial}.jpg"])
    path = write_csv(tmp_path / "in.csv", rows)
    with pytest.raises(CsvRejected) as info:
        await stage(db, path)
    error = info.value
    assert error.status == 422
    assert error.total_problems == 140
    assert len(error.problems) == MAX_PROBLEMS == 100
    assert "140 problem(s)" in error.message
    # The first 100 in file order: rows at lines 3, 5, 7, ... two problems each.
    assert [p.line for p in error.problems] == [line for line in range(3, 103, 2) for _ in (0, 1)]
    assert [p.column for p in error.problems[:2]] == ["S. No.", "Input Image Urls"]
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_invalid_header_stores_nothing(db: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", url_rows([1]), header=["Serial", "Name", "Urls"])
    with pytest.raises(CsvRejected) as info:
        await stage(db, path)
    assert info.value.status == 422
    assert info.value.code == "invalid_header"
    assert len(info.value.problems) == 3
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_header_without_rows_is_rejected(db: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [])
    with pytest.raises(CsvRejected) as info:
        await stage(db, path)
    assert info.value.status == 422
    assert info.value.code == "empty_csv"
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_too_many_rows_is_413_and_stores_nothing(db: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", url_rows([1] * 6))
    with pytest.raises(CsvRejected) as info:
        await stage(db, path, limits=CsvLimits(max_rows=5))
    assert info.value.status == 413
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_too_many_urls_in_a_row_is_a_problem(db: Database, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", url_rows([1, 4, 1]))
    with pytest.raises(CsvRejected) as info:
        await stage(db, path, limits=CsvLimits(max_urls_per_row=3))
    assert [(p.line, p.column) for p in info.value.problems] == [(3, "Input Image Urls")]
    assert await table_counts(db) == {"requests": 0, "products": 0, "images": 0, "tasks": 0}


async def test_products_and_images_go_in_bulk_and_keep_every_character(
    db: Database, tmp_path: Path
) -> None:
    urls = "https://img.example/{0}/a.jpg?q=\u00e9, https://img.example/{0}/b%2C.jpg".format
    tricky = 'say "hi"\\ \t tab, line\nbreak \U0001f600 \u2028 end'
    rows = [[n, f"Café ☕ {n}", urls(n), tricky, ""] for n in range(1, 501)]
    path = write_csv(tmp_path / "in.csv", rows, header=[*HEADER, "Notes", "Empty"])
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(db.writer.sync_engine, "before_cursor_execute", seen)
    try:
        accepted = await stage(db, path, task_max_images=64, batch_rows=120)
    finally:
        event.remove(db.writer.sync_engine, "before_cursor_execute", seen)
    inserts = [s.split()[2] for s in statements if s.startswith("INSERT INTO")]
    if db.is_sqlite:
        # One statement per table and batch: SQLite expands the batch's JSON itself.
        assert inserts.count("products") == inserts.count("images") == 5
        assert all("json_each" in s for s in statements if s.startswith("INSERT INTO images"))
    else:
        assert set(inserts) == {"tasks", "requests"}, "products and images went by COPY"
    # 14 tasks of 64 images, then the last 104 in tasks of at most 16.
    assert await table_counts(db) == {"requests": 1, "products": 500, "images": 1000, "tasks": 21}
    async with db.read() as conn:
        products = (await conn.execute(select(t.products).order_by(t.products.c.row_index))).all()
        images = (await conn.execute(select(t.images).order_by(t.images.c.id))).all()
    assert [image.id for image in images] == list(range(1, 1001)), "ids in input order"
    assert [(i.row_index, i.position, i.input_url) for i in images] == [
        (n - 1, position, url)
        for n in range(1, 501)
        for position, url in enumerate(urls(n).split(", "), start=1)
    ]
    assert [(p.row_index, p.line, p.serial_number, p.product_name) for p in products] == [
        (n - 1, 2 * n, str(n), f"Café ☕ {n}")
        for n in range(1, 501)  # two lines a row
    ]
    assert [p.cells for p in products] == [[str(cell) for cell in row] for row in rows]
    assert accepted.images == 1000
