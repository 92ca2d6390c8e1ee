"""Reading JPEG headers without decoding, and the short road of JPEG to JPEG."""

from __future__ import annotations

import dataclasses
import io
import time

import pytest
import pyvips
import simplejpeg
from PIL import Image, ImageChops, ImageCms, ImageStat, JpegImagePlugin

from pixelmill.domain import ProcessingOptions
from pixelmill.imaging import jpeg
from pixelmill.imaging.ops import (
    EncodedImage,
    ImageLimits,
    process_image,
    takes_the_jpeg_road,
)
from pixelmill.imaging.strip import orientation_segment
from tests.support.images import SAMPLES


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(SAMPLES / "coffee.jpg") as image:
        return image.convert("RGB")


def save(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def with_app1(data: bytes, segment: bytes) -> bytes:
    return data[:2] + segment + data[2:]


def srgb_profile() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return bytes(profile.tobytes())


def processed(data: bytes, **options: object) -> EncodedImage:
    result = process_image(
        data,
        ProcessingOptions(**options),  # type: ignore[arg-type]
        ImageLimits(),
        time.monotonic() + 30,
    )
    assert isinstance(result, EncodedImage), result
    return result


def mean_difference(a: bytes, b: bytes) -> float:
    with Image.open(io.BytesIO(a)) as first, Image.open(io.BytesIO(b)) as second:
        assert first.size == second.size
        difference = ImageChops.difference(first.convert("RGB"), second.convert("RGB"))
        channels = ImageStat.Stat(difference).mean
    return sum(channels) / len(channels)


# --- the header ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "options", "components", "frame"),
    [
        ("RGB", {}, 3, 0xC0),
        ("L", {}, 1, 0xC0),
        ("RGB", {"progressive": True}, 3, 0xC2),
        ("CMYK", {}, 4, 0xC0),
    ],
    ids=["colour", "grey", "progressive", "cmyk"],
)
def test_the_header_says_what_pillow_reads(
    photo: Image.Image, mode: str, options: dict[str, object], components: int, frame: int
) -> None:
    data = save(photo.convert(mode), quality=73, **options)

    header = jpeg.read_header(data)

    assert header is not None
    with Image.open(io.BytesIO(data)) as image:
        assert (header.width, header.height) == image.size
        assert header.quant_tables == {k: tuple(v) for k, v in image.quantization.items()}
    assert header.components == components
    assert header.frame == frame
    assert header.precision == 8
    assert header.orientation == 1
    assert header.icc_segments == ()
    assert header.ends_with_eoi
    assert header.adobe_transform == (0 if mode == "CMYK" else None)  # Adobe: CMYK as is
    assert data[header.scan_start : header.scan_start + 2] == b"\xff\xda"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_read_in_either_byte_order(
    photo: Image.Image, orientation: int
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    little_endian = save(photo, exif=exif.tobytes())
    big_endian = with_app1(save(photo), orientation_segment(orientation))

    for data in (little_endian, big_endian):
        header = jpeg.read_header(data)
        assert header is not None
        assert header.orientation == orientation


def test_an_unreadable_exif_segment_leaves_the_orientation_unknown(photo: Image.Image) -> None:
    broken = b"\xff\xe1\x00\x0eExif\x00\x00II*\x00\xff\xff"  # IFD offset past the end

    header = jpeg.read_header(with_app1(save(photo), broken))

    assert header is not None
    assert header.orientation is None


def test_a_profile_in_several_segments_is_kept_whole(photo: Image.Image) -> None:
    profile = srgb_profile() + bytes(150_000)  # longer than one segment holds
    data = save(photo, icc_profile=profile)

    header = jpeg.read_header(data)

    assert header is not None
    assert len(header.icc_segments) == 3
    assert all(s.startswith(b"\xff\xe2") for s in header.icc_segments)
    chunks = b"".join(s[4 + len(jpeg.ICC_SIGNATURE) + 2 :] for s in header.icc_segments)
    assert chunks == profile


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # a segment that runs past the end
        b"\xff\xd8\x00\x00\x00\x00",  # no marker where one belongs
        b"\xff\xd8\xff\xdb\x00\x05\x00\x01\x02",  # a quantisation table cut short
        b"\xff\xd8\xff\xda\x00\x02\x00\x00\xff\xd9",  # a scan before any frame
        b"GIF89a",
    ],
    ids=["empty", "soi-only", "cut-segment", "no-marker", "short-table", "no-frame", "gif"],
)
def test_unreadable_headers_are_none(data: bytes) -> None:
    assert jpeg.read_header(data) is None


def test_the_header_of_a_truncated_file_says_it_has_no_end(photo: Image.Image) -> None:
    data = save(photo)

    header = jpeg.read_header(data[: len(data) * 2 // 3])

    assert header is not None
    assert not header.ends_with_eoi


def test_segments_go_after_the_jfif_segment_or_else_after_soi(photo: Image.Image) -> None:
    profile = srgb_profile()
    donor = jpeg.read_header(save(photo, icc_profile=profile))
    assert donor is not None
    with_jfif = save(photo)
    assert with_jfif[2:4] == b"\xff\xe0"
    without_jfif = with_jfif[:2] + with_jfif[4 + int.from_bytes(with_jfif[4:6], "big") :]

    for target in (with_jfif, without_jfif):
        data = jpeg.with_segments(target, donor.icc_segments)
        with Image.open(io.BytesIO(data)) as image:
            assert image.info.get("icc_profile") == profile
            assert ("jfif" in image.info) == (target is with_jfif)
            image.load()  # still a whole, decodable file
    assert jpeg.with_segments(with_jfif, ()) is with_jfif


# --- JPEG to JPEG ----------------------------------------------------------------------


def _header(data: bytes) -> jpeg.JpegHeader:
    header = jpeg.read_header(data)
    assert header is not None
    return header


@pytest.mark.parametrize(
    ("case", "takes_it"),
    [
        ("colour", True),
        ("grey", True),
        ("progressive", True),
        ("with a colour profile", True),
        ("no larger than the size bounds", True),
        ("cmyk", False),
        ("rotated", False),
        ("truncated", False),
        ("to webp", False),
        ("shrunk", False),
        ("rgb, not ycbcr", False),
        ("12-bit", False),
        ("arithmetic-coded", False),
        ("over 25 MP", False),
    ],
)
def test_which_jpegs_take_the_short_road(photo: Image.Image, case: str, takes_it: bool) -> None:
    plain = save(photo, quality=90)
    header = _header(plain)
    options = ProcessingOptions()
    if case == "grey":
        header = _header(save(photo.convert("L")))
    elif case == "progressive":
        header = _header(save(photo, progressive=True))
    elif case == "with a colour profile":
        header = _header(save(photo, icc_profile=srgb_profile()))
    elif case == "no larger than the size bounds":
        options = ProcessingOptions(max_width=photo.width, max_height=photo.height + 1)
    elif case == "cmyk":
        header = _header(save(photo.convert("CMYK")))
    elif case == "rotated":
        header = _header(with_app1(plain, orientation_segment(6)))
    elif case == "truncated":
        header = _header(plain[: len(plain) // 2])
    elif case == "to webp":
        options = ProcessingOptions(format="webp")
    elif case == "shrunk":
        options = ProcessingOptions(max_width=photo.width - 1)
    elif case == "rgb, not ycbcr":
        header = dataclasses.replace(header, adobe_transform=0)
    elif case == "12-bit":
        header = dataclasses.replace(header, precision=12)
    elif case == "arithmetic-coded":
        header = dataclasses.replace(header, frame=0xC9)
    elif case == "over 25 MP":
        header = dataclasses.replace(header, width=6000, height=4200)

    assert takes_the_jpeg_road(header, options) is takes_it


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("progressive", [False, True])
def test_a_plain_jpeg_comes_out_as_libvips_would_write_it(
    photo: Image.Image, mode: str, progressive: bool
) -> None:
    data = save(photo.convert(mode), quality=88, progressive=progressive)
    assert takes_the_jpeg_road(_header(data), ProcessingOptions())

    result = processed(data)

    assert (result.format, result.width, result.height) == ("jpeg", *photo.size)
    assert (result.source_quality, result.output_quality) == (88, 44)
    reference = pyvips.Image.new_from_buffer(data, "").jpegsave_buffer(Q=44, keep="none")
    # The same pixels as libvips' own encoding at that quality, give or take the
    # rounding of two builds of the codec; and no bigger.
    assert mean_difference(result.data, reference) < 1.0
    assert len(result.data) <= len(reference) * 1.02
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.mode == mode
        assert "progressive" not in image.info


@pytest.mark.parametrize(
    ("size", "writer"),
    [
        ((333, 101), "pillow 4:2:2"),
        ((17, 9), "pillow 4:4:4"),
        ((640, 427), "libvips with restart markers"),
        ((1, 1), "pillow 4:2:0"),
    ],
)
def test_odd_sizes_subsamplings_and_restart_markers_come_out_alike(
    photo: Image.Image, size: tuple[int, int], writer: str
) -> None:
    image = photo.resize(size)
    if writer.startswith("pillow"):
        subsampling = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}[writer.split()[1]]
        data = save(image, quality=80, subsampling=subsampling)
    else:
        vips_image = pyvips.Image.new_from_memory(
            image.tobytes(), image.width, image.height, 3, "uchar"
        )
        data = vips_image.jpegsave_buffer(Q=80, restart_interval=4, keep="none")

    result = processed(data)

    assert (result.width, result.height) == size
    if result.kept_source:  # a tiny file re-encoding cannot beat
        assert result.data == data
        return
    reference = pyvips.Image.new_from_buffer(data, "").jpegsave_buffer(Q=40, keep="none")
    assert mean_difference(result.data, reference) < 1.5


def test_the_colour_profile_of_a_plain_jpeg_survives(photo: Image.Image) -> None:
    profile = srgb_profile() + bytes(150_000)
    data = save(photo, quality=90, icc_profile=profile)
    assert takes_the_jpeg_road(_header(data), ProcessingOptions())

    result = processed(data)

    with Image.open(io.BytesIO(result.data)) as image:
        assert image.info.get("icc_profile") == profile
        assert image.info.get("jfif") is not None  # JFIF still comes first


def test_a_colour_profile_that_does_not_fit_grey_pixels_is_dropped(photo: Image.Image) -> None:
    """As libvips does: an RGB profile on a grey JPEG is dropped, on either road."""
    data = save(photo.convert("L"), quality=90, icc_profile=srgb_profile())
    header = _header(data)
    assert takes_the_jpeg_road(header, ProcessingOptions())
    assert jpeg.icc_colour_space(header.icc_segments) == b"RGB "

    result = processed(data)
    by_libvips = pyvips.Image.new_from_buffer(data, "").jpegsave_buffer(Q=45, keep="icc")

    assert b"ICC_PROFILE" not in result.data
    assert b"ICC_PROFILE" not in by_libvips


def test_metadata_of_a_plain_jpeg_is_stripped(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x013B] = "secret artist"
    data = save(photo, quality=90, exif=exif.tobytes(), comment=b"secret comment")

    result = processed(data)

    assert b"secret" not in result.data
    with Image.open(io.BytesIO(result.data)) as image:
        assert len(image.getexif()) == 0


@pytest.mark.parametrize(("percent", "sampling"), [(50, 2), (89, 2), (90, 0), (100, 0)])
def test_chroma_is_subsampled_below_quality_90_as_libvips_does(
    photo: Image.Image, percent: int, sampling: int
) -> None:
    data = save(photo, quality=100, subsampling=0)

    result = processed(data, quality=percent)

    assert result.output_quality == percent
    with Image.open(io.BytesIO(result.data)) as image:
        assert isinstance(image, JpegImagePlugin.JpegImageFile)
        assert JpegImagePlugin.get_sampling(image) == sampling


def test_bytes_after_the_end_marker_do_not_stop_a_jpeg(photo: Image.Image) -> None:
    data = save(photo, quality=90) + b"trailing bytes of some camera"

    result = processed(data)

    assert (result.width, result.height) == photo.size
    assert result.output_quality == 45


def test_a_jpeg_with_corrupt_data_leaves_the_short_road_for_libvips(photo: Image.Image) -> None:
    data = bytearray(save(photo, quality=90))
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff\xd9" * 32  # end markers inside the image data
    corrupt = bytes(data)
    header = _header(corrupt)
    assert takes_the_jpeg_road(header, ProcessingOptions())  # it still ends with EOI
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        simplejpeg.decode_jpeg(corrupt, colorspace="RGB")

    # libvips decodes what it can, as it does for any damaged JPEG.
    result = processed(corrupt)

    assert (result.format, result.width, result.height) == ("jpeg", *photo.size)
