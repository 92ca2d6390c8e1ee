"""The Queue contract, the same tests for every backend that ``PIXELMILL_QUEUE_URL`` names.

A worker only sees the :class:`~pixelmill.queue.base.Queue` protocol: every task is
delivered, an acknowledged task never comes back, an unacknowledged one comes back with
its delivery counted (also to the same member, when settling it failed), a retry waits
for its delay and ends dead-lettered, and members
that live side by side never get the same task. Each test runs over the backend matrix
(the queue table on SQLite and on PostgreSQL, Kafka on PostgreSQL); what only one
backend does (leases, offsets) is tested beside it, in tests/db/test_queue_db.py and
tests/queue/test_kafka.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.queue import Queue
from pixelmill.queue.kafka import KafkaConfig, KafkaQueue
from tests.support.backends import Backend
from tests.support.databases import migrated
from tests.support.queues import member, receive, stage, tasks_of
from tests.support.waiting import async_wait_until

# Deliveries before a task is dead: open_queue allows 4 x task_attempts.
TASK_ATTEMPTS = 1
MAX_DELIVERIES = 4 * TASK_ATTEMPTS


@pytest.fixture
def queue_settings(backend: Backend, tmp_path: Path) -> Settings:
    """Settings on this pass's backends. The lease outlasts any step of these tests (a
    member here never renews), and is short enough that a gone member's tasks are back
    soon."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=backend.database_url,
        queue_url=backend.queue_url,
        lease_seconds=5,
        poll_interval=0.05,
        task_attempts=TASK_ATTEMPTS,
    )


@pytest.fixture
async def db(queue_settings: Settings) -> AsyncIterator[Database]:
    async with migrated(queue_settings.database_url) as database:
        yield database


async def test_every_task_is_delivered_and_an_acknowledged_one_never_again(
    queue_settings: Settings, db: Database, tmp_path: Path
) -> None:
    first = await stage(db, tmp_path, rows=10)  # 5 tasks
    async with member(queue_settings, db, "worker-a") as queue:
        queue.wake()
        messages = await receive(queue, 5)
        assert sorted(m.task_id for m in messages) == sorted(await tasks_of(db, first))
        assert {(m.request_id, m.attempt) for m in messages} == {(first, 1)}
        for message in messages:
            await queue.ack(message)
    assert set((await tasks_of(db, first)).values()) == {("done", 1)}

    # Another member, later: it gets what was stored since, and nothing acknowledged.
    async with member(queue_settings, db, "worker-b") as queue:
        second = await stage(db, tmp_path, rows=2)
        queue.wake()
        (message,) = await receive(queue, 1)
        assert message.request_id == second
        assert await queue.receive(timeout=1) is None


async def test_an_unacknowledged_task_comes_back_with_its_delivery_counted(
    queue_settings: Settings, db: Database, tmp_path: Path
) -> None:
    request_id = await stage(db, tmp_path, rows=6)  # 3 tasks
    async with member(queue_settings, db, "worker-a") as first:
        first.wake()
        messages = await receive(first, 3)
        acked = min(messages, key=lambda m: m.task_id)
        await first.ack(acked)
    # worker-a is gone with two tasks in hand: worker-b gets those two, and only those.
    async with member(queue_settings, db, "worker-b") as second:
        again = await receive(second, 2)
        assert {m.task_id for m in again} == {m.task_id for m in messages} - {acked.task_id}
        assert {m.attempt for m in again} == {2}, "deliveries are counted"
        assert await second.receive(timeout=1) is None
    states = await tasks_of(db, request_id)
    assert states[acked.task_id] == ("done", 1)


async def test_a_released_task_comes_back_to_its_member_without_a_delivery_counted(
    queue_settings: Settings, db: Database, tmp_path: Path
) -> None:
    """A worker hands a task back undone (it shuts down, or the task moved while it
    held it) and stays: the task is delivered again, here if no one else is there, and
    the release does not count as a delivery."""
    request_id = await stage(db, tmp_path, rows=2)  # one task
    async with member(queue_settings, db, "worker-a") as queue:
        queue.wake()
        (message,) = await receive(queue, 1)
        await queue.release(message)

        (again,) = await receive(queue, 1, timeout=10)
        assert again.task_id == message.task_id
        assert again.attempt == 1, "a release is not a failed delivery"
        await queue.ack(again)
    assert await tasks_of(db, request_id) == {message.task_id: ("done", 1)}


async def test_a_task_left_unsettled_comes_back_to_its_member_after_its_lease(
    queue_settings: Settings, db: Database, tmp_path: Path
) -> None:
    """Settling a task failed part-way (its ack or retry raised: the database away) and
    the worker stays: the task comes back to it once its lease would have run out, with
    the delivery counted, and not before. Nothing else would bring it back here: on
    Kafka its offset stays uncommitted and the consumer has read past it."""
    request_id = await stage(db, tmp_path, rows=2)  # one task
    loop = asyncio.get_running_loop()
    async with member(queue_settings, db, "worker-a") as queue:
        queue.wake()
        (message,) = await receive(queue, 1)
        left_at = loop.time()
        queue.redeliver_later(message)
        assert await queue.receive(timeout=2) is None, "not while the lease may be held"

        (again,) = await receive(queue, 1, timeout=20)
        assert loop.time() - left_at >= queue_settings.lease_seconds - 0.5
        assert again.task_id == message.task_id
        assert again.attempt == 2, "the delivery that was not settled counts"
        await queue.ack(again)
    assert await tasks_of(db, request_id) == {message.task_id: ("done", 2)}


async def test_a_retry_waits_for_its_delay_and_is_dead_after_the_last_delivery(
    queue_settings: Settings, db: Database, tmp_path: Path
) -> None:
    request_id = await stage(db, tmp_path, rows=1)
    loop = asyncio.get_running_loop()
    async with member(queue_settings, db, "worker-a") as queue:
        queue.wake()
        (message,) = await receive(queue, 1)
        retried_at = loop.time()
        await queue.retry(message, 1.5, "boom 1")
        assert await queue.receive(timeout=0.5) is None, "not before its delay"
        (message,) = await receive(queue, 1)
        assert loop.time() - retried_at >= 1.4
        assert message.attempt == 2
        while message.attempt < MAX_DELIVERIES:
            await queue.retry(message, 0.05, f"boom {message.attempt}")
            (message,) = await receive(queue, 1)
        await queue.retry(message, 0.05, "the last straw")
        assert await queue.receive(timeout=1.5) is None, "a dead task is not delivered"
    async with db.read() as conn:
        row = (await conn.execute(select(t.tasks).where(t.tasks.c.request_id == request_id))).one()
    assert (row.state, row.attempts, row.last_error) == ("dead", MAX_DELIVERIES, "the last straw")


async def test_members_side_by_side_share_the_tasks_without_overlap(
    queue_settings: Settings, db: Database, tmp_path: Path, backend: Backend
) -> None:
    async with (
        member(queue_settings, db, "worker-a") as one,
        member(queue_settings, db, "worker-b") as two,
    ):
        if backend.queue == "kafka":
            await _both_in_the_group(one, two, KafkaConfig.from_url(backend.queue_url))
        request_id = await stage(db, tmp_path, rows=24)  # 12 tasks
        one.wake()
        two.wake()
        seen: dict[int, list[str]] = {}

        async def drain(queue: Queue, name: str) -> None:
            while (message := await queue.receive(timeout=3)) is not None:
                seen.setdefault(message.task_id, []).append(name)
                await asyncio.sleep(0.01)  # as a worker would: let the other one look
                await queue.ack(message)

        await asyncio.gather(drain(one, "a"), drain(two, "b"))
    assert sorted(seen) == sorted(await tasks_of(db, request_id)), "every task delivered"
    assert all(len(names) == 1 for names in seen.values()), "none delivered twice"


async def _both_in_the_group(one: Queue, two: Queue, config: KafkaConfig) -> None:
    """Kafka only: wait until each member holds its share of the partitions, so that no
    rebalance happens while the work flows (a rebalance may redeliver, by design)."""
    assert isinstance(one, KafkaQueue) and isinstance(two, KafkaQueue)

    async def joined() -> bool:
        await asyncio.gather(one.receive(timeout=0.2), two.receive(timeout=0.2))
        mine, theirs = one.assigned_partitions, two.assigned_partitions
        split = bool(mine) and bool(theirs) and not mine & theirs
        return split and len(mine | theirs) == 2 * config.partitions

    await async_wait_until(joined, timeout=60, what="both members assigned")
