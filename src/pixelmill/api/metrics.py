"""``GET /metrics``: the pipeline's state from the database, the API's own traffic, and
the client library's process metrics, in the Prometheus text format.

The pipeline's figures are read from the database at most every few seconds, however
many scrapers ask, so that they cost the database nothing to speak of; when it cannot
be read, ``pixelmill_database_up`` is 0 and the rest of the page is still served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pixelmill.db.engine import Database, is_transient
from pixelmill.db.stats import PipelineStats, pipeline_stats
from pixelmill.logs import FailureStreak

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A scrape must not wait for a database that does not answer (Prometheus gives up at 10 s).
READ_TIMEOUT_SECONDS = 3.0


class PipelineCollector(Collector):
    """The latest :class:`PipelineStats` as metric families."""

    def __init__(self, db: Database, *, outbox: bool) -> None:
        self.db = db
        self.outbox = outbox
        self.stats: PipelineStats | None = None
        self.read_at_wall = 0.0  # when the figures were last read (time.time())
        self._read_at = -REFRESH_SECONDS
        self._lock = asyncio.Lock()
        self._reading = FailureStreak(
            log,
            "reading the pipeline's metrics",
            expected=lambda exc: isinstance(exc, TimeoutError) or is_transient(exc),
        )

    async def refresh(self) -> None:
        """Read the counts again unless they are younger than a few seconds."""
        async with self._lock:
            if time.monotonic() - self._read_at < REFRESH_SECONDS:
                return
            try:
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    self.stats = await pipeline_stats(self.db, outbox=self.outbox)
                self.read_at_wall = time.time()
            except Exception as exc:
                self._reading.failed(exc)
                self.stats = None
            else:
                self._reading.succeeded()
            self._read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        up = GaugeMetricFamily(
            "pixelmill_database_up", "1 when the last read of the figures below succeeded"
        )
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        read_at = GaugeMetricFamily(
            "pixelmill_database_read_timestamp_seconds",
            "When the figures below were read (they are at most a few seconds old)",
        )
        read_at.add_metric([], self.read_at_wall)
        yield read_at
        yield _labelled(
            GaugeMetricFamily("pixelmill_requests", "Requests by status", labels=["status"]),
            stats.requests,
        )
        yield _labelled(
            CounterMetricFamily(
                "pixelmill_images_finished",
                "Images that reached a terminal status, over every request kept",
                labels=["status"],
            ),
            stats.images_finished,
        )
        yield _labelled(
            GaugeMetricFamily(
                "pixelmill_images_unfinished",
                "Images of unfinished requests not terminal yet, by status",
                labels=["status"],
            ),
            stats.images_unfinished,
        )
        yield _labelled(
            GaugeMetricFamily(
                "pixelmill_tasks", "Tasks queued, leased by a worker, or dead", labels=["state"]
            ),
            stats.tasks,
        )
        if stats.unpublished_tasks is not None:
            backlog = GaugeMetricFamily(
                "pixelmill_outbox_unpublished_tasks",
                "Open tasks not yet published to the broker (the outbox's backlog)",
            )
            backlog.add_metric([], stats.unpublished_tasks)
            yield backlog
        yield _labelled(
            GaugeMetricFamily(
                "pixelmill_webhook_deliveries", "Webhook deliveries by state", labels=["state"]
            ),
            stats.webhook_deliveries,
        )


def _labelled(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


class HttpMetrics:
    """ASGI middleware counting the API's requests and timing them, by route template
    (``/api/v1/requests/{request_id}``, never the raw path) and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "pixelmill_http_requests",
            "HTTP requests answered by the API",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "pixelmill_http_request_duration_seconds",
            "Time to the end of each answer (a stream's end for events and files)",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # the client left before any answer (nginx's name for it)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if status == 499:  # no answer yet: the server's error handler answers 500
                status = 500
            raise
        finally:
            route = scope.get("route")
            # Unknown paths share one label: a scanner must not make a series per path.
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.requests.labels(method, template, str(status)).inc()
            self.seconds.labels(method, template).observe(time.perf_counter() - started)


def exposition(*registries: CollectorRegistry) -> bytes:
    """The text format of every metric of ``registries``."""
    return b"".join(generate_latest(registry) for registry in registries)
