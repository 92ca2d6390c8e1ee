"""The distributed stack with its objects in an S3 bucket.

``pixelmill api``, a ``pixelmill worker`` and a ``pixelmill imaging`` service over
HTTP, on PostgreSQL and Kafka, all with ``PIXELMILL_STORAGE_URL=s3://...`` on a real S3
server: the imaging service stores the images, the worker the output CSV, and the API
serves both from the bucket, which need not be public.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.storage import WRITE_CHECK_KEY
from tests.reliability.checks import check_output_csv, slow_photo_rows, upload
from tests.support.cluster import Cluster
from tests.support.databases import PostgresServer
from tests.support.image_host import ImageHost
from tests.support.kafka import TansuBroker
from tests.support.s3 import S3Server

PREFIX = "catalogue"


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def s3_cluster(
    tmp_path: Path,
    postgres: PostgresServer,
    kafka_broker: TansuBroker,
    s3_server: S3Server,
    bucket: str,
) -> Iterator[Cluster]:
    database_url = postgres.create_database()
    env = {
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_DATABASE_URL": database_url,
        "PIXELMILL_QUEUE_URL": kafka_broker.queue_url(f"s3-{uuid.uuid4().hex[:8]}"),
        "PIXELMILL_STORAGE_URL": s3_server.storage_url(bucket, PREFIX),
        "PIXELMILL_POLL_INTERVAL": "0.1",
    }
    cluster = Cluster(tmp_path, env, imaging=1)
    try:
        yield cluster.start(workers=1)
    finally:
        cluster.stop()
        postgres.drop_database(database_url)


def test_a_request_on_the_distributed_stack_stores_everything_in_the_bucket(
    s3_cluster: Cluster, s3_server: S3Server, bucket: str, image_host: ImageHost
) -> None:
    rows = slow_photo_rows(image_host, 12, "s3", delay_ms=0)
    request_id = upload(s3_cluster, rows)
    status = s3_cluster.wait_finished(request_id, timeout=120)
    assert status["status"] == "completed", status

    outputs = check_output_csv(s3_cluster, request_id, rows)
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["Contents"]
    stored = {item["Key"].removeprefix(f"{PREFIX}/") for item in listed}
    image_keys = {url.split("/files/", 1)[1] for row in outputs for url in row}
    # Every process wrote the one object that tells it at start that it may write.
    assert stored == image_keys | {f"{request_id}/output.csv", WRITE_CHECK_KEY}
    assert not (Path(s3_cluster.env["PIXELMILL_DATA_DIR"]) / "files").exists(), "nothing local"

    for url in sorted(url for row in outputs for url in row)[:4]:
        assert url.startswith(f"{s3_cluster.base_url}/files/{request_id}/")
        served = s3_cluster.get(url.removeprefix(s3_cluster.base_url))
        assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
        key = f"{PREFIX}/{url.split('/files/', 1)[1]}"
        assert served.content == client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert Image.open(io.BytesIO(served.content)).format == "JPEG"

    csv_answer = s3_cluster.get(f"/api/v1/requests/{request_id}/output.csv")
    assert csv_answer.headers["content-disposition"] == f'attachment; filename="{request_id}.csv"'
    in_bucket = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{request_id}/output.csv")
    assert in_bucket["ContentType"] == "text/csv; charset=utf-8"
    assert list(csv.reader(io.StringIO(in_bucket["Body"].read().decode()))) == list(
        csv.reader(io.StringIO(csv_answer.text))
    )
    assert s3_cluster.get(f"/files/{request_id}/9-9.jpg").status_code == 404
    # The bucket may hold other things under the prefix: they are not the API's to show.
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/notes/page.html", Body=b"<script>1</script>")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{request_id}/page.html", Body=b"<p>")
    for other in ("notes/page.html", f"{request_id}/page.html", "pixelmill-write-check"):
        assert s3_cluster.get(f"/files/{other}").status_code == 404, other


@pytest.mark.parametrize("command", ["api", "imaging"])
def test_a_server_with_a_missing_bucket_says_so_in_one_line_and_exits(
    s3_server: S3Server, tmp_path: Path, command: str
) -> None:
    env = {
        **os.environ,
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_STORAGE_URL": s3_server.storage_url("pixelmill-never-made"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pixelmill", command, "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert (
        f"cannot use the storage {s3_server.storage_url('pixelmill-never-made')} "
        f"(PIXELMILL_STORAGE_URL): StorageError: there is no bucket 'pixelmill-never-made' at "
        f"{s3_server.endpoint}"
    ) in said, said
    assert "Traceback" not in said


@pytest.mark.parametrize("command", ["api", "worker"])
def test_s3_storage_without_boto3_says_what_to_install_in_one_line(
    tmp_path: Path, command: str
) -> None:
    # An install without the s3 extra: boto3 cannot be imported.
    without_boto3 = (
        "import sys; sys.modules['boto3'] = None; from pixelmill.cli import app; "
        "app(prog_name='pixelmill')"
    )
    env = {
        **os.environ,
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_STORAGE_URL": "s3://pixelmill-images/out",
    }
    args = [command, "--port", "1"] if command == "api" else [command]
    done = subprocess.run(
        [sys.executable, "-c", without_boto3, *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert "s3:// storage needs boto3: pip install 'pixelmill[s3]'" in said, said
    assert "Traceback" not in said, said
