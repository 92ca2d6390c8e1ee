"""The transactional outbox relay: tasks committed in the database reach the broker.

An upload (and the transaction that records a request's last image) inserts tasks
with ``published_at`` unset. The relay publishes them in id order and then marks
them; a crash between the two publishes them again, which is harmless because
processing is idempotent. Several relays run (one per process): each publishes a batch
while holding its rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the write lock on
SQLite) and marks it in the same transaction, so relays side by side never publish a
task twice, which would have two workers process it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import select, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRecord:
    """What the broker carries for a task: its id and enough to route it."""

    task_id: int
    request_id: str
    kind: str
    seq: int


class OutboxRelay:
    """Publishes unpublished queued tasks with ``publish``, oldest first."""

    def __init__(
        self,
        db: Database,
        publish: Callable[[list[TaskRecord]], Awaitable[None]],
        *,
        interval: float = 1.0,
        batch: int = 500,
        publish_timeout: float = 10.0,
    ) -> None:
        self.db = db
        self.publish = publish
        self.interval = interval
        self.batch = batch
        self.publish_timeout = publish_timeout
        self._wakeup = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until stopped; look again at every wake-up and every ``interval``."""
        while not self._stopping:
            self._wakeup.clear()
            try:
                while await self.relay_once() == self.batch:
                    pass
            except Exception as exc:  # the broker or the database is away: try later
                log.warning("publishing tasks failed, will retry: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.interval)

    async def relay_once(self) -> int:
        """Publish one batch of pending tasks; returns how many were published."""
        pending = (
            select(t.tasks.c.id, t.tasks.c.request_id, t.tasks.c.kind, t.tasks.c.seq)
            .where(t.tasks.c.published_at.is_(None) & (t.tasks.c.state == "queued"))
            .order_by(t.tasks.c.id)
            .limit(self.batch)
        )
        # Idle relays poll: a plain read (no lock) tells whether there is anything to do.
        async with self.db.read() as conn:
            if (await conn.execute(pending.limit(1))).first() is None:
                return 0
        if not self.db.is_sqlite:
            pending = pending.with_for_update(skip_locked=True)
        async with self.db.write() as conn:
            rows = (await conn.execute(pending)).all()
            if not rows:
                return 0  # another relay holds them
            # Bounded: the rows (on SQLite, every writer) wait for this publish.
            await asyncio.wait_for(
                self.publish([TaskRecord(r.id, r.request_id, r.kind, r.seq) for r in rows]),
                self.publish_timeout,
            )
            await conn.execute(
                update(t.tasks)
                .where(t.tasks.c.id.in_([r.id for r in rows]))
                .values(published_at=time.time())
            )
        return len(rows)
