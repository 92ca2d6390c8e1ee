"""The JSON bodies of the HTTP API (v1), separate from the tables they are read from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from pixelmill.db.clock import as_utc
from pixelmill.db.queries import product_status
from pixelmill.domain import MAX_OUTPUT_SIDE, OutputFormat, ProcessingOptions


class UploadOptions(BaseModel):
    """Options given with an upload (form fields or query parameters)."""

    webhook_url: str | None = Field(default=None, max_length=2048)
    quality: int = Field(default=50, ge=1, le=100, description="percent of the source quality")
    max_width: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_SIDE)
    max_height: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_SIDE)
    format: OutputFormat = "keep"

    def processing(self) -> ProcessingOptions:
        return ProcessingOptions(self.quality, self.max_width, self.max_height, self.format)


class Accepted(BaseModel):
    request_id: str
    status: str
    status_url: str
    products: int
    images: int


class ProgressOut(BaseModel):
    total: int
    pending: int
    processing: int
    completed: int
    failed: int


class WebhookOut(BaseModel):
    url: str
    state: Literal["pending", "delivering", "delivered", "failed"]
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> WebhookOut:
        """From a request row joined with its delivery (``webhook_*`` columns)."""
        if row.webhook_state is None:  # the request is not finished: nothing queued yet
            return cls(url=row.webhook_url, state="pending")
        # While an attempt is in flight the row keeps the time it became due, now past.
        next_at = row.webhook_next_attempt_at if row.webhook_state == "pending" else None
        return cls(
            url=row.webhook_url,
            state=row.webhook_state,
            attempts=row.webhook_attempts,
            last_status_code=row.webhook_last_status_code,
            last_error=row.webhook_last_error,
            next_attempt_at=datetime.fromtimestamp(next_at, UTC) if next_at is not None else None,
            delivered_at=as_utc(row.webhook_delivered_at),
        )


class RequestOut(BaseModel):
    request_id: str
    status: str
    progress: ProgressOut
    products: int
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    output_csv_url: str | None
    error: str | None
    webhook: WebhookOut | None

    @classmethod
    def from_row(cls, row: Any, output_csv_url: str | None) -> RequestOut:
        webhook = WebhookOut.from_row(row) if row.webhook_url else None
        return cls(
            request_id=row.id,
            status=row.status,
            progress=ProgressOut(
                total=row.total,
                pending=row.pending,
                processing=row.processing,
                completed=row.completed,
                failed=row.failed,
            ),
            products=row.products,
            options=row.options,
            created_at=as_utc(row.created_at),  # type: ignore[arg-type]
            updated_at=as_utc(row.updated_at),  # type: ignore[arg-type]
            finished_at=as_utc(row.finished_at),
            output_csv_url=output_csv_url,
            error=row.error,
            webhook=webhook,
        )


class ErrorOut(BaseModel):
    code: str
    message: str


class ImageOut(BaseModel):
    position: int
    input_url: str
    status: str
    output_url: str | None
    error: ErrorOut | None
    bytes_in: int | None
    bytes_out: int | None
    width: int | None
    height: int | None
    format: str | None
    source_quality: int | None
    output_quality: int | None
    kept_source: bool | None
    attempts: int

    @classmethod
    def from_row(cls, row: Any) -> ImageOut:
        error = (
            ErrorOut(code=row.error_code, message=row.error_message or "")
            if row.error_code
            else None
        )
        return cls(
            position=row.position,
            input_url=row.input_url,
            status=row.status,
            output_url=row.output_url,
            error=error,
            bytes_in=row.bytes_in,
            bytes_out=row.bytes_out,
            width=row.width,
            height=row.height,
            format=row.format,
            source_quality=row.source_quality,
            output_quality=row.output_quality,
            kept_source=row.kept_source,
            attempts=row.attempts,
        )


class ProductOut(BaseModel):
    serial_number: str
    line: int
    product_name: str
    status: str
    images: list[ImageOut]

    @classmethod
    def from_rows(cls, product: Any, images: list[Any]) -> ProductOut:
        return cls(
            serial_number=product.serial_number,
            line=product.line,
            product_name=product.product_name,
            status=product_status([image.status for image in images]),
            images=[ImageOut.from_row(image) for image in images],
        )


class ProductPage(BaseModel):
    items: list[ProductOut]
    offset: int
    limit: int
    total: int


class RequestPage(BaseModel):
    items: list[RequestOut]
    offset: int
    limit: int
    total: int
