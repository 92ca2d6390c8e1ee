"""Safe fetching against a real loopback image host.

Only loopback traffic is ever sent. Addresses such as 169.254.169.254 are tried only
under the default policy, which refuses them before any connection is made, and the
image host's ``hits`` counter proves that refused fetches never reached it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from pixelmill.domain import ErrorCode, ImageFailure
from pixelmill.imaging.addresses import AddressPolicy, parse_ip
from pixelmill.imaging.fetch import FetchedBody, Fetcher, FetchLimits, FetchOutcome
from tests.support.image_host import ImageHost
from tests.support.resolver import StaticResolver
from tests.support.tls import server_context, trusting

DEFAULT = AddressPolicy()
PRIVATE_OK = AddressPolicy(allow_private=True)

MakeFetcher = Callable[..., Fetcher]


@pytest.fixture
async def make_fetcher() -> AsyncIterator[MakeFetcher]:
    """Builds fetchers (default policy and limits unless told) and closes them afterwards."""
    made: list[Fetcher] = []

    def make(
        policy: AddressPolicy = DEFAULT, limits: FetchLimits | None = None, **kwargs: object
    ) -> Fetcher:
        fetcher = Fetcher(policy, limits or FetchLimits(), **kwargs)  # type: ignore[arg-type]
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.close()


def total_hits(host: ImageHost) -> int:
    """Every request the image host has seen (a snapshot, taken atomically)."""
    return sum(dict(host.hits).values())


def hits(host: ImageHost, path: str) -> int:
    return dict(host.hits).get(path, 0)


def describe(outcome: FetchOutcome) -> str:
    if isinstance(outcome, FetchedBody):
        return f"{len(outcome.data)} bytes from {outcome.url}"
    return f"{outcome.code}: {outcome.message}"


def body(outcome: FetchOutcome) -> FetchedBody:
    assert isinstance(outcome, FetchedBody), f"expected a body, got {describe(outcome)}"
    return outcome


def failure(outcome: FetchOutcome) -> ImageFailure:
    assert isinstance(outcome, ImageFailure), f"expected a failure, got {describe(outcome)}"
    return outcome


# --- success -------------------------------------------------------------------------


async def test_fetch_with_private_addresses_allowed(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    before = hits(image_host, "/img/cat.jpg")
    url = image_host.url("img/cat.jpg")

    fetched = body(await make_fetcher(PRIVATE_OK).fetch(url))

    assert fetched.data == (corpus / "cat.jpg").read_bytes()
    assert fetched.url == url
    assert hits(image_host, "/img/cat.jpg") == before + 1


async def test_concurrent_fetches_share_a_small_pool(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(PRIVATE_OK, pool_size=2)
    names = ["astronaut.jpg", "cat.jpg", "cells.jpg", "coffee.jpg", "photo.png", "photo.webp"]

    outcomes = await asyncio.gather(*(fetcher.fetch(image_host.url(f"img/{n}")) for n in names))

    for name, outcome in zip(names, outcomes, strict=True):
        assert body(outcome).data == (corpus / name).read_bytes()


async def test_fetcher_can_be_used_again_after_close(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(PRIVATE_OK)
    body(await fetcher.fetch(image_host.url("img/cat.jpg")))
    await fetcher.close()

    body(await fetcher.fetch(image_host.url("img/cat.jpg")))


# --- the address policy --------------------------------------------------------------


def _refused_urls(port: int) -> list[str]:
    """Loopback in its many spellings, and the metadata address (never connected to)."""
    return [
        f"http://127.0.0.1:{port}/img/cat.jpg",
        f"http://localhost:{port}/img/cat.jpg",
        f"http://localhost.:{port}/img/cat.jpg",  # fully qualified: no resolver here has it
        f"http://img.localhost:{port}/img/cat.jpg",  # every name under localhost
        f"http://2130706433:{port}/img/cat.jpg",  # 127.0.0.1 as one decimal number
        f"http://0x7f000001:{port}/img/cat.jpg",
        f"http://0x7f.1:{port}/img/cat.jpg",
        f"http://0177.0.0.1:{port}/img/cat.jpg",
        f"http://127.1:{port}/img/cat.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/img/cat.jpg",  # IPv4-mapped IPv6
        f"http://[::ffff:7f00:1]:{port}/img/cat.jpg",
        f"http://[::1]:{port}/img/cat.jpg",
        f"http://0.0.0.0:{port}/img/cat.jpg",
        f"http://[::]:{port}/img/cat.jpg",
        "http://169.254.169.254/latest/meta-data/",
    ]


@pytest.mark.parametrize("index", range(len(_refused_urls(1))))
async def test_default_policy_refuses_before_connecting(
    image_host: ImageHost, make_fetcher: MakeFetcher, index: int
) -> None:
    url = _refused_urls(image_host.port)[index]
    before = total_hits(image_host)
    started = time.monotonic()

    refused = failure(await make_fetcher().fetch(url))

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS, refused.message
    assert not refused.is_transient
    assert url in refused.message
    assert time.monotonic() - started < 2, "refused up front, not after a connection attempt"
    assert total_hits(image_host) == before, "no request may reach the host"


# Other non-public ranges are checked on the policy alone: no traffic leaves loopback.
@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "metadata"),
        ("[fe80::1]", "link-local"),
        ("[fc00::1]", "private"),
        ("224.0.0.1", "multicast"),
        ("198.18.0.1", ""),
        ("192.0.0.8", ""),
        ("240.0.0.1", ""),
        ("255.255.255.255", ""),
        ("[::ffff:10.0.0.1]", "private"),
        ("[::ffff:169.254.169.254]", "metadata"),
        ("[2002:7f00:1::]", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("[64:ff9b::a9fe:a9fe]", ""),  # NAT64 wrapping 169.254.169.254
        ("167772161", "private"),  # 10.0.0.1 as one decimal number
        ("0xa9.0xfe.0xa9.0xfe", "metadata"),
    ],
)
def test_policy_refuses_non_public_addresses(host: str, reason: str) -> None:
    address = parse_ip(host)
    assert address is not None

    refusal = DEFAULT.refusal(address)

    assert refusal is not None
    assert reason in refusal
    assert PRIVATE_OK.refusal(address) is None


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]", "93.184.215.14"])
def test_policy_accepts_public_addresses(host: str) -> None:
    address = parse_ip(host)
    assert address is not None
    assert DEFAULT.refusal(address) is None


@pytest.mark.parametrize("host", ["example.com", "localhost", "1.2.3.4.5", "0x1g", "", "1.2.3.4.."])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip(host) is None


@pytest.mark.parametrize(
    ("host", "address"), [("127.0.0.1.", "127.0.0.1"), ("127.1.", "127.0.0.1")]
)
def test_a_fully_qualified_address_is_the_address(host: str, address: str) -> None:
    assert str(parse_ip(host)) == address
    assert DEFAULT.refusal(parse_ip(host)) == "a loopback address"  # type: ignore[arg-type]


async def test_metadata_address_is_named_in_the_message(make_fetcher: MakeFetcher) -> None:
    refused = failure(await make_fetcher().fetch("http://169.254.169.254/latest/meta-data/"))

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS
    assert "metadata" in refused.message


async def test_hostname_resolving_to_loopback_is_refused(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    resolver = StaticResolver({"evil.example": ["127.0.0.1"]})
    before = total_hits(image_host)

    refused = failure(
        await make_fetcher(resolver=resolver).fetch(
            f"http://evil.example:{image_host.port}/img/cat.jpg"
        )
    )

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS, refused.message
    assert "127.0.0.1" in refused.message
    assert resolver.asked == ["evil.example"], "the check is on the resolved address"
    assert total_hits(image_host) == before


async def test_hostname_resolving_only_to_private_addresses_is_refused(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    resolver = StaticResolver({"evil.example": ["127.0.0.1", "::1", "127.0.0.2"]})
    before = total_hits(image_host)

    refused = failure(
        await make_fetcher(resolver=resolver).fetch(
            f"http://evil.example:{image_host.port}/img/cat.jpg"
        )
    )

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS
    assert total_hits(image_host) == before


async def test_the_same_resolver_reaches_the_host_when_private_is_allowed(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    """The control for the test above: the resolver does lead to the image host."""
    resolver = StaticResolver({"evil.example": ["127.0.0.1"]})
    before = hits(image_host, "/img/cat.jpg")

    fetched = body(
        await make_fetcher(PRIVATE_OK, resolver=resolver).fetch(
            f"http://evil.example:{image_host.port}/img/cat.jpg"
        )
    )

    assert fetched.data == (corpus / "cat.jpg").read_bytes()
    assert hits(image_host, "/img/cat.jpg") == before + 1


async def test_a_cookie_set_by_a_source_is_never_sent_back(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    """One fetcher serves every client: a source's cookie must not follow later fetches."""
    resolver = StaticResolver({"images.example": ["127.0.0.1"]})
    fetcher = make_fetcher(PRIVATE_OK, resolver=resolver)
    origin = f"http://images.example:{image_host.port}"
    first = len(image_host.cookies)

    body(await fetcher.fetch(f"{origin}/cookie/cat.jpg"))
    body(await fetcher.fetch(f"{origin}/img/cat.jpg"))
    body(await fetcher.fetch(f"{origin}/cookie/cat.jpg"))

    assert image_host.cookies[first:] == [None, None, None]


async def test_legacy_address_spelling_is_refused_even_when_private_is_allowed(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    before = total_hits(image_host)

    refused = failure(
        await make_fetcher(PRIVATE_OK).fetch(f"http://2130706433:{image_host.port}/img/cat.jpg")
    )

    assert refused.code == ErrorCode.INVALID_URL
    assert "127.0.0.1" in refused.message
    assert total_hits(image_host) == before


# --- TLS ----------------------------------------------------------------------------

TlsHost = Callable[[str], ImageHost]


@pytest.fixture
def tls_host(corpus: Path, authority: trustme.CA) -> Iterator[TlsHost]:
    """Starts an HTTPS image host on loopback whose certificate names the given host."""
    started: list[ImageHost] = []

    def start(certified_name: str) -> ImageHost:
        host = ImageHost(corpus, tls=server_context(authority, certified_name)).start()
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()


async def test_https_goes_to_the_checked_address_under_the_urls_name(
    tls_host: TlsHost, authority: trustme.CA, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    """The address dialled is the one resolved and checked; the TLS server name, the
    certificate check and the Host header all keep the URL's host name."""
    host = tls_host("images.example")
    resolver = StaticResolver({"images.example": ["127.0.0.1"]})
    fetcher = make_fetcher(PRIVATE_OK, resolver=resolver, tls=trusting(authority))
    url = f"https://images.example:{host.port}/img/cat.jpg"

    fetched = body(await fetcher.fetch(url))

    assert fetched.data == (corpus / "cat.jpg").read_bytes()
    assert fetched.url == url
    assert resolver.asked == ["images.example"]
    assert host.server_names == ["images.example"]
    assert host.host_headers == [f"images.example:{host.port}"]


async def test_https_to_a_certificate_for_another_name_is_a_connect_error(
    tls_host: TlsHost, authority: trustme.CA, make_fetcher: MakeFetcher
) -> None:
    host = tls_host("other.example")
    resolver = StaticResolver({"images.example": ["127.0.0.1"]})
    fetcher = make_fetcher(PRIVATE_OK, resolver=resolver, tls=trusting(authority))

    failed = failure(await fetcher.fetch(f"https://images.example:{host.port}/img/cat.jpg"))

    assert failed.code == ErrorCode.CONNECT_ERROR
    assert "certificate" in failed.message.lower(), failed.message
    assert total_hits(host) == 0, "no request may be sent over an unverified connection"


async def test_https_to_an_unknown_authority_is_a_connect_error(
    tls_host: TlsHost, make_fetcher: MakeFetcher
) -> None:
    """By default only the system's authorities are trusted, never a private one."""
    host = tls_host("images.example")
    resolver = StaticResolver({"images.example": ["127.0.0.1"]})

    failed = failure(
        await make_fetcher(PRIVATE_OK, resolver=resolver).fetch(
            f"https://images.example:{host.port}/img/cat.jpg"
        )
    )

    assert failed.code == ErrorCode.CONNECT_ERROR
    assert "certificate" in failed.message.lower(), failed.message
    assert total_hits(host) == 0


async def test_https_name_resolving_to_loopback_is_refused_before_the_handshake(
    tls_host: TlsHost, authority: trustme.CA, make_fetcher: MakeFetcher
) -> None:
    host = tls_host("images.example")
    resolver = StaticResolver({"images.example": ["127.0.0.1"]})

    refused = failure(
        await make_fetcher(resolver=resolver, tls=trusting(authority)).fetch(
            f"https://images.example:{host.port}/img/cat.jpg"
        )
    )

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS, refused.message
    assert host.server_names == [], "no TLS handshake may begin"
    assert total_hits(host) == 0


# --- trusted prefixes ----------------------------------------------------------------


async def test_trusted_prefix_allows_exactly_that_prefix(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    port = image_host.port
    fetcher = make_fetcher(trusted_prefixes=(image_host.url("img/"),))

    fetched = body(await fetcher.fetch(image_host.url("img/cat.jpg")))
    assert fetched.data == (corpus / "cat.jpg").read_bytes()

    before = total_hits(image_host)
    for url in [
        image_host.url("status/200"),
        image_host.url("img"),
        image_host.url("imgs/cat.jpg"),
        image_host.url("redirect/1/cat.jpg"),
        f"http://localhost:{port}/img/cat.jpg",  # same server, not the same prefix
        f"http://[::ffff:127.0.0.1]:{port}/img/cat.jpg",
        f"http://127.0.0.2:{port}/img/cat.jpg",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/img/cat.jpg",
        f"https://127.0.0.1:{port}/img/cat.jpg",
    ]:
        refused = failure(await fetcher.fetch(url))
        assert refused.code == ErrorCode.FORBIDDEN_ADDRESS, (url, refused)
    assert total_hits(image_host) == before


@pytest.mark.parametrize("escape", ["..%2f", "..%2F", "%2e%2e/", "..%5c"])
async def test_encoded_separators_do_not_escape_a_trusted_prefix(
    image_host: ImageHost, make_fetcher: MakeFetcher, escape: str
) -> None:
    """An origin that decodes before it resolves ``..`` would serve what lies outside."""
    fetcher = make_fetcher(trusted_prefixes=(image_host.url("img/"),))
    before = total_hits(image_host)

    outcome = await fetcher.fetch(image_host.url(f"img/{escape}status/200"))

    assert failure(outcome).code == ErrorCode.FORBIDDEN_ADDRESS
    assert total_hits(image_host) == before


async def test_redirects_inside_a_trusted_prefix_are_followed(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(trusted_prefixes=(image_host.url("/"),))

    fetched = body(await fetcher.fetch(image_host.url("redirect/2/cat.jpg")))

    assert fetched.data == (corpus / "cat.jpg").read_bytes()
    assert fetched.url == image_host.url("img/cat.jpg")


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
async def test_redirect_from_a_trusted_prefix_to_an_untrusted_url_is_refused(
    image_host: ImageHost, make_fetcher: MakeFetcher, target_host: str
) -> None:
    fetcher = make_fetcher(trusted_prefixes=(image_host.url("to?"),))
    target = f"http://{target_host}:{image_host.port}/img/galaxy.jpg"
    before_to = hits(image_host, "/to")
    before_img = hits(image_host, "/img/galaxy.jpg")

    refused = failure(await fetcher.fetch(image_host.url("to?url=" + quote(target, safe=""))))

    assert refused.code == ErrorCode.FORBIDDEN_ADDRESS, refused.message
    assert target in refused.message
    assert hits(image_host, "/to") == before_to + 1, "the trusted hop was made"
    assert hits(image_host, "/img/galaxy.jpg") == before_img, "the untrusted one was not"


async def test_dot_segments_do_not_escape_a_trusted_prefix(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(trusted_prefixes=(image_host.url("img/"),))
    before = total_hits(image_host)

    outcome = await fetcher.fetch(image_host.url("img/../status/200"))

    assert total_hits(image_host) == before, "a request outside /img/ reached the host"
    assert failure(outcome).code == ErrorCode.FORBIDDEN_ADDRESS


async def test_a_prefix_without_a_path_trusts_only_its_own_host(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    resolver = StaticResolver(
        {"images.internal": ["127.0.0.1"], "images.internal.evil.example": ["127.0.0.1"]}
    )
    fetcher = make_fetcher(trusted_prefixes=("http://images.internal",), resolver=resolver)
    before = total_hits(image_host)

    outcome = await fetcher.fetch(
        f"http://images.internal.evil.example:{image_host.port}/img/cat.jpg"
    )

    assert total_hits(image_host) == before, "an untrusted host was fetched from loopback"
    assert failure(outcome).code == ErrorCode.FORBIDDEN_ADDRESS


# --- redirects -----------------------------------------------------------------------


@pytest.mark.parametrize("redirects", [1, 3, 5])
async def test_redirect_chains_within_the_limit(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher, redirects: int
) -> None:
    fetcher = make_fetcher(PRIVATE_OK, FetchLimits(max_redirects=5))

    fetched = body(await fetcher.fetch(image_host.url(f"redirect/{redirects}/rocket.jpg")))

    assert fetched.data == (corpus / "rocket.jpg").read_bytes()
    assert fetched.url == image_host.url("img/rocket.jpg")


@pytest.mark.parametrize(("limit", "redirects"), [(5, 6), (2, 3), (0, 1)])
async def test_redirect_chains_beyond_the_limit(
    image_host: ImageHost, make_fetcher: MakeFetcher, limit: int, redirects: int
) -> None:
    fetcher = make_fetcher(PRIVATE_OK, FetchLimits(max_redirects=limit))
    before_final = hits(image_host, "/img/cells.jpg")
    before = total_hits(image_host)

    failed = failure(await fetcher.fetch(image_host.url(f"redirect/{redirects}/cells.jpg")))

    assert failed.code == ErrorCode.HTTP_ERROR
    assert not failed.is_transient
    assert "redirects" in failed.message
    assert total_hits(image_host) - before == limit + 1, "the first hop plus `limit` redirects"
    assert hits(image_host, "/img/cells.jpg") == before_final


@pytest.mark.parametrize(
    "target",
    [
        "ftp://127.0.0.1/cat.jpg",
        "http://user:secret@127.0.0.1/cat.jpg",
        "http://127.0.0.1\\.example.com/cat.jpg",
    ],
    ids=["ftp", "credentials", "backslash-in-host"],
)
async def test_redirect_to_an_invalid_url_is_refused(
    image_host: ImageHost, make_fetcher: MakeFetcher, target: str
) -> None:
    refused = failure(
        await make_fetcher(PRIVATE_OK).fetch(image_host.url("to?url=" + quote(target, safe="")))
    )

    assert refused.code == ErrorCode.INVALID_URL


# --- HTTP statuses, sizes, time ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [(404, False), (403, False), (410, False), (500, True), (502, True), (503, True), (429, True)],
)
async def test_http_errors(
    image_host: ImageHost, make_fetcher: MakeFetcher, status: int, transient: bool
) -> None:
    failed = failure(await make_fetcher(PRIVATE_OK).fetch(image_host.url(f"status/{status}")))

    assert failed.code == ErrorCode.HTTP_ERROR
    assert failed.is_transient is transient
    assert str(status) in failed.message


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        ("99999999", 86_400.0),  # at most a day
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: now
        ("inf", None),
        ("nan", None),
        ("1e999", None),
        ("soon", None),
    ],
)
async def test_retry_after_is_read_and_bounded(
    image_host: ImageHost, make_fetcher: MakeFetcher, header: str, seconds: float | None
) -> None:
    url = image_host.url("status/503?retry_after=" + quote(header))

    failed = failure(await make_fetcher(PRIVATE_OK).fetch(url))

    assert failed.code == ErrorCode.HTTP_ERROR and failed.is_transient
    assert failed.retry_after == seconds


async def test_body_over_max_bytes_is_too_large(
    image_host: ImageHost, corpus: Path, make_fetcher: MakeFetcher
) -> None:
    size = (corpus / "cat.jpg").stat().st_size
    url = image_host.url("img/cat.jpg")

    failed = failure(await make_fetcher(PRIVATE_OK, FetchLimits(max_bytes=size - 1)).fetch(url))
    exact = await make_fetcher(PRIVATE_OK, FetchLimits(max_bytes=size)).fetch(url)

    assert failed.code == ErrorCode.TOO_LARGE
    assert not failed.is_transient
    assert len(body(exact).data) == size


async def test_dripping_source_times_out(image_host: ImageHost, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher(PRIVATE_OK, FetchLimits(read_timeout=0.5, total_timeout=2))
    started = time.monotonic()

    failed = failure(await fetcher.fetch(image_host.url("drip/cat.jpg")))

    assert failed.code == ErrorCode.TIMEOUT
    assert failed.is_transient
    assert time.monotonic() - started < 4


async def test_slow_source_hits_the_total_timeout(
    image_host: ImageHost, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(PRIVATE_OK, FetchLimits(read_timeout=10, total_timeout=0.5))
    started = time.monotonic()

    failed = failure(await fetcher.fetch(image_host.url("slow/3000/cat.jpg")))

    assert failed.code == ErrorCode.TIMEOUT
    assert time.monotonic() - started < 2.5


async def test_closed_port_is_a_connect_error(make_fetcher: MakeFetcher) -> None:
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        failed = failure(await make_fetcher(PRIVATE_OK).fetch(f"http://127.0.0.1:{port}/x.jpg"))

    assert failed.code == ErrorCode.CONNECT_ERROR
    assert failed.is_transient


# --- bad URLs and names --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@127.0.0.1/cat.jpg",
        "http://user@localhost/cat.jpg",
        "ftp://127.0.0.1/cat.jpg",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "http:///cat.jpg",
        "http://127.0.0.1:99999/cat.jpg",
        "http://local host/cat.jpg",
        "http://127.0.0.1\\.example.com/cat.jpg",
    ],
)
@pytest.mark.parametrize("policy", [DEFAULT, PRIVATE_OK], ids=["default", "private-ok"])
async def test_invalid_urls(
    image_host: ImageHost, make_fetcher: MakeFetcher, url: str, policy: AddressPolicy
) -> None:
    before = total_hits(image_host)

    refused = failure(await make_fetcher(policy).fetch(url))

    assert refused.code == ErrorCode.INVALID_URL, refused.message
    assert not refused.is_transient
    assert total_hits(image_host) == before


async def test_unresolvable_host_is_a_dns_error(make_fetcher: MakeFetcher) -> None:
    failed = failure(await make_fetcher().fetch("http://nonexistent.invalid/cat.jpg"))

    assert failed.code == ErrorCode.DNS_ERROR
    assert failed.is_transient


async def test_resolver_failure_is_a_dns_error(make_fetcher: MakeFetcher) -> None:
    resolver = StaticResolver({})

    failed = failure(await make_fetcher(resolver=resolver).fetch("http://unknown.example/x.jpg"))

    assert failed.code == ErrorCode.DNS_ERROR
    assert resolver.asked == ["unknown.example"]
