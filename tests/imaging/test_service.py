"""The imaging service: the same outcomes as InlineImaging, over real HTTP.

The service runs under uvicorn in a thread on a loopback port; the client side is the
real HttpImaging or raw HTTP. Results are compared with InlineImaging on the same
images from the real image host.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from pixelmill.config import Settings
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ProcessedImage,
    ProcessingOptions,
)
from pixelmill.imaging import open_imaging
from pixelmill.imaging.client import HttpImaging
from pixelmill.imaging.inline import InlineImaging
from pixelmill.storage import LocalStorage
from tests.support.image_host import ImageHost
from tests.support.imaging_service import ImagingThread
from tests.support.waiting import async_wait_until

PUBLIC_URL = "http://files.test:8000"
TOKEN = "imaging-test-secret"


def service_settings(root: Path, **changes: object) -> Settings:
    return Settings(
        data_dir=root,
        storage_url=f"file://{root / 'files'}",
        public_url=PUBLIC_URL,
        allow_private_urls=True,
        imaging_threads=2,
        **changes,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImagingThread]:
    server = ImagingThread(service_settings(tmp_path_factory.mktemp("service"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service_root(service: ImagingThread) -> Path:
    return service.settings.data_dir / "files"


@pytest.fixture
async def inline(tmp_path: Path, settings: Settings) -> AsyncIterator[InlineImaging]:
    imaging = InlineImaging(
        settings.model_copy(update={"imaging_threads": 2}),
        LocalStorage(tmp_path / "inline", f"{PUBLIC_URL}/files"),
    )
    yield imaging
    await imaging.close()


@pytest.fixture
async def remote(service: ImagingThread, settings: Settings) -> AsyncIterator[HttpImaging]:
    imaging = HttpImaging(settings.model_copy(update={"imaging_url": service.url}))
    yield imaging
    await imaging.close()


def without_duration(outcome: ImageOutcome) -> ImageOutcome:
    if isinstance(outcome, ProcessedImage):
        return dataclasses.replace(outcome, duration_ms=0.0)
    return outcome


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("astronaut.jpg", ProcessingOptions()),
        ("coffee.jpg", ProcessingOptions(quality=30)),
        ("photo.png", ProcessingOptions()),
        ("photo.webp", ProcessingOptions(max_width=300)),
        ("alpha.png", ProcessingOptions(format="jpeg")),
        ("rotated.jpg", ProcessingOptions(max_height=300)),
        ("cmyk.jpg", ProcessingOptions(format="webp")),
    ],
)
async def test_same_result_inline_and_over_http(
    image_host: ImageHost,
    tmp_path: Path,
    service_root: Path,
    inline: InlineImaging,
    remote: HttpImaging,
    name: str,
    options: ProcessingOptions,
) -> None:
    url = image_host.url(f"img/{name}")
    stem = f"parity/{name.replace('.', '-')}"

    here = await inline.process(url, options, stem)
    there = await remote.process(url, options, stem)

    assert isinstance(there, ProcessedImage), there
    assert without_duration(there) == without_duration(here)
    assert there.output_url == f"{PUBLIC_URL}/files/{there.output_key}"
    assert there.duration_ms > 0
    stored_there = (service_root / there.output_key).read_bytes()
    stored_here = (tmp_path / "inline" / here.output_key).read_bytes()  # type: ignore[union-attr]
    assert len(stored_there) == there.bytes_out == len(stored_here)
    assert stored_there == stored_here


def facts(failure: ImageFailure) -> tuple[object, ...]:
    return failure.code, failure.message, failure.is_transient, failure.retry_after


@pytest.mark.parametrize(
    ("path", "code", "transient"),
    [
        ("status/404", ErrorCode.HTTP_ERROR, False),
        ("status/503", ErrorCode.HTTP_ERROR, True),
        ("img/page.jpg", ErrorCode.UNSUPPORTED_FORMAT, False),
        ("img/bomb.png", ErrorCode.TOO_MANY_PIXELS, False),
        ("img/truncated.jpg", ErrorCode.CORRUPT_IMAGE, False),
        ("img/empty.jpg", ErrorCode.CORRUPT_IMAGE, False),
    ],
)
async def test_image_failures_pass_through_unchanged(
    image_host: ImageHost,
    service: ImagingThread,
    service_root: Path,
    inline: InlineImaging,
    remote: HttpImaging,
    path: str,
    code: ErrorCode,
    transient: bool,
) -> None:
    url = image_host.url(path)
    served = service.health()["served"]

    here = await inline.process(url, ProcessingOptions(), "failed/1")
    there = await remote.process(url, ProcessingOptions(), "failed/1")

    assert isinstance(here, ImageFailure) and isinstance(there, ImageFailure)
    assert facts(there) == facts(here)
    assert there.code == code and there.is_transient is transient
    assert service.health()["served"] == served + 1, "the client did not retry an image failure"
    assert not (service_root / "failed").exists()


async def test_storage_failures_pass_through_with_their_kind(
    image_host: ImageHost, remote: HttpImaging, service_root: Path
) -> None:
    (service_root / "blocked").write_bytes(b"a file where a folder should be")
    outcome = await remote.process(image_host.url("img/cat.jpg"), ProcessingOptions(), "blocked/1")

    assert isinstance(outcome, ImageFailure)
    assert outcome.code == ErrorCode.STORAGE_ERROR and not outcome.is_transient


def test_process_answers_the_documented_json(
    service: ImagingThread, image_host: ImageHost, service_root: Path
) -> None:
    body = {
        "source_url": image_host.url("img/coffee.jpg"),
        "options": {"quality": 50, "max_width": 300, "max_height": None, "format": "webp"},
        "output_key": "json/1-0",
    }

    response = httpx.post(f"{service.url}/v1/process", json=body, timeout=30)

    assert response.status_code == 200
    result = response.json()
    assert set(result) == {
        "output_key", "output_url", "format", "width", "height", "bytes_in", "bytes_out",
        "source_quality", "output_quality", "kept_source", "duration_ms",
    }  # fmt: skip
    assert result["output_key"] == "json/1-0.webp"
    assert (result["format"], result["width"], result["height"]) == ("webp", 300, 200)
    assert (service_root / "json/1-0.webp").stat().st_size == result["bytes_out"]

    missing = httpx.post(
        f"{service.url}/v1/process",
        json={"source_url": image_host.url("status/404"), "output_key": "json/2-0"},
        timeout=30,
    )
    assert missing.status_code == 200
    error = missing.json()["error"]
    assert error["code"] == "http_error" and error["transient"] is False
    assert "404" in error["message"] and error["retry_after"] is None


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"output_key": "x/1"}',
        b'{"source_url": "http://example.com/a.jpg"}',
        b'{"source_url": "http://example.com/a.jpg", "output_key": ""}',
        b'{"source_url": "http://e.com/a.jpg", "output_key": "x", "options": {"quality": 0}}',
        b'{"source_url": "http://e.com/a.jpg", "output_key": "x", "options": {"format": "bmp"}}',
        b'{"source_url": "http://e.com/a.jpg", "output_key": "x", "options": {"max_width": -1}}',
        b'{"source_url": "http://e.com/a.jpg", "output_key": "x", "colour": "red"}',
    ],
)
def test_malformed_body_is_a_422(service: ImagingThread, content: bytes) -> None:
    served = service.health()["served"]

    response = httpx.post(
        f"{service.url}/v1/process",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["details"]
    assert service.health()["served"] == served, "nothing was processed"


def test_healthz(service: ImagingThread) -> None:
    health = service.health()
    assert health["status"] == "ok"
    assert health["max_in_flight"] >= 1 and health["in_flight"] >= 0


async def test_a_full_service_answers_429_with_retry_after(
    tmp_path: Path, image_host: ImageHost
) -> None:
    server = ImagingThread(service_settings(tmp_path, imaging_max_in_flight=1)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            slow = {"source_url": image_host.url("slow/1500/cat.jpg"), "output_key": "busy/1"}
            first = asyncio.create_task(http.post("/v1/process", json=slow))
            await async_wait_until(
                lambda: asyncio.to_thread(lambda: server.health()["in_flight"] == 1),
                what="the first image in progress",
            )

            refused = await http.post(
                "/v1/process",
                json={"source_url": image_host.url("img/cat.jpg"), "output_key": "busy/2"},
            )

            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "busy"
            done = await first
            assert done.status_code == 200 and done.json()["output_key"] == "busy/1.jpg"
            metrics = (await http.get("/metrics")).text
        health = server.health()
        assert (health["in_flight"], health["served"], health["refused"]) == (0, 1, 1)
        for line in (
            'pixelmill_imaging_images_total{outcome="busy"} 1.0',
            'pixelmill_imaging_images_total{outcome="processed"} 1.0',
            "pixelmill_imaging_in_flight 0.0",
            "pixelmill_imaging_image_duration_seconds_count 1.0",
        ):
            assert line in metrics.splitlines(), line
        assert "process_cpu_seconds_total" in metrics, "the process's own metrics too"
    finally:
        server.stop()


async def test_token_is_required_when_set(
    tmp_path: Path, image_host: ImageHost, settings: Settings
) -> None:
    server = ImagingThread(service_settings(tmp_path, imaging_token=TOKEN)).start()
    body = {"source_url": image_host.url("img/cat.jpg"), "output_key": "auth/1"}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            anonymous = await http.post("/v1/process", json=body)
            wrong = await http.post(
                "/v1/process", json=body, headers={"Authorization": "Bearer nope"}
            )
            health = await http.get("/healthz")
        assert anonymous.status_code == wrong.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthorized"
        assert health.status_code == 200

        client = HttpImaging(
            settings.model_copy(update={"imaging_url": server.url, "imaging_token": TOKEN})
        )
        try:
            outcome = await client.process(body["source_url"], ProcessingOptions(), "auth/1")
        finally:
            await client.close()
        assert isinstance(outcome, ProcessedImage) and outcome.output_key == "auth/1.jpg"
        assert server.health()["served"] == 1
    finally:
        server.stop()


async def test_a_source_asking_to_wait_forever_is_an_image_failure_not_a_500(
    service: ImagingThread, image_host: ImageHost
) -> None:
    """``Retry-After: inf`` has no JSON form: the service must still answer the image."""
    body = {"source_url": image_host.url("status/503?retry_after=inf"), "output_key": "inf/1"}
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
        response = await http.post("/v1/process", json=body)

    assert response.status_code == 200, response.text
    error = response.json()["error"]
    assert (error["code"], error["transient"], error["retry_after"]) == ("http_error", True, None)


async def test_without_the_token_a_malformed_body_is_still_a_401(tmp_path: Path) -> None:
    server = ImagingThread(service_settings(tmp_path, imaging_token=TOKEN)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            anonymous = await http.post(
                "/v1/process", content=b"not json", headers={"Content-Type": "application/json"}
            )
            trusted = await http.post(
                "/v1/process",
                content=b"not json",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            )
    finally:
        server.stop()

    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert trusted.status_code == 422
    assert trusted.json()["error"]["code"] == "invalid_request"


async def test_open_imaging_knows_http_and_https(settings: Settings, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files", PUBLIC_URL)
    several = "http://img-1:8001, https://img-2:8443/,http://img-3:8001"

    imaging = open_imaging(settings.model_copy(update={"imaging_url": several}), storage)

    assert isinstance(imaging, HttpImaging)
    assert [i.url for i in imaging.instances] == [
        "http://img-1:8001",
        "https://img-2:8443",
        "http://img-3:8001",
    ]
    await imaging.close()
    for bad in ("grpc://img-1:8001", "http://img-1:8001,ftp://img-2", "http://"):
        with pytest.raises(ValueError, match="PIXELMILL_IMAGING_URL"):
            open_imaging(settings.model_copy(update={"imaging_url": bad}), storage)
