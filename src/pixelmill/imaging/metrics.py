"""The imaging service's metrics: images by outcome, the time and bytes of those
processed, the images in progress and those refused.

With ``pixelmill imaging --processes N`` every process counts into files of one shared
folder (the client library's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``, set by
the command before the processes start), so whichever process answers ``/metrics``
answers for all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from pixelmill.domain import ImageFailure, ImageOutcome

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# From a small image's few milliseconds to a large one fetched slowly.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ImagingMetrics:
    """The metrics of one service process."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        self.registry = CollectorRegistry()
        # In multiprocess mode the values live in the shared files, read by the collector.
        target = None if self.multiprocess else self.registry
        self.images = Counter(
            "pixelmill_imaging_images",
            "Images asked for, by outcome: processed, busy (refused with 429) or an error code",
            ["outcome"],
            registry=target,
        )
        self.seconds = Histogram(
            "pixelmill_imaging_image_duration_seconds",
            "Time to fetch, transform and store each processed image",
            buckets=_BUCKETS,
            registry=target,
        )
        self.bytes_in = Counter(
            "pixelmill_imaging_source_bytes", "Bytes of the processed images' sources",
            registry=target,
        )  # fmt: skip
        self.bytes_out = Counter(
            "pixelmill_imaging_output_bytes", "Bytes of the processed images stored",
            registry=target,
        )  # fmt: skip
        self.in_flight = Gauge(
            "pixelmill_imaging_in_flight",
            "Images in progress",
            registry=target,
            multiprocess_mode="livesum",
        )

    def finished(self, outcome: ImageOutcome) -> None:
        """Count one image's outcome."""
        if isinstance(outcome, ImageFailure):
            self.images.labels(outcome.code.value).inc()
            return
        self.images.labels("processed").inc()
        self.seconds.observe(outcome.duration_ms / 1000)
        self.bytes_in.inc(outcome.bytes_in)
        self.bytes_out.inc(outcome.bytes_out)

    def close(self) -> None:
        """At the process's exit: its images in progress no longer count (the counters
        it leaves stay in the sums)."""
        if self.multiprocess:
            mark_process_dead(os.getpid())

    def refused(self) -> None:
        self.images.labels("busy").inc()

    def exposition(self) -> bytes:
        """The text format: every process's counts, or this process's and its own
        process metrics (CPU, memory) when it runs alone."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(REGISTRY) + generate_latest(self.registry)
