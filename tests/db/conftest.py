"""Fixtures of the database suites: a migrated database and engines on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pixelmill.config import Settings
from pixelmill.db.engine import Database
from pixelmill.db.migrate import upgrade


@pytest.fixture
def migrated(settings: Settings) -> str:
    """The URL of this test's database, migrated to the head revision."""
    upgrade(settings.database_url)  # outside the event loop: Alembic runs its own
    return settings.database_url


@pytest.fixture
async def db(migrated: str) -> AsyncIterator[Database]:
    database = Database(migrated)
    yield database
    await database.close()


@pytest.fixture
async def other_db(migrated: str) -> AsyncIterator[Database]:
    """A second set of engines on the same database, as another worker process would have."""
    database = Database(migrated)
    yield database
    await database.close()
