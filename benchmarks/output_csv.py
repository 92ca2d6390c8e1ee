"""Output CSV benchmark: a finished request of ROWS rows x 3 images, written and downloaded.

Stages ROWS rows with 3 image URLs each into SQLite, marks every image completed (one
UPDATE, as if a worker had processed them), then measures, each in a process of its own
so that its peak RSS (VmHWM) is its alone:

1. ``Worker.finalize``: the output CSV read from the database in chunks and written to
   storage, as the worker that records the last image does it;
2. ``GET /api/v1/requests/{id}/output.csv`` from a real ``pixelmill api`` process;
3. ``pixelmill result ID -o FILE``, the CLI download.

Run: ``.venv/bin/python benchmarks/output_csv.py --rows 1000000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from ingest import api_process, free_port, generate, machine, peak_rss_mb

RESULTS = Path(__file__).parent / "results"


def _env(data_dir: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PIXELMILL_DATA_DIR": str(data_dir),
        "PIXELMILL_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }


async def _stage(csv_path: Path) -> str:
    """Stage the CSV and mark every image completed; returns the request id."""
    from sqlalchemy import text

    from pixelmill.config import Settings
    from pixelmill.csvio import CsvLimits
    from pixelmill.db.ingest import stage_request
    from pixelmill.runtime import Runtime

    settings = Settings()
    runtime = await Runtime.open(settings, migrate=True)
    try:
        accepted = await stage_request(
            runtime.db,
            csv_path,
            options=settings_options(),
            webhook_url=None,
            owner=None,
            limits=CsvLimits(),
            task_max_images=settings.task_max_images,
        )
        base = runtime.storage.url_for(f"{accepted.request_id}/x")[:-1]
        async with runtime.db.write() as conn:
            await conn.execute(
                text(
                    "UPDATE images SET status = 'completed', "
                    "output_url = :base || row_index || '-' || position || '.jpg' "
                    "WHERE request_id = :id"
                ),
                {"base": base, "id": accepted.request_id},
            )
            await conn.execute(
                text(
                    "UPDATE requests SET status = 'processing', pending = 0, "
                    "completed = total WHERE id = :id"
                ),
                {"id": accepted.request_id},
            )
            await conn.execute(text("DELETE FROM tasks"))
    finally:
        await runtime.close()
    return accepted.request_id


def settings_options() -> object:
    from pixelmill.domain import ProcessingOptions

    return ProcessingOptions()


async def _finalize(request_id: str) -> tuple[float, float]:
    """Write the output CSV as the worker does; the seconds it took, and the RSS before."""
    from pixelmill.config import Settings
    from pixelmill.imaging import open_imaging
    from pixelmill.runtime import Runtime
    from pixelmill.worker import Worker

    settings = Settings()
    runtime = await Runtime.open(settings)
    try:
        imaging = open_imaging(settings, runtime.storage)
        worker = Worker(settings, runtime.db, runtime.queue, imaging, runtime.storage)
        before = peak_rss_mb(os.getpid())
        started = time.perf_counter()
        await worker.finalize(request_id)
        return time.perf_counter() - started, before
    finally:
        await runtime.close()


def _child(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; its wall seconds, peak RSS in MB (from wait4) and output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{command} exited with {process.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, output


def run(rows: int) -> dict[str, object]:
    result: dict[str, object] = {"rows": rows, "images": rows * 3}
    with tempfile.TemporaryDirectory(prefix="pixelmill-output-") as tmp:
        csv_path = Path(tmp) / "products.csv"
        generate(csv_path, rows)
        port = free_port()
        env = _env(Path(tmp) / "data", port)
        me = [sys.executable, __file__]
        staged = subprocess.run(
            [*me, "--stage", str(csv_path)], env=env, check=True, capture_output=True, text=True
        )
        request_id = staged.stdout.strip()
        csv_path.unlink()

        load = os.getloadavg()[0]
        _, rss, printed = _child([*me, "--finalize", request_id], env)
        seconds, before = (float(value) for value in printed.split())
        output = Path(tmp) / "data" / "files" / request_id / "output.csv"
        result["finalize"] = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds),
            "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(rss, 1),
            "csv_mb": round(output.stat().st_size / 2**20, 1),
            "load": round(load, 1),
        }

        with api_process(env, port) as (server, base):
            idle = peak_rss_mb(server.pid)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            lines = 0
            url = f"{base}/api/v1/requests/{request_id}/output.csv"
            with httpx.stream("GET", url, timeout=600) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    lines += chunk.count(b"\n")
            elapsed = time.perf_counter() - started
            assert lines == rows + 1, lines
            result["api_download"] = {
                "seconds": round(elapsed, 2),
                "rows_per_s": round(rows / elapsed),
                "api_rss_idle_mb": round(idle, 1),
                "api_peak_rss_mb": round(peak_rss_mb(server.pid), 1),
                "load": round(load, 1),
            }
            load = os.getloadavg()[0]
            target = Path(tmp) / "downloaded.csv"
            cli = [sys.executable, "-m", "pixelmill", "result", request_id, "-o", str(target)]
            seconds, rss, _ = _child([*cli, "--server", base], env)
            assert target.stat().st_size == output.stat().st_size
            result["cli_result"] = {
                "seconds_with_start": round(seconds, 2),
                "rows_per_s": round(rows / seconds),
                "peak_rss_mb": round(rss, 1),
                "load": round(load, 1),
            }
    result["machine"] = machine()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stage", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--finalize", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(asyncio.run(_stage(args.stage)))
        return
    if args.finalize:
        print(*asyncio.run(_finalize(args.finalize)))
        return
    result = run(args.rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "output_csv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
