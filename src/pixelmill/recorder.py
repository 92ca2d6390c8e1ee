"""Group commit of image results: many coroutines, one transaction at a time.

Every image coroutine hands its result to :meth:`ResultRecorder.record` and waits
until it is durable. One writer takes everything that queued up while the previous
transaction ran and stores it in the next, so the number of transactions adapts to
the load instead of growing with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pixelmill.db import work
from pixelmill.db.engine import Database
from pixelmill.logs import brief

log = logging.getLogger(__name__)

_Pending = tuple[str, work.ImageResult, asyncio.Future[None]]


class ResultRecorder:
    """Writes image results in batches; ``on_finished`` hears of each request it finishes."""

    def __init__(
        self,
        db: Database,
        on_finished: Callable[[str], None],
        max_batch: int = 500,
        window: float = 0.15,
    ) -> None:
        self.db = db
        self.on_finished = on_finished
        self.max_batch = max_batch
        self.window = window
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._flush = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def record(self, request_id: str, result: work.ImageResult) -> None:
        """Store one result; returns once it is committed (raises if the write failed)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_forever(), name="pixelmill-recorder")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, result, done))
        self._wakeup.set()
        await done

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            # Every transaction waits a short window (unless a batch is full already or
            # no more results are coming), so results that land together share it:
            # written back to back, each would carry only what came in while the
            # previous one ran.
            if len(self._pending) < self.max_batch and not self._flush.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.window):
                        await self._flush.wait()
            self._flush.clear()
            self._wakeup.clear()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            await self._write(batch)
            if self._pending:
                self._wakeup.set()

    def flush(self) -> None:
        """Write what is pending without waiting out the window: no more is coming."""
        self._flush.set()

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            finished = await work.record_results(
                self.db, [(request_id, result) for request_id, result, _ in batch]
            )
        except Exception as exc:
            log.warning("recording %d image results failed: %s", len(batch), brief(exc))
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, _, done in batch:
            if not done.done():
                done.set_result(None)
        for request_id in finished:
            self.on_finished(request_id)

    async def close(self) -> None:
        """Stop the writer; results still queued are failed (their tasks are redelivered)."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for _, _, done in self._pending:
            if not done.done():
                done.set_exception(RuntimeError("the recorder was closed"))
        self._pending.clear()
