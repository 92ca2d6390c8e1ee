"""The state of the whole pipeline in a few aggregate queries, for ``/metrics``.

Read from the database, so that every API replica reports the same figures for every
worker on every host. Open tasks are read through the partial index of open tasks and
dead ones through the claim index; the requests and the webhook deliveries (one per
request at most) are read whole, which stays cheap while old requests are pruned
(``pixelmill requests prune``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.domain import DeliveryState, RequestStatus

TASK_STATES = ("queued", "leased", "dead")


@dataclass(frozen=True)
class PipelineStats:
    """Counts across every request, task and webhook delivery in the database."""

    requests: dict[str, int] = field(default_factory=dict)  # by status
    images_finished: dict[str, int] = field(default_factory=dict)  # completed, failed
    images_unfinished: dict[str, int] = field(default_factory=dict)  # pending, processing
    tasks: dict[str, int] = field(default_factory=dict)  # queued, leased, dead
    unpublished_tasks: int | None = None  # open tasks the outbox has not published
    webhook_deliveries: dict[str, int] = field(default_factory=dict)  # by state


async def pipeline_stats(db: Database, *, outbox: bool) -> PipelineStats:
    """The counts, in one read transaction; ``outbox``: count unpublished tasks too
    (an external queue; the queue table publishes nothing)."""
    r, tk, d = t.requests.c, t.tasks.c, t.webhook_deliveries.c
    async with db.read() as conn:
        by_status = (
            await conn.execute(
                select(
                    r.status, func.count(), func.sum(r.completed), func.sum(r.failed),
                    func.sum(r.pending), func.sum(r.processing),
                ).group_by(r.status)
            )
        ).all()  # fmt: skip
        open_tasks = (
            await conn.execute(select(tk.state, func.count()).where(t.OPEN_TASK).group_by(tk.state))
        ).all()
        dead = (
            await conn.execute(select(func.count()).select_from(t.tasks).where(tk.state == "dead"))
        ).scalar_one()
        unpublished = None
        if outbox:
            unpublished = (
                await conn.execute(
                    select(func.count())
                    .select_from(t.tasks)
                    .where(t.OPEN_TASK, tk.published_at.is_(None))
                )
            ).scalar_one()
        deliveries = (await conn.execute(select(d.state, func.count()).group_by(d.state))).all()

    requests = dict.fromkeys(map(str, RequestStatus), 0) | {row[0]: row[1] for row in by_status}
    finished = {"completed": 0, "failed": 0}
    unfinished = {"pending": 0, "processing": 0}
    for status, _, completed, failed, pending, processing in by_status:
        finished["completed"] += completed or 0
        finished["failed"] += failed or 0
        if not RequestStatus(status).finished:
            unfinished["pending"] += pending or 0
            unfinished["processing"] += processing or 0
    tasks = dict.fromkeys(TASK_STATES, 0) | {row[0]: row[1] for row in open_tasks}
    tasks["dead"] = dead
    webhooks = dict.fromkeys(map(str, DeliveryState), 0) | {row[0]: row[1] for row in deliveries}
    return PipelineStats(
        requests=requests,
        images_finished=finished,
        images_unfinished=unfinished,
        tasks=tasks,
        unpublished_tasks=unpublished,
        webhook_deliveries=webhooks,
    )
