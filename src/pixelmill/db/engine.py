"""Connections to the database named by ``PIXELMILL_DATABASE_URL``.

SQLite runs in WAL mode with a busy timeout; writes take the lock up front
(``BEGIN IMMEDIATE``) and are serialised inside the process, so a reader never upgrades
into a "database is locked" error. PostgreSQL (asyncpg) uses one pool with pre-ping, so
a connection the server dropped while it sat idle is replaced before use; reads run in
read-only REPEATABLE READ transactions (one snapshot across their statements). A unit of
work that is safe to repeat can be marked :func:`retry_transient` to survive a
connection lost in the middle of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pixelmill.logs import brief

if TYPE_CHECKING:
    from pixelmill.config import SqliteSynchronous

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Writers in other processes (worker processes, a separate api) wait this long for the
# write lock; one upload of a million rows holds it for tens of seconds.
SQLITE_BUSY_TIMEOUT_MS = 300_000
# A unit of work marked retry_transient runs at most this often, waiting about
# 0.1, 0.3, 0.9 and 2 s between tries: long enough for a pool to reconnect, short
# enough that a server that stays down is reported (and the task retried) soon.
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.1
RETRY_MAX_DELAY = 2.0
# SQLSTATEs that say nothing about the work itself: serialization failure, deadlock,
# the connection exception class (08...), and the server shutting down or starting up.
_TRANSIENT_SQLSTATES = ("40001", "40P01", "08", "57P01", "57P02", "57P03")
# PostgreSQL: how long one statement may take. Without a limit a server that goes
# silent (a network partition, a frozen VM) holds a statement for as long as TCP takes
# to notice, two hours by default; past it the statement fails with TimeoutError,
# which counts as transient. A new connection takes milliseconds, or a handshake more
# with TLS: it may take as long as a statement, at most 10 s, even where statements
# are not bounded.
COMMAND_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",  # the spelling of many hosted-database URLs
}


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


def _sqlite_pragmas(dbapi_connection: Any, synchronous: SqliteSynchronous) -> None:
    # Take over transaction control from the driver so BEGIN is ours to issue.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.close()


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of a SQLite database file; other URLs are left alone."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def is_transient(exc: BaseException) -> bool:
    """True for a failure of the connection or a lost race, not of the statement.

    A lost connection (the pool invalidated it), a server restart, a deadlock or a
    serialization failure: the transaction did not happen, or (when the connection
    dropped during COMMIT) it is unknown whether it did.
    """
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return str(getattr(exc.orig, "sqlstate", "") or "").startswith(_TRANSIENT_SQLSTATES)
    return isinstance(exc, OSError) or _closed_while_connecting(exc)  # OSError: the network


def _closed_while_connecting(exc: BaseException) -> bool:
    """asyncpg's own error for a connection that closed while the pool set it up (the
    setup runs outside SQLAlchemy's wrapping); looked up only once asyncpg is loaded,
    so that SQLite-only processes do not import it."""
    asyncpg = sys.modules.get("asyncpg")
    return (
        asyncpg is not None
        and isinstance(exc, asyncpg.InterfaceError)
        and "connection is closed" in str(exc)
    )


def retry_transient(
    unit: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run the unit of work again, on a fresh connection, when it fails transiently.

    Only for units that are safe to repeat: whether an earlier try committed or not,
    running it again must leave the same state (conditional, idempotent writes).
    """

    @functools.wraps(unit)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        attempt = 1
        while True:
            try:
                return await unit(*args, **kwargs)
            except Exception as exc:
                if attempt >= RETRY_ATTEMPTS or not is_transient(exc):
                    raise
                delay = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 3 ** (attempt - 1))
                delay *= random.uniform(0.75, 1.25)
                log.warning(
                    "%s: transient database failure (%s); try %d of %d in %.2fs",
                    unit.__qualname__, brief(exc), attempt + 1, RETRY_ATTEMPTS, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                attempt += 1

    return run


class Database:
    """The engines of one database, with ``read()`` and ``write()`` units of work.

    ``sqlite_synchronous`` is SQLite's ``PRAGMA synchronous`` (``off``, ``normal``,
    ``full``); other databases ignore it. ``command_timeout`` bounds each statement on
    PostgreSQL (None: no bound); SQLite has no network to lose.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        sqlite_synchronous: SqliteSynchronous = "normal",
        command_timeout: float | None = COMMAND_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        driver_url = async_url(url)
        if self.is_sqlite:
            ensure_sqlite_dir(url)
            # The writers' page cache is large: big uploads update large indexes.
            self.writer = self._sqlite_engine(
                driver_url, "BEGIN IMMEDIATE", sqlite_synchronous, pool_size=2, cache_kib=65536
            )
            self.reader = self._sqlite_engine(
                driver_url, "BEGIN", sqlite_synchronous, pool_size=pool_size
            )
        else:
            connect_timeout = min(command_timeout or math.inf, CONNECT_TIMEOUT_SECONDS)
            self.writer = create_async_engine(
                driver_url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                connect_args={
                    "command_timeout": command_timeout,
                    "timeout": connect_timeout,
                },
            )
            # The same pool; its transactions see one snapshot and cannot write.
            self.reader = self.writer.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @staticmethod
    def _sqlite_engine(
        url: str,
        begin: str,
        synchronous: SqliteSynchronous,
        *,
        pool_size: int,
        cache_kib: int = 2048,
    ) -> AsyncEngine:
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)

        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            _sqlite_pragmas(dbapi_connection, synchronous)

        event.listen(engine.sync_engine, "connect", _pragmas)

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
        if self.reader.sync_engine.pool is not self.writer.sync_engine.pool:
            await self.reader.dispose()
