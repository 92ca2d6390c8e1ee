"""Images per second of the imaging service, inline and over HTTP, against bare libvips.

The corpus is the sample photos that pixelmill ships, re-saved at 800 and 1600 px on
the long side at JPEG quality 90, served by a static aiohttp server in a subprocess.

- ``bare``: a thread per core, each decoding and re-encoding at quality 45 with the
  codec the pipeline uses for these files (simplejpeg: they are plain JPEGs that stay
  JPEGs), on bytes already in memory: the ceiling, with no fetching, no quality
  estimate and no storing.
- ``bare-fetch``: the same, but first each image is fetched from the static server
  (the server shares the cores), as the service must: four threads per core, each
  with one keep-alive connection (``http.client``), so that fetches overlap the codec.
- ``bare-opencv``: ``bare`` with OpenCV, the pipeline's JPEG codec until December 2026.
- ``bare-pyvips``: ``bare`` with pyvips (one libvips thread per image), the codec of
  every other kind of image.
- ``inline``: ``InlineImaging.process`` on the URLs (fetch, pipeline, store to disk).
- ``http``: ``HttpImaging`` in this process calling one ``pixelmill imaging`` process.
- ``http-procs``: the same against ``pixelmill imaging --processes N`` (one per core).

Each mode runs ``--repeat`` times, interleaved with the others, and the median run
counts. Usage: ``python benchmarks/imaging.py [--rounds N] [--repeat R] [--concurrency C]``.
Prints a table and writes ``benchmarks/results/imaging.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np
import pyvips
import simplejpeg

from pixelmill.config import Settings
from pixelmill.domain import ProcessedImage, ProcessingOptions
from pixelmill.imaging.base import Imaging
from pixelmill.imaging.client import HttpImaging
from pixelmill.imaging.inline import InlineImaging
from pixelmill.storage import LocalStorage

RESULTS = Path(__file__).parent / "results" / "imaging.json"
SIZES = (800, 1600)
CPUS = os.cpu_count() or 1


def build_corpus(root: Path) -> dict[int, list[Path]]:
    """The sample photos at each size (long side), JPEG quality 90."""
    samples = sorted(Path(str(files("pixelmill") / "samples")).glob("*.jpg"))
    corpus: dict[int, list[Path]] = {}
    for size in SIZES:
        corpus[size] = []
        for sample in samples:
            image = pyvips.Image.new_from_file(str(sample))
            scaled = image.resize(size / max(image.width, image.height), kernel="lanczos3")
            target = root / f"{sample.stem}-{size}.jpg"
            scaled.jpegsave(str(target), Q=90)
            corpus[size].append(target)
    return corpus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def serve_static(root: str, port: int) -> None:
    """The static file server of the corpus (run in a subprocess)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", root)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def recode_simplejpeg(data: bytes) -> int:
    colour = "GRAY" if simplejpeg.decode_jpeg_header(data)[2] == "Gray" else "RGB"
    pixels = simplejpeg.decode_jpeg(data, colorspace=colour)
    sampling = "Gray" if colour == "GRAY" else "420"
    return len(simplejpeg.encode_jpeg(pixels, 45, colorspace=colour, colorsubsampling=sampling))


def recode_opencv(data: bytes) -> int:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return len(cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 45])[1])


def recode_pyvips(data: bytes) -> int:
    image = pyvips.Image.new_from_buffer(data, "", access="sequential")
    return len(image.jpegsave_buffer(Q=45))


def bare_loop(
    corpus: list[Path], rounds: int, recode: Callable[[bytes], int], urls: list[str] | None = None
) -> float:
    """Seconds to decode and re-encode every file ``rounds`` times, a thread per core;
    with ``urls``, four threads per core, each fetching the file first over its own
    keep-alive connection."""
    pyvips.cache_set_max(0)
    pyvips.concurrency_set(1)
    cv2.setNumThreads(1)
    blobs = [path.read_bytes() for path in corpus]
    local = threading.local()

    def fetched(index: int) -> bytes:
        if urls is None:
            return blobs[index]
        url = urlsplit(urls[index])
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(url.netloc, timeout=30)
        local.connection.request("GET", url.path)
        response = local.connection.getresponse()
        return response.read()

    def one(index: int) -> int:
        return recode(fetched(index))

    indexes = list(range(len(blobs)))
    with ThreadPoolExecutor(CPUS if urls is None else 4 * CPUS) as pool:
        list(pool.map(one, indexes))  # warm up
        started = time.perf_counter()
        list(pool.map(one, indexes * rounds))
        return time.perf_counter() - started


async def service_loop(
    imaging: Imaging, urls: list[str], rounds: int, concurrency: int, label: str
) -> float:
    """Seconds to process every URL ``rounds`` times, ``concurrency`` images at once."""
    slots = asyncio.Semaphore(concurrency)
    options = ProcessingOptions()
    # Every call writes a key of its own: a key already stored would be reported as it
    # is (an earlier attempt's object), not processed again.
    run = uuid.uuid4().hex[:8]

    async def one(index: int, url: str) -> None:
        async with slots:
            outcome = await imaging.process(url, options, f"{label}/{run}/{index}")
        if not isinstance(outcome, ProcessedImage):
            raise SystemExit(f"{url}: {outcome}")

    await asyncio.gather(*(one(-1 - i, url) for i, url in enumerate(urls)))  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(one(i, url) for i, url in enumerate(urls * rounds)))
    return time.perf_counter() - started


def settings_for(data_dir: Path, **changes: object) -> Settings:
    return Settings(data_dir=data_dir, allow_private_urls=True, **changes)  # type: ignore[arg-type]


async def inline_run(data_dir: Path, urls: list[str], rounds: int, concurrency: int) -> float:
    settings = settings_for(data_dir)
    imaging = InlineImaging(settings, LocalStorage(data_dir / "files", settings.public_url))
    try:
        return await service_loop(imaging, urls, rounds, concurrency, "inline")
    finally:
        await imaging.close()


async def http_run(service_url: str, urls: list[str], rounds: int, concurrency: int) -> float:
    imaging = HttpImaging(settings_for(Path(tempfile.gettempdir()), imaging_url=service_url))
    try:
        return await service_loop(imaging, urls, rounds, concurrency, "http")
    finally:
        await imaging.close()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="passes over the corpus")
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode (median kept)")
    parser.add_argument("--concurrency", type=int, default=4 * CPUS, help="images at once")
    parser.add_argument("--serve-static", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_static:
        serve_static(args.serve_static[0], int(args.serve_static[1]))
        return
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-") as tmp:
        report = run(Path(tmp), args.rounds, args.concurrency, args.repeat)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {RESULTS}")


def summarise(size: int, images: int, runs: dict[str, list[float]]) -> list[dict[str, object]]:
    """One row per mode: the median of its runs, and its ratios to the medians of the
    bare loop and of the bare loop that fetches."""
    medians = {mode: statistics.median(seconds) for mode, seconds in runs.items()}
    return [
        {
            "size": size,
            "mode": mode,
            "images": images,
            "seconds": round(medians[mode], 3),
            "images_per_s": round(images / medians[mode], 1),
            "ratio_to_bare": round(medians["bare"] / medians[mode], 3),
            "ratio_to_bare_fetch": round(medians["bare-fetch"] / medians[mode], 3),
            "images_per_s_runs": [round(images / seconds, 1) for seconds in runs[mode]],
        }
        for mode in runs
    ]


def run(tmp: Path, rounds: int, concurrency: int, repeat: int) -> dict[str, object]:
    corpus_dir = tmp / "corpus"
    corpus_dir.mkdir()
    corpus = build_corpus(corpus_dir)
    static_port, service_port, pair_port = free_port(), free_port(), free_port()
    static = start(
        [sys.executable, __file__, "--serve-static", str(corpus_dir), str(static_port)],
        {},
        tmp / "static.log",
    )
    service = start(
        [sys.executable, "-m", "pixelmill", "imaging", "--port", str(service_port)],
        {"PIXELMILL_DATA_DIR": str(tmp / "service"), "PIXELMILL_ALLOW_PRIVATE_URLS": "true"},
        tmp / "service.log",
    )
    pair_command = ["imaging", "--port", str(pair_port), "--processes", str(CPUS)]
    pair = start(
        [sys.executable, "-m", "pixelmill", *pair_command],
        {"PIXELMILL_DATA_DIR": str(tmp / "pair"), "PIXELMILL_ALLOW_PRIVATE_URLS": "true"},
        tmp / "pair.log",
    )
    service_url = f"http://127.0.0.1:{service_port}"
    pair_url = f"http://127.0.0.1:{pair_port}"
    rows: list[dict[str, object]] = []
    try:
        wait_healthy(f"http://127.0.0.1:{static_port}/", static, "the static server")
        wait_healthy(f"{service_url}/healthz", service, "pixelmill imaging")
        wait_healthy(f"{pair_url}/healthz", pair, "pixelmill imaging --processes")
        for size in SIZES:
            urls = [f"http://127.0.0.1:{static_port}/{path.name}" for path in corpus[size]]
            runs: dict[str, list[float]] = {
                mode: [] for mode in ("bare", "bare-fetch", "bare-opencv", "bare-pyvips",
                                      "inline", "http", "http-procs")
            }  # fmt: skip
            for _ in range(repeat):  # interleaved, so that a noisy neighbour hits every mode
                runs["bare"].append(bare_loop(corpus[size], rounds, recode_simplejpeg))
                runs["bare-fetch"].append(bare_loop(corpus[size], rounds, recode_simplejpeg, urls))
                runs["bare-opencv"].append(bare_loop(corpus[size], rounds, recode_opencv))
                runs["bare-pyvips"].append(bare_loop(corpus[size], rounds, recode_pyvips))
                inline_dir = tmp / f"inline-{size}"
                runs["inline"].append(
                    asyncio.run(inline_run(inline_dir, urls, rounds, concurrency))
                )
                runs["http"].append(asyncio.run(http_run(service_url, urls, rounds, concurrency)))
                runs["http-procs"].append(
                    asyncio.run(http_run(pair_url, urls, rounds, concurrency))
                )
            rows.extend(summarise(size, len(urls) * rounds, runs))
    finally:
        for process in (service, pair, static):
            process.terminate()
            process.wait(timeout=30)
    return {
        "machine": {
            "cpus": CPUS,
            "processor": cpu_model(),
            "system": platform.platform(),
            "python": platform.python_version(),
            "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        },
        "corpus": {"photos": len(corpus[SIZES[0]]), "sizes": list(SIZES), "quality": 90},
        "rounds": rounds,
        "repeat": repeat,
        "concurrency": concurrency,
        "results": rows,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(report: dict[str, object]) -> None:
    machine = report["machine"]
    print(f"machine: {machine}")
    print(
        f"{'size':>6} {'mode':<11} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs bare':>8} "
        f"{'vs bare-fetch':>13}"
    )
    for row in report["results"]:  # type: ignore[attr-defined]
        print(
            f"{row['size']:>6} {row['mode']:<11} {row['images']:>7} {row['seconds']:>8.2f} "
            f"{row['images_per_s']:>9.1f} {row['ratio_to_bare']:>8.2f} "
            f"{row['ratio_to_bare_fetch']:>13.2f}"
        )


if __name__ == "__main__":
    main()
