"""Read-side queries for the API and the command line: requests, their products and images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select, true

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, retry_transient
from pixelmill.domain import ImageStatus

_d = t.webhook_deliveries
# A request with the state of its webhook delivery (None until the request finishes).
_WITH_WEBHOOK = select(
    t.requests,
    _d.c.state.label("webhook_state"),
    _d.c.attempts.label("webhook_attempts"),
    _d.c.last_status_code.label("webhook_last_status_code"),
    _d.c.last_error.label("webhook_last_error"),
    _d.c.next_attempt_at.label("webhook_next_attempt_at"),
    _d.c.delivered_at.label("webhook_delivered_at"),
).select_from(t.requests.outerjoin(_d, _d.c.request_id == t.requests.c.id))


def _owned(request_id: str, owner: str | None) -> Any:
    condition = t.requests.c.id == request_id
    if owner is not None:
        condition = condition & (t.requests.c.owner == owner)
    return condition


@retry_transient
async def get_request(db: Database, request_id: str, owner: str | None) -> Row[Any] | None:
    """One request with its counters and webhook; None when unknown or someone else's."""
    if "\x00" in request_id:
        return None  # no stored id holds a NUL (and PostgreSQL refuses one in a query)
    async with db.read() as conn:
        return (await conn.execute(_WITH_WEBHOOK.where(_owned(request_id, owner)))).first()


@retry_transient
async def list_requests(
    db: Database, owner: str | None, offset: int, limit: int
) -> tuple[list[Row[Any]], int]:
    """A page of the caller's requests, newest first, and how many there are."""
    condition = (t.requests.c.owner == owner) if owner is not None else true()
    async with db.read() as conn:
        total = (
            await conn.execute(select(func.count()).select_from(t.requests).where(condition))
        ).scalar_one()
        rows = (
            await conn.execute(
                _WITH_WEBHOOK.where(condition)
                .order_by(t.requests.c.created_at.desc(), t.requests.c.id)
                .offset(offset)
                .limit(limit)
            )
        ).all()
    return list(rows), total


@dataclass(frozen=True)
class FailureCount:
    """How many images of a request failed with one error code, and one of their messages."""

    code: str
    images: int
    example: str


@retry_transient
async def failure_counts(db: Database, request_id: str) -> list[FailureCount]:
    """The error codes of a request's failed images, the most frequent first."""
    images = t.images.c
    count = func.count()
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(images.error_code, count, func.min(images.error_message))
                .where(
                    (images.request_id == request_id) & (images.status == ImageStatus.FAILED.value)
                )
                .group_by(images.error_code)
                .order_by(count.desc(), images.error_code)
            )
        ).all()
    return [FailureCount(code or "", n, example or "") for code, n, example in rows]


def product_status(statuses: list[str]) -> str:
    """A product row's status, derived from its images'."""
    if all(s == ImageStatus.PENDING for s in statuses):
        return ImageStatus.PENDING.value
    if not all(ImageStatus(s).terminal for s in statuses):
        return ImageStatus.PROCESSING.value
    if any(s == ImageStatus.COMPLETED for s in statuses):
        return ImageStatus.COMPLETED.value
    return ImageStatus.FAILED.value


@retry_transient
async def list_products(
    db: Database, request_id: str, offset: int, limit: int
) -> list[tuple[Row[Any], list[Row[Any]]]]:
    """A page of a request's products in input order, each with its images."""
    async with db.read() as conn:
        products = (
            await conn.execute(
                select(t.products)
                .where(
                    (t.products.c.request_id == request_id)
                    & (t.products.c.row_index >= offset)
                    & (t.products.c.row_index < offset + limit)
                )
                .order_by(t.products.c.row_index)
            )
        ).all()
        images = (
            await conn.execute(
                select(t.images)
                .where(
                    (t.images.c.request_id == request_id)
                    & (t.images.c.row_index >= offset)
                    & (t.images.c.row_index < offset + limit)
                )
                .order_by(t.images.c.row_index, t.images.c.position)
            )
        ).all()
    by_row: dict[int, list[Row[Any]]] = {}
    for image in images:
        by_row.setdefault(image.row_index, []).append(image)
    return [(product, by_row.get(product.row_index, [])) for product in products]
