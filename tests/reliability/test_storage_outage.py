"""The S3 storage goes away mid-request, then comes back.

The bucket's endpoint sits behind a proxy that cuts every connection and refuses new
ones for a while. The images whose results cannot be stored wait for the storage, as
they wait for an imaging service, instead of failing after their retries: none fails,
none spends an attempt on it, and every one completes once the storage is back. On the
embedded stack the worker stores what it encodes; on the distributed one the imaging
service does.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    images,
    progress,
    slow_photo_rows,
    stored_keys,
    task_states,
    upload,
)
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.proxy import TcpProxy
from tests.support.s3 import S3Server
from tests.support.waiting import wait_until

IMAGES = 200
OUTAGE_SECONDS = 8  # longer than the SDK's retries and an image's four attempts


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[TcpProxy]:
    proxy = TcpProxy(s3_server.port).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def stack_env(stack: dict[str, str], s3_proxy: TcpProxy, bucket: str) -> dict[str, str]:
    endpoint = f"http://127.0.0.1:{s3_proxy.port}"
    stack["PIXELMILL_STORAGE_URL"] = f"s3://{bucket}/out?endpoint_url={endpoint}"
    return stack


def test_images_wait_for_the_storage_and_complete(
    stack_env: dict[str, str],
    cluster: Cluster,
    s3_proxy: TcpProxy,
    s3_server: S3Server,
    bucket: str,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows = slow_photo_rows(image_host, IMAGES, "storage")
    request_id = upload(cluster, rows)
    cluster.add_worker()
    wait_until(lambda: progress(cluster, request_id)["completed"] >= 30, timeout=60, what="30 done")

    s3_proxy.stop()
    down_at = progress(cluster, request_id)
    time.sleep(OUTAGE_SECONDS)  # the fault itself: the storage stays away this long
    during = progress(cluster, request_id)
    assert during["failed"] == 0, "no image failed while the storage was away"
    assert during["completed"] < IMAGES, "the storage went away mid-request"
    s3_proxy.start()

    status = cluster.wait_finished(request_id, timeout=120)
    assert status["status"] == "completed" and status["progress"]["failed"] == 0, status
    check_each_terminal_once(cluster, request_id, IMAGES)
    attempts = [image["attempts"] for image in images(cluster, request_id)]
    assert attempts == [1] * IMAGES, "waiting for the storage spends no attempt of the image"
    keys = stored_keys(check_output_csv(cluster, request_id, rows))
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"out/{request_id}/")
    assert {item["Key"] for item in listed["Contents"]} == {
        f"out/{request_id}/{key}" for key in [*keys, "output.csv"]
    }
    assert "waits for the storage: cannot write s3://" in cluster.logs()
    figures.update(
        images=IMAGES,
        outage_seconds=OUTAGE_SECONDS,
        completed_when_it_went_down=down_at["completed"],
        completed_during=during["completed"],
        failed=0,
    )


# Embedded only: there the worker stores a fresh image without looking for an earlier
# attempt's object, so images whose sources are gone never touch the storage. (The
# imaging service looks first, so on the distributed stack the images wait too.) The
# output CSV is stored by the same code on both.
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_the_output_csv_waits_for_the_storage_and_spends_no_attempt(
    stack_env: dict[str, str],
    cluster: Cluster,
    s3_proxy: TcpProxy,
    s3_server: S3Server,
    bucket: str,
    image_host: ImageHost,
) -> None:
    # Sources that are gone: the images fail without a write, and only the output CSV
    # needs the storage, which is away from the start.
    rows = [[image_host.url(f"status/404?csv-{n}")] for n in range(3)]
    worker = cluster.add_worker()
    # Started: it has checked the storage (a process that cannot reach it does not start).
    wait_until(lambda: "pixelmill backends" in worker.log(), timeout=60, what="the worker")
    s3_proxy.stop()
    request_id = upload(cluster, rows)
    wait_until(
        lambda: f"the output CSV {request_id}/output.csv waits for the storage" in cluster.logs(),
        timeout=60,
        what="the output CSV waiting",
    )
    assert cluster.get(f"/api/v1/requests/{request_id}").json()["finished_at"] is None
    s3_proxy.start()

    status = cluster.wait_finished(request_id, timeout=120)
    assert status["status"] == "failed" and status["progress"]["failed"] == 3, status
    check_output_csv(cluster, request_id, rows)
    key = f"out/{request_id}/output.csv"
    assert s3_server.client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    # Waiting is not failing: the finalize task was taken once (each request has one
    # task per block of rows and one finalize task).
    assert task_states(cluster, request_id) == Counter({("done", 1): 2}), "one attempt each"
