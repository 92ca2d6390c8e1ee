"""Distributed mode: an API and three workers, one killed mid-run.

Over the whole backend matrix: Kafka on PostgreSQL is the distributed mode proper, and
separate worker processes on the queue table (SQLite or PostgreSQL) are supported too;
a pass is about 20 s.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.backends import Backend
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.server import PixelmillProcess, free_port
from tests.support.waiting import wait_until

ROWS = 150


class Cluster:
    """``pixelmill api`` and ``pixelmill worker`` processes sharing one set of URLs."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PIXELMILL_PUBLIC_URL": self.base_url}
        self.api = PixelmillProcess(
            ["api", "--port", str(self.port)], self.env, root / "api.log", f"{self.base_url}/readyz"
        )
        self.workers: list[PixelmillProcess] = []

    def start(self, workers: int) -> Cluster:
        self.api.start()
        self.workers = [
            PixelmillProcess(["worker"], self.env, self.root / f"worker-{i}.log", None).start()
            for i in range(workers)
        ]
        return self

    def get(self, path: str) -> dict:
        return dict(httpx.get(f"{self.base_url}{path}", timeout=30).json())

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            process.stop()


@pytest.fixture
def cluster(tmp_path: Path, backend: Backend) -> Iterator[Cluster]:
    env = {
        **backend.env(),
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_WORKER_CONCURRENCY": "4",
        "PIXELMILL_TASK_MAX_IMAGES": "10",
        # The queue table hands a killed worker's tasks on when their lease runs out.
        "PIXELMILL_LEASE_SECONDS": "3",
        "PIXELMILL_POLL_INTERVAL": "0.1",
    }
    running = Cluster(tmp_path, env)
    try:
        yield running.start(workers=3)
    finally:
        running.stop()


def test_three_workers_share_a_request_and_survive_a_kill_9(
    cluster: Cluster, image_host: ImageHost
) -> None:
    tag = uuid.uuid4().hex[:8]
    lines = ["S. No.,Product Name,Input Image Urls"]
    urls: list[str] = []
    for row in range(ROWS):
        pair = [
            image_host.url(f"slow/40/{PHOTOS[(row + k) % len(PHOTOS)]}?d={tag}-{row}-{k}")
            for k in range(2)
        ]
        urls += pair
        lines.append(f'{row + 1},P{row + 1},"{", ".join(pair)}"')
    response = httpx.post(
        f"{cluster.base_url}/api/v1/requests",
        files={"file": ("p.csv", ("\n".join(lines) + "\n").encode(), "text/csv")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    status_path = f"/api/v1/requests/{request_id}"

    wait_until(
        lambda: cluster.get(status_path)["progress"]["completed"] >= 60,
        timeout=120,
        what="60 images done",
    )
    cluster.workers[0].kill9()
    products = cluster.get(f"/api/v1/requests/{request_id}/products?limit=1000")["items"]
    done_at_kill = {
        image["input_url"]
        for product in products
        for image in product["images"]
        if image["status"] in ("completed", "failed")
    }
    assert len(done_at_kill) < len(urls), "killed mid-request"

    status = wait_until(
        lambda: (body := cluster.get(status_path))["finished_at"] and body,
        timeout=240,
        interval=0.3,
        what="the request to finish",
    )
    assert status["status"] == "completed"
    assert status["progress"]["completed"] == len(urls) and status["progress"]["failed"] == 0
    products = cluster.get(f"/api/v1/requests/{request_id}/products?limit=1000")["items"]
    statuses = [image["status"] for product in products for image in product["images"]]
    assert statuses.count("completed") == len(urls), "the counters match the images"
    stored = list((cluster.root / "data" / "files" / request_id).glob("*.jpg"))
    assert len(stored) == len(urls), "one stored object per image"
    for url in urls:
        hits = image_host.hits[url.split(f":{image_host.port}", 1)[1]]
        assert hits >= 1, f"{url} never fetched"
        if url in done_at_kill:
            assert hits == 1, f"{url} was done before the kill but fetched again"
