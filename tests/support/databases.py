"""Fresh databases for tests: a SQLite file, or a new database on a live PostgreSQL.

PostgreSQL is found at ``PIXELMILL_TEST_POSTGRES_URL`` (default: the local server,
user ``postgres``, trust auth). Each test (or each module's server) gets a database of
its own, ``pixelmill_test_<pid>_<random>``, dropped when it is done.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from pixelmill.db.engine import Database
from pixelmill.db.migrate import upgrade_async

T = TypeVar("T")

ADMIN_URL_ENV = "PIXELMILL_TEST_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgres")


@asynccontextmanager
async def migrated(url: str) -> AsyncIterator[Database]:
    """The database at ``url``, brought to the latest schema and open."""
    await upgrade_async(url)
    database = Database(url)
    try:
        yield database
    finally:
        await database.close()


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end on a loop of its own, in a thread, from any context
    (a sync fixture, or an event hook called inside a running loop)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="test-database-admin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class PostgresServer:
    """A PostgreSQL server on which tests create and drop their own databases."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    @classmethod
    def from_env(cls) -> PostgresServer:
        return cls(os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL)

    @property
    def shown_url(self) -> str:
        return make_url(self.admin_url).render_as_string(hide_password=True)

    def problem(self) -> str | None:
        """Why the server cannot be used, or None when it can."""
        try:
            self.run(lambda conn: conn.fetchval("SELECT 1"))
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``work`` on a connection of its own to the database of ``admin_url``."""
        dsn = make_url(self.admin_url).set(drivername="postgresql")

        async def connected() -> T:
            conn = await asyncpg.connect(dsn.render_as_string(hide_password=False), timeout=5)
            try:
                return await work(conn)
            finally:
                await conn.close()

        return run_async(connected)

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"pixelmill_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"

        async def create(conn: asyncpg.Connection) -> None:
            # FILE_COPY (PostgreSQL 15+) copies the small template faster than WAL_LOG.
            fast = " STRATEGY FILE_COPY" if conn.get_server_version().major >= 15 else ""
            await conn.execute(f'CREATE DATABASE "{name}"{fast}')

        self.run(create)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_stale_databases(self) -> list[str]:
        """Drop the test databases of runs that died before dropping their own."""
        names = self.run(
            lambda conn: conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'pixelmill\\_test\\_%'"
            )
        )
        stale = [row["datname"] for row in names if not _alive(row["datname"].split("_")[2])]
        for name in stale:
            self.drop_database(make_url(self.admin_url).set(database=name).render_as_string())
        return stale

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database`, cutting off its connections."""
        name = make_url(url).database
        assert name and name.startswith("pixelmill_test_"), name
        self.run(lambda conn: conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _alive(pid: str) -> bool:
    """Whether the process that named a database (``pixelmill_test_<pid>_...``) still runs."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge
    return True


@contextmanager
def fresh_database(backend: str, folder: Path, server: PostgresServer | None) -> Iterator[str]:
    """The URL of a database no one has used: a SQLite file in ``folder``, or a new
    PostgreSQL database on ``server``, dropped on the way out."""
    if backend == "sqlite":
        yield f"sqlite:///{(folder / 'pixelmill.db').resolve()}"
        return
    assert backend == "postgres" and server is not None, backend
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


def execute_elsewhere(url: str, statement: str) -> None:
    """One statement committed on a connection of its own (as another process would)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        with closing(sqlite3.connect(parsed.database)) as conn, conn:
            conn.execute(statement)
        return
    PostgresServer(url).run(lambda conn: conn.execute(statement))


def terminate_other_connections(url: str) -> int:
    """Kill every server connection to the database at ``url`` (but the one asking)."""
    killed = PostgresServer(url).run(
        lambda conn: conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    )
    return int(killed)
