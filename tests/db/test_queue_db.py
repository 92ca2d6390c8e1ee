"""The embedded queue (the ``tasks`` table with leases) over a real database."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from pixelmill.csvio import CsvLimits
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import AcceptedRequest, stage_request
from pixelmill.db.work import ImageResult, record_results, start_task
from pixelmill.domain import ErrorCode, ImageFailure, ProcessingOptions, TaskKind
from pixelmill.queue.base import TaskMessage
from pixelmill.queue.db import DbQueue
from tests.support.databases import execute_elsewhere

LEASE = 0.5


async def stage(db: Database, tmp_path: Path, rows: int, name: str = "in.csv") -> AcceptedRequest:
    """A request of ``rows`` rows with one image each, one task per row."""
    path = tmp_path / name
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
        for serial in range(1, rows + 1):
            writer.writerow([serial, f"P{serial}", f"https://img.example/{serial}.jpg"])
    return await stage_request(
        db,
        path,
        options=ProcessingOptions(),
        webhook_url=None,
        owner=None,
        limits=CsvLimits(),
        task_max_images=1,
    )


def queue(
    db: Database, owner: str, *, lease: float = LEASE, poll: float = 0.05, max_attempts: int = 10
) -> DbQueue:
    return DbQueue(
        db, owner=owner, lease_seconds=lease, poll_interval=poll, max_attempts=max_attempts
    )


async def task_row(db: Database, task_id: int) -> dict[str, Any]:
    async with db.read() as conn:
        row = (await conn.execute(select(t.tasks).where(t.tasks.c.id == task_id))).one()
    return dict(row._mapping)


async def task_ids(db: Database, request_id: str) -> list[int]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.tasks.c.id).where(t.tasks.c.request_id == request_id).order_by(t.tasks.c.id)
        )
        return list(rows.scalars())


async def test_receive_returns_tasks_in_priority_then_id_order(
    db: Database, tmp_path: Path
) -> None:
    first = await stage(db, tmp_path, 3, "first.csv")
    second = await stage(db, tmp_path, 1, "second.csv")
    first_ids = await task_ids(db, first.request_id)
    (second_id,) = await task_ids(db, second.request_id)
    # Finish the second request's only image: that queues its finalize task (priority 0).
    work = await start_task(db, second_id)
    assert work is not None
    failure = ImageFailure(ErrorCode.HTTP_ERROR, "404")
    finished = await record_results(
        db, [(second.request_id, ImageResult(work.images[0].id, 1, failure))]
    )
    assert finished == [second.request_id]
    q = queue(db, "worker-a")
    received = [await q.receive(timeout=1) for _ in range(5)]
    assert all(received)
    finalize = received[0]
    assert finalize is not None
    assert (finalize.request_id, finalize.kind, finalize.attempt) == (
        second.request_id,
        TaskKind.FINALIZE,
        1,
    )
    assert finalize.task_id > second_id
    assert [m.task_id for m in received[1:] if m] == [*first_ids, second_id]
    assert {m.kind for m in received[1:] if m} == {TaskKind.PROCESS}
    assert await q.receive(timeout=0.1) is None


async def test_receive_on_an_empty_queue_waits_for_its_timeout(db: Database) -> None:
    q = queue(db, "worker-a")
    started = time.monotonic()
    assert await q.receive(timeout=0.3) is None
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5
    assert await q.receive(timeout=0) is None


async def test_one_wake_ends_every_receive_waiting_on_an_empty_queue(db: Database) -> None:
    # The task slots of one worker share its queue: a wake (stop, or a finalize task
    # queued) must reach each of them, also one that was busy looking when it came.
    q = queue(db, "worker-a", poll=0.02)
    for _ in range(5):
        receivers = [asyncio.create_task(q.receive(timeout=30)) for _ in range(8)]
        await asyncio.sleep(0)  # let them start looking
        q.wake()
        done, late = await asyncio.wait(receivers, timeout=5)
        for task in late:
            task.cancel()
        assert not late, f"{len(late)} of 8 receives did not hear the wake"
        assert all(task.result() is None for task in done)


async def test_the_leased_task_records_its_owner_and_lease(db: Database, tmp_path: Path) -> None:
    accepted = await stage(db, tmp_path, 1)
    q = queue(db, "worker-a", lease=30)
    before = time.time()
    message = await q.receive(timeout=1)
    assert message is not None
    assert message.request_id == accepted.request_id
    row = await task_row(db, message.task_id)
    assert row["state"] == "leased"
    assert row["lease_owner"] == "worker-a"
    assert row["attempts"] == 1
    assert before + 30 <= row["lease_expires_at"] <= time.time() + 30


@pytest.mark.parametrize("separate_engines", [False, True], ids=["one-db", "two-dbs"])
async def test_two_owners_never_receive_the_same_task(
    db: Database, other_db: Database, tmp_path: Path, separate_engines: bool
) -> None:
    accepted = await stage(db, tmp_path, 20)
    qa = queue(db, "worker-a", lease=30)
    qb = queue(other_db if separate_engines else db, "worker-b", lease=30)
    results = await asyncio.gather(*(q.receive(timeout=0.3) for _ in range(13) for q in (qa, qb)))
    owners = {
        id(message): owner
        for message, owner in zip(results, ["worker-a", "worker-b"] * 13, strict=True)
    }
    messages = [m for m in results if m is not None]
    ids = [m.task_id for m in messages]
    assert len(ids) == len(set(ids)) == 20
    assert sorted(ids) == await task_ids(db, accepted.request_id)
    assert {m.attempt for m in messages} == {1}
    for message in messages:
        row = await task_row(db, message.task_id)
        assert row["lease_owner"] == owners[id(message)]
        assert row["attempts"] == 1


async def test_a_leased_task_comes_back_only_after_its_lease_expires(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a")
    qb = queue(other_db, "worker-b")
    first = await qa.receive(timeout=1)
    assert first is not None
    leased_at = time.time()
    assert first.attempt == 1
    assert await qb.receive(timeout=0) is None
    assert await qa.receive(timeout=0) is None
    # worker-a "dies": its lease runs out and worker-b takes the task (wait with a deadline).
    second = await qb.receive(timeout=10)
    assert second is not None
    assert time.time() - leased_at >= LEASE - 0.01
    assert (second.task_id, second.request_id, second.kind) == (
        first.task_id,
        first.request_id,
        first.kind,
    )
    assert second.attempt == 2
    row = await task_row(db, second.task_id)
    assert (row["lease_owner"], row["attempts"], row["state"]) == ("worker-b", 2, "leased")


async def test_renew_by_the_owner_keeps_the_task(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a")
    qb = queue(other_db, "worker-b")
    message = await qa.receive(timeout=1)
    assert message is not None
    expires = (await task_row(db, message.task_id))["lease_expires_at"]
    assert await qa.renew(message)
    renewed = (await task_row(db, message.task_id))["lease_expires_at"]
    assert renewed > expires

    # Keep renewing (a heartbeat) for three lease lengths: worker-b never gets the task.
    stop = asyncio.Event()
    renewals: list[bool] = []

    async def heartbeat() -> None:
        while not stop.is_set():
            renewals.append(await qa.renew(message))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LEASE / 5)

    beat = asyncio.create_task(heartbeat())
    try:
        assert await qb.receive(timeout=3 * LEASE) is None
    finally:
        stop.set()
        await beat
    assert renewals and all(renewals)
    row = await task_row(db, message.task_id)
    assert (row["lease_owner"], row["attempts"]) == ("worker-a", 1)


async def test_renew_by_a_non_owner_fails(db: Database, other_db: Database, tmp_path: Path) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a", lease=30)
    qb = queue(other_db, "worker-b", lease=30)
    message = await qa.receive(timeout=1)
    assert message is not None
    expires = (await task_row(db, message.task_id))["lease_expires_at"]
    assert not await qb.renew(message)
    row = await task_row(db, message.task_id)
    assert (row["lease_owner"], row["lease_expires_at"]) == ("worker-a", expires)


async def test_renew_after_another_owner_took_the_task_fails(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a")
    qb = queue(other_db, "worker-b", lease=30)
    lost = await qa.receive(timeout=1)
    assert lost is not None
    taken = await qb.receive(timeout=10)
    assert taken is not None and taken.task_id == lost.task_id
    assert not await qa.renew(lost)
    # A late ack, retry or release by the old owner changes nothing either.
    await qa.ack(lost)
    await qa.retry(lost, 0, "late")
    await qa.release(lost)
    row = await task_row(db, taken.task_id)
    assert (row["state"], row["lease_owner"], row["attempts"], row["last_error"]) == (
        "leased",
        "worker-b",
        2,
        None,
    )
    assert await qb.renew(taken)


async def test_ack_makes_the_task_never_come_back(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a")
    qb = queue(other_db, "worker-b")
    message = await qa.receive(timeout=1)
    assert message is not None
    await qa.ack(message)
    row = await task_row(db, message.task_id)
    assert (row["state"], row["lease_owner"], row["lease_expires_at"]) == ("done", None, None)
    # Well past the lease it had: still nobody gets it.
    assert await qb.receive(timeout=1.5 * LEASE) is None
    assert await qa.receive(timeout=0) is None
    assert not await qa.renew(message)
    assert (await task_row(db, message.task_id))["state"] == "done"


async def test_ack_by_a_non_owner_does_nothing(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a", lease=30)
    qb = queue(other_db, "worker-b", lease=30)
    message = await qa.receive(timeout=1)
    assert message is not None
    await qb.ack(message)
    assert (await task_row(db, message.task_id))["state"] == "leased"
    assert await qa.renew(message)


async def test_retry_with_a_delay_comes_back_only_after_the_delay(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a", lease=30)
    qb = queue(other_db, "worker-b", lease=30)
    message = await qa.receive(timeout=1)
    assert message is not None
    delay = 0.6
    retried_at = time.time()
    await qa.retry(message, delay, "timeout fetching https://img.example/1.jpg")
    row = await task_row(db, message.task_id)
    assert (row["state"], row["lease_owner"], row["last_error"]) == (
        "queued",
        None,
        "timeout fetching https://img.example/1.jpg",
    )
    assert await qb.receive(timeout=0) is None
    again = await qb.receive(timeout=10)
    assert again is not None
    assert time.time() - retried_at >= delay - 0.01
    assert (again.task_id, again.attempt) == (message.task_id, 2)


async def test_retry_keeps_a_bounded_error(db: Database, tmp_path: Path) -> None:
    await stage(db, tmp_path, 1)
    q = queue(db, "worker-a")
    message = await q.receive(timeout=1)
    assert message is not None
    await q.retry(message, 0, "x" * 10_000)
    assert len((await task_row(db, message.task_id))["last_error"]) == 2000


async def test_retry_past_max_attempts_marks_the_task_dead(db: Database, tmp_path: Path) -> None:
    await stage(db, tmp_path, 1)
    q = queue(db, "worker-a", max_attempts=3)
    attempts = []
    while (message := await q.receive(timeout=0.5)) is not None:
        attempts.append(message.attempt)
        await q.retry(message, 0, f"failure {message.attempt}")
    assert attempts == [1, 2, 3]
    task_id = await _only_task(db)
    row = await task_row(db, task_id)
    assert (row["state"], row["attempts"], row["last_error"], row["lease_owner"]) == (
        "dead",
        3,
        "failure 3",
        None,
    )
    assert await q.receive(timeout=0) is None


async def _only_task(db: Database) -> int:
    async with db.read() as conn:
        return (await conn.execute(select(t.tasks.c.id))).scalar_one()


async def test_release_returns_the_task_at_once_without_counting_the_attempt(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    await stage(db, tmp_path, 1)
    qa = queue(db, "worker-a", lease=30)
    qb = queue(other_db, "worker-b", lease=30)
    message = await qa.receive(timeout=1)
    assert message is not None
    await qa.release(message)
    row = await task_row(db, message.task_id)
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("queued", None, 0)
    again = await qb.receive(timeout=0)
    assert again is not None
    assert (again.task_id, again.attempt) == (message.task_id, 1)


async def test_wake_makes_a_waiting_receive_return_promptly(db: Database, tmp_path: Path) -> None:
    q = queue(db, "worker-a", poll=60)  # left alone, it would look again only after 60 s
    waiting = asyncio.create_task(q.receive(timeout=30))
    # It looks, finds the queue empty and settles down to wait.
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done
    accepted = await stage(db, tmp_path, 1)
    # Stored but not announced: the receiver keeps waiting.
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done
    woken = time.monotonic()
    q.wake()
    message: TaskMessage | None = await asyncio.wait_for(waiting, timeout=5)
    assert time.monotonic() - woken < 2
    assert message is not None
    assert message.request_id == accepted.request_id


async def test_a_wake_during_a_look_is_not_lost(db: Database, tmp_path: Path) -> None:
    """A task stored and announced while the receiver is looking must not wait a poll."""
    accepted = await stage(db, tmp_path, 1)
    # Take the task away (from another connection, as it were): the queue looks empty.
    execute_elsewhere(db.url, "UPDATE tasks SET state = 'hold'")
    q = queue(db, "worker-a", poll=60)
    fired: list[str] = []

    def store_and_wake() -> None:
        """Another coroutine stores a task and wakes the queue (both committed, then wake)."""
        execute_elsewhere(db.url, "UPDATE tasks SET state = 'queued'")
        q.wake()
        fired.append("wake")

    # Deterministic interleaving: right after the receiver's read of the tasks table has
    # run (its snapshot taken, finding nothing), the task is stored and wake() is called.
    def after_execute(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not fired and statement.lstrip().upper().startswith("SELECT") and "tasks" in statement:
            store_and_wake()

    event.listen(db.reader.sync_engine, "after_cursor_execute", after_execute)
    try:
        waiting = asyncio.create_task(q.receive(timeout=30))
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        if not fired:  # the receiver never read through the reader: wake it the plain way
            assert not done
            store_and_wake()
        started = time.monotonic()
        message = await asyncio.wait_for(asyncio.shield(waiting), timeout=1.5)
    except TimeoutError:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        raise AssertionError("the wake-up was lost: receive waits for its next poll") from None
    finally:
        event.remove(db.reader.sync_engine, "after_cursor_execute", after_execute)
    assert time.monotonic() - started < 1.5
    assert message is not None and message.request_id == accepted.request_id
