"""End to end through a real ``pixelmill serve``: upload, process, output CSV, files.

The module runs once per combination of the backend matrix (SQLite and the queue table,
PostgreSQL and the queue table, PostgreSQL and Kafka), each pass with a server of its
own. A pass costs little beyond the server's start (about 10 s): all three run.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend
from tests.support.databases import terminate_other_connections
from tests.support.image_host import ImageHost
from tests.support.images import decoded_size, jpeg_quality_of
from tests.support.server import ServeProcess
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, module_backend: Backend
) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("serve"), env=module_backend.env()).start()
    yield process
    process.stop()


def csv_bytes(rows: list[list[str]], header: list[str] | None = None) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header or ["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows(rows)
    return out.getvalue().encode()


def upload(server: ServeProcess, body: bytes, path: str = "/api/v1/requests", **data: str) -> dict:
    response = server.post(path, files={"file": ("products.csv", body, "text/csv")}, data=data)
    assert response.status_code == 202, response.text
    return response.json()


def read_output(server: ServeProcess, request_id: str) -> list[list[str]]:
    response = server.get(f"/api/v1/requests/{request_id}/output.csv")
    assert response.status_code == 200, response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    return list(csv.reader(io.StringIO(response.text)))


def test_upload_to_output_csv_with_processed_images(
    server: ServeProcess, image_host: ImageHost, corpus: Path
) -> None:
    urls = [image_host.url(f"img/{name}") for name in ("astronaut.jpg", "coffee.jpg", "cat.jpg")]
    body = csv_bytes(
        [
            ["1", "Alpha", f"{urls[0]}, {urls[1]}", "red"],
            ["2", "Beta, with comma", urls[2], "=1+1"],
            ["3", "Gamma", image_host.url("img/rotated.jpg"), ""],
        ],
        header=["S. No.", "Product Name", "Input Image Urls", "Colour"],
    )
    accepted = upload(server, body)
    assert accepted["products"] == 3 and accepted["images"] == 4
    assert accepted["status_url"].endswith(accepted["request_id"])

    status = server.wait_finished(accepted["request_id"])
    assert status["status"] == "completed"
    assert status["progress"] == {
        "total": 4, "pending": 0, "processing": 0, "completed": 4, "failed": 0,
    }  # fmt: skip

    rows = read_output(server, accepted["request_id"])
    assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Colour", "Output Image Urls"]
    assert [row[:2] for row in rows[1:]] == [
        ["1", "Alpha"],
        ["2", "Beta, with comma"],
        ["3", "Gamma"],
    ]
    assert rows[2][3] == "'=1+1", "a formula cell is neutralised"
    sources = [name for row in rows[1:] for name in row[2].split(", ")]
    outputs = [url for row in rows[1:] for url in row[4].split(", ")]
    assert len(outputs) == len(sources) == 4
    for source_url, output_url in zip(sources, outputs, strict=True):
        source = httpx.get(source_url).content
        output = httpx.get(output_url)
        assert output.status_code == 200
        assert output.headers["content-type"] == "image/jpeg"
        assert output.headers["x-content-type-options"] == "nosniff"
        assert len(output.content) < len(source)
        assert jpeg_quality_of(output.content) < jpeg_quality_of(source)
        if "rotated" not in source_url:
            assert decoded_size(output.content) == decoded_size(source)
    # The EXIF-rotated source is displayed 90 degrees turned: the output is upright.
    width, height = decoded_size((corpus / "rotated.jpg").read_bytes())
    assert decoded_size(httpx.get(outputs[3]).content) == (height, width)


def test_image_metadata_in_products(server: ServeProcess, image_host: ImageHost) -> None:
    body = csv_bytes([["7", "Solo", image_host.url("img/coffee.jpg")]])
    request_id = upload(server, body)["request_id"]
    server.wait_finished(request_id)
    page = server.get(f"/api/v1/requests/{request_id}/products").json()
    assert page["total"] == 1 and page["offset"] == 0
    product = page["items"][0]
    assert (product["serial_number"], product["line"], product["status"]) == ("7", 2, "completed")
    image = product["images"][0]
    assert image["status"] == "completed" and image["error"] is None
    assert image["format"] == "jpeg" and image["attempts"] == 1
    assert (image["width"], image["height"]) == (600, 400)
    assert image["source_quality"] == 83  # the corpus saves coffee.jpg at quality 83
    assert image["output_quality"] == 42
    assert image["bytes_out"] < image["bytes_in"]


def test_a_404_image_fails_alone(server: ServeProcess, image_host: ImageHost) -> None:
    good = image_host.url("img/cat.jpg")
    tag = uuid.uuid4().hex  # the image host counts hits over the whole session
    missing = image_host.url(f"status/404?alone={tag}")
    body = csv_bytes([["1", "Mixed", f"{good}, {missing}, {good}?again"], ["2", "Fine", good]])
    request_id = upload(server, body)["request_id"]
    status = server.wait_finished(request_id)
    assert status["status"] == "completed"
    assert status["progress"]["completed"] == 3 and status["progress"]["failed"] == 1

    product = server.get(f"/api/v1/requests/{request_id}/products").json()["items"][0]
    assert product["status"] == "completed"
    failed = product["images"][1]
    assert failed["status"] == "failed" and failed["output_url"] is None
    assert failed["error"]["code"] == "http_error" and "404" in failed["error"]["message"]
    assert failed["attempts"] == 1, "a 404 is permanent: not retried"
    assert image_host.hits[f"/status/404?alone={tag}"] == 1

    rows = read_output(server, request_id)
    slots = rows[1][3].split(", ")
    assert len(slots) == 3 and slots[1] == "" and slots[0] and slots[2], "the failed slot is empty"


def test_every_image_failing_fails_the_request(server: ServeProcess, image_host: ImageHost) -> None:
    body = csv_bytes(
        [["1", "Bad", f"{image_host.url('img/page.jpg')}, {image_host.url('img/empty.jpg')}"]]
    )
    request_id = upload(server, body)["request_id"]
    status = server.wait_finished(request_id)
    assert status["status"] == "failed"
    assert "2 image(s) failed" in status["error"]
    images = server.get(f"/api/v1/requests/{request_id}/products").json()["items"][0]["images"]
    assert [image["error"]["code"] for image in images] == ["unsupported_format", "corrupt_image"]
    assert len(read_output(server, request_id)) == 2, "a failed request still has its output CSV"


def test_transient_failure_is_retried(server: ServeProcess, image_host: ImageHost) -> None:
    # Each pass needs a key of its own: the host fails only the first fetch of a key.
    body = csv_bytes([["1", "Flaky", image_host.url(f"flaky/{uuid.uuid4().hex}/cat.jpg")]])
    request_id = upload(server, body)["request_id"]
    assert server.wait_finished(request_id)["status"] == "completed"
    image = server.get(f"/api/v1/requests/{request_id}/products").json()["items"][0]["images"][0]
    assert image["status"] == "completed" and image["attempts"] == 2


def test_classic_routes_answer_the_same(server: ServeProcess, image_host: ImageHost) -> None:
    body = csv_bytes([["1", "Classic", image_host.url("img/rocket.jpg")]])
    accepted = upload(server, body, path="/upload")
    request_id = accepted["request_id"]
    server.wait_finished(request_id)
    assert (
        server.get(f"/status/{request_id}").json()
        == server.get(f"/api/v1/requests/{request_id}").json()
    )


def test_text_csv_body_with_query_options(server: ServeProcess, image_host: ImageHost) -> None:
    body = csv_bytes([["1", "Small", image_host.url("img/astronaut.jpg")]])
    response = server.post(
        "/api/v1/requests?max_width=100&format=webp",
        content=body,
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    server.wait_finished(request_id)
    image = server.get(f"/api/v1/requests/{request_id}/products").json()["items"][0]["images"][0]
    assert image["format"] == "webp" and image["width"] == 100
    output = httpx.get(image["output_url"])
    assert output.content[8:12] == b"WEBP"


def test_invalid_csv_is_refused_whole(server: ServeProcess, image_host: ImageHost) -> None:
    before = server.get("/api/v1/requests").json()["total"]
    good = image_host.url("img/cat.jpg")
    body = csv_bytes([["1", "Fine", good], ["x", "", "ftp://example.com/a.jpg"], ["3", "Ok", good]])
    response = server.post("/upload", files={"file": ("p.csv", body, "text/csv")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_csv"
    assert {(d["line"], d["column"]) for d in error["details"]} == {
        (3, "S. No."), (3, "Product Name"), (3, "Input Image Urls"),
    }  # fmt: skip
    assert server.get("/api/v1/requests").json()["total"] == before, "nothing stored"


def test_missing_column_and_bad_options(server: ServeProcess) -> None:
    body = b"S. No.,Name,Input Image Urls\n1,a,http://example.com/a.jpg\n"
    response = server.post("/upload", files={"file": ("p.csv", body, "text/csv")})
    assert response.status_code == 422
    assert "Product Name" in response.json()["error"]["details"][0]["message"]

    good = csv_bytes([["1", "a", "http://example.com/a.jpg"]])
    response = server.post(
        "/upload", files={"file": ("p.csv", good, "text/csv")}, data={"quality": "0"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "quality"

    nul = "http://127.0.0.1:9/h\x00ook"  # no database text may hold a NUL
    response = server.post("/upload", files={"file": ("p.csv", good)}, data={"webhook_url": nul})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_webhook_url"

    response = server.post("/upload", files={"notes": ("a.txt", b"x")}, data={"quality": "50"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "missing_file"

    response = server.post("/upload", data={"quality": "50"})
    assert response.status_code == 415
    assert "multipart" in response.json()["error"]["message"]

    response = server.post("/upload", json={"rows": []})
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


def test_unknown_request_is_404_and_unfinished_output_is_409(
    server: ServeProcess, image_host: ImageHost
) -> None:
    assert server.get("/api/v1/requests/nope").status_code == 404
    assert server.get("/api/v1/requests/nope").json()["error"]["code"] == "not_found"
    for path in ("/api/v1/requests/a%00b", "/api/v1/requests/a%00b/products", "/status/%00"):
        assert server.get(path).status_code == 404, "a NUL names no request, on every database"
    body = csv_bytes([["1", "Slow", image_host.url("slow/1500/cat.jpg")]])
    request_id = upload(server, body)["request_id"]
    response = server.get(f"/api/v1/requests/{request_id}/output.csv")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_finished"
    server.wait_finished(request_id)
    assert server.get(f"/api/v1/requests/{request_id}/output.csv").status_code == 200


def test_stored_files_cannot_escape_the_storage_root(server: ServeProcess) -> None:
    for key in ("../pixelmill.db", "..%2Fpixelmill.db", "%2e%2e/pixelmill.db"):
        assert server.get(f"/files/{key}").status_code == 404


def test_operations_endpoints(server: ServeProcess) -> None:
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json() == {"status": "ok"}
    assert server.get("/openapi.json").json()["info"]["title"] == "pixelmill"
    assert server.get("/docs").status_code == 200


def metric_values(server: ServeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, by name and sorted labels."""
    page = server.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }


def read_after(server: ServeProcess, moment: float) -> dict[Any, float]:
    """The metrics once the pipeline's figures were read after ``moment`` (they are read
    at most every 5 s)."""
    read_at = ("pixelmill_database_read_timestamp_seconds", ())
    return wait_until(
        lambda: (values := metric_values(server)).get(read_at, 0) > moment and values,
        timeout=30,
        what="the pipeline's figures read again",
    )


def test_metrics_count_the_pipeline_and_the_api(
    server: ServeProcess, image_host: ImageHost, module_backend: Backend
) -> None:
    before = read_after(server, time.time())  # nothing is in progress: a fresh reading
    finished = ("pixelmill_images_finished_total", (("status", "completed"),))
    failed = ("pixelmill_images_finished_total", (("status", "failed"),))
    route = ("route", "/api/v1/requests/{request_id}")
    status_calls = ("pixelmill_http_requests_total", (("method", "GET"), route, ("status", "200")))
    missing = image_host.url(f"status/404?metrics={uuid.uuid4().hex}")
    body = csv_bytes([["1", "A", f"{image_host.url('img/cat.jpg')}?m, {missing}"]])
    request_id = upload(server, body)["request_id"]
    server.wait_finished(request_id)
    assert server.get("/no/such/path").status_code == 404

    after = read_after(server, time.time())
    assert after[("pixelmill_database_up", ())] == 1
    assert (after[finished] - before[finished], after[failed] - before[failed]) == (1, 1)
    requests_completed = ("pixelmill_requests", (("status", "completed"),))
    assert after[requests_completed] == before[requests_completed] + 1
    assert after[("pixelmill_images_unfinished", (("status", "pending"),))] == 0
    assert after[status_calls] > before.get(status_calls, 0), "wait_finished polled the status"
    unmatched = (("method", "GET"), ("route", "<unmatched>"), ("status", "404"))
    assert after[("pixelmill_http_requests_total", unmatched)] >= 1
    assert not any(request_id in str(labels) for _, labels in after), "no raw paths as labels"
    outbox = ("pixelmill_outbox_unpublished_tasks", ())
    assert (outbox in after) == (module_backend.queue == "kafka")
    task_states = {dict(labels)["state"] for name, labels in after if name == "pixelmill_tasks"}
    assert task_states == {"queued", "leased", "dead"}
    assert any(name == "python_info" for name, _ in after), "the process's metrics too"


def test_samples_are_served_and_allowed_by_prefix_only(server: ServeProcess) -> None:
    sample = server.get("/samples/cat.jpg")
    assert sample.headers["content-type"] == "image/jpeg"
    assert sample.headers["x-content-type-options"] == "nosniff"
    assert server.get("/samples/../pixelmill.db").status_code == 404


def test_status_calls_survive_cut_database_connections(
    server: ServeProcess, image_host: ImageHost, module_backend: Backend
) -> None:
    """The server drops every connection to the database again and again between status
    calls: each is answered, on a fresh connection (the pool's pre-ping finds the dead
    ones; a read cut in the middle of its query is retried)."""
    if not module_backend.database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server whose connections could be cut")
    accepted = upload(server, csv_bytes([["1", "P", image_host.url("img/coffee.jpg?cut")]]))
    path = f"/api/v1/requests/{accepted['request_id']}"
    cut = 0
    for _ in range(40):
        cut += terminate_other_connections(module_backend.database_url)
        response = server.get(path)
        assert response.status_code == 200, response.text
        assert server.get(f"{path}/products").status_code == 200
    assert cut >= 40, "the server's connections were cut between the calls"
