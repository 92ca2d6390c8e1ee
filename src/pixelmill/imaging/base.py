"""The Imaging boundary: turn a source URL into a stored, processed image."""

from __future__ import annotations

from typing import Protocol

from pixelmill.domain import ImageOutcome, ProcessingOptions


class Imaging(Protocol):
    """Fetch, transform and store one image; failures come back as values."""

    async def process(
        self, source_url: str, options: ProcessingOptions, output_stem: str
    ) -> ImageOutcome:
        """Process ``source_url`` and store it under ``output_stem`` + its extension."""
        ...

    async def close(self) -> None: ...
