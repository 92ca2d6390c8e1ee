"""Task queues: the Queue protocol and its backends, chosen by ``PIXELMILL_QUEUE_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit

from pixelmill.config import Settings
from pixelmill.db.engine import Database
from pixelmill.queue.base import Queue, TaskMessage

__all__ = ["Queue", "TaskMessage", "open_queue"]


def open_queue(settings: Settings, db: Database, *, owner: str) -> Queue:
    """The queue named by ``PIXELMILL_QUEUE_URL``; an unknown scheme is refused."""
    scheme = urlsplit(settings.queue_url).scheme
    if scheme == "db":
        from pixelmill.queue.db import DbQueue

        return DbQueue(
            db,
            owner=owner,
            lease_seconds=settings.lease_seconds,
            poll_interval=settings.poll_interval,
            # Workers give up on a task themselves (see Worker); this is the backstop.
            max_attempts=settings.task_attempts * 4,
        )
    if scheme == "kafka":
        from pixelmill.queue.kafka import KafkaConfig, KafkaQueue

        return KafkaQueue(
            KafkaConfig.from_url(settings.queue_url),
            db,
            owner=owner,
            lease_seconds=settings.lease_seconds,
            buffer=settings.worker_tasks_in_flight,
            max_attempts=settings.task_attempts * 4,
        )
    raise ValueError(
        f"PIXELMILL_QUEUE_URL={settings.queue_url!r}: unsupported scheme {scheme!r}; "
        "use db:// or kafka://host:9092"
    )
