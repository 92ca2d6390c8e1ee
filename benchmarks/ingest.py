"""Ingest benchmark: a large CSV uploaded to a real ``pixelmill api`` process.

Generates ROWS rows with 3 image URLs each, streams it to ``POST /upload`` as a
``text/csv`` body, and reports rows/s, images/s, the API process's peak RSS (VmHWM) and
the CPU seconds of its threads (the event loop, the busiest others), with the load
average around each run. ``--in-process`` also stages the same file with
``stage_request`` in this process; ``--repeat N`` runs each N times (best and median).
Run: ``.venv/bin/python benchmarks/ingest.py --rows 1000000 --repeat 3 --in-process``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"


def generate(path: Path, rows: int) -> int:
    """Write the CSV; returns the number of images."""
    with path.open("w") as out:
        out.write("S. No.,Product Name,Input Image Urls\n")
        for i in range(1, rows + 1):
            urls = ", ".join(f"https://img.example.com/p/{i}/{k}.jpg" for k in "abc")
            out.write(f'{i},Product {i},"{urls}"\n')
    return rows * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> str:
    """The machine the figures were measured on."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("pixelmill api exited early")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("pixelmill api did not start")


def thread_cpu(pid: int) -> list[float]:
    """CPU seconds (user + system) of each thread of ``pid``, the main thread first."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    main = seconds.pop(pid, 0.0)
    return [main, *sorted(seconds.values(), reverse=True)]


def cpu_summary(before: list[float], after: list[float]) -> dict[str, float]:
    """The event loop's CPU, the busiest other threads', and the total, in seconds."""
    others = [round(s, 1) for s in after[1:4]]
    return {
        "event_loop": round(after[0] - before[0], 1),
        "busiest_threads": others,  # type: ignore[dict-item]
        "total": round(sum(after) - sum(before), 1),
    }


@contextmanager
def api_process(env: dict[str, str], port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``pixelmill api`` on ``port``, ready; stopped afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield process, base
    finally:
        process.terminate()
        process.wait(timeout=30)


def over_http(csv_path: Path, rows: int, images: int, data_dir: Path) -> dict[str, object]:
    """One upload of the CSV to a fresh ``pixelmill api`` process."""
    env = {**os.environ, "PIXELMILL_DATA_DIR": str(data_dir)}
    with api_process(env, free_port()) as (process, base):
        baseline = peak_rss_mb(process.pid)
        cpu_before = thread_cpu(process.pid)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        with csv_path.open("rb") as body:
            response = httpx.post(
                f"{base}/upload",
                content=iter(lambda: body.read(1 << 20), b""),
                headers={"Content-Type": "text/csv"},
                timeout=600,
            )
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        status = httpx.get(f"{base}/status/{response.json()['request_id']}").json()
        assert status["progress"]["total"] == images
        return {
            "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed),
            "images_per_s": round(images / elapsed),
            "api_rss_idle_mb": round(baseline, 1),
            "api_peak_rss_mb": round(peak_rss_mb(process.pid), 1),
            "api_cpu_s": cpu_summary(cpu_before, thread_cpu(process.pid)),
            "load_before": round(load, 1),
            "load_after": round(os.getloadavg()[0], 1),
        }


async def _stage(csv_path: Path, data_dir: Path) -> tuple[float, list[float]]:
    """Seconds to stage the CSV, and the CPU of this process's threads before they end."""
    from pixelmill.config import Settings
    from pixelmill.csvio import CsvLimits
    from pixelmill.db.engine import Database
    from pixelmill.db.ingest import stage_request
    from pixelmill.db.migrate import upgrade_async
    from pixelmill.domain import ProcessingOptions

    settings = Settings(data_dir=data_dir)
    await upgrade_async(settings.database_url)
    db = Database(settings.database_url)
    try:
        started = time.perf_counter()
        await stage_request(
            db,
            csv_path,
            options=ProcessingOptions(),
            webhook_url=None,
            owner=None,
            limits=CsvLimits(settings.max_rows, settings.max_urls_per_row),
            task_max_images=settings.task_max_images,
            batch_rows=settings.ingest_batch_rows,
        )
        return time.perf_counter() - started, thread_cpu(os.getpid())
    finally:
        await db.close()


def in_process(csv_path: Path, rows: int, images: int, data_dir: Path) -> dict[str, object]:
    """The same CSV staged by ``stage_request`` in this process: no HTTP, no body copy."""
    load = os.getloadavg()[0]
    cpu_before = thread_cpu(os.getpid())
    elapsed, cpu_after = asyncio.run(_stage(csv_path, data_dir))
    return {
        "seconds": round(elapsed, 2),
        "images_per_s": round(images / elapsed),
        "cpu_s": cpu_summary(cpu_before, cpu_after),
        "load_before": round(load, 1),
        "load_after": round(os.getloadavg()[0], 1),
    }


def summary(runs: list[dict[str, object]]) -> dict[str, object]:
    rates = sorted(int(run["images_per_s"]) for run in runs)  # type: ignore[call-overload]
    return {"best_images_per_s": rates[-1], "median_images_per_s": statistics.median(rates)}


def run(rows: int, repeat: int, http: bool, local: bool) -> dict[str, object]:
    result: dict[str, object] = {"rows": rows, "images": rows * 3}
    with tempfile.TemporaryDirectory(prefix="pixelmill-ingest-") as tmp:
        csv_path = Path(tmp) / "products.csv"
        images = generate(csv_path, rows)
        result["file_mb"] = round(csv_path.stat().st_size / 2**20, 1)
        for name, enabled, measure in (
            ("http", http, over_http),
            ("in_process", local, in_process),
        ):
            if not enabled:
                continue
            runs = []
            for attempt in range(repeat):
                data_dir = Path(tmp) / f"data-{name}-{attempt}"
                runs.append(measure(csv_path, rows, images, data_dir))
                shutil.rmtree(data_dir)
                print(name, json.dumps(runs[-1]), flush=True)
            result[name] = {**summary(runs), "runs": runs}
    result["machine"] = machine()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind")
    parser.add_argument("--no-http", action="store_true", help="skip the upload over HTTP")
    parser.add_argument("--in-process", action="store_true", help="also stage in-process")
    args = parser.parse_args()
    result = run(args.rows, args.repeat, not args.no_http, args.in_process)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("http", "in_process")}))
    for name in ("http", "in_process"):
        if name in result:
            print(name, {k: v for k, v in result[name].items() if k != "runs"})  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
