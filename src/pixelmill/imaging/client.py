"""``PIXELMILL_IMAGING_URL=http://a:8001,http://b:8001``: the imaging service over HTTP.

Each image goes to one ``pixelmill imaging`` instance: the available one with the
fewest requests in flight from this client, ties taken in turn. When an instance
cannot answer (connection refused or reset, timeout, 5xx, 401/403, a body that is not
an outcome) or is busy (429), the image goes at once to another instance that has not
been tried for it yet; once every instance has been tried, the client backs off and
starts another round. An instance that fails ``failure_threshold`` times in a row is
skipped for ``PIXELMILL_IMAGING_SKIP_SECONDS``, then one request at a time probes it
until one succeeds. A busy instance is skipped for its ``Retry-After``.

The client keeps trying for ``PIXELMILL_IMAGING_PATIENCE_SECONDS`` (60 s); only then
does it raise :class:`ImagingUnavailableError`, on which the worker waits and tries
again without spending an attempt of the image, so an outage of the services never
fails images (they complete once a service is back). A ``429`` is a sign of
life: it starts the patience again, so an overloaded but working service slows
workers down instead of failing their images. Whatever an instance answers about the
image itself (a result, or a failure with its code) is passed through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from pixelmill.backoff import jittered_backoff
from pixelmill.config import Settings, imaging_service_urls
from pixelmill.domain import ImageOutcome, ProcessingOptions
from pixelmill.imaging.base import ImagingUnavailableError
from pixelmill.imaging.wire import PROCESS_PATH, outcome_from_json, request_body

log = logging.getLogger(__name__)

# Shorter than the service's keep-alive (service.KEEP_ALIVE_SECONDS), so the client
# closes an idle connection before the service does.
_CLIENT_KEEP_ALIVE = 30.0
_CONNECT_TIMEOUT = 5.0
_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 2.0


@dataclass(eq=False)
class Instance:
    """One imaging service as this client sees it."""

    url: str
    in_flight: int = 0
    failures: int = 0  # failed attempts in a row
    skip_until: float = 0.0  # time.monotonic() before which it gets no request
    answered: int = 0  # outcomes received from it

    def available(self, now: float, failure_threshold: int) -> bool:
        if now < self.skip_until:
            return False
        # Back from a skip: one probe at a time until it answers again.
        return self.failures < failure_threshold or self.in_flight == 0


class _Miss:
    """An attempt that got no outcome for the image; ``busy`` when the instance said 429."""

    def __init__(self, reason: str, *, busy: bool = False) -> None:
        self.reason = reason
        self.busy = busy


class HttpImaging:
    """The Imaging protocol over HTTP, spread over one or more imaging services."""

    def __init__(self, settings: Settings, *, failure_threshold: int = 3) -> None:
        try:
            urls = imaging_service_urls(settings.imaging_url)
        except ValueError as exc:  # settings built without their checks (model_copy)
            raise ValueError(f"PIXELMILL_IMAGING_URL: {exc}") from None
        self.instances = [Instance(url) for url in urls]
        self.patience = settings.imaging_patience_seconds
        self.skip_seconds = settings.imaging_skip_seconds
        self.failure_threshold = failure_threshold
        self._timeout = aiohttp.ClientTimeout(
            total=settings.imaging_request_timeout, sock_connect=_CONNECT_TIMEOUT
        )
        token = settings.imaging_token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._turn = 0

    async def process(
        self, source_url: str, options: ProcessingOptions, output_stem: str, *, fresh: bool = False
    ) -> ImageOutcome:
        # ``fresh`` is not passed on: a call retried on another instance may follow one
        # that timed out after storing the image, so the service always looks first.
        body = request_body(source_url, options, output_stem)
        deadline = time.monotonic() + self.patience
        tried: set[int] = set()
        rounds = 0
        reason = "no imaging service was available"
        while True:
            index = self._pick(tried)
            if index is None:
                now = time.monotonic()
                if now >= deadline:
                    raise ImagingUnavailableError(
                        f"no imaging service answered within {self.patience:g} s; last: {reason}"
                    )
                rounds += 1
                await asyncio.sleep(min(self._pause(rounds, bool(tried), now), deadline - now))
                tried.clear()
                continue
            tried.add(index)
            outcome = await self._attempt(self.instances[index], body)
            if not isinstance(outcome, _Miss):
                return outcome
            reason = outcome.reason
            if outcome.busy:  # alive: the patience starts again once it may have room
                deadline = max(deadline, self.instances[index].skip_until + self.patience)

    def _pick(self, tried: set[int]) -> int | None:
        """The available, untried instance with the fewest in flight; ties in turn."""
        now = time.monotonic()
        count = len(self.instances)
        best: int | None = None
        for step in range(count):
            index = (self._turn + step) % count
            instance = self.instances[index]
            if index in tried or not instance.available(now, self.failure_threshold):
                continue
            if best is None or instance.in_flight < self.instances[best].in_flight:
                best = index
        if best is not None:
            self._turn = (best + 1) % count
        return best

    def _pause(self, rounds: int, tried_some: bool, now: float) -> float:
        """Backoff with jitter after a round; sooner when only skips stood in the way."""
        pause = jittered_backoff(rounds, _BACKOFF_BASE, _BACKOFF_MAX)
        if not tried_some:
            next_free = min(instance.skip_until for instance in self.instances)
            if next_free > now:
                pause = min(pause, next_free - now + 0.001)
        return pause

    async def _attempt(self, instance: Instance, body: dict[str, object]) -> ImageOutcome | _Miss:
        instance.in_flight += 1
        try:
            async with self._client().post(instance.url + PROCESS_PATH, json=body) as response:
                if response.status == 200:
                    outcome = outcome_from_json(await response.json(content_type=None))
                elif response.status == 429:
                    return self._busy(instance, response.headers.get("Retry-After"))
                else:
                    text = (await response.text(errors="replace"))[:200]
                    return self._failed(instance, f"HTTP {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The service may have started on the image: the next try may fetch it again.
            log.info(
                "no answer from %s for %s: %s", instance.url, body["source_url"], _describe(exc)
            )
            return self._failed(instance, _describe(exc))
        finally:
            instance.in_flight -= 1
        if instance.failures >= self.failure_threshold:
            log.info("imaging service %s answers again", instance.url)
        instance.failures = 0
        instance.answered += 1
        return outcome

    def _busy(self, instance: Instance, retry_after: str | None) -> _Miss:
        try:
            pause = max(0.0, min(float(retry_after or 1), _BACKOFF_MAX))
        except ValueError:
            pause = 1.0
        instance.skip_until = max(instance.skip_until, time.monotonic() + pause)
        return _Miss(f"{instance.url} is busy (429)", busy=True)

    def _failed(self, instance: Instance, reason: str) -> _Miss:
        instance.failures += 1
        if instance.failures >= self.failure_threshold:
            instance.skip_until = time.monotonic() + self.skip_seconds
            if instance.failures == self.failure_threshold:
                log.warning(
                    "imaging service %s failed %d times in a row (%s); skipping it for %g s",
                    instance.url,
                    instance.failures,
                    reason,
                    self.skip_seconds,
                )
        return _Miss(f"{instance.url}: {reason}")

    def _client(self) -> aiohttp.ClientSession:
        """One pooled session, made in the running event loop on first use."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_CLIENT_KEEP_ALIVE)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),  # the service is stateless
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
