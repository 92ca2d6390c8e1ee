"""Throughput, side by side: pixelmill against img2dataset and against the codec limit.

The contenders run alternated (A B C D E, A B C D E, ...) for ``--rounds`` rounds in one
run, on the same 2,400 URLs of real photos (see ``corpus.py``), so that a noisy
neighbour or a warm cache hits every one of them alike:

1. ``process``: ``pixelmill process products.csv -o DIR`` (one-shot, no server);
2. ``serve``: ``pixelmill serve`` on a free port with a fresh data dir; the time from
   the HTTP upload of the CSV to the status ``completed``, seen by a GET of the status
   every 100 ms (those calls' latencies are the status-latency figures);
3. ``img2dataset``: the same URLs, ``--resize_mode no --encode_quality 50``, 2
   processes, 32 threads, 300 samples per shard, files output (see ``IMG2DATASET``);
4. ``limit``: ``bare_loop.py`` with simplejpeg, the codec pixelmill uses for a JPEG that
   stays a JPEG (and the fastest here): fetch, decode, encode at quality 50, write; one
   process per core, nothing else;
5. ``limit-opencv``, ``limit-pyvips`` and ``limit-pillow``: the same loop with OpenCV
   (pixelmill's JPEG codec until December 2026), libvips (its codec for everything
   else) and Pillow (img2dataset's).

Every contender writes its output, and its temporary files (``TMPDIR``), under
``/dev/shm`` when it has room (``--work-dir`` to choose; ``default_work_dir`` says why).

For each run: wall time, images/s, CPU seconds per image (the contender's whole
process tree, from ``getrusage(RUSAGE_CHILDREN)`` deltas; for ``serve``, the server
process's CPU time over the measured window) and peak RSS (the sum over the process
tree, sampled every 100 ms). Wall times include process start-up except for ``serve``,
whose start-up comes before the upload; ``startup_s`` gives each CLI's fixed cost on a
one-image CSV.

Writes ``benchmarks/results/throughput.json``, ``throughput.md`` and ``throughput.png``.
Usage: ``.venv/bin/python benchmarks/throughput.py [--rounds 3] [--images 2400]
[--contenders process,serve,img2dataset,limit,limit-opencv,limit-pyvips,limit-pillow]
[--no-write]``.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
import corpus

import pixelmill
from pixelmill import allocator

RESULTS = Path(__file__).parent / "results"
DISK_WORK = RESULTS / "tmp" / "runs"
RAM_WORK = Path("/dev/shm/pixelmill-bench")
# Room for the inputs and the largest single run's output (~150 MB), many times over.
RAM_WORK_MIN_FREE = 4 * 2**30
BIN = Path(sys.executable).parent
CONTENDERS = (
    "process",
    "serve",
    "img2dataset",
    "limit",
    "limit-opencv",
    "limit-pyvips",
    "limit-pillow",
)
LABELS = {
    "process": "pixelmill process (one-shot)",
    "serve": "pixelmill serve (upload → completed)",
    "img2dataset": "img2dataset",
    "limit": "limit: bare loop, simplejpeg",
    "limit-opencv": "bare loop, OpenCV",
    "limit-pyvips": "bare loop, pyvips",
    "limit-pillow": "bare loop, Pillow",
}
# Ten calls a second: far more than a client needs, and enough calls for a p99 (each
# costs the server about 2 ms of CPU, so 50 a second took 0.09 cores from the work).
STATUS_INTERVAL = 0.100
# img2dataset at its fastest fair settings here (see docs/performance.md, "Tuning").
IMG2DATASET = {
    "processes_count": 2,
    "thread_count": 32,
    "number_sample_per_shard": 300,
    "extract_exif": False,  # pixelmill reads no EXIF into its results either
    "compute_hash": "None",  # nor hashes the source
}
TARGETS = {
    "vs_limit": 0.9,  # pixelmill >= 0.9x the limit
    "vs_img2dataset": 1.25,  # pixelmill >= 1.25x img2dataset
    "status_p95_ms": 50.0,
    "cpu_per_image_vs_limit": 1.15,  # CPU per image within 15% of the limit's
}


@dataclass
class Run:
    """One timed run of one contender."""

    contender: str
    round: int
    images: int  # images it produced
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0


class TreeMonitor:
    """Samples the summed RSS of a process and its descendants every 100 ms."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


class Window:
    """CPU spent on the whole machine over a measured window, split by who spent it.

    Other builds and test runs may share this machine: ``background_cores`` is the
    CPU that neither the contender, the static server nor this harness spent, per second
    of the window (0 on a quiet machine; up to the core count on a busy one).
    """

    static_pid: int | None = None  # the corpus server, set once it runs

    def __init__(self) -> None:
        self.busy = self._machine_busy()
        self.static = self._static_cpu()
        self.own = self._own_cpu()
        self.started = time.perf_counter()

    @staticmethod
    def _machine_busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
        return busy / os.sysconf("SC_CLK_TCK")

    def _static_cpu(self) -> float:
        if self.static_pid is None:
            return 0.0
        try:
            return float(sum(psutil.Process(self.static_pid).cpu_times()[:2]))
        except psutil.Error:
            return 0.0

    @staticmethod
    def _own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def close(self, contender_cpu: float) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        static = self._static_cpu() - self.static
        own = self._own_cpu() - self.own
        background = self._machine_busy() - self.busy - contender_cpu - static - own
        return {
            "static_server_cpu_s": round(static, 2),
            "harness_cpu_s": round(own, 2),
            "background_cores": round(max(background, 0.0) / wall, 2) if wall else 0.0,
        }


def wait_for_quiet(limit: float, threshold: float = 0.25) -> float:
    """Wait (at most ``limit`` s) until the machine is near idle for one second: other
    sessions' test runs would otherwise land inside a run. Returns the seconds waited."""
    started = time.perf_counter()
    while True:
        before = Window._machine_busy()
        time.sleep(1.0)
        busy = Window._machine_busy() - before
        waited = time.perf_counter() - started
        if busy < threshold or waited >= limit:
            return round(waited, 1)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 900
) -> tuple[float, float, float, int, dict[str, float]]:
    """Run a command to its end: (wall s, CPU s of its tree, peak RSS MB, exit code,
    the machine's CPU split over that time)."""
    window = Window()
    cpu_before = children_cpu()
    with log.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(process.pid)
        try:
            code = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        wall = time.perf_counter() - started
    cpu = children_cpu() - cpu_before
    return wall, cpu, monitor.stop(), code, window.close(cpu)


def default_work_dir() -> Path:
    """Where the contenders write: a RAM-backed folder when there is one with room.

    Every contender writes a file per image (img2dataset a ``.json`` beside it), and on
    a disk that file's cost depends on the file system's history: on this VM's ext4 (no
    journal), creating 2,400 files took 65 µs each in a fresh folder and 400 µs each
    right after 2,400 others were deleted, which every run's clean-up does. In RAM it
    is 45 µs, whatever came before, so no contender pays for its predecessor.
    """
    shm = RAM_WORK.parent
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > RAM_WORK_MIN_FREE:
        return RAM_WORK
    return DISK_WORK


def file_system(path: Path) -> str:
    """The type of the file system that holds ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def base_env(work: Path | None = None) -> dict[str, str]:
    """The environment of every contender; ``work``: their temporary files' folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    if work is not None:
        env["TMPDIR"] = str(work)  # pixelmill process's throw-away database, among others
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    # Every contender loads numpy (and OpenCV) and none does linear algebra: without
    # this, OpenBLAS's idle threads spin for about 0.1 s of CPU per process at start-up.
    # pixelmill sets it for itself; the others get it here, so that all start alike.
    env["OPENBLAS_NUM_THREADS"] = "1"
    # The same for glibc's allocator: pixelmill keeps freed image buffers in the heap
    # (pixelmill/allocator.py); the others get the same thresholds (the bare loop makes
    # 7% more images/s with them).
    env["MALLOC_MMAP_THRESHOLD_"] = str(allocator.MMAP_THRESHOLD)
    env["MALLOC_TRIM_THRESHOLD_"] = str(allocator.TRIM_THRESHOLD)
    return env


def count_files(root: Path, suffix: str) -> int:
    return sum(1 for _ in root.rglob(f"*{suffix}")) if root.exists() else 0


class Bench:
    """Everything one benchmark run shares: corpus, server, CSVs, work dirs."""

    def __init__(self, base: str, image_urls: list[str], work: Path) -> None:
        self.base = base
        self.work = work
        self.images = len(image_urls)
        self.classic = work / "products.csv"
        self.url_list = work / "urls.csv"
        self.rows = corpus.write_classic_csv(self.classic, image_urls)
        corpus.write_url_list(self.url_list, image_urls)
        # The first URL alone, in each format: start-up costs and warm-up runs.
        self.one_csv = work / "one.csv"
        self.one_list = work / "one-url.csv"
        corpus.write_classic_csv(self.one_csv, image_urls[:1])
        corpus.write_url_list(self.one_list, image_urls[:1])
        self.status_latencies: list[list[float]] = []
        self.idle_latencies: list[list[float]] = []

    def warm_up(self, name: str) -> float:
        """Run a contender on the one-image input and return its wall time.

        Run before each measured run, so that every contender starts with its files
        in the page cache. Some VMs page out what has not been touched for a minute
        (this one runs DAMON's reclaim), and then a tool that loads more code pays
        more for having waited its turn; a one-image run puts it back. ``serve``
        warms up inside its own run, with the server it measures.
        """
        if name == "serve":
            return 0.0
        if name == "process":
            return self.process(0, self.one_csv).wall_s
        if name == "img2dataset":
            return self.img2dataset(0, self.one_list).wall_s
        codec = "simplejpeg" if name == "limit" else name.removeprefix("limit-")
        return self.limit(0, codec, self.one_list).wall_s

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def done(self, path: Path) -> None:
        """Remove a run's output, then flush the disk so that no run pays for another's."""
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
        time.sleep(0.5)

    # -- contenders ---------------------------------------------------------------

    def process(self, round_: int, csv_path: Path | None = None) -> Run:
        out = self.fresh(f"process-{round_}")
        env = {
            **base_env(self.work),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            "PIXELMILL_DATA_DIR": str(out / "data"),
        }
        wall, cpu, rss, code, machine_cpu = run_command(
            [str(BIN / "pixelmill"), "process", str(csv_path or self.classic), "-o", str(out)],
            env,
            out.parent / f"process-{round_}.log",
        )
        images = count_files(out / "images", ".jpg") if code == 0 else 0
        self.done(out)
        return Run("process", round_, images, wall, cpu, rss, {"exit_code": code, **machine_cpu})

    def img2dataset(self, round_: int, url_list: Path | None = None, **tuning: Any) -> Run:
        out = self.fresh(f"img2dataset-{round_}")
        settings = {**IMG2DATASET, **tuning}
        args = [
            str(BIN / "img2dataset"),
            f"--url_list={url_list or self.url_list}",
            "--input_format=csv",
            "--url_col=url",
            f"--output_folder={out / 'images'}",
            "--output_format=files",
            "--resize_mode=no",
            "--encode_quality=50",
            "--enable_wandb=False",
            "--retries=0",
            *(f"--{key}={value}" for key, value in settings.items()),
        ]
        wall, cpu, rss, code, machine_cpu = run_command(
            args, base_env(self.work), out.parent / f"i2d-{round_}.log"
        )
        images = count_files(out / "images", ".jpg") if code == 0 else 0
        self.done(out)
        extra = {"exit_code": code, **machine_cpu, **settings}
        return Run("img2dataset", round_, images, wall, cpu, rss, extra)

    def limit(self, round_: int, codec: str = "simplejpeg", url_list: Path | None = None) -> Run:
        name = "limit" if codec == "simplejpeg" else f"limit-{codec}"
        out = self.fresh(f"{name}-{round_}")
        log = out.parent / f"{name}-{round_}.log"
        wall, cpu, rss, code, machine_cpu = run_command(
            [
                sys.executable,
                str(Path(__file__).parent / "bare_loop.py"),
                str(url_list or self.url_list),
                str(out),
                "--codec",
                codec,
            ],
            base_env(self.work),
            log,
        )
        images = json.loads(log.read_text().splitlines()[-1])["images"] if code == 0 else 0
        self.done(out)
        extra = {"exit_code": code, "codec": codec, **machine_cpu}
        return Run(name, round_, images, wall, cpu, rss, extra)

    def limit_opencv(self, round_: int) -> Run:
        return self.limit(round_, "opencv")

    def limit_pyvips(self, round_: int) -> Run:
        return self.limit(round_, "pyvips")

    def limit_pillow(self, round_: int) -> Run:
        return self.limit(round_, "pillow")

    def serve(self, round_: int) -> Run:
        out = self.fresh(f"serve-{round_}")
        port = corpus.free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **base_env(self.work),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            "PIXELMILL_DATA_DIR": str(out / "data"),
        }
        log = (out.parent / f"serve-{round_}.log").open("wb")
        server = subprocess.Popen(
            [str(BIN / "pixelmill"), "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        monitor = TreeMonitor(server.pid)
        handle = psutil.Process(server.pid)
        latencies: list[float] = []
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                wait_ready(client, server)
                warmed = time.perf_counter()
                with self.one_csv.open("rb") as body:
                    response = client.post(
                        "/api/v1/requests", files={"file": ("one.csv", body, "text/csv")}
                    )
                response.raise_for_status()
                poll_until_finished(client, response.json()["request_id"], [])
                warm_up = time.perf_counter() - warmed
                cpu_before = cpu_of(handle)
                window = Window()
                started = time.perf_counter()
                with self.classic.open("rb") as body:
                    response = client.post(
                        "/api/v1/requests", files={"file": ("products.csv", body, "text/csv")}
                    )
                accepted = time.perf_counter() - started
                response.raise_for_status()
                request_id = response.json()["request_id"]
                status = poll_until_finished(client, request_id, latencies)
                wall = time.perf_counter() - started
                cpu = cpu_of(handle) - cpu_before
                machine_cpu = window.close(cpu)
                hwm = vm_hwm_mb(server.pid)
                # The same call on the idle server, for comparison.
                idle: list[float] = []
                for _ in range(100):
                    called = time.perf_counter()
                    client.get(f"/api/v1/requests/{request_id}").raise_for_status()
                    idle.append((time.perf_counter() - called) * 1000)
                    time.sleep(0.02)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        rss = monitor.stop()
        self.status_latencies.append(latencies)
        self.idle_latencies.append(idle)
        self.done(out)
        extra = {
            "status": status["status"],
            "failed": status["progress"]["failed"],
            "upload_s": round(accepted, 3),
            "warm_up_s": round(warm_up, 2),
            "vm_hwm_mb": round(hwm, 1),
            "status_calls": len(latencies),
            "status_ms": latency_summary(latencies),
            "status_idle_ms": latency_summary(idle),
            **machine_cpu,
        }
        return Run("serve", round_, status["progress"]["completed"], wall, cpu, rss, extra)


def cpu_of(process: psutil.Process) -> float:
    """CPU seconds of a process (all its threads) and of its live children."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(client: httpx.Client, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"pixelmill serve exited with {server.returncode}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("pixelmill serve did not become ready")


def poll_until_finished(
    client: httpx.Client, request_id: str, latencies: list[float], limit: float = 900
) -> dict[str, Any]:
    """GET the status every STATUS_INTERVAL (start to start) until finished; latencies in ms."""
    deadline = time.monotonic() + limit
    next_call = time.perf_counter()
    while time.monotonic() < deadline:
        called = time.perf_counter()
        response = client.get(f"/api/v1/requests/{request_id}")
        latencies.append((time.perf_counter() - called) * 1000)
        response.raise_for_status()
        status = response.json()
        if status["status"] in ("completed", "failed"):
            return dict(status)
        next_call += STATUS_INTERVAL
        pause = next_call - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:
            next_call = time.perf_counter()
    raise SystemExit(f"request {request_id} did not finish in {limit} s")


def latency_summary(latencies: list[float]) -> dict[str, float]:
    if len(latencies) < 2:
        return {}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "count": len(latencies),
        "p50": round(cuts[49], 1),
        "p95": round(cuts[94], 1),
        "p99": round(cuts[98], 1),
        "max": round(max(latencies), 1),
    }


# -- the run ----------------------------------------------------------------------


def startup_costs(bench: Bench, contenders: list[str]) -> dict[str, float]:
    """Each CLI contender's wall time on a one-image input, its fixed cost: the second
    of two runs, so that its files are in the page cache."""
    costs: dict[str, float] = {}
    for name in ("process", "img2dataset", "limit"):
        if name in contenders:
            bench.warm_up(name)
            costs[name] = round(bench.warm_up(name), 2)
    return costs


def summarise(runs: list[Run], images: int) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(run.contender for run in runs):
        mine = [run for run in runs if run.contender == name]
        rates = [run.images_per_s for run in mine]
        summary[name] = {
            "label": LABELS[name],
            "runs": len(mine),
            "all_images_ok": all(run.images == images for run in mine),
            "images_per_s": round(statistics.median(rates), 1),
            "images_per_s_runs": [round(rate, 1) for rate in rates],
            "wall_s": round(statistics.median(run.wall_s for run in mine), 2),
            "cpu_ms_per_image": round(
                statistics.median(run.cpu_s / max(run.images, 1) for run in mine) * 1000, 2
            ),
            "cores_busy": round(statistics.median(run.cpu_s / run.wall_s for run in mine), 2),
            "peak_rss_mb": round(statistics.median(run.peak_rss_mb for run in mine), 1),
            "background_cores": round(
                statistics.median(run.extra.get("background_cores", 0.0) for run in mine), 2
            ),
        }
    return summary


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for mine in ("process", "serve"):
        if mine not in summary:
            continue
        for other in ("img2dataset", "limit", "limit-opencv", "limit-pyvips", "limit-pillow"):
            if other in summary:
                rate = summary[mine]["images_per_s"] / summary[other]["images_per_s"]
                out[f"{mine}/{other}"] = round(rate, 3)
        if "limit" in summary:
            cpu = summary[mine]["cpu_ms_per_image"] / summary["limit"]["cpu_ms_per_image"]
            out[f"{mine}/limit cpu_per_image"] = round(cpu, 3)
    return out


def targets(ratio: dict[str, float], status: dict[str, float]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, goal: float, higher: bool) -> None:
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        checks.append({"target": name, "goal": goal, "measured": value, "met": met})

    for mine in ("process", "serve"):
        check(f"{mine} / limit >=", ratio.get(f"{mine}/limit"), TARGETS["vs_limit"], True)
        check(
            f"{mine} / img2dataset >=",
            ratio.get(f"{mine}/img2dataset"),
            TARGETS["vs_img2dataset"],
            True,
        )
        check(
            f"{mine} CPU per image / limit's <=",
            ratio.get(f"{mine}/limit cpu_per_image"),
            TARGETS["cpu_per_image_vs_limit"],
            False,
        )
    check("status p95 ms <", status.get("p95"), TARGETS["status_p95_ms"], False)
    return checks


def machine() -> dict[str, Any]:
    import pyvips

    model = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
    }


def run(
    rounds: int, images: int, contenders: list[str], quiet_wait: float, work: Path
) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # pixelmill's bytecode, as installing a wheel writes it: an editable install run with
    # PYTHONDONTWRITEBYTECODE=1 would compile its modules again at every start.
    compileall.compile_dir(Path(pixelmill.__file__).parent, quiet=1)
    photos = corpus.build()
    static = corpus.StaticServer(photos)
    with static as base:
        Window.static_pid = static.process.pid if static.process else None
        bench = Bench(base, corpus.urls(base, photos, images), work)
        print(f"corpus: {photos.summary()}", flush=True)
        print(f"outputs in {work} ({file_system(work)})", flush=True)
        print(f"{images} images in {bench.rows} rows; static server at {base}", flush=True)
        startup = startup_costs(bench, contenders)
        print(f"start-up on one image: {startup}", flush=True)
        runs: list[Run] = []
        for round_ in range(1, rounds + 1):
            for name in contenders:
                warm_up = bench.warm_up(name)
                waited = wait_for_quiet(quiet_wait)
                result: Run = getattr(bench, name.replace("-", "_"))(round_)
                result.extra["waited_for_quiet_s"] = waited
                if name != "serve":
                    result.extra["warm_up_s"] = round(warm_up, 2)
                runs.append(result)
                cpu_ms = result.cpu_s / max(result.images, 1) * 1000
                print(
                    f"round {round_} {name:<13} {result.images:>5} images {result.wall_s:7.2f} s "
                    f"{result.images_per_s:7.1f}/s cpu {cpu_ms:6.2f} ms/image "
                    f"rss {result.peak_rss_mb:7.1f} MB {result.extra}",
                    flush=True,
                )
    all_latencies = [ms for per_round in bench.status_latencies for ms in per_round]
    status = latency_summary(all_latencies)
    idle = latency_summary([ms for per_round in bench.idle_latencies for ms in per_round])
    summary = summarise(runs, images)
    ratio = ratios(summary)
    return {
        "machine": machine(),
        "work_dir": {"path": str(work), "file_system": file_system(work)},
        "corpus": photos.summary(),
        "images": images,
        "rows": bench.rows,
        "rounds": rounds,
        "order": contenders,
        "img2dataset_settings": {
            **IMG2DATASET,
            "resize_mode": "no",
            "encode_quality": 50,
            "output_format": "files",
            "retries": 0,
        },
        "startup_s": startup,
        "summary": summary,
        "ratios": ratio,
        "status_latency_ms": {
            "interval_ms": STATUS_INTERVAL * 1000,
            "during": "contender serve, every round pooled",
            **status,
            "idle_server": idle,
        },
        "targets": targets(ratio, status),
        "runs": [{**asdict(run), "images_per_s": round(run.images_per_s, 1)} for run in runs],
    }


# -- reports ----------------------------------------------------------------------


def _work_dir_note(report: dict[str, Any]) -> str:
    work = report.get("work_dir")  # reports from before the option have none
    if not work:
        return ""
    return f" Outputs and temporary files in {work['path']} ({work['file_system']})."


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Throughput",
        "",
        f"{report['images']} images ({report['rows']} rows, {report['corpus']['distinct_images']}"
        f" photos at {' and '.join(map(str, report['corpus']['long_sides_px']))} px, JPEG q"
        f"{report['corpus']['jpeg_quality']}), {report['rounds']} alternated rounds; "
        f"{m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
        f"libvips {m['libvips']}.{_work_dir_note(report)}",
        "",
        "| contender | images/s (median) | runs | wall s | CPU ms/image | cores busy "
        "| peak RSS MB | vs img2dataset | vs limit | background load (cores) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = report["summary"]
    for row in summary.values():
        vs_i2d = vs_limit = ""
        if "img2dataset" in summary:
            vs_i2d = f"{row['images_per_s'] / summary['img2dataset']['images_per_s']:.2f}x"
        if "limit" in summary:
            vs_limit = f"{row['images_per_s'] / summary['limit']['images_per_s']:.2f}x"
        runs = ", ".join(f"{rate:.0f}" for rate in row["images_per_s_runs"])
        ok = "" if row["all_images_ok"] else " (some images missing!)"
        lines.append(
            f"| {row['label']}{ok} | **{row['images_per_s']:.1f}** | {runs} | {row['wall_s']:.2f} "
            f"| {row['cpu_ms_per_image']:.2f} | {row['cores_busy']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {vs_i2d} | {vs_limit} | {row['background_cores']:.2f} |"
        )
    status = report["status_latency_ms"]
    if "p50" in status:
        lines += [
            "",
            f"Status calls during `serve` (GET every {status['interval_ms']:.0f} ms, "
            f"{status['count']} calls): p50 {status['p50']} ms, p95 {status['p95']} ms, "
            f"p99 {status['p99']} ms, max {status['max']} ms."
            + (
                f" The same call on the idle server after each run: p50 {idle['p50']} ms, "
                f"p95 {idle['p95']} ms."
                if (idle := status.get("idle_server"))
                else ""
            ),
        ]
    if report["startup_s"]:
        costs = ", ".join(f"{name} {sec} s" for name, sec in report["startup_s"].items())
        lines += ["", f"Start-up (wall time on a one-image input): {costs}."]
    lines += ["", "| target | goal | measured | met |", "|---|---:|---:|---|"]
    for check in report["targets"]:
        met = "yes" if check["met"] else "**no**"
        lines.append(f"| {check['target']} | {check['goal']} | {check['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    names = list(summary)[::-1]  # first contender on top
    colours = {
        "process": "#1f77b4",
        "serve": "#4a9ad6",
        "img2dataset": "#ff7f0e",
        "limit": "#7f7f7f",
        "limit-opencv": "#8c8c8c",
        "limit-pyvips": "#9a9a9a",
        "limit-pillow": "#b5b5b5",
    }
    labels = [summary[name]["label"] for name in names]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 0.75 * len(names) + 1.8), sharey=True, width_ratios=[3, 2]
    )
    rates = [summary[name]["images_per_s"] for name in names]
    left.barh(labels, rates, color=[colours[name] for name in names])
    for y, name in enumerate(names):
        runs = summary[name]["images_per_s_runs"]
        left.scatter(runs, [y] * len(runs), color="black", s=12, zorder=3)
        left.text(
            2, y, f"{summary[name]['images_per_s']:.0f}/s", va="center", color="white",
            fontweight="bold",
        )  # fmt: skip
    if "limit" in summary:
        left.axvline(summary["limit"]["images_per_s"], color="#555", linestyle="--", linewidth=1)
    left.set_xlim(0, max(max(summary[n]["images_per_s_runs"]) for n in names) * 1.08)
    left.set_xlabel("images per second (bar: median; dots: each round) — higher is better")
    cpu = [summary[name]["cpu_ms_per_image"] for name in names]
    right.barh(labels, cpu, color=[colours[name] for name in names])
    for y, value in enumerate(cpu):
        right.text(value + 0.2, y, f"{value:.1f}", va="center")
    right.set_xlim(0, max(cpu) * 1.2)
    right.set_xlabel("CPU ms per image (process tree) — lower is better")
    m = report["machine"]
    background = statistics.median(row["background_cores"] for row in summary.values())
    fig.suptitle(
        f"{report['images']} JPEG photos via HTTP, re-encoded at quality ~50, "
        f"{report['rounds']} rounds — {m['cpus']} cores {m['cpu_model']}, libvips {m['libvips']}\n"
        f"dashed line: the limit; other processes on the machine used a median "
        f"{background:.2f} cores during the runs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="before each run, wait up to this many seconds for a near-idle machine",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw throughput.md and throughput.png from throughput.json",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"where the contenders write (default: {RAM_WORK} if it has room, else {DISK_WORK})",
    )
    args = parser.parse_args()
    if args.report_only:
        report = json.loads((RESULTS / "throughput.json").read_text())
        (RESULTS / "throughput.md").write_text(markdown(report))
        chart(report, RESULTS / "throughput.png")
        return
    contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    work = args.work_dir or default_work_dir()
    report = run(args.rounds, args.images, contenders, args.quiet_wait, work)
    text = markdown(report)
    print("\n" + text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "throughput.md").write_text(text)
        chart(report, RESULTS / "throughput.png")
        print(f"written: {RESULTS / 'throughput.json'}, throughput.md, throughput.png")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
