"""The Alembic migrations on every backend, and each engine's own settings."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import SQLITE_BUSY_TIMEOUT_MS, Database, async_url
from pixelmill.db.migrate import alembic_config, upgrade, upgrade_async
from pixelmill.oneshot import _local_settings
from pixelmill.runtime import Runtime
from tests.support.databases import execute_elsewhere, run_async

T = TypeVar("T")
TABLES = {"requests", "products", "images", "tasks", "webhook_deliveries"}


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def _look(url: str, look: Callable[[Connection], T]) -> T:
    """``look`` on a plain (sync-API) connection to the database, from outside any loop."""

    async def connected() -> T:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(look)
        finally:
            await engine.dispose()

    return run_async(connected)


def _version(url: str) -> list[str]:
    def versions(conn: Connection) -> list[str]:
        if not inspect(conn).has_table("alembic_version"):
            return []
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())

    return _look(url, versions)


def _tables(url: str) -> set[str]:
    return _look(url, lambda conn: set(inspect(conn).get_table_names()))


def _schema(url: str) -> dict[str, Any]:
    """Every table's columns, keys and indexes, as the database reports them."""

    def describe(conn: Connection) -> dict[str, Any]:
        inspector = inspect(conn)
        return {
            name: (
                [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
                inspector.get_pk_constraint(name)["constrained_columns"],
                sorted(
                    (u["name"], u["column_names"]) for u in inspector.get_unique_constraints(name)
                ),
                sorted(
                    (i["name"], i["column_names"])
                    for i in inspector.get_indexes(name)
                    if "duplicates_constraint" not in i  # PostgreSQL: a unique's own index
                ),
            )
            for name in sorted(inspector.get_table_names())
        }

    return _look(url, describe)


def test_upgrade_creates_the_sqlite_file_and_its_folders(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "pixelmill.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    assert path.is_file()
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _version(url) == [_head(url)]


def test_upgrade_creates_the_tables(database_url: str) -> None:
    upgrade(database_url)
    assert _tables(database_url) == TABLES | {"alembic_version"}
    assert _version(database_url) == [_head(database_url)]


def test_upgrade_is_idempotent(database_url: str) -> None:
    upgrade(database_url)
    before = _schema(database_url)
    execute_elsewhere(
        database_url,
        "INSERT INTO products (request_id, row_index, line, serial_number, product_name, cells)"
        " VALUES ('r1', 0, 2, '1', 'Mug', '[]')",
    )
    upgrade(database_url)
    assert _schema(database_url) == before
    assert _version(database_url) == [_head(database_url)]
    rows = _look(
        database_url,
        lambda conn: conn.execute(select(t.products.c.request_id, t.products.c.product_name)).all(),
    )
    assert [tuple(row) for row in rows] == [("r1", "Mug")]


def test_concurrent_upgrades_migrate_once(database_url: str, tmp_path: Path) -> None:
    """An api and its workers, started together, all upgrade the same fresh database."""
    env = {
        **os.environ,
        "PIXELMILL_DATA_DIR": str(tmp_path),
        "PIXELMILL_DATABASE_URL": database_url,
    }
    command = [sys.executable, "-m", "pixelmill", "db", "upgrade"]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=120)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0] * 3, outputs
    assert _version(database_url) == [_head(database_url)]
    assert _tables(database_url) == TABLES | {"alembic_version"}


def test_migrated_schema_matches_the_tables_module(database_url: str) -> None:
    upgrade(database_url)

    def differences(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, t.metadata))

    assert _look(database_url, differences) == []


async def test_a_throwaway_database_gets_the_migrated_schema(tmp_path: Path) -> None:
    # ``process`` builds its one-run database from the tables module, without Alembic.
    migrated, throwaway = (f"sqlite:///{tmp_path / name}.db" for name in ("m", "t"))
    await upgrade_async(migrated)
    runtime = await Runtime.open(Settings(database_url=throwaway), throwaway=True)
    await runtime.close()

    def indexes(url: str) -> list[tuple[str, str]]:
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            rows = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                " AND tbl_name != 'alembic_version'"
            )
            # The condition of a partial index, which the inspector does not report.
            return sorted((name, (sql or "").partition(" WHERE ")[2]) for name, sql in rows)

    expected = _schema(migrated)
    del expected["alembic_version"]
    assert _schema(throwaway) == expected
    assert indexes(throwaway) == indexes(migrated)
    assert "state IN ('queued', 'leased')" in dict(indexes(migrated))["ix_tasks_open"]


def test_migrated_indexes_and_unique_constraints(database_url: str) -> None:
    upgrade(database_url)
    schema = _schema(database_url)
    _columns, _pk, _unique, indexes = schema["tasks"]
    assert indexes == [
        ("ix_tasks_claim", ["state", "priority", "id"]),
        ("ix_tasks_open", ["priority", "id"]),
        ("ix_tasks_placement", ["published_topic", "published_partition", "published_offset"]),
        ("ix_tasks_unpublished", ["published_at"]),
    ]
    assert schema["requests"][3] == [("ix_requests_owner_created", ["owner", "created_at"])]
    assert schema["images"][2] == [("uq_images_position", ["request_id", "row_index", "position"])]
    assert schema["products"][1] == ["request_id", "row_index"]
    assert schema["webhook_deliveries"][3] == [
        ("ix_webhook_deliveries_due", ["state", "next_attempt_at"])
    ]
    assert schema["webhook_deliveries"][2] == [("uq_webhook_deliveries_request", ["request_id"])]


def test_tasks_published_before_the_placement_columns_keep_their_rows(database_url: str) -> None:
    """0004 adds where each task was published; tasks published before it have none."""
    upgrade(database_url, "0003")
    execute_elsewhere(
        database_url,
        "INSERT INTO tasks (request_id, kind, seq, first_row, last_row, image_count, state,"
        " priority, attempts, available_at, published_at, created_at) VALUES"
        " ('r1', 'process', 0, 0, 9, 10, 'queued', 1, 0, 0, 12.5, '2026-12-09 10:00:00+00')",
    )
    upgrade(database_url)
    rows = _look(
        database_url,
        lambda conn: conn.execute(
            select(
                t.tasks.c.request_id,
                t.tasks.c.published_at,
                t.tasks.c.published_topic,
                t.tasks.c.published_partition,
                t.tasks.c.published_offset,
            )
        ).all(),
    )
    assert [tuple(row) for row in rows] == [("r1", 12.5, None, None, None)]


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    upgrade(database_url)
    schema = _schema(database_url)
    command.downgrade(alembic_config(database_url), "base")
    assert _tables(database_url) == {"alembic_version"}
    assert _version(database_url) == []
    upgrade(database_url)
    assert _schema(database_url) == schema


async def test_upgrade_async_from_a_running_loop(database_url: str) -> None:
    await upgrade_async(database_url)
    assert _version(database_url) == [_head(database_url)]


@pytest.fixture
def migrated(database_url: str) -> str:
    """A migrated database (outside the event loop: Alembic runs its own)."""
    upgrade(database_url)
    return database_url


@pytest.fixture
def sqlite_migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pixelmill.db'}"
    upgrade(url)
    return url


async def test_sqlite_runs_in_wal_mode_through_database(sqlite_migrated: str) -> None:
    db = Database(sqlite_migrated)
    try:
        assert db.is_sqlite
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (
                await conn.exec_driver_sql("PRAGMA busy_timeout")
            ).scalar() == SQLITE_BUSY_TIMEOUT_MS
        async with db.write() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            await conn.execute(
                insert(t.products).values(
                    request_id="r1",
                    row_index=0,
                    line=2,
                    serial_number="1",
                    product_name="Mug",
                    cells=["1", "Mug"],
                )
            )
        async with db.read() as conn:
            rows = (await conn.execute(select(t.products.c.cells))).scalars().all()
            assert rows == [["1", "Mug"]]
    finally:
        await db.close()
    # WAL is a property of the file: a plain connection sees it too.
    path = Path(sqlite_migrated.removeprefix("sqlite:///"))
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(("setting", "level"), [("normal", 1), ("off", 0), ("full", 2)])
async def test_sqlite_syncs_as_its_setting_says(
    sqlite_migrated: str, tmp_path: Path, setting: str, level: int
) -> None:
    assert Settings(data_dir=tmp_path).sqlite_synchronous == "normal"
    settings = Settings(data_dir=tmp_path, database_url=sqlite_migrated, sqlite_synchronous=setting)
    runtime = await Runtime.open(settings)
    try:
        async with runtime.db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == level
        async with runtime.db.write() as conn:
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == level
    finally:
        await runtime.close()


def test_the_one_shot_database_is_never_synced(tmp_path: Path) -> None:
    # It is deleted at the end of the run, and of no use after a crash.
    local = _local_settings(Settings(data_dir=tmp_path), tmp_path / "state", tmp_path / "out")
    assert local.sqlite_synchronous == "off"
    assert local.database_url.startswith(f"sqlite:///{tmp_path / 'state'}")


async def test_postgresql_reads_are_read_only_snapshots(migrated: str) -> None:
    db = Database(migrated)
    try:
        if db.is_sqlite:
            pytest.skip("SQLite reads are plain deferred transactions")
        async with db.read() as conn:
            level = (await conn.exec_driver_sql("SHOW transaction_isolation")).scalar()
            assert level == "repeatable read"
            first = (await conn.execute(select(t.products.c.request_id))).all()
            # A commit from elsewhere in the middle of the read is not seen by it.
            execute_elsewhere(
                migrated,
                "INSERT INTO products (request_id, row_index, line, serial_number,"
                " product_name, cells) VALUES ('r1', 0, 2, '1', 'Mug', '[]')",
            )
            assert (await conn.execute(select(t.products.c.request_id))).all() == first == []
        with pytest.raises(DBAPIError, match="read-only"):
            async with db.read() as conn:
                await conn.execute(t.products.delete())
        async with db.read() as conn:
            assert (await conn.execute(select(t.products.c.request_id))).scalars().all() == ["r1"]
    finally:
        await db.close()


async def test_a_reader_is_not_blocked_by_an_open_write(migrated: str) -> None:
    """A reader runs beside an open write transaction and sees the last commit."""
    db = Database(migrated)
    try:
        async with db.write() as conn:
            await conn.execute(
                insert(t.products).values(
                    request_id="r1",
                    row_index=0,
                    line=2,
                    serial_number="1",
                    product_name="Mug",
                    cells=[],
                )
            )
            async with db.read() as reader:
                assert (await reader.execute(select(t.products.c.request_id))).all() == []
        async with db.read() as reader:
            assert (await reader.execute(select(t.products.c.request_id))).scalars().all() == ["r1"]
    finally:
        await db.close()
