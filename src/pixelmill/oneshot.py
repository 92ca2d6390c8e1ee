"""``pixelmill process``: the whole pipeline in one process, with no server.

The same ingest, queue, worker and imaging as ``serve``, on a throw-away SQLite
database; the images land in ``OUT/images`` and the CSV in ``OUT/output.csv``, whose
URLs are paths relative to OUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits, CsvRejected
from pixelmill.domain import ProcessingOptions
from pixelmill.supervisor import WorkerProcesses

if TYPE_CHECKING:
    from pixelmill.db import queries
    from pixelmill.runtime import Runtime


_DEFAULT_OPTIONS = ProcessingOptions()


def process_file(
    settings: Settings,
    file: Path,
    out: Path,
    console: Console,
    options: ProcessingOptions = _DEFAULT_OPTIONS,
) -> int:
    """Process ``file`` into ``out`` (the command line's way): 0 when the request
    completed, 1 otherwise, 2 when the file was refused.

    The other worker processes (one per core) are forked once the runtime is imported,
    before the event loop starts, so that they share this process's imports; they wait
    at a gate until there is work, doing their own start-up beside this process's.
    Called where forking is not safe (another thread runs), it spawns them instead.
    """
    if not _acceptable(settings, file, console) or not _writable_folder(out, console):
        return 2
    with _workspace(settings, out) as (local, helpers):
        # Most of the start-up: imported once, here, for this process and its forks.
        from pixelmill.db.ingest import stage_request  # noqa: F401
        from pixelmill.runtime import Runtime  # noqa: F401
        from pixelmill.worker_main import run_async, run_worker_process

        helpers.fork(lambda: run_worker_process(local, migrate=False, webhooks=False))
        terminated: list[int] = []
        try:
            return run_async(_process(local, helpers, file, out, console, options, terminated))
        except asyncio.CancelledError:
            if not terminated:
                raise
            return _stopped(console, "SIGTERM", signal.SIGTERM)
        except KeyboardInterrupt:
            return _stopped(console, "Ctrl-C", signal.SIGINT)


def _stopped(console: Console, how: str, number: int) -> int:
    """Say that the run was stopped; the exit code of a process ended by that signal."""
    console.print(f"[yellow]stopped by {how}; OUT holds what was done[/yellow]")
    return 128 + number


def _acceptable(settings: Settings, file: Path, console: Console) -> bool:
    if file.stat().st_size > settings.max_upload_bytes:
        # The same limit as an upload, so a file is accepted or refused alike everywhere.
        console.print(
            f"[red]the file is larger than {settings.max_upload_bytes} bytes "
            "(PIXELMILL_MAX_UPLOAD_BYTES); split the CSV into several files[/red]"
        )
        return False
    return True


def _writable_folder(out: Path, console: Console) -> bool:
    """Whether OUT is (or can be made) a folder; says why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        console.print(f"[red]cannot use {out} as the output folder: {exc.strerror or exc}[/red]")
        return False
    return True


@contextlib.contextmanager
def _workspace(settings: Settings, out: Path) -> Iterator[tuple[Settings, WorkerProcesses]]:
    """The settings of a one-shot run, with its state in a temporary folder, and its
    helpers (started gated, by the caller)."""
    with tempfile.TemporaryDirectory(prefix="pixelmill-process-") as state:
        local = _local_settings(settings, Path(state), out)
        yield local, WorkerProcesses(local, max(0, local.worker_process_count - 1), gated=True)


def _local_settings(settings: Settings, state: Path, out: Path) -> Settings:
    """A throw-away database and queue in ``state``; the images land in ``out``."""
    return settings.model_copy(
        update={
            "database_url": f"sqlite:///{state / 'pixelmill.db'}",
            # Deleted at the end of the run, and useless after a crash: never fsynced.
            "sqlite_synchronous": "off",
            "queue_url": "db://",
            # The images must land in OUT, not in an imaging service's storage.
            "imaging_url": "inline://",
            "storage_url": f"file://{(out / 'images').resolve()}",
            "storage_base_url": "images",
            "poll_interval": 0.05,
        }
    )


async def _process(
    local: Settings,
    helpers: WorkerProcesses,
    file: Path,
    out: Path,
    console: Console,
    options: ProcessingOptions,
    terminated: list[int],
) -> int:
    from pixelmill.db import queries
    from pixelmill.db.ingest import stage_request
    from pixelmill.runtime import Runtime

    # SIGTERM (kill, timeout, a job scheduler) stops the run as Ctrl-C does: the
    # helpers stop, this process's worker hands back what it holds, and the
    # temporary state goes with the folder that holds it.
    main = asyncio.current_task()
    assert main is not None

    def stop() -> None:
        terminated.append(signal.SIGTERM)
        main.cancel()

    if threading.current_thread() is threading.main_thread():  # where signals arrive
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)

    async with helpers:  # starts those not forked already; stops them all at the end
        runtime = await Runtime.open(local, throwaway=True)
        try:
            try:
                accepted = await stage_request(
                    runtime.db,
                    file,
                    options=options,
                    webhook_url=None,
                    owner=None,
                    limits=CsvLimits(local.max_rows, local.max_urls_per_row),
                    task_max_images=local.task_max_images,
                    batch_rows=local.ingest_batch_rows,
                )
            except CsvRejected as exc:
                console.print(f"[red]{exc.message}[/red]")
                for problem in exc.problems[:20]:
                    column = f", {problem.column}" if problem.column else ""
                    where = f"line {problem.line}{column}"
                    console.print(f"  {where}: {problem.message}", highlight=False)
                return 2
            # The helpers are worth it only when there is more than one task to share;
            # otherwise they leave, when stopped, without starting. This process works too.
            if accepted.tasks > 1:
                helpers.open_gate()
            runtime.start_worker(webhooks=False)  # a one-shot request has no webhook
            row = await _follow(runtime, accepted.request_id, accepted.images, console)
            failures = (
                await queries.failure_counts(runtime.db, accepted.request_id) if row.failed else []
            )
        finally:
            await runtime.close()
    output_csv = runtime.storage.local_path(row.output_key)
    assert output_csv is not None  # the storage is a local folder
    shutil.move(output_csv, out / "output.csv")
    console.print(
        f"{row.status}: {row.completed} completed, {row.failed} failed -> {out / 'output.csv'}"
    )
    _print_failures(failures, console)
    return 0 if row.status == "completed" else 1


def _print_failures(failures: list[queries.FailureCount], console: Console, most: int = 5) -> None:
    """Why images failed: a line per error code (the most frequent first), with one of
    its messages, which names the image's URL."""
    for failure in failures[:most]:
        line = Text(f"  {failure.images} {failure.code}", style="red")
        line.append(f", e.g. {failure.example}", style="default")
        console.print(line, soft_wrap=True)
    if len(failures) > most:
        console.print(f"  and {len(failures) - most} other error codes (docs/errors.md)")


async def _follow(runtime: Runtime, request_id: str, total: int, console: Console) -> Any:
    from pixelmill.db import work

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # Once no more images are left than the processes may hold in flight, a helper may
    # close the request at any moment, so this process looks more often.
    in_flight = runtime.settings.worker_concurrency * runtime.settings.worker_process_count
    # Four refreshes a second: at a terminal, rich's default ten cost 2% of a core (1%).
    with Progress(*columns, console=console, transient=True, refresh_per_second=4) as bar:
        task = bar.add_task("processing", total=total)
        while True:
            row = await work.load_request(runtime.db, request_id)
            done = row.completed + row.failed
            bar.update(task, completed=done)
            if row.finished_at is not None:
                return row
            # This process's worker may close the request (then at once), or a helper.
            if done >= total:
                pause = 0.02  # only the output CSV is left: a few tens of ms
            elif total - done <= in_flight:
                pause = 0.1
            else:
                pause = 0.25
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await runtime.request_closed.wait()
