"""An image stored by an earlier attempt is reported again, not fetched or written again."""

from __future__ import annotations

import uuid
from pathlib import Path

from pixelmill.config import Settings
from pixelmill.domain import ProcessedImage, ProcessingOptions
from pixelmill.imaging.formats import OUTPUT_EXTENSIONS
from pixelmill.imaging.inline import InlineImaging
from pixelmill.storage import LocalStorage
from tests.reliability.checks import fetches
from tests.support.image_host import ImageHost
from tests.support.writes import WriteCounter


async def test_a_second_attempt_finds_the_stored_object(
    tmp_path: Path, image_host: ImageHost
) -> None:
    storage = LocalStorage(tmp_path / "files", "http://files.test/files")
    writes = WriteCounter(storage.root).start()
    writes.make_folder("req")
    settings = Settings(data_dir=tmp_path, allow_private_urls=True)
    url = image_host.url(f"img/cat.jpg?once={uuid.uuid4().hex}")
    imaging = InlineImaging(settings, storage)
    try:
        first = await imaging.process(url, ProcessingOptions(), "req/1-1")
        # The worker that asked died before recording it: the task comes back.
        again = await imaging.process(url, ProcessingOptions(), "req/1-1")
    finally:
        await imaging.close()
        counts = writes.counts()
        writes.stop()
    assert isinstance(first, ProcessedImage) and isinstance(again, ProcessedImage)
    assert {**vars(again), "duration_ms": 0} == {**vars(first), "duration_ms": 0}
    assert fetches(image_host, url) == 1
    assert counts == {"req/1-1.jpg": 1}


async def test_a_fresh_image_is_not_looked_for(tmp_path: Path, image_host: ImageHost) -> None:
    # The worker says ``fresh`` for an image that no delivery had started: what is stored
    # under its key (here planted by hand) cannot be its result, and is not looked at.
    storage = LocalStorage(tmp_path / "files", "http://files.test/files")
    planted = {"format": "jpeg", "width": "1", "height": "1", "bytes_in": "7"}
    planted |= {"source_quality": "", "output_quality": "", "kept_source": "true"}
    storage.put_bytes_blocking("req/1-1.jpg", b"planted", "image/jpeg", planted)
    assert await storage.find("req/1-1", OUTPUT_EXTENSIONS) is not None  # whole metadata
    settings = Settings(data_dir=tmp_path, allow_private_urls=True)
    url = image_host.url(f"img/cat.jpg?fresh={uuid.uuid4().hex}")
    imaging = InlineImaging(settings, storage)
    try:
        outcome = await imaging.process(url, ProcessingOptions(), "req/1-1", fresh=True)
    finally:
        await imaging.close()
    assert isinstance(outcome, ProcessedImage) and outcome.output_key == "req/1-1.jpg"
    assert fetches(image_host, url) == 1
    assert (storage.root / "req/1-1.jpg").read_bytes() != b"planted"


async def test_an_object_stored_without_metadata_is_not_trusted(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files", "http://files.test/files")
    storage.put_bytes_blocking("req/1-1.jpg", b"older bytes", "image/jpeg")
    assert await storage.find("req/1-1", OUTPUT_EXTENSIONS) is None
    storage.put_bytes_blocking("req/1-1.png", b"png", "image/png", {"format": "png"})
    found = await storage.find("req/1-1", OUTPUT_EXTENSIONS)
    assert found is not None and (found.key, found.size) == ("req/1-1.png", 3)
    assert await storage.find("req/1-10", OUTPUT_EXTENSIONS) is None
