"""Safe fetching of image sources over http(s).

The host is resolved once, every resolved address is checked against the
:class:`AddressPolicy`, and the connection goes to a checked address (aiohttp keeps
the Host header and the TLS server name of the URL). Redirects are followed by hand
so that every hop is checked again. Bodies are cut off at the byte limit.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pixelmill.csvio import url_problem
from pixelmill.domain import ErrorCode, ImageFailure
from pixelmill.imaging.addresses import AddressPolicy, parse_ip

_REDIRECTS = {301, 302, 303, 307, 308}
_ENCODED_SEPARATOR = re.compile("%(2f|5c|2e)", re.IGNORECASE)
_TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 64 * 1024
# The longest wait a Retry-After header can ask for; whoever waits may cap it further.
MAX_RETRY_AFTER = 86_400.0


class ForbiddenAddressError(OSError):
    """The host resolved only to addresses the policy refuses."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch."""

    max_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0
    user_agent: str = "pixelmill"


@dataclass(frozen=True)
class FetchedBody:
    """The bytes of a fetched source and the URL they finally came from."""

    data: bytes
    url: str


FetchOutcome = FetchedBody | ImageFailure


class GuardedResolver(AbstractResolver):
    """Resolves with an inner resolver and drops every address the policy refuses."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        refusal = self.policy.name_refusal(host)
        if refusal:  # not even asked of the resolver: some answer for it, some fail
            raise ForbiddenAddressError(f"{host} is {refusal}")
        results = await self.inner.resolve(host, port, family)
        allowed = []
        refusals = []
        for result in results:
            address = parse_ip(result["host"])
            reason = self.policy.refusal(address) if address else "not an IP address"
            if reason:
                refusals.append(f"{result['host']} ({reason})")
            else:
                allowed.append(result)
        if not allowed:
            raise ForbiddenAddressError(
                f"{host} resolves only to refused addresses: {', '.join(refusals)}"
            )
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now, at most a
    day; None when absent or unreadable (``inf`` and ``nan`` included)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _http_failure(status: int, url: str, retry_after: str | None) -> ImageFailure:
    return ImageFailure(
        ErrorCode.HTTP_ERROR,
        f"the source answered HTTP {status} for {url}",
        transient=status in _TRANSIENT_STATUSES,
        retry_after=_retry_after(retry_after),
    )


class Fetcher:
    """Fetches image sources under an address policy, with pooled connections.

    ``trusted_prefixes`` are URL prefixes that may be fetched even from private
    addresses (the sample photos of ``serve``); every other URL obeys the policy.
    ``tls`` replaces the default TLS context (the system's certificate authorities,
    or those of ``SSL_CERT_FILE``), e.g. to trust a private authority.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        limits: FetchLimits,
        *,
        trusted_prefixes: tuple[str, ...] = (),
        resolver: AbstractResolver | None = None,
        tls: ssl.SSLContext | None = None,
        pool_size: int = 100,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self._trusted_prefixes = tuple(URL(prefix) for prefix in trusted_prefixes)
        self._resolver = resolver
        self._tls = tls
        self._pool_size = pool_size
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    def _session(self, trusted: bool) -> aiohttp.ClientSession:
        allow_private = trusted or self.policy.allow_private
        session = self._sessions.get(allow_private)
        if session is None or session.closed:
            policy = AddressPolicy(allow_private=allow_private)
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(policy, self._resolver),
                ssl=self._tls if self._tls is not None else True,
                limit=self._pool_size,
                ttl_dns_cache=60,
            )
            timeout = aiohttp.ClientTimeout(
                total=self.limits.total_timeout,
                sock_connect=self.limits.connect_timeout,
                sock_read=self.limits.read_timeout,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": self.limits.user_agent, "Accept": "image/*,*/*;q=0.5"},
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
                # One fetcher serves every client: a cookie one source sets must never
                # be sent back with another client's fetch.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[allow_private] = session
        return session

    def _trusted(self, url: URL) -> bool:
        return any(_within(url, prefix) for prefix in self._trusted_prefixes)

    def _check_address(self, target: URL, trusted: bool, url: str) -> ImageFailure | None:
        """Refuse a literal IP host that the policy forbids (names are checked on resolve)."""
        host = target.raw_host or ""
        address = parse_ip(host)
        if address is None:
            return None
        refusal = None if trusted else self.policy.refusal(address)
        if refusal:
            return ImageFailure(
                ErrorCode.FORBIDDEN_ADDRESS, f"{address} is {refusal}; refused: {url}"
            )
        if str(address) != host.strip("[]") and address.version == 4:
            return ImageFailure(
                ErrorCode.INVALID_URL, f"write the address {host} as {address}: {url}"
            )
        return None

    async def fetch(self, url: str) -> FetchOutcome:
        """The body at ``url``, following checked redirects, or why it cannot be had."""
        try:
            async with asyncio.timeout(self.limits.total_timeout):
                return await self._follow(url)
        except TimeoutError:
            return ImageFailure(
                ErrorCode.TIMEOUT,
                f"fetching {url} took longer than {self.limits.total_timeout:g} s",
            )

    async def _follow(self, url: str) -> FetchOutcome:
        for _hop in range(self.limits.max_redirects + 1):
            reason = url_problem(url)
            if reason:
                return ImageFailure(ErrorCode.INVALID_URL, f"{reason}: {url}")
            # Normalised once (dot segments resolved), then checked and requested as is.
            target = URL(url)
            trusted = self._trusted(target)
            refused = self._check_address(target, trusted, url)
            if refused:
                return refused
            outcome = await self._get(target, trusted)
            if isinstance(outcome, str):
                url = outcome
                continue
            return outcome
        return ImageFailure(
            ErrorCode.HTTP_ERROR,
            f"more than {self.limits.max_redirects} redirects from {url}",
            transient=False,
        )

    async def _get(self, target: URL, trusted: bool) -> FetchOutcome | str:
        """One request: a body, a failure, or the URL a redirect points to."""
        session = self._session(trusted)
        url = str(target)
        try:
            async with session.get(target, allow_redirects=False) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        return _http_failure(response.status, url, None)
                    try:
                        return str(response.url.join(URL(location)))
                    except ValueError as exc:
                        return ImageFailure(
                            ErrorCode.INVALID_URL,
                            f"{url} redirects to {location!r}, which is not a URL ({exc})",
                        )
                if response.status >= 400:
                    return _http_failure(response.status, url, response.headers.get("Retry-After"))
                return await self._read_body(response, url)
        except aiohttp.ClientConnectorError as exc:
            return _connect_failure(exc, url)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return ImageFailure(ErrorCode.TIMEOUT, f"{url} did not answer in time")
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            return ImageFailure(ErrorCode.CONNECT_ERROR, f"connection to {url} broke: {exc}")
        except aiohttp.ClientError as exc:
            return ImageFailure(ErrorCode.CONNECT_ERROR, f"fetching {url} failed: {exc}")

    async def _read_body(self, response: aiohttp.ClientResponse, url: str) -> FetchOutcome:
        limit = self.limits.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            return _too_large(url, limit, f"its Content-Length is {declared} bytes")
        if declared is not None:
            # The parser stops at the declared length, so the limit holds: read it whole.
            return FetchedBody(await response.read(), url)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                return _too_large(url, limit, "its body is longer")
            chunks.append(chunk)
        return FetchedBody(b"".join(chunks), url)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def _within(url: URL, prefix: URL) -> bool:
    """Whether ``url`` lies under ``prefix``: same origin, and its path below the prefix's.

    A path that spells a slash, a backslash or a dot in percent-encoding is never under
    a prefix: an origin that decodes before it resolves ``..`` would read
    ``/media/..%2fadmin`` as ``/admin``.
    """
    if _ENCODED_SEPARATOR.search(url.raw_path):
        return False
    if (url.scheme, (url.host or "").lower(), url.port) != (
        prefix.scheme,
        (prefix.host or "").lower(),
        prefix.port,
    ):
        return False
    base = prefix.path if prefix.path.endswith("/") else prefix.path + "/"
    return url.path == prefix.path or url.path.startswith(base)


def _too_large(url: str, limit: int, why: str) -> ImageFailure:
    return ImageFailure(ErrorCode.TOO_LARGE, f"{url} exceeds {limit} bytes: {why}")


def _connect_failure(exc: aiohttp.ClientConnectorError, url: str) -> ImageFailure:
    cause: Any = exc.os_error
    if isinstance(cause, ForbiddenAddressError):
        return ImageFailure(ErrorCode.FORBIDDEN_ADDRESS, f"{cause}; refused: {url}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        return ImageFailure(ErrorCode.DNS_ERROR, f"cannot resolve the host of {url}: {cause}")
    return ImageFailure(ErrorCode.CONNECT_ERROR, f"cannot connect to {url}: {cause}")
