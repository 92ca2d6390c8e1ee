"""One HTTP attempt of a webhook, under the address policy of image sources.

The connection goes through :class:`GuardedResolver`, so a host name is checked on
the addresses actually connected to (no DNS rebinding window), and a literal IP is
checked before anything is sent. Redirects are never followed: a 3xx answer is a
failed attempt like any other non-2xx.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from pixelmill.csvio import url_problem
from pixelmill.imaging.addresses import AddressPolicy, parse_ip
from pixelmill.imaging.fetch import ForbiddenAddressError, GuardedResolver, _retry_after

GONE = 410
_ERROR_TEXT = 200  # characters of a receiver's error body kept in last_error
_UPLOAD_DNS_TIMEOUT = 5.0


@dataclass(frozen=True)
class AttemptOutcome:
    """What became of one attempt: a 2xx, or why not."""

    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: it wants no more attempts."""
        return self.status_code == GONE


def literal_refusal(url: str, policy: AddressPolicy) -> str | None:
    """Why ``url`` may not be called as written (bad URL, forbidden literal IP), or None."""
    problem = url_problem(url)
    if problem:
        return problem
    # The host as aiohttp will dial it: yarl maps Unicode digits and dots (full-width
    # ones, say) to ASCII, which urlsplit leaves alone.
    address = parse_ip(URL(url).raw_host or "")
    refusal = policy.refusal(address) if address is not None else None
    return f"the webhook host is {refusal}" if refusal else None


async def resolved_refusal(
    url: str, policy: AddressPolicy, resolver: AbstractResolver | None = None
) -> str | None:
    """Why the host of ``url`` may not be called once resolved, or None.

    A name that cannot be resolved now is not refused: the check is made again on
    every attempt, when the address is connected to.
    """
    target = URL(url)
    host = target.raw_host or ""
    if policy.allow_private or parse_ip(host) is not None:
        return None  # every address is allowed, or the literal one was checked already
    port = target.port or (443 if target.scheme == "https" else 80)
    guarded = GuardedResolver(policy, resolver)
    try:
        async with asyncio.timeout(_UPLOAD_DNS_TIMEOUT):
            await guarded.resolve(host, port, socket.AF_UNSPEC)
    except ForbiddenAddressError as exc:
        return f"the webhook host {exc}"
    except (OSError, TimeoutError):
        return None
    finally:
        await guarded.close()
    return None


class WebhookSender:
    """Posts webhook bodies with pooled connections; every failure comes back as a value.

    ``tls`` replaces the default TLS context (the system's certificate authorities, or
    those of ``SSL_CERT_FILE``).
    """

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        timeout: float,
        user_agent: str,
        resolver: AbstractResolver | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.user_agent = user_agent
        self._resolver = resolver
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy, self._resolver),
                ssl=self._tls if self._tls is not None else True,
                limit=100,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": self.user_agent},
                auto_decompress=False,
                # Deliveries of every client share this session: no receiver's cookie
                # may travel with another client's webhook.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> AttemptOutcome:
        """POST ``body`` to ``url`` once, within the timeout."""
        refusal = literal_refusal(url, self.policy)
        if refusal:
            return AttemptOutcome(error=f"refused: {refusal}")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._post(url, body, headers)
        except TimeoutError:
            return AttemptOutcome(error=f"timeout: no answer within {self.timeout:g} s")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> AttemptOutcome:
        try:
            async with self._client().post(
                url,
                data=body,
                headers={**headers, "Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return AttemptOutcome(status_code=response.status)
                return AttemptOutcome(
                    status_code=response.status,
                    error=await _http_error(response),
                    retry_after=_retry_after(response.headers.get("Retry-After")),
                )
        except aiohttp.ClientConnectorError as exc:
            return AttemptOutcome(error=_connect_error(exc))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return AttemptOutcome(error=f"timeout: no answer within {self.timeout:g} s")
        except aiohttp.ClientError as exc:
            return AttemptOutcome(error=f"connection failed: {exc or type(exc).__name__}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _http_error(response: aiohttp.ClientResponse) -> str:
    status = response.status
    if 300 <= status < 400:
        location = response.headers.get("Location", "")
        return f"HTTP {status}: redirects are not followed (Location: {location[:_ERROR_TEXT]})"
    if status == GONE:
        return f"HTTP {status}: the receiver is gone; no more attempts"
    try:
        text = (await response.content.read(_ERROR_TEXT)).decode("utf-8", "replace").strip()
    except (aiohttp.ClientError, TimeoutError):
        text = ""
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    cause: Any = exc.os_error
    if isinstance(cause, ForbiddenAddressError):
        return f"forbidden address: {cause}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        return f"dns error: cannot resolve {exc.host}: {cause}"
    return f"connect error: cannot connect to {exc.host}:{exc.port}: {cause}"
