"""Estimate the quality a JPEG was saved at, from its quantisation tables.

Encoders built on libjpeg (almost all of them) scale the two standard tables of the
JPEG specification (Annex K) by one factor derived from the quality. We rebuild the
tables for every quality from 1 to 100 and pick the quality whose tables are nearest
to the file's, which gives the exact quality for such files and the nearest standard
quality for others: the same figure ImageMagick's ``identify -format %Q`` reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from operator import sub

from pixelmill.imaging.jpeg import read_header

# Annex K tables, in natural (row-major) order, as Pillow reports them.
_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip


def _scaled(table: Sequence[int], quality: int) -> tuple[int, ...]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(255, max(1, (value * scale + 50) // 100)) for value in table)


@cache
def _standard_tables() -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {q: (_scaled(_LUMA, q), _scaled(_CHROMA, q)) for q in range(1, 101)}


def _quality_for_scale(scale: float) -> int:
    """The inverse of the libjpeg quality scaling, rounded into 1..100."""
    quality = 5000 / scale if scale > 100 else (200 - scale) / 2
    return min(100, max(1, round(quality)))


def _distance(luma: Sequence[int], chroma: Sequence[int] | None, quality: int) -> int:
    std_luma, std_chroma = _standard_tables()[quality]
    distance = sum(map(abs, map(sub, luma, std_luma)))
    if chroma is not None:
        distance += sum(map(abs, map(sub, chroma, std_chroma)))
    return distance


def estimate_from_tables(tables: Mapping[int, Sequence[int]]) -> int | None:
    """The quality (1-100) whose standard tables are nearest to ``tables``."""
    if not tables:
        return None
    ids = sorted(tables)
    chroma = tuple(tables[ids[1]]) if len(ids) > 1 else None
    return _nearest_quality(tuple(tables[ids[0]]), chroma)


# Files from one encoder at one setting share their tables: most estimates are repeats.
@lru_cache(maxsize=256)
def _nearest_quality(luma: tuple[int, ...], chroma: tuple[int, ...] | None) -> int:
    # The mean ratio to the standard table gives the scale, hence a first guess; the
    # nearest standard tables are then searched for around it.
    scale = 100 * sum(luma) / sum(_LUMA)
    guess = _quality_for_scale(scale)
    # Tables clip at 255 below quality ~15, which makes the guess high there.
    low = 1 if guess < 20 else guess - 6
    candidates = range(low, min(100, guess + 6) + 1)
    return min(candidates, key=lambda q: (_distance(luma, chroma, q), -q))


def estimate_jpeg_quality(data: bytes) -> int | None:
    """The estimated quality of the JPEG in ``data`` (reads the header only); None when
    the header cannot be read (the decoder then reports what is wrong)."""
    header = read_header(data)
    return estimate_from_tables(header.quant_tables) if header else None
