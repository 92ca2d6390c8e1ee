"""The Kafka queue against a real Kafka-protocol broker and a real SQLite file."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import stage_request
from pixelmill.db.migrate import upgrade_async
from pixelmill.domain import ProcessingOptions
from pixelmill.queue.base import TaskMessage
from pixelmill.queue.kafka import KafkaConfig, KafkaQueue
from tests.support.kafka import TansuBroker
from tests.support.waiting import async_wait_until


def test_config_from_url() -> None:
    config = KafkaConfig.from_url("kafka://a:9092,b:9092?topic=t1&partitions=3&group=g")
    assert (config.bootstrap, config.topic, config.partitions, config.group) == (
        "a:9092,b:9092", "t1", 3, "g",
    )  # fmt: skip
    assert (config.retry_topic, config.dead_topic) == ("t1.retry", "t1.dead")
    with pytest.raises(ValueError, match="unknown parameter"):
        KafkaConfig.from_url("kafka://a:9092?topics=x")
    with pytest.raises(ValueError, match="expected kafka://"):
        KafkaConfig.from_url("kafka://")


@pytest.fixture
async def db(settings: Settings):  # type: ignore[no-untyped-def]
    await upgrade_async(settings.database_url)
    database = Database(settings.database_url)
    yield database
    await database.close()


async def _stage(db: Database, tmp_path: Path, rows: int, per_task: int = 2) -> str:
    path = tmp_path / f"in-{uuid.uuid4().hex[:6]}.csv"
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f"{i},P{i},https://img.example.com/{i}.jpg" for i in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n")
    accepted = await stage_request(
        db, path, options=ProcessingOptions(), webhook_url=None, owner=None,
        limits=CsvLimits(), task_max_images=per_task,
    )  # fmt: skip
    return accepted.request_id


def _queue(broker: TansuBroker, db: Database, topic: str, **kwargs: object) -> KafkaQueue:
    config = KafkaConfig(
        broker.bootstrap, topic=topic, partitions=3, group=f"{topic}-g", session_timeout_ms=2000
    )
    return KafkaQueue(config, db, publish_interval=0.1, **kwargs)  # type: ignore[arg-type]


async def _receive_all(queue: KafkaQueue, count: int, timeout: float = 30) -> list[TaskMessage]:
    received: list[TaskMessage] = []

    async def more() -> bool:
        message = await queue.receive(timeout=0.5)
        if message is not None:
            received.append(message)
        return len(received) >= count

    await async_wait_until(more, timeout=timeout, what=f"{count} tasks")
    return received


async def _task_states(db: Database) -> dict[int, tuple[str, int]]:
    async with db.read() as conn:
        rows = await conn.execute(select(t.tasks.c.id, t.tasks.c.state, t.tasks.c.attempts))
        return {row.id: (row.state, row.attempts) for row in rows}


async def test_outbox_publishes_and_acks_are_committed(
    kafka_broker: TansuBroker, db: Database, tmp_path: Path
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    request_id = await _stage(db, tmp_path, rows=10)  # 5 tasks of 2 images
    queue = _queue(kafka_broker, db, topic)
    await queue.start()
    try:
        queue.wake()
        messages = await _receive_all(queue, 5)
        assert sorted(m.task_id for m in messages) == sorted(await _task_states(db))
        assert {m.request_id for m in messages} == {request_id}
        assert all(m.attempt == 1 for m in messages)
        for message in messages:
            await queue.ack(message)
        assert {state for state, _ in (await _task_states(db)).values()} == {"done"}
    finally:
        await queue.close()

    # A new member of the same group starts after the committed offsets: nothing left.
    again = _queue(kafka_broker, db, topic)
    await again.start()
    try:
        assert await again.receive(timeout=3) is None
    finally:
        await again.close()


async def test_unacknowledged_tasks_are_delivered_again(
    kafka_broker: TansuBroker, db: Database, tmp_path: Path
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    await _stage(db, tmp_path, rows=6)  # 3 tasks
    first = _queue(kafka_broker, db, topic)
    await first.start()
    try:
        first.wake()
        messages = await _receive_all(first, 3)
        await first.ack(min(messages, key=lambda m: m.task_id))
    finally:
        await first.close()  # as if the worker died: two tasks never acknowledged

    second = _queue(kafka_broker, db, topic)
    await second.start()
    try:
        redelivered = await _receive_all(second, 2)
        acked = min(m.task_id for m in messages)
        assert acked not in {m.task_id for m in redelivered}
        assert all(m.attempt == 2 for m in redelivered), "deliveries are counted"
    finally:
        await second.close()


async def test_retry_comes_back_after_its_delay_then_dead_letters(
    kafka_broker: TansuBroker, db: Database, tmp_path: Path
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    await _stage(db, tmp_path, rows=1)
    queue = _queue(kafka_broker, db, topic, max_attempts=2)
    await queue.start()
    try:
        queue.wake()
        (message,) = await _receive_all(queue, 1)
        loop = asyncio.get_running_loop()
        retried_at = loop.time()
        await queue.retry(message, delay=1.5, error="boom")
        assert await queue.receive(timeout=0.5) is None, "not before its delay"
        (again,) = await _receive_all(queue, 1)
        assert loop.time() - retried_at >= 1.4
        assert again.task_id == message.task_id and again.attempt == 2
        await queue.retry(again, delay=0.1, error="boom again")
        state, attempts = (await _task_states(db))[message.task_id]
        assert (state, attempts) == ("dead", 2)
        assert await queue.receive(timeout=2) is None, "a dead task is not delivered"
    finally:
        await queue.close()


async def test_two_members_share_the_tasks_without_overlap(
    kafka_broker: TansuBroker, db: Database, tmp_path: Path
) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    one, two = _queue(kafka_broker, db, topic), _queue(kafka_broker, db, topic)
    await asyncio.gather(one.start(), two.start())
    try:

        async def joined() -> bool:
            await asyncio.gather(one.receive(timeout=0.2), two.receive(timeout=0.2))
            mine, theirs = one.assigned_partitions, two.assigned_partitions
            return bool(mine) and bool(theirs) and len(mine | theirs) == 6

        # Both members hold their share (3 partitions of each topic) before work arrives;
        # while the group rebalances, Kafka may redeliver (processing is idempotent).
        await async_wait_until(joined, timeout=60, what="both members assigned")
        await _stage(db, tmp_path, rows=24)  # 12 tasks over 3 partitions
        one.wake()
        seen: dict[int, int] = {}

        async def drain(queue: KafkaQueue) -> None:
            while (message := await queue.receive(timeout=4)) is not None:
                seen[message.task_id] = seen.get(message.task_id, 0) + 1
                await queue.ack(message)

        await asyncio.gather(drain(one), drain(two))
        assert len(seen) == 12, "every task delivered"
        assert max(seen.values()) == 1, "none delivered twice while both members live"
    finally:
        await asyncio.gather(one.close(), two.close())
