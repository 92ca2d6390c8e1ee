"""Webhook deliveries in the database: queued with the close, claimed when due.

A delivery is inserted by the transaction that closes its request, so a finished
request can never lack its webhook. Senders claim due deliveries with one conditional
UPDATE that sets a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two processes
never make the same attempt at once; an attempt whose sender died is claimed again
once its lease expires. Results are recorded only by the holder of the claim. Claims,
results and releases are conditional, so they run again after a lost connection.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pixelmill.db import tables as t
from pixelmill.db.clock import utcnow
from pixelmill.db.engine import Database, retry_transient
from pixelmill.domain import DeliveryState

d = t.webhook_deliveries


@dataclass(frozen=True)
class ClaimedDelivery:
    """One attempt a sender now owns; ``attempts`` counts this one."""

    id: int
    request_id: str
    webhook_id: str
    url: str
    body: str
    attempts: int
    lease_token: str


def webhook_id_for(request_id: str) -> str:
    """The ``webhook-id`` of a request's event: the same on every attempt and redelivery."""
    return f"msg_{request_id}"


async def queue_delivery(conn: AsyncConnection, request_id: str, url: str, body: str) -> None:
    """Store a pending delivery, due now, in the caller's transaction."""
    await conn.execute(
        insert(d).values(
            request_id=request_id,
            webhook_id=webhook_id_for(request_id),
            url=url,
            body=body,
            state=DeliveryState.PENDING.value,
            attempts=0,
            next_attempt_at=time.time(),
            created_at=utcnow(),
        )
    )


def _due(now: float) -> ColumnElement[bool]:
    return or_(
        and_(d.c.state == DeliveryState.PENDING.value, d.c.next_attempt_at <= now),
        and_(d.c.state == DeliveryState.DELIVERING.value, d.c.lease_expires_at < now),
    )


@retry_transient
async def claim_due(db: Database, *, limit: int, lease_seconds: float) -> list[ClaimedDelivery]:
    """Take up to ``limit`` due deliveries (oldest due first) for one attempt each."""
    now = time.time()
    candidates = select(d.c.id).where(_due(now)).order_by(d.c.next_attempt_at, d.c.id).limit(limit)
    # Idle senders poll: a plain read (no write lock) tells whether to try a claim.
    async with db.read() as conn:
        if (await conn.execute(candidates.limit(1))).first() is None:
            return []
    if not db.is_sqlite:
        candidates = candidates.with_for_update(skip_locked=True)
    token = uuid.uuid4().hex
    statement = (
        update(d)
        .where(d.c.id.in_(candidates.scalar_subquery()) & _due(now))
        .values(
            state=DeliveryState.DELIVERING.value,
            attempts=d.c.attempts + 1,
            lease_token=token,
            lease_expires_at=now + lease_seconds,
        )
        .returning(d.c.id, d.c.request_id, d.c.webhook_id, d.c.url, d.c.body, d.c.attempts)
    )
    async with db.write() as conn:
        rows = (await conn.execute(statement)).all()
    return [
        ClaimedDelivery(r.id, r.request_id, r.webhook_id, r.url, r.body, r.attempts, token)
        for r in rows
    ]


def _held(claim: ClaimedDelivery) -> ColumnElement[bool]:
    return and_(
        d.c.id == claim.id,
        d.c.lease_token == claim.lease_token,
        d.c.state == DeliveryState.DELIVERING.value,
    )


@retry_transient
async def record_attempt(
    db: Database,
    claim: ClaimedDelivery,
    *,
    status_code: int | None,
    error: str | None,
    next_attempt_at: float | None,
) -> bool:
    """Store the outcome of a claimed attempt; False when the claim was lost meanwhile.

    ``error`` None means delivered; otherwise ``next_attempt_at`` None means no more
    attempts (failed), else the delivery is pending again until then.
    """
    values: dict[str, Any] = {
        "last_status_code": status_code,
        "last_error": t.bounded_text(error) if error else None,
        "next_attempt_at": next_attempt_at,
        "lease_token": None,
        "lease_expires_at": None,
    }
    if error is None:
        values.update(state=DeliveryState.DELIVERED.value, delivered_at=utcnow())
    elif next_attempt_at is None:
        values.update(state=DeliveryState.FAILED.value)
    else:
        values.update(state=DeliveryState.PENDING.value)
    async with db.write() as conn:
        moved = await conn.execute(update(d).where(_held(claim)).values(**values))
    return moved.rowcount == 1


@retry_transient
async def release(db: Database, claims: list[ClaimedDelivery]) -> None:
    """Give unfinished attempts back at once (shutdown): due now, the attempt not counted."""
    async with db.write() as conn:
        for claim in claims:
            await conn.execute(
                update(d)
                .where(_held(claim))
                .values(
                    state=DeliveryState.PENDING.value,
                    attempts=d.c.attempts - 1,
                    next_attempt_at=time.time(),
                    lease_token=None,
                    lease_expires_at=None,
                )
            )


async def redeliver(db: Database, request_id: str, url: str, body: str) -> None:
    """Send the request's event again from a fresh schedule, due now.

    The stored body and webhook-id are kept (it is the same event); ``body`` is used
    only when the request has no delivery yet (it finished before webhooks existed).
    An attempt in flight loses its claim: its outcome is not recorded.
    """
    async with db.write() as conn:
        moved = await conn.execute(
            update(d)
            .where(d.c.request_id == request_id)
            .values(
                state=DeliveryState.PENDING.value,
                attempts=0,
                last_status_code=None,
                last_error=None,
                next_attempt_at=time.time(),
                lease_token=None,
                lease_expires_at=None,
                delivered_at=None,
            )
        )
        if moved.rowcount == 0:
            await queue_delivery(conn, request_id, url, body)


async def get_delivery(db: Database, request_id: str) -> Any:
    """The delivery row of a request, or None."""
    async with db.read() as conn:
        return (await conn.execute(select(d).where(d.c.request_id == request_id))).first()
