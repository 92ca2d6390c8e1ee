"""Units of work that survive a lost connection, and errors that are not retried."""

from __future__ import annotations

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from pixelmill.db import engine
from pixelmill.db import tables as t
from pixelmill.db.engine import (
    Database,
    UnsupportedDatabaseError,
    async_url,
    is_transient,
    retry_transient,
)
from tests.support.databases import execute_elsewhere, terminate_other_connections


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "RETRY_BASE_DELAY", 0.0)


def _product(request_id: str) -> dict[str, object]:
    return {
        "request_id": request_id,
        "row_index": 0,
        "line": 2,
        "serial_number": "1",
        "product_name": "Mug",
        "cells": [],
    }


async def _request_ids(db: Database) -> list[str]:
    async with db.read() as conn:
        rows = await conn.execute(select(t.products.c.request_id).order_by("request_id"))
        return list(rows.scalars())


def _needs_a_server(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite has no server whose connections could be cut")


async def test_a_unit_of_work_cut_off_mid_transaction_is_run_again(db: Database) -> None:
    _needs_a_server(db)
    tries: list[int] = []

    @retry_transient
    async def unit() -> None:
        async with db.write() as conn:
            pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
            tries.append(pid)
            await conn.execute(insert(t.products).values(_product(f"try-{len(tries)}")))
            if len(tries) == 1:
                # The server drops the connection in the middle of the transaction.
                execute_elsewhere(db.url, f"SELECT pg_terminate_backend({pid})")
            await conn.execute(insert(t.products).values(_product(f"try-{len(tries)}-b")))

    await unit()
    assert len(tries) == 2 and tries[0] != tries[1], "run again, on a new connection"
    assert await _request_ids(db) == ["try-2", "try-2-b"], "the cut-off try left nothing"


async def test_connections_killed_while_idle_are_replaced_before_use(db: Database) -> None:
    _needs_a_server(db)
    async with db.write() as conn:
        await conn.execute(insert(t.products).values(_product("r1")))
    assert await _request_ids(db) == ["r1"]  # the pool now holds an idle connection
    assert terminate_other_connections(db.url) >= 1
    # Pre-ping finds the dead connection at checkout and opens another: no error at all.
    assert await _request_ids(db) == ["r1"]


async def test_an_error_of_the_work_itself_is_not_retried(db: Database) -> None:
    tries = 0

    @retry_transient
    async def unit() -> None:
        nonlocal tries
        tries += 1
        async with db.write() as conn:
            await conn.execute(insert(t.products).values(_product("same")))

    await unit()
    with pytest.raises(IntegrityError) as info:
        await unit()
    assert not is_transient(info.value)
    assert tries == 2, "a duplicate key is the work's own error: not tried again"
    async with db.read() as conn:
        count = (await conn.execute(select(func.count()).select_from(t.products))).scalar_one()
    assert count == 1


def test_a_connection_closed_while_the_pool_sets_it_up_is_transient() -> None:
    """asyncpg raises its own error there, unwrapped; its misuse errors stay final."""
    import asyncpg

    assert is_transient(asyncpg.InterfaceError("connection is closed"))
    assert not is_transient(asyncpg.InterfaceError("another operation is in progress"))
    assert not is_transient(ValueError("connection is closed"))


async def test_retries_give_up_after_the_last_attempt(no_waits: None) -> None:
    tries = 0

    @retry_transient
    async def unit() -> str:
        nonlocal tries
        tries += 1
        raise ConnectionRefusedError("the server is away")

    with pytest.raises(ConnectionRefusedError):
        await unit()
    assert tries == engine.RETRY_ATTEMPTS


async def test_a_transient_failure_then_success_returns_the_result(no_waits: None) -> None:
    tries = 0

    @retry_transient
    async def unit(value: int) -> int:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise ConnectionResetError("reset by peer")
        return value * 2

    assert await unit(21) == 42
    assert tries == 3


def test_database_urls_name_their_async_driver() -> None:
    assert async_url("sqlite:///data/pixelmill.db") == "sqlite+aiosqlite:///data/pixelmill.db"
    assert async_url("postgresql://u:p@db:5432/pm") == "postgresql+asyncpg://u:p@db:5432/pm"
    assert async_url("postgres://u@db/pm?ssl=require") == "postgresql+asyncpg://u@db/pm?ssl=require"
    with pytest.raises(UnsupportedDatabaseError, match="use sqlite:///PATH or postgresql://"):
        async_url("mysql://u@db/pm")
