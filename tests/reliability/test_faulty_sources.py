"""A large request whose sources misbehave: flaky hosts, dead links, drips, hostile files.

One request mixes them all with ordinary images: 30% of the sources answer 500 or
reset the connection once and then work; some are 404; one drips a byte a second; some
are pixel bombs, 200 MB bodies, truncated JPEGs, HTML or empty. Each ends with the right
code after the right number of attempts, the neighbours complete, nothing hangs, and
the process that decodes stays under 1 GB of peak RSS.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    fetches,
    images,
    stored_keys,
    upload,
    watch_request,
)
from tests.reliability.conftest import scaled
from tests.support.cluster import Cluster, peak_rss_bytes
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.writes import WriteCounter

IMAGE_ATTEMPTS = 3
TOTAL_TIMEOUT = 2
RSS_LIMIT = 2**30

# (route, expected status, error code, attempts): the route gets a unique query.
HOSTILE = {
    "img/bomb.png": ("failed", "too_many_pixels", 1),
    "huge/200": ("failed", "too_large", 1),
    "img/truncated.jpg": ("failed", "corrupt_image", 1),
    "img/page.jpg": ("failed", "unsupported_format", 1),
    "img/empty.jpg": ("failed", "corrupt_image", 1),
    "status/404": ("failed", "http_error", 1),
    "drip/cat.jpg": ("failed", "timeout", IMAGE_ATTEMPTS),
}


@pytest.fixture
def stack_env(stack: dict[str, str]) -> dict[str, str]:
    stack.update(
        PIXELMILL_IMAGE_ATTEMPTS=str(IMAGE_ATTEMPTS),
        PIXELMILL_FETCH_TOTAL_TIMEOUT=str(TOTAL_TIMEOUT),
    )
    return stack


def _plan(image_host: ImageHost, count: int) -> tuple[list[list[str]], dict[str, tuple]]:
    """Rows of two URLs, and what each URL must end as."""
    tag = uuid.uuid4().hex[:8]
    expected: dict[str, tuple[str, str | None, int]] = {}
    urls: list[str] = []
    hostile = list(HOSTILE.items())
    for n in range(count):
        photo = PHOTOS[n % len(PHOTOS)]
        if n % 40 == 7:  # the hostile ones, spread over the request
            route, outcome = hostile[(n // 40) % len(hostile)]
        elif n % 10 < 3:  # 30%: fail once (a 500 or a reset), then succeed
            kind = "flaky" if n % 2 else "reset"
            route, outcome = f"{kind}/{tag}-{n}/{photo}", ("completed", None, 2)
        else:
            route, outcome = f"img/{photo}", ("completed", None, 1)
        url = image_host.url(f"{route}?faults={tag}-{n}")
        urls.append(url)
        expected[url] = outcome
    # Every kind of hostile source at least once.
    for route, outcome in hostile:
        url = image_host.url(f"{route}?faults={tag}-extra")
        urls.append(url)
        expected[url] = outcome
    if len(urls) % 2:
        urls.append(image_host.url(f"img/cat.jpg?faults={tag}-last"))
        expected[urls[-1]] = ("completed", None, 1)
    return [urls[i : i + 2] for i in range(0, len(urls), 2)], expected


def test_faulty_and_hostile_sources_in_a_large_request(
    stack_env: dict[str, str],
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    rows, expected = _plan(image_host, scaled(400))
    started = time.monotonic()
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    cluster.add_worker()
    status = cluster.wait_finished(request_id, timeout=scaled(180))
    elapsed = time.monotonic() - started

    check_each_terminal_once(cluster, request_id, len(expected))
    outcomes = {
        image["input_url"]: (
            image["status"],
            image["error"]["code"] if image["error"] else None,
            image["attempts"],
        )
        for image in images(cluster, request_id)
    }
    wrong = {url: (got, expected[url]) for url, got in outcomes.items() if got != expected[url]}
    fetched = {url: fetches(image_host, url) for url in wrong}
    assert not wrong, f"{len(wrong)} ended otherwise (got, expected; fetches): {fetched} {wrong}"
    assert status["status"] == "completed"
    for url, (_status, code, attempts) in expected.items():
        if code in ("http_error", "too_large", "too_many_pixels"):
            assert fetches(image_host, url) == 1, f"{url}: a permanent failure is not retried"
        elif code is None:
            assert fetches(image_host, url) == attempts, url
    outputs = check_output_csv(cluster, request_id, rows)
    check_written_once(writes, request_id, stored_keys(outputs))
    decoder = cluster.imaging[0] if cluster.imaging else cluster.workers[0]
    rss = peak_rss_bytes(decoder)
    assert rss < RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    codes = Counter(code for _status, code, _attempts in outcomes.values())
    figures.update(
        images=len(expected),
        retried_once=sum(1 for _s, _c, a in outcomes.values() if a == 2),
        failed_by_code={str(code): n for code, n in sorted(codes.items(), key=str) if code},
        peak_rss_mib=round(rss / 2**20),
        seconds=round(elapsed, 1),
    )
