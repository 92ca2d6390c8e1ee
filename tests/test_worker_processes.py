"""``serve`` runs its workers as child processes: watched, restarted, and gone with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from pixelmill.supervisor import (
    CONTROL_ENV,
    GATED_ENV,
    ForkedChild,
    can_fork,
    follow_parent,
    wait_at_gate,
)
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.server import ServeProcess
from tests.support.waiting import wait_until


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def workers_of(pid: int, without: int | None = None) -> set[int] | None:
    """The two worker processes of ``pid`` once both run (and ``without`` is not one)."""
    kids = children_of(pid)
    return kids if len(kids) == 2 and without not in kids else None


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def process_one_image(server: ServeProcess, image_host: ImageHost, tag: str) -> dict:
    body = f"S. No.,Product Name,Input Image Urls\n1,P,{image_host.url(f'img/{PHOTOS[0]}?{tag}')}\n"
    accepted = server.post("/api/v1/requests", files={"file": ("p.csv", body, "text/csv")})
    assert accepted.status_code == 202, accepted.text
    return server.wait_finished(accepted.json()["request_id"], timeout=60)


def test_a_dead_worker_process_is_replaced_and_all_die_with_serve(
    tmp_path: Path, image_host: ImageHost
) -> None:
    server = ServeProcess(tmp_path / "serve", env={"PIXELMILL_WORKER_PROCESSES": "2"}).start()
    try:
        assert server.process is not None
        serve_pid = server.process.pid
        first = wait_until(lambda: workers_of(serve_pid), timeout=30, what="two workers")
        assert process_one_image(server, image_host, "before")["status"] == "completed"

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_until(
            lambda: workers_of(serve_pid, without=victim), timeout=30, what="a replacement"
        )
        assert replaced - first, "a new process took the dead one's place"
        assert process_one_image(server, image_host, "after")["status"] == "completed"

        server.kill9()
        wait_until(
            lambda: not any(alive(pid) for pid in replaced),
            timeout=10,
            what="the worker processes gone with serve",
        )
    finally:
        server.stop()


def test_a_worker_process_that_stops_cleanly_is_not_restarted(tmp_path: Path) -> None:
    """Ctrl-C and ``kill -- -PGID`` reach the workers before ``serve`` itself: a worker
    that stopped on its signal (exit 0) is not restarted in the middle of the shutdown."""
    server = ServeProcess(tmp_path / "serve", env={"PIXELMILL_WORKER_PROCESSES": "2"}).start()
    try:
        assert server.process is not None
        workers = wait_until(lambda: workers_of(server.process.pid), timeout=30, what="workers")
        wait_until(
            lambda: server.log().count("worker started") == 2, timeout=30, what="both at work"
        )
        os.kill(min(workers), signal.SIGTERM)

        verdict = wait_until(
            lambda: next(
                (line for line in server.log().splitlines() if "restarting it" in line), None
            ),
            timeout=30,
            what="the supervisor's word on the stopped worker",
        )
        assert "stopped; not restarting it" in verdict, verdict
        assert len(children_of(server.process.pid)) == 1
    finally:
        server.stop()


async def test_a_child_hears_wakes_on_its_control_pipe_and_stops_when_it_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control_read, control_write = os.pipe()
    monkeypatch.setenv(CONTROL_ENV, str(control_read))
    woken, gone = asyncio.Event(), asyncio.Event()
    assert follow_parent(on_wake=woken.set, on_parent_gone=gone.set)
    os.write(control_write, b"w")
    await asyncio.wait_for(woken.wait(), timeout=10)
    assert not gone.is_set()
    os.close(control_write)  # as when the parent stops its children, or dies
    await asyncio.wait_for(gone.wait(), timeout=10)
    os.close(control_read)


@pytest.mark.parametrize(("words", "opened"), [(b"wwo", True), (b"ww", False), (b"", False)])
def test_a_gated_child_starts_on_the_open_word_and_leaves_when_the_pipe_closes_first(
    monkeypatch: pytest.MonkeyPatch, words: bytes, opened: bool
) -> None:
    control_read, control_write = os.pipe()
    monkeypatch.setenv(CONTROL_ENV, str(control_read))
    monkeypatch.setenv(GATED_ENV, "1")
    os.write(control_write, words)  # wakes sent before the gate opens are no signal
    if not opened:
        os.close(control_write)
    assert wait_at_gate() is opened
    os.close(control_read)
    if opened:
        os.close(control_write)


def test_sigterm_stops_the_worker_processes_and_exits_zero(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "serve", env={"PIXELMILL_WORKER_PROCESSES": "2"}).start()
    assert server.process is not None
    serve_pid = server.process.pid
    workers = wait_until(lambda: workers_of(serve_pid), timeout=30, what="two workers")
    wait_until(lambda: server.log().count("worker started") == 2, timeout=30, what="both ready")
    assert server.terminate(timeout=60) == 0, server.log()
    assert not any(alive(pid) for pid in workers), "no worker process outlives serve"
    assert "did not stop in time" not in server.log()


def start_process(
    tmp_path: Path,
    image_host: ImageHost,
    images: int,
    log: IO[str],
    route: str = "img",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``pixelmill process`` on ``images`` images, two images per task, two processes,
    its output to ``log``."""
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f"{n},P{n},{image_host.url(f'{route}/{PHOTOS[0]}?share={n}')}" for n in range(images)]
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_TASK_MAX_IMAGES": "2",
        "PIXELMILL_WORKER_PROCESSES": "2",
        "PIXELMILL_LOG_LEVEL": "INFO",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "process", str(source), "-o", str(tmp_path / "out")],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(("images", "helpers_started"), [(8, 1), (2, 0)])
def test_process_lets_its_early_worker_process_in_only_when_there_is_work_to_share(
    tmp_path: Path, image_host: ImageHost, images: int, helpers_started: int
) -> None:
    # The second process starts before the request is staged and waits at its gate;
    # with one task (two images) there is nothing to share, and it leaves unused. The
    # images wait at the host's gate until the helper has started, so that the first
    # process cannot finish them all first.
    log_path = tmp_path / "process.log"
    image_host.gate.clear()
    try:
        with log_path.open("w") as log:
            running = start_process(tmp_path, image_host, images, log, route="gate/img")
            if helpers_started:
                wait_until(
                    lambda: "worker started" in log_path.read_text(),
                    timeout=60,
                    what="the second worker process to start",
                )
                # Forked, not spawned: it runs the parent's command line, not ``worker``.
                (helper,) = children_of(running.pid)
                assert cmdline(helper) == cmdline(running.pid)
            image_host.gate.set()
            assert running.wait(timeout=120) == 0, log_path.read_text()
    finally:
        image_host.gate.set()
    output = log_path.read_text()
    assert f"completed: {images} completed" in output
    assert output.count("pixelmill: worker started") == helpers_started, output
    assert "did not stop in time" not in output


def test_a_killed_forked_helper_is_replaced_by_a_spawned_worker_and_nothing_is_lost(
    tmp_path: Path, image_host: ImageHost
) -> None:
    # The forked helper is killed while it holds a task whose images wait at the host:
    # a ``pixelmill worker`` replaces it, the task comes back when its lease runs out,
    # and every image is processed once the host lets them through.
    log_path = tmp_path / "process.log"
    image_host.gate.clear()
    try:
        with log_path.open("w") as log:
            running = start_process(
                tmp_path, image_host, 8, log, route="gate/img",
                env={"PIXELMILL_LEASE_SECONDS": "2"},
            )  # fmt: skip
            wait_until(
                lambda: "worker started" in log_path.read_text(),
                timeout=60,
                what="the forked worker process to start",
            )
            (forked,) = children_of(running.pid)
            os.kill(forked, signal.SIGKILL)
            wait_until(
                lambda: (kids := children_of(running.pid)) and forked not in kids and kids,
                timeout=30,
                what="a replacement worker process",
            )
            (replacement,) = children_of(running.pid)
            assert cmdline(replacement)[-2:] == ["pixelmill", "worker"]
            image_host.gate.set()
            assert running.wait(timeout=120) == 0, log_path.read_text()
    finally:
        image_host.gate.set()
    output = log_path.read_text()
    assert "completed: 8 completed, 0 failed" in output, output
    assert "worker process 0 exited with -9; restarting it" in output, output


@pytest.fixture
def two_children() -> Iterator[tuple[int, int]]:
    """Two children of this process, one exiting with 3 and one sleeping; Popen is never
    asked to reap them, so that ForkedChild can."""
    exiting = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield exiting.pid, sleeping.pid
    finally:
        sleeping.kill()
        sleeping.wait()


async def test_a_forked_child_is_awaited_by_its_pidfd_and_reports_how_it_ended(
    two_children: tuple[int, int],
) -> None:
    exiting, sleeping = two_children
    child = ForkedChild(exiting)
    both = await asyncio.wait_for(asyncio.gather(child.wait(), child.wait()), 30)
    assert both == [3, 3] and child.returncode == 3
    child.send_signal(signal.SIGTERM)  # exited: a no-op, not an error
    victim = ForkedChild(sleeping)
    victim.kill()
    assert await asyncio.wait_for(victim.wait(), 30) == -signal.SIGKILL


def test_children_are_forked_only_while_no_other_thread_runs() -> None:
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        ready.set()
        release.wait(30)

    other = threading.Thread(target=hold)
    alone = threading.active_count() == 1
    other.start()
    ready.wait(30)
    try:
        assert not can_fork()
    finally:
        release.set()
        other.join()
    assert can_fork() == (alone and sys.platform == "linux")
