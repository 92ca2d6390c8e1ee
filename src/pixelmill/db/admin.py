"""Operator views of the task queue: dead tasks, and putting them back.

The ``tasks`` table is the record for every queue backend: a task that was
dead-lettered is ``dead`` there (and, on Kafka, also on ``<topic>.dead``). Requeueing
it resets its attempts and makes it ``queued`` and unpublished, so the embedded queue
claims it and the outbox relay publishes it to Kafka again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database


@dataclass(frozen=True)
class DeadTask:
    """A task that gave up, and why."""

    task_id: int
    request_id: str
    kind: str
    attempts: int
    last_error: str | None


async def dead_tasks(db: Database, limit: int = 1000) -> list[DeadTask]:
    """Dead tasks, oldest first."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                t.tasks.c.id,
                t.tasks.c.request_id,
                t.tasks.c.kind,
                t.tasks.c.attempts,
                t.tasks.c.last_error,
            )
            .where(t.tasks.c.state == "dead")
            .order_by(t.tasks.c.id)
            .limit(limit)
        )
        return [DeadTask(r.id, r.request_id, r.kind, r.attempts, r.last_error) for r in rows]


async def requeue_dead(db: Database, task_ids: list[int] | None = None) -> int:
    """Put dead tasks (all, or those given) back on the queue; returns how many."""
    condition = t.tasks.c.state == "dead"
    if task_ids is not None:
        condition = condition & t.tasks.c.id.in_(task_ids)
    async with db.write() as conn:
        result = await conn.execute(
            update(t.tasks)
            .where(condition)
            .values(
                state="queued",
                attempts=0,
                available_at=time.time(),
                lease_owner=None,
                lease_expires_at=None,
                published_at=None,
            )
        )
    return int(result.rowcount)
