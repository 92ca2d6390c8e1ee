"""The output formats as stored: their file extensions and media types (no codec
loaded, so that the API can name what it serves without importing the pipeline)."""

from __future__ import annotations

_CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
}

# Every extension an output can have (kept sources are JPEG, PNG or WebP too).
OUTPUT_EXTENSIONS = ("jpg", "png", "webp", "avif")


def format_of(extension: str) -> str:
    """The output format an extension of :data:`OUTPUT_EXTENSIONS` stands for."""
    return {"jpg": "jpeg"}.get(extension, extension)


def content_type(image_format: str) -> str:
    """The MIME type of an output format."""
    return _CONTENT_TYPES.get(image_format, "application/octet-stream")
