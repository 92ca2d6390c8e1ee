"""Ingest benchmark: a large CSV uploaded to a real ``pixelmill api`` process.

Generates ROWS rows with 3 image URLs each, streams it to ``POST /upload`` as a
``text/csv`` body, and reports rows/s, images/s and the API process's peak RSS
(VmHWM). Run: ``.venv/bin/python benchmarks/ingest.py --rows 1000000``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
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


def run(rows: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="pixelmill-ingest-") as tmp:
        csv_path = Path(tmp) / "products.csv"
        images = generate(csv_path, rows)
        port = free_port()
        env = {**os.environ, "PIXELMILL_DATA_DIR": str(Path(tmp) / "data")}
        process = subprocess.Popen(
            [sys.executable, "-m", "pixelmill", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process)
            baseline = peak_rss_mb(process.pid)
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
                "rows": rows,
                "images": images,
                "file_mb": round(csv_path.stat().st_size / 2**20, 1),
                "seconds": round(elapsed, 2),
                "rows_per_s": round(rows / elapsed),
                "images_per_s": round(images / elapsed),
                "api_rss_idle_mb": round(baseline, 1),
                "api_peak_rss_mb": round(peak_rss_mb(process.pid), 1),
                "machine": machine(),
            }
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    result = run(args.rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
