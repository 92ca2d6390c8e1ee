"""Statuses, error codes, options and results: the model of pixelmill in plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class ImageStatus(StrEnum):
    """Where one image stands; it only moves forward."""

    PENDING = "pending"  # stored with its request, not yet taken by a worker
    PROCESSING = "processing"  # its task is leased by a worker
    COMPLETED = "completed"  # processed and stored; output_url is set
    FAILED = "failed"  # gave up; error_code says why

    @property
    def terminal(self) -> bool:
        return self in (ImageStatus.COMPLETED, ImageStatus.FAILED)


class RequestStatus(StrEnum):
    """Where one uploaded CSV stands; it only moves forward."""

    PENDING = "pending"  # accepted, no task taken yet
    PROCESSING = "processing"  # at least one task taken
    COMPLETED = "completed"  # every image terminal, at least one completed
    FAILED = "failed"  # nothing could be processed

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED)


class DeliveryState(StrEnum):
    """Where the webhook call of a request stands."""

    PENDING = "pending"  # waiting for the request to finish, or for its next attempt
    DELIVERING = "delivering"  # an attempt is in flight
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # gave up: every attempt failed, or the receiver answered 410 Gone


class TaskKind(StrEnum):
    """What a task on the queue asks a worker to do."""

    PROCESS = "process"  # process the images of a block of rows
    FINALIZE = "finalize"  # write the output CSV and close the request


class ErrorCode(StrEnum):
    """Stable codes for a failed image; see docs/errors.md."""

    INVALID_URL = "invalid_url"
    FORBIDDEN_ADDRESS = "forbidden_address"
    DNS_ERROR = "dns_error"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    HTTP_ERROR = "http_error"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    STORAGE_ERROR = "storage_error"
    INTERNAL_ERROR = "internal_error"

    @property
    def transient(self) -> bool:
        """Whether a later attempt may succeed (retried with backoff)."""
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {
        ErrorCode.DNS_ERROR,
        ErrorCode.CONNECT_ERROR,
        ErrorCode.TIMEOUT,
        ErrorCode.STORAGE_ERROR,
        ErrorCode.INTERNAL_ERROR,
    }
)

OutputFormat = Literal["keep", "jpeg", "webp", "png", "avif"]


# The largest ``max_width`` or ``max_height`` a request may ask for.
MAX_OUTPUT_SIDE = 20_000


@dataclass(frozen=True)
class ProcessingOptions:
    """How the images of one request are transformed."""

    quality: int = 50  # percent of the source's quality
    max_width: int | None = None
    max_height: int | None = None
    format: OutputFormat = "keep"

    def as_dict(self) -> dict[str, object]:
        return {
            "quality": self.quality,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "format": self.format,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ProcessingOptions:
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ImageFailure:
    """Why an image could not be processed, as a value with a stable code."""

    code: ErrorCode
    message: str
    transient: bool | None = None  # None: decided by the code
    retry_after: float | None = None  # seconds the source asked us to wait

    @property
    def is_transient(self) -> bool:
        return self.code.transient if self.transient is None else self.transient


@dataclass(frozen=True)
class ProcessedImage:
    """What the imaging service reports for a processed, stored image."""

    output_key: str
    output_url: str
    format: str
    width: int
    height: int
    bytes_in: int
    bytes_out: int
    source_quality: int | None
    output_quality: int | None
    kept_source: bool = False
    duration_ms: float = 0.0


ImageOutcome = ProcessedImage | ImageFailure


@dataclass
class Progress:
    """Counts of a request's images by status."""

    total: int = 0
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "pending": self.pending,
            "processing": self.processing,
            "completed": self.completed,
            "failed": self.failed,
        }


@dataclass
class ImageRecord:
    """One image of a task, as the worker sees it; ``status`` is the image's status when
    the task was taken (``pending``: never started; ``processing``: an earlier delivery
    of the task started it)."""

    id: int
    row_index: int
    position: int
    input_url: str
    status: ImageStatus
    attempts: int = 0
