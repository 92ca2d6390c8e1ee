"""``pixelmill serve`` killed (SIGKILL) or stopped (SIGTERM) mid-request, then started again.

After a kill -9 it resumes: images recorded before the kill are not fetched again,
the others are done once, and no stored object is written twice. On SIGTERM it stops
taking tasks, gives the tasks in hand ``PIXELMILL_SHUTDOWN_GRACE_SECONDS``, hands back
those that did not finish, and exits 0 well within the deadline.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    fetches,
    progress,
    stored_keys,
    upload,
    watch_request,
)
from tests.support.databases import PostgresServer
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.server import ServeProcess
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

ROWS = 150
GRACE_SECONDS = 2


def _rows(image_host: ImageHost, route: str, tag: str) -> list[list[str]]:
    return [
        [
            image_host.url(f"gate/{route}/{PHOTOS[(row + k) % len(PHOTOS)]}?{tag}={row}-{k}")
            for k in range(2)
        ]
        for row in range(ROWS)
    ]


def _query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read on a connection of its own (the server may be down)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        with closing(sqlite3.connect(url.database)) as conn:
            return list(conn.execute(sql).fetchall())
    records = PostgresServer(database_url).run(lambda conn: conn.fetch(sql))
    return [tuple(record) for record in records]


@pytest.fixture
def server(stack: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    """``serve`` on the stack's database and queue (imaging inside it)."""
    env = {**stack, "PIXELMILL_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS)}
    env.pop("PIXELMILL_DATA_DIR")
    process = ServeProcess(tmp_path / "data", env=env)
    process.database_url = stack.get(  # type: ignore[attr-defined]
        "PIXELMILL_DATABASE_URL", f"sqlite:///{tmp_path / 'data' / 'pixelmill.db'}"
    )
    yield process.start()
    process.stop()


@pytest.fixture
def serve_writes(server: ServeProcess) -> Iterator[WriteCounter]:
    counter = WriteCounter(server.data_dir / "files").start()
    yield counter
    counter.stop()


def _start_gated(
    server: ServeProcess, writes: WriteCounter, host: ImageHost, rows: list[list[str]]
) -> str:
    """Upload while the host holds every fetch, so the writes are watched from the first."""
    host.gate.clear()
    try:
        request_id = upload(server, rows)
        watch_request(writes, request_id)
    finally:
        host.gate.set()
    return request_id


def _check_resumed(
    server: ServeProcess, writes: WriteCounter, request_id: str, rows: list[list[str]]
) -> None:
    status = server.wait_finished(request_id, timeout=180)
    assert status["status"] == "completed", status
    check_each_terminal_once(server, request_id, ROWS * 2)
    assert status["progress"]["completed"] == ROWS * 2
    outputs = check_output_csv(server, request_id, rows)
    check_written_once(writes, request_id, stored_keys(outputs))


def test_kill_9_mid_request_then_restart_resumes(
    server: ServeProcess,
    serve_writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows = _rows(image_host, "slow/40", f"kill{uuid.uuid4().hex[:6]}")
    request_id = _start_gated(server, serve_writes, image_host, rows)
    wait_until(lambda: progress(server, request_id)["completed"] >= 40, timeout=60, what="40 done")
    server.kill9()
    database_url = server.database_url  # type: ignore[attr-defined]
    terminal = "SELECT input_url FROM images WHERE status IN ('completed', 'failed')"
    done_before_kill = {row[0] for row in _query(database_url, terminal)}
    assert 40 <= len(done_before_kill) < ROWS * 2, "killed mid-request"

    server.start()
    _check_resumed(server, serve_writes, request_id, rows)
    for url in (url for row in rows for url in row):
        assert fetches(image_host, url) >= 1, f"{url} never fetched"
        if url in done_before_kill:
            assert fetches(image_host, url) == 1, f"{url} was recorded before the kill"
    figures.update(images=ROWS * 2, done_before_kill=len(done_before_kill), duplicate_writes=0)


def test_sigterm_stops_within_the_grace_period_and_the_rest_resumes(
    server: ServeProcess,
    serve_writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows = _rows(image_host, "slow/40", f"term{uuid.uuid4().hex[:6]}")
    request_id = _start_gated(server, serve_writes, image_host, rows)
    wait_until(lambda: progress(server, request_id)["completed"] >= 8, timeout=60, what="8 done")
    # Sources stop answering: the tasks in hand cannot finish within the grace period.
    image_host.gate.clear()
    try:
        asked = time.monotonic()
        assert server.terminate(timeout=60) == 0, server.log()
        took = time.monotonic() - asked
    finally:
        image_host.gate.set()
    assert took < GRACE_SECONDS + 8, f"exit took {took:.1f}s with a {GRACE_SECONDS}s grace"
    database_url = server.database_url  # type: ignore[attr-defined]
    leased = _query(database_url, "SELECT count(*) FROM tasks WHERE state = 'leased'")
    assert leased[0][0] == 0, "every task in hand was finished or handed back"
    processing = _query(database_url, "SELECT count(*) FROM images WHERE status = 'processing'")
    assert "released task" in server.log(), "the grace period ran out on some tasks"

    server.start()
    # Taken again at once, not after a lease: the images left processing move on.
    wait_until(
        lambda: progress(server, request_id)["completed"] >= 8 + processing[0][0],
        timeout=30,
        what="the released images to be done",
    )
    _check_resumed(server, serve_writes, request_id, rows)
    figures.update(
        grace_seconds=GRACE_SECONDS,
        exit_seconds=round(took, 1),
        images_handed_back=processing[0][0],
    )
