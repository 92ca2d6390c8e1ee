"""CPU per image of each codec on the corpus: one thread, bytes in memory, no I/O.

Decode + re-encode at quality 50 with pyvips (the libvips of pyvips-binary, which
pixelmill uses for every image but a JPEG that stays a JPEG), simplejpeg (which it uses
for those), OpenCV and Pillow (which img2dataset uses), each part alone, and
pixelmill's whole ``process_image`` and two of its steps. CPU time of the process
(libvips worker threads included), so other load on the machine matters little.
Usage: ``.venv/bin/python benchmarks/codecs.py``; writes ``results/codecs.json``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import corpus

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    import cv2
    import numpy as np
    import pyvips
    import simplejpeg
    from PIL import Image

    from pixelmill.domain import ProcessingOptions
    from pixelmill.imaging.ops import ImageLimits, process_image
    from pixelmill.imaging.quality import estimate_jpeg_quality
    from pixelmill.imaging.strip import without_metadata

    pyvips.cache_set_max(0)
    pyvips.concurrency_set(1)
    cv2.setNumThreads(1)
    blobs = [(corpus.build().root / name).read_bytes() for name in corpus.build().files]
    decoded_vips = [pyvips.Image.new_from_buffer(b, "").copy_memory() for b in blobs]
    decoded_cv2 = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED) for b in blobs]
    spaces = ["GRAY" if simplejpeg.decode_jpeg_header(b)[2] == "Gray" else "RGB" for b in blobs]
    decoded_simple = [
        simplejpeg.decode_jpeg(b, colorspace=s) for b, s in zip(blobs, spaces, strict=True)
    ]
    options, limits = ProcessingOptions(), ImageLimits()

    def simple_decode(i: int) -> object:
        return simplejpeg.decode_jpeg(blobs[i], colorspace=spaces[i])

    def simple_encode(i: int, pixels: object) -> object:
        sampling = "Gray" if spaces[i] == "GRAY" else "420"
        return simplejpeg.encode_jpeg(pixels, 50, colorspace=spaces[i], colorsubsampling=sampling)

    def vips_both(i: int) -> object:
        image = pyvips.Image.new_from_buffer(blobs[i], "", access="sequential")
        return image.jpegsave_buffer(Q=50)

    def pillow_both(i: int) -> object:
        out = io.BytesIO()
        with Image.open(io.BytesIO(blobs[i])) as image:
            image.save(out, "JPEG", quality=50)
        return out

    def cv2_decode(i: int) -> object:
        return cv2.imdecode(np.frombuffer(blobs[i], np.uint8), cv2.IMREAD_UNCHANGED)

    cases: dict[str, Callable[[int], object]] = {
        "pyvips decode+encode": vips_both,
        "pyvips decode": lambda i: pyvips.Image.new_from_buffer(
            blobs[i], "", access="sequential"
        ).write_to_memory(),
        "pyvips encode": lambda i: decoded_vips[i].jpegsave_buffer(Q=50),
        "simplejpeg decode+encode": lambda i: simple_encode(i, simple_decode(i)),
        "simplejpeg decode": simple_decode,
        "simplejpeg encode": lambda i: simple_encode(i, decoded_simple[i]),
        "Pillow decode+encode": pillow_both,
        "Pillow decode": lambda i: Image.open(io.BytesIO(blobs[i])).load(),
        "OpenCV decode+encode": lambda i: cv2.imencode(
            ".jpg", cv2_decode(i), [cv2.IMWRITE_JPEG_QUALITY, 50]
        ),
        "OpenCV decode": cv2_decode,
        "OpenCV encode": lambda i: cv2.imencode(
            ".jpg", decoded_cv2[i], [cv2.IMWRITE_JPEG_QUALITY, 50]
        ),
        "pixelmill process_image": lambda i: process_image(
            blobs[i], options, limits, time.monotonic() + 60
        ),
        "pixelmill estimate_jpeg_quality": lambda i: estimate_jpeg_quality(blobs[i]),
        "pixelmill without_metadata": lambda i: without_metadata(blobs[i], "jpeg", 1),
    }
    results = {}
    for name, case in cases.items():
        case(0)
        started = time.process_time()
        for _ in range(3):
            for i in range(len(blobs)):
                case(i)
        ms = (time.process_time() - started) / (3 * len(blobs)) * 1000
        results[name] = round(ms, 2)
        print(f"{name:34s} {ms:6.2f} ms CPU per image")
    versions = {
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        "simplejpeg": simplejpeg.__version__,
        "opencv": cv2.__version__,
        "pillow": Image.__version__,
    }
    (RESULTS / "codecs.json").write_text(
        json.dumps({"ms_cpu_per_image": results, "versions": versions}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
