"""The transactional outbox relay: tasks committed in the database reach the broker.

An upload (and the transaction that records a request's last image) inserts tasks
with ``published_at`` unset. The relay publishes them in id order and then marks
them, with the place each landed in the broker's log; a crash between the two
publishes them again, which is harmless because processing is idempotent. Several
relays run (one per process): each publishes a batch while holding its rows
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the write lock on SQLite) and marks it in
the same transaction, so relays side by side never publish a task twice, which would
have two workers process it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, is_transient
from pixelmill.logs import FailureStreak

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRecord:
    """What the broker carries for a task: its id and enough to route it."""

    task_id: int
    request_id: str
    kind: str
    seq: int


@dataclass(frozen=True)
class Placement:
    """Where the broker put a record: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    def columns(self) -> dict[str, Any]:
        """The ``tasks`` columns that record it."""
        return {
            "published_topic": self.topic,
            "published_partition": self.partition,
            "published_offset": self.offset,
        }


# ``publish`` sends the records and returns where each landed, in the same order.
Publish = Callable[[list[TaskRecord]], Awaitable[Sequence[Placement]]]

_MARK = (
    update(t.tasks)
    .where(t.tasks.c.id == bindparam("task_id"))
    .values(
        published_at=bindparam("at"),
        published_topic=bindparam("topic"),
        published_partition=bindparam("partition"),
        published_offset=bindparam("offset"),
    )
)


class OutboxRelay:
    """Publishes unpublished queued tasks with ``publish``, oldest first."""

    def __init__(
        self,
        db: Database,
        publish: Publish,
        *,
        interval: float = 1.0,
        batch: int = 500,
        publish_timeout: float = 10.0,
        backend_away: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        self.db = db
        self.publish = publish
        self.backend_away = backend_away  # a failure worth a line, not a traceback
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
        publishing = FailureStreak(log, "publishing tasks", expected=self.backend_away)
        while not self._stopping:
            self._wakeup.clear()
            try:
                while await self.relay_once() == self.batch:
                    pass
                publishing.succeeded()
            except Exception as exc:  # the broker or the database is away: try later
                publishing.failed(exc)
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
            placements = await asyncio.wait_for(
                self.publish([TaskRecord(r.id, r.request_id, r.kind, r.seq) for r in rows]),
                self.publish_timeout,
            )
            now = time.time()
            await conn.execute(
                _MARK,
                [
                    {"task_id": r.id, "at": now, "topic": p.topic, "partition": p.partition,
                     "offset": p.offset}
                    for r, p in zip(rows, placements, strict=True)
                ],
            )  # fmt: skip
        return len(rows)
