"""Decode, transform and encode one image: a pipeline of small named steps.

libvips does every kind of image. The common case, an upright JPEG in sRGB or grey
that stays a JPEG of the same size, takes a shorter road through simplejpeg's
libjpeg-turbo, whose decoder and encoder need a third less CPU than those libvips is
built with (docs/decisions.md); its output is what libvips would write, as a smaller
file of the same pixels.

Everything here is CPU work and runs in a thread pool (both libraries release the GIL).
The deadline is checked between steps; failures come back as :class:`ImageFailure`
values. See docs/imaging.md for what "50% quality" means for each format.
"""

from __future__ import annotations

import io
import struct
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import pyvips
import simplejpeg
from PIL import Image

from pixelmill.domain import ErrorCode, ImageFailure, ProcessingOptions
from pixelmill.imaging import jpeg
from pixelmill.imaging.quality import estimate_from_tables
from pixelmill.imaging.strip import png_frames, without_metadata

LOSSLESS_SOURCES = frozenset({"png", "gif", "tiff", "bmp"})
_KEEP_FORMAT = {
    "jpeg": "jpeg",
    "webp": "webp",
    "png": "png",
    "avif": "avif",
    "heif": "avif",
    "gif": "png",
    "tiff": "png",
    "bmp": "png",
}
_FORMATS_WITH_ALPHA = frozenset({"png", "webp", "avif"})
_HEIF_BRANDS = {
    b"avif": "avif",
    b"avis": "avif",
    b"heic": "heif",
    b"heix": "heif",
    b"heim": "heif",
    b"heis": "heif",
    b"mif1": "heif",
    b"msf1": "heif",
}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on decoding."""

    max_pixels: int = 50_000_000
    min_output_quality: int = 10
    max_frames: int = 1000


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of a processed image and what they hold."""

    data: bytes
    format: str
    width: int
    height: int
    bytes_in: int
    source_quality: int | None
    output_quality: int | None
    kept_source: bool

    @property
    def extension(self) -> str:
        return {"jpeg": "jpg"}.get(self.format, self.format)


class _Failed(Exception):
    def __init__(self, failure: ImageFailure) -> None:
        self.failure = failure


def _fail(code: ErrorCode, message: str) -> _Failed:
    return _Failed(ImageFailure(code, message))


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes of ``data``, or None."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # TIFF, BigTIFF
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[4:8] == b"ftyp":
        return _heif_kind(data)
    return None


def _heif_kind(data: bytes) -> str | None:
    """``avif`` or ``heif`` from the brands of an ISO-BMFF file-type box: AVIF when it
    names an AVIF brand among its compatible ones too (many AVIF files lead with
    ``mif1``), otherwise what its major brand says."""
    size = min(int.from_bytes(data[:4], "big"), 256, len(data))
    compatible = {data[i : i + 4] for i in range(16, size - 3, 4)}
    brands = {_HEIF_BRANDS.get(brand) for brand in compatible | {data[8:12]}}
    if "avif" in brands:
        return "avif"
    return _HEIF_BRANDS.get(data[8:12])


def _looks_like_text(data: bytes) -> bool:
    """Whether the start of a body reads as text (an HTML page, JSON, ``404 Not Found``):
    UTF-8, a byte-order mark allowed, with no control character but line breaks, tabs
    and form feeds."""
    sample = data[:512].removeprefix(b"\xef\xbb\xbf")
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # not just a character cut off by the sample
            return False
        text = sample[: exc.start].decode("utf-8")
    return bool(text) and not any(
        unicodedata.category(character) == "Cc" and character not in "\r\n\t\f"
        for character in text
    )


def _check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise _fail(ErrorCode.TIMEOUT, "processing took longer than the time limit")


def _step_sniff(data: bytes) -> str:
    if not data:
        raise _fail(ErrorCode.CORRUPT_IMAGE, "the source is empty (0 bytes)")
    source_format = sniff_format(data)
    if source_format is None:
        what = "HTML or text" if _looks_like_text(data) else "not a known image"
        raise _fail(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"the source is {what} (first bytes {data[:8]!r}); "
            "expected JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF or HEIF",
        )
    return source_format


def _fail_on(source_format: str) -> str:
    """How strict decoding is: JPEGs often carry harmless warnings, but libvips reports
    a TIFF with missing strips only as a warning, so TIFF fails on any error."""
    return "error" if source_format == "tiff" else "truncated"


def _load(data: bytes, source_format: str, limits: ImageLimits) -> pyvips.Image:
    """Open ``data`` lazily (header only; pixels are decoded when needed)."""
    if source_format == "bmp":
        return _load_with_pillow(data, limits)
    try:
        return pyvips.Image.new_from_buffer(
            data, "", access="sequential", fail_on=_fail_on(source_format)
        )
    except pyvips.Error as exc:
        reason = _vips_reason(exc)
        if source_format == "heif":
            # The bundled libvips reads AVIF but not every HEIF codec (HEVC).
            raise _fail(
                ErrorCode.UNSUPPORTED_FORMAT, f"this HEIF variant cannot be decoded: {reason}"
            ) from None
        raise _fail(
            ErrorCode.CORRUPT_IMAGE, f"cannot decode the {source_format}: {reason}"
        ) from None


def _load_with_pillow(data: bytes, limits: ImageLimits) -> pyvips.Image:
    """BMP, which libvips reads only through ImageMagick, decoded by Pillow instead:
    grey stays grey, and alpha stays alpha (marked as such for the steps that follow)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise _too_many_pixels(width, height, limits)
            image.load()
            bands = image.getbands()
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                image.mode == "P" and _palette_is_grey(image)
            )
            mode = ("LA" if grey else "RGBA") if "A" in bands else ("L" if grey else "RGB")
            pixels = image.convert(mode)
    except Image.DecompressionBombError:
        # Pillow's own guard, past about 179 MP, refuses before the check above.
        width, height = _bmp_size(data)
        if width * height > limits.max_pixels:
            raise _too_many_pixels(width, height, limits) from None
        raise _fail(
            ErrorCode.CORRUPT_IMAGE,
            f"a {width}x{height} BMP is larger than its decoder (Pillow) opens",
        ) from None
    except _Failed:
        raise
    except Exception as exc:
        raise _fail(ErrorCode.CORRUPT_IMAGE, f"cannot decode the bmp: {exc}") from None
    loaded = pyvips.Image.new_from_memory(
        pixels.tobytes(), pixels.width, pixels.height, len(mode), "uchar"
    )
    return loaded.copy(interpretation="b-w" if grey else "srgb")


def _bmp_size(data: bytes) -> tuple[int, int]:
    """Width and height from a BMP's header (a bottom-up image has a negative height)."""
    if int.from_bytes(data[14:18], "little") == 12:  # the old OS/2 header: 16-bit sides
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)


def _palette_is_grey(image: Image.Image) -> bool:
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


def _vips_reason(exc: pyvips.Error) -> str:
    detail = (exc.detail or str(exc)).strip().splitlines()
    return detail[-1] if detail else "unknown error"


def _too_many_pixels(width: int, height: int, limits: ImageLimits) -> _Failed:
    return _fail(
        ErrorCode.TOO_MANY_PIXELS,
        f"{width}x{height} is {width * height / 1e6:.1f} MP; "
        f"the limit is {limits.max_pixels / 1e6:.1f} MP",
    )


def _step_check_pixels(image: pyvips.Image, data: bytes, limits: ImageLimits) -> None:
    if image.width * image.height > limits.max_pixels:
        raise _too_many_pixels(image.width, image.height, limits)
    # Only the first frame is decoded, but a source of countless frames is still refused.
    frames = int(image.get("n-pages")) if image.get_typeof("n-pages") else 1
    frames = max(frames, png_frames(data))  # libvips does not count an animated PNG's
    if frames > limits.max_frames:
        raise _fail(
            ErrorCode.TOO_MANY_PIXELS,
            f"the source has {frames} frames; the limit is {limits.max_frames}",
        )


def _orientation(image: pyvips.Image) -> int:
    return int(image.get("orientation")) if image.get_typeof("orientation") else 1


def _oriented_size(image: pyvips.Image) -> tuple[int, int]:
    if _orientation(image) in (5, 6, 7, 8):
        return image.height, image.width
    return image.width, image.height


def _step_decode(
    data: bytes, source_format: str, image: pyvips.Image, options: ProcessingOptions
) -> pyvips.Image:
    """Decode with EXIF orientation applied and, when asked, shrunk to fit (never enlarged)."""
    width, height = _oriented_size(image)
    max_w = options.max_width or width
    max_h = options.max_height or height
    if (max_w < width or max_h < height) and source_format != "bmp":
        try:
            return pyvips.Image.thumbnail_buffer(
                data,
                max_w,
                height=max_h,
                size="down",
                option_string=f"fail_on={_fail_on(source_format)}",
            )
        except pyvips.Error as exc:
            raise _fail(ErrorCode.CORRUPT_IMAGE, f"cannot decode: {_vips_reason(exc)}") from None
    if max_w < width or max_h < height:
        scale = min(max_w / width, max_h / height)
        return image.resize(scale)
    return image.autorot()


def _step_to_srgb(image: pyvips.Image) -> pyvips.Image:
    """CMYK, Lab, 16-bit and other encodings to 8-bit sRGB (or grey)."""
    interpretation = image.interpretation
    if interpretation == "cmyk":
        profile: dict[str, Any] = (
            {"embedded": True}
            if image.get_typeof("icc-profile-data")
            else {"input_profile": "cmyk"}
        )
        return image.icc_transform("srgb", **profile)
    if interpretation in ("b-w", "grey16"):
        return image.colourspace("b-w") if image.format != "uchar" else image
    if interpretation not in ("srgb",) or image.format != "uchar":
        return image.colourspace("srgb")
    return image


def _step_flatten(image: pyvips.Image, output_format: str) -> pyvips.Image:
    if image.hasalpha() and output_format not in _FORMATS_WITH_ALPHA:
        return image.flatten(background=[255] * (image.bands - 1))
    return image


def _output_format(source_format: str, options: ProcessingOptions) -> str:
    return _KEEP_FORMAT[source_format] if options.format == "keep" else options.format


def _qualities(
    jpeg_header: jpeg.JpegHeader | None,
    source_format: str,
    options: ProcessingOptions,
    limits: ImageLimits,
) -> tuple[int | None, int]:
    """(source quality, output quality); an unknown source quality counts as 100."""
    source_quality = estimate_from_tables(jpeg_header.quant_tables) if jpeg_header else None
    if source_format in LOSSLESS_SOURCES:
        source_quality = 100
    return source_quality, _output_quality(source_quality, options, limits)


def _output_quality(
    source_quality: int | None, options: ProcessingOptions, limits: ImageLimits
) -> int:
    output_quality = round((source_quality or 100) * options.quality / 100)
    return min(100, max(limits.min_output_quality, output_quality))


def _step_encode(image: pyvips.Image, output_format: str, quality: int) -> bytes:
    try:
        if output_format == "jpeg":
            return image.jpegsave_buffer(Q=quality, keep="icc")
        if output_format == "webp":
            return image.webpsave_buffer(Q=quality, keep="icc")
        if output_format == "avif":
            return image.heifsave_buffer(Q=quality, compression="av1", keep="icc")
        return image.pngsave_buffer(palette=True, Q=quality, keep="icc", compression=6)
    except pyvips.Error as exc:
        # Pixels are decoded lazily, so a truncated source surfaces here.
        raise _fail(ErrorCode.CORRUPT_IMAGE, f"cannot decode: {_vips_reason(exc)}") from None


def process_image(
    data: bytes, options: ProcessingOptions, limits: ImageLimits, deadline: float
) -> EncodedImage | ImageFailure:
    """Run the whole pipeline on the bytes of one source image."""
    try:
        source_format = _step_sniff(data)
        jpeg_header = jpeg.read_header(data) if source_format == "jpeg" else None
        if jpeg_header and jpeg_header.width * jpeg_header.height > limits.max_pixels:
            # Before libvips, which refuses sides over 65,500 as undecodable.
            raise _too_many_pixels(jpeg_header.width, jpeg_header.height, limits)
        if jpeg_header and takes_the_jpeg_road(jpeg_header, options):
            fast = _jpeg_to_jpeg(data, jpeg_header, options, limits, deadline)
            if fast is not None:
                return fast
        header = _load(data, source_format, limits)
        _step_check_pixels(header, data, limits)
        _check_deadline(deadline)
        source_quality, output_quality = _qualities(jpeg_header, source_format, options, limits)
        output_format = _output_format(source_format, options)
        image = _step_decode(data, source_format, header, options)
        image = _step_to_srgb(image)
        image = _step_flatten(image, output_format)
        _check_deadline(deadline)
        encoded = _step_encode(image, output_format, output_quality)
        _check_deadline(deadline)
        return _never_larger(
            data, source_format, _orientation(header), _oriented_size(header),
            (image.width, image.height), encoded, output_format,
            source_quality, output_quality,
        )  # fmt: skip
    except _Failed as failed:
        return failed.failure


# The frames simplejpeg's decoder takes as libvips does: baseline, extended and progressive
# Huffman-coded. Arithmetic-coded, lossless and hierarchical JPEGs go through libvips.
_PLAIN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_YCBCR = 1  # the Adobe APP14 transform of YCbCr data
# simplejpeg decodes a whole image into memory (3 bytes a pixel); libvips streams a larger
# one in strips, so that the memory of an image in flight stays bounded.
_WHOLE_DECODE_MAX_PIXELS = 25_000_000


def takes_the_jpeg_road(header: jpeg.JpegHeader, options: ProcessingOptions) -> bool:
    """Whether a JPEG goes through simplejpeg rather than libvips.

    8-bit grey or YCbCr, upright, whole (it ends with its EOI marker: a truncated file
    goes to libvips, which refuses it), at most 25 MP, to stay a JPEG and not to be
    shrunk.
    """
    return (
        options.format in ("keep", "jpeg")
        and header.frame in _PLAIN_FRAMES
        and header.precision == 8
        and header.orientation == 1
        and header.ends_with_eoi
        and header.components in (1, 3)
        and (header.components == 1 or header.adobe_transform in (None, _YCBCR))
        and header.width * header.height <= _WHOLE_DECODE_MAX_PIXELS
        and (options.max_width or header.width) >= header.width
        and (options.max_height or header.height) >= header.height
    )


def _jpeg_to_jpeg(
    data: bytes,
    header: jpeg.JpegHeader,
    options: ProcessingOptions,
    limits: ImageLimits,
    deadline: float,
) -> EncodedImage | None:
    """Decode and encode with simplejpeg; None to hand the image to libvips (a file
    simplejpeg cannot decode, so that libvips says what is wrong with it)."""
    _check_deadline(deadline)
    source_quality = estimate_from_tables(header.quant_tables)
    output_quality = _output_quality(source_quality, options, limits)
    # Pixels go straight back to the encoder, so any channel order does: RGB.
    colour = "GRAY" if header.components == 1 else "RGB"
    try:
        # Strict: corrupt data is refused rather than decoded with holes.
        pixels = simplejpeg.decode_jpeg(data, colorspace=colour, strict=True)
    except ValueError:
        return None
    if pixels.shape[:2] != (header.height, header.width):
        return None
    _check_deadline(deadline)
    # As libvips does by default: chroma subsampled below quality 90, not from 90 up.
    subsampled = "444" if output_quality >= 90 else "420"
    sampling = "Gray" if colour == "GRAY" else subsampled
    try:
        encoded = simplejpeg.encode_jpeg(
            pixels, output_quality, colorspace=colour, colorsubsampling=sampling
        )
    except ValueError:
        return None
    _check_deadline(deadline)
    # The encoder writes no metadata; the colour profile is kept, as libvips keeps it:
    # only when it fits the pixels (a grey profile on grey, an RGB one on colour).
    fits = jpeg.icc_colour_space(header.icc_segments) == (b"GRAY" if colour == "GRAY" else b"RGB ")
    output = jpeg.with_segments(encoded, header.icc_segments if fits else ())
    size = (header.width, header.height)
    return _never_larger(
        data, "jpeg", 1, size, size, output, "jpeg", source_quality, output_quality,
        kept_at_least=len(data) - header.scan_start,
    )  # fmt: skip


def _never_larger(
    data: bytes,
    source_format: str,
    orientation: int,
    source_size: tuple[int, int],
    output_size: tuple[int, int],
    encoded: bytes,
    output_format: str,
    source_quality: int | None,
    output_quality: int,
    kept_at_least: int = 0,
) -> EncodedImage:
    """Keep the source (metadata stripped) when re-encoding would not make it smaller.

    ``source_size`` is the source's size upright, ``output_size`` the encoded image's.
    ``kept_at_least`` is a size no stripped source can be under (its image data): an
    encoding smaller than that needs no stripped copy to compare with.
    The stripped source is compared with the re-encoded image, so an output is never
    larger than the source except where stripping is impossible (below).

    Not when another format was asked for, nor when the source had to be shrunk to fit
    the size bounds, nor for formats whose metadata cannot be removed losslessly (GIF,
    TIFF, BMP, HEIF, WebP with EXIF/XMP).
    A JPEG keeps its EXIF orientation, alone, so it is still displayed upright.
    """
    source_fits = (
        output_format == source_format
        and output_size == source_size
        and len(encoded) >= kept_at_least
    )
    kept = without_metadata(data, source_format, orientation) if source_fits else None
    if kept is not None and len(kept) <= len(encoded):
        return EncodedImage(
            kept, source_format, *source_size, len(data),
            source_quality, source_quality, kept_source=True,
        )  # fmt: skip
    return EncodedImage(
        encoded, output_format, *output_size, len(data),
        source_quality, output_quality, kept_source=False,
    )  # fmt: skip
