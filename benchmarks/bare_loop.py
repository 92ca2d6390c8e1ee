"""The limit: fetch, decode, re-encode at quality 50 and write the file; nothing else.

One process per core (default), each with a few threads; every thread keeps one
keep-alive HTTP connection (so each process has a pool of them) and loops over its
share of the URLs: GET, decode and encode with the chosen codec (``simplejpeg``, which
pixelmill uses for a JPEG that stays a JPEG, ``opencv``, ``pyvips``, its codec for the
rest, or ``pillow``), write ``OUT/<n>.jpg``. No database, no
status, no quality estimate, no retries: the cost floor of the work itself.

Usage: ``python benchmarks/bare_loop.py URLS.csv OUT [--codec simplejpeg|opencv|pyvips|pillow]
[--processes N] [--threads T] [--quality Q]``; URLS.csv has a ``url`` column (or one
URL per line). Prints ``{"images": ok, "failed": n}`` as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit


def read_urls(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[1:] if lines and lines[0] == "url" else lines


def _encoder(codec: str, quality: int):  # type: ignore[no-untyped-def]
    if codec == "simplejpeg":
        import simplejpeg

        def simple(data: bytes) -> bytes:
            colour = "GRAY" if simplejpeg.decode_jpeg_header(data)[2] == "Gray" else "RGB"
            pixels = simplejpeg.decode_jpeg(data, colorspace=colour)
            sampling = "Gray" if colour == "GRAY" else "420"
            encoded = simplejpeg.encode_jpeg(
                pixels, quality, colorspace=colour, colorsubsampling=sampling
            )
            return bytes(encoded)

        return simple
    if codec == "opencv":
        import cv2
        import numpy as np

        cv2.setNumThreads(1)  # parallelism comes from processes and threads

        def opencv(data: bytes) -> bytes:
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            return bytes(cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])[1])

        return opencv
    if codec == "pyvips":
        import pyvips

        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)  # parallelism comes from processes and threads

        def vips(data: bytes) -> bytes:
            image = pyvips.Image.new_from_buffer(data, "", access="sequential")
            return bytes(image.jpegsave_buffer(Q=quality))

        return vips

    from PIL import Image

    def pillow(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.save(out, "JPEG", quality=quality)
            return out.getvalue()

    return pillow


def worker(args: tuple[list[tuple[int, str]], str, str, int, int]) -> tuple[int, int]:
    """One process: its share of (index, URL); returns (ok, failed)."""
    jobs, out_dir, codec, quality, threads = args
    encode = _encoder(codec, quality)
    local = threading.local()
    out = Path(out_dir)

    def connection(host: str, port: int) -> http.client.HTTPConnection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, port, timeout=30)
        return conn

    def fetch(url: str) -> bytes:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
            conn = connection(parts.hostname or "127.0.0.1", parts.port or 80)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                local.conn = None
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise OSError(f"HTTP {response.status} for {url}")
            return body
        raise AssertionError("unreachable")

    def one(job: tuple[int, str]) -> bool:
        index, url = job
        try:
            encoded = encode(fetch(url))
            (out / f"{index}.jpg").write_bytes(encoded)
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, jobs))
    return sum(results), len(results) - sum(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--codec", choices=("simplejpeg", "opencv", "pyvips", "pillow"), default="simplejpeg"
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=4, help="threads per process")
    parser.add_argument("--quality", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = list(enumerate(read_urls(args.urls)))
    shares = [
        (jobs[i :: args.processes], str(args.out), args.codec, args.quality, args.threads)
        for i in range(args.processes)
    ]
    # fork before any codec is loaded: each process loads its own.
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        counts = pool.map(worker, shares)
    ok = sum(count[0] for count in counts)
    print(json.dumps({"images": ok, "failed": sum(count[1] for count in counts)}))


if __name__ == "__main__":
    main()
