"""The Alembic migrations against a real SQLite file, and the SQLite engine settings."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, insert, inspect, select

from pixelmill.config import Settings
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.migrate import alembic_config, upgrade, upgrade_async

TABLES = {"requests", "products", "images", "tasks", "webhook_deliveries"}


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def _version(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn, conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


def _schema(path: Path) -> list[tuple[str, str, str]]:
    with closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name"
        ).fetchall()


def test_upgrade_creates_the_file_and_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "pixelmill.db"
    url = _url(path)
    upgrade(url)
    assert path.is_file()
    names = set(inspect(create_engine(url)).get_table_names())
    assert names == TABLES | {"alembic_version"}
    assert _version(path) == [_head(url)]


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "pixelmill.db"
    url = _url(path)
    upgrade(url)
    before = _schema(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO products (request_id, row_index, line, serial_number, product_name, cells)"
            " VALUES ('r1', 0, 2, '1', 'Mug', '[]')"
        )
    upgrade(url)
    assert _schema(path) == before
    assert _version(path) == [_head(url)]
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT request_id, product_name FROM products").fetchall() == [
            ("r1", "Mug")
        ]


def test_migrated_schema_matches_the_tables_module(tmp_path: Path) -> None:
    url = _url(tmp_path / "pixelmill.db")
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, t.metadata) == []
    finally:
        engine.dispose()


def test_migrated_indexes_and_unique_constraints(tmp_path: Path) -> None:
    url = _url(tmp_path / "pixelmill.db")
    upgrade(url)
    inspector = inspect(create_engine(url))
    assert {i["name"]: i["column_names"] for i in inspector.get_indexes("tasks")} == {
        "ix_tasks_claim": ["state", "priority", "id"],
        "ix_tasks_unpublished": ["published_at"],
    }
    assert {i["name"] for i in inspector.get_indexes("requests")} == {"ix_requests_owner_created"}
    assert {u["name"]: u["column_names"] for u in inspector.get_unique_constraints("images")} == {
        "uq_images_position": ["request_id", "row_index", "position"]
    }
    assert inspector.get_pk_constraint("products")["constrained_columns"] == [
        "request_id",
        "row_index",
    ]
    assert {i["name"]: i["column_names"] for i in inspector.get_indexes("webhook_deliveries")} == {
        "ix_webhook_deliveries_due": ["state", "next_attempt_at"]
    }
    assert {
        u["name"]: u["column_names"] for u in inspector.get_unique_constraints("webhook_deliveries")
    } == {"uq_webhook_deliveries_request": ["request_id"]}


def test_downgrade_to_base_and_upgrade_again(tmp_path: Path) -> None:
    path = tmp_path / "pixelmill.db"
    url = _url(path)
    upgrade(url)
    schema = _schema(path)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(create_engine(url)).get_table_names()) == {"alembic_version"}
    assert _version(path) == []
    upgrade(url)
    assert _schema(path) == schema


async def test_upgrade_async_from_a_running_loop(tmp_path: Path) -> None:
    path = tmp_path / "pixelmill.db"
    await upgrade_async(_url(path))
    assert _version(path) == [_head(_url(path))]


@pytest.fixture
def migrated(settings: Settings) -> str:
    """The database URL of ``settings``, migrated (outside the event loop: Alembic runs its own)."""
    upgrade(settings.database_url)
    return settings.database_url


async def test_sqlite_runs_in_wal_mode_through_database(migrated: str) -> None:
    db = Database(migrated)
    try:
        assert db.is_sqlite
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30_000
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
    path = Path(migrated.removeprefix("sqlite:///"))
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_reader_is_not_blocked_by_an_open_write(migrated: str) -> None:
    """WAL: a reader runs beside an open write transaction and sees the last commit."""
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
