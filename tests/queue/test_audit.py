"""The outbox audit against a real broker that restarts and loses its log.

The Tansu broker keeps its log in memory: killed with SIGKILL and started again on the
same port, it has lost every record, topic and committed offset. The audit must find
the published tasks that can no longer be delivered, and only those: a task waiting in
a backlog, or in the hands of a live worker, is left alone. The first test runs on
SQLite and on PostgreSQL (the audit's queries differ by database), the others on
PostgreSQL, the database of the distributed mode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.queue import Queue, TaskMessage
from pixelmill.queue.kafka import KafkaQueue
from tests.support.databases import PostgresServer, migrated
from tests.support.kafka import TansuBroker
from tests.support.queues import member, receive, stage, tasks_of
from tests.support.waiting import async_wait_until

Place = tuple[str, int, int]  # topic, partition, offset


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A broker of this test's own, to restart."""
    running = TansuBroker(tmp_path / "broker.log").start()
    yield running
    running.stop()


def settings_for(broker: TansuBroker, database_url: str, tmp_path: Path, lease: float) -> Settings:
    """The audit runs only when a test calls it (its own period is an hour)."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        queue_url=f"{broker.queue_url('audited')}&audit_interval_ms=3600000",
        lease_seconds=lease,
        poll_interval=0.05,
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with migrated(database_url) as database:
        yield database


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh PostgreSQL database, for the tests that need one pass only."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture
async def postgres_db(postgres_url: str) -> AsyncIterator[Database]:
    async with migrated(postgres_url) as database:
        yield database


async def places(db: Database, request_id: str) -> dict[int, Place | None]:
    """Where each task of the request was published (None: not published)."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                t.tasks.c.id,
                t.tasks.c.published_topic,
                t.tasks.c.published_partition,
                t.tasks.c.published_offset,
            ).where(t.tasks.c.request_id == request_id)
        )
        return {
            row.id: None
            if row.published_topic is None
            else (row.published_topic, row.published_partition, row.published_offset)
            for row in rows
        }


async def published(db: Database, request_id: str) -> dict[int, Place]:
    """The request's tasks once the relay has published every one."""

    async def all_published() -> dict[int, Place] | None:
        found = await places(db, request_id)
        if None in found.values():
            return None
        return {task: place for task, place in found.items() if place is not None}

    return await async_wait_until(all_published, timeout=30, what="every task published")


async def audited(queue: Queue) -> list[int]:
    """The tasks one audit put back in the outbox. An audit that fails because the
    broker is still coming back is run again, as the audit's own loop does."""
    assert isinstance(queue, KafkaQueue)

    async def once() -> tuple[list[int]] | None:
        try:
            return (await queue.audit.audit_once(),)
        except (KafkaError, TimeoutError):
            return None

    (requeued,) = await async_wait_until(once, timeout=30, what="an audit")
    return requeued


async def ack_all(queue: Queue, count: int) -> list[int]:
    """Receive ``count`` tasks and acknowledge each; returns their ids."""
    messages = await receive(queue, count)
    for message in messages:
        await queue.ack(message)
    return [message.task_id for message in messages]


async def test_tasks_the_broker_lost_are_published_again_and_a_backlog_is_left_alone(
    broker: TansuBroker, database_url: str, db: Database, tmp_path: Path
) -> None:
    settings = settings_for(broker, database_url, tmp_path, lease=60)
    async with member(settings, db, "worker-a") as queue:
        first = await stage(db, tmp_path, rows=48)  # 24 tasks
        queue.wake()
        before = await published(db, first)
        assert await audited(queue) == [], "a backlog is left alone"

        broker.restart()
        # The log grows again: the next request's records take the lost ones' offsets.
        second = await stage(db, tmp_path, rows=16)  # 8 tasks
        queue.wake()
        ends = Counter(
            (topic, partition) for topic, partition, _ in (await published(db, second)).values()
        )
        beyond = {task for task, (topic, p, offset) in before.items() if offset >= ends[topic, p]}
        assert beyond and beyond != set(before)

        # Past the new end: lost for sure. Some below it may be found too, by reading
        # another task's record at their place. The second request's tasks are in the log.
        first_round = set(await audited(queue))
        assert beyond <= first_round <= set(before)
        # Published again, they are delivered with the second request's tasks; the
        # group commits past the places the rest of the lost tasks had.
        delivered = await ack_all(queue, len(first_round) + 8)
        assert set(delivered) == first_round | set(await tasks_of(db, second))
        assert await queue.receive(timeout=1) is None

        # Behind the group's committed offset and not done: lost too.
        rest = set(before) - first_round
        assert set(await audited(queue)) == rest
        assert set(await ack_all(queue, len(rest))) == rest
        assert await audited(queue) == []

    states = {**await tasks_of(db, first), **await tasks_of(db, second)}
    assert set(states.values()) == {("done", 1)}, "every task done, each delivered once"


@asynccontextmanager
async def one_task_in_hand(
    broker: TansuBroker, url: str, db: Database, tmp_path: Path, lease: float
) -> AsyncIterator[tuple[Queue, TaskMessage, str]]:
    """A member holding the only task of a request, and the broker restarted after it
    took it: the queue, the task in hand, and the request."""
    async with member(settings_for(broker, url, tmp_path, lease), db, "worker-a") as queue:
        request_id = await stage(db, tmp_path, rows=2)
        queue.wake()
        (held,) = await receive(queue, 1)
        broker.restart()
        yield queue, held, request_id


@pytest.mark.parametrize("rejoined_first", [False, True], ids=["released", "rejoined-released"])
async def test_a_task_in_hand_is_left_to_its_holder_until_it_gives_it_back(
    broker: TansuBroker,
    postgres_url: str,
    postgres_db: Database,
    tmp_path: Path,
    rejoined_first: bool,
) -> None:
    """The holder gives the task back before, or after, its consumer has rejoined the
    group on the restarted broker (which revokes its partitions and assigns them back,
    its records gone): either way its lease is given back and the task published again."""
    in_hand = one_task_in_hand(broker, postgres_url, postgres_db, tmp_path, lease=60)
    async with in_hand as (queue, held, request_id):
        assert await audited(queue) == [], "its holder still has it"
        if rejoined_first:
            assert isinstance(queue, KafkaQueue)

            async def rejoined() -> bool:
                assert await queue.receive(timeout=0.1) is None
                return queue._receipt(held) is None  # a delivery from before the rebalance

            await async_wait_until(rejoined, timeout=30, what="the member rejoined the group")
        await queue.release(held)  # as a worker does when it loses the partition, or stops
        assert await audited(queue) == [held.task_id]
        (again,) = await receive(queue, 1)
        assert (again.task_id, again.attempt) == (held.task_id, 1), "a release costs no attempt"
        await queue.ack(again)
    assert await tasks_of(postgres_db, request_id) == {held.task_id: ("done", 1)}


async def test_a_task_whose_holder_died_comes_back_when_its_lease_runs_out(
    broker: TansuBroker, postgres_url: str, postgres_db: Database, tmp_path: Path
) -> None:
    # The task in hand is never renewed: as if its worker died.
    in_hand = one_task_in_hand(broker, postgres_url, postgres_db, tmp_path, lease=1)
    async with in_hand as (queue, held, request_id):

        async def requeued() -> list[int]:
            return await audited(queue)

        # Once its lease has run out: until then the audit leaves it alone.
        assert await async_wait_until(requeued, timeout=30, what="the requeue") == [held.task_id]
        (again,) = await receive(queue, 1)
        assert (again.task_id, again.attempt) == (held.task_id, 2)
        await queue.ack(again)
    assert await tasks_of(postgres_db, request_id) == {held.task_id: ("done", 2)}
