"""``pixelmill requests prune``: requests finished long enough ago are forgotten whole
(their stored objects, then their rows in every table); the others are not touched.

A real ``pixelmill serve`` processes the requests, on a folder or on an S3 bucket; the
command runs beside it, as an operator would run it from cron.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.image_host import ImageHost
from tests.support.s3 import S3Server
from tests.support.server import ServeProcess

# Each table holding rows of a request, and the column that names it.
TABLES = {
    "requests": "id",
    "products": "request_id",
    "images": "request_id",
    "tasks": "request_id",
    "webhook_deliveries": "request_id",
}


@pytest.fixture(params=["files", "s3"])
def storage_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "files":
        return {}
    server: S3Server = request.getfixturevalue("s3_server")
    return {"PIXELMILL_STORAGE_URL": server.storage_url(server.new_bucket(), "kept")}


@pytest.fixture
def server(tmp_path: Path, storage_env: dict[str, str]) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path / "data", env=storage_env).start()
    yield process
    process.stop()


def upload(server: ServeProcess, urls: list[str]) -> str:
    body = io.StringIO()
    writer = csv.writer(body)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerow(["1", "Shirt", ", ".join(urls)])
    answer = server.post("/api/v1/requests", files={"file": ("p.csv", body.getvalue())})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["request_id"])


def prune(server: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pixelmill", "requests", "prune", *args],
        env=server.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def said_by(done: subprocess.CompletedProcess[str]) -> str:
    """What the command said to its operator (messages go to stderr, results to stdout)."""
    return " ".join((done.stdout + done.stderr).split())


def rows_of(database: Path, request_id: str) -> dict[str, int]:
    with sqlite3.connect(database) as conn:
        return {
            table: conn.execute(
                f"SELECT count(*) FROM {table} WHERE {column} = ?", (request_id,)
            ).fetchone()[0]
            for table, column in TABLES.items()
        }


def test_old_finished_requests_are_forgotten_whole_and_nothing_else(
    server: ServeProcess, image_host: ImageHost
) -> None:
    photo = image_host.url("img/cat.jpg")
    old, recent = (upload(server, [f"{photo}?{n}-1", f"{photo}?{n}-2"]) for n in range(2))
    for request_id in (old, recent):
        assert server.wait_finished(request_id)["status"] == "completed"
    unfinished = upload(server, [image_host.url("slow/60000/cat.jpg?unfinished")])
    database = server.data_dir / "pixelmill.db"
    with sqlite3.connect(database) as conn:
        for request_id, days in ((old, 10), (recent, 3)):
            conn.execute(
                "UPDATE requests SET finished_at = datetime('now', ?) WHERE id = ?",
                (f"-{days} days", request_id),
            )
    old_files = [url.removeprefix(server.base_url) for url in output_urls(server, old)]
    assert all(server.get(path).status_code == 200 for path in old_files)

    listed = prune(server, "--older-than", "7", "--dry-run")
    assert listed.stdout.split() == [old]
    assert server.get(f"/api/v1/requests/{old}").status_code == 200, "a dry run deletes nothing"

    said = said_by(prune(server, "--older-than", "7"))
    assert "pruned 1 request(s)" in said and "and 3 stored object(s)" in said, said
    assert server.get(f"/api/v1/requests/{old}").status_code == 404
    assert all(server.get(path).status_code == 404 for path in old_files)
    assert rows_of(database, old) == dict.fromkeys(TABLES, 0)
    assert server.get(f"/api/v1/requests/{recent}/output.csv").status_code == 200
    assert rows_of(database, recent)["images"] == 2
    assert server.get(f"/api/v1/requests/{unfinished}").json()["finished_at"] is None

    said = said_by(prune(server, "--older-than", "0"))  # all the finished ones
    assert "pruned 1 request(s)" in said, said
    assert server.get(f"/api/v1/requests/{unfinished}").status_code == 200, "not finished"


def output_urls(server: ServeProcess, request_id: str) -> list[str]:
    """The output CSV's URL and those of the request's images."""
    answer = server.get(f"/api/v1/requests/{request_id}").json()
    lines = list(
        csv.reader(io.StringIO(server.get(f"/api/v1/requests/{request_id}/output.csv").text))
    )
    return [answer["output_csv_url"], *lines[1][3].split(", ")]
