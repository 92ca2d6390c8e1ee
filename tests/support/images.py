"""A corpus of real image files, made from the sample photos that pixelmill ships."""

from __future__ import annotations

import io
from importlib.resources import files
from pathlib import Path

import pyvips
from PIL import Image

SAMPLES = Path(str(files("pixelmill") / "samples"))
PHOTOS = sorted(p.name for p in SAMPLES.glob("*.jpg"))


def _photo(name: str = "astronaut.jpg") -> Image.Image:
    with Image.open(SAMPLES / name) as image:
        return image.convert("RGB")


def build_corpus(root: Path) -> Path:
    """Write every test image under ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(PHOTOS):
        # Known qualities, so tests can check the estimate and the halving.
        _photo(name).save(root / name, "JPEG", quality=80 + index)
    photo = _photo("coffee.jpg")
    photo.save(root / "photo.png", "PNG")
    photo.save(root / "photo.webp", "WEBP", quality=80)
    photo.convert("L").save(root / "gray.jpg", "JPEG", quality=90)
    photo.convert("CMYK").save(root / "cmyk.jpg", "JPEG", quality=90)
    photo.putalpha(200)
    photo.save(root / "alpha.png", "PNG")
    rotated = _photo("coffee.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated.save(root / "rotated.jpg", "JPEG", quality=90, exif=exif.tobytes())
    # A small photo, for tests where the number of images matters, not their work.
    _photo("cat.jpg").resize((48, 32)).save(root / "tiny.jpg", "JPEG", quality=85)
    full = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "page.jpg").write_bytes(b"<!doctype html><html><body>not an image</body></html>")
    _pixel_bomb(root / "bomb.png")
    return root


def _pixel_bomb(path: Path) -> None:
    """A small PNG file that decodes to 400 megapixels."""
    pyvips.Image.black(20000, 20000).cast("uchar").pngsave(str(path), compression=9)


def jpeg_quality_of(data: bytes) -> int | None:
    """The quality of a JPEG as estimated by pixelmill (checked against known files)."""
    from pixelmill.imaging.quality import estimate_jpeg_quality

    return estimate_jpeg_quality(data)


def decoded_size(data: bytes) -> tuple[int, int]:
    """The (width, height) of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size
