"""What only the Kafka queue has: its URL, and the record it runs of each task. Its
behaviour as a queue (delivery, commits, redelivery, retries and dead letters, members
sharing a group) is the Queue contract, in test_contract.py, run against a real
Kafka-protocol broker; the outbox audit is in test_audit.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import select

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.queue.kafka import KafkaConfig, encode_task
from pixelmill.queue.outbox import TaskRecord
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


@asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()
