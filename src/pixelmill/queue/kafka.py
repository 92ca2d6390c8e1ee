"""The Kafka queue: tasks as records of a topic, workers as one consumer group.

``kafka://host1:9092,host2:9092?topic=pixelmill.tasks&partitions=12&group=pixelmill``

- Publishing goes through the transactional outbox: the upload commits its tasks in
  the database; an :class:`~pixelmill.queue.outbox.OutboxRelay` publishes them and
  marks them sent. A crash in between republishes; duplicates are harmless because
  processing is idempotent. No idempotent or transactional producer is needed.
- A background pump polls the consumer all the time and pauses the partitions while
  the local buffer is full, so slow tasks never push a worker out of the group
  (``max.poll.interval``).
- Offsets are committed only below the lowest task still in hand (per partition), so
  a task is never committed before its results are stored.
- A task that fails as a whole goes to ``<topic>.retry`` with a due time, and after
  the last attempt to ``<topic>.dead``; its row in the ``tasks`` table says so too.
- The relay records where each task landed (topic, partition, offset). A record is
  run only while it is its task's current publication, and its task is then leased
  in the ``tasks`` table, the lease renewed while it runs (queue/task_leases.py). The
  outbox audit (queue/audit.py) publishes again the tasks whose records the brokers
  lost, and a partition whose log was cut is read again from its start, so a broker
  that loses its data loses no task.
- A rebalance revokes every partition of a member before it assigns its share back.
  The records of the tasks in hand on a partition that came back are read again and
  recognised: those deliveries go on, with their leases, and no task runs twice. A
  delivery whose partition went to another member stops at its next renewal and
  gives back its attempt, so rebalances never count against a task; if it finishes
  the task first, the new owner's delivery is the one not counted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata, RecordMetadata, TopicPartition

from pixelmill.db import tables as t
from pixelmill.db.engine import Database, is_transient
from pixelmill.domain import TaskKind
from pixelmill.logs import FailureStreak
from pixelmill.queue.audit import OutboxAudit
from pixelmill.queue.base import TaskMessage
from pixelmill.queue.kafka_config import KafkaConfig
from pixelmill.queue.kafka_log import KafkaLog
from pixelmill.queue.outbox import OutboxRelay, Placement, TaskRecord
from pixelmill.queue.task_leases import TaskLeases

log = logging.getLogger(__name__)


@dataclass
class _Receipt:
    """Where a delivered task came from, so that it can be acknowledged."""

    partition: TopicPartition
    offset: int
    generation: int
    task_id: int

    @property
    def place(self) -> Placement:
        return Placement(self.partition.topic, self.partition.partition, self.offset)

    @property
    def record(self) -> tuple[TopicPartition, int]:
        return self.partition, self.offset


@dataclass
class _PartitionOffsets:
    """Offsets in hand and done for one partition; commits stay below the lowest in hand."""

    in_hand: set[int] = field(default_factory=set)
    highest_done: int = -1

    def commit_point(self) -> int | None:
        """The offset to commit (the next one to read after a restart), if any."""
        if self.in_hand:
            return min(self.in_hand)
        return self.highest_done + 1 if self.highest_done >= 0 else None


def encode_task(task: TaskRecord, attempt: int = 0, not_before: float = 0.0) -> bytes:
    """The record value of a task."""
    return json.dumps(
        {
            "task_id": task.task_id,
            "request_id": task.request_id,
            "kind": task.kind,
            "attempt": attempt,
            "not_before": not_before,
        }
    ).encode()


class KafkaQueue:
    """A :class:`~pixelmill.queue.base.Queue` on Kafka, with the outbox relay inside."""

    def __init__(
        self,
        config: KafkaConfig,
        db: Database,
        *,
        owner: str = "",
        lease_seconds: float = 60.0,
        buffer: int = 8,
        max_attempts: int = 5,
        publish_interval: float = 1.0,
    ) -> None:
        self.config = config
        self.db = db
        self.leases = TaskLeases(db, owner, lease_seconds)
        self.max_attempts = max_attempts
        self._buffer: asyncio.Queue[TaskMessage] = asyncio.Queue()
        self._buffer_size = buffer
        # Deliveries due later: (when, a number that orders ties, the delivery).
        self._delayed: list[tuple[float, int, TaskMessage]] = []
        self._delayed_count = itertools.count()
        self._offsets: dict[TopicPartition, _PartitionOffsets] = {}
        # Bumped when a partition is revoked: receipts of older deliveries are void.
        self._generations: dict[TopicPartition, int] = {}
        # The deliveries handed out and not yet settled, by record.
        self._handed_out: dict[tuple[TopicPartition, int], _Receipt] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._pump: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()
        self.relay = OutboxRelay(
            db, self._publish, interval=publish_interval, backend_away=backend_away
        )
        self.log = KafkaLog(config)
        self.audit = OutboxAudit(
            db,
            self.log,
            on_requeued=self.relay.wake,
            interval=config.audit_interval_ms / 1000,
            backend_away=backend_away,
        )
        self._relay_task: asyncio.Task[None] | None = None
        self._audit_task: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Create the topics if missing, start the producer, the outbox relay and its
        audit."""
        async with self._started:
            if self._producer is not None:
                return
            await self.log.start()
            producer = AIOKafkaProducer(
                bootstrap_servers=self.config.bootstrap,
                client_id=self.config.client_id,
                enable_idempotence=False,
                acks="all",
            )
            await producer.start()
            self._producer = producer
            self._relay_task = asyncio.create_task(self.relay.run(), name="pixelmill-outbox")
            self._audit_task = asyncio.create_task(self.audit.run(), name="pixelmill-audit")
            log.info("kafka queue on %s, topic %s", self.config.bootstrap, self.config.topic)

    async def _start_consumer(self) -> None:
        if self._consumer is not None:
            return
        await self.start()
        async with self._started:  # several worker slots call receive() at once
            if self._consumer is None:
                await self._create_consumer()

    async def _create_consumer(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap,
            client_id=self.config.client_id,
            group_id=self.config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._buffer_size,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.config.session_timeout_ms // 5),
        )
        consumer.subscribe([self.config.topic, self.config.retry_topic], listener=_Rebalance(self))
        await consumer.start()
        self._consumer = consumer
        self._pump = asyncio.create_task(self._pump_forever(), name="pixelmill-kafka-pump")

    async def close(self) -> None:
        self.relay.stop()
        self.audit.stop()
        for task in (self._pump, self._relay_task, self._audit_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._consumer is not None:
            await _closing("commit the offsets", self._commit())
            await _closing("stop the consumer", self._consumer.stop())
        if self._producer is not None:
            await _closing("stop the producer", self._producer.stop())
        await _closing("close the reader", self.log.close())

    # -- publishing -----------------------------------------------------------------

    async def _publish(self, tasks: list[TaskRecord]) -> list[Placement]:
        assert self._producer is not None
        sends = [
            await self._producer.send(
                self.config.topic,
                encode_task(task),
                # One request's tasks spread over the partitions, so many workers share it.
                key=f"{task.request_id}:{task.seq}:{task.kind}".encode(),
            )
            for task in tasks
        ]
        return [_placement(sent) for sent in await asyncio.gather(*sends)]

    def wake(self) -> None:
        """New tasks are in the outbox: publish them now."""
        self.relay.wake()

    # -- consuming ------------------------------------------------------------------

    async def receive(self, timeout: float) -> TaskMessage | None:
        await self._start_consumer()
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = await asyncio.wait_for(
                    self._buffer.get(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                return None
            receipt = message.receipt
            assert isinstance(receipt, _Receipt)
            try:
                if (held := self._handed_out.get(receipt.record)) is not None:
                    taken = await self._take_back(held, message)
                else:
                    taken = await self._take(message)
            except BaseException:
                # The database failed us (or we were cancelled): the record must not be
                # lost from the buffer, or its offset would hold back every commit.
                if receipt.generation == self._generations.get(receipt.partition, 0):
                    self._buffer.put_nowait(message)
                raise
            if taken is not None:
                return taken

    async def _take(self, message: TaskMessage) -> TaskMessage | None:
        """The delivery of a record, if it is one to run."""
        receipt = message.receipt
        assert isinstance(receipt, _Receipt)
        attempt = await self.leases.take(message.task_id, receipt.place)
        if attempt is None:
            await self._done(message)  # a stale copy: nothing to do, but its offset is done
            return None
        self._handed_out[receipt.record] = receipt
        return TaskMessage(
            message.task_id, message.request_id, message.kind, attempt, message.receipt
        )

    async def _take_back(self, held: _Receipt, message: TaskMessage) -> TaskMessage | None:
        """A record came again while we hold a delivery from its place: a rebalance
        revoked its partition and gave it back to us. While the lease is still ours,
        the delivery in hand goes on as the current one, with its attempt, and the task
        does not run twice. Otherwise the record is taken as any other."""
        receipt = message.receipt
        assert isinstance(receipt, _Receipt)
        kept = await self.leases.keep(message.task_id, receipt.place)
        # The delivery in hand may have ended while we looked: then the record is new.
        if kept and self._handed_out.get(receipt.record) is held:
            held.generation = receipt.generation
            return None
        return await self._take(message)

    async def _pump_forever(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        polling = FailureStreak(log, "kafka poll", expected=backend_away)
        while True:
            try:
                await self._pump_once(consumer)
            except Exception as exc:  # the pump must outlive anything: without it nothing arrives
                polling.failed(exc)
                await asyncio.sleep(1.0)
            else:
                polling.succeeded()

    async def _pump_once(self, consumer: AIOKafkaConsumer) -> None:
        self._release_due()
        full = self._buffer.qsize() >= self._buffer_size
        assigned = consumer.assignment()
        if full:
            consumer.pause(*assigned)
        else:
            consumer.resume(*assigned)
        batches = await consumer.getmany(timeout_ms=200)
        for partition, records in batches.items():
            for record in records:
                self._accept(partition, record.offset, record.value)
        await self._reread_cut_logs(consumer)

    async def _reread_cut_logs(self, consumer: AIOKafkaConsumer) -> None:
        """Read again from its start a partition whose log now ends before our position.

        Its log was lost or cut (a broker that lost its data), and our position came
        from before, or from an offset committed into the new log by a member that had
        not noticed yet. Kafka answers a fetch past the end with an out-of-range error,
        and the consumer starts again from the beginning by itself; some Kafka-protocol
        brokers answer with nothing, and the partition would stall. The records read
        again whose tasks are done are skipped.
        """
        for partition in consumer.assignment():
            try:
                end = consumer.highwater(partition)  # known once a fetch came back
                if end is None or (position := await consumer.position(partition)) <= end:
                    continue
            except (IllegalStateError, AssertionError):
                continue  # revoked meanwhile
            log.warning(
                "the log of %s ends at %d, before our position %d; reading it from its start",
                partition,
                end,
                position,
            )
            self._forget({partition})
            await consumer.seek_to_beginning(partition)

    def _accept(self, partition: TopicPartition, offset: int, value: bytes | None) -> None:
        try:
            body = json.loads(value or b"{}")
            task_id = int(body["task_id"])
            message = TaskMessage(
                task_id,
                str(body["request_id"]),
                TaskKind(body["kind"]),
                int(body.get("attempt", 0)),
                _Receipt(partition, offset, self._generations.get(partition, 0), task_id),
            )
        except (ValueError, KeyError, TypeError):
            log.error("skipping a malformed task record at %s@%d", partition, offset)
            self._offsets.setdefault(partition, _PartitionOffsets()).highest_done = offset
            return
        self._offsets.setdefault(partition, _PartitionOffsets()).in_hand.add(offset)
        not_before = float(body.get("not_before") or 0)
        if not_before > time.time():
            self._deliver_at(not_before, message)
        else:
            self._buffer.put_nowait(message)

    def _release_due(self) -> None:
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            self._buffer.put_nowait(heapq.heappop(self._delayed)[2])

    def _receipt(self, message: TaskMessage) -> _Receipt | None:
        receipt = message.receipt
        if not isinstance(receipt, _Receipt):
            return None
        if receipt.generation != self._generations.get(receipt.partition, 0):
            return None  # its partition was revoked meanwhile: someone else owns it now
        return receipt

    @property
    def assigned_partitions(self) -> set[TopicPartition]:
        """The partitions this member consumes now (empty before it joined the group)."""
        return set(self._consumer.assignment()) if self._consumer else set()

    async def renew(self, message: TaskMessage) -> bool:
        """The task is ours while its partition is assigned to us (its next owner
        delivers it again) and no one took a later delivery of it; while it is, its
        lease in the database is kept alive, so the outbox audit leaves it be."""
        if self._taken_over(message):
            return False
        return await self.leases.renew(message.task_id)

    def _taken_over(self, message: TaskMessage) -> bool:
        """A delivery from before a rebalance whose partition did not come back to us
        (or not yet): another member may hold the task now."""
        return self._receipt(message) is None and not self._came_back(message)

    def _came_back(self, message: TaskMessage) -> bool:
        """A delivery in hand whose partition a rebalance gave back to us, its record not
        read again yet: still ours (no other member can hold its partition)."""
        receipt = message.receipt
        return (
            isinstance(receipt, _Receipt)
            and self._handed_out.get(receipt.record) is receipt
            and receipt.partition in self.assigned_partitions
        )

    async def ack(self, message: TaskMessage) -> None:
        # Another member may hold (or have finished) a delivery of it, if its partition
        # moved: the task still counts one delivery for its success.
        self._settled(message)
        await self.leases.finish(message.task_id, message.attempt)
        await self._done(message)

    async def retry(self, message: TaskMessage, delay: float, error: str) -> None:
        taken_over = self._taken_over(message)
        self._settled(message)
        if taken_over:
            # Its partition went to another member, which reads the record again and
            # runs the task; a retry published from here would be a second copy.
            log.info("task %s failed after it went to another member", message.task_id)
            return
        dead = message.attempt >= self.max_attempts
        topic = self.config.dead_topic if dead else self.config.retry_topic
        record = TaskRecord(message.task_id, message.request_id, message.kind.value, 0)
        assert self._producer is not None
        sent = await self._producer.send_and_wait(
            topic,
            encode_task(record, message.attempt, time.time() + delay),
            key=f"{message.request_id}:{message.task_id}".encode(),
        )
        await self.leases.settle(
            message.task_id,
            "dead" if dead else "queued",
            last_error=t.bounded_text(error),
            published_at=time.time(),
            **_placement(sent).columns(),
        )
        await self._done(message)

    async def release(self, message: TaskMessage) -> None:
        """Leave it uncommitted, and deliver it again from here (the row says ``queued``
        until then); if this member stops or loses the partition first, whoever owns
        the partition next receives it again.

        A delivery whose partition was revoked gives the lease back while it is still
        ours and no later delivery of ours holds it; otherwise it gives back only its
        attempt: the lease is the later delivery's. A delivery whose task someone else
        finished or published again has a record that is spent: its offset is done."""
        stale = self._receipt(message) is None
        self._settled(message)
        if not stale:
            if await self.leases.release(message.task_id):
                # Its offset is still in hand: the consumer will not read it again.
                self._buffer.put_nowait(message)
            else:
                await self._done(message)
        elif self._holds(message.task_id) or not await self.leases.release(message.task_id):
            # A later delivery of the task holds the lease, ours or another member's.
            await self.leases.give_back_attempt(message.task_id, message.attempt)

    def redeliver_later(self, message: TaskMessage) -> None:
        """Deliver the record again from here once the lease would have run out, as the
        queue table does: no one else will, since its offset is still in hand (nothing
        is committed past it) and the consumer has read past it. A delivery whose
        partition is no longer ours is left to its next owner; one whose offset was
        done (the settling went that far) needs nothing."""
        self._settled(message)
        receipt = self._receipt(message)
        if receipt is None:
            return
        offsets = self._offsets.get(receipt.partition)
        if offsets is None or receipt.offset not in offsets.in_hand:
            return
        self._deliver_at(time.time() + self.leases.lease_seconds, message)

    def _deliver_at(self, due: float, message: TaskMessage) -> None:
        heapq.heappush(self._delayed, (due, next(self._delayed_count), message))

    def _holds(self, task_id: int) -> bool:
        """Whether a delivery of the task is in our hands."""
        return any(receipt.task_id == task_id for receipt in self._handed_out.values())

    def _settled(self, message: TaskMessage) -> None:
        receipt = message.receipt
        if isinstance(receipt, _Receipt) and self._handed_out.get(receipt.record) is receipt:
            del self._handed_out[receipt.record]

    async def _done(self, message: TaskMessage) -> None:
        receipt = self._receipt(message)
        if receipt is None:
            return
        offsets = self._offsets.setdefault(receipt.partition, _PartitionOffsets())
        offsets.in_hand.discard(receipt.offset)
        offsets.highest_done = max(offsets.highest_done, receipt.offset)
        await self._commit()

    async def _commit(self, partitions: set[TopicPartition] | None = None) -> None:
        """Commit below the lowest offset in hand, on the partitions still ours.

        A failed commit is not an error of the task: the offsets are committed with the
        next one, or the tasks are redelivered to the partition's next owner and
        skipped there as already done.
        """
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        points = {
            partition: OffsetAndMetadata(point, "")
            for partition, offsets in self._offsets.items()
            if partition in assigned
            and (partitions is None or partition in partitions)
            and (point := offsets.commit_point()) is not None
        }
        if not points:
            return
        try:
            await self._consumer.commit(points)
        except (KafkaError, IllegalStateError) as exc:
            log.warning("committing offsets failed (a rebalance?): %s", exc)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is done on the partitions we lose, then forget them."""
        await self._commit(revoked)
        self._forget(revoked)

    def _forget(self, partitions: set[TopicPartition]) -> None:
        """Drop what we hold of these partitions: offsets, and tasks not handed out yet.
        The receipts of the tasks in hand become void (their acks commit nothing)."""
        for partition in partitions:
            self._generations[partition] = self._generations.get(partition, 0) + 1
            self._offsets.pop(partition, None)
        for message in _drain(self._buffer):
            if _receipt_partition(message) not in partitions:
                self._buffer.put_nowait(message)
        self._delayed = [
            (due, number, message)
            for due, number, message in self._delayed
            if _receipt_partition(message) not in partitions
        ]
        heapq.heapify(self._delayed)


def backend_away(exc: BaseException) -> bool:
    """A failure of the database or the brokers, not of our code: worth one line."""
    return is_transient(exc) or isinstance(exc, KafkaError)


# How long one step of closing may take when the brokers do not answer.
_CLOSE_TIMEOUT = 10.0


async def _closing(step: str, closing: Awaitable[None]) -> None:
    """One step of closing the Kafka clients, which must not stop the others, nor the
    process's clean exit, when the brokers are away: aiokafka's fetcher, closed while
    it waits to retry, raises the CancelledError of its own task. Only a cancellation
    of this task goes on."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await closing
    except (Exception, asyncio.CancelledError) as exc:
        current = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and current and current.cancelling():
            raise
        log.warning("could not %s cleanly (the brokers are away?): %r", step, exc)


def _placement(sent: RecordMetadata) -> Placement:
    return Placement(sent.topic, sent.partition, sent.offset)


def _drain(queue: asyncio.Queue[TaskMessage]) -> list[TaskMessage]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _receipt_partition(message: TaskMessage) -> TopicPartition | None:
    receipt = message.receipt
    return receipt.partition if isinstance(receipt, _Receipt) else None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, queue: KafkaQueue) -> None:
        self.queue = queue

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.queue.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("kafka partitions assigned: %s", sorted(p.partition for p in assigned))
