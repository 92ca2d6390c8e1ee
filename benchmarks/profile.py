"""Where the time goes in ``pixelmill process``, on the throughput corpus.

Three runs of ``pixelmill process`` on the same 2,400-image CSV:

1. ``threads``: no profiler; every 100 ms the CPU time of each OS thread is read from
   ``/proc/PID/task/*/stat``: the main thread (the asyncio event loop), the libvips
   worker threads (the codec work), and the other threads (the imaging pool's Python
   side, aiosqlite's connection threads, the resolver).
2. ``py-spy``: ``py-spy record --threads -f raw`` (threads that are not idle): where
   each Python thread spends its time.
3. ``gil``: ``py-spy record --gil --threads -f raw``: who holds the GIL.

Writes ``benchmarks/results/profile.json`` and the raw stacks in
``benchmarks/results/tmp/``. Needs py-spy (``pip install -e '.[bench]'``) and the
right to ptrace (root, or ``kernel.yama.ptrace_scope=0``).
Usage: ``.venv/bin/python benchmarks/profile.py [--images 2400] [--rate 100]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import corpus

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / "tmp" / "profile"
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")},
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_DATA_DIR": str(WORK / "data"),
    }


def process_args(csv_path: Path, out: Path) -> list[str]:
    return [str(BIN / "pixelmill"), "process", str(csv_path), "-o", str(out)]


def thread_cpu(csv_path: Path) -> dict[str, Any]:
    """Run once without a profiler; CPU seconds per kind of OS thread."""
    out = WORK / "out-threads"
    shutil.rmtree(out, ignore_errors=True)
    seen: dict[int, tuple[str, float]] = {}
    started = time.perf_counter()
    process = subprocess.Popen(
        process_args(csv_path, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    while process.poll() is None:
        for task in Path(f"/proc/{process.pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            seen[int(task.name)] = (comm, cpu)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    groups: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for tid, (comm, cpu) in seen.items():
        kind = (
            "main thread (event loop)"
            if tid == process.pid
            else "libvips worker threads"
            if comm.startswith("libvips")
            else f"other threads ({comm})"
        )
        groups[kind] += cpu
        counts[kind] += 1
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": round(wall, 2),
        "exit_code": process.returncode,
        "threads": {
            kind: {
                "cpu_s": round(cpu, 2),
                "share_of_one_core": round(cpu / wall, 2),
                "threads": counts[kind],
            }
            for kind, cpu in sorted(groups.items(), key=lambda item: -item[1])
        },
        "note": "CPU of threads that ended between two 100 ms reads is partly missed",
    }


def record(csv_path: Path, rate: int, gil: bool) -> Path:
    out = WORK / ("out-gil" if gil else "out-cpu")
    shutil.rmtree(out, ignore_errors=True)
    raw = WORK / ("stacks-gil.txt" if gil else "stacks-cpu.txt")
    args = [str(BIN / "py-spy"), "record", "-f", "raw", "--threads", "-r", str(rate)]
    args += ["--gil"] if gil else []
    args += ["-o", str(raw), "--", *process_args(csv_path, out)]
    subprocess.run(args, env=env(), check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(out, ignore_errors=True)
    return raw


def thread_kind(name: str, frames: list[str]) -> str:
    if name == "MainThread":
        return "main (event loop)"
    if name.startswith("pixelmill-imaging"):
        return "imaging pool"
    if any("aiosqlite/" in frame for frame in frames):
        return "aiosqlite connections"
    if name.startswith("asyncio_"):
        return "asyncio default executor"
    return "other"


def split(frame: str) -> tuple[str, str]:
    """``func (pkg/module.py:123)`` -> (``func``, ``pkg/module.py``)."""
    if " (" not in frame:
        return frame, ""
    func, where = frame.split(" (", 1)
    return func, where.rsplit(":", 1)[0]


def short(frame: str) -> str:
    func, path = split(frame)
    return f"{func} ({path})" if path else func


def package(frame: str) -> str:
    """The top-level package (or stdlib module) of a frame's file."""
    _func, path = split(frame)
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if head else "?"


def top(counter: Counter[str], samples: int, count: int) -> list[list[Any]]:
    return [[name, round(n / samples, 3)] for name, n in counter.most_common(count)]


def summarise(raw: Path, count: int = 10) -> dict[str, Any]:
    """Per kind of thread: its samples; where they fall by package (innermost frame), by
    pixelmill function (innermost pixelmill frame, i.e. which of our code paid for it),
    and by function (self)."""
    totals: Counter[str] = Counter()
    by_package: dict[str, Counter[str]] = defaultdict(Counter)
    by_ours: dict[str, Counter[str]] = defaultdict(Counter)
    by_self: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]
        calls = frames[1:]
        kind = thread_kind(name, calls)
        samples = int(number)
        totals[kind] += samples
        if not calls:
            continue
        by_self[kind][short(calls[-1])] += samples
        by_package[kind][package(calls[-1])] += samples
        ours = [frame for frame in calls if split(frame)[1].startswith("pixelmill/")]
        by_ours[kind][short(ours[-1]) if ours else "(outside pixelmill code)"] += samples
    everything = sum(totals.values()) or 1
    return {
        "samples": everything,
        "by_thread": {
            kind: {
                "samples": samples,
                "share": round(samples / everything, 3),
                "by_package": top(by_package[kind], samples, count),
                "by_pixelmill_function": top(by_ours[kind], samples, count),
                "by_function_self": top(by_self[kind], samples, count),
            }
            for kind, samples in totals.most_common()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    photos = corpus.build()
    with corpus.StaticServer(photos) as base:
        csv_path = WORK / "products.csv"
        corpus.write_classic_csv(csv_path, corpus.urls(base, photos, args.images))
        report: dict[str, Any] = {"images": args.images, "rate_hz": args.rate}
        report["threads"] = thread_cpu(csv_path)
        print(json.dumps(report["threads"], indent=1), flush=True)
        report["py_spy_cpu"] = summarise(record(csv_path, args.rate, gil=False))
        report["py_spy_gil"] = summarise(record(csv_path, args.rate, gil=True))
    (RESULTS / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    for mode in ("py_spy_cpu", "py_spy_gil"):
        print(f"\n== {mode}: {report[mode]['samples']} samples")
        for kind, data in report[mode]["by_thread"].items():
            print(f"-- {kind}: {data['share']:.1%} of samples")
            for key in ("by_package", "by_pixelmill_function", "by_function_self"):
                print(f"   {key}:")
                for frame, share in data[key][:8]:
                    print(f"     {share:6.1%}  {frame}")
    print(f"\nwritten to {RESULTS / 'profile.json'}")


if __name__ == "__main__":
    main()
