"""Kept sources lose their metadata, not their pixels nor their orientation."""

from __future__ import annotations

import io
import struct
import time

import pyvips
from PIL import Image, PngImagePlugin

from pixelmill.domain import ProcessingOptions
from pixelmill.imaging.ops import EncodedImage, ImageLimits, process_image
from pixelmill.imaging.strip import strip_jpeg, strip_png, without_metadata


def _tiny_jpeg_with_metadata(orientation: int = 1) -> bytes:
    """A small low-quality JPEG that re-encoding cannot shrink, full of metadata."""
    image = Image.effect_noise((64, 48), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "SecretCam"  # camera make
    exif[0x9286] = "GPS 51.5N 0.1W"  # user comment
    out = io.BytesIO()
    image.save(
        out,
        "JPEG",
        quality=20,
        optimize=True,
        progressive=True,
        exif=exif.tobytes(),
        comment=b"private note",
    )
    return out.getvalue()


def _pixels(data: bytes) -> bytes:
    return bytes(pyvips.Image.new_from_buffer(data, "").autorot().write_to_memory())


def test_jpeg_metadata_is_removed_and_pixels_are_untouched() -> None:
    source = _tiny_jpeg_with_metadata()
    stripped = strip_jpeg(source)
    assert stripped is not None and len(stripped) < len(source)
    for secret in (b"SecretCam", b"GPS 51.5N", b"private note", b"Exif"):
        assert secret in source and secret not in stripped
    assert _pixels(stripped) == _pixels(source)


def test_jpeg_orientation_survives_alone() -> None:
    source = _tiny_jpeg_with_metadata(orientation=6)
    stripped = strip_jpeg(source, orientation=6)
    assert stripped is not None and b"SecretCam" not in stripped
    with Image.open(io.BytesIO(stripped)) as image:
        assert image.getexif()[0x0112] == 6
    assert _pixels(stripped) == _pixels(source)
    assert pyvips.Image.new_from_buffer(stripped, "").autorot().width == 48


def test_png_text_chunks_are_removed() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Someone Private")
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, "PNG", pnginfo=info)
    source = out.getvalue()
    stripped = strip_png(source)
    assert stripped is not None and b"Someone Private" not in stripped
    assert _pixels(stripped) == _pixels(source)


def test_unwalkable_data_is_not_kept() -> None:
    assert strip_jpeg(b"\xff\xd8\x00garbage") is None
    assert strip_png(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xffIHDR") is None
    assert without_metadata(b"GIF89a....", "gif") is None


def test_kept_source_carries_no_metadata() -> None:
    source = _tiny_jpeg_with_metadata(orientation=6)
    options = ProcessingOptions(quality=100)  # same quality: re-encoding cannot win
    result = process_image(source, options, ImageLimits(), time.monotonic() + 30)
    assert isinstance(result, EncodedImage) and result.kept_source
    assert b"SecretCam" not in result.data and b"private note" not in result.data
    assert (result.width, result.height) == (48, 64), "displayed size, orientation applied"
    assert len(result.data) < len(source)


def _webp(exif: bytes | None = None) -> bytes:
    image = Image.effect_noise((32, 24), 60).convert("RGB")
    out = io.BytesIO()
    image.save(out, "WEBP", quality=30, **({"exif": exif} if exif else {}))
    return out.getvalue()


def test_a_webp_without_metadata_is_kept_as_it_is() -> None:
    source = _webp()
    assert without_metadata(source, "webp") == source


def test_a_webp_with_exif_is_never_kept() -> None:
    """WebP's metadata chunks cannot be dropped without rewriting its headers."""
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    source = _webp(exif.tobytes())
    assert b"SecretCam" in source
    assert without_metadata(source, "webp") is None


def test_a_rotated_png_or_webp_and_any_avif_are_never_kept() -> None:
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    assert without_metadata(png.getvalue(), "png", orientation=6) is None
    assert without_metadata(_webp(), "webp", orientation=3) is None
    avif = pyvips.Image.black(8, 8).heifsave_buffer(compression="av1")
    assert without_metadata(avif, "avif") is None


def _progressive_noise(exif: bytes | None = None) -> bytes:
    image = Image.effect_noise((96, 64), 60).convert("RGB")
    out = io.BytesIO()
    extra = {"exif": exif} if exif else {}
    image.save(out, "JPEG", quality=40, progressive=True, optimize=True, **extra)
    return out.getvalue()


def _gps_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    return exif.tobytes()


def test_an_image_appended_after_the_end_marker_goes_with_its_exif() -> None:
    """Cameras and phones append preview images (multi-picture files, motion photos)
    after the main image's end marker, each with its own EXIF and GPS."""
    main = _progressive_noise()
    preview = io.BytesIO()
    Image.effect_noise((16, 16), 60).convert("RGB").save(preview, "JPEG", exif=_gps_exif())
    source = main + preview.getvalue()

    stripped = strip_jpeg(source)

    assert stripped is not None
    assert b"SecretCam" not in stripped and b"Exif\x00\x00" not in stripped
    assert stripped.endswith(b"\xff\xd9") and stripped.count(b"\xff\xd8") == 1
    assert _pixels(stripped) == _pixels(main)


def test_metadata_between_the_scans_of_a_progressive_jpeg_goes_too() -> None:
    source = _progressive_noise()
    second_scan = source.find(b"\xff\xda", source.find(b"\xff\xda") + 2)
    comment = b"home address"
    exif = _gps_exif()  # Pillow's EXIF bytes start with the APP1 signature
    inserted = (
        b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    )  # fmt: skip
    source = source[:second_scan] + inserted + source[second_scan:]

    stripped = strip_jpeg(source)

    assert stripped is not None
    assert comment not in stripped and b"SecretCam" not in stripped
    assert _pixels(stripped) == _pixels(source)
    assert len(stripped) == len(source) - len(inserted)


def test_a_png_without_its_end_chunk_is_kept_as_it_came() -> None:
    """Decoders show a PNG that stops after its image data; never larger still holds."""
    image = Image.effect_noise((64, 64), 60).convert("P", palette=Image.Palette.ADAPTIVE)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    without_end = out.getvalue()[:-12]

    result = process_image(without_end, ProcessingOptions(), ImageLimits(), time.monotonic() + 30)

    assert isinstance(result, EncodedImage)
    assert len(result.data) <= len(without_end)
    assert strip_png(without_end) == without_end
    assert strip_png(without_end[:-5]) is None, "cut inside a chunk: not kept"


def test_a_jpeg_with_stray_bytes_before_a_marker_has_its_quality_read() -> None:
    """libjpeg skips such bytes with a warning; the header walk does too."""
    clean = _progressive_noise()
    tables = clean.find(b"\xff\xdb")
    source = clean[:tables] + b"\x00\x00" + clean[tables:]

    result = process_image(source, ProcessingOptions(), ImageLimits(), time.monotonic() + 30)

    assert isinstance(result, EncodedImage)
    assert result.source_quality == 40 and result.output_quality == 20
    assert len(result.data) <= len(source)


def test_fill_bytes_before_a_marker_are_walked_through() -> None:
    """Any number of 0xFF fill bytes may stand before a marker, in the header and after
    the scan data alike; the stripped file decodes to the same pixels."""
    source = _progressive_noise(_gps_exif())
    end = len(source) - 2
    tables = source.find(b"\xff\xdb")
    padded = (
        source[:tables]
        + b"\xff" * 100_000
        + source[tables:end]
        + b"\xff" * 1_000_000
        + source[end:]
    )

    stripped = strip_jpeg(padded)

    assert stripped is not None and b"SecretCam" not in stripped
    assert _pixels(stripped) == _pixels(source)
