"""The Queue boundary: how workers receive tasks and say what became of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pixelmill.domain import TaskKind


@dataclass(frozen=True)
class TaskMessage:
    """A task handed to a worker; ``attempt`` counts deliveries, from 1."""

    task_id: int
    request_id: str
    kind: TaskKind
    attempt: int
    receipt: object = field(default=None, compare=False)  # the backend's handle


class Queue(Protocol):
    """At-least-once delivery of tasks to workers.

    A received task is leased to the receiver until it is acknowledged, retried or
    released; a receiver that dies loses the lease and the task is delivered again.
    """

    async def start(self) -> None:
        """Connect, and start what runs in the background (e.g. an outbox relay)."""
        ...

    async def receive(self, timeout: float) -> TaskMessage | None:
        """The next task, waiting up to ``timeout`` seconds; None when there was none
        (possibly sooner, after a :meth:`wake` that found nothing to take)."""
        ...

    async def renew(self, message: TaskMessage) -> bool:
        """Extend the lease; False when it was lost (the task went to someone else)."""
        ...

    async def ack(self, message: TaskMessage) -> None:
        """The task is done; it is never delivered again."""
        ...

    async def retry(self, message: TaskMessage, delay: float, error: str) -> None:
        """Deliver the task again after ``delay`` seconds (dead-lettered past the limit)."""
        ...

    async def release(self, message: TaskMessage) -> None:
        """Give the task back at once, undone (graceful shutdown)."""
        ...

    def redeliver_later(self, message: TaskMessage) -> None:
        """Settling the task failed part-way (an ack, retry or release that raised: the
        database away): deliver it again once its lease would have run out."""
        ...

    def wake(self) -> None:
        """A hint that new tasks were stored, so idle receivers look now."""
        ...

    async def close(self) -> None: ...
