"""Backoff of the worker's retries and of the imaging client's rounds, at any count."""

from __future__ import annotations

import pytest

from pixelmill.backoff import jittered_backoff
from pixelmill.worker import RetryPolicy


@pytest.mark.parametrize("attempt", [1, 2, 5, 1_025, 10**6])
def test_backoff_stays_between_half_and_all_of_its_capped_delay(attempt: int) -> None:
    """A day of outage is thousands of rounds: 2 ** 1024 used to overflow a float."""
    expected = min(30.0, 0.5 * 2.0 ** min(attempt - 1, 64))

    delays = [jittered_backoff(attempt, 0.5, 30.0) for _ in range(50)]

    assert all(expected / 2 <= delay <= expected for delay in delays)


def test_a_zero_base_never_waits_and_never_overflows() -> None:
    assert jittered_backoff(5_000, 0.0, 30.0) == 0.0


def test_the_retry_policy_honours_a_longer_retry_after_up_to_its_cap() -> None:
    policy = RetryPolicy(attempts=4, base_delay=0.5, max_delay=30.0)

    assert policy.delay(10_000) <= 30.0
    assert policy.delay(1, retry_after=12.0) == 12.0
    assert policy.delay(1, retry_after=3_600.0) == 30.0
