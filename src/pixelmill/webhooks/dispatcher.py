"""The webhook dispatcher: runs beside the worker in every worker process.

It scans the database for due deliveries, claims a few (a lease per attempt, so no two
processes make the same attempt at once), posts each one signed, and records what
became of it: delivered, pending again at the next time of the schedule, or failed.
Everything it needs is in the database, so a restart loses nothing: an attempt whose
process died is claimed again when its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pixelmill.config import Settings
from pixelmill.db import deliveries
from pixelmill.db.deliveries import ClaimedDelivery
from pixelmill.db.engine import Database, is_transient
from pixelmill.imaging.addresses import AddressPolicy
from pixelmill.logs import FailureStreak
from pixelmill.webhooks.schedule import RetrySchedule
from pixelmill.webhooks.sender import AttemptOutcome, WebhookSender
from pixelmill.webhooks.signing import WebhookSigner, load_or_create_secret

log = logging.getLogger(__name__)


MIN_POLL_SECONDS = 0.5


class WebhookDispatcher:
    """Sends due webhook deliveries until :meth:`stop`."""

    def __init__(self, settings: Settings, db: Database, sender: WebhookSender | None = None):
        self.settings = settings
        self.db = db
        self.schedule = RetrySchedule(settings.webhook_schedule, settings.webhook_jitter)
        self.sender = sender or WebhookSender(
            AddressPolicy(allow_private=settings.allow_private_urls),
            timeout=settings.webhook_timeout,
            user_agent=settings.user_agent,
        )
        # An attempt ends within the timeout; the lease outlives it by a wide margin.
        self.lease_seconds = 2 * settings.webhook_timeout + 10
        # Deliveries this process queues wake it at once; the poll finds the others (due
        # retries, redeliveries asked of another process), and need not be as eager as
        # the task queue's.
        self._poll_seconds = max(settings.poll_interval, MIN_POLL_SECONDS)
        self._signer: WebhookSigner | None = None
        self._inflight: dict[asyncio.Task[None], ClaimedDelivery] = {}
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        """A hint that a delivery was queued, so look now rather than at the next poll."""
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    async def signer(self) -> WebhookSigner:
        """The signer, from ``PIXELMILL_WEBHOOK_SECRET`` or the data dir's secret file.

        Built at the first attempt, so a process that never sends a webhook (``pixelmill
        process``) leaves no secret file behind.
        """
        if self._signer is None:
            secret = self.settings.webhook_secret.strip() or await asyncio.to_thread(
                load_or_create_secret, self.settings.data_dir
            )
            self._signer = WebhookSigner.from_secrets(secret)
        return self._signer

    async def run(self) -> None:
        claiming = FailureStreak(log, "claiming webhook deliveries", expected=is_transient)
        try:
            while not self._stopping.is_set():
                self._wakeup.clear()
                try:
                    claimed = await self._claim()
                    claiming.succeeded()
                except Exception as exc:
                    claiming.failed(exc)
                    claimed = 0
                if not claimed:
                    await self._idle()
        finally:
            await self._drain()
            await self.sender.close()

    async def _idle(self) -> None:
        woken = asyncio.create_task(self._wakeup.wait())
        waits: set[asyncio.Task[object]] = {woken}
        if len(self._inflight) >= self.settings.webhook_concurrency:
            waits |= set(self._inflight)  # every slot is busy: wait for one to free up
        try:
            await asyncio.wait(
                waits, timeout=self._poll_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()

    async def _claim(self) -> int:
        free = self.settings.webhook_concurrency - len(self._inflight)
        if free <= 0:
            return 0
        claims = await deliveries.claim_due(self.db, limit=free, lease_seconds=self.lease_seconds)
        for claim in claims:
            task = asyncio.create_task(self._deliver(claim), name=f"pixelmill-webhook-{claim.id}")
            self._inflight[task] = claim
            task.add_done_callback(self._inflight.pop)
        return len(claims)

    async def _deliver(self, claim: ClaimedDelivery) -> None:
        try:
            body = claim.body.encode()
            headers = (await self.signer()).headers(claim.webhook_id, body)
            outcome = await self.sender.send(claim.url, body, headers)
        except Exception as exc:
            # A fault of ours (an unreadable secret file, ...): a failed attempt like any other.
            log.exception(
                "webhook attempt %d of request %s broke", claim.attempts, claim.request_id
            )
            outcome = AttemptOutcome(error=f"internal error: {exc!r}")
        try:
            await self._record(claim, outcome)
        except Exception:
            # Left claimed: the delivery is taken again when its lease expires.
            log.exception("recording webhook attempt of request %s failed", claim.request_id)

    async def _record(self, claim: ClaimedDelivery, outcome: AttemptOutcome) -> None:
        next_at = None
        if not outcome.delivered and not outcome.gone:
            delay = self.schedule.delay(claim.attempts, outcome.retry_after)
            next_at = None if delay is None else time.time() + delay
        recorded = await deliveries.record_attempt(
            self.db,
            claim,
            status_code=outcome.status_code,
            error=outcome.error,
            next_attempt_at=next_at,
        )
        if not recorded:
            log.info("webhook delivery %s was taken back while in flight", claim.id)
        elif outcome.delivered:
            log.info(
                "webhook of request %s delivered (attempt %d)", claim.request_id, claim.attempts
            )
        else:
            log.warning(
                "webhook of request %s, attempt %d: %s; %s",
                claim.request_id,
                claim.attempts,
                outcome.error,
                "giving up" if next_at is None else f"next in {next_at - time.time():.1f} s",
            )

    async def _drain(self) -> None:
        """Give attempts in flight a grace period; give back those that do not end in it."""
        if not self._inflight:
            return
        grace = min(self.settings.shutdown_grace_seconds, self.settings.webhook_timeout + 1)
        await asyncio.wait(set(self._inflight), timeout=grace)
        unfinished = dict(self._inflight)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        with contextlib.suppress(Exception):
            await deliveries.release(self.db, list(unfinished.values()))
