"""Who holds a task, in the ``tasks`` table: the leases of every queue's members.

The queue table claims a task by leasing its row (queue/db.py). Kafka says nothing of
deliveries, so there the row keeps them too: a member that takes a delivered record
leases the task (``leased``, its name, an expiry) and counts the delivery. Either way
the member renews the lease while it works and settles or releases the task here. The
outbox audit (queue/audit.py) tells a task in live hands from one whose holder is gone
by that lease.

A record is taken only while it is its task's current publication: the place the
relay (or a retry) recorded. A record of a finished task, or an older copy of a task
published again since (by the audit, or by a relay that crashed before it marked its
publish), is skipped, so two copies of a task never run side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, update

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, retry_transient
from pixelmill.queue.outbox import Placement

tasks = t.tasks.c


def _published_at(place: Placement) -> ColumnElement[bool]:
    return (
        (tasks.published_topic == place.topic)
        & (tasks.published_partition == place.partition)
        & (tasks.published_offset == place.offset)
    )


# Published before the relay recorded places (migration 0004): any record of it counts.
_PLACE_UNKNOWN = tasks.published_at.is_not(None) & tasks.published_topic.is_(None)


def _current(place: Placement) -> ColumnElement[bool]:
    """The record at ``place`` is the task's current publication."""
    return _published_at(place) | _PLACE_UNKNOWN


@dataclass(frozen=True)
class TaskLeases:
    """The leases of one member (``owner``) of a queue."""

    db: Database
    owner: str
    lease_seconds: float

    async def take(self, task_id: int, place: Placement) -> int | None:
        """Lease the task whose record was read at ``place`` and count the delivery;
        returns the delivery count, or None when the record is not one to run."""
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    update(t.tasks)
                    .where(
                        (tasks.id == task_id)
                        & tasks.state.in_(("queued", "leased"))
                        & _current(place)
                    )
                    .values(
                        attempts=tasks.attempts + 1,
                        state="leased",
                        lease_owner=self.owner,
                        lease_expires_at=time.time() + self.lease_seconds,
                    )
                    .returning(tasks.attempts)
                )
            ).first()
        return int(row.attempts) if row else None

    async def keep(self, task_id: int, place: Placement) -> bool:
        """Renew our lease for a delivery in our hands whose record was read at
        ``place`` again; no new delivery is counted. False when the lease is no longer
        ours (the task is finished, was published again, or someone else took it)."""
        return await self._extend(self._mine(task_id) & _current(place))

    async def renew(self, task_id: int) -> bool:
        """Extend our lease; False when someone took a later delivery of the task."""
        return await self._extend(self._mine(task_id))

    @retry_transient
    async def _extend(self, row: ColumnElement[bool]) -> bool:
        async with self.db.write() as conn:
            result = await conn.execute(
                update(t.tasks).where(row).values(lease_expires_at=time.time() + self.lease_seconds)
            )
        return result.rowcount == 1

    async def settle(
        self, task_id: int, state: str, *, only_if_mine: bool = False, **values: Any
    ) -> None:
        """Move the task to ``state`` (done, queued, dead): whoever holds it, or only
        while the lease is still ours."""
        row = self._mine(task_id) if only_if_mine else tasks.id == task_id
        await self._set(row, state, values)

    async def finish(self, task_id: int, attempt: int) -> None:
        """Mark done a task that our delivery number ``attempt`` finished. After a move
        (a rebalance) two deliveries may hold it, and both may finish it: one is then
        redundant and not counted, a later one (held by another member by now), or
        ours if another finished the task first. Retried after a lost connection, as
        every settle (a stuck ack would hold the record for ever); if the lost try had
        committed, a redundant delivery is uncounted twice, which only lowers the count."""
        redundant = (tasks.attempts > attempt) | (
            (tasks.state == "done") & (tasks.attempts >= attempt) & (tasks.attempts > 0)
        )
        attempts = case((redundant, tasks.attempts - 1), else_=tasks.attempts)
        await self._set(tasks.id == task_id, "done", {"attempts": attempts})

    async def release(self, task_id: int) -> bool:
        """Give our lease back, and the attempt with it: a release is not a failure.
        Nothing happens if someone took a later delivery of the task (False)."""
        values = {"available_at": time.time(), "attempts": tasks.attempts - 1}
        return await self._set(self._mine(task_id), "queued", values)

    async def give_back_attempt(self, task_id: int, attempt: int) -> None:
        """Our delivery number ``attempt``, taken from us (its task went to another
        member), ended without failing: it is not counted, even if the new holder has
        finished the task meanwhile, unless that finish took it off already
        (:meth:`finish`). The lease is left to its holder. Not
        retried: a retry after a lost answer would take a second attempt off; a failure
        leaves one too many."""
        async with self.db.write() as conn:
            await conn.execute(
                update(t.tasks)
                .where(
                    (tasks.id == task_id)
                    & tasks.state.in_(("queued", "leased", "done"))
                    & (tasks.attempts >= attempt)
                    & (tasks.attempts > 0)
                )
                .values(attempts=tasks.attempts - 1)
            )

    def _mine(self, task_id: int) -> ColumnElement[bool]:
        return (tasks.id == task_id) & (tasks.state == "leased") & (tasks.lease_owner == self.owner)

    # Each move is conditional on the state it leaves, so a retried one is harmless.
    @retry_transient
    async def _set(self, row: ColumnElement[bool], state: str, values: dict[str, Any]) -> bool:
        async with self.db.write() as conn:
            result = await conn.execute(
                update(t.tasks)
                .where(row)
                .values(state=state, lease_owner=None, lease_expires_at=None, **values)
            )
        return result.rowcount == 1
