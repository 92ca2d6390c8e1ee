"""Stage timings of ``pixelmill process``: probes wrapped around its steps, no code changed.

Runs ``pixelmill process`` inside this interpreter with timing wrappers on the fetch,
the transform (and its wait for a CPU slot), ``process_image`` itself (wall and the
calling thread's CPU), storing, recording (group commit) and the queue; measures the
event loop's lag, how many ``process_image`` calls run at once, and, once every image
is done, the CPU time of each thread by name (libvips worker threads included).

The probes wrap private functions of pixelmill (names below): when those change, adapt
this script. Usage: ``.venv/bin/python benchmarks/trace_process.py [--images 2400]``;
writes ``benchmarks/results/trace_process.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import corpus

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / "tmp" / "trace"

Event = tuple[float, float, float | None]
events: dict[str, list[Event]] = defaultdict(list)
lags: list[float] = []
thread_cpu: dict[str, list[float]] = {}


def probe_async(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    async def probe(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            events[label].append((started, time.perf_counter(), None))

    setattr(owner, name, probe)


def probe_sync(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    def probe(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            events[label].append((started, time.perf_counter(), None))

    setattr(owner, name, probe)


def install() -> None:
    import pixelmill.db.work as work
    import pixelmill.imaging.fetch as fetch
    import pixelmill.imaging.inline as inline
    import pixelmill.oneshot as oneshot
    import pixelmill.recorder as recorder
    import pixelmill.storage as storage
    import pixelmill.worker as worker
    from pixelmill.queue import db as queue_db

    process_image = inline.process_image

    def timed_process_image(*args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return process_image(*args, **kwargs)
        finally:
            end = time.perf_counter()
            events["process_image"].append((started, end, time.thread_time() - cpu))

    inline.process_image = timed_process_image  # type: ignore[assignment]
    probe_async(fetch.Fetcher, "fetch", "fetch")
    probe_async(inline.InlineImaging, "process", "imaging: fetch, slot, transform, store")
    probe_sync(storage.LocalStorage, "put_bytes_blocking", "store (in the imaging thread)")
    probe_async(recorder.ResultRecorder, "record", "record (until committed)")
    probe_async(work, "record_results", "record_results transaction")
    probe_async(work, "start_task", "start_task transaction")
    probe_async(worker.Worker, "process_task", "task (all its images)")
    probe_async(queue_db.DbQueue, "receive", "queue receive")
    probe_async(queue_db.DbQueue, "ack", "queue ack")

    run = worker.Worker.run

    async def run_with_lag_probe(self: Any) -> None:
        async def lag() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - started - 0.01) * 1000)

        prober = asyncio.create_task(lag())
        try:
            await run(self)
        finally:
            prober.cancel()

    worker.Worker.run = run_with_lag_probe  # type: ignore[method-assign]

    follow = oneshot._follow

    async def follow_then_read_threads(*args: Any, **kwargs: Any) -> Any:
        row = await follow(*args, **kwargs)
        names = {thread.native_id: thread.name for thread in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path("/proc/self/task").iterdir():
            stat = (task / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            name = names.get(int(task.name), comm)
            kind = re.sub(r"[-_ ]?\d+( \(.*\))?$", "", name)
            kind = "aiosqlite connection" if "_connection_worker_thread" in name else kind
            cpu = (int(fields[11]) + int(fields[12])) / tick
            thread_cpu.setdefault(kind, []).append(cpu)
        return row

    oneshot._follow = follow_then_read_threads  # type: ignore[assignment]


def concurrency(spans: list[Event]) -> dict[int, float]:
    """Share of the busy span during which N of these calls ran at once."""
    points = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    shares: dict[int, float] = defaultdict(float)
    running, last = 0, points[0][0]
    for moment, step in points:
        shares[running] += moment - last
        running, last = running + step, moment
    total = points[-1][0] - points[0][0]
    return {n: round(seconds / total, 3) for n, seconds in sorted(shares.items())}


def report(images: int, wall: float, code: Any) -> dict[str, Any]:
    stages = {}
    for label, spans in events.items():
        ms = sorted((end - start) * 1000 for start, end, _ in spans)
        stages[label] = {
            "calls": len(ms),
            "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[int(len(ms) * 0.9)], 1),
            "total_s": round(sum(ms) / 1000, 1),
        }
    calls = events["process_image"]
    own_cpu = [cpu * 1000 for _, _, cpu in calls if cpu is not None]
    return {
        "images": images,
        "wall_s": round(wall, 2),
        "exit_code": code,
        "stages": stages,
        "process_image_calling_thread_cpu_ms_median": round(statistics.median(own_cpu), 2),
        "process_image_running_at_once": concurrency(calls),
        "event_loop_lag_ms": {
            "median": round(statistics.median(lags), 2),
            "p95": round(sorted(lags)[int(len(lags) * 0.95)], 1),
            "max": round(max(lags), 1),
        },
        "thread_cpu": {
            kind: {
                "threads": len(values),
                "cpu_s": round(sum(values), 2),
                "ms_per_image": round(sum(values) / images * 1000, 2),
            }
            for kind, values in sorted(thread_cpu.items(), key=lambda item: -sum(item[1]))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2400)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ["PIXELMILL_ALLOW_PRIVATE_URLS"] = "true"
    os.environ["PIXELMILL_DATA_DIR"] = str(WORK / "data")
    photos = corpus.build()
    with corpus.StaticServer(photos) as base:
        csv_path = WORK / "products.csv"
        corpus.write_classic_csv(csv_path, corpus.urls(base, photos, args.images))
        install()
        from pixelmill.cli import app

        started = time.perf_counter()
        code: Any = 0
        try:
            app(["process", str(csv_path), "-o", str(WORK / "out")])
        except SystemExit as exit_:
            code = exit_.code
        wall = time.perf_counter() - started
    result = report(args.images, wall, code)
    shutil.rmtree(WORK, ignore_errors=True)
    (RESULTS / "trace_process.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
