"""Alembic environment: runs the migrations on the async engine of the configured URL.

The whole upgrade is one transaction, and processes that start together (an api and
its workers) take turns: one migrates, the others wait for it, then find nothing to do.
SQLite takes its write lock when the transaction begins (the app's writer engine does
``BEGIN IMMEDIATE``); PostgreSQL takes an advisory lock.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from pixelmill.db.engine import Database
from pixelmill.db.tables import metadata

config = context.config

MIGRATION_LOCK_ID = 0x706978656C6D  # "pixelm", the PostgreSQL advisory lock of upgrades


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Held until the transaction ends; the version is read once it is taken.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        context.run_migrations()


async def _run_async() -> None:
    # A migration may rewrite a large table: its statements are not cut short.
    db = Database(config.get_main_option("sqlalchemy.url") or "", pool_size=1, command_timeout=None)
    try:
        async with db.writer.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await db.close()


def _run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    asyncio.run(_run_async())
