"""Imaging inside the calling process: fetch on the event loop, CPU work in threads."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pyvips

from pixelmill.config import Settings
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ProcessedImage,
    ProcessingOptions,
)
from pixelmill.imaging.addresses import AddressPolicy
from pixelmill.imaging.fetch import FetchedBody, Fetcher, FetchLimits
from pixelmill.imaging.formats import OUTPUT_EXTENSIONS, content_type
from pixelmill.imaging.ops import EncodedImage, ImageLimits, process_image
from pixelmill.storage import InvalidKeyError, Storage, StorageError, StoredObject

log = logging.getLogger(__name__)


class InlineImaging:
    """The imaging service as a library: a fetcher, a thread pool and a storage."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.storage = storage
        self.total_timeout = settings.fetch_total_timeout
        self.limits = ImageLimits(
            settings.max_pixels, settings.min_output_quality, settings.max_frames
        )
        self.fetcher = Fetcher(
            AddressPolicy(allow_private=settings.allow_private_urls),
            FetchLimits(
                max_bytes=settings.fetch_max_bytes,
                max_redirects=settings.fetch_max_redirects,
                connect_timeout=settings.fetch_connect_timeout,
                read_timeout=settings.fetch_read_timeout,
                total_timeout=settings.fetch_total_timeout,
                user_agent=settings.user_agent,
            ),
            trusted_prefixes=tuple(settings.trusted_source_prefixes),
        )
        threads = settings.imaging_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pixelmill-imaging")
        # Bounds the decoded images held in memory: those in the pool plus a few queued.
        self._cpu_slots = asyncio.Semaphore(threads * 2)
        # Parallelism comes from one image per thread; codec threads would only contend.
        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)

    async def process(
        self, source_url: str, options: ProcessingOptions, output_stem: str, *, fresh: bool = False
    ) -> ImageOutcome:
        started = time.monotonic()
        if not fresh:
            # An earlier attempt (before a crash, a lost lease or a timed-out call) may
            # have stored this image already: the key is deterministic, so report that.
            # (A fresh image skips the look: it costs a few lookups in a folder that the
            # imaging threads keep writing to, 0.1 ms of the event loop per image.)
            try:
                stored = await self.storage.find(output_stem, OUTPUT_EXTENSIONS)
            except StorageError as exc:
                return _storage_failure(exc)
            if stored is not None and (earlier := self._earlier_result(stored, started)):
                return earlier
        fetched = await self.fetcher.fetch(source_url)
        if isinstance(fetched, ImageFailure):
            return fetched
        loop = asyncio.get_running_loop()
        async with self._cpu_slots:
            try:
                outcome = await loop.run_in_executor(
                    self._pool, self._transform_and_store, fetched, options, output_stem, started
                )
            except Exception as exc:  # a bug or a libvips crash must not kill the worker
                log.exception("processing %s failed", fetched.url)
                return ImageFailure(ErrorCode.INTERNAL_ERROR, f"processing failed: {exc}")
        return outcome

    def _transform_and_store(
        self, fetched: FetchedBody, options: ProcessingOptions, output_stem: str, started: float
    ) -> ImageOutcome:
        """The CPU work and the write, in one trip to the pool (runs in a pool thread)."""
        encoded = process_image(fetched.data, options, self.limits, started + self.total_timeout)
        if isinstance(encoded, ImageFailure):
            return encoded
        key = f"{output_stem}.{encoded.extension}"
        try:
            self.storage.put_bytes_blocking(
                key, encoded.data, content_type(encoded.format), _metadata(encoded)
            )
        except StorageError as exc:
            return _storage_failure(exc)
        return ProcessedImage(
            output_key=key,
            output_url=self.storage.url_for(key),
            format=encoded.format,
            width=encoded.width,
            height=encoded.height,
            bytes_in=encoded.bytes_in,
            bytes_out=len(encoded.data),
            source_quality=encoded.source_quality,
            output_quality=encoded.output_quality,
            kept_source=encoded.kept_source,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    def _earlier_result(self, stored: StoredObject, started: float) -> ProcessedImage | None:
        """The result an earlier attempt stored with its object; None if unreadable."""
        meta = stored.metadata
        try:
            return ProcessedImage(
                output_key=stored.key,
                output_url=self.storage.url_for(stored.key),
                format=meta["format"],
                width=int(meta["width"]),
                height=int(meta["height"]),
                bytes_in=int(meta["bytes_in"]),
                bytes_out=stored.size,
                source_quality=_optional_int(meta["source_quality"]),
                output_quality=_optional_int(meta["output_quality"]),
                kept_source=meta["kept_source"] == "true",
                duration_ms=(time.monotonic() - started) * 1000,
            )
        except (KeyError, ValueError):
            return None

    async def close(self) -> None:
        await self.fetcher.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _metadata(encoded: EncodedImage) -> dict[str, str]:
    """What the result of an image needs beyond its bytes, stored with its object."""
    return {
        "format": encoded.format,
        "width": str(encoded.width),
        "height": str(encoded.height),
        "bytes_in": str(encoded.bytes_in),
        "source_quality": "" if encoded.source_quality is None else str(encoded.source_quality),
        "output_quality": "" if encoded.output_quality is None else str(encoded.output_quality),
        "kept_source": "true" if encoded.kept_source else "false",
    }


def _storage_failure(exc: StorageError) -> ImageFailure:
    """``storage_error``: transient when the storage may come back (workers wait for
    it), permanent when it refuses. A wrong key is a bug of the caller: an internal
    error, which no wait would mend either."""
    if isinstance(exc, InvalidKeyError):
        return ImageFailure(ErrorCode.INTERNAL_ERROR, str(exc), transient=False)
    return ImageFailure(ErrorCode.STORAGE_ERROR, str(exc), transient=exc.transient)


def _optional_int(text: str) -> int | None:
    return int(text) if text else None
