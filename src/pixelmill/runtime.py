"""The parts of a running pixelmill process, built from its settings and closed together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from pixelmill import collector
from pixelmill.config import Settings
from pixelmill.db import tables
from pixelmill.db.engine import Database
from pixelmill.imaging import open_imaging
from pixelmill.imaging.base import Imaging
from pixelmill.queue import Queue, open_queue
from pixelmill.startup import StartupError, check_storage, database_failure, failure
from pixelmill.storage import Storage, open_storage
from pixelmill.supervisor import WorkerProcesses
from pixelmill.webhooks.dispatcher import WebhookDispatcher
from pixelmill.worker import Worker, worker_name

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Database, storage and queue of a process; imaging, worker and webhooks if it works."""

    settings: Settings
    db: Database
    storage: Storage
    queue: Queue
    imaging: Imaging | None = None
    worker: Worker | None = None
    dispatcher: WebhookDispatcher | None = None
    worker_processes: WorkerProcesses | None = None
    # Set whenever this process's worker closes a request.
    request_closed: asyncio.Event = field(default_factory=asyncio.Event)
    _worker_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _dispatcher_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        migrate: bool = False,
        throwaway: bool = False,
        storage: Storage | None = None,
        announce: bool = True,
        stores: bool = True,
    ) -> Runtime:
        """Build the parts named by the settings; unknown URL schemes fail here, at start.

        ``migrate`` brings the database up to date with the migrations; ``throwaway``
        creates the schema of a new database that lives for one run, straight from the
        tables module (the same schema, as tests/db/test_migrations.py proves, without
        the start-up cost of Alembic). ``announce`` logs the backends it opened (not
        for a check that opens them only to close them again). ``stores``: the process
        writes to the storage (a worker does; the API alone only reads it).
        """
        if migrate:
            from pixelmill.db.migrate import upgrade_async  # Alembic: only where it runs

            try:
                await upgrade_async(settings.database_url)
            except Exception as exc:
                message = database_failure("cannot migrate", settings.database_url, exc)
                raise StartupError(message) from exc
        db = Database(
            settings.database_url,
            pool_size=settings.database_pool_size,
            sqlite_synchronous=settings.sqlite_synchronous,
            command_timeout=settings.database_command_timeout_seconds,
        )
        queue = open_queue(settings, db, owner=worker_name())
        try:
            if storage is None:
                storage = _open_storage(settings)
            if throwaway:
                async with db.write() as conn:
                    await conn.run_sync(tables.metadata.create_all)
            await check_storage(storage, settings.storage_url, write=stores)
            try:
                await queue.start()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await queue.close()
                raise StartupError(
                    failure("cannot start", "queue", settings.queue_url, "PIXELMILL_QUEUE_URL", exc)
                ) from exc
        except BaseException:
            await db.close()
            raise
        if announce:
            log.info(
                "pixelmill backends: database=%s queue=%s imaging=%s storage=%s",
                db.writer.url.render_as_string(hide_password=True),
                settings.queue_url,
                settings.imaging_url,
                settings.storage_url,
            )
        return cls(settings, db, storage, queue)

    def start_worker(self, webhooks: bool = True) -> Worker:
        """Start a worker, and (unless told not to) the webhook dispatcher beside it, in
        this process's loop."""
        self.imaging = open_imaging(self.settings, self.storage)
        if webhooks:
            self.dispatcher = WebhookDispatcher(self.settings, self.db)
            self._dispatcher_task = asyncio.create_task(
                self.dispatcher.run(), name="pixelmill-webhooks"
            )
        self.worker = Worker(
            self.settings,
            self.db,
            self.queue,
            self.imaging,
            self.storage,
            on_closed=self._on_request_closed,
        )
        self._worker_task = asyncio.create_task(self.worker.run(), name="pixelmill-worker")
        # What was built so far lives as long as the process: the cyclic collector
        # need not go through it again on every full collection.
        collector.started()
        return self.worker

    def _on_request_closed(self, _request_id: str) -> None:
        self.request_closed.set()
        self.wake_webhooks()

    async def start_workers(self, processes: int) -> None:
        """Start this process's workers: ``processes`` child processes, or (0) one worker
        inside this process, beside whatever else it serves."""
        if processes == 0:
            self.start_worker()
            return
        self.worker_processes = WorkerProcesses(self.settings, processes)
        await self.worker_processes.start()

    def wake_workers(self) -> None:
        """Have this process's workers look for tasks now (after queueing some)."""
        self.queue.wake()
        if self.worker_processes:
            self.worker_processes.wake()

    def wake_webhooks(self) -> None:
        """Have this process's dispatcher, if it runs one, look for due deliveries now."""
        if self.dispatcher:
            self.dispatcher.wake()

    async def close_when_stopped(self) -> bool:
        """Wait until the worker stops, then close everything; False when it ended
        without ``worker.stop()`` (it crashed), True when it was asked to."""
        asked = True
        if self._worker_task:
            await asyncio.gather(self._worker_task, return_exceptions=True)
            asked = self.worker is not None and self.worker.stop_requested
        await self.close()
        return asked

    async def close(self) -> None:
        """Stop the workers and the dispatcher (all graceful), then close every connection."""
        if self.worker_processes:
            await self.worker_processes.stop(self.settings.shutdown_grace_seconds + 10)
        if self.worker:
            self.worker.stop()
        if self.dispatcher:
            self.dispatcher.stop()
        running = [task for task in (self._worker_task, self._dispatcher_task) if task]
        await asyncio.gather(*running, return_exceptions=True)
        if self.imaging:
            await self.imaging.close()
        await self.queue.close()
        await self.db.close()


def _open_storage(settings: Settings) -> Storage:
    """The storage of the settings; one it cannot open (boto3 missing for ``s3://``)
    is a start-up failure, said in one line."""
    try:
        return open_storage(settings.storage_url, settings.storage_base_url)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
