"""Exponential backoff with equal jitter, shared by the worker's retries and the
imaging client's rounds."""

from __future__ import annotations

import random

# 2**64 times any base passes any cap; a larger power would only overflow a float.
_MAX_DOUBLINGS = 64


def jittered_backoff(attempt: int, base: float, cap: float) -> float:
    """Half to all of ``min(cap, base * 2 ** (attempt - 1))``, for any attempt number
    (an outage may last thousands of them)."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    backoff = min(cap, base * 2.0**doublings)
    return backoff / 2 + random.uniform(0, backoff / 2)
