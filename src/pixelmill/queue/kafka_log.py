"""What the Kafka brokers hold of the task topics: their partitions, each partition's
first and end offsets, the consumer group's committed offsets, and the record at a
given place.

The outbox audit (queue/audit.py) compares the tasks' recorded places with this. The
topics are created here too, at start and again whenever they are found missing (a
broker that lost its data, a topic deleted by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Collection
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, OffsetOutOfRangeError, TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord, TopicPartition

from pixelmill.queue.audit import LogSnapshot, PartitionLog, Place, Reading

if TYPE_CHECKING:
    from pixelmill.queue.kafka_config import KafkaConfig

log = logging.getLogger(__name__)


class KafkaLog:
    """A view of the task topics on the brokers, through one admin client and one
    consumer that joins no group (it asks for offsets and reads single records)."""

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self.topics = (config.topic, config.retry_topic, config.dead_topic)
        self.audited = (config.topic, config.retry_topic)  # where undone tasks wait
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._reading = asyncio.Lock()  # the reader's assignment is one at a time

    async def start(self) -> None:
        """Connect, and create the topics that are missing."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.config.bootstrap, client_id=self.config.client_id
        )
        await admin.start()
        self._admin = admin
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap,
            client_id=self.config.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",  # a place out of range is an error, not a jump
            fetch_max_wait_ms=50,
        )
        await reader.start()
        self._reader = reader
        await self.ensure_topics()

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
        if self._admin is not None:
            await self._admin.close()

    async def ensure_topics(self) -> None:
        """Create the missing topics (``partitions`` partitions, replication factor 1)."""
        assert self._admin is not None
        existing = set(await self._admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=self.config.partitions, replication_factor=1)
            for name in self.topics
            if name not in existing
        ]
        if wanted:
            log.info("creating the topics %s", [topic.name for topic in wanted])
            with contextlib.suppress(TopicAlreadyExistsError):
                await self._admin.create_topics(wanted)

    async def snapshot(self) -> LogSnapshot:
        """The bounds of every partition of the topics where tasks wait, now.

        Raises rather than leave out a partition it could not learn about: a partition
        missing from the snapshot means that its tasks are lost.
        """
        assert self._admin is not None and self._reader is not None
        taken_at = time.time()
        await self.ensure_topics()
        partitions = [
            TopicPartition(topic, number)
            for topic, numbers in (await self._partitions()).items()
            for number in numbers
        ]
        starts = await self._reader.beginning_offsets(partitions)
        ends = await self._reader.end_offsets(partitions)
        committed = await self._admin.list_consumer_group_offsets(
            self.config.group, partitions=partitions
        )
        topics: dict[str, dict[int, PartitionLog]] = {topic: {} for topic in self.audited}
        for partition in partitions:
            mark = committed.get(partition)
            topics[partition.topic][partition.partition] = PartitionLog(
                starts[partition],
                ends[partition],
                mark.offset if mark is not None and mark.offset >= 0 else None,
            )
        return LogSnapshot(taken_at, topics)

    async def _partitions(self) -> dict[str, list[int]]:
        assert self._admin is not None
        found: dict[str, list[int]] = {}
        for topic in await self._admin.describe_topics(list(self.audited)):
            if topic["error_code"] or any(p["error_code"] for p in topic["partitions"]):
                raise KafkaError(f"the brokers do not know all of topic {topic['topic']} now")
            found[topic["topic"]] = sorted(p["partition"] for p in topic["partitions"])
        missing = set(self.audited) - set(found)
        if missing:
            raise KafkaError(f"the brokers did not describe the topics {sorted(missing)}")
        return found

    async def read(self, places: Collection[Place]) -> Reading:
        """The task id of the record at each place that the log still holds, and the end
        of each partition read.

        Reads each partition from its lowest place on, until past its highest place or
        up to the partition's high watermark as the fetch reports it (some Kafka-protocol
        brokers answer a lower end offset to a ListOffsets request than the one they
        fetch up to).
        """
        wanted: dict[TopicPartition, set[int]] = defaultdict(set)
        for topic, partition, offset in places:
            wanted[TopicPartition(topic, partition)].add(offset)
        if not wanted:
            return Reading({}, {})
        async with self._reading:
            assert self._reader is not None
            self._reader.assign(list(wanted))  # fresh positions and high watermarks
            try:
                return await self._read(wanted)
            finally:
                self._reader.pause(*wanted)  # no fetching in the background until the next read

    async def _read(self, wanted: dict[TopicPartition, set[int]]) -> Reading:
        assert self._reader is not None
        reader = self._reader
        for partition, offsets in wanted.items():
            reader.seek(partition, min(offsets))
        unread = {partition: max(offsets) for partition, offsets in wanted.items()}
        tasks: dict[Place, int] = {}
        ends: dict[tuple[str, int], int] = {}
        while unread:
            try:
                batches = await reader.getmany(*unread, timeout_ms=200)
            except OffsetOutOfRangeError as exc:  # nothing at or after that place
                for partition in exc.args[0]:
                    unread.pop(partition, None)
                continue
            for partition, records in batches.items():
                for record in records:
                    if record.offset in wanted[partition] and (task := _task_id(record)):
                        tasks[partition.topic, partition.partition, record.offset] = task
            for partition in list(unread):
                position = await reader.position(partition)
                highwater = reader.highwater(partition)
                if highwater is not None:
                    ends[partition.topic, partition.partition] = highwater
                if position > unread[partition] or (
                    highwater is not None and position >= highwater
                ):
                    del unread[partition]
        return Reading(tasks, ends)


def _task_id(record: ConsumerRecord[bytes, bytes]) -> int | None:
    try:
        return int(json.loads(record.value or b"{}")["task_id"])
    except (ValueError, KeyError, TypeError):
        return None
