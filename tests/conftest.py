"""Shared fixtures: the image corpus, a real image host, settings on a temp data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pixelmill.config import Settings
from tests.support.image_host import ImageHost
from tests.support.images import build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def image_host(corpus: Path) -> Iterator[ImageHost]:
    host = ImageHost(corpus).start()
    yield host
    host.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded defaults on a fresh data dir, loopback sources allowed, short leases."""
    return Settings(
        data_dir=tmp_path / "data",
        allow_private_urls=True,
        lease_seconds=3,
        poll_interval=0.05,
        retry_backoff_seconds=0.05,
    )
