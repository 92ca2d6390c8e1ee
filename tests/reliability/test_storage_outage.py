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
