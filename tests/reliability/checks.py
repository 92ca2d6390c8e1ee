"""What every reliability scenario checks once its request has finished."""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from tests.support.cluster import Cluster
from tests.support.databases import run_async
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.server import ApiClient
from tests.support.writes import WriteCounter


def csv_body(rows: list[list[str]]) -> bytes:
    """An input CSV with one product row per list of image URLs."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for number, urls in enumerate(rows, start=1):
        writer.writerow([number, f"Product {number}", ", ".join(urls)])
    return out.getvalue().encode()


def slow_photo_rows(
    host: ImageHost, images: int, label: str, delay_ms: int = 20
) -> list[list[str]]:
    """Rows of two photos each, every one served ``delay_ms`` late under a URL of its own."""
    tag = f"{label}-{uuid.uuid4().hex[:8]}"
    return [
        [
            host.url(f"slow/{delay_ms}/{PHOTOS[(r + k) % len(PHOTOS)]}?{tag}-{r}-{k}")
            for k in range(2)
        ]
        for r in range(images // 2)
    ]


def upload(api: ApiClient, rows: list[list[str]]) -> str:
    response = api.post("/api/v1/requests", files={"file": ("p.csv", csv_body(rows), "text/csv")})
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


def watch_request(writes: WriteCounter, request_id: str) -> None:
    """Make the request's storage folder and watch it before anything is written there."""
    writes.make_folder(request_id)


def progress(api: ApiClient, request_id: str) -> dict[str, int]:
    return dict(api.get(f"/api/v1/requests/{request_id}").json()["progress"])


def images(api: ApiClient, request_id: str) -> list[dict[str, Any]]:
    """Every image of the request, in input order, as the products API shows it."""
    found: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = api.get(f"/api/v1/requests/{request_id}/products?offset={offset}&limit=1000").json()
        found += [image for product in page["items"] for image in product["images"]]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return found


def check_output_csv(api: ApiClient, request_id: str, rows: list[list[str]]) -> list[list[str]]:
    """The output CSV has every input line, in order, with one output slot per input URL;
    returns its output URLs per row."""
    response = api.get(f"/api/v1/requests/{request_id}/output.csv")
    assert response.status_code == 200, response.text
    lines = list(csv.reader(io.StringIO(response.text)))[1:]
    assert [line[0] for line in lines] == [str(n) for n in range(1, len(rows) + 1)], "in order"
    assert [line[2].split(", ") for line in lines] == rows, "the input URLs, unchanged"
    outputs = [line[3].split(", ") if line[3] else [""] for line in lines]
    assert [len(o) for o in outputs] == [len(r) for r in rows], "one slot per input URL"
    return outputs


def check_each_terminal_once(api: ApiClient, request_id: str, total: int) -> dict[str, Any]:
    """Every image is completed or failed, and the counters count each exactly once."""
    status = api.get(f"/api/v1/requests/{request_id}").json()
    found = images(api, request_id)
    assert len(found) == total
    statuses = Counter(image["status"] for image in found)
    assert set(statuses) <= {"completed", "failed"}, statuses
    done = status["progress"]
    assert (done["completed"], done["failed"]) == (statuses["completed"], statuses["failed"])
    assert done["pending"] == done["processing"] == 0 and done["total"] == total
    return status


def check_written_once(writes: WriteCounter, request_id: str, keys: list[str]) -> int:
    """Each stored image was written exactly once (counted as it happened); returns the
    number of extra writes found (0, or the assertion fails)."""
    return check_written(writes, request_id, keys, extra_allowed=0)


def check_written(
    writes: WriteCounter, request_id: str, keys: list[str], *, extra_allowed: int
) -> int:
    """Each stored image was written, nothing else was, and at most ``extra_allowed``
    writes came on top of one per image (counted as they happened); returns them."""
    counts = writes.counts(f"{request_id}/")
    assert not writes.overflowed, "inotify lost events: the count is not exact"
    assert f"{request_id}" not in writes.late_folders
    images_written = {key: n for key, n in counts.items() if not key.endswith("output.csv")}
    expected = {f"{request_id}/{key}" for key in keys}
    assert set(images_written) == expected, "every stored object, and nothing else"
    duplicates = sum(n - 1 for n in images_written.values())
    twice = sorted(key for key, n in images_written.items() if n > 1)
    assert duplicates <= extra_allowed, f"{len(twice)} objects written more than once: {twice[:10]}"
    assert counts[f"{request_id}/output.csv"] >= 1
    return duplicates


def stored_keys(outputs: list[list[str]]) -> list[str]:
    """The storage keys (``<row>-<position>.<ext>``) of the output URLs of a request."""
    return [url.rsplit("/", 1)[1] for row in outputs for url in row if url]


def fetches(host: ImageHost, url: str) -> int:
    return host.hits[url.split(f":{host.port}", 1)[1]]


def task_states(cluster: Cluster, request_id: str) -> Counter[tuple[str, int]]:
    """How many of the request's tasks are in each (state, attempts)."""
    data_dir = Path(cluster.env["PIXELMILL_DATA_DIR"]).resolve()
    url = cluster.env.get("PIXELMILL_DATABASE_URL") or f"sqlite:///{data_dir / 'pixelmill.db'}"

    async def read() -> Counter[tuple[str, int]]:
        database = Database(url)
        try:
            async with database.read() as conn:
                query = select(t.tasks.c.state, t.tasks.c.attempts)
                rows = await conn.execute(query.where(t.tasks.c.request_id == request_id))
                return Counter((row.state, row.attempts) for row in rows)
        finally:
            await database.close()

    return run_async(read)
