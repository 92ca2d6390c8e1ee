"""Webhook deliveries in a real database: queued with the close, claimed exclusively."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from sqlalchemy import select, update

from pixelmill.csvio import CsvLimits
from pixelmill.db import deliveries
from pixelmill.db import tables as t
from pixelmill.db.engine import Database
from pixelmill.db.ingest import stage_request
from pixelmill.db.work import ImageResult, close_request, record_results, start_task
from pixelmill.domain import ErrorCode, ImageFailure, ProcessingOptions

HOOK = "https://hooks.example/done"


async def finished_request(
    db: Database, tmp_path: Path, webhook_url: str | None = HOOK, name: str = "in.csv"
) -> str:
    """A request whose one image has failed, ready to be closed."""
    path = tmp_path / name
    path.write_text("S. No.,Product Name,Input Image Urls\n1,Mug,https://img.example/1.jpg\n")
    accepted = await stage_request(
        db,
        path,
        options=ProcessingOptions(),
        webhook_url=webhook_url,
        owner=None,
        limits=CsvLimits(),
        task_max_images=64,
    )
    async with db.read() as conn:
        task_id = (
            await conn.execute(
                select(t.tasks.c.id).where(t.tasks.c.request_id == accepted.request_id)
            )
        ).scalar_one()
    work = await start_task(db, task_id)
    assert work is not None
    failure = ImageFailure(ErrorCode.HTTP_ERROR, "HTTP 404")
    result = ImageResult(work.images[0].id, 1, failure)
    assert await record_results(db, [(accepted.request_id, result)]) == [accepted.request_id]
    return accepted.request_id


async def test_closing_queues_the_delivery_in_the_same_transaction(
    db: Database, tmp_path: Path
) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await deliveries.get_delivery(db, request_id) is None, "nothing before the close"
    csv_url = "http://files.example/out.csv"
    assert await close_request(db, request_id, "out.csv", csv_url)
    delivery = await deliveries.get_delivery(db, request_id)
    assert delivery.state == "pending" and delivery.attempts == 0
    assert delivery.url == HOOK and delivery.webhook_id == f"msg_{request_id}"
    assert delivery.next_attempt_at <= time.time()
    event = json.loads(delivery.body)
    assert event == {
        "type": "request.finished",
        "request_id": request_id,
        "status": "failed",
        "progress": {"total": 1, "pending": 0, "processing": 0, "completed": 0, "failed": 1},
        "output_csv_url": csv_url,
        "created_at": event["created_at"],
        "finished_at": event["finished_at"],
        "message": "all 1 image(s) failed",
    }
    assert event["created_at"].endswith("Z") and event["finished_at"].endswith("Z")
    assert event["created_at"] <= event["finished_at"]

    assert not await close_request(db, request_id, "out.csv", csv_url)
    async with db.read() as conn:
        rows = (await conn.execute(select(t.webhook_deliveries.c.id))).all()
    assert len(rows) == 1, "a request is closed, and its webhook queued, once"


async def test_concurrent_closes_queue_one_delivery(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    request_id = await finished_request(db, tmp_path)
    results = await asyncio.gather(
        *(
            close_request(database, request_id, "o.csv")
            for _ in range(4)
            for database in (db, other_db)
        )
    )
    assert results.count(True) == 1
    async with db.read() as conn:
        count = len((await conn.execute(select(t.webhook_deliveries.c.id))).all())
    assert count == 1


async def test_no_webhook_url_no_delivery(db: Database, tmp_path: Path) -> None:
    request_id = await finished_request(db, tmp_path, webhook_url=None)
    assert await close_request(db, request_id, "out.csv")
    assert await deliveries.get_delivery(db, request_id) is None


async def test_two_processes_never_claim_the_same_attempt(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    ids = []
    for n in range(6):
        request_id = await finished_request(db, tmp_path, name=f"in{n}.csv")
        assert await close_request(db, request_id, "out.csv")
        ids.append(request_id)
    claims = await asyncio.gather(
        *(
            deliveries.claim_due(database, limit=2, lease_seconds=30)
            for _ in range(4)
            for database in (db, other_db)
        )
    )
    claimed = [claim.request_id for batch in claims for claim in batch]
    assert sorted(claimed) == sorted(ids), "each due delivery claimed exactly once"
    assert all(claim.attempts == 1 for batch in claims for claim in batch)
    assert await deliveries.claim_due(db, limit=10, lease_seconds=30) == []


async def test_an_expired_claim_is_taken_again_and_the_stale_holder_cannot_record(
    db: Database, other_db: Database, tmp_path: Path
) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await close_request(db, request_id, "out.csv")
    (first,) = await deliveries.claim_due(db, limit=1, lease_seconds=30)
    assert await deliveries.claim_due(other_db, limit=1, lease_seconds=30) == []
    # The first holder's process dies: its lease runs out.
    async with db.write() as conn:
        await conn.execute(update(t.webhook_deliveries).values(lease_expires_at=time.time() - 1))
    (second,) = await deliveries.claim_due(other_db, limit=1, lease_seconds=30)
    assert second.attempts == 2 and second.lease_token != first.lease_token
    stale = await deliveries.record_attempt(
        db, first, status_code=200, error=None, next_attempt_at=None
    )
    assert not stale
    assert await deliveries.record_attempt(
        other_db, second, status_code=503, error="HTTP 503", next_attempt_at=time.time() + 60
    )
    delivery = await deliveries.get_delivery(db, request_id)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("pending", 2, 503)
    assert await deliveries.claim_due(db, limit=1, lease_seconds=30) == [], "not due yet"


async def test_outcomes_move_the_state(db: Database, tmp_path: Path) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await close_request(db, request_id, "out.csv")
    (claim,) = await deliveries.claim_due(db, limit=1, lease_seconds=30)
    assert (await deliveries.get_delivery(db, request_id)).state == "delivering"
    assert await deliveries.record_attempt(
        db, claim, status_code=410, error="HTTP 410", next_attempt_at=None
    )
    gone = await deliveries.get_delivery(db, request_id)
    assert (gone.state, gone.next_attempt_at, gone.lease_token) == ("failed", None, None)

    await deliveries.redeliver(db, request_id, HOOK, "{}")
    again = await deliveries.get_delivery(db, request_id)
    assert (again.state, again.attempts, again.last_status_code) == ("pending", 0, None)
    assert json.loads(again.body)["request_id"] == request_id, "the same event is sent again"
    (claim,) = await deliveries.claim_due(db, limit=1, lease_seconds=30)
    assert await deliveries.record_attempt(
        db, claim, status_code=204, error=None, next_attempt_at=None
    )
    done = await deliveries.get_delivery(db, request_id)
    assert (done.state, done.attempts, done.last_error) == ("delivered", 1, None)
    assert done.delivered_at is not None


async def test_release_gives_the_attempt_back(db: Database, tmp_path: Path) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await close_request(db, request_id, "out.csv")
    claims = await deliveries.claim_due(db, limit=1, lease_seconds=30)
    await deliveries.release(db, claims)
    delivery = await deliveries.get_delivery(db, request_id)
    assert (delivery.state, delivery.attempts) == ("pending", 0)
    assert len(await deliveries.claim_due(db, limit=1, lease_seconds=30)) == 1


async def test_redelivering_a_request_finished_before_webhooks_existed(
    db: Database, tmp_path: Path
) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await close_request(db, request_id, "out.csv")
    async with db.write() as conn:
        await conn.execute(t.webhook_deliveries.delete())
    await deliveries.redeliver(db, request_id, HOOK, '{"type":"request.finished"}')
    delivery = await deliveries.get_delivery(db, request_id)
    assert (delivery.state, delivery.body) == ("pending", '{"type":"request.finished"}')


async def test_a_receivers_answer_with_a_nul_is_stored_written_out(
    db: Database, tmp_path: Path
) -> None:
    request_id = await finished_request(db, tmp_path)
    assert await close_request(db, request_id, "out.csv")
    (claim,) = await deliveries.claim_due(db, limit=1, lease_seconds=30)
    error = "HTTP 500: bad\x00body " + "x" * 3000
    assert await deliveries.record_attempt(
        db, claim, status_code=500, error=error, next_attempt_at=time.time() + 60
    )
    delivery = await deliveries.get_delivery(db, request_id)
    assert delivery.last_error.startswith("HTTP 500: bad\\0body x")
    assert len(delivery.last_error) == 2000 and delivery.state == "pending"
