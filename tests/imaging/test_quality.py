"""The JPEG quality estimator, against files whose quality is known because we saved them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import pyvips
from PIL import Image

from pixelmill.imaging.quality import estimate_from_tables, estimate_jpeg_quality
from tests.support.images import PHOTOS, SAMPLES

QUALITIES = list(range(5, 101, 5))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(SAMPLES / "coffee.jpg") as image:
        return image.convert("RGB")


def _jpeg(image: Image.Image, quality: int, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("mode", ["RGB", "L"], ids=["colour", "grayscale"])
def test_estimate_matches_the_quality_pillow_saved_at(
    photo: Image.Image, mode: str, quality: int
) -> None:
    data = _jpeg(photo.convert(mode), quality)
    with Image.open(io.BytesIO(data)) as saved:
        # Colour files carry two tables (luma, chroma), grayscale ones only luma.
        assert len(saved.quantization) == (1 if mode == "L" else 2)

    estimate = estimate_jpeg_quality(data)

    assert estimate is not None
    assert abs(estimate - quality) <= 2, f"saved at {quality}, estimated {estimate}"


@pytest.mark.parametrize("quality", [1, 2, 3, 7, 13, 27, 33, 49, 51, 68, 91, 97, 99])
def test_estimate_is_exact_off_the_five_step_grid(photo: Image.Image, quality: int) -> None:
    assert estimate_jpeg_quality(_jpeg(photo, quality)) == quality


@pytest.mark.parametrize(
    "options",
    [
        {"subsampling": 0},  # 4:4:4
        {"subsampling": 2},  # 4:2:0
        {"optimize": True},  # optimised Huffman tables
        {"progressive": True},
    ],
    ids=["444", "420", "optimized", "progressive"],
)
@pytest.mark.parametrize("quality", [10, 35, 60, 85])
def test_estimate_ignores_how_the_scan_is_coded(
    photo: Image.Image, quality: int, options: dict[str, object]
) -> None:
    assert estimate_jpeg_quality(_jpeg(photo, quality, **options)) == quality


def test_estimate_of_a_cmyk_jpeg(photo: Image.Image) -> None:
    assert estimate_jpeg_quality(_jpeg(photo.convert("CMYK"), 70)) == 70


@pytest.mark.parametrize("quality", [10, 30, 42, 50, 75, 95])
def test_estimate_of_jpegs_written_by_libvips(quality: int) -> None:
    """The encoder pixelmill itself uses: the estimate reads back what it was told."""
    image = pyvips.Image.new_from_file(str(SAMPLES / "astronaut.jpg"))

    estimate = estimate_jpeg_quality(image.jpegsave_buffer(Q=quality))

    assert estimate is not None
    assert abs(estimate - quality) <= 2


def test_estimates_of_the_test_corpus(corpus: Path) -> None:
    """build_corpus saves the sample photos at 80, 81, ... in name order."""
    expected = {name: 80 + index for index, name in enumerate(PHOTOS)}
    expected |= {"gray.jpg": 90, "cmyk.jpg": 90, "rotated.jpg": 90}

    found = {name: estimate_jpeg_quality((corpus / name).read_bytes()) for name in expected}

    assert found == expected


def test_png_bytes_have_no_quality(photo: Image.Image) -> None:
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")

    assert estimate_jpeg_quality(buffer.getvalue()) is None


def test_png_of_the_corpus_has_no_quality(corpus: Path) -> None:
    assert estimate_jpeg_quality((corpus / "photo.png").read_bytes()) is None
    assert estimate_jpeg_quality((corpus / "photo.webp").read_bytes()) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8\xff" + b"\x00" * 64, b"<!doctype html><p>hi</p>"],
    ids=["empty", "jpeg-magic-then-junk", "html"],
)
def test_unreadable_bytes_have_no_quality(data: bytes) -> None:
    assert estimate_jpeg_quality(data) is None


def test_truncated_jpeg_still_has_its_header_quality(corpus: Path) -> None:
    """The tables live in the header, so a cut-off body does not hide the quality."""
    assert estimate_jpeg_quality((corpus / "truncated.jpg").read_bytes()) == 80


def test_no_tables_no_estimate() -> None:
    assert estimate_from_tables({}) is None
