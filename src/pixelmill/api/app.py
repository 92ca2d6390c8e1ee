"""The FastAPI application: built from settings, its runtime opened in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry
from sqlalchemy import text
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pixelmill import __version__, collector
from pixelmill.api.deps import RuntimeDep
from pixelmill.api.errors import ApiError, error_response, install_error_handlers
from pixelmill.api.metrics import HttpMetrics, PipelineCollector, exposition
from pixelmill.api.routes import router
from pixelmill.api.stored import NO_SNIFFING, stored_object
from pixelmill.config import Settings
from pixelmill.runtime import Runtime

SAMPLES_DIR = Path(str(files("pixelmill") / "samples"))


class BodySizeLimit:
    """Cuts off a request body larger than ``limit`` bytes with a 413, as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(
                    413,
                    "upload_too_large",
                    f"the upload is larger than {self.limit} bytes (PIXELMILL_MAX_UPLOAD_BYTES)",
                )
            return message

        try:
            await self.app(scope, counted, send)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message)
            await response(scope, receive, send)


def create_app(
    settings: Settings, *, run_worker: bool = False, migrate: bool = False, samples: bool = False
) -> FastAPI:
    """The API; with ``run_worker`` it also processes tasks (``pixelmill serve``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings, migrate=migrate, stores=run_worker)
        app.state.runtime = runtime
        pipeline = PipelineCollector(runtime.db, outbox=not settings.queue_url.startswith("db:"))
        registry.register(pipeline)
        app.state.pipeline_metrics = pipeline
        if run_worker:
            await runtime.start_workers(settings.worker_process_count)
        collector.started()
        try:
            yield
        finally:
            registry.unregister(pipeline)
            await runtime.close()

    app = FastAPI(
        title="pixelmill",
        version=__version__,
        summary="Turn a CSV of products and image URLs into processed images, at any scale.",
        lifespan=lifespan,
    )
    # Multipart framing adds a little to the CSV itself.
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes + 64 * 1024)
    registry = CollectorRegistry()  # this app's own metrics (a process may build several)
    app.state.metrics_registry = registry
    app.add_middleware(HttpMetrics, registry=registry)  # outermost: it sees every answer
    install_error_handlers(app)
    app.include_router(router)
    _add_operations(app)
    if samples:
        _add_samples(app)
    return app


def _add_operations(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """The process can reach its database."""
        try:
            async with runtime.db.read() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: the pipeline's state, the API's traffic, the process."""
        await request.app.state.pipeline_metrics.refresh()
        page = exposition(REGISTRY, request.app.state.metrics_registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    @app.get("/files/{key:path}", tags=["operations"], response_class=FileResponse)
    async def stored_file(key: str, runtime: RuntimeDep) -> Response:
        """Processed images and output CSVs, from whichever storage holds them."""
        return await stored_object(runtime.storage, key)


def _add_samples(app: FastAPI) -> None:
    names = {p.name for p in SAMPLES_DIR.iterdir() if p.suffix in (".jpg", ".png", ".webp")}

    @app.get("/samples/{name}", tags=["operations"], response_class=FileResponse)
    async def sample(name: str) -> FileResponse:
        """The sample photos that examples/products.csv points at."""
        if name not in names:
            raise ApiError(404, "not_found", f"no sample {name!r}")
        return FileResponse(SAMPLES_DIR / name, headers=NO_SNIFFING)
