"""When the next attempt of a webhook happens, if at all."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_RETRY_AFTER = 86400.0  # a receiver may ask for a pause of up to one day


@dataclass(frozen=True)
class RetrySchedule:
    """``delays[n]`` seconds (give or take ``jitter``) before attempt ``n + 2``.

    After ``len(delays) + 1`` attempts the delivery has failed for good. A
    ``Retry-After`` from the receiver wins when it asks for longer (up to a day).
    """

    delays: Sequence[float]
    jitter: float = 0.2

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def delay(self, attempts: int, retry_after: float | None = None) -> float | None:
        """Seconds until the next attempt after ``attempts`` attempts; None to give up."""
        if attempts >= self.max_attempts:
            return None
        base = self.delays[max(attempts, 1) - 1]
        jittered = base * random.uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after is not None:
            jittered = max(jittered, min(retry_after, MAX_RETRY_AFTER))
        return jittered
