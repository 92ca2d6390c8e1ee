"""Remove metadata from source bytes without re-encoding them.

Used when pixelmill keeps a source because re-encoding would not make it smaller:
the pixels stay bit for bit, but EXIF (GPS, camera serials), XMP, IPTC, comments and
images appended to a JPEG go.
The colour profile stays, as it does in re-encoded outputs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pixelmill.imaging import jpeg

# JPEG markers that carry metadata: APP1 (EXIF, XMP), APP13 (IPTC), COM.
_JPEG_DROPPED = {0xE1, 0xED, 0xFE}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Text, EXIF and time; and the frames after the first of an animated PNG, since only
# the first is processed (its IDAT, what a decoder without animation shows).
_PNG_DROPPED = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"acTL", b"fcTL", b"fdAT"}
_WEBP_METADATA_FLAGS = 0x08 | 0x04  # EXIF and XMP bits of the VP8X chunk
_WEBP_ANIMATION_FLAG = 0x02


def orientation_segment(orientation: int) -> bytes:
    """A minimal EXIF APP1 segment holding only the orientation tag."""
    tiff = b"MM\x00*" + struct.pack(">I", 8)
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    payload = b"Exif\x00\x00" + tiff + ifd + struct.pack(">I", 0)
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def strip_jpeg(data: bytes, orientation: int = 1) -> bytes | None:
    """``data`` without its metadata, or None if the file cannot be walked.

    The metadata segments go wherever they stand, between scans too, with the APP2
    segments other than the colour profile (a multi-picture index, say) and whatever
    follows the end-of-image marker (cameras append preview images, with their own
    EXIF). An orientation other than 1 is written back in a minimal EXIF segment, so
    the image is still displayed the right way up.
    """
    out = [jpeg.SOI]
    if orientation != 1:
        out.append(orientation_segment(orientation))
    try:
        for segment in jpeg.whole_file(data):
            if segment.marker in _JPEG_DROPPED or (
                segment.marker == jpeg.APP2
                and not segment.payload(data).startswith(jpeg.ICC_SIGNATURE)
            ):
                continue
            out.append(data[segment.start : segment.end])
    except jpeg.MalformedJpegError:
        return None
    out.append(jpeg.EOI)
    return b"".join(out)


class CutChunkError(ValueError):
    """A PNG chunk runs past the end of the data."""


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(kind, start, end)`` of each chunk of a PNG, ``data[start:end]`` holding it
    whole, up to ``IEND`` or the end of the data; :class:`CutChunkError` where a chunk
    is cut off."""
    pos = len(_PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise CutChunkError(f"a chunk header is cut off at byte {pos}")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise CutChunkError(f"the chunk at byte {pos} runs past the end")
        kind = data[pos + 4 : pos + 8]
        yield kind, pos, end
        if kind == b"IEND":
            return
        pos = end


def strip_png(data: bytes) -> bytes | None:
    """``data`` without its text, EXIF and time chunks, or None if it cannot be walked
    (it ends inside a chunk).

    Without IEND (decoders show such files), a file that ends right after a whole chunk
    of image data or later is kept, stripped, and no IEND is added: that would make it
    larger than its source.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    image_data = False
    try:
        for kind, start, end in png_chunks(data):
            if kind not in _PNG_DROPPED:
                out.append(data[start:end])
            image_data = image_data or kind == b"IDAT"
    except CutChunkError:
        return None
    return b"".join(out) if image_data else None


def png_frames(data: bytes) -> int:
    """The frames an animated PNG declares in its ``acTL`` chunk (before its image data);
    1 for any other file."""
    if not data.startswith(_PNG_SIGNATURE):
        return 1
    try:
        for kind, start, end in png_chunks(data):
            if kind == b"acTL" and end - start >= 20:
                return max(1, int.from_bytes(data[start + 8 : start + 12], "big"))
            if kind == b"IDAT":
                return 1
    except CutChunkError:
        pass
    return 1


def _webp_flags(data: bytes) -> int:
    """The feature flags of an extended WebP's VP8X chunk; 0 for a simple WebP."""
    return data[20] if data[12:16] == b"VP8X" else 0


def without_metadata(data: bytes, image_format: str, orientation: int = 1) -> bytes | None:
    """The source without metadata, or None when that cannot be done losslessly."""
    if image_format == "jpeg":
        return strip_jpeg(data, orientation)
    if orientation != 1:
        return None
    if image_format == "png":
        return strip_png(data)
    if image_format == "webp" and len(data) > 20:
        # EXIF or XMP cannot go without rewriting the file, nor can the other frames of
        # an animation (only the first is processed): such a WebP is never kept.
        return None if _webp_flags(data) & (_WEBP_METADATA_FLAGS | _WEBP_ANIMATION_FLAG) else data
    return None
