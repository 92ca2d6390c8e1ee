"""The Kafka broker goes away mid-request and comes back (distributed).

The test broker keeps its log in memory, so its process is not restarted: a proxy in
front of it cuts every client connection and refuses new ones for a while, which is
what workers, the API and the outbox relay see of a broker restart with durable
storage. They reconnect, and the request completes with every image done once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    progress,
    stored_keys,
    upload,
    watch_request,
)
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.kafka import TansuBroker
from tests.support.proxy import TcpProxy
from tests.support.server import free_port
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

OUTAGE_SECONDS = 6  # three times the workers' Kafka session timeout
IMAGES = 600


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
    tag = uuid.uuid4().hex[:8]
    rows = [
        [
            image_host.url(f"slow/20/{PHOTOS[(r + k) % len(PHOTOS)]}?broker={tag}-{r}-{k}")
            for k in range(2)
        ]
        for r in range(IMAGES // 2)
    ]
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

    status = cluster.wait_finished(request_id, timeout=180)
    assert status["status"] == "completed" and status["progress"]["failed"] == 0, status
    assert down_at < IMAGES, "the broker went away mid-request"
    assert all(w.process and w.process.poll() is None for w in cluster.workers), "no worker died"
    check_each_terminal_once(cluster, request_id, IMAGES)
    outputs = check_output_csv(cluster, request_id, rows)
    check_written_once(writes, request_id, stored_keys(outputs))
    figures.update(
        images=IMAGES, outage_seconds=OUTAGE_SECONDS, completed_when_it_went_down=down_at
    )
