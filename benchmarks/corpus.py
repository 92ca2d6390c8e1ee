"""The benchmark corpus: real photos, a fast static server for them, and the CSVs.

- Photos: the sample photos that ship inside scikit-image (no optional ``pooch``
  download), plus a few crops of its colour photos, each saved as JPEG quality 90 at a
  long side of 800 and 1600 px, cached in ``benchmarks/results/tmp/corpus/``.
- Server: aiohttp in a subprocess, every file held in memory, ``GET /<name>?<anything>``;
  the query string only makes each URL unique so that no layer can cache it.
- CSVs: the classic format (``S. No.``, ``Product Name``, ``Input Image Urls`` with 1-3
  URLs in one quoted cell) and, for img2dataset, the same URLs one per line.

Run alone to build the corpus and print what it holds:
``.venv/bin/python benchmarks/corpus.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "tmp" / "corpus"
SIZES = (800, 1600)
QUALITY = 90
VERSION = 1  # bump when the recipe below changes, to rebuild the cache

# Photographs bundled in the scikit-image wheel (loaders that need no download).
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
# Distinct regions of the colour photos, as fractions (top, left, bottom, right).
CROPS = {
    "astronaut-face": ("astronaut", (0.0, 0.25, 0.55, 0.75)),
    "coffee-cup": ("coffee", (0.05, 0.15, 0.95, 0.75)),
    "cat-face": ("cat", (0.0, 0.2, 0.8, 0.75)),
    "hubble-corner": ("hubble_deep_field", (0.5, 0.5, 1.0, 1.0)),
    "retina-disc": ("retina", (0.2, 0.45, 0.7, 0.95)),
    "rocket-tower": ("rocket", (0.0, 0.3, 1.0, 0.7)),
}


@dataclass(frozen=True)
class Corpus:
    """The cached JPEG files and what they are."""

    root: Path
    files: list[str]  # file names under root, sorted
    images: int  # distinct pictures (each at every size)
    colour: int  # of which in colour (the rest are greyscale)

    def summary(self) -> dict[str, object]:
        sizes = [(self.root / name).stat().st_size for name in self.files]
        return {
            "source": "scikit-image sample data (bundled, no pooch download)",
            "distinct_images": self.images,
            "colour_images": self.colour,
            "greyscale_images": self.images - self.colour,
            "long_sides_px": list(SIZES),
            "jpeg_quality": QUALITY,
            "files": len(self.files),
            "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "total_mb": round(sum(sizes) / 2**20, 1),
        }


def _pictures() -> dict[str, object]:
    """name -> uint8 array (H, W) or (H, W, 3)."""
    import numpy as np
    from skimage import data

    pictures: dict[str, object] = {}
    for name in PHOTOS:
        array = np.asarray(getattr(data, name)())
        pictures[name] = array[..., :3] if array.ndim == 3 else array
    left, right, _disparity = data.stereo_motorcycle()
    pictures["motorcycle-left"] = np.asarray(left)
    pictures["motorcycle-right"] = np.asarray(right)
    for crop, (source, (top, left_f, bottom, right_f)) in CROPS.items():
        array = pictures[source]
        height, width = array.shape[:2]  # type: ignore[attr-defined]
        pictures[crop] = array[  # type: ignore[index]
            int(top * height) : int(bottom * height), int(left_f * width) : int(right_f * width)
        ]
    return pictures


def build(cache: Path = CACHE) -> Corpus:
    """Build the corpus into ``cache`` unless it is there already (same VERSION)."""
    manifest_path = cache / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == VERSION and all(
            (cache / name).exists() for name in manifest["files"]
        ):
            return Corpus(cache, manifest["files"], manifest["images"], manifest["colour"])
    import numpy as np
    import pyvips

    cache.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    colour = 0
    pictures = _pictures()
    for name, array in sorted(pictures.items()):
        pixels = np.ascontiguousarray(array)
        bands = 1 if pixels.ndim == 2 else pixels.shape[2]
        colour += bands == 3
        image = pyvips.Image.new_from_memory(
            pixels.tobytes(), pixels.shape[1], pixels.shape[0], bands, "uchar"
        )
        image = image.copy(interpretation="srgb" if bands == 3 else "b-w")
        for size in SIZES:
            scaled = image.resize(size / max(image.width, image.height), kernel="lanczos3")
            target = f"{name}-{size}.jpg"
            scaled.jpegsave(str(cache / target), Q=QUALITY, keep="none")
            files.append(target)
    files.sort()
    manifest_path.write_text(
        json.dumps(
            {"version": VERSION, "files": files, "images": len(pictures), "colour": colour},
            indent=1,
        )
    )
    return Corpus(cache, files, len(pictures), colour)


def urls(base: str, corpus: Corpus, count: int) -> list[str]:
    """``count`` URLs cycling over every file, each unique by its query string."""
    return [f"{base}/{corpus.files[i % len(corpus.files)]}?n={i}" for i in range(count)]


def write_classic_csv(path: Path, image_urls: list[str], seed: int = 8) -> int:
    """The classic upload CSV, 1-3 URLs per row in one quoted cell; returns the row count."""
    chooser = random.Random(seed)
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
        index = 0
        while index < len(image_urls):
            take = min(chooser.randint(1, 3), len(image_urls) - index)
            rows += 1
            cell = ",".join(image_urls[index : index + take])
            writer.writerow([rows, f"Product {rows}", cell])
            index += take
    return rows


def write_url_list(path: Path, image_urls: list[str]) -> None:
    """img2dataset's input: a CSV with a ``url`` column, the same URLs in the same order."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["url"])
        writer.writerows([url] for url in image_urls)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(root: Path, port: int) -> None:
    """The static server (runs in its own process): every file of ``root`` from memory."""
    from aiohttp import web

    blobs = {path.name: path.read_bytes() for path in root.glob("*.jpg")}

    async def get(request: web.Request) -> web.Response:
        body = blobs.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/jpeg")

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=f"{len(blobs)} files\n")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/{name}", get)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class StaticServer:
    """The static server as a context manager: ``with StaticServer(corpus) as base: ...``."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        import httpx

        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve", str(self.corpus.root), str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit("the static server exited early")
            try:
                if httpx.get(self.base + "/", timeout=1).status_code == 200:
                    return self.base
            except httpx.TransportError:
                time.sleep(0.05)
        raise SystemExit("the static server did not start")

    def __exit__(self, *_exc: object) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serving = sub.add_parser("serve", help="run the static server (used by the harness)")
    serving.add_argument("root", type=Path)
    serving.add_argument("port", type=int)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.root, args.port)
        return
    corpus = build()
    print(json.dumps(corpus.summary(), indent=2))


if __name__ == "__main__":
    main()
