"""The ``pixelmill`` command line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from pixelmill import allocator, collector, logs
from pixelmill.config import Settings
from pixelmill.domain import MAX_OUTPUT_SIDE

if TYPE_CHECKING:
    from pixelmill.db.engine import Database

T = TypeVar("T")

# pixelmill does no linear algebra, but numpy (which the JPEG codec loads) loads
# OpenBLAS, whose threads spin for about 0.1 s of CPU at start-up; with one thread
# there are none. Set before any command imports the codecs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
collector.hold_back()
allocator.keep_image_memory()

app = typer.Typer(
    help="Turn a CSV of products and image URLs into processed images, at any scale.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
tasks_app = typer.Typer(help="Dead tasks: list them, put them back.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
requests_app = typer.Typer(help="Finished requests: forget the old ones.", no_args_is_help=True)
app.add_typer(requests_app, name="requests")
console = Console(stderr=True)


class FormatChoice(StrEnum):
    """Output formats ``process --format`` accepts (DESIGN.md)."""

    KEEP = "keep"
    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"
    AVIF = "avif"


HostOption = Annotated[str, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
ServerOption = Annotated[
    str | None,
    typer.Option("--server", help="Base URL of the pixelmill API (default: PIXELMILL_PUBLIC_URL)."),
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="PIXELMILL_API_KEY", help="API key to send.")
]


def _exit_zero_on_sigterm() -> None:
    """Uvicorn re-raises SIGTERM after its graceful shutdown; make that a clean exit 0."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            field = "PIXELMILL_" + "_".join(str(part) for part in error["loc"][:1]).upper()
            message = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]invalid settings:[/red] {field}: {message}", highlight=False)
        raise typer.Exit(2) from None


def _run_server(settings: Settings, host: str, port: int, **app_options: bool) -> None:
    import uvicorn

    from pixelmill.api.app import create_app
    from pixelmill.startup import StartupError
    from pixelmill.worker_main import run_async

    # The database migrated and the queue reached before the server starts, so that a
    # part that is away is said in one line rather than in uvicorn's traceback.
    try:
        migrate = app_options.pop("migrate", False)
        stores = app_options.get("run_worker", False)
        run_async(_open_and_close(settings, migrate=migrate, stores=stores))
    except StartupError as exc:
        _fail_in_one_line(str(exc))
    application = create_app(settings, **app_options)
    _exit_zero_on_sigterm()
    uvicorn.run(application, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


def _check_storage(settings: Settings) -> None:
    """Say in one line, and exit, when the storage cannot be used."""
    from pixelmill.startup import StartupError, check_storage
    from pixelmill.storage import open_storage
    from pixelmill.worker_main import run_async

    try:
        storage = open_storage(settings.storage_url, settings.storage_base_url)
        run_async(check_storage(storage, settings.storage_url))
    except (StartupError, ValueError) as exc:
        _fail_in_one_line(str(exc))


async def _open_and_close(settings: Settings, *, migrate: bool, stores: bool) -> None:
    from pixelmill.runtime import Runtime

    runtime = await Runtime.open(settings, migrate=migrate, announce=False, stores=stores)
    await runtime.close()


def _public_url(host: str, port: int) -> str | None:
    """The default public URL follows --host/--port unless PIXELMILL_PUBLIC_URL is set."""
    if os.environ.get("PIXELMILL_PUBLIC_URL"):
        return None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


@app.command()
def serve(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """All in one: API, worker and inline imaging on the embedded defaults."""
    settings = _settings(public_url=_public_url(host, port))
    logs.configure(settings.log_level)
    # The shipped sample photos are the one private-address source allowed by default.
    settings.trusted_source_prefixes = [*settings.trusted_source_prefixes, settings.samples_prefix]
    _run_server(settings, host, port, run_worker=True, migrate=True, samples=True)


@app.command()
def api(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    samples: Annotated[
        bool, typer.Option("--samples", help="Also serve the sample photos under /samples/.")
    ] = False,
) -> None:
    """The HTTP API alone (workers run apart with ``pixelmill worker``)."""
    settings = _settings(public_url=_public_url(host, port))
    logs.configure(settings.log_level)
    _run_server(settings, host, port, migrate=True, samples=samples)


@app.command()
def imaging(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8001,
    processes: Annotated[
        int,
        typer.Option(
            min=1, help="Processes sharing the port, each with its own event loop and threads."
        ),
    ] = 1,
) -> None:
    """The imaging service alone, for workers with PIXELMILL_IMAGING_URL=http://HOST:PORT."""
    import uvicorn

    from pixelmill.imaging.metrics import MULTIPROCESS_DIR
    from pixelmill.imaging.service import KEEP_ALIVE_SECONDS, create_imaging_app

    settings = _settings()  # refused here, once, when invalid
    logs.configure(settings.log_level)
    _check_storage(settings)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "info",
        "access_log": False,  # one line per image would cost more than it tells
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "timeout_graceful_shutdown": 30,
    }
    _exit_zero_on_sigterm()
    if processes == 1:
        uvicorn.run(create_imaging_app(settings), **options)
        return
    # Each process builds its own app from the environment (uvicorn's workers), and
    # counts its metrics into files of one folder, so that any of them answers for all.
    with tempfile.TemporaryDirectory(prefix="pixelmill-imaging-metrics-") as counts:
        os.environ[MULTIPROCESS_DIR] = counts
        uvicorn.run(
            "pixelmill.imaging.service:app_from_environment",
            factory=True,
            workers=processes,
            **options,
        )


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Images processed at once (PIXELMILL_WORKER_CONCURRENCY).")
    ] = None,
) -> None:
    """A long-running worker: takes tasks from the queue until SIGTERM or SIGINT."""
    from pixelmill.supervisor import child_settings
    from pixelmill.worker_main import run_worker_process

    handed_down = child_settings()
    settings = handed_down or _settings(worker_concurrency=concurrency)
    logs.configure(settings.log_level)
    # A worker process of ``serve`` or ``process``: its parent has migrated already.
    run_worker_process(settings, migrate=handed_down is None)


@app.command()
def process(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The input CSV.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for output.csv and images/.")],
    quality: Annotated[int, typer.Option(min=1, max=100)] = 50,
    max_width: Annotated[int | None, typer.Option(min=1, max=MAX_OUTPUT_SIDE)] = None,
    max_height: Annotated[int | None, typer.Option(min=1, max=MAX_OUTPUT_SIDE)] = None,
    image_format: Annotated[
        FormatChoice, typer.Option("--format", help="Output format.")
    ] = FormatChoice.KEEP,
) -> None:
    """One shot, no server: the whole pipeline in this process, results in OUT."""
    from pixelmill.domain import ProcessingOptions
    from pixelmill.oneshot import process_file

    # Quiet unless asked: the progress bar is the output of a one-shot run.
    settings = _settings(log_level=os.environ.get("PIXELMILL_LOG_LEVEL") or "WARNING")
    logs.configure(settings.log_level)
    options = ProcessingOptions(quality, max_width, max_height, image_format.value)
    code = process_file(settings, file, out, console, options)
    raise typer.Exit(code)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until finished.")] = False,
    webhook: Annotated[str | None, typer.Option("--webhook", help="URL called when done.")] = None,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Upload a CSV to a running pixelmill and print its request id."""
    from pixelmill.client import ApiClient

    client = ApiClient(server or _settings().public_url, api_key, console)
    request_id = client.submit(file, webhook)
    print(request_id)
    if wait:
        raise typer.Exit(client.follow(request_id))


@app.command()
def status(request_id: str, server: ServerOption = None, api_key: ApiKeyOption = None) -> None:
    """Print the status of a request as JSON."""
    from pixelmill.client import ApiClient

    ApiClient(server or _settings().public_url, api_key, console).print_status(request_id)


@app.command()
def result(
    request_id: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to this file.")
    ] = None,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Download the output CSV of a finished request (stdout, or -o FILE)."""
    from pixelmill.client import ApiClient

    ApiClient(server or _settings().public_url, api_key, console).download_result(
        request_id, output
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations to PIXELMILL_DATABASE_URL."""
    from sqlalchemy.exc import SQLAlchemyError

    from pixelmill.db.migrate import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url)
    except (OSError, SQLAlchemyError) as exc:
        _database_failed("cannot upgrade", settings.database_url, exc)
    console.print("database is up to date")


@tasks_app.command("dead")
def tasks_dead() -> None:
    """List the tasks that gave up (dead-lettered), with their last error."""
    from pixelmill.db.admin import dead_tasks

    for task in asyncio.run(_with_database(dead_tasks)):
        error = (task.last_error or "").splitlines()[0][:120] if task.last_error else ""
        print(f"{task.task_id}\t{task.request_id}\t{task.kind}\t{task.attempts}\t{error}")


@tasks_app.command("requeue")
def tasks_requeue(
    task_ids: Annotated[
        list[int] | None, typer.Argument(help="Task ids (default: every dead task).")
    ] = None,
) -> None:
    """Put dead tasks back on the queue, with their attempts reset."""
    from pixelmill.db.admin import requeue_dead

    count = asyncio.run(_with_database(lambda db: requeue_dead(db, task_ids or None)))
    console.print(f"requeued {count} task(s)")


@requests_app.command("prune")
def requests_prune(
    older_than: Annotated[
        float,
        typer.Option("--older-than", min=0, help="Days since the request finished (0: all)."),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print their ids; delete nothing.")
    ] = False,
) -> None:
    """Delete the requests finished more than N days ago: their images and output CSV
    in the storage, then their rows. Requests not finished are never touched."""
    from datetime import UTC, datetime, timedelta

    from pixelmill.db import retention
    from pixelmill.storage import StorageError, open_storage

    settings = _settings()
    cutoff = datetime.now(UTC) - timedelta(days=older_than)

    async def prune(db: Database) -> tuple[int, int]:
        if dry_run:
            for request_id in await retention.finished_before(db, cutoff, None):
                print(request_id)
            return 0, 0
        storage = open_storage(settings.storage_url, settings.storage_base_url)
        requests = objects = 0
        while batch := await retention.finished_before(db, cutoff, 500):
            before = requests
            for request_id in batch:
                # The objects first: a prune cut off here leaves rows, never orphans.
                objects += await storage.delete_folder(request_id)
                requests += await retention.forget_request(db, request_id)
            if requests == before:  # another prune took them: nothing more to do here
                break
        return requests, objects

    try:
        requests, objects = asyncio.run(_with_database(prune))
    except StorageError as exc:
        _fail_in_one_line(f"cannot prune: {exc}")
    if not dry_run:
        console.print(
            f"pruned {requests} request(s) finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC "
            f"and {objects} stored object(s)"
        )


async def _with_database(action: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``action`` on the settings' database; a database that is missing or cannot
    be reached is said in one line (exit 1), and none is created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from pixelmill.db.engine import Database

    settings = _settings()
    url = settings.database_url
    path = make_url(url).database if url.startswith("sqlite") else None
    if path and not Path(path).is_file():
        console.print(f"[red]no database at {path}[/red]: run `pixelmill db upgrade` first")
        raise typer.Exit(1)
    database = Database(url, command_timeout=settings.database_command_timeout_seconds)
    try:
        return await action(database)
    except (OSError, SQLAlchemyError) as exc:
        _database_failed("cannot use", url, exc)
    finally:
        await database.close()


def _database_failed(what: str, url: str, exc: Exception) -> NoReturn:
    """Say in one line which database failed a command and why (the driver's own
    words), exit 1."""
    from pixelmill.startup import database_failure

    _fail_in_one_line(database_failure(what, url, exc))


def _fail_in_one_line(message: str) -> NoReturn:
    from rich.text import Text

    console.print(Text(message, style="red"), soft_wrap=True)
    raise typer.Exit(1) from None
