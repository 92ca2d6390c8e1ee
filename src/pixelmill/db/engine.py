"""Connections to the database named by ``PIXELMILL_DATABASE_URL``.

SQLite runs in WAL mode with a busy timeout; writes take the lock up front
(``BEGIN IMMEDIATE``) and are serialised inside the process, so a reader never upgrades
into a "database is locked" error. PostgreSQL uses one pooled engine with pre-ping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


class UnsupportedDatabaseError(ValueError):
    """The database URL names a database pixelmill cannot use."""


def async_url(url: str) -> str:
    """Turn ``sqlite:///x`` or ``postgresql://...`` into the URL of its async driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise UnsupportedDatabaseError(
            f"PIXELMILL_DATABASE_URL={url!r}: unsupported database {backend!r}; "
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        )
    return parsed.set(drivername=_ASYNC_DRIVERS[backend]).render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Take over transaction control from the driver so BEGIN is ours to issue.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of a SQLite database file; other URLs are left alone."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


class Database:
    """The engines of one database, with ``read()`` and ``write()`` units of work."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        driver_url = async_url(url)
        if self.is_sqlite:
            ensure_sqlite_dir(url)
            # The writers' page cache is large: big uploads update large indexes.
            self.writer = self._sqlite_engine(
                driver_url, "BEGIN IMMEDIATE", pool_size=2, cache_kib=65536
            )
            self.reader = self._sqlite_engine(driver_url, "BEGIN", pool_size=pool_size)
        else:
            self.writer = create_async_engine(
                driver_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
            self.reader = self.writer
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @staticmethod
    def _sqlite_engine(
        url: str, begin: str, *, pool_size: int, cache_kib: int = 2048
    ) -> AsyncEngine:
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)

        def _cache(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.cursor().execute(f"PRAGMA cache_size=-{cache_kib}")

        event.listen(engine.sync_engine, "connect", _cache)

        def _begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)

        event.listen(engine.sync_engine, "begin", _begin)
        return engine

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that may write; committed on success, rolled back on error."""
        lock: AbstractAsyncContextManager[Any] = self._write_lock or nullcontext()
        async with lock, self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a consistent snapshot)."""
        async with self.reader.begin() as conn:
            yield conn

    async def close(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
