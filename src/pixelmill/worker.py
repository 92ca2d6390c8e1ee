"""The worker: takes tasks from the queue and sees each one through.

For a ``process`` task it marks the task's images ``processing``, sends each image
to the imaging service with bounded concurrency (transient failures retried with
backoff), records every result as it lands, then acknowledges the task. The worker
that records a request's last image has queued its ``finalize`` task, which writes
the output CSV and closes the request exactly once (queueing its webhook, if any).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from pixelmill.backoff import jittered_backoff
from pixelmill.config import Settings
from pixelmill.csvio import OutputCsvWriter
from pixelmill.db import work
from pixelmill.db.engine import Database, is_transient
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ImageRecord,
    ImageStatus,
    ProcessingOptions,
    TaskKind,
)
from pixelmill.imaging.base import Imaging, ImagingUnavailableError
from pixelmill.logs import FailureStreak, brief
from pixelmill.queue.base import Queue, TaskMessage
from pixelmill.recorder import ResultRecorder
from pixelmill.storage import Storage, StorageError

log = logging.getLogger(__name__)


def worker_name() -> str:
    """A name unique to this worker process, used as its lease owner (at most 64
    characters, the width of ``tasks.lease_owner``, which PostgreSQL enforces)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter (half to all of the delay); a source's
    Retry-After wins when longer."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        jittered = jittered_backoff(attempt, self.base_delay, self.max_delay)
        return min(self.max_delay, max(jittered, retry_after or 0.0))


def _storage_away(outcome: ImageOutcome) -> str | None:
    """What to wait for when ``outcome`` is a storage that may come back, else None (a
    storage that refuses, access denied say, fails the image: no wait would mend it)."""
    if (
        isinstance(outcome, ImageFailure)
        and outcome.code is ErrorCode.STORAGE_ERROR
        and outcome.is_transient
    ):
        return f"the storage: {outcome.message}"
    return None


@dataclass
class _Lease:
    lost: bool = False


@dataclass(eq=False)
class _Unstarted:
    """How many images of a task in hand have not had an image slot yet."""

    images: int


class Worker:
    """Runs tasks from ``queue`` until asked to stop."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        queue: Queue,
        imaging: Imaging,
        storage: Storage,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.imaging = imaging
        self.storage = storage
        self.on_closed = on_closed  # hears of each request this worker closes
        self.retry = RetryPolicy(settings.image_attempts, settings.retry_backoff_seconds)
        self._image_slots = asyncio.Semaphore(settings.worker_concurrency)
        # Tasks are taken by one task slot at a time, and only while an image slot is
        # free: images taken but queued here would sit idle while another worker has
        # nothing left to do (the end of every request).
        self._taking = asyncio.Lock()
        self._receiving = FailureStreak(log, "receiving a task", expected=is_transient)
        self._capacity_changed = asyncio.Event()
        self._task_started = asyncio.Event()
        self._tasks_in_hand: set[_Unstarted] = set()
        self._images_in_hand = 0
        # A finished request has just queued its finalize task: look for it at once.
        self.recorder = ResultRecorder(db, on_finished=lambda _request_id: queue.wake())
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Serve tasks until :meth:`stop`; in-flight tasks get a grace period, then go back."""
        slots = [
            asyncio.create_task(self._slot(), name=f"pixelmill-task-slot-{i}")
            for i in range(self.settings.worker_tasks_in_flight)
        ]
        try:
            await asyncio.gather(*slots)
        finally:
            for slot in slots:
                slot.cancel()
            await asyncio.gather(*slots, return_exceptions=True)
            await self.recorder.close()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`stop` was called (else a worker that ended has crashed)."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop taking tasks; tasks in hand finish within the grace period."""
        self._stopping.set()
        self._capacity_changed.set()
        self.queue.wake()

    def _has_capacity(self) -> bool:
        waiting = sum(task.images for task in self._tasks_in_hand)
        return waiting == 0 and not self._image_slots.locked()

    async def _wait_for_capacity(self) -> None:
        while True:
            self._capacity_changed.clear()
            if self._has_capacity() or self._stopping.is_set():
                return
            # An image holds a slot (or waits for one): its move sets the event again.
            await self._capacity_changed.wait()

    async def _take(self) -> tuple[TaskMessage, asyncio.Task[None]] | None:
        """Receive a task when there is room for it and start handling it; a process
        task counts as started once its images queue for image slots."""
        await self._wait_for_capacity()
        if self._stopping.is_set():
            return None
        try:
            message = await self.queue.receive(timeout=1.0)
        except Exception as exc:
            self._receiving.failed(exc)
            await asyncio.sleep(1.0)
            return None
        self._receiving.succeeded()
        if message is None:
            return None
        self._task_started.clear()
        handling = asyncio.create_task(self._handle_with_grace(message))
        if message.kind is TaskKind.PROCESS:
            started = asyncio.create_task(self._task_started.wait())
            try:
                await asyncio.wait({handling, started}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                handling.cancel()
                raise
            finally:
                started.cancel()
        return message, handling

    async def _slot(self) -> None:
        while not self._stopping.is_set():
            async with self._taking:
                taken = await self._take()
            if taken is None:
                continue
            message, handling = taken
            try:
                await handling
            except Exception as exc:
                # Even the retry or ack failed (the database is away): keep the slot
                # alive; the task is delivered again once its lease would have run out.
                log.error(
                    "task %s could not be settled (%s); it will come back",
                    message.task_id, brief(exc),
                    exc_info=None if is_transient(exc) else exc,
                )  # fmt: skip
                self.queue.redeliver_later(message)
                await asyncio.sleep(1.0)

    async def _handle_with_grace(self, message: TaskMessage) -> None:
        handler = asyncio.create_task(self._handle(message))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({handler, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                # Shutting down: give the task the grace period, then hand it back.
                await asyncio.wait({handler}, timeout=self.settings.shutdown_grace_seconds)
            if handler.done():
                if not handler.cancelled():
                    handler.result()  # raises what settling the task raised, for the slot
                return
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            await self.queue.release(message)
            log.info("released task %s at shutdown", message.task_id)
        finally:
            stopping.cancel()
            if not handler.done():
                handler.cancel()

    async def _handle(self, message: TaskMessage) -> None:
        poison = message.kind is TaskKind.PROCESS and message.attempt > self.settings.task_attempts
        lease = _Lease()
        try:
            async with self._lease(message, lease):
                if poison:
                    # Taken this often without an ack: its workers died on it (a crash or
                    # an OOM kill). Fail what is left rather than kill workers forever.
                    await self.fail_task(
                        message.task_id, f"gave up after {message.attempt - 1} attempts"
                    )
                elif message.kind is TaskKind.FINALIZE:
                    await self.finalize(message.request_id)
                else:
                    await self.process_task(message.task_id)
        except asyncio.CancelledError:
            if not lease.lost:
                raise
            # Someone else may hold the task now: give up our claim on it, no more.
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
            await self.queue.release(message)
            return
        except Exception as exc:
            log.error(
                "task %s failed (attempt %d): %s", message.task_id, message.attempt, brief(exc),
                # A backend away is said in one line; anything else needs its traceback.
                exc_info=None if is_transient(exc) else exc,
            )  # fmt: skip
            await self.queue.retry(message, self.retry.delay(message.attempt), repr(exc))
            return
        await self.queue.ack(message)

    @contextlib.asynccontextmanager
    async def _lease(self, message: TaskMessage, lease: _Lease) -> AsyncIterator[None]:
        """Renew the task's lease while it runs; cancel the work if the lease is lost."""
        current = asyncio.current_task()
        assert current is not None

        async def keep() -> None:
            interval = self.settings.lease_seconds / 3
            while True:
                await asyncio.sleep(interval)
                try:
                    renewed = await self.queue.renew(message)
                except Exception as exc:
                    log.warning(
                        "renewing the lease of task %s failed: %s", message.task_id, brief(exc)
                    )
                    continue
                if not renewed:
                    log.warning("lost the lease of task %s; abandoning it", message.task_id)
                    lease.lost = True
                    current.cancel()
                    return

        keeper = asyncio.create_task(keep())
        try:
            yield
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def process_task(self, task_id: int) -> None:
        """Process every image of the task that is not terminal yet."""
        task = await work.start_task(self.db, task_id)
        if task is None:
            return
        unstarted = _Unstarted(len(task.images))
        self._tasks_in_hand.add(unstarted)
        self._task_started.set()
        try:
            await asyncio.gather(
                *(
                    self._process_and_record(task.request_id, task.options, image, unstarted)
                    for image in task.images
                )
            )
        finally:
            self._tasks_in_hand.discard(unstarted)
            self._capacity_changed.set()

    async def fail_task(self, task_id: int, reason: str) -> None:
        """Fail every image of the task that is not terminal yet, with ``internal_error``."""
        task = await work.start_task(self.db, task_id)
        if task is None:
            return
        failure = ImageFailure(ErrorCode.INTERNAL_ERROR, f"the task of this image {reason}")
        await asyncio.gather(
            *(
                self.recorder.record(
                    task.request_id, work.ImageResult(image.id, image.attempts, failure)
                )
                for image in task.images
            )
        )

    async def _process_and_record(
        self,
        request_id: str,
        options: ProcessingOptions,
        image: ImageRecord,
        unstarted: _Unstarted | None = None,
    ) -> None:
        self._images_in_hand += 1
        try:
            result = await self._process_image(request_id, options, image, unstarted)
        finally:
            self._images_in_hand -= 1
        if self._images_in_hand == 0:
            self.recorder.flush()  # nothing else is coming to share the transaction
        await self.recorder.record(request_id, result)

    async def _process_image(
        self,
        request_id: str,
        options: ProcessingOptions,
        image: ImageRecord,
        unstarted: _Unstarted | None = None,
    ) -> work.ImageResult:
        stem = f"{request_id}/{image.row_index + 1}-{image.position}"
        # Pending when its task was taken: no attempt before this one has started it.
        fresh = image.status is ImageStatus.PENDING
        attempt = 0
        waits = 0
        while True:
            async with self._image_slots:
                if unstarted is not None:
                    unstarted.images -= 1
                    unstarted = None
                    self._capacity_changed.set()
                try:
                    outcome = await self.imaging.process(
                        image.input_url, options, stem, fresh=fresh and attempt == 0
                    )
                    away = _storage_away(outcome)
                except ImagingUnavailableError as exc:
                    outcome = None
                    away = f"the imaging service: {exc}"
            self._capacity_changed.set()
            if away:
                # No imaging service took it, or the result could not be stored: wait for
                # them to be back, spending no attempt of the image (it is not its fault).
                waits += 1
                if waits == 1:
                    log.warning("image %d waits for %s", image.id, away)
                await asyncio.sleep(self.retry.delay(waits))
                continue
            assert outcome is not None
            attempt += 1
            last = attempt >= self.retry.attempts
            if not isinstance(outcome, ImageFailure) or not outcome.is_transient or last:
                return work.ImageResult(image.id, image.attempts + attempt, outcome)
            await asyncio.sleep(self.retry.delay(attempt, outcome.retry_after))

    async def _store_output(self, key: str, path: Path) -> None:
        """Store the output CSV, waiting for a storage that is away as images do (the
        task's lease is renewed meanwhile): a retried task would spend its attempts and
        end dead, leaving a request whose images are all done unfinished."""
        waits = 0
        while True:
            try:
                await self.storage.put_file(key, path, "text/csv; charset=utf-8")
                return
            except StorageError as exc:
                if not exc.transient:
                    raise
                waits += 1
                if waits == 1:
                    log.warning("the output CSV %s waits for the storage: %s", key, exc)
            await asyncio.sleep(self.retry.delay(waits))

    async def finalize(self, request_id: str) -> None:
        """Write the output CSV to storage and close the request (idempotent)."""
        request = await work.load_request(self.db, request_id)
        if request is None or request.finished_at is not None:
            return
        key = f"{request_id}/output.csv"
        fd, name = tempfile.mkstemp(prefix="pixelmill-output-", suffix=".csv")
        path = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
                writer = OutputCsvWriter(out, list(request.header))
                async for cells, urls in work.output_rows(self.db, request_id):
                    writer.write(cells, urls)
            await self._store_output(key, path)
        finally:
            path.unlink(missing_ok=True)
        if await work.close_request(self.db, request_id, key, self.storage.url_for(key)):
            log.info("request %s finished", request_id)
            if self.on_closed:
                self.on_closed(request_id)
