"""The outbox audit: published tasks that the broker can no longer deliver go back.

A broker can lose records that it acknowledged: a restart without its log, an unclean
leader election, a topic deleted and created again, retention that deleted records no
one had consumed yet. The relay has marked those tasks published, so without this
audit they would never be delivered, and their requests never finish.

The relay records where each task landed (topic, partition, offset). Every few
seconds the audit compares the open tasks that no one holds (``queued``, or
``leased`` by someone who stopped renewing the lease) with what the broker says of
each partition now (:class:`LogSnapshot`). Suspects are the tasks before the
partition's first offset or the group's committed offset, at or past its end, or on a
partition that is gone. A task that merely waits in a backlog is none of these, so a
long backlog is never published twice.

A suspect is lost if its place is gone, if the record at its place is not this task
(the log lost it; another record may have taken its offset since the log grew
again), or if the group committed past it though it is not done (the group will never
read it). Reading the record, rather than trusting the end offset, also copes with
brokers whose end offsets lag behind their log. Suspects are judged once without a
lock, so that a record that is there costs no lock; those that look lost are then
locked (``FOR UPDATE SKIP LOCKED``; the write lock on SQLite) and judged again on what
the broker says after the lock. Lost tasks go back in the outbox, unpublished, and
the relay publishes them again. Because of the lock, a task published or finished
meanwhile is never taken for lost, and the audits side by side (one in each process
that runs a relay) never requeue a task twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Row, and_, false, or_, select, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, is_transient
from pixelmill.logs import FailureStreak

log = logging.getLogger(__name__)

t_tasks = t.tasks

Place = tuple[str, int, int]  # topic, partition, offset


@dataclass(frozen=True)
class PartitionLog:
    """What the broker says of one partition: the records it holds are those from
    ``start`` to ``end`` (excluded); the group has done those before ``committed``."""

    start: int
    end: int
    committed: int | None = None  # the consumer group's committed offset, if any


@dataclass(frozen=True)
class LogSnapshot:
    """The partitions of the task topics as the broker sees them, and when it was asked."""

    taken_at: float
    topics: Mapping[str, Mapping[int, PartitionLog]]

    def suspects(self) -> ColumnElement[bool]:
        """Tasks of these topics that may be lost: on a partition that is gone, before
        its first offset or its committed one, or at or past its end. A wide net: the
        record at each suspect's place decides (see :func:`lost`)."""
        cases = [
            (t_tasks.c.published_topic == topic)
            & t_tasks.c.published_partition.not_in(list(partitions))
            for topic, partitions in self.topics.items()
        ]
        for topic, partitions in self.topics.items():
            for number, bounds in partitions.items():
                offset = t_tasks.c.published_offset
                outside = (offset < max(bounds.start, bounds.committed or 0)) | (
                    offset >= bounds.end
                )
                cases.append(
                    (t_tasks.c.published_topic == topic)
                    & (t_tasks.c.published_partition == number)
                    & outside
                )
        return or_(false(), *cases)

    def gone(self, place: Place) -> bool:
        """The log no longer has this place: its partition is gone, or retention
        deleted it. Places on topics this snapshot does not cover are never gone."""
        topic, partition, offset = place
        if topic not in self.topics:
            return False
        bounds = self.topics[topic].get(partition)
        return bounds is None or offset < bounds.start


@dataclass(frozen=True)
class Reading:
    """What the broker's log holds at some places."""

    tasks: Mapping[Place, int]  # the task of the record found at each place
    ends: Mapping[tuple[str, int], int]  # each partition's end, as its fetch reported it


def lost(task: int, place: Place, snapshot: LogSnapshot, reading: Reading) -> bool:
    """Whether the record of ``task``, published at ``place`` and not gone from the
    snapshot, cannot be delivered: it is not there (the log lost it, and another
    record may have taken its offset since), or the group committed past it though
    the task is not done. A committed offset past the end was committed on a log that
    is gone; the group starts again from the beginning there, so it does not count."""
    if reading.tasks.get(place) != task:
        return True
    topic, partition, offset = place
    committed = snapshot.topics[topic][partition].committed
    end = reading.ends.get((topic, partition))
    return committed is not None and end is not None and offset < committed <= end


class TaskLog(Protocol):
    """What the audit asks the broker."""

    async def snapshot(self) -> LogSnapshot:
        """The bounds of every partition of the topics where undone tasks wait."""
        ...

    async def read(self, places: Collection[Place]) -> Reading:
        """The tasks of the records at these places, as far as the log still holds them."""
        ...


def unheld(now: float) -> ColumnElement[bool]:
    """Published open tasks that no one holds: queued, or leased by someone who stopped
    renewing. The literal open-task condition lets the planner use ``ix_tasks_placement``."""
    return and_(
        t.OPEN_TASK,
        t_tasks.c.published_at.is_not(None),
        or_(
            t_tasks.c.state == "queued",
            t_tasks.c.lease_expires_at.is_(None),
            t_tasks.c.lease_expires_at < now,
        ),
    )


_PLACED = (
    t_tasks.c.id,
    t_tasks.c.published_topic,
    t_tasks.c.published_partition,
    t_tasks.c.published_offset,
)


class OutboxAudit:
    """Finds published tasks the broker lost, and puts them back in the outbox."""

    def __init__(
        self,
        db: Database,
        broker: TaskLog,
        *,
        on_requeued: Callable[[], None] = lambda: None,
        interval: float = 5.0,
        timeout: float = 10.0,
        batch: int = 1000,
        backend_away: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        self.db = db
        self.broker = broker
        self.backend_away = backend_away  # a failure worth a line, not a traceback
        self.on_requeued = on_requeued  # e.g. wake the relay: there is work for it
        self.interval = interval
        self.timeout = timeout  # for each question to the broker
        self.batch = batch
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        """Audit every ``interval`` until stopped."""
        auditing = FailureStreak(log, "auditing the published tasks", expected=self.backend_away)
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.interval)
            try:
                while not self._stopped.is_set() and len(await self.audit_once()) == self.batch:
                    pass
                auditing.succeeded()
            except Exception as exc:  # the broker or the database is away: try later
                auditing.failed(exc)

    async def audit_once(self) -> list[int]:
        """Put back in the outbox (up to ``batch``) tasks the broker cannot deliver;
        returns their ids."""
        snapshot = await self._snapshot()
        suspects = await self._suspects(snapshot)
        # Judged first without a lock: a suspect whose record is there costs no lock.
        likely = await self._judge(suspects, snapshot) if suspects else set()
        requeued = await self._requeue(likely) if likely else []
        if requeued:
            log.warning(
                "%d published tasks are lost from the broker's log; publishing again: %s",
                len(requeued),
                requeued[:20],
            )
            self.on_requeued()
        return requeued

    async def _snapshot(self) -> LogSnapshot:
        return await asyncio.wait_for(self.broker.snapshot(), self.timeout)

    async def _suspects(self, snapshot: LogSnapshot) -> dict[int, Place]:
        """Tasks that look lost by their place. Only tasks published before the
        snapshot was taken: a later one may be past the end the snapshot saw."""
        query = (
            select(*_PLACED)
            .where(
                unheld(time.time()),
                t_tasks.c.published_at < snapshot.taken_at,
                snapshot.suspects(),
            )
            .order_by(t_tasks.c.id)
            .limit(self.batch)
        )
        async with self.db.read() as conn:
            return _places(await conn.execute(query))

    async def _judge(self, placed: Mapping[int, Place], snapshot: LogSnapshot) -> set[int]:
        """The tasks whose record cannot be delivered, by the snapshot and by reading
        the records at their places (those not gone from the log)."""
        gone = {task for task, place in placed.items() if snapshot.gone(place)}
        there = {task: place for task, place in placed.items() if task not in gone}
        reading = await asyncio.wait_for(self.broker.read(there.values()), self.timeout)
        return gone | {
            task for task, place in there.items() if lost(task, place, snapshot, reading)
        }

    async def _requeue(self, likely: set[int]) -> list[int]:
        """Lock the likely lost tasks, judge them again on what the broker says now, and
        unpublish the lost ones. Every record of a locked task was written before the
        lock, and no locked task can be finished (and committed past) meanwhile."""
        mine = select(*_PLACED).where(t_tasks.c.id.in_(likely), unheld(time.time()))
        if not self.db.is_sqlite:
            mine = mine.with_for_update(skip_locked=True)
        async with self.db.write() as conn:
            locked = _places(await conn.execute(mine))
            lost_tasks = await self._judge(locked, await self._snapshot()) if locked else set()
            if not lost_tasks:
                return []
            await conn.execute(
                update(t_tasks)
                .where(t_tasks.c.id.in_(lost_tasks))
                .values(
                    state="queued",
                    available_at=time.time(),
                    lease_owner=None,
                    lease_expires_at=None,
                    published_at=None,
                    published_topic=None,
                    published_partition=None,
                    published_offset=None,
                )
            )
            return sorted(lost_tasks)


def _places(rows: Iterable[Row[Any]]) -> dict[int, Place]:
    return {
        row.id: (row.published_topic, row.published_partition, row.published_offset) for row in rows
    }
