"""What only the Kafka queue has: its URL, and the record it runs of each task. Its
behaviour as a queue (delivery, commits, redelivery, retries and dead letters, members
sharing a group) is the Queue contract, in test_contract.py, run against a real
Kafka-protocol broker; the outbox audit is in test_audit.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import select, update

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.queue import TaskMessage
from pixelmill.queue.kafka import KafkaConfig, KafkaQueue, encode_task
from pixelmill.queue.outbox import Placement, TaskRecord
from pixelmill.queue.task_leases import TaskLeases
from tests.support.backends import Backend
from tests.support.databases import migrated
from tests.support.queues import member, receive, stage, tasks_of
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.backends("postgres-kafka")


def test_config_from_url() -> None:
    config = KafkaConfig.from_url("kafka://a:9092,b:9092?topic=t1&partitions=3&group=g")
    assert (config.bootstrap, config.topic, config.partitions, config.group) == (
        "a:9092,b:9092", "t1", 3, "g",
    )  # fmt: skip
    assert (config.retry_topic, config.dead_topic) == ("t1.retry", "t1.dead")
    assert config.audit_interval_ms == 5000
    assert config.client_id == "pixelmill"
    assert KafkaConfig.from_url("kafka://a:9092?client_id=eu-1").client_id == "eu-1"
    assert KafkaConfig.from_url("kafka://a:9092?audit_interval_ms=250").audit_interval_ms == 250
    with pytest.raises(ValueError, match="unknown parameter"):
        KafkaConfig.from_url("kafka://a:9092?topics=x")
    with pytest.raises(ValueError, match="expected kafka://"):
        KafkaConfig.from_url("kafka://")


@pytest.fixture
async def db(backend: Backend) -> AsyncIterator[Database]:
    async with migrated(backend.database_url) as database:
        yield database


async def test_a_copy_of_a_task_that_is_not_its_current_publication_is_skipped(
    backend: Backend, db: Database, tmp_path: Path
) -> None:
    """A relay that dies between publishing and marking leaves a copy in the log; so
    does a task published again. Only the record the task's row points to is run."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=backend.database_url,
        queue_url=backend.queue_url,
        poll_interval=0.05,
    )
    async with member(settings, db, "worker-a") as queue:
        request_id = await stage(db, tmp_path, rows=2)  # one task
        queue.wake()

        async def published() -> str | None:
            async with db.read() as conn:
                query = select(t.tasks.c.id, t.tasks.c.published_topic)
                row = (await conn.execute(query.where(t.tasks.c.request_id == request_id))).one()
            return row.published_topic

        topic = await async_wait_until(published, timeout=30, what="the task published")
        ((task_id, _),) = (await tasks_of(db, request_id)).items()
        config = KafkaConfig.from_url(backend.queue_url)
        async with AIOKafkaProducer(bootstrap_servers=config.bootstrap) as producer:
            copy = TaskRecord(task_id, request_id, "process", 0)
            sent = await producer.send_and_wait(topic, encode_task(copy), key=b"a copy")
        (message,) = await receive(queue, 1)
        assert await queue.receive(timeout=1) is None, "the copy is skipped"
        await queue.ack(message)

        async def read_past_the_copy() -> bool:
            async with admin_client(config.bootstrap) as admin:
                committed = await admin.list_consumer_group_offsets(
                    config.group, partitions=[sent.topic_partition]
                )
            return committed[sent.topic_partition].offset > sent.offset

        await async_wait_until(read_past_the_copy, timeout=30, what="the copy read and passed")
    assert await tasks_of(db, request_id) == {task_id: ("done", 1)}


def _settings(backend: Backend, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=backend.database_url,
        queue_url=backend.queue_url,
        poll_interval=0.05,
    )


async def test_a_partition_given_back_by_a_rebalance_leaves_the_task_in_hand_running(
    backend: Backend, db: Database, tmp_path: Path
) -> None:
    """A member that joins the group revokes every member's partitions; the holder of a
    task gets its partition back and reads the task's record again. The delivery in hand
    goes on: its lease holds (before the record is read again too), the task is not
    delivered twice, its attempt counts once, and its ack commits the record."""
    config = KafkaConfig.from_url(backend.queue_url)
    async with member(_settings(backend, tmp_path), db, "worker-a") as queue:
        request_id = await stage(db, tmp_path, rows=2)  # one task
        queue.wake()
        (message,) = await receive(queue, 1)
        async with _bystander(config) as bystander:

            async def rebalanced() -> bool:
                return bool(bystander.assignment()) and bool(queue.assigned_partitions)

            await async_wait_until(rebalanced, timeout=60, what="the partitions assigned again")
            assert await queue.renew(message), "before its record is read again, still ours"
            renewed_until = await _lease_expiry(db, message.task_id)

            async def kept() -> bool:
                again = await queue.receive(timeout=0.2)
                assert again is None, f"the task in hand was delivered again: {again}"
                return await _lease_expiry(db, message.task_id) > renewed_until

            await async_wait_until(kept, timeout=60, what="the record read again, its lease kept")
            assert await queue.renew(message), "the delivery in hand still holds the task"
            await queue.ack(message)
            await async_wait_until(
                lambda: _committed_past(config, message), timeout=30, what="the record committed"
            )
    assert await tasks_of(db, request_id) == {message.task_id: ("done", 1)}


async def test_tasks_whose_partitions_move_to_another_member_run_there_counted_once(
    backend: Backend, db: Database, tmp_path: Path
) -> None:
    """A second member takes half the partitions while the first holds every task: the
    tasks of the moved partitions are delivered to it, those of the kept ones are not
    delivered again, and every task ends done with one attempt counted."""
    settings = _settings(backend, tmp_path)
    async with member(settings, db, "worker-a") as one:
        request_id = await stage(db, tmp_path, rows=48)  # 24 tasks over 4 partitions
        one.wake()
        held = await receive(one, 24)
        taken_until = {m.task_id: await _lease_expiry(db, m.task_id) for m in held}
        async with member(settings, db, "worker-b") as two:
            assert isinstance(one, KafkaQueue) and isinstance(two, KafkaQueue)
            moved: list[TaskMessage] = []

            async def settled() -> bool:
                again = await one.receive(timeout=0.1)
                assert again is None, f"a task in hand was delivered again: {again}"
                if (message := await two.receive(timeout=0.1)) is not None:
                    moved.append(message)
                mine, theirs = one.assigned_partitions, two.assigned_partitions
                if not mine or not theirs or mine & theirs:
                    return False
                kept = [m for m in held if _partition(m) in mine]
                expected = {m.task_id for m in held if _partition(m) in theirs}
                leased_again = [
                    await _lease_expiry(db, m.task_id) > taken_until[m.task_id] for m in kept
                ]
                return {m.task_id for m in moved} == expected and all(leased_again)

            await async_wait_until(settled, timeout=60, what="the moved tasks delivered")
            assert moved and len(moved) < len(held), "both members hold some of the tasks"
            # The first member finishes one of the moved tasks before it notices the move:
            # the second member's delivery of it is redundant, and is not counted. The
            # second member finishes another before the first lets it go, and a third
            # before the first finishes it too (the images it had in flight).
            assert len(moved) >= 3, "three tasks moved"
            finished_late, finished_twice, finished_first = moved[0].task_id, moved[1], moved[-1]
            await two.ack(finished_first)
            await two.ack(finished_twice)
            for message in held:
                finished = message.task_id in (finished_late, finished_twice.task_id)
                if finished or await one.renew(message):
                    await one.ack(message)
                else:  # as the worker does with a task it lost
                    await one.release(message)
            assert {m.task_id for m in held if _partition(m) in one.assigned_partitions}
            for message in [moved[0], *moved[2:-1]]:
                if await two.renew(message):
                    await two.ack(message)
                else:
                    assert message.task_id == finished_late
                    await two.release(message)
    assert await tasks_of(db, request_id) == {m.task_id: ("done", 1) for m in held}


async def test_a_released_task_that_another_member_finished_has_its_record_committed(
    backend: Backend, db: Database, tmp_path: Path
) -> None:
    """A delivery loses its lease because another member finished the task (a delivery
    of it from before a rebalance acked it). Its release leaves the task done, and its
    record is committed, not kept in hand for ever (which would hold back every later
    commit of the partition)."""
    config = KafkaConfig.from_url(backend.queue_url)
    async with member(_settings(backend, tmp_path), db, "worker-a") as queue:
        request_id = await stage(db, tmp_path, rows=2)  # one task
        queue.wake()
        (message,) = await receive(queue, 1)
        await TaskLeases(db, "worker-b", lease_seconds=60).settle(message.task_id, "done")
        assert not await queue.renew(message)
        await queue.release(message)
        await async_wait_until(
            lambda: _committed_past(config, message), timeout=30, what="the record committed"
        )
    assert await tasks_of(db, request_id) == {message.task_id: ("done", 1)}


# Two deliveries of one task after a move, "a" (the first holder) then "b", each ending
# as KafkaQueue does: "finished" (an ack, whether or not the task was taken over
# meanwhile) or "gave back" (the release of a drained delivery), in either order.
FINISHING_ORDERS = [
    [("a", "finished"), ("b", "finished")],
    [("b", "finished"), ("a", "finished")],
    [("a", "finished"), ("b", "gave back")],
    [("b", "finished"), ("a", "gave back")],
    [("a", "gave back"), ("b", "finished")],
    [("b", "gave back"), ("a", "finished")],
]


@pytest.mark.parametrize("order", FINISHING_ORDERS, ids=lambda o: " then ".join(map(" ".join, o)))
async def test_a_task_delivered_twice_by_a_move_counts_one_attempt_however_it_ends(
    db: Database, tmp_path: Path, order: list[tuple[str, str]]
) -> None:
    request_id = await stage(db, tmp_path, rows=2)  # one task
    (task_id,) = await tasks_of(db, request_id)
    place = Placement("tasks", 0, 7)
    async with db.write() as conn:
        await conn.execute(
            update(t.tasks)
            .where(t.tasks.c.id == task_id)
            .values(published_at=1.0, **place.columns())
        )
    holders = {name: TaskLeases(db, f"worker-{name}", lease_seconds=60) for name in "ab"}
    attempts = {name: await holders[name].take(task_id, place) for name in "ab"}
    assert attempts == {"a": 1, "b": 2}

    for name, end in order:
        leases, attempt = holders[name], attempts[name]
        if end == "finished":
            await leases.finish(task_id, attempt)
        elif not await leases.release(task_id):  # "gave back", as KafkaQueue.release does
            await leases.give_back_attempt(task_id, attempt)

    assert await tasks_of(db, request_id) == {task_id: ("done", 1)}


def _partition(message: TaskMessage) -> object:
    return getattr(message.receipt, "partition", None)


async def _lease_expiry(db: Database, task_id: int) -> float:
    async with db.read() as conn:
        query = select(t.tasks.c.lease_expires_at).where(t.tasks.c.id == task_id)
        return float((await conn.execute(query)).scalar_one() or 0.0)


async def _committed_past(config: KafkaConfig, message: TaskMessage) -> bool:
    partition, offset = getattr(message.receipt, "record", (None, -1))
    async with admin_client(config.bootstrap) as admin:
        committed = await admin.list_consumer_group_offsets(config.group, partitions=[partition])
    return partition in committed and committed[partition].offset > offset


@asynccontextmanager
async def _bystander(config: KafkaConfig) -> AsyncIterator[AIOKafkaConsumer]:
    """A member of the group that reads a topic of its own: its joining and leaving
    each make the group rebalance, without taking any of the queue's partitions. It is
    assigned its topic's partition once the group has rebalanced."""
    topic = f"{config.topic}.bystander"
    async with admin_client(config.bootstrap) as admin:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=config.bootstrap,
        group_id=config.group,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=max(100, config.session_timeout_ms // 5),
    )
    await consumer.start()

    async def poll() -> None:
        while True:
            await consumer.getmany(timeout_ms=200)

    polling = asyncio.create_task(poll())
    try:
        yield consumer
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await consumer.stop()


@asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()
