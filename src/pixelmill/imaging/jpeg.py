"""The structure of a JPEG file, read without decoding it.

One walk over the marker segments before the first scan gives what the pipeline needs
to know before it decodes: the frame (size, components, precision), the quantisation
tables (for the quality estimate), the EXIF orientation, the colour profile and the
Adobe colour transform. :func:`segments` is that walk; :func:`whole_file` goes on
through the scans to the end-of-image marker, for the metadata stripper.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
SOS = 0xDA
EOI_MARKER = 0xD9
APP1 = 0xE1
APP2 = 0xE2
APP14 = 0xEE
DQT = 0xDB
# TEM and RST0-7 stand alone: no length follows them.
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Start-of-frame markers; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Not a marker: the entropy-coded data of a scan, which follows its SOS segment.
SCAN_DATA = -1
_MARKER = re.compile(b"\xff[^\x00\xd0-\xd7\xff]")
_FILL = re.compile(b"\xff+")
ICC_SIGNATURE = b"ICC_PROFILE\x00"
EXIF_SIGNATURE = b"Exif\x00\x00"

# The position in natural (row-major) order of each coefficient in zigzag order: DQT
# segments store tables in zigzag order.
_ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
)  # fmt: skip


class MalformedJpegError(ValueError):
    """The marker segments of the file cannot be walked."""


@dataclass(frozen=True)
class Segment:
    """One marker segment: ``data[start:end]`` holds it whole, marker included."""

    marker: int
    start: int
    end: int

    def payload(self, data: bytes) -> bytes:
        """The bytes after the marker and the length field."""
        return data[self.start + 4 : self.end] if self.marker not in STANDALONE else b""


def segments(data: bytes) -> Iterator[Segment]:
    """The segments from the first after SOI up to and including SOS (the scan's data
    follows it); raises :class:`MalformedJpegError` where the walk breaks off."""
    for segment in _walk(data):
        if segment.marker == EOI_MARKER:
            break
        yield segment
        if segment.marker == SOS:
            return
    raise MalformedJpegError("the file ends before its first scan")


def whole_file(data: bytes) -> Iterator[Segment]:
    """Every segment of the image in file order, each scan's entropy-coded data as one
    :data:`SCAN_DATA` piece, up to the end-of-image marker (not included): whatever
    follows it (a preview image that cameras append, say) is not part of the image.
    Raises :class:`MalformedJpegError` where the walk breaks off."""
    for segment in _walk(data):
        if segment.marker == EOI_MARKER:
            return
        yield segment


def _walk(data: bytes) -> Iterator[Segment]:
    """The marker segments from the one after SOI on, each SOS followed by its scan's
    data; the scan is only looked through when the caller asks for what follows SOS."""
    if not data.startswith(SOI):
        raise MalformedJpegError("no start-of-image marker")
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            # Stray bytes before a marker: libjpeg skips them with a warning, and so do we.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes, as many as there are: skipped in one step
            pos = _FILL.match(data, pos).end() - 1  # type: ignore[union-attr]
            continue
        if marker in STANDALONE or marker == EOI_MARKER:
            yield Segment(marker, pos, pos + 2)
            pos += 2
            continue
        if pos + 4 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise MalformedJpegError(f"segment 0x{marker:02X} at byte {pos} runs past the end")
        yield Segment(marker, pos, end)
        pos = end
        if marker == SOS:
            pos = _scan_end(data, end)
            yield Segment(SCAN_DATA, end, pos)
    raise MalformedJpegError("the file ends in the middle of its segments")


def _scan_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data that begins at ``start`` ends: at the first 0xFF
    followed by neither a stuffed 0x00, a restart marker nor another (fill) 0xFF. One
    search in C, so that no crafted run of them costs a Python step per byte."""
    found = _MARKER.search(data, start)
    if found is None:
        raise MalformedJpegError("the scan data runs to the end of the file")
    return found.start()


@dataclass(frozen=True)
class JpegHeader:
    """What the segments before the first scan say about a JPEG."""

    frame: int  # the start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    width: int
    height: int
    components: int
    precision: int  # bits per sample
    orientation: int | None  # None when an EXIF segment exists but cannot be read
    adobe_transform: int | None  # the APP14 colour transform, if the segment is there
    icc_segments: tuple[bytes, ...]  # the APP2 segments of the profile, whole
    quant_tables: dict[int, tuple[int, ...]]  # by table id, in natural order
    ends_with_eoi: bool
    scan_start: int  # the offset of the first SOS marker: what follows is image data


def read_header(data: bytes) -> JpegHeader | None:
    """The header of the JPEG in ``data``, or None if it cannot be read whole."""
    frame: tuple[int, int, int, int, int] | None = None
    scan_start = len(data)
    orientation: int | None = 1
    exif_seen = False
    adobe: int | None = None
    icc: list[bytes] = []
    tables: dict[int, tuple[int, ...]] = {}
    try:
        for segment in segments(data):
            marker = segment.marker
            if marker in FRAMES and frame is None:
                precision, height, width, components = struct.unpack_from(
                    ">BHHB", data, segment.start + 4
                )
                frame = (marker, width, height, components, precision)
            elif marker == DQT:
                tables.update(_quant_tables(segment.payload(data)))
            elif marker == APP1 and not exif_seen:
                payload = segment.payload(data)
                if payload.startswith(EXIF_SIGNATURE):
                    exif_seen = True
                    orientation = exif_orientation(payload[len(EXIF_SIGNATURE) :])
            elif marker == APP2 and segment.payload(data).startswith(ICC_SIGNATURE):
                icc.append(data[segment.start : segment.end])
            elif marker == SOS:
                scan_start = segment.start
            elif marker == APP14 and segment.payload(data).startswith(b"Adobe"):
                payload = segment.payload(data)
                adobe = payload[11] if len(payload) > 11 else None
    except (MalformedJpegError, struct.error):
        return None
    if frame is None:
        return None
    marker, width, height, components, precision = frame
    return JpegHeader(
        frame=marker,
        width=width,
        height=height,
        components=components,
        precision=precision,
        orientation=orientation,
        adobe_transform=adobe,
        icc_segments=tuple(icc),
        quant_tables=tables,
        ends_with_eoi=data.endswith(EOI),
        scan_start=scan_start,
    )


def _quant_tables(payload: bytes) -> dict[int, tuple[int, ...]]:
    """The tables of one DQT segment (it may hold several), in natural order."""
    tables = {}
    pos = 0
    while pos < len(payload):
        wide, table_id = payload[pos] >> 4, payload[pos] & 0x0F
        size = 128 if wide else 64
        raw = payload[pos + 1 : pos + 1 + size]
        if len(raw) != size:
            raise MalformedJpegError("a quantisation table is cut short")
        zigzag = struct.unpack(">64H", raw) if wide else tuple(raw)
        natural = [0] * 64
        for index, value in zip(_ZIGZAG, zigzag, strict=True):
            natural[index] = value
        tables[table_id] = tuple(natural)
        pos += 1 + size
    return tables


def exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag (1-8) of EXIF data (a TIFF structure); 1 when absent, None
    when the data cannot be read."""
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for index in range(count):
            entry = ifd + 2 + 12 * index
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag == 0x0112:
                if kind != 3:  # SHORT
                    return None
                (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
                return value if 1 <= value <= 8 else None
    except struct.error:
        return None
    return 1


def icc_colour_space(icc_segments: tuple[bytes, ...]) -> bytes | None:
    """The colour space the profile in these APP2 segments is for (``b"RGB "``,
    ``b"GRAY"``, ``b"CMYK"``...), from its header in the first of them; None without one."""
    if not icc_segments:
        return None
    # marker (2), length (2), signature, sequence number and count (2), then the profile
    profile = icc_segments[0][4 + len(ICC_SIGNATURE) + 2 :]
    return profile[16:20] if len(profile) >= 20 else None


def with_segments(jpeg: bytes, extra: tuple[bytes, ...]) -> bytes:
    """``jpeg`` with ``extra`` segments inserted after SOI and a JFIF APP0 segment."""
    if not extra:
        return jpeg
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":
        (length,) = struct.unpack_from(">H", jpeg, 4)
        pos = 4 + length
    return jpeg[:pos] + b"".join(extra) + jpeg[pos:]
