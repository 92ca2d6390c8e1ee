"""The body of a worker process, whether ``pixelmill worker`` started it or a fork did.

Kept apart from the command line so that ``process`` can run it in a child it forks:
that child shares the parent's imports instead of starting Python afresh.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from pixelmill.config import Settings

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (less CPU per event), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def run_worker_process(settings: Settings, *, migrate: bool, webhooks: bool = True) -> None:
    """Import what a worker needs, wait at the gate if the parent set one, then work
    until SIGTERM, SIGINT or the parent's leaving. ``migrate`` is for a worker that no
    parent has migrated the database for; ``webhooks`` runs the webhook dispatcher
    beside it (not for a one-shot run, whose request has none)."""
    # The slow imports, before the gate: the runtime, and the codecs if images are
    # processed in this process.
    from pixelmill.imaging import imaging_is_inline
    from pixelmill.runtime import Runtime  # noqa: F401
    from pixelmill.supervisor import wait_at_gate

    if imaging_is_inline(settings):
        from pixelmill.imaging.inline import InlineImaging  # noqa: F401
    if not wait_at_gate():
        return  # the parent started this worker early, then found no work for it
    from pixelmill.startup import StartupError

    try:
        run_async(_work(settings, migrate, webhooks))
    except StartupError as exc:
        logging.getLogger("pixelmill").error("%s", exc)
        raise SystemExit(1) from None


async def _work(settings: Settings, migrate: bool, webhooks: bool) -> None:
    from pixelmill.runtime import Runtime
    from pixelmill.supervisor import follow_parent

    runtime = await Runtime.open(settings, migrate=migrate)
    worker = runtime.start_worker(webhooks=webhooks)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    follow_parent(on_wake=runtime.queue.wake, on_parent_gone=worker.stop)
    logging.getLogger("pixelmill").info("worker started")
    if not await runtime.close_when_stopped():
        # Not a stop but a crash: a non-zero exit, so that a supervisor restarts it.
        logging.getLogger("pixelmill").error("the worker ended without being asked to")
        raise SystemExit(1)
