"""Worker processes beside a serving process: started, watched, restarted and stopped.

``serve`` and ``process`` run their workers as child processes, one per core by
default (``PIXELMILL_WORKER_PROCESSES``): each child is a plain ``pixelmill worker``
with its own event loop and its own GIL, so the Python work of fetching, recording and
coordinating spreads over every core instead of queueing behind one interpreter lock,
and the API's event loop answers status calls without waiting behind image work.

A parent may start its children before it is ready for them (``gated``): each child
does its slow start-up (the imports) beside the parent's own, then waits at a gate (a
pipe) until :meth:`WorkerProcesses.open_gate`, or exits when the gate is closed unused.

A child gets the parent's settings whole (``PIXELMILL_SETTINGS_JSON``) and watches its
parent. The parent stops its children with SIGTERM (each finishes or hands back its
tasks); when the parent itself dies without that, the children die with it, so that a
killed ``serve`` is gone as one process would be (Linux ``PR_SET_PDEATHSIG``; elsewhere
the child notices within a second and stops gracefully). Their tasks come back when the
leases run out, as after any crash. A child that dies unexpectedly is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from pixelmill.config import Settings

log = logging.getLogger(__name__)

SETTINGS_ENV = "PIXELMILL_SETTINGS_JSON"
PARENT_ENV = "PIXELMILL_PARENT_PID"
GATE_ENV = "PIXELMILL_START_GATE_FD"
_PR_SET_PDEATHSIG = 1
_RESTART_DELAY = 1.0


def child_settings() -> Settings | None:
    """The settings a parent handed to this process, or None when it has no parent."""
    blob = os.environ.get(SETTINGS_ENV)
    return Settings.model_validate_json(blob) if blob else None


def wait_at_gate() -> bool:
    """In a child started gated: block until the parent opens the gate (True) or closes
    it unused (False). True at once for a child that was started without a gate."""
    descriptor = os.environ.pop(GATE_ENV, None)
    if descriptor is None:
        return True
    with os.fdopen(int(descriptor), "rb") as gate:
        return gate.read(1) == b"1"


def follow_parent(on_parent_gone: Callable[[], None]) -> asyncio.Task[None] | None:
    """In a child: have ``on_parent_gone`` called when the parent process is gone.

    Returns the watching task (None when this process was not started by a parent).
    """
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return None
    parent = int(expected)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                break
        log.warning("the parent process %d is gone; stopping", parent)
        on_parent_gone()

    return asyncio.create_task(watch(), name="pixelmill-parent-watch")


class WorkerProcesses:
    """``count`` children running ``pixelmill worker`` with these settings."""

    def __init__(self, settings: Settings, count: int, *, gated: bool = False) -> None:
        self.settings = settings
        self.count = count
        self.gated = gated
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._gates: list[int] = []  # write ends of the gates of children still waiting
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        return [child.pid for child in self._children.values() if child.returncode is None]

    async def start(self) -> None:
        """Start every child and keep each one running until :meth:`stop`."""
        for slot in range(self.count):
            await self._spawn(slot, gated=self.gated)
            self._keepers.append(
                asyncio.create_task(self._keep(slot), name=f"pixelmill-worker-process-{slot}")
            )
        log.info("started %d worker processes: %s", self.count, self.pids)

    async def _spawn(self, slot: int, gated: bool = False) -> None:
        environment = {
            **os.environ,
            SETTINGS_ENV: self.settings.model_dump_json(),
            PARENT_ENV: str(os.getpid()),
        }
        kept: tuple[int, ...] = ()
        if gated:
            gate_read, gate_write = os.pipe()
            environment[GATE_ENV] = str(gate_read)
            kept = (gate_read,)
        try:
            self._children[slot] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pixelmill", "worker", env=environment, pass_fds=kept
            )
        finally:
            if gated:
                os.close(gate_read)
        if gated:
            self._gates.append(gate_write)

    def open_gate(self) -> None:
        """Let gated children start work (a no-op for children started without a gate)."""
        self._close_gates(b"1")

    def _close_gates(self, word: bytes) -> None:
        for gate in self._gates:
            with contextlib.suppress(OSError):  # the child is gone already
                if word:
                    os.write(gate, word)
            os.close(gate)
        self._gates.clear()

    async def _keep(self, slot: int) -> None:
        while True:
            code = await self._children[slot].wait()
            if self._stopping:
                return
            log.error("worker process %d exited with %s; restarting it", slot, code)
            await asyncio.sleep(_RESTART_DELAY)
            if self._stopping:
                return
            await self._spawn(slot)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every child (each finishes or hands back its tasks), SIGKILL stragglers."""
        self._stopping = True
        self._close_gates(b"")  # children still at the gate exit
        running = [child for child in self._children.values() if child.returncode is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(child.wait()) for child in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for child in running:
                if child.returncode is None:
                    log.warning("worker process %d did not stop in time; killing it", child.pid)
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
            if late:
                await asyncio.wait(late)
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
