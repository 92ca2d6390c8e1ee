"""A ``pixelmill serve`` killed mid-request resumes after a restart, losing nothing."""

from __future__ import annotations

import csv
import io
import signal
import sqlite3
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.server import ServeProcess
from tests.support.waiting import wait_until

ROWS = 150


def _slow_request(image_host: ImageHost, tag: str) -> tuple[bytes, list[str]]:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    urls = []
    for row in range(ROWS):
        pair = [
            image_host.url(f"slow/40/{PHOTOS[(row + k) % len(PHOTOS)]}?{tag}={row}-{k}")
            for k in range(2)
        ]
        urls.extend(pair)
        writer.writerow([row + 1, f"Product {row + 1}", ", ".join(pair)])
    return out.getvalue().encode(), urls


def _terminal_urls(db_path: Path) -> set[str]:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            "SELECT input_url FROM images WHERE status IN ('completed', 'failed')"
        ).fetchall()
    return {row[0] for row in rows}


def _completed(server: ServeProcess, request_id: str) -> int:
    return int(server.get(f"/api/v1/requests/{request_id}").json()["progress"]["completed"])


@pytest.fixture(params=["db", "kafka"])
def server(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """``serve`` on the queue table, and on a Kafka topic of its own."""
    env = {"PIXELMILL_WORKER_CONCURRENCY": "4"}
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        env["PIXELMILL_QUEUE_URL"] = broker.queue_url(f"recovery-{uuid.uuid4().hex[:8]}")
    process = ServeProcess(tmp_path / "serve", env=env)
    yield process.start()
    process.stop()


def _check_finished_output(server: ServeProcess, request_id: str, urls: list[str]) -> None:
    status = server.wait_finished(request_id, timeout=180)
    assert status["status"] == "completed", status
    assert status["progress"]["completed"] == len(urls) and status["progress"]["failed"] == 0
    text = server.get(f"/api/v1/requests/{request_id}/output.csv").text
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert [row[0] for row in rows] == [str(i + 1) for i in range(ROWS)], "in input order"
    outputs = [url for row in rows for url in row[3].split(", ")]
    assert len(outputs) == len(urls) and all(outputs)
    files = server.data_dir / "files" / request_id
    assert len(list(files.glob("*.jpg"))) == len(urls), "one stored object per image"
    assert httpx.get(outputs[-1]).status_code == 200


def test_kill_9_mid_request_then_restart_resumes(
    server: ServeProcess, image_host: ImageHost
) -> None:
    body, urls = _slow_request(image_host, f"kill{uuid.uuid4().hex[:6]}")
    request_id = server.post(
        "/api/v1/requests", files={"file": ("p.csv", body, "text/csv")}
    ).json()["request_id"]
    wait_until(lambda: _completed(server, request_id) >= 40, timeout=60, what="40 images done")
    server.kill9()
    done_before_kill = _terminal_urls(server.data_dir / "pixelmill.db")
    assert 40 <= len(done_before_kill) < len(urls), "killed mid-request"

    server.start()
    _check_finished_output(server, request_id, urls)
    for url in urls:
        path = url.split(f":{image_host.port}", 1)[1]
        hits = image_host.hits[path]
        assert hits >= 1, f"{url} never fetched"
        if url in done_before_kill:
            assert hits == 1, f"{url} was recorded before the kill but fetched again"


def test_sigterm_is_graceful_and_the_rest_resumes(
    server: ServeProcess, image_host: ImageHost
) -> None:
    body, urls = _slow_request(image_host, f"term{uuid.uuid4().hex[:6]}")
    request_id = server.post(
        "/api/v1/requests", files={"file": ("p.csv", body, "text/csv")}
    ).json()["request_id"]
    wait_until(lambda: _completed(server, request_id) >= 20, timeout=60, what="20 images done")
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log()
    with sqlite3.connect(server.data_dir / "pixelmill.db") as conn:
        leased = conn.execute("SELECT count(*) FROM tasks WHERE state = 'leased'").fetchone()[0]
    assert leased == 0, "every task in hand was finished or handed back"

    server.start()
    _check_finished_output(server, request_id, urls)
