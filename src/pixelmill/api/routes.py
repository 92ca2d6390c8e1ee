"""The request routes of the API (v1), and the classic ``/upload`` and ``/status``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from pixelmill.api.deps import OwnerDep, RuntimeDep
from pixelmill.api.errors import ApiError, not_found
from pixelmill.api.schemas import (
    Accepted,
    ProductOut,
    ProductPage,
    RequestOut,
    RequestPage,
    WebhookOut,
)
from pixelmill.api.stored import stored_object
from pixelmill.api.uploads import received_upload
from pixelmill.csvio import CsvLimits
from pixelmill.db import deliveries, queries
from pixelmill.db.ingest import stage_request
from pixelmill.runtime import Runtime
from pixelmill.webhooks.payload import finished_event

router = APIRouter()

# The largest page offset taken: far past any real total, and an integer that every
# JSON reader and both databases hold exactly.
MAX_OFFSET = 2**53 - 1

_UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "webhook_url": {"type": "string"},
                        "quality": {"type": "integer", "minimum": 1, "maximum": 100},
                        "max_width": {"type": "integer"},
                        "max_height": {"type": "integer"},
                        "format": {"enum": ["keep", "jpeg", "webp", "png", "avif"]},
                    },
                }
            },
            "text/csv": {"schema": {"type": "string"}},
        }
    }
}


def _status_url(runtime: Runtime, request_id: str) -> str:
    return f"{runtime.settings.public_url}/api/v1/requests/{request_id}"


async def _load(runtime: Runtime, request_id: str, owner: str | None) -> Any:
    row = await queries.get_request(runtime.db, request_id, owner)
    if row is None:
        raise not_found(request_id)
    return row


def _request_out(runtime: Runtime, row: Any) -> RequestOut:
    csv_url = runtime.storage.url_for(row.output_key) if row.output_key else None
    return RequestOut.from_row(row, csv_url)


async def _upload(request: Request, runtime: Runtime, owner: str | None) -> Accepted:
    settings = runtime.settings
    async with received_upload(
        request, max_bytes=settings.max_upload_bytes, allow_private=settings.allow_private_urls
    ) as (path, options):
        accepted = await stage_request(
            runtime.db,
            path,
            options=options.processing(),
            webhook_url=options.webhook_url,
            owner=owner,
            limits=CsvLimits(settings.max_rows, settings.max_urls_per_row),
            task_max_images=settings.task_max_images,
            batch_rows=settings.ingest_batch_rows,
        )
    runtime.wake_workers()
    return Accepted(
        request_id=accepted.request_id,
        status="pending",
        status_url=_status_url(runtime, accepted.request_id),
        products=accepted.products,
        images=accepted.images,
    )


@router.post(
    "/api/v1/requests",
    status_code=202,
    response_model=Accepted,
    openapi_extra=_UPLOAD_DOC,
    tags=["requests"],
)
async def create_request(request: Request, runtime: RuntimeDep, owner: OwnerDep) -> Accepted:
    """Upload a CSV of products and image URLs; answers at once with its ``request_id``."""
    return await _upload(request, runtime, owner)


@router.post(
    "/upload", status_code=202, response_model=Accepted, openapi_extra=_UPLOAD_DOC, tags=["classic"]
)
async def classic_upload(request: Request, runtime: RuntimeDep, owner: OwnerDep) -> Accepted:
    """The classic upload route: the same as ``POST /api/v1/requests``."""
    return await _upload(request, runtime, owner)


@router.get("/api/v1/requests", response_model=RequestPage, tags=["requests"])
async def list_requests(
    runtime: RuntimeDep,
    owner: OwnerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RequestPage:
    """The caller's requests, newest first."""
    rows, total = await queries.list_requests(runtime.db, owner, offset, limit)
    items = [_request_out(runtime, row) for row in rows]
    return RequestPage(items=items, offset=offset, limit=limit, total=total)


@router.get("/api/v1/requests/{request_id}", response_model=RequestOut, tags=["requests"])
async def get_request(request_id: str, runtime: RuntimeDep, owner: OwnerDep) -> RequestOut:
    """Status and progress of one request (one row read, whatever its size)."""
    return _request_out(runtime, await _load(runtime, request_id, owner))


@router.get("/status/{request_id}", response_model=RequestOut, tags=["classic"])
async def classic_status(request_id: str, runtime: RuntimeDep, owner: OwnerDep) -> RequestOut:
    """The classic status route: the same as ``GET /api/v1/requests/{id}``."""
    return _request_out(runtime, await _load(runtime, request_id, owner))


@router.get("/api/v1/requests/{request_id}/products", response_model=ProductPage, tags=["requests"])
async def list_products(
    request_id: str,
    runtime: RuntimeDep,
    owner: OwnerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ProductPage:
    """The request's product rows in input order, each with its images."""
    row = await _load(runtime, request_id, owner)
    # Past the last row nothing is read: row indexes are 32-bit, offsets are not.
    pairs = (
        await queries.list_products(runtime.db, request_id, offset, limit)
        if offset < row.products
        else []
    )
    items = [ProductOut.from_rows(product, images) for product, images in pairs]
    return ProductPage(items=items, offset=offset, limit=limit, total=row.products)


@router.get(
    "/api/v1/requests/{request_id}/output.csv",
    response_class=FileResponse,
    tags=["requests"],
    responses={200: {"content": {"text/csv": {}}}, 409: {"description": "not finished yet"}},
)
async def output_csv(request_id: str, runtime: RuntimeDep, owner: OwnerDep) -> Response:
    """The output CSV: the input plus ``Output Image Urls`` (409 until finished)."""
    row = await _load(runtime, request_id, owner)
    if not row.output_key:
        raise ApiError(
            409,
            "not_finished",
            f"request {request_id} is {row.status}; the output CSV exists once it is finished",
        )
    return await stored_object(runtime.storage, row.output_key, f"{request_id}.csv")


@router.get("/api/v1/requests/{request_id}/events", tags=["requests"])
async def request_events(
    request_id: str, runtime: RuntimeDep, owner: OwnerDep
) -> StreamingResponse:
    """Server-Sent Events: a ``progress`` event at each change, until the request finishes."""
    await _load(runtime, request_id, owner)

    async def events() -> AsyncIterator[str]:
        last = None
        while True:
            row = await _load(runtime, request_id, owner)
            body = _request_out(runtime, row).model_dump_json()
            if body != last:
                last = body
                yield f"event: progress\ndata: {body}\n\n"
            if row.finished_at is not None:
                yield f"event: finished\ndata: {json.dumps({'status': row.status})}\n\n"
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post(
    "/api/v1/requests/{request_id}/webhook/redeliver",
    status_code=202,
    response_model=WebhookOut,
    tags=["requests"],
    responses={
        409: {"description": "the request is not finished yet"},
        422: {"description": "the request has no webhook_url"},
    },
)
async def redeliver_webhook(request_id: str, runtime: RuntimeDep, owner: OwnerDep) -> WebhookOut:
    """Send the request's ``request.finished`` webhook again, from a fresh retry schedule."""
    row = await _load(runtime, request_id, owner)
    if not row.webhook_url:
        raise ApiError(422, "no_webhook", f"request {request_id} was uploaded without webhook_url")
    if row.finished_at is None:
        raise ApiError(
            409,
            "not_finished",
            f"request {request_id} is {row.status}; its webhook is sent once it is finished",
        )
    csv_url = runtime.storage.url_for(row.output_key) if row.output_key else None
    await deliveries.redeliver(
        runtime.db, request_id, row.webhook_url, finished_event(row, csv_url)
    )
    runtime.wake_webhooks()
    return WebhookOut.from_row(await _load(runtime, request_id, owner))
