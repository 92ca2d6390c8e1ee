"""InlineImaging end to end: the real image host, real libvips, a LocalStorage on disk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pixelmill.config import Settings
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ProcessedImage,
    ProcessingOptions,
)
from pixelmill.imaging.formats import content_type
from pixelmill.imaging.inline import InlineImaging
from pixelmill.imaging.ops import sniff_format
from pixelmill.imaging.quality import estimate_jpeg_quality
from pixelmill.storage import LocalStorage
from tests.support.image_host import ImageHost
from tests.support.images import decoded_size

BASE_URL = "http://files.test:8000/files"

MakeImaging = Callable[..., InlineImaging]


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "files", BASE_URL)


@pytest.fixture
async def make_imaging(settings: Settings, storage: LocalStorage) -> AsyncIterator[MakeImaging]:
    """InlineImaging on the test settings (changed by keyword), closed afterwards."""
    made: list[InlineImaging] = []

    def make(**changes: object) -> InlineImaging:
        imaging = InlineImaging(settings.model_copy(update=changes), storage)
        made.append(imaging)
        return imaging

    yield make
    for imaging in made:
        await imaging.close()


def processed(outcome: ImageOutcome) -> ProcessedImage:
    assert isinstance(outcome, ProcessedImage), f"expected an image, got {outcome!r}"
    return outcome


def failed(outcome: ImageOutcome) -> ImageFailure:
    assert isinstance(outcome, ImageFailure), f"expected a failure, got {outcome!r}"
    return outcome


async def test_processes_and_stores_an_image(
    image_host: ImageHost, corpus: Path, storage: LocalStorage, make_imaging: MakeImaging
) -> None:
    imaging = make_imaging()
    source = (corpus / "astronaut.jpg").read_bytes()

    result = processed(
        await imaging.process(
            image_host.url("img/astronaut.jpg"), ProcessingOptions(), "req-1/row-0/0"
        )
    )

    assert result.output_key == "req-1/row-0/0.jpg"
    assert result.output_url == f"{BASE_URL}/req-1/row-0/0.jpg"
    stored = storage.root / result.output_key
    assert stored.is_file()
    data = stored.read_bytes()
    assert len(data) == result.bytes_out
    assert result.bytes_in == len(source)
    assert result.bytes_out < result.bytes_in
    assert sniff_format(data) == result.format == "jpeg"
    assert decoded_size(data) == (result.width, result.height) == (512, 512)
    assert result.source_quality == 80
    assert result.output_quality == 40
    assert estimate_jpeg_quality(data) == 40
    assert not result.kept_source
    assert result.duration_ms > 0
    assert not list(stored.parent.glob(".tmp-*")), "no temp files left behind"


@pytest.mark.parametrize(
    ("name", "options", "extension", "size"),
    [
        ("photo.png", ProcessingOptions(), "png", (600, 400)),
        ("photo.webp", ProcessingOptions(max_width=300), "webp", (300, 200)),
        ("alpha.png", ProcessingOptions(format="jpeg"), "jpg", (600, 400)),
        ("rotated.jpg", ProcessingOptions(max_height=300), "jpg", (200, 300)),
    ],
)
async def test_output_key_takes_the_extension_of_the_output_format(
    image_host: ImageHost,
    storage: LocalStorage,
    make_imaging: MakeImaging,
    name: str,
    options: ProcessingOptions,
    extension: str,
    size: tuple[int, int],
) -> None:
    result = processed(await make_imaging().process(image_host.url(f"img/{name}"), options, "x/1"))

    assert result.output_key == f"x/1.{extension}"
    assert result.output_url == f"{BASE_URL}/x/1.{extension}"
    data = (storage.root / result.output_key).read_bytes()
    assert len(data) == result.bytes_out
    assert decoded_size(data) == (result.width, result.height) == size
    assert content_type(result.format).startswith("image/")


async def test_many_images_at_once(
    image_host: ImageHost, storage: LocalStorage, make_imaging: MakeImaging
) -> None:
    imaging = make_imaging(imaging_threads=2)
    names = ["astronaut.jpg", "cat.jpg", "cells.jpg", "coffee.jpg", "galaxy.jpg", "rocket.jpg"]

    results = await asyncio.gather(
        *(
            imaging.process(image_host.url(f"img/{name}"), ProcessingOptions(), f"batch/{i}")
            for i, name in enumerate(names)
        )
    )

    for i, outcome in enumerate(results):
        result = processed(outcome)
        assert result.output_key == f"batch/{i}.jpg"
        assert (storage.root / result.output_key).stat().st_size == result.bytes_out


async def test_fetch_failures_come_back_as_values(
    image_host: ImageHost, storage: LocalStorage, make_imaging: MakeImaging
) -> None:
    imaging = make_imaging()

    missing = failed(
        await imaging.process(image_host.url("status/404"), ProcessingOptions(), "f/404")
    )
    broken = failed(
        await imaging.process(image_host.url("status/503"), ProcessingOptions(), "f/503")
    )

    assert missing.code == ErrorCode.HTTP_ERROR and not missing.is_transient
    assert broken.code == ErrorCode.HTTP_ERROR and broken.is_transient
    assert not (storage.root / "f").exists(), "nothing stored for a failed image"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("page.jpg", ErrorCode.UNSUPPORTED_FORMAT),
        ("truncated.jpg", ErrorCode.CORRUPT_IMAGE),
        ("empty.jpg", ErrorCode.CORRUPT_IMAGE),
        ("bomb.png", ErrorCode.TOO_MANY_PIXELS),
    ],
)
async def test_processing_failures_come_back_as_values(
    image_host: ImageHost,
    storage: LocalStorage,
    make_imaging: MakeImaging,
    name: str,
    code: ErrorCode,
) -> None:
    outcome = await make_imaging().process(
        image_host.url(f"img/{name}"), ProcessingOptions(), "p/1"
    )

    assert failed(outcome).code == code
    assert not (storage.root / "p").exists()


async def test_settings_reach_the_fetcher_and_the_pipeline(
    image_host: ImageHost, make_imaging: MakeImaging
) -> None:
    url = image_host.url("img/coffee.jpg")  # 600x400, 58 KB

    too_large = await make_imaging(fetch_max_bytes=1000).process(url, ProcessingOptions(), "s/1")
    too_many = await make_imaging(max_pixels=1000).process(url, ProcessingOptions(), "s/2")
    floor = await make_imaging(min_output_quality=60).process(url, ProcessingOptions(), "s/3")

    assert failed(too_large).code == ErrorCode.TOO_LARGE
    assert failed(too_many).code == ErrorCode.TOO_MANY_PIXELS
    assert processed(floor).output_quality == 60


async def test_private_sources_are_refused_by_default(
    image_host: ImageHost, make_imaging: MakeImaging
) -> None:
    before = sum(dict(image_host.hits).values())

    outcome = await make_imaging(allow_private_urls=False).process(
        image_host.url("img/cat.jpg"), ProcessingOptions(), "d/1"
    )

    assert failed(outcome).code == ErrorCode.FORBIDDEN_ADDRESS
    assert sum(dict(image_host.hits).values()) == before


async def test_trusted_prefixes_come_from_the_settings(
    image_host: ImageHost, make_imaging: MakeImaging
) -> None:
    imaging = make_imaging(
        allow_private_urls=False, trusted_source_prefixes=[image_host.url("img/")]
    )

    trusted = await imaging.process(image_host.url("img/cat.jpg"), ProcessingOptions(), "t/1")
    other = await imaging.process(image_host.url("status/200"), ProcessingOptions(), "t/2")

    assert processed(trusted).format == "jpeg"
    assert failed(other).code == ErrorCode.FORBIDDEN_ADDRESS


@pytest.mark.parametrize("stem", ["../escape", "/abs/path", "a//b"])
async def test_unsafe_output_keys_are_refused_as_an_internal_error(
    image_host: ImageHost, tmp_path: Path, make_imaging: MakeImaging, stem: str
) -> None:
    outcome = await make_imaging().process(image_host.url("img/cat.jpg"), ProcessingOptions(), stem)

    # Not storage_error, which workers wait on: a wrong key is the caller's bug.
    assert failed(outcome).code == ErrorCode.INTERNAL_ERROR
    assert "invalid storage key" in failed(outcome).message
    assert not (tmp_path / "escape.jpg").exists()


async def test_a_storage_that_refuses_is_a_permanent_storage_error(
    image_host: ImageHost, storage: LocalStorage, make_imaging: MakeImaging
) -> None:
    (storage.root / "blocked").write_bytes(b"a file where a folder should be")

    outcome = await make_imaging().process(
        image_host.url("img/cat.jpg"), ProcessingOptions(), "blocked/1"
    )

    failure = failed(outcome)
    assert failure.code == ErrorCode.STORAGE_ERROR and "blocked" in failure.message
    # A file in the way stays there: workers fail the image rather than wait on it.
    assert not failure.is_transient
