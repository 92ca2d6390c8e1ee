"""The image processing service: safe fetching, the transform pipeline, and its transports."""

from __future__ import annotations

from urllib.parse import urlsplit

from pixelmill.config import Settings
from pixelmill.imaging.base import Imaging
from pixelmill.storage import Storage


def imaging_is_inline(settings: Settings) -> bool:
    """Whether images are processed in this process (``inline://``)."""
    return urlsplit(settings.imaging_url.strip()).scheme == "inline"


def open_imaging(settings: Settings, storage: Storage) -> Imaging:
    """The imaging backend named by ``PIXELMILL_IMAGING_URL``; unknown schemes are refused."""
    scheme = urlsplit(settings.imaging_url.strip()).scheme
    if scheme == "inline":
        from pixelmill.imaging.inline import InlineImaging

        return InlineImaging(settings, storage)
    if scheme in ("http", "https"):
        from pixelmill.imaging.client import HttpImaging

        # The services store the images in their own storage, not in ``storage``.
        return HttpImaging(settings)
    raise ValueError(
        f"PIXELMILL_IMAGING_URL={settings.imaging_url!r}: unsupported scheme {scheme!r}; "
        "use inline:// or http://host:8001[,http://host2:8001...]"
    )
