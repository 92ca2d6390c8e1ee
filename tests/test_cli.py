"""The command line, run as a user runs it: real processes, real files."""

from __future__ import annotations

import csv
import io
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.image_host import ImageHost
from tests.support.images import decoded_size
from tests.support.server import PixelmillProcess, ServeProcess, free_port
from tests.support.waiting import wait_until

EXAMPLE = Path(__file__).parent.parent / "examples" / "products.csv"


def pixelmill(*args: str, env: dict[str, str] | None = None, timeout: float = 120):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "pixelmill", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_process_one_shot_writes_csv_and_images(tmp_path: Path, image_host: ImageHost) -> None:
    source = tmp_path / "in.csv"
    source.write_text(
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Alpha,"{image_host.url("img/cat.jpg")}, {image_host.url("status/404")}"\n'
        f"2,Beta,{image_host.url('img/coffee.jpg')}\n"
    )
    out = tmp_path / "out"
    result = pixelmill(
        "process", str(source), "-o", str(out), "--max-width", "200",
        env={"PIXELMILL_ALLOW_PRIVATE_URLS": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Why an image failed, by error code, with a message that names its URL.
    assert (
        f"1 http_error, e.g. the source answered HTTP 404 for {image_host.url('status/404')}"
        in (result.stderr)
    )
    rows = list(csv.reader((out / "output.csv").open()))
    assert rows[0][-1] == "Output Image Urls" and len(rows) == 3
    first, failed = rows[1][3].split(", ")
    assert failed == ""
    for relative in (first, rows[2][3]):
        image = out / relative
        assert image.is_file(), relative
        assert decoded_size(image.read_bytes())[0] == 200


def test_process_refuses_loopback_sources_by_default(tmp_path: Path, image_host: ImageHost) -> None:
    source = tmp_path / "in.csv"
    url = image_host.url("img/cat.jpg?refused=1")
    source.write_text(f"S. No.,Product Name,Input Image Urls\n1,A,{url}\n")
    result = pixelmill("process", str(source), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "failed: 0 completed, 1 failed" in result.stderr
    assert f"1 forbidden_address, e.g. 127.0.0.1 is a loopback address; refused: {url}" in (
        result.stderr
    )
    assert image_host.hits["/img/cat.jpg?refused=1"] == 0, "nothing was fetched"


def test_process_reports_an_invalid_csv(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("S. No.,Product Name,Input Image Urls\n1,,not-a-url\n")
    result = pixelmill("process", str(source), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "line 2" in result.stderr and "product name is empty" in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    result = pixelmill("db", "upgrade", env={"PIXELMILL_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "pixelmill.db") as conn:
        names = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {"requests", "products", "images", "tasks", "alembic_version"} <= names


@pytest.fixture
def default_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``serve`` as a new user runs it: loopback sources NOT allowed, samples allowed."""
    process = ServeProcess(tmp_path / "serve", env={"PIXELMILL_ALLOW_PRIVATE_URLS": "false"})
    yield process.start()
    process.stop()


def test_quick_start_example_with_submit_status_result(
    default_server: ServeProcess, image_host: ImageHost, tmp_path: Path
) -> None:
    example = tmp_path / "products.csv"
    text = EXAMPLE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{default_server.port}")
    example.write_text(text + f"4,Elsewhere,{image_host.url('img/cat.jpg')}\n")
    server = ["--server", default_server.base_url]

    submitted = pixelmill("submit", str(example), "--wait", *server)
    assert submitted.returncode == 0, submitted.stderr
    request_id = submitted.stdout.strip()
    assert "completed" in submitted.stderr

    status = pixelmill("status", request_id, *server)
    assert '"status": "completed"' in status.stdout
    products = default_server.get(f"/api/v1/requests/{request_id}/products").json()["items"]
    sample_images = [image for product in products[:3] for image in product["images"]]
    assert sample_images and all(image["status"] == "completed" for image in sample_images)
    elsewhere = products[3]["images"][0]
    assert elsewhere["error"]["code"] == "forbidden_address", "only the samples prefix is allowed"

    out = tmp_path / "result.csv"
    result = pixelmill("result", request_id, "-o", str(out), *server)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert len(rows) == 5 and rows[0][-1] == "Output Image Urls"


def test_submit_reports_errors_with_lines(default_server: ServeProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("S. No.,Product Name,Input Image Urls\n1,A,http://example.com/a.jpg\n1,B,\n")
    result = pixelmill("submit", str(bad), "--server", default_server.base_url)
    assert result.returncode == 1
    assert "line 3" in result.stderr and "no image URL" in result.stderr


def test_submit_and_process_apply_the_row_and_byte_limits(tmp_path: Path) -> None:
    header = "S. No.,Product Name,Input Image Urls\n"
    three = tmp_path / "three.csv"
    three.write_text(header + "".join(f"{i},P,http://img.example.com/{i}.jpg\n" for i in (1, 2, 3)))
    big = tmp_path / "big.csv"
    big.write_text(header + "1,P,http://img.example.com/1.jpg?" + "x" * 2000 + "\n")
    limits = {"PIXELMILL_MAX_ROWS": "2", "PIXELMILL_MAX_UPLOAD_BYTES": "1000"}
    server = ServeProcess(tmp_path / "serve", env=limits).start()
    try:
        too_many = pixelmill("submit", str(three), "--server", server.base_url)
        assert too_many.returncode == 1
        assert "413 too_many_rows" in too_many.stderr and "PIXELMILL_MAX_ROWS" in too_many.stderr
        too_large = pixelmill("submit", str(big), "--server", server.base_url)
        assert too_large.returncode == 1
        assert "413 upload_too_large" in too_large.stderr
        assert server.get("/api/v1/requests").json()["total"] == 0
        unknown = pixelmill("result", "0" * 32, "--server", server.base_url)
        assert unknown.returncode == 1 and "404 not_found" in unknown.stderr
    finally:
        server.stop()
    env = {**limits, "PIXELMILL_DATA_DIR": str(tmp_path / "data")}
    for source, words in ((three, "PIXELMILL_MAX_ROWS"), (big, "PIXELMILL_MAX_UPLOAD_BYTES")):
        result = pixelmill("process", str(source), "-o", str(tmp_path / "out"), env=env)
        assert result.returncode == 2, result.stderr
        assert words in result.stdout + result.stderr
        assert not (tmp_path / "out" / "output.csv").exists()


def test_a_command_starts_with_the_collector_held_back_and_no_blas_threads() -> None:
    # What the command line sets for itself before any command runs; the worker and the
    # apps set the collector back once started (pixelmill.collector.started).
    probe = (
        "import gc, os, pixelmill.cli, pixelmill.collector as c;"
        "print(gc.get_threshold()[0], os.environ['OPENBLAS_NUM_THREADS']);"
        "import simplejpeg;"  # numpy, and with it OpenBLAS, load here: one thread
        "print(len(os.listdir('/proc/self/task')));"
        "c.started(); print(gc.get_threshold() == c._NORMAL, gc.get_freeze_count() > 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["1000000 1", "1", "True True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize(("own_setting", "mapped"), [(None, 0), ("131072", 1)])
def test_a_command_keeps_image_sized_blocks_in_the_heap(
    own_setting: str | None, mapped: int
) -> None:
    # An 8 MB block (a decoded photo) comes from the heap, not from mmap, once the
    # command line has set glibc's thresholds; an operator's own setting is left alone.
    probe = (
        "import ctypes, pixelmill.cli\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ("
        "'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',"
        " 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mallinfo2.restype = Info\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "before = libc.mallinfo2().hblks\n"
        "block = libc.malloc(8 << 20)\n"
        "print(libc.mallinfo2().hblks - before)\n"
        "libc.free(ctypes.c_void_p(block))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if own_setting:
        env["MALLOC_MMAP_THRESHOLD_"] = own_setting
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(mapped)


def _processes_naming(text: str) -> list[int]:
    """The processes whose command line mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _kill(run: subprocess.Popen[str]) -> None:
    run.send_signal(signal.SIGTERM)  # the command alone: its helpers hear of it from it


def _ctrl_c(run: subprocess.Popen[str]) -> None:
    os.killpg(run.pid, signal.SIGINT)  # as at a terminal: the whole process group at once


@pytest.mark.parametrize(
    ("stop", "products", "code", "said"),
    [
        (_kill, 40, 143, "stopped by SIGTERM"),
        (_ctrl_c, 40, 130, "stopped by Ctrl-C"),
        # One task: the helper never had work and still waits at its gate.
        (_ctrl_c, 1, 130, "stopped by Ctrl-C"),
    ],
    ids=["sigterm", "ctrl-c", "ctrl-c-helper-at-its-gate"],
)
def test_a_stopped_process_says_so_and_leaves_nothing_behind(
    tmp_path: Path,
    image_host: ImageHost,
    stop: Callable[[subprocess.Popen[str]], None],
    products: int,
    code: int,
    said: str,
) -> None:
    """The helpers stop (none is restarted) and the throw-away database goes."""
    source = tmp_path / "held.csv"
    rows = [
        f"{i},P{i},{image_host.url(f'gate/img/cat.jpg?stop={i}')}" for i in range(1, products + 1)
    ]
    source.write_text("S. No.,Product Name,Input Image Urls\n" + "\n".join(rows) + "\n")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {
        **os.environ,
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        # Long enough for the parent to see a helper leave while its own worker stops.
        "PIXELMILL_SHUTDOWN_GRACE_SECONDS": "3",
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "TMPDIR": str(temporary),
    }
    before = image_host.hits["/gate/img/cat.jpg"]
    image_host.gate.clear()  # every fetch waits: the run is in the middle when stopped
    try:
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pixelmill",
                "process",
                str(source),
                "-o",
                str(tmp_path / "out"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as at a terminal
        )
        wait_until(lambda: image_host.hits["/gate/img/cat.jpg"] > before, what="a fetch in flight")
        stop(run)
        _, stderr = run.communicate(timeout=60)
    finally:
        image_host.gate.set()

    assert run.returncode == code, stderr
    assert said in stderr
    assert "restarting" not in stderr, "a helper asked to stop is not replaced"
    assert list(temporary.iterdir()) == [], "the throw-away database is removed"
    assert _processes_naming(str(source)) == [], "no helper outlives the run"


def test_process_into_a_file_instead_of_a_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("S. No.,Product Name,Input Image Urls\n1,A,https://img.example.com/a.jpg\n")
    taken = tmp_path / "taken"
    taken.write_text("not a folder")

    result = pixelmill("process", str(source), "-o", str(taken))

    assert result.returncode == 2
    assert "cannot use" in result.stderr and "Traceback" not in result.stderr
    assert taken.read_text() == "not a folder"


def test_process_names_a_file_level_problem_without_a_column(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")

    result = pixelmill("process", str(empty), "-o", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "line 1: empty file" in result.stderr and "None" not in result.stderr


def test_status_and_result_send_the_request_id_as_one_path_segment(
    default_server: ServeProcess, tmp_path: Path
) -> None:
    """An id such as ``../../../healthz`` must not walk to another route."""
    server = ["--server", default_server.base_url]

    status = pixelmill("status", "../../../healthz", *server)
    result = pixelmill("result", "../../../healthz#", "-o", str(tmp_path / "x.csv"), *server)

    assert status.returncode == result.returncode == 1
    assert "not_found" in status.stderr and '"ok"' not in status.stdout
    assert "not_found" in result.stderr and not (tmp_path / "x.csv").exists()
    for dots in (".", ".."):  # a client would drop or climb a segment of these
        status = pixelmill("status", dots, *server)
        assert status.returncode == 1
        assert f"no request '{dots}'" in status.stderr, status.stderr


def test_result_into_a_folder_is_refused_in_one_line(
    default_server: ServeProcess, tmp_path: Path
) -> None:
    example = tmp_path / "products.csv"
    example.write_text(
        EXAMPLE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{default_server.port}")
    )
    server = ["--server", default_server.base_url]
    submitted = pixelmill("submit", str(example), "--wait", *server)
    assert submitted.returncode == 0, submitted.stderr

    result = pixelmill("result", submitted.stdout.strip(), "-o", str(tmp_path), *server)

    assert result.returncode == 1
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_database_commands_say_in_one_line_what_is_wrong(tmp_path: Path) -> None:
    """No traceback, and no empty database left where none was."""
    missing = pixelmill("tasks", "dead", env={"PIXELMILL_DATA_DIR": str(tmp_path / "none")})
    unreachable = {"PIXELMILL_DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:9/pixelmill"}
    upgrade = pixelmill("db", "upgrade", env=unreachable)
    dead = pixelmill("tasks", "dead", env=unreachable)

    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "none").exists()
    for result in (upgrade, dead):
        assert result.returncode == 1, result.stderr
        assert "cannot" in result.stderr and "Traceback" not in result.stderr
        assert "postgresql://postgres:***@127.0.0.1:9/pixelmill" in result.stderr, "which one"
        assert "PIXELMILL_DATABASE_URL" in result.stderr and "secret" not in result.stderr


@pytest.mark.parametrize("name", ["worker", "api", "serve"])
def test_a_process_whose_database_or_broker_is_away_says_so_in_one_line(
    name: str, tmp_path: Path
) -> None:
    """A long-running process started before (or without) its database or broker exits
    1 naming the part and the setting, with no traceback and no password shown."""
    command = [name] if name == "worker" else [name, "--port", str(free_port())]
    away_database = {
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:9/pixelmill",
    }
    away_broker = {
        "PIXELMILL_DATA_DIR": str(tmp_path / "data"),
        "PIXELMILL_QUEUE_URL": "kafka://127.0.0.1:9",
    }

    database = pixelmill(*command, env=away_database, timeout=60)
    broker = pixelmill(*command, env=away_broker, timeout=60)

    assert database.returncode == 1, database.stderr
    assert "cannot migrate the database postgresql://postgres:***@127.0.0.1:9/pixelmill" in (
        database.stderr
    )
    assert "(PIXELMILL_DATABASE_URL)" in database.stderr and "secret" not in database.stderr
    assert broker.returncode == 1, broker.stderr
    assert "cannot start the queue kafka://127.0.0.1:9 (PIXELMILL_QUEUE_URL)" in broker.stderr
    for result in (database, broker):
        assert "Traceback" not in result.stderr and "Connection" in result.stderr


@pytest.mark.parametrize("option", ["--max-width", "--max-height"])
def test_process_refuses_a_size_the_api_refuses(tmp_path: Path, option: str) -> None:
    """The same bounds as an upload's options (1 to 20,000 pixels), before any work."""
    source = tmp_path / "in.csv"
    source.write_text("S. No.,Product Name,Input Image Urls\n1,A,https://img.example.com/a.jpg\n")

    out = str(tmp_path / "out")
    result = pixelmill("process", str(source), "-o", out, option, "20001", env={"COLUMNS": "200"})

    assert result.returncode == 2
    assert option in result.stderr and "less than or equal to 20000" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_api_logs_its_backends_once(tmp_path: Path) -> None:
    """The check before the server starts opens the backends too, and says nothing."""
    port = free_port()
    env = {**os.environ, "PIXELMILL_DATA_DIR": str(tmp_path / "data")}
    log = tmp_path / "api.log"
    api = PixelmillProcess(
        ["api", "--port", str(port)], env, log, f"http://127.0.0.1:{port}/readyz"
    )
    try:
        api.start()
    finally:
        api.stop()
    assert log.read_text().count("pixelmill backends: database=sqlite") == 1, log.read_text()
