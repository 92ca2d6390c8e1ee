"""The embedded queue: the ``tasks`` table itself, with leases.

A task is claimed by one conditional UPDATE (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL), so two workers never hold it at once; a worker renews its lease while it
works, and a task whose lease ran out (its worker died) is claimed again. Claims and
moves are retried after a lost connection: each is conditional, so a repeat is harmless
(a claim whose reply was lost is claimed again when its lease runs out).
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import and_, or_, select, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, retry_transient
from pixelmill.domain import TaskKind
from pixelmill.queue.base import TaskMessage
from pixelmill.queue.task_leases import TaskLeases

t_tasks = t.tasks


class DbQueue:
    """Tasks leased from the database by ``owner``."""

    def __init__(
        self,
        db: Database,
        *,
        owner: str,
        lease_seconds: float,
        poll_interval: float,
        max_attempts: int = 10,
    ) -> None:
        self.db = db
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.leases = TaskLeases(db, owner, lease_seconds)
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        """Nothing to start: the table is the queue."""

    def wake(self) -> None:
        # Every receive waiting now hears this wake; later ones wait on a fresh event,
        # so one receiver can never swallow the wake of another.
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def receive(self, timeout: float) -> TaskMessage | None:
        deadline = time.monotonic() + timeout
        woken = False
        while True:
            # Taken before looking, so a wake() during the look is not lost.
            wakeup = self._wakeup
            message = await self._claim()
            remaining = deadline - time.monotonic()
            # After a wake with nothing to take, return at once: the caller may be stopping.
            if message or remaining <= 0 or woken:
                return message
            if not wakeup.is_set():
                try:
                    async with asyncio.timeout(min(self.poll_interval, remaining)):
                        await wakeup.wait()
                except TimeoutError:
                    continue
            woken = True

    @retry_transient
    async def _claim(self) -> TaskMessage | None:
        now = time.time()
        claimable = or_(
            and_(t_tasks.c.state == "queued", t_tasks.c.available_at <= now),
            and_(t_tasks.c.state == "leased", t_tasks.c.lease_expires_at < now),
        )
        candidate = (
            select(t_tasks.c.id)
            .where(and_(t.OPEN_TASK, claimable))  # literal: the planner uses ix_tasks_open
            .order_by(t_tasks.c.priority, t_tasks.c.id)
            .limit(1)
        )
        # Idle workers poll: a plain read (no write lock) tells whether to try a claim.
        async with self.db.read() as conn:
            if (await conn.execute(candidate)).first() is None:
                return None
        if not self.db.is_sqlite:
            candidate = candidate.with_for_update(skip_locked=True)
        statement = (
            update(t_tasks)
            .where(t_tasks.c.id == candidate.scalar_subquery())
            .values(
                state="leased",
                lease_owner=self.owner,
                lease_expires_at=now + self.lease_seconds,
                attempts=t_tasks.c.attempts + 1,
            )
            .returning(t_tasks.c.id, t_tasks.c.request_id, t_tasks.c.kind, t_tasks.c.attempts)
        )
        async with self.db.write() as conn:
            row = (await conn.execute(statement)).first()
        if row is None:
            return None
        return TaskMessage(row.id, row.request_id, TaskKind(row.kind), row.attempts)

    async def renew(self, message: TaskMessage) -> bool:
        return await self.leases.renew(message.task_id)

    async def ack(self, message: TaskMessage) -> None:
        await self.leases.settle(message.task_id, "done", only_if_mine=True)

    async def retry(self, message: TaskMessage, delay: float, error: str) -> None:
        await self.leases.settle(
            message.task_id,
            "dead" if message.attempt >= self.max_attempts else "queued",
            only_if_mine=True,
            available_at=time.time() + delay,
            last_error=t.bounded_text(error),
        )

    async def release(self, message: TaskMessage) -> None:
        await self.leases.release(message.task_id)

    def redeliver_later(self, message: TaskMessage) -> None:
        """Nothing to do: once its lease runs out, a claim takes the task again."""

    async def close(self) -> None:
        self.wake()
