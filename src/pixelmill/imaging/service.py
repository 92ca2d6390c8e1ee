"""``pixelmill imaging``: the imaging pipeline as a stateless HTTP service.

``POST /v1/process`` runs one image through an :class:`InlineImaging` (the very code a
worker runs with ``inline://``) and answers its outcome. The service stores results in
its own ``PIXELMILL_STORAGE_URL`` and builds their URLs from its own
``PIXELMILL_PUBLIC_URL``; it never touches the database. At most
``PIXELMILL_IMAGING_MAX_IN_FLIGHT`` images are in progress at once: one more is refused
at once with ``429`` and ``Retry-After``, so that its client moves to another instance.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from pixelmill import __version__, collector
from pixelmill.api.errors import (
    ApiError,
    error_response,
    install_error_handlers,
    invalid_request,
)
from pixelmill.config import Settings
from pixelmill.domain import OutputFormat, ProcessingOptions
from pixelmill.imaging.inline import InlineImaging
from pixelmill.imaging.metrics import ImagingMetrics
from pixelmill.imaging.wire import PROCESS_PATH, outcome_to_json
from pixelmill.storage import open_storage

log = logging.getLogger(__name__)

# Idle connections are kept longer than the client keeps them, so that the client never
# sends a request on a connection the service is closing.
KEEP_ALIVE_SECONDS = 75
RETRY_AFTER_SECONDS = 1


class OptionsBody(BaseModel):
    """How to transform the image (the options of the request it belongs to)."""

    model_config = ConfigDict(extra="forbid")

    quality: int = Field(default=50, ge=1, le=100, description="percent of the source's quality")
    max_width: int | None = Field(default=None, ge=1)
    max_height: int | None = Field(default=None, ge=1)
    format: OutputFormat = "keep"


class ProcessBody(BaseModel):
    """One image to fetch, transform and store."""

    model_config = ConfigDict(extra="forbid")

    source_url: str = Field(min_length=1, max_length=8192)
    options: OptionsBody = OptionsBody()
    output_key: str = Field(
        min_length=1, max_length=1024, description="the stem; the extension is added"
    )


class InFlight:
    """Counts the images in progress and refuses one more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.served = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.count >= self.limit:
            self.refused += 1
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1
        self.served += 1


async def _authorize(request: Request) -> None:
    # A coroutine, so that FastAPI calls it on the loop rather than in a worker thread.
    token: str = request.app.state.settings.imaging_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
        raise ApiError(401, "unauthorized", "send PIXELMILL_IMAGING_TOKEN as a Bearer token")


def create_imaging_app(settings: Settings) -> FastAPI:
    """The imaging service, its InlineImaging and storage opened in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = open_storage(settings.storage_url, settings.storage_base_url)
        app.state.imaging = InlineImaging(settings, storage)
        log.info(
            "pixelmill imaging: storage=%s public_url=%s threads=%d max_in_flight=%d",
            settings.storage_url,
            settings.public_url,
            settings.imaging_threads,
            settings.imaging_max_in_flight,
        )
        collector.started()
        try:
            yield
        finally:
            await app.state.imaging.close()
            app.state.metrics.close()

    app = FastAPI(
        title="pixelmill imaging",
        version=__version__,
        summary="Fetch, transform and store one image at a time, for pixelmill workers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.in_flight = InFlight(settings.imaging_max_in_flight)
    app.state.metrics = ImagingMetrics()
    install_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads the body before any dependency runs: a caller without the token
        # hears 401 whatever it sent, never what was wrong with its body.
        try:
            await _authorize(request)
        except ApiError as denied:
            return error_response(denied.status, denied.code, denied.message)
        return invalid_request(exc)

    _add_routes(app)
    return app


def app_from_environment() -> FastAPI:
    """The service built from ``PIXELMILL_*`` variables: the factory that each process of
    ``pixelmill imaging --processes N`` calls."""
    return create_imaging_app(Settings())


def _add_routes(app: FastAPI) -> None:
    in_flight: InFlight = app.state.in_flight
    metrics: ImagingMetrics = app.state.metrics

    @app.post(PROCESS_PATH, dependencies=[Depends(_authorize)])
    async def process(body: ProcessBody, request: Request) -> JSONResponse:
        """Process one image. An image failure is a 200 with ``{"error": {...}}``."""
        if not in_flight.try_enter():
            metrics.refused()
            return _busy(in_flight.limit)
        metrics.in_flight.inc()
        try:
            imaging: InlineImaging = request.app.state.imaging
            options = ProcessingOptions(**body.options.model_dump())
            outcome = await imaging.process(body.source_url, options, body.output_key)
        finally:
            in_flight.leave()
            metrics.in_flight.dec()
        metrics.finished(outcome)
        return JSONResponse(outcome_to_json(outcome))

    @app.get("/metrics", response_class=Response)
    async def metrics_page() -> Response:
        """Prometheus metrics of the service (of all its processes)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, int | str]:
        """Up, with the images in progress and the count served and refused since start."""
        return {
            "status": "ok",
            "in_flight": in_flight.count,
            "max_in_flight": in_flight.limit,
            "served": in_flight.served,
            "refused": in_flight.refused,
        }


def _busy(limit: int) -> JSONResponse:
    response = error_response(
        429, "busy", f"{limit} images are in progress (PIXELMILL_IMAGING_MAX_IN_FLIGHT)"
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
