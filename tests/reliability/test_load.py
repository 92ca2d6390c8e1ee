"""50 uploads at once, while the workers process: all accepted, all finish, status fast.

Each upload has 10 rows in ``make test`` and 200 in ``make soak``: the 50 uploads at
once are the load on the API; processing their images is what takes the time.

Status calls are timed throughout (their p50/p95/p99 go into the figures). On the
embedded stack the API and two worker processes write to one SQLite file at once: no
"database is locked" may reach a caller or a log.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.reliability.checks import csv_body
from tests.reliability.conftest import SOAK, scaled
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost

UPLOADS = 50
ROWS = 200 if SOAK > 1 else 10


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def test_fifty_concurrent_uploads_while_processing(
    cluster: Cluster, image_host: ImageHost, figures: dict[str, Any]
) -> None:
    uploads, rows = UPLOADS, ROWS
    tag = uuid.uuid4().hex[:8]
    bodies = [
        csv_body([[image_host.url(f"img/tiny.jpg?load={tag}-{n}-{r}")] for r in range(rows)])
        for n in range(uploads)
    ]
    for _ in range(2):
        cluster.add_worker()
    # Work already under way when the uploads arrive.
    first = cluster.post("/api/v1/requests", files={"file": ("p.csv", bodies[0], "text/csv")})
    assert first.status_code == 202, first.text

    request_ids: list[str] = [first.json()["request_id"]]
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def watch_status() -> None:
        with httpx.Client(base_url=cluster.base_url, timeout=30) as client:
            while not stop.is_set():
                request_id = request_ids[len(latencies) % len(request_ids)]
                began = time.perf_counter()
                response = client.get(f"/api/v1/requests/{request_id}")
                latencies.append(time.perf_counter() - began)
                if response.status_code != 200:
                    errors.append(f"status {response.status_code}: {response.text[:200]}")

    def send(body: bytes) -> httpx.Response:
        return httpx.post(
            f"{cluster.base_url}/api/v1/requests",
            files={"file": ("p.csv", body, "text/csv")},
            timeout=120,
        )

    watchers = [threading.Thread(target=watch_status) for _ in range(2)]
    for watcher in watchers:
        watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=uploads) as pool:
            answers = list(pool.map(send, bodies[1:]))
        accepted_in = time.monotonic() - started
        bad = [a.text[:200] for a in answers if a.status_code != 202]
        assert not bad, f"{len(bad)} uploads refused: {bad[:3]}"
        request_ids.extend(a.json()["request_id"] for a in answers)
        for request_id in request_ids:
            status = cluster.wait_finished(request_id, timeout=scaled(300))
            assert status["status"] == "completed", status
            assert status["progress"]["completed"] == rows, status
    finally:
        stop.set()
        for watcher in watchers:
            watcher.join()
    finished_in = time.monotonic() - started
    assert not errors, errors[:3]
    assert "database is locked" not in cluster.logs()
    p50, p95, p99 = (_percentile(latencies, p) * 1000 for p in (50, 95, 99))
    assert p99 < 5000, f"status p99 {p99:.0f} ms"
    figures.update(
        uploads=len(request_ids),
        rows_each=rows,
        images=len(request_ids) * rows,
        all_accepted_seconds=round(accepted_in, 1),
        all_finished_seconds=round(finished_in, 1),
        status_calls=len(latencies),
        status_ms_p50=round(p50, 1),
        status_ms_p95=round(p95, 1),
        status_ms_p99=round(p99, 1),
        status_ms_mean=round(statistics.fmean(latencies) * 1000, 1),
    )
