"""The imaging service goes away mid-request (distributed), then comes back.

The images in flight wait for it, with backoff, instead of failing: none is marked
failed because the service was away, none spends an attempt on it, and every one
completes once the service is back.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    images,
    progress,
    slow_photo_rows,
    stored_keys,
    upload,
    watch_request,
)
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.imaging_service import ImagingProcess
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

PATIENCE = 1
OUTAGE_SECONDS = 8  # many times the patience and the image retries' backoff


@pytest.fixture
def stack_env(stack: dict[str, str]) -> dict[str, str]:
    stack.update(
        PIXELMILL_IMAGING_PATIENCE_SECONDS=str(PATIENCE), PIXELMILL_IMAGING_SKIP_SECONDS="0.5"
    )
    return stack


@pytest.mark.parametrize("stack", ["distributed"], indirect=True)
def test_images_wait_for_the_imaging_service_and_complete(
    stack_env: dict[str, str],
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows = slow_photo_rows(image_host, 300, "outage")
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    cluster.add_worker()
    wait_until(lambda: progress(cluster, request_id)["completed"] >= 40, timeout=60, what="40 done")

    service = cluster.imaging[0]
    service.kill9()
    down_at = progress(cluster, request_id)
    time.sleep(OUTAGE_SECONDS / 2)  # the fault itself: the service stays away this long
    settled = progress(cluster, request_id)
    time.sleep(OUTAGE_SECONDS / 2)
    during = progress(cluster, request_id)
    assert during["failed"] == 0, "no image failed while the service was away"
    # Results that came back just before the kill still reach the database in the
    # recorders' next group commits: at most the images in the workers' slots (2 x 8)
    # and as many that had just left them. After that, nothing completes at all.
    assert settled["completed"] - down_at["completed"] <= 2 * 8 * 2, "only results from before"
    assert during["completed"] == settled["completed"], "the service was away"
    cluster.imaging[0] = ImagingProcess(
        service.data_dir, env=cluster.env, port=service.port
    ).start()

    status = cluster.wait_finished(request_id, timeout=120)
    assert status["status"] == "completed" and status["progress"]["failed"] == 0, status
    check_each_terminal_once(cluster, request_id, 300)
    attempts = [image["attempts"] for image in images(cluster, request_id)]
    assert attempts == [1] * 300, "waiting for the service spends no attempt of the image"
    outputs = check_output_csv(cluster, request_id, rows)
    check_written_once(writes, request_id, stored_keys(outputs))
    figures.update(
        images=300,
        outage_seconds=OUTAGE_SECONDS,
        patience_seconds=PATIENCE,
        completed_when_it_went_down=down_at["completed"],
        failed=0,
    )
