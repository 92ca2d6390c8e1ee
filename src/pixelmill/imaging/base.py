"""The Imaging boundary: turn a source URL into a stored, processed image."""

from __future__ import annotations

from typing import Protocol

from pixelmill.domain import ImageOutcome, ProcessingOptions


class ImagingUnavailableError(Exception):
    """No imaging service could take the image: not a failure of the image itself.

    The worker waits for the service (with backoff) instead of spending an attempt.
    """


class Imaging(Protocol):
    """Fetch, transform and store one image; failures come back as values.

    Raises :class:`ImagingUnavailableError` when the image could not be handed to any
    imaging service, so that an outage never fails an image.
    """

    async def process(
        self, source_url: str, options: ProcessingOptions, output_stem: str, *, fresh: bool = False
    ) -> ImageOutcome:
        """Process ``source_url`` and store it under ``output_stem`` + its extension.

        ``fresh`` says that no earlier attempt can have stored this image (its first try,
        and it was still ``pending`` when its task was taken): an implementation may then
        skip looking for what an earlier attempt stored. Without it, that look comes first.
        """
        ...

    async def close(self) -> None: ...
