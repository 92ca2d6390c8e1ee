"""Worker processes beside a serving process: started, watched, restarted and stopped.

``serve`` and ``process`` run their workers as child processes, one per core by
default (``PIXELMILL_WORKER_PROCESSES``): each child is a plain ``pixelmill worker``
with its own event loop and its own GIL, so the Python work of fetching, recording and
coordinating spreads over every core instead of queueing behind one interpreter lock,
and the API's event loop answers status calls without waiting behind image work.

A child gets the parent's settings whole (``PIXELMILL_SETTINGS_JSON``) and the read end
of a control pipe from it. Through the pipe the parent wakes its children when it has
queued work (an upload), so that they take it at once instead of at their next poll.
A parent may also start its children before it is ready for them (``gated``): each
child does its slow start-up (the imports) beside the parent's own, then waits until
:meth:`WorkerProcesses.open_gate`, or leaves when the pipe is closed unused.

``process`` forks its children (:meth:`WorkerProcesses.fork`, on Linux) once it has
imported the runtime and before it starts an event loop or a thread: a forked child
shares those imports, half of a child's start-up, instead of starting Python afresh. A
child that has to be restarted is spawned as a plain ``pixelmill worker``.

The parent stops its children by closing the pipes and with SIGTERM (each finishes or
hands back its tasks). When the parent dies without that, the children die with it, so
that a killed ``serve`` is gone as one process would be (Linux ``PR_SET_PDEATHSIG``;
elsewhere the pipe's closing tells the child, which stops gracefully). Their tasks come
back when the leases run out, as after any crash. A child that dies unexpectedly is
restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pixelmill.config import Settings

if TYPE_CHECKING:
    from asyncio.subprocess import Process

log = logging.getLogger(__name__)

SETTINGS_ENV = "PIXELMILL_SETTINGS_JSON"
CONTROL_ENV = "PIXELMILL_CONTROL_FD"
GATED_ENV = "PIXELMILL_START_GATED"
_OPEN = b"o"  # a gated child may start work
_WAKE = b"w"  # look for tasks now
_PR_SET_PDEATHSIG = 1
_RESTART_DELAY = 1.0


def child_settings() -> Settings | None:
    """The settings a parent handed to this process, or None when it has no parent."""
    blob = os.environ.get(SETTINGS_ENV)
    return Settings.model_validate_json(blob) if blob else None


def _control_pipe() -> int | None:
    descriptor = os.environ.get(CONTROL_ENV)
    return int(descriptor) if descriptor else None


def wait_at_gate() -> bool:
    """In a child started gated: block until the parent opens the gate (True) or closes
    the pipe unused (False). True at once for a child that was started without a gate."""
    control = _control_pipe()
    if not os.environ.pop(GATED_ENV, None) or control is None:
        return True
    while True:
        word = os.read(control, 1)
        if word == _OPEN:
            return True
        if not word:
            return False


def follow_parent(on_wake: Callable[[], None], on_parent_gone: Callable[[], None]) -> bool:
    """In a child: call ``on_wake`` when the parent says there is work, and
    ``on_parent_gone`` when the parent stops this child or is gone. False when this
    process was not started by a parent."""
    control = _control_pipe()
    if control is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    loop = asyncio.get_running_loop()
    os.set_blocking(control, False)

    def readable() -> None:
        try:
            words = os.read(control, 4096)
        except BlockingIOError:
            return
        if words:
            on_wake()
            return
        loop.remove_reader(control)
        log.info("the parent process closed its control pipe; stopping")
        on_parent_gone()

    loop.add_reader(control, readable)
    return True


class ForkedChild:
    """A child made by ``os.fork``, watched like an asyncio subprocess (a pidfd tells
    the event loop when it exits)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] | None = None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """The exit code (-N for signal N), once the child has exited and been reaped."""
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._reap())
        return await asyncio.shield(self._exited)

    async def _reap(self) -> int:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self.pid)
        try:
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        # Readable means exited: the child is a zombie, reaped here without waiting.
        _, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


# How a child that was asked to stop exits: done, killed by SIGTERM or SIGINT, or
# reporting one of them as 128 + its number (a fork stopped by Ctrl-C at its gate).
_STOPPED = frozenset(
    {0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}
)


def can_fork() -> bool:
    """Whether children may be forked here: Linux (pidfds; fork is the norm there) and
    no thread but this one, so that no lock can be held by a thread the child lacks."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and threading.active_count() == 1


class WorkerProcesses:
    """``count`` children running ``pixelmill worker`` with these settings."""

    def __init__(self, settings: Settings, count: int, *, gated: bool = False) -> None:
        self.settings = settings
        self.count = count
        self.gated = gated
        self._children: dict[int, Process | ForkedChild] = {}
        self._controls: dict[int, int] = {}  # the write end of each child's control pipe
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        return [child.pid for child in self._children.values() if child.returncode is None]

    def fork(self, child_main: Callable[[], object]) -> bool:
        """Start every child now as a fork of this process running ``child_main``; call
        it before any event loop or thread is started. False (nothing started) where
        :func:`can_fork` says no: then :meth:`start` spawns them."""
        if not can_fork():
            return False
        sys.stdout.flush()  # or what is buffered would be written twice
        sys.stderr.flush()
        for slot in range(self.count):
            control_read, control_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                _run_forked_child(
                    child_main, control_read, [control_write, *self._controls.values()], self.gated
                )
            os.close(control_read)
            os.set_blocking(control_write, False)
            self._children[slot] = ForkedChild(pid)
            self._controls[slot] = control_write
        return True

    async def start(self) -> None:
        """Start every child not forked already, and keep each one running until :meth:`stop`."""
        for slot in range(self.count):
            if slot not in self._children:
                await self._spawn(slot, gated=self.gated)
            self._keepers.append(
                asyncio.create_task(self._keep(slot), name=f"pixelmill-worker-process-{slot}")
            )
        log.info("started %d worker processes: %s", self.count, self.pids)

    async def __aenter__(self) -> WorkerProcesses:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop(self.settings.shutdown_grace_seconds + 10)

    async def _spawn(self, slot: int, gated: bool = False) -> None:
        control_read, control_write = os.pipe()
        environment = {
            **os.environ,
            SETTINGS_ENV: self.settings.model_dump_json(),
            CONTROL_ENV: str(control_read),
            **({GATED_ENV: "1"} if gated else {}),
        }
        try:
            self._children[slot] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pixelmill", "worker",
                env=environment, pass_fds=(control_read,),
            )  # fmt: skip
        except BaseException:
            os.close(control_write)
            raise
        finally:
            os.close(control_read)
        os.set_blocking(control_write, False)
        self._close_control(slot)
        self._controls[slot] = control_write

    def open_gate(self) -> None:
        """Let gated children start work (a no-op for children started without a gate)."""
        self._tell(_OPEN)

    def wake(self) -> None:
        """Have every child look for tasks now rather than at its next poll."""
        self._tell(_WAKE)

    def _tell(self, word: bytes) -> None:
        for control in self._controls.values():
            # A full pipe holds an unread wake already; a broken one, a child gone.
            with contextlib.suppress(OSError):
                os.write(control, word)

    def _close_control(self, slot: int) -> None:
        control = self._controls.pop(slot, None)
        if control is not None:
            os.close(control)

    async def _keep(self, slot: int) -> None:
        while True:
            code = await self._children[slot].wait()
            if self._stopping:
                return
            if code in _STOPPED:
                # It was asked to stop (a Ctrl-C or a kill reaches the whole process
                # group before this parent stops): not a failure to make good. A crash,
                # or SIGKILL from the kernel's OOM killer, is.
                log.info("worker process %d stopped; not restarting it", slot)
                return
            log.error("worker process %d exited with %s; restarting it", slot, code)
            await asyncio.sleep(_RESTART_DELAY)
            if self._stopping:
                return
            await self._spawn(slot)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every child (each finishes or hands back its tasks), SIGKILL stragglers."""
        self._stopping = True
        for slot in list(self._controls):
            self._close_control(slot)  # a child still at its gate leaves
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


def _run_forked_child(
    child_main: Callable[[], object], control: int, parents_ends: list[int], gated: bool
) -> None:
    """In a forked child: take the control pipe, run ``child_main``, and never return
    into the parent's code (no ``atexit`` of the parent's either: its temporary folder
    is the parent's to remove)."""
    code = 1
    try:
        for descriptor in parents_ends:  # another child's pipe must close when the parent's does
            os.close(descriptor)
        os.environ[CONTROL_ENV] = str(control)
        if gated:
            os.environ[GATED_ENV] = "1"
        child_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        code = 128 + signal.SIGINT
    except BaseException:
        log.exception("the forked worker process failed")
    finally:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
