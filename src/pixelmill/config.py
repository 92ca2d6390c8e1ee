"""Settings, read from ``PIXELMILL_*`` environment variables and validated when built.

Nothing here runs at import time: every process builds its own :class:`Settings`.
Backends are named by URL; the scheme of each URL picks the implementation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _http_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being an http(s) URL with a host and a valid port, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host"
    return None


def imaging_service_urls(imaging_url: str) -> list[str]:
    """The base URLs in ``PIXELMILL_IMAGING_URL`` (comma- or space-separated); raises
    ``ValueError`` saying what is wrong when one is not an http(s) URL with a host."""
    urls = [part.rstrip("/") for part in imaging_url.replace(",", " ").split()]
    if not urls:
        raise ValueError("names no imaging service; use inline:// or http://host:8001")
    for url in urls:
        problem = _http_url_problem(url)
        if problem:
            raise ValueError(
                f"{url!r} {problem}; use inline:// or http://host:8001[,http://host2:8001...]"
            )
    return urls


def _scheme_in(url: str, schemes: tuple[str, ...], use: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        raise ValueError(f"{url!r}: unsupported scheme {scheme!r}; use {use}")
    return url


def _split_list(value: object) -> object:
    """Accept a comma- or space-separated string where a list is expected."""
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


# Delays before the 2nd, 3rd, ... attempt of a webhook: 12 attempts over about 3 days.
DEFAULT_WEBHOOK_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 10800, 21600, 43200, 86400, 86400)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: object) -> object:
    """``90``, ``"90"``, ``"1.5m"``, ``"2h"`` or ``"3d"`` as seconds; other values as given."""
    if isinstance(value, str) and value and value[-1].lower() in _UNITS:
        try:
            return float(value[:-1]) * _UNITS[value[-1].lower()]
        except ValueError:
            return value
    return value


# SQLite's ``PRAGMA synchronous`` levels that pixelmill offers.
SqliteSynchronous = Literal["off", "normal", "full"]


class Settings(BaseSettings):
    """Every setting of pixelmill, with the embedded defaults of DESIGN.md."""

    model_config = SettingsConfigDict(env_prefix="PIXELMILL_", extra="ignore")

    data_dir: Path = Path("./pixelmill-data")
    database_url: str = ""
    queue_url: str = "db://"
    imaging_url: str = "inline://"
    storage_url: str = ""
    public_url: str = "http://127.0.0.1:8000"
    log_level: str = "INFO"
    # Where stored files are served from (a CDN, a bucket's website); default PUBLIC_URL/files.
    storage_base_url: str = ""
    # Connections per process kept open to the database (PostgreSQL may open as many
    # again at peaks): keep processes x 2 x this under the server's max_connections.
    database_pool_size: int = Field(default=10, ge=1)
    # PostgreSQL: the longest a statement may take before it fails (a transient failure);
    # a silent network would otherwise hold it for hours.
    database_command_timeout_seconds: float = Field(default=30.0, gt=0)
    # SQLite's PRAGMA synchronous: "normal" loses no commit when a process crashes (WAL),
    # "full" none on a power cut either; "off" is for a database that lives for one run.
    sqlite_synchronous: SqliteSynchronous = "normal"

    allow_private_urls: bool = False
    trusted_source_prefixes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: str = ""

    # CSV ingestion
    max_upload_bytes: int = Field(default=1024**3, ge=1)
    max_rows: int = Field(default=5_000_000, ge=1)
    max_urls_per_row: int = Field(default=50, ge=1)
    task_max_images: int = Field(default=64, ge=1)
    ingest_batch_rows: int = Field(default=2000, ge=1)

    # Worker
    # Worker processes that ``serve`` and ``process`` run (one event loop and one GIL
    # each); unset: one per core; 0: the worker runs inside the serving process itself.
    worker_processes: int | None = Field(default=None, ge=0)
    worker_concurrency: int = Field(default=16, ge=1)
    worker_tasks_in_flight: int = Field(default=4, ge=1)
    lease_seconds: float = Field(default=60.0, gt=0)
    poll_interval: float = Field(default=0.5, gt=0)
    image_attempts: int = Field(default=4, ge=1)
    task_attempts: int = Field(default=5, ge=1)
    retry_backoff_seconds: float = Field(default=0.5, ge=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)

    # Imaging
    imaging_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    fetch_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    fetch_max_redirects: int = Field(default=5, ge=0)
    fetch_connect_timeout: float = Field(default=10.0, gt=0)
    fetch_read_timeout: float = Field(default=20.0, gt=0)
    fetch_total_timeout: float = Field(default=60.0, gt=0)
    max_pixels: int = Field(default=50_000_000, ge=1)
    max_frames: int = Field(default=1000, ge=1)
    user_agent: str = "pixelmill/0.1 (+https://github.com/pixelmill/pixelmill)"
    min_output_quality: int = Field(default=10, ge=1, le=100)

    # The HTTP imaging service (``pixelmill imaging``) and its client in the worker
    imaging_max_in_flight: int = Field(default_factory=lambda: 4 * (os.cpu_count() or 1), ge=1)
    imaging_token: str = ""  # shared secret: ``Authorization: Bearer TOKEN`` on both sides
    imaging_patience_seconds: float = Field(default=60.0, ge=0)
    imaging_request_timeout: float = Field(default=90.0, gt=0)
    imaging_skip_seconds: float = Field(default=5.0, ge=0)

    # Webhooks (see docs/webhooks.md)
    webhook_timeout: float = Field(default=15.0, gt=0)
    webhook_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [float(d) for d in DEFAULT_WEBHOOK_SCHEDULE], min_length=1
    )
    webhook_jitter: float = Field(default=0.2, ge=0, lt=1)
    webhook_concurrency: int = Field(default=8, ge=1)

    @field_validator("trusted_source_prefixes", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("webhook_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        listed = _split_list(value)
        if isinstance(listed, list):
            return [_seconds(item) for item in listed]
        return listed

    @field_validator("webhook_schedule")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every delay of the webhook schedule must be more than 0 seconds")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level; use one of {', '.join(_LOG_LEVELS)}")
        return level

    @field_validator("trusted_source_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            problem = _http_url_problem(prefix)
            if problem:
                raise ValueError(f"{prefix!r} {problem}")
        return value

    @field_validator("queue_url")
    @classmethod
    def _queue_scheme(cls, value: str) -> str:
        value = _scheme_in(value, ("db", "kafka"), "db:// or kafka://host:9092")
        if value.startswith("kafka:"):
            from pixelmill.queue.kafka_config import KafkaConfig  # no Kafka client loaded

            KafkaConfig.from_url(value)  # its parameters, checked at start
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        if not value:
            return value
        value = _scheme_in(value, ("file", "s3"), "file:///PATH or s3://BUCKET/PREFIX")
        if value.startswith("s3:"):
            from pixelmill.s3_storage import S3Location  # no S3 client loaded

            S3Location.from_url(value)  # its bucket and parameters, checked at start
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        allowed = ("", "sqlite", "postgresql", "postgres")
        if value and value.split(":", 1)[0].split("+", 1)[0] not in allowed:
            raise ValueError(
                f"{value!r}: unsupported database; use sqlite:///PATH or "
                "postgresql://USER@HOST:PORT/DB"
            )
        return value

    @field_validator("imaging_url")
    @classmethod
    def _imaging_urls(cls, value: str) -> str:
        if urlsplit(value.strip()).scheme != "inline":
            imaging_service_urls(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secrets(cls, value: str) -> str:
        from pixelmill.webhooks.signing import parse_secrets

        if value.strip():
            parse_secrets(value)  # a malformed secret is refused when the settings are built
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        self.public_url = self.public_url.rstrip("/")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'pixelmill.db').resolve()}"
        if not self.storage_url:
            self.storage_url = f"file://{(self.data_dir / 'files').resolve()}"
        self.storage_base_url = (self.storage_base_url or f"{self.public_url}/files").rstrip("/")
        return self

    @property
    def worker_process_count(self) -> int:
        """How many worker processes ``serve`` and ``process`` run (0: in-process)."""
        if self.worker_processes is None:
            return os.cpu_count() or 1
        return self.worker_processes

    @property
    def samples_prefix(self) -> str:
        """The URL prefix under which ``serve`` exposes the shipped sample photos."""
        return f"{self.public_url}/samples/"
