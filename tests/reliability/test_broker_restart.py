"""The Kafka broker goes away mid-request and comes back (distributed).

Two faults. In the first, a proxy in front of the broker cuts every client connection
and refuses new ones for a while, which is what workers, the API and the outbox relay
see of a broker restart with durable storage. In the second, the broker is killed
with SIGKILL and a new one starts on the same port: the test broker keeps its log in
memory, so the new one has lost every record, topic and committed offset, which is a
broker that loses its data. Either way the request completes with every image done
once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written,
    progress,
    slow_photo_rows,
    stored_keys,
    upload,
    watch_request,
)
from tests.reliability.conftest import WORKER_CONCURRENCY
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.kafka import TansuBroker
from tests.support.proxy import TcpProxy
from tests.support.server import free_port
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

OUTAGE_SECONDS = 6  # three times the workers' Kafka session timeout
IMAGES = 600
RESTART_IMAGES = 300


def check_complete_and_once(
    cluster: Cluster, writes: WriteCounter, request_id: str, rows: list[list[str]]
) -> int:
    """The request completes, no worker died, every image is done once, and the output
    CSV is whole; returns the objects written again.

    Both workers lose the group while the broker is away, and when it is back the
    partitions may be dealt the other way round: the images then in flight at a worker
    are read again by the other one (an image cannot be stopped mid-way) and stored again
    under the same key, the same bytes. At most the images in flight of every worker.
    """
    status = cluster.wait_finished(request_id, timeout=180)
    assert status["status"] == "completed" and status["progress"]["failed"] == 0, status
    assert all(w.process and w.process.poll() is None for w in cluster.workers), "no worker died"
    check_each_terminal_once(cluster, request_id, sum(len(row) for row in rows))
    outputs = check_output_csv(cluster, request_id, rows)
    in_flight = len(cluster.workers) * WORKER_CONCURRENCY
    return check_written(writes, request_id, stored_keys(outputs), extra_allowed=in_flight)


@pytest.fixture
def broker_proxy(tmp_path: Path) -> Iterator[tuple[TansuBroker, TcpProxy]]:
    port = free_port()
    broker = TansuBroker(tmp_path / "broker.log", advertised_port=port).start()
    proxy = TcpProxy(broker.port, port).start()
    yield broker, proxy
    proxy.stop()
    broker.stop()


@pytest.fixture
def stack_env(stack: dict[str, str], broker_proxy: tuple[TansuBroker, TcpProxy]) -> dict[str, str]:
    broker, _ = broker_proxy
    stack["PIXELMILL_QUEUE_URL"] = broker.queue_url(f"restart-{uuid.uuid4().hex[:8]}")
    return stack


@pytest.mark.parametrize("stack", ["distributed"], indirect=True)
def test_workers_reconnect_after_a_broker_outage_and_the_request_completes(
    stack_env: dict[str, str],
    broker_proxy: tuple[TansuBroker, TcpProxy],
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    _, proxy = broker_proxy
    rows = slow_photo_rows(image_host, IMAGES, "broker")
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    for _ in range(2):
        cluster.add_worker()
    wait_until(
        lambda: progress(cluster, request_id)["completed"] >= 100, timeout=90, what="100 done"
    )

    proxy.stop()
    down_at = progress(cluster, request_id)["completed"]
    time.sleep(OUTAGE_SECONDS)  # the fault itself: the broker stays away this long
    proxy.start()

    written_again = check_complete_and_once(cluster, writes, request_id, rows)
    assert down_at < IMAGES, "the broker went away mid-request"
    figures.update(
        images=IMAGES,
        outage_seconds=OUTAGE_SECONDS,
        completed_when_it_went_down=down_at,
        written_again=written_again,
    )


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A broker of this test's own, to kill."""
    broker = TansuBroker(tmp_path / "broker.log").start()
    yield broker
    broker.stop()


@pytest.fixture
def restart_env(stack: dict[str, str], own_broker: TansuBroker) -> dict[str, str]:
    queue_url = own_broker.queue_url(f"lost-{uuid.uuid4().hex[:8]}")
    stack["PIXELMILL_QUEUE_URL"] = f"{queue_url}&audit_interval_ms=2000"
    return stack


def requeued_by_the_audit(logs: str) -> int:
    """How many tasks the outbox audits of all processes published again."""
    return sum(int(found) for found in re.findall(r"(\d+) published tasks are lost", logs))


@pytest.mark.parametrize("stack", ["distributed"], indirect=True)
def test_a_broker_restart_that_loses_its_log_loses_no_task(
    restart_env: dict[str, str],
    own_broker: TansuBroker,
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows = slow_photo_rows(image_host, RESTART_IMAGES, "lost")
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    for _ in range(2):
        cluster.add_worker()
    wait_until(lambda: progress(cluster, request_id)["completed"] >= 50, timeout=90, what="50 done")

    own_broker.restart()  # kill -9, then an empty broker on the same port
    restarted_at = time.monotonic()
    down_at = progress(cluster, request_id)["completed"]

    cluster.wait_finished(request_id, timeout=180)
    finished_after = time.monotonic() - restarted_at
    written_again = check_complete_and_once(cluster, writes, request_id, rows)
    assert down_at < RESTART_IMAGES, "the broker lost its log mid-request"
    logs = cluster.logs()
    requeued = requeued_by_the_audit(logs)
    assert requeued > 0, "the lost tasks came back through the audit"
    figures.update(
        images=RESTART_IMAGES,
        completed_when_killed=down_at,
        tasks_published_again=requeued,
        partitions_read_again=logs.count("before our position"),
        seconds_from_restart_to_finished=round(finished_after, 1),
        written_again=written_again,
    )


def test_a_worker_with_the_broker_away_logs_little_and_exits_cleanly_when_stopped(
    tmp_path: Path,
) -> None:
    """During an outage the Kafka client's retry lines are limited (unlimited, about 70
    a second); SIGTERM then is still a stop: exit 0, no traceback (a supervisor
    restarting on failure must not restart it)."""
    broker = TansuBroker(tmp_path / "broker.log").start()
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "PIXELMILL_QUEUE_URL": broker.queue_url(f"away-{uuid.uuid4().hex[:8]}"),
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_LOG_LEVEL": "INFO",
    }
    with log.open("w") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pixelmill", "worker"], env=env, stderr=output
        )
    try:
        wait_until(
            lambda: "kafka partitions assigned" in log.read_text(), timeout=60, what="joined"
        )
        broker.stop()
        # Its clients have found the broker gone and wait to retry (a fetcher stopped
        # then raised its own CancelledError out of aiokafka).
        wait_until(
            lambda: re.search("Failed fetch messages|Unable connect", log.read_text()),
            timeout=30,
            what="the clients retrying",
        )
        lines_before = len(log.read_text().splitlines())
        time.sleep(3)  # a window in which the clients retry a few hundred times
        window = log.read_text().splitlines()[lines_before:]
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
        broker.stop()

    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    from_the_client = [line for line in window if " aiokafka" in line]
    assert len(from_the_client) <= 20, "\n".join(from_the_client[:40])
