"""The image processing service: safe fetching, the transform pipeline, and its transports."""

from __future__ import annotations

from urllib.parse import urlsplit

from pixelmill.config import Settings
from pixelmill.imaging.base import Imaging
from pixelmill.storage import Storage


def open_imaging(settings: Settings, storage: Storage) -> Imaging:
    """The imaging backend named by ``PIXELMILL_IMAGING_URL``; unknown schemes are refused."""
    scheme = urlsplit(settings.imaging_url).scheme
    if scheme == "inline":
        from pixelmill.imaging.inline import InlineImaging

        return InlineImaging(settings, storage)
    raise ValueError(
        f"PIXELMILL_IMAGING_URL={settings.imaging_url!r}: unsupported scheme {scheme!r}; "
        "use inline://"
    )
