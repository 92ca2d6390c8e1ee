"""Fixtures of the reliability suite: the two stacks, a scale for the soak, the figures.

Every scenario runs on both stacks:

- ``embedded``: SQLite file, the queue table, imaging inside the workers, files;
- ``distributed``: PostgreSQL, Kafka (Tansu), a ``pixelmill imaging`` service, files.

``PIXELMILL_SOAK=N`` multiplies the images and the faults by N (``make soak``). The
figures of a run (images, kills, duplicates, peak RSS, latencies) are written to
``PIXELMILL_RELIABILITY_FIGURES`` (default: ``reliability-figures.json`` in the pytest
base temp folder) and printed at the end.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster
from tests.support.databases import PostgresServer
from tests.support.kafka import TansuBroker
from tests.support.writes import WriteCounter

WORKER_CONCURRENCY = 8  # images each worker of a reliability stack has in flight at most
STACKS = ("embedded", "distributed")
SOAK = max(1, int(os.environ.get("PIXELMILL_SOAK", "1") or 1))

_FIGURES: dict[str, dict[str, Any]] = {}


def scaled(n: int) -> int:
    """``n`` times the soak factor."""
    return n * SOAK


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Figures of this test, reported at the end of the run under its node id."""
    return _FIGURES.setdefault(request.node.nodeid.split("::", 1)[-1], {})


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _FIGURES:
        return
    default = Path(str(session.config._tmp_path_factory.getbasetemp()))  # type: ignore[attr-defined]
    chosen = os.environ.get("PIXELMILL_RELIABILITY_FIGURES")
    path = Path(chosen) if chosen else default / "reliability-figures.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"soak": SOAK, "tests": _FIGURES}, indent=2, sort_keys=True))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for name, values in sorted(_FIGURES.items()):
            terminalreporter.write_line(f"{name}: {json.dumps(values, sort_keys=True)}")


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of one stack, on a fresh data dir and database."""
    env = {
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_LEASE_SECONDS": "3",
        "PIXELMILL_POLL_INTERVAL": "0.1",
        "PIXELMILL_RETRY_BACKOFF_SECONDS": "0.1",
        "PIXELMILL_WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
        "PIXELMILL_TASK_MAX_IMAGES": "16",
    }
    if request.param == "embedded":
        yield env
        return
    postgres: PostgresServer = request.getfixturevalue("postgres")
    broker: TansuBroker = request.getfixturevalue("kafka_broker")
    database_url = postgres.create_database()
    env["PIXELMILL_DATABASE_URL"] = database_url
    env["PIXELMILL_QUEUE_URL"] = broker.queue_url(f"reliability-{uuid.uuid4().hex[:8]}")
    try:
        yield env
    finally:
        postgres.drop_database(database_url)


def is_distributed(env: dict[str, str]) -> bool:
    return "PIXELMILL_DATABASE_URL" in env


@pytest.fixture
def cluster(stack: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    """API and imaging services started, no worker yet (``start_workers`` when ready);
    the distributed stack processes images in one ``pixelmill imaging`` service."""
    running = Cluster(tmp_path, stack, imaging=1 if is_distributed(stack) else 0)
    for service in running.imaging:
        service.start()
    running.api.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def writes(cluster: Cluster) -> Iterator[WriteCounter]:
    """Counts every write into the cluster's storage folder."""
    counter = WriteCounter(cluster.files).start()
    yield counter
    counter.stop()
