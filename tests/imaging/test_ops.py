"""The transform pipeline (`process_image`) on real image files, and format sniffing."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest
import pyvips
from PIL import Image, ImageChops, ImageOps, ImageStat

from pixelmill.domain import ErrorCode, ImageFailure, ProcessingOptions
from pixelmill.imaging.ops import EncodedImage, ImageLimits, process_image, sniff_format
from pixelmill.imaging.quality import estimate_jpeg_quality
from tests.support.images import PHOTOS, SAMPLES, decoded_size

ORIENTATION = 0x0112
KNOWN_QUALITY = {name: 80 + index for index, name in enumerate(PHOTOS)}
KNOWN_QUALITY |= {"gray.jpg": 90, "cmyk.jpg": 90, "rotated.jpg": 90}


def run(
    data: bytes,
    limits: ImageLimits | None = None,
    deadline: float | None = None,
    **options: object,
) -> EncodedImage | ImageFailure:
    return process_image(
        data,
        ProcessingOptions(**options),  # type: ignore[arg-type]
        limits or ImageLimits(),
        time.monotonic() + 30 if deadline is None else deadline,
    )


def describe(result: EncodedImage | ImageFailure) -> str:
    if isinstance(result, EncodedImage):
        return (
            f"{result.format} {result.width}x{result.height}, {len(result.data)} bytes, "
            f"quality {result.source_quality}->{result.output_quality}"
        )
    return f"{result.code}: {result.message}"


def ok(result: EncodedImage | ImageFailure) -> EncodedImage:
    assert isinstance(result, EncodedImage), f"expected an image, got {describe(result)}"
    return result


def failed(result: EncodedImage | ImageFailure) -> ImageFailure:
    assert isinstance(result, ImageFailure), f"expected a failure, got {describe(result)}"
    return result


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel (0-255) of two images of the same size."""
    assert a.size == b.size
    channels = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean
    return sum(channels) / len(channels)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(SAMPLES / "coffee.jpg") as image:
        return image.convert("RGB")


# --- sniff_format ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "expected"),
    [
        ("JPEG", {}, "jpeg"),
        ("PNG", {}, "png"),
        ("GIF", {}, "gif"),
        ("WEBP", {}, "webp"),
        ("TIFF", {}, "tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "tiff"),
        ("BMP", {}, "bmp"),
    ],
)
def test_sniff_real_files(
    photo: Image.Image, fmt: str, options: dict[str, object], expected: str
) -> None:
    small = photo.resize((32, 24))
    assert sniff_format(encode(small, fmt, **options)) == expected


def test_sniff_big_endian_tiff_and_gif87a() -> None:
    assert sniff_format(b"MM\x00*" + b"\x00" * 28) == "tiff"
    assert sniff_format(b"II*\x00" + b"\x00" * 28) == "tiff"
    assert sniff_format(b"GIF87a" + b"\x00" * 26) == "gif"
    assert sniff_format(b"GIF89a" + b"\x00" * 26) == "gif"


def test_sniff_avif_written_by_libvips(photo: Image.Image) -> None:
    image = pyvips.Image.new_from_memory(photo.tobytes(), photo.width, photo.height, 3, "uchar")
    try:
        data = image.heifsave_buffer(compression="av1", Q=40)
    except pyvips.Error:
        pytest.skip("this libvips has no AV1 encoder")
    assert sniff_format(data) == "avif"


@pytest.mark.parametrize(
    ("brand", "expected"),
    [
        (b"avif", "avif"),
        (b"avis", "avif"),
        (b"heic", "heif"),
        (b"heix", "heif"),
        (b"mif1", "heif"),
        (b"msf1", "heif"),
        (b"isom", None),  # an MP4 video, not an image
        (b"qt  ", None),
    ],
)
def test_sniff_iso_media_brands(brand: bytes, expected: str | None) -> None:
    assert sniff_format(b"\x00\x00\x00\x1cftyp" + brand + b"\x00" * 20) == expected


def test_an_avif_that_leads_with_a_generic_brand_is_an_avif() -> None:
    """Many AVIF files name ``mif1`` first and ``avif`` among their compatible brands."""
    box = b"\x00\x00\x00\x20ftyp" + b"mif1" + b"\x00\x00\x00\x00" + b"mif1miafavifMA1B"
    assert sniff_format(box + b"\x00" * 16) == "avif"
    heic = b"\x00\x00\x00\x18ftyp" + b"mif1" + b"\x00\x00\x00\x00" + b"heicmif1"
    assert sniff_format(heic + b"\x00" * 16) == "heif"


@pytest.mark.parametrize("magic", [b"II+\x00", b"MM\x00+"], ids=["little", "big"])
def test_bigtiff_is_a_tiff(magic: bytes) -> None:
    assert sniff_format(magic + b"\x00" * 28) == "tiff"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!doctype html><html></html>",
        b'{"error": "nope"}',
        b"%PDF-1.7\n",
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        b"BM",  # too short to be a BMP header
        b"RIFF\x00\x00\x00\x00WAVEfmt ",  # RIFF, but audio
        b"\xff\xd8",  # two bytes of a JPEG marker are not enough
        b"\x89PNG",
    ],
    ids=["empty", "html", "json", "pdf", "svg", "short-bm", "wav", "ffd8", "png-prefix"],
)
def test_sniff_refuses_non_images(data: bytes) -> None:
    assert sniff_format(data) is None


# --- quality -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PHOTOS, "gray.jpg", "cmyk.jpg", "rotated.jpg"])
def test_default_halves_the_jpeg_quality(corpus: Path, name: str) -> None:
    data = (corpus / name).read_bytes()
    source = KNOWN_QUALITY[name]

    result = ok(run(data))

    assert result.format == "jpeg"
    assert result.source_quality == source
    assert result.output_quality == round(source / 2)
    assert not result.kept_source
    assert len(result.data) < len(data)
    out_quality = estimate_jpeg_quality(result.data)
    assert out_quality is not None
    assert out_quality < source
    assert abs(out_quality - result.output_quality) <= 2
    assert result.bytes_in == len(data)


@pytest.mark.parametrize(("percent", "expected"), [(100, 83), (75, 62), (20, 17), (1, 10)])
def test_quality_option_is_a_percentage_of_the_source(
    corpus: Path, percent: int, expected: int
) -> None:
    """coffee.jpg is saved at 83; the output never goes below min_output_quality (10)."""
    result = ok(run((corpus / "coffee.jpg").read_bytes(), quality=percent))

    assert result.source_quality == 83
    assert result.output_quality == expected
    if not result.kept_source:
        assert estimate_jpeg_quality(result.data) == expected


def test_min_output_quality_is_a_limit(corpus: Path) -> None:
    limits = ImageLimits(min_output_quality=30)

    result = ok(run((corpus / "coffee.jpg").read_bytes(), limits=limits, quality=10))

    assert result.output_quality == 30


@pytest.mark.parametrize("name", ["photo.png", "alpha.png"])
def test_lossless_source_counts_as_quality_100(corpus: Path, name: str) -> None:
    result = ok(run((corpus / name).read_bytes()))

    assert result.source_quality == 100
    assert result.output_quality == 50


def test_webp_source_quality_is_unknown(corpus: Path) -> None:
    result = ok(run((corpus / "photo.webp").read_bytes()))

    assert result.source_quality is None
    assert result.output_quality == 50


# --- orientation, colour, alpha ------------------------------------------------------


def test_exif_rotated_jpeg_comes_out_upright(corpus: Path) -> None:
    data = (corpus / "rotated.jpg").read_bytes()
    stored = decode(data)
    assert stored.size == (600, 400)
    assert stored.getexif().get(ORIENTATION) == 6
    upright = ImageOps.exif_transpose(stored)

    result = ok(run(data))

    assert (result.width, result.height) == (400, 600)
    out = decode(result.data)
    assert out.size == (400, 600)
    assert ORIENTATION not in out.getexif()
    # The pixels really were turned, not just relabelled.
    assert mean_difference(out, upright) < 12
    assert mean_difference(out, upright.transpose(Image.Transpose.ROTATE_180)) > 40


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("max_width", [None, 200])
def test_every_exif_orientation_is_applied(
    photo: Image.Image, orientation: int, max_width: int | None
) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(photo, "JPEG", quality=90, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(decode(data))

    result = ok(run(data, max_width=max_width))

    out = decode(result.data)
    assert out.size == (result.width, result.height)
    assert ORIENTATION not in out.getexif()
    if max_width is None:
        assert out.size == upright.size
    else:
        assert out.width == max_width
        assert abs(out.width / out.height - upright.width / upright.height) < 0.02
        upright = upright.resize(out.size)
    assert mean_difference(out, upright) < 12


def test_cmyk_jpeg_comes_out_as_srgb(corpus: Path, photo: Image.Image) -> None:
    data = (corpus / "cmyk.jpg").read_bytes()
    assert decode(data).mode == "CMYK"

    result = ok(run(data))

    out = decode(result.data)
    assert out.mode == "RGB"
    vips_out = pyvips.Image.new_from_buffer(result.data, "")
    assert vips_out.bands == 3
    assert vips_out.interpretation == "srgb"
    # Colour-managed, so not identical to the RGB original, but not inverted either.
    assert mean_difference(out, photo) < 40
    assert mean_difference(out, ImageOps.invert(photo)) > 90


def test_cmyk_jpeg_resized_comes_out_as_srgb(corpus: Path) -> None:
    result = ok(run((corpus / "cmyk.jpg").read_bytes(), max_width=300))

    assert decode(result.data).mode == "RGB"
    assert (result.width, result.height) == (300, 200)


@pytest.mark.parametrize(("max_width", "size"), [(None, (600, 400)), (300, (300, 200))])
def test_grayscale_stays_grayscale_and_decodable(
    corpus: Path, max_width: int | None, size: tuple[int, int]
) -> None:
    result = ok(run((corpus / "gray.jpg").read_bytes(), max_width=max_width))

    out = decode(result.data)
    assert out.mode == "L"
    assert out.size == (result.width, result.height) == size


def test_rgba_png_to_jpeg_is_flattened_on_white(corpus: Path, photo: Image.Image) -> None:
    data = (corpus / "alpha.png").read_bytes()
    assert decode(data).mode == "RGBA"

    result = ok(run(data, format="jpeg"))

    assert result.format == "jpeg"
    assert result.extension == "jpg"
    assert sniff_format(result.data) == "jpeg"
    out = decode(result.data)
    assert out.mode == "RGB"
    assert pyvips.Image.new_from_buffer(result.data, "").bands == 3
    # alpha 200 over white: 200/255 of the photo plus 55/255 of white.
    white = Image.new("RGB", photo.size, (255, 255, 255))
    expected = Image.blend(white, photo, 200 / 255)
    assert mean_difference(out, expected) < 12


def test_rgba_png_kept_as_png_keeps_its_alpha(corpus: Path) -> None:
    result = ok(run((corpus / "alpha.png").read_bytes()))

    assert result.format == "png"
    alpha = decode(result.data).convert("RGBA").getchannel("A")
    low, high = alpha.getextrema()
    assert 190 <= low <= high <= 210


def test_metadata_is_stripped(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x010E] = "secret image description"
    exif[0x013B] = "secret artist"
    data = encode(photo, "JPEG", quality=90, exif=exif.tobytes(), comment=b"secret comment")

    result = ok(run(data))

    assert b"secret" not in result.data
    assert len(decode(result.data).getexif()) == 0


# --- formats -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt"), [("photo.png", "png"), ("photo.webp", "webp")])
def test_png_and_webp_keep_their_format(corpus: Path, name: str, fmt: str) -> None:
    data = (corpus / name).read_bytes()

    result = ok(run(data))

    assert result.format == fmt
    assert result.extension == fmt
    assert sniff_format(result.data) == fmt
    assert decoded_size(result.data) == (result.width, result.height) == (600, 400)
    assert len(result.data) < len(data)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png", "avif"])
def test_explicit_output_format(corpus: Path, fmt: str) -> None:
    result = run((corpus / "coffee.jpg").read_bytes(), format=fmt)
    if fmt == "avif" and isinstance(result, ImageFailure):
        pytest.skip(f"this libvips cannot write AVIF: {result.message}")

    result = ok(result)

    assert pyvips.Image.new_from_buffer(result.data, "").width == 600
    if result.kept_source:
        # Never larger than the source: a palette PNG of a photo is not smaller.
        assert (fmt, result.format) == ("png", "jpeg")
        assert len(result.data) <= len((corpus / "coffee.jpg").read_bytes())
    else:
        assert result.format == fmt
        assert sniff_format(result.data) == fmt


@pytest.mark.parametrize(("fmt", "expected"), [("GIF", "png"), ("TIFF", "png"), ("BMP", "png")])
def test_other_lossless_sources_become_png(photo: Image.Image, fmt: str, expected: str) -> None:
    source = photo.convert("P") if fmt == "GIF" else photo
    result = ok(run(encode(source, fmt)))

    assert result.format == expected
    assert sniff_format(result.data) == expected
    assert decoded_size(result.data) == (600, 400)


# --- size ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_width", "max_height", "expected"),
    [
        (300, None, (300, 200)),
        (None, 100, (150, 100)),
        (300, 100, (150, 100)),
        (150, 400, (150, 100)),
        (599, None, (599, 399)),
        (600, 400, (600, 400)),
        (5000, None, (600, 400)),
        (None, 5000, (600, 400)),
        (5000, 5000, (600, 400)),
    ],
)
@pytest.mark.parametrize("name", ["coffee.jpg", "photo.webp", "gray.jpg"])
def test_max_size_fits_inside_and_never_enlarges(
    corpus: Path,
    name: str,
    max_width: int | None,
    max_height: int | None,
    expected: tuple[int, int],
) -> None:
    result = ok(run((corpus / name).read_bytes(), max_width=max_width, max_height=max_height))

    size = decoded_size(result.data)
    assert size == (result.width, result.height)
    assert size[0] <= (max_width or 600) and size[1] <= (max_height or 400)
    assert size[0] <= 600 and size[1] <= 400, "never enlarged"
    assert size == expected


@pytest.mark.parametrize(
    ("max_width", "max_height", "expected"),
    [(300, None, (300, 200)), (None, 100, (150, 100)), (5000, 5000, (600, 400))],
)
@pytest.mark.parametrize("name", ["photo.png", "alpha.png"])
def test_max_size_on_png(
    corpus: Path,
    name: str,
    max_width: int | None,
    max_height: int | None,
    expected: tuple[int, int],
) -> None:
    result = ok(run((corpus / name).read_bytes(), max_width=max_width, max_height=max_height))

    assert result.format == "png"
    assert decoded_size(result.data) == (result.width, result.height) == expected


def test_max_width_on_a_rotated_jpeg_uses_the_displayed_size(corpus: Path) -> None:
    # Displayed 400x600: a bound of 500 wide does not shrink it, 300 high does.
    data = (corpus / "rotated.jpg").read_bytes()

    assert decoded_size(ok(run(data, max_width=500)).data) == (400, 600)
    assert decoded_size(ok(run(data, max_height=300)).data) == (200, 300)


# --- failures ------------------------------------------------------------------------


@pytest.mark.parametrize("max_width", [None, 100])
def test_truncated_jpeg_is_corrupt(corpus: Path, max_width: int | None) -> None:
    failure = failed(run((corpus / "truncated.jpg").read_bytes(), max_width=max_width))

    assert failure.code == ErrorCode.CORRUPT_IMAGE
    assert not failure.is_transient


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_truncated_files_of_other_formats_are_corrupt(photo: Image.Image, fmt: str) -> None:
    source = photo.convert("P") if fmt == "GIF" else photo
    full = encode(source, fmt)

    failure = failed(run(full[: len(full) // 3]))

    assert failure.code == ErrorCode.CORRUPT_IMAGE


def test_truncated_tiff_is_corrupt(photo: Image.Image) -> None:
    full = encode(photo, "TIFF")

    failure = failed(run(full[: len(full) // 3]))

    assert failure.code == ErrorCode.CORRUPT_IMAGE


def test_empty_source_is_corrupt(corpus: Path) -> None:
    failure = failed(run((corpus / "empty.jpg").read_bytes()))

    assert failure.code == ErrorCode.CORRUPT_IMAGE
    assert "empty" in failure.message


def test_jpeg_magic_followed_by_junk_is_corrupt() -> None:
    failure = failed(run(b"\xff\xd8\xff" + b"\x00" * 200))

    assert failure.code == ErrorCode.CORRUPT_IMAGE


def test_html_is_unsupported(corpus: Path) -> None:
    failure = failed(run((corpus / "page.jpg").read_bytes()))

    assert failure.code == ErrorCode.UNSUPPORTED_FORMAT
    assert not failure.is_transient
    assert "HTML" in failure.message


@pytest.mark.parametrize(
    "body",
    [
        b"404 Not Found\n",
        b"\xef\xbb\xbf<!DOCTYPE html><html></html>",
        b"Access denied: \xc3\xa9",
        b"<html>\xc2\xa0&nbsp;\xe2\x80\x8b\x0c</html>",
    ],
    ids=["plain-text", "html-with-bom", "utf8-text", "html-with-nbsp-and-form-feed"],
)
def test_a_text_body_is_named_as_text(body: bytes) -> None:
    failure = failed(run(body))

    assert failure.code == ErrorCode.UNSUPPORTED_FORMAT
    assert "HTML or text" in failure.message, failure.message


def test_binary_junk_is_not_called_text() -> None:
    assert "not a known image" in failed(run(bytes(range(256)) * 4)).message


@pytest.mark.parametrize(
    "data", [b"%PDF-1.4\n%...", b'<svg xmlns="http://www.w3.org/2000/svg"/>'], ids=["pdf", "svg"]
)
def test_documents_are_unsupported(data: bytes) -> None:
    assert failed(run(data)).code == ErrorCode.UNSUPPORTED_FORMAT


def test_pixel_bomb_is_refused(corpus: Path) -> None:
    failure = failed(run((corpus / "bomb.png").read_bytes()))

    assert failure.code == ErrorCode.TOO_MANY_PIXELS
    assert not failure.is_transient


@pytest.mark.parametrize(("width", "height"), [(8_000, 8_000), (20_000, 20_000)])
def test_a_bmp_bomb_is_too_many_pixels_at_any_size(width: int, height: int) -> None:
    """Past about 179 MP Pillow refuses to open a BMP; it is still too many pixels."""
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    data = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + header

    failure = failed(run(data))

    assert failure.code == ErrorCode.TOO_MANY_PIXELS, failure.message
    assert f"{width}x{height}" in failure.message


def test_a_jpeg_wider_than_libjpeg_takes_is_too_many_pixels(photo: Image.Image) -> None:
    """65,535 pixels wide: the header says too many before libvips says undecodable."""
    data = bytearray(encode(photo.resize((16, 16)), "JPEG"))
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", 1_000, 65_535)  # height, width

    failure = failed(run(bytes(data)))

    assert failure.code == ErrorCode.TOO_MANY_PIXELS, failure.message


def test_pixel_limit_is_configurable(corpus: Path) -> None:
    data = (corpus / "coffee.jpg").read_bytes()  # 600x400 = 240 000 pixels

    assert failed(run(data, limits=ImageLimits(max_pixels=239_999))).code == (
        ErrorCode.TOO_MANY_PIXELS
    )
    assert ok(run(data, limits=ImageLimits(max_pixels=240_000))).width == 600


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_frame_limit_refuses_long_animations(photo: Image.Image, fmt: str) -> None:
    frames = [photo.rotate(angle).convert("P" if fmt == "GIF" else "RGB") for angle in range(5)]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = out.getvalue()

    failure = failed(run(data, limits=ImageLimits(max_frames=4)))
    assert failure.code == ErrorCode.TOO_MANY_PIXELS
    assert "5 frames" in failure.message
    first = ok(run(data, limits=ImageLimits(max_frames=5)))
    assert (first.width, first.height) == photo.size, "only the first frame, as a still"


def test_an_animated_png_counts_its_frames_and_keeps_only_the_first() -> None:
    frames = [Image.new("RGB", (32, 24), (40 * index, 0, 0)) for index in range(5)]
    out = io.BytesIO()
    frames[0].save(out, "PNG", save_all=True, append_images=frames[1:], duration=100)
    data = out.getvalue()
    assert b"acTL" in data

    failure = failed(run(data, limits=ImageLimits(max_frames=4)))
    first = ok(run(data, limits=ImageLimits(max_frames=5), quality=100))

    assert failure.code == ErrorCode.TOO_MANY_PIXELS and "5 frames" in failure.message
    assert b"acTL" not in first.data and b"fdAT" not in first.data, "a still, kept or not"
    assert getattr(decode(first.data), "n_frames", 1) == 1


def test_an_animated_webp_is_never_kept_whole(photo: Image.Image) -> None:
    frames = [photo.resize((32, 24)).rotate(angle) for angle in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=5)
    data = out.getvalue()

    result = ok(run(data, quality=100))

    assert not result.kept_source
    assert getattr(decode(result.data), "n_frames", 1) == 1


def test_expired_deadline_is_a_timeout(corpus: Path) -> None:
    failure = failed(run((corpus / "coffee.jpg").read_bytes(), deadline=time.monotonic() - 1))

    assert failure.code == ErrorCode.TIMEOUT
    assert failure.is_transient


# --- never larger --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_jpeg(photo: Image.Image) -> bytes:
    """16x16 at quality 10 with optimised Huffman tables: libvips cannot beat it."""
    return encode(photo.resize((16, 16)), "JPEG", quality=10, optimize=True)


def test_source_is_kept_when_reencoding_is_not_smaller(tiny_jpeg: bytes) -> None:
    result = ok(run(tiny_jpeg))

    assert result.kept_source
    assert result.data == tiny_jpeg
    assert result.format == "jpeg"
    assert (result.width, result.height) == (16, 16)
    assert result.bytes_in == len(tiny_jpeg)
    assert result.source_quality == 10


def test_source_is_not_kept_when_a_change_was_asked(tiny_jpeg: bytes) -> None:
    """The source cannot stand in for an output of another format or size."""
    as_png = ok(run(tiny_jpeg, format="png"))
    smaller = ok(run(tiny_jpeg, max_width=8))

    assert not as_png.kept_source
    assert sniff_format(as_png.data) == "png"
    assert not smaller.kept_source
    assert decoded_size(smaller.data) == (8, 8)


def _bmp_with_alpha(width: int, height: int, left: bytes, right: bytes) -> bytes:
    """A 32-bit BMP with an alpha mask (BITMAPV4 header), ``left`` and ``right`` BGRA."""
    row = left * (width // 2) + right * (width - width // 2)
    pixels = row * height
    header = struct.pack(
        "<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(pixels), 2835, 2835, 0, 0
    )
    header += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header += b"BGRs" + bytes(48)
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_bmp_keeps_its_colours_its_alpha_and_its_greyness(mode: str) -> None:
    """The left half transparent (RGBA), red on the right; grey stays one channel."""
    if mode == "RGBA":
        data = _bmp_with_alpha(64, 32, left=bytes([255, 0, 0, 0]), right=bytes([0, 0, 200, 255]))
    else:
        data = encode(Image.new(mode, (64, 32), (200, 0, 0) if mode == "RGB" else 90), "BMP")
    assert Image.open(io.BytesIO(data)).mode == mode

    as_png = decode(ok(run(data)).data)
    as_jpeg = decode(ok(run(data, format="jpeg")).data)

    if mode == "L":
        assert as_png.mode in ("L", "P") and as_jpeg.mode == "L"
        assert abs(as_jpeg.getpixel((48, 16)) - 90) <= 3
        return
    right = as_png.convert("RGBA").getpixel((48, 16))
    assert right[3] == 255 and right[0] > 180, right
    assert abs(as_jpeg.convert("RGB").getpixel((48, 16))[0] - 200) <= 8
    if mode == "RGBA":
        assert as_png.convert("RGBA").getpixel((8, 16))[3] == 0, "transparent stays transparent"
        assert as_jpeg.convert("RGB").getpixel((8, 16)) > (245, 245, 245), "flattened on white"


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_another_format_is_stored_even_when_larger_than_the_source(fmt: str) -> None:
    """Noise at JPEG quality 10 grows as a PNG or as WebP at quality 100: the format
    asked for is still what is stored, not the smaller source."""
    noise = encode(Image.effect_noise((128, 128), 90).convert("RGB"), "JPEG", quality=10)

    result = ok(run(noise, format=fmt, quality=100))

    assert len(result.data) > len(noise), "the premise: this encoding is larger"
    assert not result.kept_source
    assert result.format == fmt
    assert sniff_format(result.data) == fmt


def test_output_is_never_larger_than_the_source_when_nothing_else_changes(
    corpus: Path, tiny_jpeg: bytes
) -> None:
    names = [*PHOTOS, "gray.jpg", "cmyk.jpg", "rotated.jpg", "photo.png", "photo.webp"]
    sources = [(corpus / name).read_bytes() for name in names] + [tiny_jpeg]
    for data in sources:
        for percent in (50, 100):
            result = ok(run(data, quality=percent))
            assert len(result.data) <= len(data)
